"""Crosstalk through the whole program against a truth the reduction is not told.

The simulator mixes the cells with its own einsum (podi_simulate.mix_crosstalk), an
asymmetric matrix: cell 1 of every cell row leaks 0.3 % into cell 6, nothing comes
back. The truth is the same exposure simulated without crosstalk. Runs without the
real calibration files.
"""

import dataclasses

import numpy as np
import pytest
from astropy.io import fits

from conftest import OBJECT_SPEC, run_collectcells
from podi_definitions import CROSSTALK_DEFAULT_COEFF, cell_to_ota, overscan_section, science_section
from podi_rawdata import find_exposure, open_raw_ota
from podi_simulate import simulate_exposure

SOURCE, TARGET, COUPLING = 1, 6, 3e-3
BINNING = OBJECT_SPEC.binning


@pytest.fixture(scope="module")
def asymmetric(tmp_path_factory):
    """The matrix file, and one OTA simulated with and without crosstalk."""
    root = tmp_path_factory.mktemp("crosstalk")
    row = np.full((8, 8), CROSSTALK_DEFAULT_COEFF)
    np.fill_diagonal(row, 1.0)
    row[SOURCE, TARGET] = COUPLING  # [source, target]: one way only
    forward = np.broadcast_to(row, (8, 8, 8)).copy()
    matrix = root / "asymmetric.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(forward, name="XTALK.FWD"),
                  fits.ImageHDU(np.linalg.inv(forward), name="XTALK.INV")]).writeto(matrix)
    spec = dataclasses.replace(OBJECT_SPEC, otas=(33,), crosstalk_file=str(matrix))
    mixed = simulate_exposure(spec, root / "mixed")
    clean = simulate_exposure(dataclasses.replace(
        spec, effects=dataclasses.replace(spec.effects, crosstalk=False)), root / "clean")
    return matrix, mixed, clean


def reduced(exposure, cals, path, crosstalk):
    assert run_collectcells(exposure, path, f"-cals={cals}", f"-crosstalk={crosstalk}") == 0
    return fits.getdata(path, "OTA33.SCI")


def cell_means(image):
    """Mean of each cell's pixels, [cy, cx]: of a difference of two frames that differ
    by a fraction of an ADU before rounding to counts, the mean is that fraction (a
    median would be 0 or 1)."""
    means = np.empty((8, 8))
    for cy in range(8):
        for cx in range(8):
            means[cy, cx] = np.nanmean(image[cell_to_ota(cx, cy, BINNING)])
    return means


def test_asymmetric_crosstalk_is_removed(asymmetric, true_cals, tmp_path):
    matrix, mixed, clean = asymmetric
    truth = reduced(clean, true_cals, tmp_path / "clean.fits", "none")
    corrected = reduced(mixed, true_cals, tmp_path / "corrected.fits", matrix)
    uncorrected = reduced(mixed, true_cals, tmp_path / "uncorrected.fits", "none")
    with open_raw_ota(find_exposure(mixed).ota_files[33]) as raw:
        cells = raw.cells()
    # The source's overscan leaks into the target's overscan too: what stays after the
    # overscan is subtracted is the leak of the source's signal above its overscan.
    science, overscan = science_section(BINNING), overscan_section(BINNING)
    signal = cells[(slice(None), slice(None)) + science].mean(axis=(2, 3)) - \
        cells[(slice(None), slice(None)) + overscan].mean(axis=(2, 3))
    flat = cell_means(fits.getdata(next(true_cals.glob("flat*.fits")), "OTA33.SCI"))
    left = cell_means(corrected - truth)
    added = cell_means(uncorrected - truth)
    # Uncorrected: every cell carries what the matrix leaks into it, divided by its own
    # flat: 0.3 % of cell 1's signal in cell 6 (over 8 ADU), the weak default coupling
    # elsewhere (about 1 ADU); nothing strong comes back into cell 1.
    coupling = np.full((8, 8), CROSSTALK_DEFAULT_COEFF)  # [source, target]
    np.fill_diagonal(coupling, 0.0)
    coupling[SOURCE, TARGET] = COUPLING
    expected = (signal @ coupling) / flat
    np.testing.assert_allclose(added, expected, rtol=0.03)
    assert (added[:, TARGET] > 5 * added[:, SOURCE]).all()
    # Corrected with the matrix file: nothing left in any cell, in either direction. An
    # unmixing with source and target swapped would leave +-8 ADU in cells 1 and 6.
    assert np.nanmax(np.abs(left)) < 0.05 * expected[:, TARGET].min(), np.round(left, 3)
