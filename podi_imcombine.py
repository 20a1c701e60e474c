"""Combining a stack of frames pixel by pixel: sigma-clipped median or mean.

Works on one OTA at a time, so memory is bounded by (frames x one OTA array).
No ``nanmedian``: each pixel's values are sorted once (undefined values last) by
an odd-even transposition network of element-wise minimum and maximum over the
frame axis, which for the few frames of a calibration set is much faster than a
general sort. Because clipping keeps an interval around the median, the kept
values of a pixel are one contiguous run of its sorted values.
"""

import numpy as np

COMBINE_METHODS = ("median", "mean")

_CHUNK = 1 << 16  # pixels per chunk: the frames of a chunk stay in the CPU cache


def _sort_frames(values):
    """Sort ``values`` (frames, pixels) along the frame axis in place; NaN must be +inf."""
    nframes = values.shape[0]
    low = np.empty(values.shape[1], values.dtype)
    for step in range(nframes):
        for i in range(step % 2, nframes - 1, 2):
            np.minimum(values[i], values[i + 1], out=low)
            np.maximum(values[i], values[i + 1], out=values[i + 1])
            values[i] = low


def _run_median(values, start, count):
    """Median of ``count`` sorted values from ``start`` in each column of ``values``."""
    last = values.shape[0] - 1
    low = np.take_along_axis(values, np.clip(start + (count - 1) // 2, 0, last)[None], axis=0)[0]
    high = np.take_along_axis(values, np.clip(start + count // 2, 0, last)[None], axis=0)[0]
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, 0.5 * (low + high), np.nan)


def _median_and_sigma(values, count):
    """Median and 1.4826 x median absolute deviation of each column of sorted ``values``."""
    zero = np.zeros_like(count)
    median = _run_median(values, zero, count)
    with np.errstate(invalid="ignore"):
        deviation = np.abs(values - median)
    deviation[np.isnan(deviation)] = np.inf
    _sort_frames(deviation)
    return median, 1.4826 * _run_median(deviation, zero, count)


def clipped_combine(stack, method="median", nsigma=3.0):
    """Sigma-clipped combination of a stack of images.

    Parameters
    ----------
    stack : numpy.ndarray
        ``(nframes, ny, nx)`` float32; NaN marks missing data. Not changed.
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
        Combined float32 image ``(ny, nx)`` (NaN where no value survived) and the
        number of values used per pixel.
    """
    if method not in COMBINE_METHODS:
        raise ValueError(f"unknown combine method {method!r}; use one of {COMBINE_METHODS}")
    nframes = stack.shape[0]
    flat = stack.reshape(nframes, -1)
    npix = flat.shape[1]
    floor = _sigma_floor(flat)
    combined = np.empty(npix, np.float32)
    used = np.empty(npix, np.int16)
    for begin in range(0, npix, _CHUNK):
        values = flat[:, begin:begin + _CHUNK].copy()
        valid = np.isfinite(values)
        count = valid.sum(axis=0)
        values[~valid] = np.inf
        _sort_frames(values)
        median, sigma = _median_and_sigma(values, count)
        threshold = nsigma * np.maximum(sigma, floor)
        low, high = median - threshold, median + threshold
        start = (values < low).sum(axis=0)
        inside = (values >= low) & (values <= high)
        kept = inside.sum(axis=0)
        if method == "median":
            combined[begin:begin + _CHUNK] = _run_median(values, start, kept)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                combined[begin:begin + _CHUNK] = np.where(inside, values, 0).sum(axis=0) / kept
        used[begin:begin + _CHUNK] = kept
    shape = stack.shape[1:]
    return combined.reshape(shape), used.reshape(shape)


def _sigma_floor(flat):
    """Median over a sparse sample of pixels of the per-pixel robust sigma (> 0)."""
    sample = flat[:, ::max(1, flat.shape[1] // 20000)].copy()
    valid = np.isfinite(sample)
    sample[~valid] = np.inf
    _sort_frames(sample)
    sigma = _median_and_sigma(sample, valid.sum(axis=0))[1]
    sigma = sigma[np.isfinite(sigma)]
    return max(float(np.median(sigma)) if sigma.size else 0.0, 1e-6)
