"""Bad pixels of ODI OTAs derived from master darks and flats, written as ds9 regions.

Usage::

    python -m podi_badpixels dark.fits flat.fits outdir

``dark.fits`` and ``flat.fits`` are masters made by ``podi_makecalibrations``
(pipeline format, one ``OTA<xy>.SCI`` extension per OTA, same binning); one
region file ``outdir/bpm_xy<NN>.reg`` is written for every OTA present in both
(see :mod:`podi_bpm` for the format). The package's own ``bpm/<layout>/`` files
are made this way from simulated calibrations (``tools/make_package_bpm.py``).

Two kinds of defect are found (see :func:`find_bad_pixels` for the rules):

* hot pixels, whose dark current lies far above the OTA's robust level;
* low-response pixels in the flat (in practice bad column segments), far below
  the median response of their row neighbourhood.

Flagged pixels that follow each other along a column become one box per run.

Pixel conventions
-----------------
Master arrays are numpy ``[y, x]``, 0-based, at the master's binning ``b``.
Region boxes are in 0-based *unbinned* OTA pixel coordinates, as
:func:`podi_bpm.write_bpm_regions` takes them: binned pixel ``(bx, by)`` holds
the unbinned columns ``b*bx .. b*bx + b - 1`` and rows ``b*by .. b*by + b - 1``,
and its box covers exactly those, so :func:`podi_bpm.read_bpm_mask` at binning
``b`` gives back exactly the flagged binned pixels.
"""

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from numpy.lib.stride_tricks import sliding_window_view

from podi_bpm import bpm_filename, write_bpm_regions
from podi_definitions import cell_geometry, ota_from_fppos
from podi_mef import CalibrationError, read_ota_image
from podi_stats import robust_statistics

logger = logging.getLogger(__name__)

#: A hot pixel's dark signal exceeds the OTA's median by more than this many
#: robust standard deviations ...
HOT_NSIGMA = 5.0

#: ... and by more than this dark current (ADU/s per pixel of the master's
#: binning). 0.1 ADU/s is about 0.13 e-/s, 40 times the simulated camera's dark
#: current of 0.003 e-/s per unbinned pixel, and a tenth of its faintest hot pixel.
HOT_RATE = 0.1

#: A pixel whose flat response is below this fraction of the median of its row
#: neighbourhood has low response (the simulated bad columns have 0.4).
LOW_RESPONSE = 0.75

#: Half width of the row neighbourhood (pixels of the master's binning): the
#: median of 2 x 7 + 1 pixels ignores a few bad columns side by side, and is
#: short enough to follow the 2 % steps between cells.
ROW_HALF_WIDTH = 7

#: Rows of the OTA array processed at a time by :func:`row_median` (bounds memory).
_CHUNK_ROWS = 256


@dataclass(frozen=True)
class BadPixelSummary:
    """What :func:`find_bad_pixels` measured and found on one OTA.

    Attributes
    ----------
    dark_level, dark_sigma : float
        Median and robust standard deviation (1.4826 x MAD) of the master dark
        (ADU for its exposure time, pixels of the master's binning).
    hot_threshold : float
        Dark signal above ``dark_level`` beyond which a pixel is hot (ADU).
    n_hot : int
        Hot pixels (of the master's binning).
    n_low : int
        Low-response pixels (of the master's binning).
    n_boxes : int
        Region boxes (runs along columns) that hold them.
    """

    dark_level: float
    dark_sigma: float
    hot_threshold: float
    n_hot: int
    n_low: int
    n_boxes: int


def hot_threshold(dark, dark_exptime):
    """Level and threshold of hot pixels in a master dark.

    Parameters
    ----------
    dark : numpy.ndarray
        Master dark of one OTA (ADU for ``dark_exptime``), NaN = no data.
    dark_exptime : float
        Exposure time the master dark is scaled to (s).

    Returns
    -------
    (float, float, float)
        Robust level and standard deviation of the dark (ADU), and the threshold
        ``max(HOT_NSIGMA * sigma, HOT_RATE * dark_exptime)`` (ADU): a pixel more
        than that above the level is hot.
    """
    if not dark_exptime > 0:
        raise ValueError(f"dark exposure time {dark_exptime!r} s: must be positive "
                         "to compare dark currents")
    level, sigma = robust_statistics(dark)
    return level, sigma, max(HOT_NSIGMA * sigma, HOT_RATE * dark_exptime)


def row_median(image, half_width=ROW_HALF_WIDTH):
    """Median of each pixel's row neighbourhood, ignoring pixels without data.

    Parameters
    ----------
    image : numpy.ndarray
        2-d array ``[y, x]``; NaN = no data.
    half_width : int
        The neighbourhood of pixel ``(x, y)`` is ``x - half_width .. x + half_width``
        of row ``y`` (the pixel itself included), cut at the array's edges.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape; NaN where the neighbourhood has no data.
    """
    width = 2 * half_width + 1
    padded = np.pad(image.astype(np.float32), ((0, 0), (half_width, half_width)),
                    constant_values=np.nan)
    out = np.empty(image.shape, np.float32)
    for start in range(0, image.shape[0], _CHUNK_ROWS):
        # Sorting puts NaN last, so the median of the n finite values of a window
        # sits at positions (n - 1) // 2 and n // 2: no nanmedian needed.
        values = np.sort(sliding_window_view(padded[start:start + _CHUNK_ROWS], width, axis=1),
                         axis=-1)
        count = np.count_nonzero(np.isfinite(values), axis=-1)
        low = np.take_along_axis(values, np.maximum(count - 1, 0)[..., None] // 2, -1)[..., 0]
        high = np.take_along_axis(values, (count // 2)[..., None], -1)[..., 0]
        out[start:start + _CHUNK_ROWS] = np.where(count > 0, 0.5 * (low + high), np.nan)
    return out


def low_response(flat):
    """Pixels whose flat response is far below that of their row neighbourhood.

    Parameters
    ----------
    flat : numpy.ndarray
        Master flat of one OTA (normalised, ~1.0), NaN = no data.

    Returns
    -------
    numpy.ndarray of bool
        True where ``flat < LOW_RESPONSE * row_median(flat)``.
    """
    with np.errstate(invalid="ignore"):
        return flat < np.float32(LOW_RESPONSE) * row_median(flat)


def column_runs(flagged, no_data):
    """Group flagged pixels into runs along columns.

    A run continues through pixels without data (the gaps between cells), so a
    bad column crossing a cell gap stays one run; any good pixel ends it.

    Parameters
    ----------
    flagged, no_data : numpy.ndarray of bool
        Same shape ``[y, x]``: the pixels to group, and the pixels without data.

    Returns
    -------
    list of tuple
        ``(x, y0, y1)`` per run: column and first and last row (inclusive), in
        pixels of the arrays, sorted by column, then row.
    """
    # Column-major order: consecutive entries of a column are consecutive here.
    xs, ys = np.nonzero(flagged.T)
    if not xs.size:
        return []
    good = ~(flagged | no_data)
    good_above = np.cumsum(good, axis=0, dtype=np.int32)[ys, xs]  # good pixels in rows 0..y of the column
    starts = np.ones(xs.size, dtype=bool)
    starts[1:] = (xs[1:] != xs[:-1]) | (good_above[1:] != good_above[:-1])
    first = np.flatnonzero(starts)
    last = np.append(first[1:] - 1, xs.size - 1)
    return [(int(xs[i]), int(ys[i]), int(ys[j])) for i, j in zip(first, last)]


def unbinned_box(x, y0, y1, binning):
    """Region box ``(xc, yc, width, height)`` covering binned pixels ``x, y0..y1``.

    Parameters
    ----------
    x, y0, y1 : int
        Column and first and last row (inclusive) at ``binning``, 0-based.
    binning : int

    Returns
    -------
    tuple of float
        Centre (0-based unbinned pixels) and size (unbinned pixels) of the box
        holding unbinned columns ``b*x .. b*x + b - 1`` and rows
        ``b*y0 .. b*y1 + b - 1``.
    """
    b = binning
    return ((2 * b * x + b - 1) / 2, (b * (y0 + y1) + b - 1) / 2, float(b), float(b * (y1 - y0 + 1)))


def find_bad_pixels(dark, flat, binning, dark_exptime):
    """Find the hot and low-response pixels of one OTA.

    Rules (pixels of the masters' binning):

    * hot: ``dark - level > max(HOT_NSIGMA * sigma, HOT_RATE * dark_exptime)``,
      with ``level`` and ``sigma`` the median and 1.4826 x MAD of the OTA's
      master dark; ``HOT_NSIGMA = 5``, ``HOT_RATE = 0.1`` ADU/s per pixel;
    * low response: ``flat < LOW_RESPONSE * median`` of the flat over the pixel's
      row neighbourhood (``x +- ROW_HALF_WIDTH``, pixels without data ignored);
      ``LOW_RESPONSE = 0.75``. A column-wise comparison on one row sees through
      the smooth vignetting and the cell-to-cell steps, not through a bad column.

    Hot and low pixels that follow each other along a column (also across cell
    gaps without data) are merged into one box each.

    Parameters
    ----------
    dark : numpy.ndarray
        Master dark of the OTA, ``[y, x]`` (ADU for ``dark_exptime``), NaN = no data.
    flat : numpy.ndarray
        Master flat of the OTA, same shape, normalised to ~1.0, NaN = no data.
    binning : int
        Binning of both arrays (1 or 2).
    dark_exptime : float
        Exposure time the master dark is scaled to (s).

    Returns
    -------
    (list of tuple, BadPixelSummary)
        Boxes ``(xc, yc, width, height)`` in 0-based unbinned OTA pixels for
        :func:`podi_bpm.write_bpm_regions`, and what was measured.
    """
    size = cell_geometry(binning).ota_size
    if dark.shape != (size, size) or flat.shape != (size, size):
        raise ValueError(f"dark {dark.shape} and flat {flat.shape} must both be "
                         f"({size}, {size}) at binning {binning}")
    level, sigma, threshold = hot_threshold(dark, dark_exptime)
    with np.errstate(invalid="ignore"):
        hot = dark - np.float32(level) > np.float32(threshold)
    low = low_response(flat)
    no_data = ~(np.isfinite(dark) & np.isfinite(flat))
    runs = column_runs(hot | low, no_data)
    boxes = [unbinned_box(x, y0, y1, binning) for x, y0, y1 in runs]
    summary = BadPixelSummary(level, sigma, threshold, int(np.count_nonzero(hot)),
                              int(np.count_nonzero(low)), len(boxes))
    return boxes, summary


def master_otas(filename):
    """OTAs of a pipeline-format file: the ``FPPOS`` of its image extensions.

    Raises
    ------
    CalibrationError
        If the file cannot be read as FITS.
    """
    try:
        with fits.open(filename) as hdulist:
            return {ota_from_fppos(hdu.header["FPPOS"]) for hdu in hdulist[1:]
                    if "FPPOS" in hdu.header}
    except (OSError, ValueError) as error:
        raise CalibrationError(f"{filename}: not a readable FITS file "
                               f"({' '.join(str(error).split())})") from None


def _master_binning(filename):
    """Binning of a master from its primary ``BINNING`` card (1 if absent)."""
    return int(fits.getheader(filename, 0).get("BINNING", 1))


def derive_bpm_files(dark_file, flat_file, outdir):
    """Write one bad-pixel region file per OTA found in both a master dark and flat.

    Parameters
    ----------
    dark_file, flat_file : str or Path
        Master dark (primary ``EXPTIME``: the seconds it is scaled to) and master
        flat of the same binning, in the pipeline's format.
    outdir : str or Path
        Folder for the ``bpm_xy<NN>.reg`` files (created if needed; existing
        files of the same OTAs are replaced).

    Returns
    -------
    list of Path
        The files written, in increasing OTA order.

    Raises
    ------
    CalibrationError
        Unreadable masters, different binnings, or no OTA in common.
    """
    binning = _master_binning(dark_file)
    if _master_binning(flat_file) != binning:
        raise CalibrationError(f"{dark_file} (binning {binning}) and {flat_file} "
                               f"(binning {_master_binning(flat_file)}) differ in binning")
    dark_exptime = float(fits.getheader(dark_file, 0).get("EXPTIME", 0.0))
    dark_otas, flat_otas = master_otas(dark_file), master_otas(flat_file)
    for ota in sorted(dark_otas ^ flat_otas):
        logger.warning("OTA %02d is in only one of %s and %s: no region file", ota,
                       Path(dark_file).name, Path(flat_file).name)
    otas = sorted(dark_otas & flat_otas)
    if not otas:
        raise CalibrationError(f"{dark_file} and {flat_file} have no OTA in common")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    size = cell_geometry(binning).ota_size
    written = []
    for ota in otas:
        dark = read_ota_image(dark_file, ota, size)[0]
        flat = read_ota_image(flat_file, ota, size)[0]
        boxes, summary = find_bad_pixels(dark, flat, binning, dark_exptime)
        filename = bpm_filename(outdir, ota)
        write_bpm_regions(filename, boxes)
        logger.info("OTA %02d: dark level %.1f +- %.1f ADU, hot above +%.1f ADU: %d hot, "
                    "%d low-response pixels in %d boxes -> %s", ota, summary.dark_level,
                    summary.dark_sigma, summary.hot_threshold, summary.n_hot, summary.n_low,
                    summary.n_boxes, filename)
        written.append(filename)
    return written


def build_parser():
    parser = argparse.ArgumentParser(
        prog="podi_badpixels",
        description="Derive ds9 bad-pixel region files (bpm_xy<NN>.reg) from a master "
                    "dark and a master flat.")
    parser.add_argument("dark", help="master dark (podi_makecalibrations)")
    parser.add_argument("flat", help="master flat of the same binning")
    parser.add_argument("outdir", help="folder for the region files")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        written = derive_bpm_files(args.dark, args.flat, args.outdir)
    except (CalibrationError, OSError, ValueError) as error:
        print(f"podi_badpixels: error: {error}", file=sys.stderr)
        return 1
    for filename in written:
        print(filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
