"""The simulator's raw data have the statistics its truth record claims."""

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import podi_crosstalk
from podi_definitions import PODI, all_cells, cell_to_ota, science_section
from podi_overscan import overscan_levels
from podi_rawdata import find_exposure, open_raw_ota
from podi_simulate import Instrument, moffat_enclosed, simulate_exposure
from podi_wcs import parse_pointing
from conftest import TEST_BINNING, small_spec


def truth_of(exposure):
    return fits.open(exposure.parent / f"{exposure.name}.truth.fits")


def corrected_cells(exposure, ota):
    """Raw cells of an OTA with the simulator's crosstalk undone (ADU)."""
    with open_raw_ota(find_exposure(exposure).ota_files[ota]) as raw:
        return podi_crosstalk.apply_crosstalk(raw.cells(), podi_crosstalk.default_crosstalk()[1])


def cell_truth(truth, ota):
    cells = Table(truth["CELLS"].data)
    return cells[cells["ota"] == ota]


def test_overscan_level_and_read_noise(object_exposure):
    truth = truth_of(object_exposure)
    cells = corrected_cells(object_exposure, 33)
    levels = overscan_levels(cells, TEST_BINNING)
    for row in cell_truth(truth, 33):
        block = cells[row["cy"], row["cx"], :247, 260:277]
        # Standard error of the mean of ~4200 pixels is ~0.1 ADU.
        assert levels[row["cy"], row["cx"]] == pytest.approx(row["bias_level"], abs=0.5)
        assert np.std(block) == pytest.approx(math.hypot(row["rdnoise"], 0.29), rel=0.04)


def test_bias_structure_after_overscan(calibration_exposures):
    exposure = calibration_exposures["bias"][0]
    cells = corrected_cells(exposure, 22)
    cells -= overscan_levels(cells, TEST_BINNING)[:, :, None, None].astype(np.float32)
    structure = Instrument(PODI).bias_structure(22, TEST_BINNING, cells.shape[2:])
    residual = (cells - structure)[:, :, :247, :240]
    rdnoise = cell_truth(truth_of(exposure), 22)["rdnoise"].mean()
    assert abs(residual.mean()) < 0.05
    assert residual.std() == pytest.approx(rdnoise, rel=0.05)
    assert structure[:, :, :247, :240].std() > 1.0   # there is a structure to recover


def test_gain_from_a_pair_of_flats(calibration_exposures):
    """Photon transfer: variance of the difference of two flats gives each cell's gain."""
    first, second = (corrected_cells(e, 33) for e in calibration_exposures["flat"][:2])
    for cells in (first, second):
        cells -= overscan_levels(cells, TEST_BINNING)[:, :, None, None].astype(np.float32)
    truth = cell_truth(truth_of(calibration_exposures["flat"][0]), 33)
    rows, cols = science_section(TEST_BINNING)
    for row in truth:
        a = first[row["cy"], row["cx"], rows, cols].astype(np.float64)
        b = second[row["cy"], row["cx"], rows, cols].astype(np.float64)
        # Cosmic rays and hot pixels would bias the variance: clip them.
        diff = a - b
        keep = np.abs(diff - np.median(diff)) < 5 * 1.4826 * np.median(np.abs(diff - np.median(diff)))
        signal = 0.5 * (a + b)[keep].mean()
        variance = 0.5 * diff[keep].var() - row["rdnoise"] ** 2
        assert signal / variance == pytest.approx(row["gain"], rel=0.03)


def test_dark_current_and_hot_pixels(calibration_exposures):
    exposure = calibration_exposures["dark"][0]
    cells = corrected_cells(exposure, 34)
    cells -= overscan_levels(cells, TEST_BINNING)[:, :, None, None].astype(np.float32)
    instrument = Instrument(PODI)
    cells -= instrument.bias_structure(34, TEST_BINNING, cells.shape[2:])
    image = np.full((2048, 2048), np.nan, np.float32)
    gain_map = np.full((2048, 2048), np.nan)
    rows, cols = science_section(TEST_BINNING)
    for cx, cy in all_cells():
        image[cell_to_ota(cx, cy, TEST_BINNING)] = cells[cy, cx, rows, cols]
        gain_map[cell_to_ota(cx, cy, TEST_BINNING)] = instrument.gains(34)[cy, cx]
    expected = instrument.dark_current(34, TEST_BINNING) * 300.0 / gain_map
    x, y, rate = instrument.hot_pixels(34)
    hot = (y // 2, x // 2)
    good = np.isfinite(image[hot]) & (expected[hot] > 300)
    assert good.sum() > 20
    ratio = image[hot][good] / expected[hot][good]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)


def _isolated_bright_stars(stars, ota, size=2048):
    on = stars[stars["ota"] == ota]
    keep = []
    for i, star in enumerate(on):
        distance = np.hypot(on["x"] - star["x"], on["y"] - star["y"])
        if (1e5 < star["flux_e"] < 1.5e6 and 30 < star["x"] < size - 30 and 30 < star["y"] < size - 30
                and np.sort(distance)[1] > 25):
            keep.append(i)
    return on[keep]


def windowed_centroid(stamp, fwhm, iterations=20):
    """Gaussian-windowed centroid (unbiased for symmetric profiles), stamp-centre relative."""
    half = stamp.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    x = y = 0.0
    sigma = fwhm / 2.355
    for _ in range(iterations):
        weight = stamp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        x, y = (weight * xx).sum() / weight.sum(), (weight * yy).sum() / weight.sum()
    return x, y


def test_star_fluxes_and_positions(object_exposure):
    """Stars have the truth's total flux (in electrons) and sit at the truth's pixels."""
    truth = truth_of(object_exposure)
    stars = Table(truth["STARS"].data)
    instrument = Instrument(PODI)
    cells = corrected_cells(object_exposure, 33)
    cells -= overscan_levels(cells, TEST_BINNING)[:, :, None, None].astype(np.float32)
    cells -= instrument.bias_structure(33, TEST_BINNING, cells.shape[2:])
    image = np.full((2048, 2048), np.nan, np.float32)
    rows, cols = science_section(TEST_BINNING)
    gains = instrument.gains(33)
    for cx, cy in all_cells():
        image[cell_to_ota(cx, cy, TEST_BINNING)] = cells[cy, cx, rows, cols] * gains[cy, cx]
    image /= instrument.flat(33, TEST_BINNING)
    fwhm_px = truth[0].header["FWHM"] / (0.1126 * TEST_BINNING)
    ratios, offsets = [], []
    yy, xx = np.mgrid[-25:26, -25:26]
    r = np.hypot(xx, yy)
    for star in _isolated_bright_stars(stars, 33):
        x0, y0 = int(round(star["x"])), int(round(star["y"]))
        stamp = image[y0 - 25:y0 + 26, x0 - 25:x0 + 26]
        if not np.isfinite(stamp).all():
            continue
        sky = np.median(stamp[r > 18])
        signal = stamp - sky
        aperture = r <= 12
        enclosed = moffat_enclosed(12, fwhm_px, truth[0].header["MOFFBETA"])
        ratios.append(signal[aperture].sum() / (star["flux_e"] * enclosed))
        offsets.append(np.array(windowed_centroid(signal, fwhm_px)) + (x0, y0) - (star["x"], star["y"]))
    assert len(ratios) >= 5
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    assert np.median(np.abs(offsets)) < 0.05


def test_pointing_error_and_reference_catalog(tmp_path):
    spec = small_spec(otas=(33,), seed=3, pointing_error=(30.0, -20.0))
    exposure = simulate_exposure(spec, tmp_path, ncpus=1)
    truth = truth_of(exposure)[0].header
    header = fits.getheader(find_exposure(exposure).ota_files[33])
    ra, dec = parse_pointing(header)
    assert (ra, dec) == (truth["HDR_RA"], truth["HDR_DEC"])
    d_ra = (ra - truth["TRUE_RA"]) * math.cos(math.radians(truth["TRUE_DEC"])) * 3600
    assert d_ra == pytest.approx(30.0, abs=0.02)
    assert (dec - truth["TRUE_DEC"]) * 3600 == pytest.approx(-20.0, abs=0.02)
    assert "WAT1_001" in header and header["CTYPE1"] == "RA---ZPX"

    catalog = Table.read(exposure.parent / f"{exposure.name}.refcat.fits")
    assert set("ugriz") | {"ra", "dec", "r_err"} <= set(catalog.colnames)
    stars = Table(truth_of(exposure)["STARS"].data)
    matched = np.isin(np.round(catalog["ra"], 9), np.round(stars["ra"], 9))
    assert matched.sum() > 10
    for row in catalog[matched][:200]:
        true = stars[np.argmin(np.abs(stars["ra"] - row["ra"]) + np.abs(stars["dec"] - row["dec"]))]
        assert abs(row["r"] - true["mag"]) < 5 * row["r_err"]
    assert catalog["r"].max() < 22.5
