"""Quick-look measurements of a reduced OTA, for the QA page of the frame.

Each worker measures its OTA on the final pixels (:func:`ota_quicklook`, a few
milliseconds): a binned preview image, which preview pixels hold saturated data, and
the sky level of every cell. The master places the OTAs' previews in the focal plane
(:func:`focal_plane_mosaic`) for the ``preview`` plot of :mod:`podi_plots`.

Pixel conventions: arrays are ``[y, x]`` in the orientation of the OTA array (row 0
at the bottom, as FITS shows it); a preview pixel is the mean of a square block of
``block`` data pixels, sampled on a grid of :data:`SAMPLES_PER_BLOCK` x
:data:`SAMPLES_PER_BLOCK` pixels inside it: a star (FWHM of 8 or more unbinned
pixels) still falls on samples, at a sixteenth of the cost of every pixel.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np

from podi_definitions import (N_CELLS, OTA_PITCH, cell_geometry, cell_to_ota,
                              ota_origin_in_focal_plane)

#: The focal-plane preview is about this many pixels across.
PREVIEW_WIDTH = 1000
#: Pixels sampled along each axis of a preview block.
SAMPLES_PER_BLOCK = 8
#: The sky of a cell is the median of every this many unbinned pixels along each axis
#: (about 3,700 pixels of a cell).
CELL_SAMPLE_STEP = 8


@dataclass
class QuickLook:
    """What the QA page shows of one OTA; small enough to travel between processes.

    Attributes
    ----------
    preview : numpy.ndarray
        float32 ``[y, x]``: block means (BUNIT); NaN where a block holds no data.
    saturated : numpy.ndarray
        bool ``[y, x]``: the block holds a sample at or above the saturation level.
    cell_sky : numpy.ndarray
        float ``[row, col]`` (8 x 8, row 0 at the bottom of the OTA): median of each
        cell's sampled pixels (BUNIT); NaN for a cell without data.
    block : int
        Data pixels per preview pixel along each axis.
    """

    preview: np.ndarray
    saturated: np.ndarray
    cell_sky: np.ndarray
    block: int


def preview_block(otas, binning):
    """Data pixels per preview pixel for a focal plane of these OTAs.

    A power of two (it divides the OTA size), so that the OTAs' columns span about
    :data:`PREVIEW_WIDTH` preview pixels.

    Parameters
    ----------
    otas : iterable of int
        OTA numbers (xy) of the camera layout.
    binning : int
        Binning of the data.
    """
    columns = {ota // 10 for ota in otas}
    width = (max(columns) - min(columns) + 1) * OTA_PITCH[0]
    unbinned = 2 ** round(math.log2(width / PREVIEW_WIDTH))
    return max(1, unbinned // binning)


def _samples(image, block):
    """The sampled pixels of each block: ``[by, bx, SAMPLES_PER_BLOCK ** 2]`` (fewer
    samples per block when a block is smaller than that)."""
    step = max(1, block // SAMPLES_PER_BLOCK)
    per_block = block // step
    n = image.shape[0] // block
    sampled = image[:n * block:step, :n * block:step]
    return sampled.reshape(n, per_block, n, per_block).swapaxes(1, 2).reshape(n, n, -1)


def ota_quicklook(image, binning, block, saturation):
    """Preview, saturated blocks and cell sky levels of one reduced OTA.

    Parameters
    ----------
    image : numpy.ndarray
        The OTA array ``[y, x]`` (BUNIT), NaN where undefined.
    binning : int
    block : int
        :func:`preview_block`.
    saturation : float
        Lowest saturated level (BUNIT).

    Returns
    -------
    QuickLook
    """
    samples = _samples(image, block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks and cells
        preview = np.nanmean(samples, axis=2).astype(np.float32)
        # NaN compares False: undefined samples are never saturated.
        saturated = (samples >= saturation).any(axis=2)
    cell_sky = np.full((N_CELLS, N_CELLS), np.nan)
    step = max(1, CELL_SAMPLE_STEP // binning)
    for cy in range(N_CELLS):
        for cx in range(N_CELLS):
            rows, cols = cell_to_ota(cx, cy, binning)
            pixels = image[rows.start:rows.stop:step, cols.start:cols.stop:step]
            pixels = pixels[np.isfinite(pixels)]
            if pixels.size:
                # Cell row cy = 0 is at the top of the OTA array.
                cell_sky[N_CELLS - 1 - cy, cx] = np.median(pixels)
    return QuickLook(preview=preview, saturated=saturated, cell_sky=cell_sky, block=block)


@dataclass
class Mosaic:
    """The OTAs' previews in their places in the focal plane.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``[y, x]``; NaN in the gaps, where an OTA is undefined, and where no
        OTA was reduced.
    saturated : numpy.ndarray
        bool ``[y, x]``.
    boxes : dict
        OTA number -> ``(x0, y0, size)``: lower left corner and side of the OTA in
        mosaic pixels, for every OTA asked for (reduced or not).
    """

    image: np.ndarray
    saturated: np.ndarray
    boxes: dict


def focal_plane_mosaic(quicklooks, otas, binning, block):
    """Place the previews of the reduced OTAs in the focal plane (x to the right, as
    the focal-plane x of :func:`podi_definitions.ota_origin_in_focal_plane`).

    Parameters
    ----------
    quicklooks : dict
        OTA -> :class:`QuickLook` of the reduced OTAs.
    otas : iterable of int
        Every OTA to leave room for (reduced, failed or missing).
    binning, block : int
        The data's binning and :func:`preview_block`.

    Returns
    -------
    Mosaic
    """
    size = cell_geometry(binning).ota_size // block
    origins = {ota: ota_origin_in_focal_plane(ota, binning * block) for ota in otas}
    x_min = min(x for x, _ in origins.values())
    y_min = min(y for _, y in origins.values())
    boxes = {ota: (round(x - x_min), round(y - y_min), size) for ota, (x, y) in origins.items()}
    width = max(x for x, _, _ in boxes.values()) + size
    height = max(y for _, y, _ in boxes.values()) + size
    image = np.full((height, width), np.nan, np.float32)
    saturated = np.zeros((height, width), bool)
    for ota, look in quicklooks.items():
        x0, y0, _ = boxes[ota]
        image[y0:y0 + size, x0:x0 + size] = look.preview
        saturated[y0:y0 + size, x0:x0 + size] = look.saturated
    return Mosaic(image=image, saturated=saturated, boxes=boxes)
