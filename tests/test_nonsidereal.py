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


# --- A comet through a one-hour sequence, against the simulator's truth ------------------

RATE = (30.0, -20.0)  # arcsec/hour: dRA cos(Dec), dDec


@pytest.fixture(scope="module")
def comet_sequence(tmp_path_factory):
    """Three frames 30 minutes apart of one field with a moving target, each reduced with
    -fixwcs and -nonsidereal referred to the first frame's raw file."""
    import dataclasses

    from conftest import STAR_FIELD_OTAS, refcat_of, run_collectcells, small_spec
    from podi_rawdata import find_exposure
    from podi_simulate import simulate_exposure, write_true_calibrations
    root = tmp_path_factory.mktemp("comet")
    base = small_spec(otas=STAR_FIELD_OTAS, seed=70, field_seed=70, mjd=56620.3, moving=RATE,
                      moving_epoch=56620.3)
    write_true_calibrations(base, root / "cals")
    exposures = [simulate_exposure(dataclasses.replace(base, seed=70 + i, sequence=i + 1,
                                                       mjd=56620.3 + i / 48), root / "raw", ncpus=2)
                 for i in range(3)]
    reference = find_exposure(exposures[0]).ota_files[33]
    outputs = []
    for exposure in exposures:
        output = root / f"{exposure.name}.fits"
        assert run_collectcells(exposure, output, f"-cals={root / 'cals'}", "-ncpus=2", "-fixwcs",
                                f"-refcat={refcat_of(exposure)}", "-noqaplots",
                                f"-nonsidereal={RATE[0]},{RATE[1]},{reference}") == 0
        outputs.append(output)
    return exposures, outputs


def truth_of(exposure):
    return fits.getheader(exposure.parent / f"{exposure.name}.truth.fits")


def world(output, ota, x, y):
    with fits.open(output) as hdus:
        return WCS(hdus[f"OTA{ota}.SCI"].header).all_pix2world([[x, y]], 0)[0]


def arcsec_apart(a, b):
    east = ((a[0] - b[0] + 180) % 360 - 180) * math.cos(math.radians(b[1])) * 3600
    return east, (a[1] - b[1]) * 3600


def test_comet_keeps_its_coordinates(comet_sequence):
    exposures, outputs = comet_sequence
    positions = []
    for exposure, output in zip(exposures, outputs):
        truth = truth_of(exposure)
        assert truth["MOVOTA"] in (33, 34, 43, 44)
        positions.append(world(output, truth["MOVOTA"], truth["MOVX"], truth["MOVY"]))
    first = truth_of(exposures[0])
    for position in positions:
        # Constant through the hour, at the target's position at the reference time.
        assert math.hypot(*arcsec_apart(position, positions[0])) < 0.1
        assert math.hypot(*arcsec_apart(position, (first["MOVRA"], first["MOVDEC"]))) < 0.1
    # Without the shift the comet would have moved by the rate: the test can fail.
    last = truth_of(exposures[-1])
    moved = arcsec_apart((last["MOVRA"], last["MOVDEC"]), (first["MOVRA"], first["MOVDEC"]))
    assert moved == pytest.approx(RATE, abs=0.01)


def test_stars_move_by_the_rate(comet_sequence):
    """A star's pixel in the last frame (1 hour later) points 30" west and 20" north of
    the star; in the first frame at the star."""
    from astropy.table import Table
    exposures, outputs = comet_sequence
    for exposure, output, hours in ((exposures[0], outputs[0], 0.0), (exposures[-1], outputs[-1], 1.0)):
        stars = Table.read(exposure.parent / f"{exposure.name}.truth.fits", hdu="STARS")
        star = stars[(stars["ota"] == 33) & (stars["mag"] < 19)][0]
        east, north = arcsec_apart(world(output, 33, star["x"], star["y"]), (star["ra"], star["dec"]))
        assert east == pytest.approx(-RATE[0] * hours, abs=0.1)
        assert north == pytest.approx(-RATE[1] * hours, abs=0.1)
    assert fits.getval(outputs[-1], "NSIDPMRA") == RATE[0] and fits.getval(outputs[-1], "WCSCAL")
