"""Image statistics shared by the reduction steps."""

import numpy as np


def bin_image(image, factor):
    """Mean of ``factor x factor`` blocks (NaN-ignoring; trailing pixels dropped)."""
    ny, nx = (s // factor for s in image.shape)
    blocks = image[:ny * factor, :nx * factor].reshape(ny, factor, nx, factor)
    with np.errstate(invalid="ignore"):
        sums = np.nansum(blocks, axis=(1, 3), dtype=np.float64)
        counts = np.isfinite(blocks).sum(axis=(1, 3))
        return (sums / np.where(counts, counts, np.nan)).astype(np.float32)


def robust_statistics(image, step=1):
    """Median and robust standard deviation of the finite pixels of an image.

    Parameters
    ----------
    image : numpy.ndarray
    step : int
        Use every ``step``-th pixel along each axis (a fast estimate of a large image).

    Returns
    -------
    (float, float)
        Median and 1.4826 x median absolute deviation (units of ``image``); NaN for
        an image without finite pixels.
    """
    values = image[::step, ::step]
    values = values[np.isfinite(values)]
    if not values.size:
        return np.nan, np.nan
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))
