"""Benchmark: podi_collectcells on a full 13-OTA pODI exposure (run by hand).

    python benchmarks/bench_collectcells.py [--ncpus N] [--repeat N] [--fixwcs] [--photcalib] [--plots]

Simulates once (cached in benchmarks/cache/) a full unbinned exposure with every
effect and ~5,000 detectable stars, perfect masters in electrons and the camera's
nonlinearity table, then times the reduction with bias, dark, flat, crosstalk,
nonlinearity, gain and BPM. ``--fixwcs`` also times the run with source detection
and the astrometric solution, ``--photcalib`` with aperture photometry and the zero
point as well (both without QA plots), ``--plots`` with the QA plots of the last of
these, and prints what each adds and how many sources the catalog holds.
Prints wall times, the time of each stage (from one OTA reduced in this process)
and the peak memory of the whole run (master + workers).
"""

import argparse
import cProfile
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from podi_simulate import ExposureSpec, Instrument, simulate_exposure, write_true_calibrations  # noqa: E402
from podi_definitions import PODI  # noqa: E402
from astropy.io import fits  # noqa: E402

CACHE = HERE / "cache" / "density7500"
SPEC = ExposureSpec(seed=42, mjd=56620.2, star_density=7500.0)


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


def stage_profile(exposure, cals, flags):
    """Time per reduction stage for one OTA, in this process."""
    from podi_calibfiles import resolve_calibrations
    from podi_collectcells import collect_reduce_ota
    from podi_commandline import parse_commandline
    from podi_rawdata import find_exposure
    options = parse_commandline([str(exposure), "/dev/null"] + flags)
    ota_file = find_exposure(exposure).ota_files[33]
    options["calibrations"] = resolve_calibrations(options, fits.getheader(ota_file), 1)
    profiler = cProfile.Profile()
    profiler.runcall(collect_reduce_ota, ota_file, options)
    stats = pstats.Stats(profiler)
    names = ["correct_crosstalk", "overscan", "nonlinearity", "gain", "assemble", "bias", "dark",
             "flat", "bad_pixels", "cells", "apply_wcs", "sky_samples", "find_sources",
             "aperture_flux", "growth_curves"]
    seconds = {name: row[3] for (filename, line, name), row in stats.stats.items()
               if name in names and "podi_" in filename}
    for name, value in seconds.items():
        print(f"  {name:18s} {value:6.3f} s")
    if "aperture_flux" in seconds:
        # The photometry runs in the workers: 13 OTAs share the cores.
        photometry = seconds["aperture_flux"] + seconds["growth_curves"]
        print(f"aperture photometry (9 apertures and the curves of growth): {photometry:.3f} s "
              f"per OTA, about {photometry * 13 / (os.cpu_count() or 1):.2f} s per frame")


def timed_runs(exposure, output, flags, repeat):
    """Best wall time (s) of ``repeat`` runs of podi_collectcells with ``flags``."""
    times = []
    for run in range(repeat):
        # Replacing an existing 0.9 GB file costs its deletion, which a night loop
        # writing new names does not pay.
        output.unlink(missing_ok=True)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "podi_collectcells", str(exposure), str(output)] + flags,
                       check=True, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        times.append(time.monotonic() - start)
        print(f"  {' '.join(f for f in flags if not f.startswith('-cals') and '/' not in f)}: "
              f"run {run + 1}: wall time {times[-1]:.2f} s")
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncpus", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--fixwcs", action="store_true",
                        help="also time -fixwcs against the field's reference catalog")
    parser.add_argument("--photcalib", action="store_true", help="also time -fixwcs -photcalib")
    parser.add_argument("--plots", action="store_true",
                        help="also time the QA plots (implies --fixwcs)")
    args = parser.parse_args()
    exposure, cals = prepare()
    output = CACHE / "reduced.fits"
    flags = [f"-cals={cals}", "-gain", f"-nonlinearity={cals / 'nonlinearity'}", "-bpm=auto"]
    if args.ncpus:
        flags.append(f"-ncpus={args.ncpus}")
    base = timed_runs(exposure, output, flags, args.repeat)
    print(f"reduction: {base:.2f} s (best of {args.repeat})")
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
        best = timed_runs(exposure, output, flags + step, args.repeat)
        sources = len(fits.getdata(output, "CAT.ODI"))
        print(f"{' '.join(s for s in step if not s.startswith('-refcat'))}: {best:.2f} s, "
              f"adds {best - previous:.2f} s for {sources} sources")
        previous = best
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak resident memory of the largest process: {children:.0f} MB; shared OTA "
          f"buffers in /dev/shm: at most {13 * 64} MB, freed as each OTA is written")
    print("time per stage, one OTA (33) in one process:")
    stage_profile(exposure, cals, flags + (steps[-1] if steps else []))


if __name__ == "__main__":
    main()
