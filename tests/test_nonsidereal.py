"""podi_nonsidereal: the WCS shifted with a moving target, checked through astropy.wcs."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from podi_nonsidereal import SkyMotion, follow_target


def tan_header(ra, dec):
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": ra, "CRVAL2": dec,
                          "CRPIX1": 2048.0, "CRPIX2": 2048.0, "CD1_1": -3.0e-5, "CD1_2": 0.0,
                          "CD2_1": 0.0, "CD2_2": 3.0e-5, "CHECKSUM": "0" * 16, "DATASUM": "0"})
    for _ in range(8):
        header.add_blank()
    return header


def sky_shift(before, after, pixel):
    """On-sky shift (east, north; arcsec) of a pixel's position between two headers."""
    (ra0, dec0), (ra1, dec1) = (WCS(header).all_pix2world([pixel], 0)[0] for header in (before, after))
    return (((ra1 - ra0 + 180) % 360 - 180) * math.cos(math.radians(dec1)) * 3600,
            (dec1 - dec0) * 3600)


@pytest.mark.parametrize("dec", [0.0, 45.0, -70.0])
def test_sky_positions_move_against_the_target(dec):
    """An hour after the reference the stars' pixels point 60" west and 40" north of where
    they pointed: the target (60" east, 40" south later) keeps its coordinates. Exact at
    the tangent point; away from it the original's CRVAL shift is off by about
    motion x field angle x (1 + |tan(Dec)|): 0.04-0.15" here, 0.042 degrees away."""
    results = {33: SimpleNamespace(header=tan_header(359.99, dec), header_text="")}
    before = results[33].header.copy()
    cards = len(results[33].header)
    keywords = follow_target(results, SkyMotion(60.0, -40.0, 56620.0, "56620.0"), 56620.0 + 1 / 24)
    east, north = sky_shift(before, results[33].header, [2047.0, 2047.0])
    assert east == pytest.approx(-60.0, abs=1e-4) and north == pytest.approx(40.0, abs=1e-4)
    east, north = sky_shift(before, results[33].header, [1047.0, 3047.0])
    bound = 72.0 * math.radians(0.042) * (1 + abs(math.tan(math.radians(dec))))
    assert math.hypot(east + 60.0, north - 40.0) < bound
    assert len(results[33].header) == cards  # the keywords took blank cards
    assert results[33].header["NSIDDDEC"] == pytest.approx(-40.0 / 3600)
    assert keywords["NSIDPMRA"][0] == 60.0 and keywords["NSIDBASE"][0] == 56620.0
    assert results[33].header_text.startswith("CTYPE1")


def test_at_the_reference_time_nothing_moves():
    results = {33: SimpleNamespace(header=tan_header(150.0, 30.0), header_text="")}
    follow_target(results, SkyMotion(60.0, -40.0, 56620.0, "56620.0"), 56620.0)
    assert (results[33].header["CRVAL1"], results[33].header["CRVAL2"]) == (150.0, 30.0)
    assert np.isclose(results[33].header["NSIDDRA"], 0.0)


def test_collectcells_shifts_every_extension(object_exposure, true_cals, reduced_object, tmp_path):
    """Without -fixwcs too: the canned WCS of each OTA is shifted, in place of spare cards,
    and the file stays valid (checksums). OTA 22 lies 0.4 degrees from the tangent point,
    where the CRVAL shift is off by up to 0.12" for this motion (see above)."""
    from conftest import run_collectcells
    mjd = fits.getval(reduced_object, "MJD-OBS")
    output = tmp_path / "moving.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-ncpus=2",
                            f"-nonsidereal=60,-40,{mjd - 0.5 / 24}") == 0
    with fits.open(output, checksum=True) as moved, fits.open(reduced_object) as plain:
        assert moved[0].header["NSIDBASE"] == pytest.approx(mjd - 0.5 / 24)
        for ota in (22, 33, 34):
            name = f"OTA{ota}.SCI"
            east, north = sky_shift(plain[name].header, moved[name].header, [1000.0, 1000.0])
            assert east == pytest.approx(-30.0, abs=0.15) and north == pytest.approx(20.0, abs=0.15)
            assert moved[name].header["NSIDDDEC"] == pytest.approx(-20.0 / 3600)
            np.testing.assert_array_equal(moved[name].data, plain[name].data)
