"""Combining a stack of frames pixel by pixel: sigma-clipped median or mean.

Works on one OTA at a time, so memory is bounded by (frames x one OTA array).
No ``nanmedian``: each pixel's values are sorted once (NaN last), and because
clipping keeps an interval around the median, the kept values of a pixel are one
contiguous run of its sorted values. Pixels are processed in chunks laid out
pixel-major, so that the sorts run on contiguous memory.
"""

import numpy as np

COMBINE_METHODS = ("median", "mean")

_CHUNK = 1 << 18  # pixels per chunk


def _run_median(values, start, count):
    """Median of ``count`` sorted values from ``start`` of each row of ``values``."""
    last = values.shape[1] - 1
    rows = np.arange(values.shape[0])
    low = values[rows, np.clip(start + (count - 1) // 2, 0, last)]
    high = values[rows, np.clip(start + count // 2, 0, last)]
    return np.where(count > 0, 0.5 * (low + high), np.nan)


def _robust_sigma(values, count):
    """1.4826 x median absolute deviation of each row of sorted ``values``."""
    median = _run_median(values, np.zeros_like(count), count)
    deviation = np.abs(values - median[:, None])
    deviation.sort(axis=1)
    return median, 1.4826 * _run_median(deviation, np.zeros_like(count), count)


def clipped_combine(stack, method="median", nsigma=3.0):
    """Sigma-clipped combination of a stack of images.

    Parameters
    ----------
    stack : numpy.ndarray
        ``(nframes, ny, nx)`` float32; NaN marks missing data.
    method : {'median', 'mean'}
        Statistic of the values that survive clipping.
    nsigma : float
        Values further than ``nsigma`` robust standard deviations from the
        per-pixel median are rejected. The standard deviation is 1.4826 x the
        per-pixel median absolute deviation, but never less than the median of
        that over the image, so that a few frames don't clip good values.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Combined float32 image ``(ny, nx)`` and the number of values used per pixel.
    """
    if method not in COMBINE_METHODS:
        raise ValueError(f"unknown combine method {method!r}; use one of {COMBINE_METHODS}")
    nframes = stack.shape[0]
    flat = stack.reshape(nframes, -1)
    npix = flat.shape[1]
    # Floor of the noise estimate, from a sparse sample of pixels.
    sample = np.sort(flat[:, ::max(1, npix // 20000)].T, axis=1)
    sample_count = np.isfinite(sample).sum(axis=1)
    floor = np.nanmedian(_robust_sigma(sample, sample_count)[1]) if sample.size else 0.0
    floor = max(float(floor) if np.isfinite(floor) else 0.0, 1e-6)

    combined = np.empty(npix, np.float32)
    used = np.empty(npix, np.int16)
    for begin in range(0, npix, _CHUNK):
        values = np.sort(flat[:, begin:begin + _CHUNK].T, axis=1)
        count = np.isfinite(values).sum(axis=1)
        median, sigma = _robust_sigma(values, count)
        threshold = nsigma * np.maximum(sigma, floor)
        low, high = (median - threshold)[:, None], (median + threshold)[:, None]
        start = (values < low).sum(axis=1)
        inside = (values >= low) & (values <= high)
        kept = inside.sum(axis=1)
        if method == "median":
            combined[begin:begin + _CHUNK] = _run_median(values, start, kept)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                combined[begin:begin + _CHUNK] = np.where(inside, values, 0).sum(axis=1) / kept
        used[begin:begin + _CHUNK] = kept
    shape = stack.shape[1:]
    return combined.reshape(shape), used.reshape(shape)
