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
