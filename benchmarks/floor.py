"""The least work any reducer must do, for comparison (run by bench_collectcells.py).

    python benchmarks/floor.py EXPOSURE_DIR OUTPUT.fits [--ncpus N]

Reads every raw OTA file, subtracts each cell's overscan median, places the cells
into the OTA array and writes it straight into its place in one float32 MEF: one
process per OTA at a time, with nothing else (no calibration, no WCS, no sky, no checksums). A real reduction does
strictly more, so its time above this floor is what the calibration costs.
"""

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from podi_definitions import all_cells, cell_geometry, cell_to_ota  # noqa: E402
from podi_rawdata import find_exposure, open_raw_ota  # noqa: E402


def extension_header(ota, size):
    header = fits.Header([("XTENSION", "IMAGE"), ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", size),
                          ("NAXIS2", size), ("PCOUNT", 0), ("GCOUNT", 1),
                          ("EXTNAME", f"OTA{ota:02d}.SCI")])
    return header.tostring().encode("ascii")


def floor_ota(filename, output, offset):
    """One OTA: raw cells minus their overscan medians, placed, written at ``offset``."""
    with open_raw_ota(filename) as raw:
        geometry = cell_geometry(raw.binning)
        cells = raw.cells()
        ota, binning = raw.ota, raw.binning
    columns = slice(*geometry.overscan_cols)
    image = np.full((geometry.ota_size,) * 2, np.nan, np.float32)
    for cx, cy in all_cells():
        cell = cells[cy, cx]
        level = np.median(cell[:geometry.science_rows, columns])
        image[cell_to_ota(cx, cy, binning)] = cell[:geometry.science_rows, :geometry.science_cols] - level
    image.byteswap(inplace=True)
    descriptor = os.open(output, os.O_WRONLY)
    try:
        os.pwrite(descriptor, extension_header(ota, geometry.ota_size) + image.data.cast("B"), offset)
    finally:
        os.close(descriptor)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("exposure")
    parser.add_argument("output")
    parser.add_argument("--ncpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    files = find_exposure(args.exposure).ota_files
    with open_raw_ota(files[min(files)]) as raw:
        size = cell_geometry(raw.binning).ota_size
    # Every OTA's place in the file is known beforehand: workers write there directly.
    span = 2880 + size * size * 4 + (-size * size * 4) % 2880
    with open(args.output, "wb") as out:
        fits.PrimaryHDU().writeto(out)
        out.truncate(2880 + span * len(files))
    with ProcessPoolExecutor(args.ncpus) as pool:
        list(pool.map(floor_ota, files.values(), [args.output] * len(files),
                      [2880 + span * i for i in range(len(files))]))


if __name__ == "__main__":
    main()
