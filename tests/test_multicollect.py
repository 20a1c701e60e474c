"""podi_multicollect: a simulated night (calibrations and 20 science frames of two
binned OTAs) through the command, on a local Dask cluster and on a real scheduler with
two workers; killed and resumed; followed while it is written."""

import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from conftest import _simulate_series, run_collectcells, small_spec
from podi_simulate import simulate_exposure

NIGHT_OTAS = (33,)
SCIENCE_FRAMES = 20
#: Frames of the night that is killed and resumed.
KILLED_NIGHT = 10
#: A star of magnitude 9 (RA, Dec, mag) that saturates on OTA 33 in every frame: each
#: frame's persistency masks hold the pixels it saturated in the frames before.
BRIGHT_STAR = (150.0 - 0.03 / math.cos(math.radians(30.0)), 29.97, 9.0)
#: Header keywords that differ between two runs of the same reduction: dates, times,
#: checksums and the file's own name and path.
VOLATILE = {"DATE", "CHECKSUM", "DATASUM", "ZDATASUM", "ZHECKSUM", "FILENAME", "RUNTIME", "QATIME", "QACPU",
            "CPUTIME", "QAPAGE"}


def multicollect(*args, background=False, **popen):
    """Run the command in a process of its own (as an observer does); with
    ``background`` return the running process."""
    command = [sys.executable, "-m", "podi_multicollect"] + [str(a) for a in args]
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Three biases, darks and r-band dome flats, then 20 science frames of 300 s, six minutes apart."""
    root = tmp_path_factory.mktemp("night")
    _simulate_series(root, "BIAS", 3, 100, otas=NIGHT_OTAS)
    _simulate_series(root, "DARK", 3, 200, otas=NIGHT_OTAS, exptime=300.0)
    _simulate_series(root, "DFLAT", 3, 300, otas=NIGHT_OTAS, exptime=20.0, flat_level=30000.0)
    for i in range(SCIENCE_FRAMES):
        simulate_exposure(small_spec(otas=NIGHT_OTAS, seed=500 + i, sequence=50 + i, mjd=56620.3 + i * 6 / 1440,
                                     extra_stars=(BRIGHT_STAR,)), root, ncpus=2)
    for truth in root.glob("*.fits"):
        truth.unlink()  # truth and reference catalogs are not raw data
    return root


def science(night):
    return [p for p in sorted(night.iterdir()) if fits.getval(next(p.glob("*.fits")), "OBSTYPE") == "OBJECT"]


def manifest_rows(outdir):
    with sqlite3.connect(outdir / "multicollect.sqlite") as db:
        cursor = db.execute("SELECT * FROM frames")
        names = [c[0] for c in cursor.description]
        return {row[0]: dict(zip(names, row)) for row in cursor.fetchall()}


def assert_same_frame(path, reference):
    """Identical pixels and tables; headers equal but for dates, timings, checksums and
    the command line in HISTORY (paths differ, and so do the folders of the files used)."""
    with fits.open(path) as ours, fits.open(reference) as theirs:
        assert [h.name for h in ours] == [h.name for h in theirs]
        for a, b in zip(ours, theirs):
            if a.data is not None:
                if a.is_image:
                    assert np.array_equal(a.data, b.data, equal_nan=True), a.name
                elif a.name == "ASSOCIATIONS":  # the files used, by path: compare their names
                    assert [[Path(str(v)).name for v in row] for row in a.data] == \
                        [[Path(str(v)).name for v in row] for row in b.data]
                else:
                    assert a.data.tobytes() == b.data.tobytes(), a.name
            assert _cards(a.header) == _cards(b.header), a.name


def _cards(header):
    cards = [(card.keyword, card.value) for card in header.cards
             if card.keyword not in VOLATILE and card.keyword not in ("HISTORY", "")]
    history = "".join(str(value) for value in header.get("HISTORY", []))
    return cards, history.split("versions:", 1)[-1] if history.startswith("command:") else history


@pytest.fixture(scope="module")
def reduced_night(night, tmp_path_factory):
    """The night through -makecals on a local cluster of two worker processes."""
    outdir = tmp_path_factory.mktemp("reducednight")
    done = multicollect(night, outdir, "-makecals", "-workers=2")
    assert done.returncode == 0, done.stderr
    return outdir, done.stderr


def test_night_with_makecals_equals_single_runs(night, reduced_night, tmp_path):
    outdir, log = reduced_night
    rows = manifest_rows(outdir)
    masters = ["cals/bias_bin2.fits", "cals/dark_yes_bin2.fits", "cals/flat_odi_r_bin2.fits"]
    assert sorted(k for k, row in rows.items() if row["kind"] != "object") == masters
    frames = science(night)
    assert len([row for row in rows.values() if row["kind"] == "object"]) == SCIENCE_FRAMES
    assert {row["state"] for row in rows.values()} == {"done"}
    assert "23 frames done, 0 failed in this run" in log
    # The masters, made one by one with podi_makecalibrations, are the same.
    from podi_makecalibrations import main as makecalibrations
    cals = tmp_path / "cals"
    for kind in ("BIAS", "DARK", "DFLAT"):
        exposures = [p for p in sorted(night.iterdir()) if fits.getval(next(p.glob("*.fits")), "OBSTYPE") == kind]
        assert makecalibrations([str(p) for p in exposures] + [str(cals), "-ncpus=1"]) == 0
    for master in masters:
        assert_same_frame(outdir / master, cals / Path(master).name)
    # Every science frame is the single podi_collectcells run's, with the night's masters.
    for exposure in frames:
        name = exposure.name[1:] + ".fits"
        reference = tmp_path / name
        assert run_collectcells(exposure, reference, f"-cals={outdir / 'cals'}", "-ncpus=1") == 0
        assert_same_frame(outdir / name, reference)
        assert rows[name]["seconds"] > 0 and rows[name]["mjd"] == fits.getval(reference, "MJD-OBS")


def test_night_summary_and_page(night, reduced_night):
    outdir, _ = reduced_night
    table = Table.read(outdir / "night_summary.fits")
    csv = Table.read(outdir / "night_summary.csv", format="ascii.csv")
    assert len(table) == len(csv) == SCIENCE_FRAMES + 3
    objects = table[table["kind"] == "object"]
    assert list(objects["mjd"]) == sorted(objects["mjd"])
    assert set(objects["state"]) == {"done"} and set(objects["filter"]) == {"odi_r"}
    # The sky level of each frame is the one in its header.
    for row in objects[:3]:
        assert row["sky_level"] == pytest.approx(fits.getval(outdir / row["output"], "SKYLEVEL"))
    page = (outdir / "night.qa.html").read_text()
    assert page.count("<tr") == SCIENCE_FRAMES + 1


def test_rerun_does_only_what_changed(night, reduced_night, tmp_path):
    outdir, _ = reduced_night
    before = manifest_rows(outdir)
    again = multicollect(night, outdir, "-makecals", "-workers=2")
    assert again.returncode == 0 and "0 frames done, 0 failed in this run" in again.stderr
    assert "Dask" not in again.stderr  # no cluster started for nothing
    assert manifest_rows(outdir) == before
    # A changed input is done again, and only it.
    for path in science(night)[4].iterdir():
        os.utime(path)
    changed = multicollect(night, outdir, "-makecals", "-workers=2")
    assert changed.returncode == 0 and "1 frames done, 0 failed in this run" in changed.stderr
    assert manifest_rows(outdir)[science(night)[4].name[1:] + ".fits"]["finished"] > \
        before[science(night)[4].name[1:] + ".fits"]["finished"]


def test_killed_night_finishes_only_the_missing_frames(night, reduced_night, tmp_path):
    """Killed (SIGKILL, the command and its cluster) after some frames: no partial output,
    a consistent manifest; the rerun does only the rest. A corrupted exposure ends failed."""
    copy = tmp_path / "night"
    copy.mkdir()
    for exposure in science(night)[:KILLED_NIGHT]:
        (copy / exposure.name).symlink_to(exposure)
    # The files of another frame, cut in their first cell: the headers read, every OTA fails.
    source = science(night)[KILLED_NIGHT]
    broken = copy / "o20131124T081200.99"
    broken.mkdir()
    for ota in NIGHT_OTAS:
        data = (source / f"{source.name}.{ota}.fits").read_bytes()
        (broken / f"{broken.name}.{ota}.fits").write_bytes(data[:5 * 2880 + 1000])
    outdir = tmp_path / "out"
    flags = [f"-cals={reduced_night[0] / 'cals'}"]
    process = multicollect(copy, outdir, "-workers=2", *flags, background=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if (outdir / "multicollect.sqlite").exists():
            try:
                states = [row["state"] for row in manifest_rows(outdir).values()]
            except sqlite3.OperationalError:
                continue
            if states.count("done") >= 2:
                break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for _ in range(100):  # until every process of the run is gone
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    rows = manifest_rows(outdir)
    done_before = {key for key, row in rows.items() if row["state"] == "done"}
    assert 2 <= len(done_before) < KILLED_NIGHT
    assert {row["state"] for row in rows.values()} <= {"pending", "running", "done", "failed"}
    for path in outdir.glob("*.fits"):
        with fits.open(path, checksum=True) as hdus:
            hdus.verify("exception")  # complete, or not there at all
    assert {p.name for p in outdir.glob("*.fits")} >= done_before
    rerun = multicollect(copy, outdir, "-workers=2", *flags)
    assert rerun.returncode == 1  # the corrupted exposure
    rows = manifest_rows(outdir)
    assert {key for key, row in rows.items() if row["state"] == "done"} == {
        p.name[1:] + ".fits" for p in copy.iterdir() if p != broken}
    (failed,) = [row for row in rows.values() if row["state"] == "failed"]
    assert broken.name in failed["input"] and "every OTA failed" in failed["error"], failed
    assert failed["attempts"] == 2  # tried once more
    assert f"{KILLED_NIGHT - len(done_before)} frames done, 1 failed in this run" in rerun.stderr
    leftovers = [p.name for p in outdir.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A real dask-scheduler and two single-threaded dask-worker processes on loopback."""
    dask = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  cwd=tmp_path)]
    for name in ("a", "b"):
        processes.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--name", name,
                                           "--no-dashboard", "--resources", "MEMORY=4e9",
                                           "--local-directory", str(tmp_path / name)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from dask.distributed import Client
    with Client(address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
    yield address
    for process in reversed(processes):
        process.kill()  # a graceful close waits for timeouts; nothing is left to save
    for process in processes:
        process.wait(timeout=30)


def test_night_on_a_real_scheduler(night, reduced_night, dask_cluster, tmp_path):
    outdir, _ = reduced_night
    frames = science(night)[:6]
    list_file = tmp_path / "night.list"
    list_file.write_text("\n".join(map(str, frames)) + "\n# the rest another time\n")
    out = tmp_path / "out"
    done = multicollect(out, f"-fromfile={list_file}", f"-scheduler={dask_cluster}",
                        f"-cals={outdir / 'cals'}")
    assert done.returncode == 0, done.stderr
    assert "Dask: 2 workers at " + dask_cluster in done.stderr
    for exposure in frames:
        name = exposure.name[1:] + ".fits"
        assert_same_frame(out / name, outdir / name)


def _write_slowly(source, target, pause):
    """Copy an exposure folder file by file, each in two halves with ``pause`` s between."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        with open(target / path.name, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            time.sleep(pause)
            handle.write(data[len(data) // 2:])


def test_follow_reduces_exposures_as_they_are_written(night, reduced_night, tmp_path):
    outdir, _ = reduced_night
    watched, out = tmp_path / "raw", tmp_path / "out"
    watched.mkdir()
    frames = science(night)[:3]
    shutil.copytree(frames[0], watched / frames[0].name)
    process = multicollect("-follow", watched, out, f"-cals={outdir / 'cals'}", "-workers=1", "-poll=0.3",
                           "-settle=1", "-idle=4", background=True)
    # Half-written files stay longer than the settle time: their FITS structure is incomplete.
    for exposure in frames[1:]:
        _write_slowly(exposure, watched / exposure.name, pause=1.6)
    printed = process.communicate(timeout=180)[0]
    assert process.returncode == 0, printed
    rows = manifest_rows(out)
    assert {key: row["state"] for key, row in rows.items()} == {
        exposure.name[1:] + ".fits": "done" for exposure in frames}
    for exposure in frames:
        name = exposure.name[1:] + ".fits"
        assert_same_frame(out / name, outdir / name)


def test_fits_complete_and_the_watcher(night, tmp_path):
    from podi_multicollect import ExposureWatcher, fits_complete
    exposure = science(night)[0]
    files = sorted(exposure.glob("*.fits"))
    data = files[0].read_bytes()
    assert fits_complete(files[0])
    for cut in (2880, len(data) // 2, len(data) - 2880):
        partial = tmp_path / f"cut{cut}.fits"
        partial.write_bytes(data[:cut])
        assert not fits_complete(partial), cut
    watched = tmp_path / "raw"
    watched.mkdir()
    watcher = ExposureWatcher(watched, settle=0.5)
    target = watched / exposure.name
    target.mkdir()
    shutil.copy(files[0], target)
    assert watcher.complete() == []  # one OTA of two, just written
    time.sleep(0.6)
    assert watcher.complete() == [target]  # settled
    assert watcher.complete() == []  # handed out once


def test_command_line_errors(tmp_path):
    for args, message in ((["only-one"], "give the inputs and the output folder"),
                          ([tmp_path / "missing", tmp_path / "out"], "missing: no such file or directory"),
                          ([tmp_path, tmp_path / "out", "-workers=0"], "-workers=0: not a positive number"),
                          ([tmp_path, tmp_path / "out", "-indefval=abc"], "-indefval=abc"),
                          ([tmp_path, tmp_path / "out"], "no exposures among the inputs")):
        done = multicollect(*args)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("podi_multicollect: error:") and message in lines[0], lines


def test_a_dead_worker_loses_only_its_frame(night, reduced_night, tmp_path):
    """The Dask worker process running one frame is killed (SIGKILL): the frame runs again
    on a worker that lives, and every frame ends done."""
    outdir, _ = reduced_night
    frames = science(night)[6:10]
    victim, marker = frames[1].name[1:] + ".fits", tmp_path / "killed"
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "podi_multicollect", *map(str, frames), str(out), "-workers=2",
                           f"-cals={outdir / 'cals'}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PODI_KILL_FRAME": f"{victim}:{marker}"})
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # the worker was killed
    assert {row["state"] for row in manifest_rows(out).values()} == {"done"}
    assert_same_frame(out / victim, outdir / victim)
    # -redo does every frame again.
    redone = multicollect(*frames, out, "-workers=2", f"-cals={outdir / 'cals'}", "-redo")
    assert redone.returncode == 0 and "4 frames done, 0 failed in this run" in redone.stderr


def test_progress_line_on_a_terminal():
    import io

    from podi_multicollect import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = Progress(10, terminal)
    progress.start -= 120  # two minutes in
    progress.done, progress.failed, progress.running = 3, 1, 2
    progress.show()
    line = "4/10 frames: 3 done, 1 failed, 2 running, 2.0 frames/min, ETA 3.0 min"
    assert terminal.getvalue() == f"\r\033[K{line}"
    progress.show("frame.fits failed: no such file")  # kept above the line
    assert terminal.getvalue().endswith(f"\r\033[Kframe.fits failed: no such file\n{line}")


def test_persistency_follows_the_order_of_the_night(night, reduced_night, tmp_path):
    """With -persistency each frame waits for the one before (its masks need that frame's
    saturation catalog): two workers give the frames of sequential single runs. The
    outputs are named by -formatout, in a folder per filter."""
    outdir, _ = reduced_night
    frames = science(night)[12:16]
    out = tmp_path / "out"
    done = multicollect(*frames, out, "-workers=2", f"-cals={outdir / 'cals'}", f"-persistency={tmp_path / 'p1'}",
                        "-formatout=%FILTER/%OBSID")
    assert done.returncode == 0, done.stderr
    single = tmp_path / "single"
    for exposure in frames:
        assert run_collectcells(exposure, single / (exposure.name[1:] + ".fits"), f"-cals={outdir / 'cals'}",
                                "-ncpus=1", f"-persistency={tmp_path / 'p2'}") == 0
    catalogs = []
    for exposure in frames:
        name = exposure.name[1:] + ".fits"
        assert_same_frame(out / "odi_r" / name, single / name)  # named by -formatout
        header = fits.getheader(out / "odi_r" / name, "OTA33.SCI")
        catalogs.append(sum(key.startswith("PERSIS") and key[6:].isdigit() for key in header))
    # Each frame used the catalogs of the frames that ended within 600 s before it began.
    assert catalogs == [0, 1, 2, 2]
