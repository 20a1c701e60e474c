"""The simulator's moving target: its path, its truth, its light and its absence from the refcat.

Expected positions are computed here from the definition (straight line in RA and Dec,
``dRA`` on the sky, so the RA coordinate moves by ``dRA / cos(dec0)``), not by the
simulator's helpers.
"""

import dataclasses
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from conftest import raw_ota_image
from podi_rawdata import find_exposure
from podi_simulate import Effects, ExposureSpec, main, moving_target, simulate_exposure, true_ota_wcs

BINNING = 2
OTA = 44
RATE = (60.0, -40.0)     # arcsec/hour, dRA on the sky
#: Magnitude and exposure time of the bright target: ~9e5 e-, peak well below saturation.
MAG, EXPTIME = 14.0, 10.0
#: Target's pixel on OTA 44 (binned): in the middle of cell (3, 5), away from cell gaps.
TARGET_PIXEL = (880.0, 630.0)
QUIET = {f.name: False for f in dataclasses.fields(Effects)}


def moving_spec(**changes):
    """One binned OTA with sky and stars only: raw ADU = electrons / 1.3."""
    base = ExposureSpec(otas=(OTA,), binning=BINNING, seed=5, exptime=EXPTIME, moving=RATE,
                        moving_mag=MAG, effects=Effects(**dict(QUIET, sky=True, stars=True)))
    return dataclasses.replace(base, **changes)




def separation_arcsec(ra1, dec1, ra2, dec2):
    """Small-angle separation (arcsec) of positions in degrees."""
    dra = (np.asarray(ra1) - ra2 + 180) % 360 - 180
    return 3600 * np.hypot(dra * math.cos(math.radians(dec2)), np.asarray(dec1) - dec2)


@pytest.fixture(scope="module")
def target_exposure(tmp_path_factory):
    """A bright moving target placed at TARGET_PIXEL of OTA 44; its truth and refcat."""
    root = tmp_path_factory.mktemp("moving")
    spec = moving_spec()
    start = WCS(true_ota_wcs(spec, OTA)).all_pix2world([TARGET_PIXEL[0]], [TARGET_PIXEL[1]], 0)
    exposure = simulate_exposure(dataclasses.replace(spec, moving_start=(start[0][0], start[1][0])),
                                 root, ncpus=1)
    truth = fits.open(root / f"{exposure.name}.truth.fits")
    return {"exposure": exposure, "header": truth[0].header, "stars": Table(truth["STARS"].data),
            "refcat": Table.read(root / f"{exposure.name}.refcat.fits")}


def test_position_follows_the_rate():
    """MJDs as floats hold ~1e-6 s: positions agree to ~1e-9 deg."""
    start, epoch = (150.1, 30.2), 56620.0
    spec = ExposureSpec(moving=RATE, moving_start=start, moving_epoch=epoch, mjd=epoch + 0.5 / 24)
    ra, dec = moving_target(spec)
    # Half an hour: 30" east on the sky, 20" south.
    assert dec == pytest.approx(30.2 - 20.0 / 3600, abs=1e-9)
    assert ra == pytest.approx(150.1 + 30.0 / 3600 / math.cos(math.radians(30.2)), abs=1e-9)
    # Before the epoch it runs backwards.
    ra, dec = moving_target(dataclasses.replace(spec, mjd=epoch - 1 / 24))
    assert dec == pytest.approx(30.2 + 40.0 / 3600, abs=1e-9)
    assert ra == pytest.approx(150.1 - 60.0 / 3600 / math.cos(math.radians(30.2)), abs=1e-9)


def test_default_start_and_epoch():
    """Start 0.05 deg north-east of the field centre (on the sky) at the exposure's MJD."""
    ra, dec = moving_target(ExposureSpec(ra=150.0, dec=30.0, moving=RATE))
    assert dec == pytest.approx(30.05, abs=1e-9)
    assert ra == pytest.approx(150.0 + 0.05 / math.cos(math.radians(30.0)), abs=1e-9)
    centred = ExposureSpec(ra=150.2, dec=30.1, field_centre=(150.0, 30.0), moving=RATE)
    assert moving_target(centred) == pytest.approx((ra, dec), abs=1e-9)
    assert moving_target(ExposureSpec()) is None


def test_default_start_falls_on_a_central_ota(tmp_path):
    """The default start lands on OTA 44 of the model WCS; the truth says where."""
    spec = moving_spec(otas=(OTA,), star_density=0.0)
    exposure = simulate_exposure(spec, tmp_path, ncpus=1)
    header = fits.getheader(tmp_path / f"{exposure.name}.truth.fits")
    assert header["MOVOTA"] == OTA
    assert 0 <= header["MOVX"] < 2048 and 0 <= header["MOVY"] < 2048
    assert header["MOVEPOCH"] == spec.mjd


def test_truth_cards(target_exposure):
    h = target_exposure["header"]
    assert (h["MOVDRA"], h["MOVDDEC"]) == RATE
    assert h["MOVOTA"] == OTA
    assert (h["MOVX"], h["MOVY"]) == pytest.approx(TARGET_PIXEL, abs=1e-3)
    for key in ("MOVRA", "MOVDEC", "MOVEPOCH", "MOVDRA", "MOVDDEC", "MOVOTA", "MOVX", "MOVY"):
        assert h.comments[key]


def test_target_light_at_its_pixel(target_exposure):
    """All the target's electrons are in a box around MOVX/MOVY, peaking at it."""
    h = target_exposure["header"]
    raw = raw_ota_image(target_exposure["exposure"], OTA)
    x, y = round(h["MOVX"]), round(h["MOVY"])
    around = raw[y - 60:y + 61, x - 60:x + 61].copy()
    around[35:-35, 35:-35] = np.nan     # sky from outside the target's box
    sky = np.nanmedian(around)
    box = raw[y - 20:y + 21, x - 20:x + 21]
    assert np.all(np.isfinite(box))
    peak_y, peak_x = np.unravel_index(np.argmax(box), box.shape)
    assert abs(peak_x - 20) <= 1 and abs(peak_y - 20) <= 1
    electrons = (box - sky).sum() * 1.3      # every cell has the nominal gain
    expected = 10 ** (-0.4 * (MAG - 26.4)) * EXPTIME   # odi_r: 0 mag = 10**(0.4 * 26.4) e-/s
    # 20 binned px = 4.4" holds all but ~1e-3 of a 1" Moffat (beta 3.5).
    assert electrons == pytest.approx(expected, rel=0.01)


def test_target_not_in_any_catalog(target_exposure):
    h = target_exposure["header"]
    refcat, stars = target_exposure["refcat"], target_exposure["stars"]
    assert len(refcat) > 100    # the field's stars are there
    assert separation_arcsec(refcat["ra"], refcat["dec"], h["MOVRA"], h["MOVDEC"]).min() > 2.0
    assert separation_arcsec(stars["ra"], stars["dec"], h["MOVRA"], h["MOVDEC"]).min() > 2.0
    assert not np.any(np.abs(stars["mag"] - MAG) < 1e-9)


def test_sequence_moves_at_the_rate(tmp_path, capsys):
    """Three exposures 30 min apart share the epoch; MOVRA/MOVDEC move 30", -20" each step."""
    effects = [f"--no-{f.name.replace('_', '-')}" for f in dataclasses.fields(Effects)]
    assert main([str(tmp_path), "--otas", "44", "--binning", "2", "--exptime", "1", "--count", "3",
                 "--interval", "1800", "--moving", "60,-40", "--star-density", "0"] + effects) == 0
    exposures = capsys.readouterr().out.split()
    headers = [fits.getheader(tmp_path / f"{name.split('/')[-1]}.truth.fits") for name in exposures]
    raw_mjds = [fits.getheader(find_exposure(name).ota_files[44])["MJD-OBS"] for name in exposures]
    assert [h["MOVEPOCH"] for h in headers] == [raw_mjds[0]] * 3
    assert np.diff(raw_mjds) * 86400 == pytest.approx([1800, 1800], abs=1e-3)
    ra0, dec0 = headers[0]["MOVRA"], headers[0]["MOVDEC"]
    for step, h in enumerate(headers):
        dt_h = (raw_mjds[step] - raw_mjds[0]) * 24
        assert (h["MOVRA"] - ra0) * math.cos(math.radians(dec0)) * 3600 == pytest.approx(60 * dt_h, abs=1e-6)
        assert (h["MOVDEC"] - dec0) * 3600 == pytest.approx(-40 * dt_h, abs=1e-6)
    assert dt_h == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("value", ["abc", "1", "1,2,3", "1,x"])
def test_bad_moving_is_an_error(tmp_path, capsys, value):
    assert main([str(tmp_path), "--otas", "44", "--binning", "2", "--moving", value]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("podi_simulate: error: --moving") and value in err
    assert "\n" not in err
    assert not any(tmp_path.iterdir())
