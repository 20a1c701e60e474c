"""Benchmark: podi_multicollect on a night of full 13-OTA pODI exposures (run by hand).

    python benchmarks/bench_multicollect.py [--workers 1,2] [--frames 20] [--clean]

Makes once (cached in benchmarks/cache/night/raw/) ``--frames`` distinct exposures:
copies of bench_collectcells.py's cached full-size exposure, each under its own
exposure name (the time in the name and ``OBSID``, ``FILENAME``, ``DATE-OBS``,
``TIME-OBS`` and ``MJD-OBS`` moved on by one minute per frame), so that each gets
its own output (%OBSID.fits). Then, for every worker count of ``--workers``, reduces
them all in a fresh output folder with

    podi_multicollect FRAME... OUTDIR -workers=N -cals=CALS -gain -nonlinearity=CALS/nonlinearity
                      -bpm=auto -photcalib -refcat=REFCAT

(bench_collectcells.py's ``-photcalib`` run, QA page on) and prints its wall time,
CPU-seconds (user + system of all its processes), frames per minute and CPU-seconds
per frame; from the night summary (``night_summary.csv``, every frame must be done)
the median and longest frame and the CPU-seconds the frames themselves used (the
rest is Dask's and the driver's); the peak memory (proportional set size of all
processes of the run together) while frames ran and after the last frame finished
(the night page and the cluster's shutdown); the CPU-seconds of the memory sampler
(this process, on the same cores as the run); and the frames per minute of each
worker count relative to the first. A run's reduced frames (0.9 GB each) are
deleted once measured; its summary, manifest and QA pages stay in
benchmarks/cache/night/out-N/ until the next run. ``--clean`` deletes
benchmarks/cache/night/ (about 0.47 GB per frame) and exits.

The inputs (9.5 GB for 20 frames) and one run's outputs (17 GB) do not all fit in
the page cache of a 23 GB machine: part of each run reads and writes the disk, and
the kernel's writeback and reclaim take CPU time that no process's CPU-seconds show.
Each run starts after a sync: the writeback of the frames just copied or of the run
before is not its own.
"""

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from astropy.io import fits  # noqa: E402
from bench_collectcells import PeakMemory, cpu_seconds, prepare  # noqa: E402

NIGHT_CACHE = HERE / "cache" / "night"
RAW = NIGHT_CACHE / "raw"
#: Bytes of one reduced frame: 13 float32 OTAs of 4096 x 4096 (the catalog is small).
OUTPUT_BYTES = 13 * 4096 * 4096 * 4
#: podi_multicollect's log line for a finished frame ends with "(N/TOTAL frames: ...)".
FINISHED_LINE = re.compile(r"\((\d+)/\d+ frames: ")


def frame_name(base, minutes):
    """The exposure name ``base`` (``oYYYYMMDDTHHMMSS.N``) taken ``minutes`` later."""
    stamp, sequence = base[1:].split(".", 1)
    when = datetime.strptime(stamp, "%Y%m%dT%H%M%S") + timedelta(minutes=minutes)
    return f"o{when:%Y%m%dT%H%M%S}.{sequence}"


def copy_frame(originals, base, minutes):
    """Copy an exposure's OTA files under the name taken ``minutes`` after ``base``.

    Parameters
    ----------
    originals : list of Path
        The OTA files ``<base>.NN.fits``.
    base : str
        Their exposure name.
    minutes : int

    Returns
    -------
    Path
        The new exposure folder in :data:`RAW`.
    """
    name = frame_name(base, minutes)
    folder = RAW / name
    # Made under another name and renamed whole: an interrupted copy is never taken as a frame.
    partial = RAW / f".partial-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for original in originals:
        target = partial / (name + original.name[len(base):])
        shutil.copyfile(original, target)
        # Cards changed in place keep the header's size: astropy rewrites the header only.
        with fits.open(target, mode="update") as hdus:
            header = hdus[0].header
            when = datetime.fromisoformat(header["DATE-OBS"]) + timedelta(minutes=minutes)
            header["OBSID"] = name[1:]
            header["FILENAME"] = target.name
            header["DATE-OBS"] = when.isoformat(timespec="milliseconds")
            header["TIME-OBS"] = header["DATE-OBS"][11:]
            header["MJD-OBS"] += minutes / 1440
    partial.rename(folder)
    return folder


def prepare_frames(frames):
    """The ``frames`` cached exposure folders (the missing ones made), the calibration
    folder and the reference catalog."""
    exposure, cals = prepare()
    originals = sorted(exposure.glob(f"{exposure.name}.[0-9][0-9].fits"))
    folders = [RAW / frame_name(exposure.name, minutes) for minutes in range(1, frames + 1)]
    missing = [minutes for minutes, folder in enumerate(folders, 1) if not folder.is_dir()]
    raw_bytes = sum(f.stat().st_size for f in originals)
    NIGHT_CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(NIGHT_CACHE).free
    # One run's outputs at a time: each run's reduced frames are deleted before the next.
    needed = len(missing) * raw_bytes + frames * OUTPUT_BYTES
    print(f"free disk: {free / 1e9:.1f} GB; needs {needed / 1e9:.1f} GB ({len(missing)} frames to copy, "
          f"{frames} reduced frames)")
    if needed > free:
        sys.exit("bench_multicollect: not enough free disk")
    start = time.monotonic()
    for minutes in missing:
        copy_frame(originals, exposure.name, minutes)
    if missing:
        seconds = time.monotonic() - start
        print(f"copied {len(missing)} frames in {seconds:.1f} s "
              f"({len(missing) * raw_bytes / 1e6 / seconds:.0f} MB/s)")
    return folders, cals, exposure.parent / (exposure.name + ".refcat.fits")


def read_summary(outdir, frames):
    """The night summary's rows; exits unless all ``frames`` frames are done."""
    with open(outdir / "night_summary.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    failed = [f"{row['output']}: {row['state']} {row['error']}" for row in rows if row["state"] != "done"]
    if failed or len(rows) != frames:
        sys.exit(f"bench_multicollect: {len(rows) - len(failed)} of {frames} frames done in {outdir}\n  "
                 + "\n  ".join(failed))
    return rows


def night_run(folders, outdir, workers, flags):
    """Run podi_multicollect on ``folders`` with ``workers`` workers in a fresh ``outdir``
    and print what it cost.

    Returns
    -------
    float
        Frames per minute.
    """
    frames = len(folders)
    shutil.rmtree(outdir, ignore_errors=True)
    # Writing back what came before (the copied frames, the last run's outputs) is not this run's work.
    os.sync()
    command = ([sys.executable, "-m", "podi_multicollect"] + [str(f) for f in folders]
               + [str(outdir), f"-workers={workers}"] + flags)
    start, cpu, own_cpu = time.monotonic(), cpu_seconds(), time.process_time()
    process = subprocess.Popen(command, cwd=HERE.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(process.pid)
    memory.start()
    printed, last_frame, during = [], None, None
    for line in process.stdout:
        printed.append(line)
        finished = FINISHED_LINE.search(line)
        if finished and int(finished[1]) == frames:
            last_frame, during = time.monotonic(), memory.take()
    after = memory.stop()
    process.wait()
    wall, cpu, own_cpu = time.monotonic() - start, cpu_seconds() - cpu, time.process_time() - own_cpu
    if process.returncode != 0 or last_frame is None:
        print("".join(printed[-20:]), end="")
        if (outdir / "night_summary.csv").exists():
            read_summary(outdir, frames)
        sys.exit(f"bench_multicollect: podi_multicollect exited with {process.returncode}")
    rows = read_summary(outdir, frames)
    seconds = [float(row["seconds"]) for row in rows]
    frames_cpu = sum(float(row["cpu_seconds"]) for row in rows)
    rate = frames / (wall / 60)
    print(f"-workers={workers}: {frames} frames in {wall:.1f} s wall, {cpu:.1f} CPU-s: {rate:.2f} frames/min, "
          f"{cpu / frames:.2f} CPU-s per frame")
    print(f"  per frame (night summary): median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s; "
          f"the frames used {frames_cpu:.1f} CPU-s, Dask and the driver {cpu - frames_cpu:.1f}")
    print(f"  peak memory (PSS, all processes): {during:.0f} MB while frames ran, {after:.0f} MB after the "
          f"last one finished ({start + wall - last_frame:.1f} s before the end: summary, night page, "
          "shutdown)")
    # The sampler runs beside the reduction on the same cores; its CPU is in no child's.
    print(f"  the memory sampler (this process) used {own_cpu:.1f} CPU-s")
    for row in rows:
        (outdir / row["output"]).unlink()
    return rate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    parser.add_argument("--frames", type=int, default=20, help="exposures in the night")
    parser.add_argument("--clean", action="store_true", help=f"delete {NIGHT_CACHE} and exit")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(NIGHT_CACHE, ignore_errors=True)
        print(f"deleted {NIGHT_CACHE}")
        return
    workers = [int(n) for n in args.workers.split(",")]
    folders, cals, refcat = prepare_frames(args.frames)
    flags = [f"-cals={cals}", "-gain", f"-nonlinearity={cals / 'nonlinearity'}", "-bpm=auto", "-photcalib",
             f"-refcat={refcat}"]
    rates = [night_run(folders, NIGHT_CACHE / f"out-{n}", n, flags) for n in workers]
    for n, rate in zip(workers[1:], rates[1:]):
        print(f"scaling: {n} workers reduce {rate / rates[0]:.2f}x the frames per minute of {workers[0]}")


if __name__ == "__main__":
    main()
