"""Bad-pixel region files derived from master darks and flats (podi_badpixels)."""

import numpy as np
import pytest

import podi_badpixels
from podi_badpixels import (HOT_RATE, column_runs, derive_bpm_files, find_bad_pixels,
                            hot_threshold, row_median, unbinned_box)
from podi_bpm import read_bpm_mask, write_bpm_regions
from podi_definitions import PODI
from podi_mef import read_ota_image
from podi_simulate import Instrument

from conftest import TEST_BINNING, TEST_OTAS

SIZE = 4096 // TEST_BINNING
DARK_EXPTIME = 300.0  # s, the exposure time of the session's darks


# --- Pure functions on synthetic arrays -----------------------------------------

def test_unbinned_box_covers_exactly_the_binned_pixels(tmp_path):
    """A box read back at its binning gives exactly the pixels it was made from."""
    path = tmp_path / "bpm_xy33.reg"
    write_bpm_regions(path, [unbinned_box(10, 20, 24, 2), unbinned_box(0, 0, 0, 2)])
    mask = read_bpm_mask(path, binning=2)
    expected = np.zeros((2048, 2048), bool)
    expected[20:25, 10] = True
    expected[0, 0] = True
    assert np.array_equal(mask, expected)
    # Unbinned, the same boxes hold columns 20-21 and rows 40-49, and pixels 0-1.
    unbinned = read_bpm_mask(path, binning=1)
    assert np.array_equal(np.argwhere(unbinned[:, 20]).ravel(), np.arange(40, 50))
    assert unbinned[:, 21].sum() == 10 and unbinned[:, 19].sum() == 0 and unbinned[:, 22].sum() == 0
    assert unbinned[:2, :2].all() and unbinned.sum() == 10 * 2 + 4
    assert unbinned_box(7, 3, 3, 1) == (7.0, 3.0, 1.0, 1.0)


def test_column_runs_bridge_gaps_without_data_not_good_pixels():
    flagged = np.zeros((20, 4), bool)
    flagged[2:5, 1] = True      # run 2-4, then no data in 5-6, then 7-9 continues it
    flagged[7:10, 1] = True
    flagged[12, 1] = True       # row 11 is good: a new run
    flagged[0, 3] = True
    no_data = np.zeros_like(flagged)
    no_data[5:7, :] = True
    assert column_runs(flagged, no_data) == [(1, 2, 9), (1, 12, 12), (3, 0, 0)]
    assert column_runs(np.zeros_like(flagged), no_data) == []


def test_row_median_ignores_missing_data_and_edges():
    image = np.arange(40, dtype=np.float32).reshape(2, 20)
    image[0, 3:6] = np.nan
    result = row_median(image, half_width=2)
    assert result[1, 0] == 21.0          # median of 20, 21, 22 at the left edge
    assert result[1, 10] == 30.0
    assert result[0, 4] == 4.0           # only 2 and 6 in x = 2..6 have data
    assert result[0, 6] == 7.0           # 6, 7, 8 (3-5 missing)
    assert np.isnan(row_median(np.full((1, 5), np.nan), 2)).all()


def test_hot_threshold_is_the_larger_of_sigma_and_rate_terms():
    rng = np.random.default_rng(1)
    quiet = rng.normal(10.0, 2.0, (200, 200)).astype(np.float32)
    level, sigma, threshold = hot_threshold(quiet, 300.0)
    assert level == pytest.approx(10.0, abs=0.05) and sigma == pytest.approx(2.0, rel=0.03)
    assert threshold == HOT_RATE * 300.0  # 30 ADU > 5 sigma = 10 ADU
    noisy = quiet * np.float32(5)
    assert hot_threshold(noisy, 300.0)[2] == pytest.approx(5 * 10.0, rel=0.03)
    with pytest.raises(ValueError, match="positive"):
        hot_threshold(quiet, 0.0)


def test_find_bad_pixels_on_a_synthetic_ota():
    rng = np.random.default_rng(2)
    dark = rng.normal(3.0, 4.0, (SIZE, SIZE)).astype(np.float32)
    flat = rng.normal(1.0, 0.01, (SIZE, SIZE)).astype(np.float32)
    flat[:, 240:254] = np.nan                  # a gap between cells
    dark[:, 240:254] = np.nan
    dark[100, 50] += 500.0                     # hot
    dark[101, 50] += 40.0                      # just above 30 ADU: hot, same run
    dark[700, 60] += 25.0                      # below the threshold
    flat[300:400, 800] *= np.float32(0.4)      # a bad column ...
    flat[400:410, 800] = np.nan                # ... through rows without data ...
    flat[410:500, 800] *= np.float32(0.4)      # ... continues
    flat[1000, 254] *= np.float32(0.4)         # one dead pixel next to the gap
    boxes, summary = find_bad_pixels(dark, flat, 2, DARK_EXPTIME)
    assert summary.hot_threshold == 30.0 and summary.n_hot == 2
    assert summary.n_low == 100 + 90 + 1 and summary.n_boxes == 3
    assert boxes == [unbinned_box(50, 100, 101, 2), unbinned_box(254, 1000, 1000, 2),
                     unbinned_box(800, 300, 499, 2)]


def test_find_bad_pixels_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="binning 2"):
        find_bad_pixels(np.zeros((4096, 4096)), np.ones((4096, 4096)), 2, DARK_EXPTIME)


# --- Against the simulator's truth, on the session's masters ---------------------

@pytest.fixture(scope="module")
def derived(masters, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("bpm")
    files = derive_bpm_files(masters["dark_yes_bin2.fits"], masters["flat_odi_r_bin2.fits"], outdir)
    return {int(path.stem[-2:]): path for path in files}


@pytest.fixture(scope="module")
def instrument():
    return Instrument(PODI)


def _master(masters, name, ota):
    return read_ota_image(masters[name], ota, SIZE)[0]


def _bad_column_pixels(instrument, ota):
    """Binned ``(rows, column)`` of each truth bad column segment."""
    b = TEST_BINNING
    return [(np.arange(y0 // b, (y1 + b - 1) // b), x // b)
            for x, y0, y1 in zip(*instrument.bad_columns(ota))]


def test_one_region_file_per_ota(derived):
    assert sorted(derived) == sorted(TEST_OTAS)
    assert all(path.name == f"bpm_xy{ota:02d}.reg" for ota, path in derived.items())


@pytest.mark.parametrize("ota", TEST_OTAS)
def test_hot_pixels_of_the_truth_are_masked(derived, masters, instrument, ota):
    dark = _master(masters, "dark_yes_bin2.fits", ota)
    level, sigma, threshold = hot_threshold(dark, DARK_EXPTIME)
    # 5 frames of 6.5 ADU read noise: a few ADU; the rate floor of 30 ADU decides.
    assert 3.0 < sigma < 6.0 and threshold == 30.0
    x, y, _ = instrument.hot_pixels(ota)
    signal = dark[y // TEST_BINNING, x // TEST_BINNING] - level
    with np.errstate(invalid="ignore"):
        visible = signal > threshold
    # The faintest hot pixel (1 e-/s) gives ~230 ADU; the others fall in cell gaps
    # or broken cells (no data).
    assert visible.sum() == np.isfinite(signal).sum() >= 130
    mask = read_bpm_mask(derived[ota], binning=TEST_BINNING)
    covered = mask[y // TEST_BINNING, x // TEST_BINNING][visible]
    assert covered.mean() >= 0.95
    assert covered.all()


@pytest.mark.parametrize("ota", TEST_OTAS)
def test_bad_columns_of_the_truth_are_masked(derived, masters, instrument, ota):
    flat = _master(masters, "flat_odi_r_bin2.fits", ota)
    mask = read_bpm_mask(derived[ota], binning=TEST_BINNING)
    checked = 0
    for rows, column in _bad_column_pixels(instrument, ota):
        with_data = rows[np.isfinite(flat[rows, column])]
        assert mask[with_data, column].all(), f"OTA {ota}: column {column} rows {rows[0]}-{rows[-1]}"
        checked += with_data.size > 0
    assert checked >= 3  # of 4 segments; one of OTA 33 lies in a gap between cells


@pytest.mark.parametrize("ota", TEST_OTAS)
def test_few_false_positives(derived, instrument, ota):
    mask = read_bpm_mask(derived[ota], binning=TEST_BINNING)
    truth = np.zeros_like(mask)
    x, y, _ = instrument.hot_pixels(ota)
    truth[y // TEST_BINNING, x // TEST_BINNING] = True
    for rows, column in _bad_column_pixels(instrument, ota):
        truth[rows, column] = True
    false = np.count_nonzero(mask & ~truth)
    assert false / mask.size < 0.005
    # Noise and coincident cosmic rays give at most a few stray pixels per OTA.
    assert false <= 20
    assert 1000 < np.count_nonzero(mask) < 2000


def test_command_line(masters, tmp_path, capsys):
    outdir = tmp_path / "bpm"
    status = podi_badpixels.main([str(masters["dark_yes_bin2.fits"]),
                                  str(masters["flat_odi_r_bin2.fits"]), str(outdir)])
    assert status == 0
    assert sorted(p.name for p in outdir.iterdir()) == [f"bpm_xy{ota:02d}.reg" for ota in sorted(TEST_OTAS)]
    assert capsys.readouterr().out.count("bpm_xy") == len(TEST_OTAS)


def test_command_line_errors(masters, tmp_path, capsys):
    missing = tmp_path / "nothing.fits"
    assert podi_badpixels.main([str(missing), str(masters["flat_odi_r_bin2.fits"]),
                                str(tmp_path)]) == 1
    assert "nothing.fits" in capsys.readouterr().err
    # A bias has no exposure time: dark currents cannot be compared.
    assert podi_badpixels.main([str(masters["bias_bin2.fits"]), str(masters["flat_odi_r_bin2.fits"]),
                                str(tmp_path)]) == 1
    assert "must be positive" in capsys.readouterr().err
