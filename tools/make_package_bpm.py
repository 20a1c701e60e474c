"""Make the package's bad-pixel region files ``bpm/<layout>/bpm_xy<NN>.reg``.

For each focal-plane layout, simulate unbinned darks and dome flats of all its
OTAs with the simulated camera (``podi_simulate``, instrument seed
``INSTRUMENT_SEED``), build master calibrations with ``podi_makecalibrations``,
derive the region files with ``podi_badpixels`` and delete the raw and master
data again (a raw unbinned pODI exposure is about 0.5 GB).

Usage (from the repository root)::

    python tools/make_package_bpm.py [--layout podi|odi_5x6] [--ncpus N] [--workdir DIR]
        [--bpmdir DIR]

All simulated effects stay on. The clipped median of the three darks rejects a
cosmic ray that hits one of them; a pixel hit in two of the three (about one in
10^8, a fraction of a pixel per OTA) is taken for a hot pixel, which costs one
pixel. The bias structure left without a master bias (a few ADU) is far below
the hot-pixel threshold (30 ADU).
"""

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from podi_badpixels import derive_bpm_files  # noqa: E402
from podi_definitions import layout_for_mjd  # noqa: E402
from podi_makecalibrations import make_calibrations  # noqa: E402
from podi_reduceota import ReductionSettings  # noqa: E402
from podi_simulate import ExposureSpec, simulate_exposure  # noqa: E402

logger = logging.getLogger("make_package_bpm")

#: MJD-OBS of the simulated calibrations: one night in the time of each layout.
LAYOUT_MJD = {"podi": 56620.1, "odi_5x6": 57500.1}

N_FRAMES = 3            # darks and flats each
DARK_EXPTIME = 300.0    # s
FLAT_EXPTIME = 20.0     # s, a dome flat
FIRST_SEED = {"DARK": 1000, "DFLAT": 2000}


def simulate_calibrations(layout, rawdir, ncpus):
    """Simulate the darks and dome flats of all OTAs of a layout; return their paths."""
    mjd = LAYOUT_MJD[layout]
    if layout_for_mjd(mjd).name != layout:
        raise ValueError(f"MJD {mjd} belongs to layout {layout_for_mjd(mjd).name}, not {layout}")
    paths = []
    for obstype, exptime in (("DARK", DARK_EXPTIME), ("DFLAT", FLAT_EXPTIME)):
        for i in range(N_FRAMES):
            # One minute apart with their own seeds: distinct names, noise and cosmics.
            spec = ExposureSpec(obstype=obstype, layout=layout, binning=1, exptime=exptime,
                                seed=FIRST_SEED[obstype] + i, sequence=len(paths) + 1,
                                mjd=mjd + len(paths) / 1440)
            paths.append(simulate_exposure(spec, rawdir, ncpus=ncpus))
    return paths


def make_layout(layout, bpmdir, workdir, ncpus):
    """Write the region files of one layout into ``bpmdir / layout``; return them."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"bpm_{layout}_") as tmp:
        start = time.monotonic()
        raw = simulate_calibrations(layout, Path(tmp) / "raw", ncpus)
        logger.info("%s: simulated %d exposures in %.0f s", layout, len(raw), time.monotonic() - start)
        masters = make_calibrations(raw, Path(tmp) / "cals",
                                    ReductionSettings(crosstalk="default"), ncpus=ncpus)
        by_name = {path.name: path for path in masters}
        # The raw frames are not needed any more: free their disk space early.
        shutil.rmtree(Path(tmp) / "raw")
        logger.info("%s: masters made after %.0f s", layout, time.monotonic() - start)
        written = derive_bpm_files(by_name["dark_yes_bin1.fits"], by_name["flat_odi_r_bin1.fits"],
                                   bpmdir / layout)
        logger.info("%s: %d region files after %.0f s", layout, len(written), time.monotonic() - start)
    return written


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUT_MJD), action="append",
                        help="layout to make (repeatable; default: all)")
    parser.add_argument("--ncpus", type=int, default=2)
    parser.add_argument("--workdir", default=None,
                        help="folder for the temporary data (default: the system's)")
    parser.add_argument("--bpmdir", default=str(REPO / "bpm"),
                        help="output root; files go to <bpmdir>/<layout>/")
    args = parser.parse_args(argv)
    for layout in args.layout or sorted(LAYOUT_MJD, reverse=True):
        for path in make_layout(layout, Path(args.bpmdir), args.workdir, args.ncpus):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
