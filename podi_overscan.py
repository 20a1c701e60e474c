"""Overscan subtraction: one level per cell from its serial overscan block.

The level is a clipped mean of the overscan block, because the original's median
of integer ADU is quantised by up to 0.5 ADU. The median stays available.
"""

import numpy as np

from podi_definitions import N_CELLS, overscan_section

OVERSCAN_METHODS = ("clippedmean", "median")


def overscan_statistics(cells, binning, method="clippedmean", nsigma=5.0):
    """Overscan level and noise of every cell.

    Parameters
    ----------
    cells : numpy.ndarray
        Raw cells ``[cy, cx, row, col]`` (ADU).
    binning : int
    method : {'clippedmean', 'median'}
        ``clippedmean``: mean of the pixels within ``nsigma`` robust standard
        deviations (1.4826 x MAD) of the median.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Levels and robust standard deviations (the read noise) in ADU, float64
        ``[cy, cx]``.
    """
    if method not in OVERSCAN_METHODS:
        raise ValueError(f"unknown overscan method {method!r}; use one of {OVERSCAN_METHODS}")
    rows, cols = overscan_section(binning)
    block = cells[:, :, rows, cols].reshape(N_CELLS * N_CELLS, -1)
    # Centre and width of the clip from every 4th pixel: the clipped mean and
    # standard deviation below still use all of them.
    sample = block[:, ::4]
    median = np.median(sample, axis=1, keepdims=True)
    sigma = 1.4826 * np.median(np.abs(sample - median), axis=1, keepdims=True)
    deviation = np.abs(block - median)
    # A noiseless overscan (sigma 0) keeps the pixels equal to the median.
    keep = deviation <= nsigma * sigma
    count = keep.sum(axis=1)
    mean = np.sum(block * keep, axis=1, dtype=np.float64) / count
    # The MAD of integer ADU is quantised; the standard deviation after a clip at
    # 5 sigma is not, and misses only 6e-7 of a Gaussian's pixels.
    variance = np.sum((block - mean[:, None]) ** 2 * keep, axis=1, dtype=np.float64) / (count - 1)
    noise = np.sqrt(variance).reshape(N_CELLS, N_CELLS)
    if method == "median":
        return np.median(block, axis=1).reshape(N_CELLS, N_CELLS), noise
    return mean.reshape(N_CELLS, N_CELLS), noise


def overscan_levels(cells, binning, method="clippedmean"):
    """Overscan level of every cell (ADU, ``[cy, cx]``); see :func:`overscan_statistics`."""
    return overscan_statistics(cells, binning, method)[0]


def subtract_overscan(cells, binning, method="clippedmean"):
    """Subtract each cell's overscan level in place; return levels and noise (ADU)."""
    levels, noise = overscan_statistics(cells, binning, method)
    cells -= levels[:, :, None, None].astype(cells.dtype)
    return levels, noise
