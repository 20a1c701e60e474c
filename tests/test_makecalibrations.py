"""Master calibrations recover the simulated camera's true bias, dark and flat."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from podi_definitions import PODI, all_cells, broken_cells, cell_to_ota, science_section
from podi_makecalibrations import main as makecalibrations_main
from podi_makecalibrations import make_calibrations
from podi_mef import read_ota_image
from podi_rawdata import find_exposure
from podi_reduceota import ReductionSettings, reduce_ota
from podi_simulate import Instrument, simulate_exposure, true_flat_level
from conftest import N_CALIB, TEST_BINNING, TEST_OTAS, small_spec

SIZE = 2048


def cell_map(values):
    """OTA array holding a per-cell value ``values[cy, cx]`` in each cell's science section."""
    image = np.full((SIZE, SIZE), np.nan)
    for cx, cy in all_cells():
        image[cell_to_ota(cx, cy, TEST_BINNING)] = values[cy, cx]
    return image


def test_master_files_and_format(masters):
    assert set(masters) == {"bias_bin2.fits", "dark_yes_bin2.fits", "flat_odi_r_bin2.fits"}
    with fits.open(masters["flat_odi_r_bin2.fits"], checksum=True) as hdus:
        names = [hdu.name for hdu in hdus[1:]]
        assert names == ["OTA33.SCI", "OTA34.SCI", "OTA22.SCI"]     # inside-out order
        assert [hdu.header["FPPOS"] for hdu in hdus[1:]] == ["xy33", "xy34", "xy22"]
        assert hdus[0].header["NCOMBINE"] == N_CALIB
        assert hdus[0].header["FILTER"] == "odi_r"
        assert hdus[1].data.dtype.kind == "f" and hdus[1].data.dtype.itemsize == 4 and hdus[1].data.shape == (SIZE, SIZE)


def test_master_bias_recovers_the_bias_structure(masters, calibration_exposures):
    truth = Table(fits.getdata(calibration_exposures["bias"][0].parent /
                               f"{calibration_exposures['bias'][0].name}.truth.fits", "CELLS"))
    rows, cols = science_section(TEST_BINNING)
    for ota in TEST_OTAS:
        master, _, _ = read_ota_image(masters["bias_bin2.fits"], ota, SIZE)
        structure = Instrument(PODI).bias_structure(ota, TEST_BINNING, (256, 280))
        for row in truth[truth["ota"] == ota]:
            cx, cy = row["cx"], row["cy"]
            if (cx, cy) in broken_cells(PODI, ota):
                continue
            residual = master[cell_to_ota(cx, cy, TEST_BINNING)] - structure[cy, cx, rows, cols]
            # The noise of a median of five frames is ~1.2 x read noise / sqrt(5).
            assert np.sqrt(np.mean(residual**2)) < 1.3 * row["rdnoise"] / math.sqrt(N_CALIB)


def test_master_dark_holds_the_dark_current(masters):
    instrument = Instrument(PODI)
    master, _, primary = read_ota_image(masters["dark_yes_bin2.fits"], 34, SIZE)
    assert primary["EXPTIME"] == 300.0
    expected = instrument.dark_current(34, TEST_BINNING) * 300.0 / cell_map(instrument.gains(34))
    x, y, _ = instrument.hot_pixels(34)
    hot = (y // 2, x // 2)
    good = np.isfinite(master[hot]) & (expected[hot] > 200)
    assert good.sum() > 20
    assert np.median(master[hot][good] / expected[hot][good]) == pytest.approx(1.0, abs=0.02)
    quiet = np.isfinite(master) & (expected < 5)
    assert np.median(master[quiet]) == pytest.approx(np.median(expected[quiet]), abs=0.5)


def test_dark_scales_with_exposure_time(masters, tmp_path):
    """A 600 s dark minus the 300 s master dark scaled by 2 leaves no hot pixels."""
    exposure = simulate_exposure(small_spec(obstype="DARK", otas=(34,), seed=900, exptime=600.0),
                                 tmp_path, ncpus=1)
    settings = ReductionSettings(crosstalk="default", bias=str(masters["bias_bin2.fits"]),
                                 dark=str(masters["dark_yes_bin2.fits"]))
    frame = reduce_ota(find_exposure(exposure).ota_files[34], settings)
    assert frame.header["DARKSCAL"] == 2.0
    instrument = Instrument(PODI)
    expected = instrument.dark_current(34, TEST_BINNING) * 600.0 / cell_map(instrument.gains(34))
    x, y, _ = instrument.hot_pixels(34)
    hot = (y // 2, x // 2)
    good = np.isfinite(frame.image[hot]) & (expected[hot] > 400)
    # Without scaling half the hot-pixel signal would remain.
    assert np.median(np.abs(frame.image[hot][good]) / expected[hot][good]) < 0.03


def test_master_flat_recovers_the_true_flat(masters):
    instrument = Instrument(PODI)
    level, _ = true_flat_level(small_spec(), TEST_OTAS)
    for ota in TEST_OTAS:
        master, header, _ = read_ota_image(masters["flat_odi_r_bin2.fits"], ota, SIZE)
        truth = instrument.flat(ota, TEST_BINNING) / cell_map(instrument.gains(ota)) / level
        ratio = master / truth
        ratio = ratio[np.isfinite(ratio)]
        assert ratio.size > 0.9 * 64 * 240 * 247
        assert np.median(ratio) == pytest.approx(1.0, abs=0.002)
        assert np.sqrt(np.mean((ratio - 1) ** 2)) < 0.005


def test_bad_pixel_regions_from_the_masters(masters, tmp_path):
    from podi_bpm import read_bpm_mask
    from podi_makecalibrations import derive_region_files
    derive_region_files(list(masters.values()), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.reg")) == ["bpm_xy22.reg", "bpm_xy33.reg", "bpm_xy34.reg"]
    mask = read_bpm_mask(tmp_path / "bpm_xy34.reg", binning=2)
    x, y, _ = Instrument(PODI).hot_pixels(34)
    assert mask[y // 2, x // 2].mean() > 0.8      # the rest fall into gaps between cells
    assert mask.mean() < 0.005


def test_wrong_type_and_binning_are_skipped(object_exposure, calibration_exposures, tmp_path, caplog):
    written = make_calibrations([object_exposure, calibration_exposures["bias"][0]], tmp_path,
                                binning=1, ncpus=1)
    assert written == []
    assert "binning 2, not 1" in caplog.text
    assert not list(tmp_path.glob("*.fits"))
    caplog.clear()
    written = make_calibrations([object_exposure, calibration_exposures["bias"][0]], tmp_path, ncpus=1)
    assert [p.name for p in written] == ["bias_bin2.fits"]
    assert "OBSTYPE 'OBJECT' is not a calibration" in caplog.text


def test_command_line_without_calibration_frames(object_exposure, tmp_path, capsys):
    assert makecalibrations_main([str(object_exposure), str(tmp_path / "cals")]) == 1
    assert "no bias, dark or flat exposures" in capsys.readouterr().err


def test_work_folders_of_killed_runs_are_removed(tmp_path):
    from podi_makecalibrations import work_folder
    dead, alive = tmp_path / ".makecal.999999999.abc", tmp_path / f".makecal.{os.getpid()}.xyz"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "OTA33.fits").write_bytes(b"x")
    with work_folder(tmp_path) as folder:
        assert Path(folder).name.startswith(f".makecal.{os.getpid()}.")
        assert not dead.exists() and alive.exists()
    assert not Path(folder).exists()
