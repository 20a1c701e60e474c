"""Bad input, faults and time-outs: clear one-line errors, no partial output files."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from podi_makecalibrations import master_extension
from podi_rawdata import find_exposure
from podi_workers import SharedBuffers
from conftest import refcat_of, run_collectcells


@pytest.fixture
def exposure_copy(object_exposure, tmp_path):
    target = tmp_path / "raw" / object_exposure.name
    shutil.copytree(object_exposure, target)
    return target


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    message = err[-1]
    assert message.startswith("podi_collectcells: error:")
    for word in words:
        assert word in message
    return message


def _own_buffers(pid=None):
    """Shared buffers left in /dev/shm by this process's runs (or by process ``pid``);
    other runs on a busy machine have their own."""
    return list(Path("/dev/shm").glob(f"{SharedBuffers.PREFIX}{pid or os.getpid()}_*"))


def _no_files_left(directory):
    leftovers = [p for p in Path(directory).rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    assert not _own_buffers()


def test_missing_ota_file_is_left_out(exposure_copy, true_cals, tmp_path, caplog):
    find_exposure(exposure_copy).ota_files[34].unlink()
    output = tmp_path / "out.fits"
    assert run_collectcells(exposure_copy, output, f"-cals={true_cals}") == 0
    with fits.open(output) as hdus:
        assert [h.name for h in hdus[1:-1]] == ["OTA33.SCI", "OTA22.SCI"]
    assert "no files for OTAs" in caplog.text and "34" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_ota_file_fails_only_that_ota(exposure_copy, true_cals, tmp_path, damage):
    path = find_exposure(exposure_copy).ota_files[34]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:3000000])
    else:
        path.write_bytes(b"not FITS at all\n" * 1000)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposure_copy, output, f"-cals={true_cals}") == 0
    with fits.open(output) as hdus:
        primary = hdus[0].header
        assert primary["NOTAS"] == 2 and primary["NFAILED"] == 1 and primary["FAILOTAS"] == "34"
        assert path.name in "".join(primary["HISTORY"]).replace(" ", "")
        assert "OTA34.SCI" not in hdus


def test_missing_calibration_stops_before_reduction(object_exposure, true_cals, tmp_path, capsys):
    output = tmp_path / "out.fits"
    missing = tmp_path / "nowhere" / "flat.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", f"-flat={missing}") == 1
    _one_line_error(capsys, "flat", str(missing))
    _no_files_left(tmp_path)


def test_calibration_of_the_wrong_binning(object_exposure, tmp_path, capsys):
    fake = tmp_path / "bias_bin1.fits"
    fits.HDUList([fits.PrimaryHDU(), master_extension(33, np.zeros((64, 64)))]).writeto(fake)
    output = tmp_path / "out" / "out.fits"
    assert run_collectcells(object_exposure, output, f"-bias={fake}") == 1
    _one_line_error(capsys, "bias_bin1.fits", "binning does not match")
    assert not output.exists()


def test_calibration_missing_one_ota_fails_that_ota(object_exposure, true_cals, tmp_path):
    cals = tmp_path / "cals"
    shutil.copytree(true_cals, cals)
    with fits.open(cals / "flat_odi_r_bin2.fits") as hdus:
        fits.HDUList([h for h in hdus if h.name != "OTA22.SCI"]).writeto(cals / "flat_odi_r_bin2.fits",
                                                                         overwrite=True)
    output = tmp_path / "out.fits"
    assert run_collectcells(object_exposure, output, f"-cals={cals}") == 0
    with fits.open(output) as hdus:
        assert hdus[0].header["FAILOTAS"] == "22"
        # HISTORY wraps long lines at spaces, which it drops: compare without them.
        history = "".join(hdus[0].header["HISTORY"]).replace(" ", "")
        assert "noextensionforOTA22" in history


def test_unwritable_output(object_exposure, true_cals, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    assert run_collectcells(object_exposure, blocker / "out.fits", f"-cals={true_cals}") == 1
    _one_line_error(capsys, "a_file")
    assert blocker.read_text() == "in the way"


def test_noclobber_skips_an_existing_output(object_exposure, true_cals, tmp_path, capsys):
    output = tmp_path / "out.fits"
    output.write_text("previous result")
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-noclobber") == 0
    assert "skipped" in capsys.readouterr().out
    assert output.read_text() == "previous result"


@pytest.mark.parametrize("fault", ["crash", "raise"])
def test_worker_fault_fails_one_ota(object_exposure, true_cals, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("PODI_FAULT", f"{fault}:33")
    output = tmp_path / "out.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-ncpus=2") == 0
    with fits.open(output) as hdus:
        assert hdus[0].header["FAILOTAS"] == "33"
        assert [h.name for h in hdus[1:-1]] == ["OTA34.SCI", "OTA22.SCI"]
    assert not _own_buffers()


def test_timeout_kills_workers_and_writes_nothing(object_exposure, true_cals, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.setenv("PODI_FAULT", "hang:22")
    output = tmp_path / "out" / "out.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-timeout=3") == 1
    _one_line_error(capsys, "timed out after 3 s")
    _no_files_left(tmp_path)


def test_timeout_in_one_process_stops_a_hung_ota(object_exposure, true_cals, tmp_path, monkeypatch, capsys):
    """-ncpus=1 and -profile run the OTAs in this process: the clock stops them too."""
    monkeypatch.setenv("PODI_FAULT", "hang:33")
    output = tmp_path / "out" / "out.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-timeout=2", "-ncpus=1") == 1
    _one_line_error(capsys, "timed out after 2 s")
    _no_files_left(tmp_path)


def test_timeout_during_the_frame_wide_steps(object_exposure, true_cals, tmp_path, monkeypatch, capsys):
    import podi_framecalib

    def hang(*args, **kwargs):
        import time
        time.sleep(60)

    monkeypatch.setattr(podi_framecalib, "frame_calibrations", hang)
    output = tmp_path / "out" / "out.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-fixwcs", "-timeout=3",
                            f"-refcat={refcat_of(object_exposure)}", "-ncpus=2") == 1
    _one_line_error(capsys, "timed out after 3 s")
    _no_files_left(tmp_path)


def test_no_readable_ota_file(exposure_copy, true_cals, tmp_path, capsys):
    for path in find_exposure(exposure_copy).ota_files.values():
        path.write_bytes(b"garbage" * 100)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposure_copy, output, f"-cals={true_cals}") == 1
    _one_line_error(capsys, "no readable OTA file", ".22.fits", "not a readable FITS file")
    assert not output.exists()


def test_every_ota_failing_writes_nothing(object_exposure, tmp_path, capsys):
    flat = tmp_path / "flat.fits"
    fits.HDUList([fits.PrimaryHDU(), master_extension(44, np.ones((2048, 2048)))]).writeto(flat)
    output = tmp_path / "out.fits"
    assert run_collectcells(object_exposure, output, f"-flat={flat}") == 1
    _one_line_error(capsys, "every OTA failed")
    assert not output.exists()


def test_missing_input(tmp_path, capsys):
    assert run_collectcells(tmp_path / "o20131212T000000.1", tmp_path / "out.fits") == 1
    _one_line_error(capsys, "no such file or directory")


def test_killed_run_leaves_no_partial_file(object_exposure, true_cals, tmp_path):
    """SIGTERM while writing: the output appears whole or not at all."""
    import signal
    import subprocess
    import sys
    import threading
    output = tmp_path / "out.fits"
    env = dict(os.environ, PODI_FAULT="hang:22")
    process = subprocess.Popen([sys.executable, "-m", "podi_collectcells", str(object_exposure),
                                str(output), f"-cals={true_cals}"], env=env,
                               cwd=Path(__file__).resolve().parents[1],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # A watchdog, so that a changed log line cannot hang the suite.
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    # Once the two healthy OTAs are reported, the run waits for the hung one.
    reduced = 0
    while reduced < 2:
        line = process.stderr.readline()
        assert line, "podi_collectcells ended early"
        reduced += b" reduced in " in line
    watchdog.cancel()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert process.returncode != 0
    assert not output.exists()
    assert not list(tmp_path.glob(".*tmp"))
    assert not _own_buffers(process.pid)
