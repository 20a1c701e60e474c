"""Resource faults: a full disk, the output folder removed mid-run, a worker killed by
the kernel, the whole run killed at every stage. After each: a complete, valid output
or none; no temporary file or shared buffer left after the next run; the next run
succeeds."""

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from astropy.io import fits

import podi_collectcells
import podi_mef
from conftest import run_collectcells
from podi_workers import SharedBuffers

#: Every kill point of podi_collectcells, from start to the QA page, in order.
KILL_POINTS = ["start", "calibrations", "buffers", "first-ota", "later-ota", "reduced", "calibrated",
               "tables", "primary", "renamed", "qa"]
#: From here on the output is complete when the run dies.
WRITTEN_FROM = KILL_POINTS.index("renamed")
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


def assert_complete(output, otas=3):
    with fits.open(output, checksum=True) as hdus:
        hdus.verify("exception")
        assert hdus[0].header["NOTAS"] == otas
        assert sum(hdu.name.endswith(".SCI") for hdu in hdus) == otas


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") or ".tmp" in p.name)


def one_line_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("podi_collectcells: error:"), lines
    return lines[0]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_run_killed_at_any_point_leaves_all_or_nothing(object_exposure, true_cals, tmp_path, point):
    output = tmp_path / "out" / "frame.fits"
    command = [sys.executable, "-m", "podi_collectcells", str(object_exposure), str(output),
               f"-cals={true_cals}", "-ncpus=2"]
    killed = subprocess.Popen(command, env={**os.environ, "PODI_KILL_AT": point}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err
    if KILL_POINTS.index(point) >= WRITTEN_FROM:
        assert_complete(output)
    else:
        assert not output.exists()
    stale = list(SHM.glob(f"{SharedBuffers.PREFIX}{killed.pid}_*")) if SHM else []
    if SHM and KILL_POINTS.index("buffers") <= KILL_POINTS.index(point) <= WRITTEN_FROM:
        assert stale  # the killed run could not remove its shared buffers
    # The next run cleans up after the killed one, and succeeds.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert_complete(output)
    assert leftovers(output.parent) == []
    assert not any(folder.exists() for folder in stale)


def test_worker_killed_by_the_kernel_fails_only_its_ota(object_exposure, true_cals, tmp_path, monkeypatch,
                                                        caplog):
    monkeypatch.setenv("PODI_FAULT", "kill:34")
    output = tmp_path / "frame.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-ncpus=2") == 0
    assert_complete(output, otas=2)
    assert fits.getval(output, "FAILOTAS") == "34"
    assert "worker process died (killed by SIGKILL: out of memory, or killed by hand)" in caplog.text


def test_disk_full_while_writing(object_exposure, true_cals, tmp_path, monkeypatch, capsys):
    """An injected ENOSPC on the third copy of OTA data into the output."""
    calls = []
    sendfile = os.sendfile

    def full(*args):
        calls.append(args)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return sendfile(*args)

    monkeypatch.setattr(podi_mef.os, "sendfile", full)
    output = tmp_path / "frame.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 1
    assert one_line_error(capsys) == (f"podi_collectcells: error: {output}: cannot be written (No space "
                                      "left on device); no output written")
    assert not output.exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 0
    assert_complete(output)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs folder (the output needs 48 MB); skipped where mounting is not allowed."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the injected ENOSPC test covers it")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_real_full_disk(object_exposure, true_cals, small_disk, tmp_path, capsys):
    output = small_disk / "frame.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 1
    assert "cannot be written (No space left on device)" in one_line_error(capsys)
    assert list(small_disk.iterdir()) == []
    assert shutil.disk_usage(small_disk).used < 1_000_000


def test_output_folder_removed_during_the_run(object_exposure, true_cals, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "night"

    def remove_folder(name):
        if name == "tables":
            shutil.rmtree(folder)

    monkeypatch.setattr(podi_collectcells, "kill_point", remove_folder)
    output = folder / "frame.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 1
    assert "frame.fits: cannot be written (No such file or directory)" in one_line_error(capsys)
    assert not folder.exists()
    monkeypatch.undo()
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 0
    assert_complete(output)


def test_shared_memory_full(object_exposure, true_cals, small_disk, tmp_path, monkeypatch, capsys, caplog):
    """/dev/shm without room for the OTA buffers (48 MB here): they go to the disk
    folder with a warning; with no folder that has room, a one-line error."""
    disk = tmp_path / "disk"
    disk.mkdir()
    monkeypatch.setattr(SharedBuffers, "ROOTS", (str(small_disk), str(disk)))
    output = tmp_path / "frame.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 0
    assert_complete(output)
    assert f"{small_disk} has only 8 MB free: the OTA buffers (48 MB) go to {disk}" in caplog.text
    assert list(small_disk.iterdir()) == [] and list(disk.iterdir()) == []
    output.unlink()
    capsys.readouterr()
    monkeypatch.setattr(SharedBuffers, "ROOTS", (str(small_disk),))
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 1
    assert one_line_error(capsys) == ("podi_collectcells: error: no room for the OTA buffers (48 MB needed; "
                                      f"{small_disk} has 8 MB free)")
    assert not output.exists() and leftovers(tmp_path) == []


def test_shared_memory_filled_during_the_run(object_exposure, true_cals, small_disk, tmp_path, monkeypatch,
                                             capsys):
    """The room vanishes after the check (another program fills /dev/shm): the workers
    die of SIGBUS, and the message says why."""
    monkeypatch.setattr(SharedBuffers, "_root_with_room", lambda self, needed: str(small_disk))
    output = tmp_path / "frame.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}") == 1
    message = one_line_error(capsys)
    assert "killed by SIGBUS: the shared-memory folder filled up" in message, message
    assert not output.exists() and leftovers(tmp_path) == []
