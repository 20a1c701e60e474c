"""Benchmark: simulating a full 13-OTA pODI object exposure (run by hand).

    python benchmarks/bench_simulate.py [--ncpus N]

Target: under 30 s on 2 cores. Prints the wall time and the time of one OTA's
steps in this process.
"""

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from podi_simulate import ExposureSpec, simulate_exposure  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncpus", type=int, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_simulate_"))
    try:
        start = time.monotonic()
        simulate_exposure(ExposureSpec(seed=5), workdir / "full", ncpus=args.ncpus)
        print(f"full 13-OTA exposure: {time.monotonic() - start:.1f} s wall")
        profiler = cProfile.Profile()
        profiler.runcall(simulate_exposure, ExposureSpec(seed=6, otas=(33,)), workdir / "one", ncpus=1)
        print("one OTA in this process, by function:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
