"""Sky level and pixel noise of an OTA from random source-free boxes, and of the frame.

No source detection is needed: each box's level is a sigma-clipped
mean of its pixels, which ignores the few star pixels a box may hold; boxes that
touch undefined pixels (cell gaps, masked regions) are rejected.
"""

import math

import numpy as np

from podi_definitions import (FULL_FIELD_FILTERS, is_guide_ota, layout_for_mjd,
                              normalised_filter_name)

#: Box side in unbinned pixels, number of boxes wanted, attempts allowed.
BOX_SIZE = 60
N_BOXES = 200
MAX_ATTEMPTS = 600


def _clipped_box_stats(boxes, nsigma=3.0):
    """Sky level and pixel noise of each box (rows of ``boxes``, no NaN).

    The level is the mean of the pixels within ``nsigma`` robust standard
    deviations (1.4826 x MAD) of the box median: star pixels are clipped, and the
    mean of the rest is less noisy than their median.
    """
    # The clip's centre and width from every 4th pixel; the mean uses all of them.
    sample = boxes[:, ::4]
    median = np.median(sample, axis=1, keepdims=True)
    sigma = 1.4826 * np.median(np.abs(sample - median), axis=1, keepdims=True)
    keep = np.abs(boxes - median) <= nsigma * sigma
    level = np.sum(np.where(keep, boxes, 0.0), axis=1) / keep.sum(axis=1)
    return level, sigma[:, 0]


def sky_samples(image, binning=1, seed=0):
    """Measure the sky in random boxes of an OTA array.

    Parameters
    ----------
    image : numpy.ndarray
        OTA array ``[y, x]``; NaN = no data.
    binning : int
        Boxes are ``60 / binning`` pixels wide, centres at least half a box from
        the edges.
    seed : int
        Seed of the box positions (the result is reproducible).

    Returns
    -------
    numpy.ndarray
        Structured array with fields ``x``, ``y`` (box centre, 0-based pixels),
        ``level`` (clipped mean) and ``noise`` (1.4826 x MAD of the pixels), in
        the image's units; at most :data:`N_BOXES` rows.
    """
    half = BOX_SIZE // (2 * binning)
    size = image.shape[0]
    rng = np.random.default_rng(seed)
    x = rng.integers(half, size - half, MAX_ATTEMPTS)
    y = rng.integers(half, size - half, MAX_ATTEMPTS)
    offsets = np.arange(-half, half)
    rows = (y[:, None] + offsets[None, :])[:, :, None]
    cols = (x[:, None] + offsets[None, :])[:, None, :]
    boxes = image[rows, cols].reshape(MAX_ATTEMPTS, -1)
    good = np.isfinite(boxes).all(axis=1)
    x, y, boxes = x[good][:N_BOXES], y[good][:N_BOXES], boxes[good][:N_BOXES]
    samples = np.zeros(len(x), dtype=[("x", "i4"), ("y", "i4"), ("level", "f8"), ("noise", "f8")])
    if len(x):
        samples["x"], samples["y"] = x, y
        samples["level"], samples["noise"] = _clipped_box_stats(boxes.astype(np.float64))
    return samples


def sky_statistics(samples):
    """``(median, mean, std)`` of the box levels, or NaNs without samples."""
    levels = samples["level"][np.isfinite(samples["level"])]
    if not levels.size:
        return np.nan, np.nan, np.nan
    return float(np.median(levels)), float(np.mean(levels)), float(np.std(levels))


def global_sky(results, first_header):
    """Median sky level and pixel noise over the OTAs used for photometry (BUNIT).

    ``results`` maps OTA -> an object with ``header`` and ``sky_samples``
    (:class:`podi_otaphases.OTAResult`).

    Full-field filters use every OTA, others the central 3x3; guide OTAs never.
    """
    layout = layout_for_mjd(first_header.get("MJD-OBS", 0.0))
    full_field = normalised_filter_name(first_header) in FULL_FIELD_FILTERS
    chosen = [r for ota, r in results.items()
              if (full_field or ota in layout.central_3x3)
              and not is_guide_ota(str(r.header.get("CELLMODE", "")))] or list(results.values())
    samples = np.concatenate([r.sky_samples for r in chosen])
    if not len(samples):
        return math.nan, math.nan
    return float(np.median(samples["level"])), float(np.median(samples["noise"]))
