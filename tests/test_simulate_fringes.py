"""The simulator's fringes and dithered sequences match their truth."""

import dataclasses
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from podi_calibfiles import master_name
from podi_definitions import PODI, all_cells, cell_to_ota, fppos_for_ota, science_section
from podi_simulate import (Effects, ExposureSpec, Instrument, main, simulate_exposure, sky_electrons,
                           true_signal, write_true_calibrations)
from podi_stats import bin_image
from test_simulate import corrected_cells, truth_of

OTA = 33
AMPLITUDE = 0.02


def fringe_spec(**changes):
    """One binned OTA with fringes, without nonlinearity (so raw ADU are linear)."""
    base = ExposureSpec(otas=(OTA,), binning=2, seed=3, fringe_amplitude=AMPLITUDE,
                        effects=Effects(nonlinearity=False))
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def patterns():
    """The fringe pattern of the test OTA at binning 1 and 2."""
    instrument = Instrument(PODI)
    return {binning: instrument.fringe_pattern(OTA, binning) for binning in (1, 2)}


def test_pattern_is_a_unit_pattern(patterns):
    unbinned = patterns[1]
    assert unbinned.shape == (4096, 4096) and unbinned.dtype == np.float32
    assert abs(unbinned.mean(dtype=np.float64)) < 1e-5
    assert unbinned.std(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)


def test_pattern_is_the_same_at_every_binning(patterns):
    # A binned pixel is the mean of the 2x2 unbinned pixels it covers.
    assert patterns[2].shape == (2048, 2048)
    np.testing.assert_allclose(patterns[2], bin_image(patterns[1], 2), atol=1e-5)


def test_pattern_has_fringe_scales(patterns):
    """Most of the variance is in bands 40-400 unbinned pixels apart."""
    power = np.abs(np.fft.fft2(patterns[2])) ** 2
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(2048), np.fft.fftfreq(2048)))
    wavelength = 2 / np.where(frequency > 0, frequency, np.nan)   # unbinned pixels
    in_band = (wavelength > 40) & (wavelength < 400)
    assert power[in_band].sum() / power.sum() > 0.9


def test_pattern_is_fixed_by_instrument_seed_and_ota(patterns):
    np.testing.assert_array_equal(Instrument(PODI).fringe_pattern(OTA, 2), patterns[2])
    for other in (Instrument(PODI).fringe_pattern(34, 2), Instrument(PODI, seed=7).fringe_pattern(OTA, 2)):
        assert abs(np.corrcoef(other.ravel(), patterns[2].ravel())[0, 1]) < 0.2


def test_true_signal_holds_the_fringe_light(patterns):
    spec = fringe_spec()
    signal = true_signal(spec, OTA)
    fringes = signal - true_signal(dataclasses.replace(spec, fringe_amplitude=0.0), OTA)
    # Exact but for the float32 rounding of the whole signal (stars included).
    np.testing.assert_array_less(np.abs(fringes - AMPLITUDE * sky_electrons(spec) * patterns[2]),
                                 1e-6 * signal + 1e-3)


def test_raw_fringes_and_truth_keywords(tmp_path, patterns):
    """Two exposures with one seed differ by the fringe light through flat and gain."""
    spec = fringe_spec()
    with_fringes = simulate_exposure(spec, tmp_path / "fringes", ncpus=1)
    without = simulate_exposure(dataclasses.replace(spec, fringe_amplitude=0.0), tmp_path / "none", ncpus=1)
    first, second = (corrected_cells(exposure, OTA) for exposure in (with_fringes, without))
    instrument = Instrument(PODI)
    expected = AMPLITUDE * sky_electrons(spec) * patterns[2] * instrument.flat(OTA, 2)
    rows, cols = science_section(2)
    for cx, cy in all_cells():
        difference = (first - second)[cy, cx, rows, cols]
        model = expected[cell_to_ota(cx, cy, 2)] / instrument.gains(OTA)[cy, cx]
        unsaturated = np.maximum(first, second)[cy, cx, rows, cols] < 60000
        # Same seed: the photon noise mostly cancels; rounding to 16 bits does not.
        residual = (difference - model)[unsaturated]
        assert abs(residual.mean()) < 0.05
        assert residual.std() < 1.0

    header = truth_of(with_fringes)[0].header
    assert header["FRNGAMP"] == AMPLITUDE
    assert header["FRNGSCL"] == pytest.approx(AMPLITUDE * sky_electrons(spec) * header["FLATNRMA"], rel=1e-12)
    assert header["FRNGSCL"] == AMPLITUDE * header["SKY_ADU"]
    assert truth_of(without)[0].header["FRNGAMP"] == 0.0


def test_true_fringe_template(tmp_path, patterns):
    spec = fringe_spec(fringe_amplitude=1.0, effects=Effects(nonlinearity=False, stars=False))
    written = write_true_calibrations(spec, tmp_path)
    assert written["fringe"].name == master_name("fringe", 2, "odi_r") == "fringe__odi_r.fits"
    with fits.open(written["fringe"]) as hdus:
        primary = hdus[0].header
        assert (primary["OBSTYPE"], primary["FILTER"], primary["BINNING"]) == ("FRINGE", "odi_r", 2)
        extension = hdus["OTA33.SCI"]
        assert extension.header["FPPOS"] == fppos_for_ota(OTA)
        assert extension.data.dtype.kind == "f" and extension.data.dtype.itemsize == 4
        np.testing.assert_array_equal(extension.data, patterns[2])
        # The template is (image - sky) / sky of fringe light with amplitude 1.
        sky = sky_electrons(spec)
        np.testing.assert_allclose((true_signal(spec, OTA) - sky) / sky, extension.data, atol=1e-5)
    assert "fringe" not in write_true_calibrations(fringe_spec(fringe_amplitude=0.0), tmp_path / "none")


def simulate_sequence(outdir, *options):
    """Truth files of a sequence of one binned OTA made by the command line."""
    assert main([str(outdir), "--otas", str(OTA), "--binning", "2", "--star-density", "300",
                 "--no-nonlinearity", "--ncpus", "1", *options]) == 0
    return sorted(outdir.glob("*.truth.fits"))


def test_dithered_sequence(tmp_path):
    truths = simulate_sequence(tmp_path / "dithered", "--count", "3", "--dither", "60")
    headers = [fits.getheader(truth) for truth in truths]
    for header in headers:
        assert (header["HDR_RA"], header["HDR_DEC"]) == (header["TRUE_RA"], header["TRUE_DEC"])
    offsets = np.array([((h["TRUE_RA"] - 150.0) * 3600 * math.cos(math.radians(30.0)),
                         (h["TRUE_DEC"] - 30.0) * 3600) for h in headers])
    assert np.all(np.abs(offsets) < 60.01)
    assert len(np.unique(offsets[:, 0])) == len(np.unique(offsets[:, 1])) == 3
    # One star field: the stars of the sky are where they are in every exposure.
    refcats = [Table.read(str(truth).replace(".truth", ".refcat")) for truth in truths]
    for refcat in refcats[1:]:
        np.testing.assert_array_equal(refcat["ra"], refcats[0]["ra"])
        np.testing.assert_array_equal(refcat["dec"], refcats[0]["dec"])

    still = simulate_sequence(tmp_path / "still", "--count", "2", "--obstype", "BIAS")
    assert [(fits.getval(truth, "TRUE_RA"), fits.getval(truth, "TRUE_DEC")) for truth in still] == \
        [(150.0, 30.0)] * 2
