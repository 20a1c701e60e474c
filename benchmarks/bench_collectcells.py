"""Benchmark: podi_collectcells on a full 13-OTA pODI exposure (run by hand).

    python benchmarks/bench_collectcells.py [--ncpus N] [--repeat N] [--fixwcs] [--photcalib]
        [--plots] [--fringe] [--pupilghost] [--persistency] [--odi5x6] [--night N]

Simulates once (cached in benchmarks/cache/) a full unbinned exposure with every
effect and ~5,000 detectable stars, perfect masters in electrons and the camera's
nonlinearity table, then times the reduction with bias, dark, flat, crosstalk,
nonlinearity, gain and BPM. ``--fixwcs`` also times the run with source detection
and the astrometric solution, ``--photcalib`` with aperture photometry and the zero
point as well (both without QA plots), ``--plots`` with the QA page and plots of the
last of these, and prints what each adds and how many sources the catalog holds; a
run with the QA page also prints the page's own time and CPU-seconds, as
podi_collectcells measured them from the written frame to the written page.
``--odi5x6`` times a full 30-OTA ODI 5x6 exposure with ``-photcalib`` and the QA page.
``--night N`` reduces the main exposure N times (with ``-photcalib`` and the QA page)
in one process, as a night batch does, and prints the memory after and during each
frame: it must not grow.
``--fringe`` times a second cached exposure (odi_i, fringes of 2 % of the sky, its
perfect template and vectors) with and without ``-fringe``: what the measure and
apply phases add. ``--pupilghost`` does the same with a third cached exposure
(odi_r, the pupil ghost at rotator angle 15 degrees, its true template made at 0)
and ``-pupilghost``. ``--persistency`` times the main exposure with ``-persistency``
(its saturation trails masked, its catalog written and indexed). Every run reports wall time and CPU-seconds (user + system of
all its processes); the floor (``floor.py``: read, overscan, place cells, write)
is timed in the same run. Also printed: the time of each stage (from one OTA
reduced in this process) and, for every run, its peak memory: the proportional set
size of all its processes together.
"""

import argparse
import cProfile
import os
import pstats
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from podi_simulate import ExposureSpec, Instrument, simulate_exposure, write_true_calibrations  # noqa: E402
from podi_definitions import PODI  # noqa: E402
from astropy.io import fits  # noqa: E402

CACHE = HERE / "cache" / "density7500"
SPEC = ExposureSpec(seed=42, mjd=56620.2, star_density=7500.0)
FRINGE_CACHE = HERE / "cache" / "fringe"
FRINGE_SPEC = ExposureSpec(seed=43, mjd=56620.25, filter="odi_i", fringe_amplitude=0.02)
ODI5X6_CACHE = HERE / "cache" / "odi5x6"
ODI5X6_SPEC = ExposureSpec(seed=45, mjd=57500.2, layout="odi_5x6", star_density=7500.0)
GHOST_CACHE = HERE / "cache" / "pupilghost"
GHOST_SPEC = ExposureSpec(seed=44, mjd=56620.27, pupilghost=1.0, rotator_angle=15.0)


def prepare():
    """The cached exposure, calibration folder and nonlinearity table."""
    exposures = sorted(CACHE.glob("o*.1")) if CACHE.is_dir() else []
    cals = CACHE / "cals"
    if not exposures or not (cals / "flat_odi_r_bin1.fits").exists():
        start = time.monotonic()
        exposures = [simulate_exposure(SPEC, CACHE)]
        print(f"simulated the exposure in {time.monotonic() - start:.1f} s")
        write_true_calibrations(SPEC, cals, gain=True)
        Instrument(PODI).write_nonlinearity_table(cals / "nonlinearity", PODI.otas)
    return exposures[0], cals


def prepare_fringe():
    """The cached fringe exposure and its calibration folder (template and vectors)."""
    import numpy as np

    import podi_fringetemplate
    from podi_calibfiles import fringe_vectors_name
    exposures = sorted(FRINGE_CACHE.glob("o*.1")) if FRINGE_CACHE.is_dir() else []
    cals = FRINGE_CACHE / "cals"
    if not exposures or not (cals / "fringevectors__odi_i__OTA33.reg").exists():
        exposures = [simulate_exposure(FRINGE_SPEC, FRINGE_CACHE)]
        template = write_true_calibrations(FRINGE_SPEC, cals, gain=True)["fringe"]
        with fits.open(template) as hdus:
            for hdu in hdus[1:]:
                ota = int(hdu.name[3:5])
                vectors = podi_fringetemplate.choose_fringe_vectors(np.asarray(hdu.data), 1)
                podi_fringetemplate.write_fringe_vectors(cals / fringe_vectors_name("odi_i", ota), vectors)
    return exposures[0], cals


def prepare_pupilghost():
    """The cached pupil-ghost exposure and its calibration folder (true template at rotator 0)."""
    import dataclasses
    exposures = sorted(GHOST_CACHE.glob("o*.1")) if GHOST_CACHE.is_dir() else []
    cals = GHOST_CACHE / "cals"
    if not exposures or not any(cals.glob("pupilghost_template*")):
        exposures = [simulate_exposure(GHOST_SPEC, GHOST_CACHE)]
        write_true_calibrations(dataclasses.replace(GHOST_SPEC, rotator_angle=0.0), cals, gain=True)
    return exposures[0], cals


def prepare_odi5x6():
    """The cached full ODI 5x6 exposure (30 OTAs) and its perfect masters."""
    exposures = sorted(ODI5X6_CACHE.glob("o*.1")) if ODI5X6_CACHE.is_dir() else []
    cals = ODI5X6_CACHE / "cals"
    if not exposures or not (cals / "flat_odi_r_bin1.fits").exists():
        exposures = [simulate_exposure(ODI5X6_SPEC, ODI5X6_CACHE)]
        write_true_calibrations(ODI5X6_SPEC, cals, gain=True)
    return exposures[0], cals


def correction_runs(name, exposure, cals, flag, flags, output, repeat):
    """Time an exposure without and with one frame-wide correction's flag; print what it adds."""
    plain_flags = [f"-cals={cals}", "-gain", "-bpm=auto"] + flags[4:]
    plain = collectcells_runs(exposure, output, plain_flags, repeat)
    corrected = collectcells_runs(exposure, output, plain_flags + [flag], repeat)
    print(f"{name}: {corrected[0]:.2f} s wall, {corrected[1]:.2f} CPU-s; adds "
          f"{corrected[0] - plain[0]:.2f} s and {corrected[1] - plain[1]:.2f} CPU-s")


def stage_profile(exposure, cals, flags):
    """Time per reduction stage for one OTA, in this process."""
    import numpy as np

    from podi_calibfiles import resolve_calibrations
    from podi_commandline import parse_commandline
    from podi_otaphases import collect_reduce_ota
    from podi_rawdata import find_exposure
    from podi_settings import run_settings
    options = parse_commandline([str(exposure), "/dev/null"] + flags)
    ota_file = find_exposure(exposure).ota_files[33]
    settings = run_settings(options, resolve_calibrations(options, fits.getheader(ota_file), 1))
    profiler = cProfile.Profile()
    profiler.runcall(collect_reduce_ota, 33, np.empty((4096, 4096), np.float32), settings, ota_file)
    stats = pstats.Stats(profiler)
    names = ["correct_crosstalk", "overscan", "nonlinearity", "gain", "assemble", "bias", "dark",
             "flat", "bad_pixels", "cells", "canned_wcs", "sky_level", "find_sources",
             "aperture_flux", "growth_curves", "finish_phase"]
    seconds = {name: row[3] for (filename, line, name), row in stats.stats.items()
               if name in names and "podi_" in filename}
    for name, value in seconds.items():
        print(f"  {name:18s} {value:6.3f} s")
    if "aperture_flux" in seconds:
        # The photometry runs in the workers: 13 OTAs share the cores.
        photometry = seconds["aperture_flux"] + seconds["growth_curves"]
        print(f"aperture photometry (9 apertures and the curves of growth): {photometry:.3f} s "
              f"per OTA, about {photometry * 13 / (os.cpu_count() or 1):.2f} s per frame")


def cpu_seconds():
    """User + system seconds of all finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: The line podi_collectcells logs after the QA plots and page.
QA_LINE = re.compile(r"QA page (\S+): (\d+) plot files, ([\d.]+) s, ([\d.]+) CPU-s")


def _children():
    """Process id -> ids of its children, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _pss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class PeakMemory(threading.Thread):
    """Samples, every ``interval`` seconds, the proportional set size (PSS: shared pages
    split between the processes that share them) of a process and all its descendants
    together; ``peak_mb`` is the largest sum seen. A sample reads every process's
    smaps: at 50 ms that took a fifth of a core from the run measured."""

    def __init__(self, pid, interval=0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_mb, self.running = pid, interval, 0.0, True
        self.lock = threading.Lock()

    def run(self):
        while self.running:
            tree, family = _children(), [self.pid]
            for pid in family:
                family.extend(tree.get(pid, []))
            sample = sum(_pss_kb(pid) for pid in family) / 1024
            with self.lock:  # a take() meanwhile must not get this sample's old peak back
                self.peak_mb = max(self.peak_mb, sample)
            time.sleep(self.interval)

    def take(self):
        """The peak since the last call (or the start), and start a new one."""
        with self.lock:
            peak, self.peak_mb = self.peak_mb, 0.0
        return peak

    def stop(self):
        self.running = False
        self.join()
        return self.peak_mb


def timed_runs(output, command, label, repeat):
    """Best wall time and CPU-seconds of ``repeat`` runs of ``command`` (lists of str);
    each run also prints its peak memory (:class:`PeakMemory`)."""
    best = (float("inf"), float("inf"))
    for run in range(repeat):
        # Replacing an existing 0.9 GB file costs its deletion, which a night loop
        # writing new names does not pay.
        output.unlink(missing_ok=True)
        start, cpu = time.monotonic(), cpu_seconds()
        process = subprocess.Popen(command, cwd=HERE.parent, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        memory = PeakMemory(process.pid)
        memory.start()
        printed = process.communicate()[0]
        peak = memory.stop()
        if process.returncode != 0:
            raise subprocess.CalledProcessError(process.returncode, command, printed)
        wall, cpu = time.monotonic() - start, cpu_seconds() - cpu
        qa = QA_LINE.search(printed)
        if qa:
            # What the run itself measured from the written frame to the written page.
            label_qa = f"; QA page and {qa[2]} plot files: {float(qa[3]):.2f} s, {float(qa[4]):.2f} CPU-s"
        print(f"  {label}: run {run + 1}: wall {wall:.2f} s, CPU {cpu:.2f} s, peak memory (PSS, all "
              f"processes) {peak:.0f} MB{label_qa if qa else ''}")
        best = min(best, (wall, cpu))
    return best


def collectcells_runs(exposure, output, flags, repeat):
    label = " ".join(f for f in flags if not f.startswith("-cals") and "/" not in f) or "reduction"
    return timed_runs(output, [sys.executable, "-m", "podi_collectcells", str(exposure), str(output)]
                      + flags, label, repeat)


#: Run by ``night_in_one_process``: frames reduced one after another in one process,
#: as a night batch does; prints one line per frame with the process's own PSS after it.
NIGHT_DRIVER = """
import sys, time
from pathlib import Path
import podi_collectcells
frames, argv = int(sys.argv[1]), sys.argv[2:]
for frame in range(frames):
    start = time.monotonic()
    if podi_collectcells.main(argv) != 0:
        sys.exit(1)
    pss = next(int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
               if line.startswith("Pss:"))
    print(f"frame {frame + 1} {time.monotonic() - start:.2f} {pss / 1024:.0f}", flush=True)
"""


def night_in_one_process(exposure, output, flags, frames):
    """Reduce the same exposure ``frames`` times in one process; print, per frame, its
    wall time, the master process's PSS after it and the peak PSS of all processes
    during it, then the growth from the fifth frame (caches are full by then) to the last."""
    output.unlink(missing_ok=True)
    command = [sys.executable, "-c", NIGHT_DRIVER, str(frames), str(exposure), str(output)] + flags
    start, cpu = time.monotonic(), cpu_seconds()
    process = subprocess.Popen(command, cwd=HERE.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    memory = PeakMemory(process.pid)
    memory.start()
    after, peaks = [], []
    for line in process.stdout:
        if not line.startswith("frame "):
            continue
        _, number, seconds, pss = line.split()
        after.append(float(pss))
        peaks.append(memory.take())
        print(f"  frame {number}: {float(seconds):.2f} s, master PSS after it {pss} MB, peak PSS of all "
              f"processes during it {peaks[-1]:.0f} MB")
    memory.stop()
    if process.wait() != 0 or len(after) != frames:
        raise RuntimeError(f"the night driver stopped after {len(after)} frames")
    wall, cpu = time.monotonic() - start, cpu_seconds() - cpu
    base = min(4, frames - 1)
    print(f"{frames} frames in one process: {wall:.1f} s, {cpu:.1f} CPU-s ({cpu / frames:.2f} CPU-s per "
          f"frame); from frame {base + 1} to {frames} the master's PSS after a frame went "
          f"{after[base]:.0f} -> {after[-1]:.0f} MB and the peak {peaks[base]:.0f} -> {peaks[-1]:.0f} MB "
          f"(highest {max(peaks):.0f} MB)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncpus", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--fixwcs", action="store_true",
                        help="also time -fixwcs against the field's reference catalog")
    parser.add_argument("--photcalib", action="store_true", help="also time -fixwcs -photcalib")
    parser.add_argument("--plots", action="store_true",
                        help="also time the QA plots (implies --fixwcs)")
    parser.add_argument("--fringe", action="store_true", help="also time -fringe")
    parser.add_argument("--pupilghost", action="store_true", help="also time -pupilghost")
    parser.add_argument("--persistency", action="store_true", help="also time -persistency")
    parser.add_argument("--odi5x6", action="store_true",
                        help="also time -photcalib with the QA page on a full ODI 5x6 frame")
    parser.add_argument("--night", type=int, default=0, metavar="N",
                        help="also reduce N frames with -photcalib and the QA page in one process "
                             "and print the memory after each")
    args = parser.parse_args()
    exposure, cals = prepare()
    output = CACHE / "reduced.fits"
    flags = [f"-cals={cals}", "-gain", f"-nonlinearity={cals / 'nonlinearity'}", "-bpm=auto"]
    if args.ncpus:
        flags.append(f"-ncpus={args.ncpus}")
    floor = timed_runs(output, [sys.executable, str(HERE / "floor.py"), str(exposure), str(output)]
                       + ([f"--ncpus={args.ncpus}"] if args.ncpus else []), "floor", args.repeat)
    base = collectcells_runs(exposure, output, flags, args.repeat)
    print(f"floor (read, overscan, place cells, write): {floor[0]:.2f} s wall, {floor[1]:.2f} CPU-s")
    print(f"reduction: {base[0]:.2f} s wall, {base[1]:.2f} CPU-s (best of {args.repeat})")
    if args.fringe:
        fringe_exposure, fringe_cals = prepare_fringe()
        correction_runs("-fringe", fringe_exposure, fringe_cals, f"-fringe={fringe_cals}", flags, output,
                        args.repeat)
        # The true scale in the output's unit (electrons with -gain): FRNGAMP x sky.
        true_scale = (fits.getval(next(FRINGE_CACHE.glob("*.truth.fits")), "FRNGAMP")
                      * fits.getval(output, "SKYLEVEL"))
        print(f"  FRNG_SCL {fits.getval(output, 'FRNG_SCL'):.2f}, true {true_scale:.2f}")
    if args.pupilghost:
        ghost_exposure, ghost_cals = prepare_pupilghost()
        correction_runs("-pupilghost", ghost_exposure, ghost_cals, f"-pupilghost={ghost_cals}", flags,
                        output, args.repeat)
        truth, header = fits.getheader(next(GHOST_CACHE.glob("*.truth.fits"))), fits.getheader(output)
        # The template has the exposure's amplitude: the true scale is the sky level.
        print(f"  PUPLGFAC / SKYLEVEL {header['PUPLGFAC'] / header['SKYLEVEL']:.4f} (true 1); centre "
              f"({header['PUPLGCX']:.1f}, {header['PUPLGCY']:.1f}), true ({truth['PGCNTR_X']:.1f}, "
              f"{truth['PGCNTR_Y']:.1f})")
    if args.persistency:
        folder = CACHE / "persistency"
        masked = collectcells_runs(exposure, output, flags + [f"-persistency={folder}"], args.repeat)
        saturated = sum(len(hdu.data) for hdu in fits.open(next(folder.glob("*.saturated.fits")))[1:])
        print(f"-persistency: {masked[0]:.2f} s wall, {masked[1]:.2f} CPU-s; adds "
              f"{masked[0] - base[0]:.2f} s and {masked[1] - base[1]:.2f} CPU-s ({saturated} saturated "
              "raw pixels)")
    # Each step adds to the one before; the last turns the QA plots on.
    steps = []
    if args.fixwcs or args.photcalib or args.plots:
        steps.append(["-fixwcs", f"-refcat={exposure.parent / (exposure.name + '.refcat.fits')}",
                      "-noqaplots"])
    if args.photcalib:
        steps.append(steps[0] + ["-photcalib"])
    if args.plots:
        steps.append([flag for flag in steps[-1] if flag != "-noqaplots"])
    previous = base
    for step in steps:
        best = collectcells_runs(exposure, output, flags + step, args.repeat)
        sources = len(fits.getdata(output, "CAT.ODI"))
        print(f"{' '.join(s for s in step if not s.startswith('-refcat'))}: {best[0]:.2f} s, "
              f"{best[1]:.2f} CPU-s; adds {best[0] - previous[0]:.2f} s and "
              f"{best[1] - previous[1]:.2f} CPU-s for {sources} sources")
        previous = best
    if args.odi5x6:
        wide, wide_cals = prepare_odi5x6()
        wide_output = ODI5X6_CACHE / "reduced.fits"
        best = collectcells_runs(wide, wide_output, [f"-cals={wide_cals}", "-gain", "-photcalib",
                                                     f"-refcat={wide.parent / (wide.name + '.refcat.fits')}"],
                                 args.repeat)
        print(f"ODI 5x6 -photcalib with the QA page: {best[0]:.2f} s, {best[1]:.2f} CPU-s")
    if args.night:
        refcat = exposure.parent / (exposure.name + ".refcat.fits")
        night_in_one_process(exposure, output, flags + ["-photcalib", f"-refcat={refcat}"], args.night)
    print(f"shared OTA buffers in /dev/shm: at most {13 * 64} MB (counted in the PSS while "
          "mapped), freed as each OTA is written")
    print("time per stage, one OTA (33) in one process:")
    stage_profile(exposure, cals, flags + (steps[-1] if steps else []))


if __name__ == "__main__":
    main()
