"""podi_collectcells: the reduced frame against the simulator's truth, keywords, WCS."""

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from podi_definitions import PODI, all_cells, broken_cells, cell_to_ota
from podi_simulate import Instrument, true_signal
from conftest import OBJECT_SPEC, TEST_BINNING, TEST_OTAS, run_collectcells


def truth_of(exposure):
    return fits.open(exposure.parent / f"{exposure.name}.truth.fits")


def cell_map(values, ota):
    image = np.full((2048, 2048), np.nan)
    for cx, cy in all_cells():
        if (cx, cy) not in broken_cells(PODI, ota):
            image[cell_to_ota(cx, cy, TEST_BINNING)] = values[cy, cx]
    return image


def expected_noise(ota, signal_e, level):
    """Pixel noise of the reduced frame (ADU): Poisson, dark and read noise through the flat."""
    instrument = Instrument(PODI)
    gains = cell_map(instrument.gains(ota), ota)
    read_noise_e = cell_map(instrument.read_noise(ota), ota) * gains
    flat = instrument.flat(ota, TEST_BINNING)
    dark_e = instrument.dark_current(ota, TEST_BINNING) * OBJECT_SPEC.exptime
    return level * np.sqrt(signal_e * flat + dark_e + read_noise_e**2) / flat


def test_reduced_image_equals_truth_within_noise(reduced_object, object_exposure):
    truth = truth_of(object_exposure)[0].header
    level = truth["FLATNRMA"]
    all_scores = []
    with fits.open(reduced_object) as hdus:
        for ota in TEST_OTAS:
            image = hdus[f"OTA{ota:02d}.SCI"].data.astype(np.float64)
            signal = true_signal(OBJECT_SPEC, ota)
            sigma = expected_noise(ota, signal, level)
            flat = Instrument(PODI).flat(ota, TEST_BINNING)
            z = (image - signal * level) / sigma
            good = np.isfinite(z) & (np.abs(z) < 6)     # cosmic rays are not in the model
            assert good.mean() > 0.85
            assert np.sqrt(np.mean(z[good] ** 2)) == pytest.approx(1.0, abs=0.05)
            scores = []
            for cx, cy in all_cells():
                region = cell_to_ota(cx, cy, TEST_BINNING)
                if (cx, cy) in broken_cells(PODI, ota):
                    assert np.isnan(image[region]).all()
                    continue
                cell = z[region]
                cell = cell[np.abs(cell) < 6]
                scores.append(cell.mean() / math.hypot(cell.std() / math.sqrt(cell.size),
                                                       overscan_error(ota, cx, cy, sigma[region],
                                                                      flat[region], level)))
            all_scores.extend(scores)
    # Cell means are noise: scattered like a unit Gaussian (3 sigma for ~1 in 370
    # cells); a seam or a wrong cell gain would stand out by tens of sigma.
    all_scores = np.array(all_scores)
    assert np.std(all_scores) == pytest.approx(1.0, abs=0.2)
    assert abs(np.mean(all_scores)) < 0.3
    assert np.mean(np.abs(all_scores) > 3) < 0.02
    assert np.abs(all_scores).max() < 4.5


def overscan_error(ota, cx, cy, sigma, flat, level):
    """Error of a cell's overscan level (17 x 247 pixels at binning 2) in units of ``sigma``."""
    instrument = Instrument(PODI)
    error = instrument.read_noise(ota)[cy, cx] / math.sqrt(17 * 247)
    return error * instrument.gains(ota)[cy, cx] * level / np.median(flat) / np.median(sigma)


def _cell_sky_levels(image, ota):
    levels = []
    for cx, cy in all_cells():
        if (cx, cy) in broken_cells(PODI, ota):
            continue
        pixels = image[cell_to_ota(cx, cy, TEST_BINNING)]
        pixels = pixels[np.isfinite(pixels)]
        median = np.median(pixels)
        sigma = 1.4826 * np.median(np.abs(pixels - median))
        levels.append(np.median(pixels[np.abs(pixels - median) < 3 * sigma]))
    return np.array(levels)


def test_no_seams_with_masters_from_makecalibrations(object_exposure, masters, tmp_path):
    output = tmp_path / "seams.fits"
    cals = masters["bias_bin2.fits"].parent
    assert run_collectcells(object_exposure, output, f"-cals={cals}", "-ncpus=2") == 0
    truth = truth_of(object_exposure)[0].header
    with fits.open(output) as hdus:
        levels = np.concatenate([_cell_sky_levels(hdus[f"OTA{ota:02d}.SCI"].data, ota)
                                 for ota in TEST_OTAS])
        # Every cell of every OTA on the same sky level to 0.1 %.
        assert np.abs(levels / np.median(levels) - 1).max() < 0.001
        assert np.median(levels) == pytest.approx(truth["SKY_ADU"], rel=0.005)
        assert hdus[0].header["SKYLEVEL"] == pytest.approx(truth["SKY_ADU"], rel=0.005)


def test_units_and_keywords(reduced_object, object_exposure):
    truth = truth_of(object_exposure)[0].header
    level = truth["FLATNRMA"]
    with fits.open(reduced_object, checksum=True) as hdus:
        primary = hdus[0].header
        assert primary["BUNIT"] == "adu"
        assert primary["GAIN"] == pytest.approx(1 / level, rel=1e-6)
        assert primary["PIPELINE"] == "QuickReduce"
        history = "\n".join(primary["HISTORY"])
        assert "podi_collectcells" in history and "numpy" in history and "astropy" in history
        assert primary["MJD-MID"] == pytest.approx(OBJECT_SPEC.mjd + 150 / 86400)
        assert primary["NOTAS"] == 3 and primary["NFAILED"] == 0
        assert [h.name for h in hdus[1:4]] == ["OTA33.SCI", "OTA34.SCI", "OTA22.SCI"]
        assert hdus[-1].name == "ASSOCIATIONS"
        # Read noise in output units: ~6.5 ADU x gain x flat level.
        rdnoise_e = np.mean([Instrument(PODI).read_noise(o) * Instrument(PODI).gains(o) for o in TEST_OTAS])
        assert primary["RDNOISE"] == pytest.approx(rdnoise_e * level, rel=0.05)
        sky_noise = level * math.sqrt(truth["SKY_E"] + 3.6 + rdnoise_e**2)
        assert primary["SKYNOISE"] == pytest.approx(sky_noise, rel=0.03)
        assert 40000 < primary["SATURATE"] < 65535 * 1.3 * level
        for hdu in hdus[1:4]:
            assert hdu.header["INHERIT"] is True
            assert "FILTER" not in hdu.header and "WAT1_001" not in hdu.header
            ota = hdu.header["OTA"]
            x0, y0 = (ota // 10) * 2048, (ota % 10) * 2048
            assert hdu.header["DETSEC"] == f"[{x0 + 1}:{x0 + 2048},{y0 + 1}:{y0 + 2048}]"
            assert (hdu.header["LTV1"], hdu.header["LTV2"]) == (-x0, -y0)
            assert hdu.header["SKY_MEDI"] == pytest.approx(truth["SKY_ADU"], rel=0.005)
        for hdu in hdus:
            assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1
        steps = set(hdus["ASSOCIATIONS"].data["correction"])
        assert steps == {"raw", "bias", "dark", "flat", "wcs"}


def test_wcs_puts_true_stars_on_their_pixels(reduced_object, object_exposure):
    stars = Table(truth_of(object_exposure)["STARS"].data)
    with fits.open(reduced_object) as hdus:
        for ota in TEST_OTAS:
            header = hdus[f"OTA{ota:02d}.SCI"].header
            assert header["CTYPE1"] == "RA---TPV" and header["RADESYS"] == "ICRS"
            wcs = WCS(header)
            mine = stars[stars["ota"] == ota]
            x, y = wcs.all_world2pix(mine["ra"], mine["dec"], 0)
            offset = np.hypot(x - mine["x"], y - mine["y"]) * 0.1126 * TEST_BINNING
            assert offset.max() < 0.5            # arcsec; exact pointing, same model
            assert np.median(offset) < 0.01
