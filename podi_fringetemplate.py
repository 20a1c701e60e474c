"""Fringe templates and fringe vectors from reduced sky frames (``podi_makecalibrations -fringe``).

A fringe template holds the relative fringe amplitude ``(image - sky) / sky`` of each
OTA: :func:`relative_fringes` makes it for one reduced frame with its sources masked,
:func:`combine_fringe_frames` takes the median of several dithered frames. The
vectors along which :mod:`podi_fringe` measures the fringe scale are chosen on the
template by :func:`choose_fringe_vectors` and written as ds9 regions by
:func:`write_fringe_vectors`, so nobody has to draw them by hand.

Pixel conventions are those of :mod:`podi_fringe`: arrays ``[y, x]`` 0-based, NaN
undefined; vectors in 0-based pixels of the unbinned OTA, region files 1-based.
"""

import math

import numpy as np
from scipy.ndimage import maximum_filter, minimum_filter, uniform_filter
from scipy.spatial import cKDTree

from podi_bpm import write_bpm_regions
from podi_fringe import BOX_SIZE, as_vectors, box_origins, gather_boxes
from podi_stats import robust_statistics

# Source detection of relative_fringes, sizes in unbinned pixels: a smoothing
# smaller than a star, a local background much smaller than a fringe period (so
# fringes do not reach the threshold) yet larger than a star, and a dilation
# that covers the faint wings below the threshold.
_SOURCE_SMOOTHING = 6
_SOURCE_BACKGROUND = 24
_SOURCE_DILATION = 4
_SOURCE_NSIGMA = 3.0

# Vector selection, unbinned pixels: extrema are the lowest or highest point in
# a square of this side; vectors are spread over cells of this side.
_EXTREMUM_SIZE = 40
_SELECTION_SMOOTHING = 2 * BOX_SIZE
_SPREAD_CELL = 512

# Rows of an OTA combined at a time: bounds the temporary memory of the median.
_COMBINE_ROWS = 128


def write_fringe_vectors(path, vectors):
    """Write fringe vectors as a ds9 region file like the real ones.

    Lines are ``# vector(x, y, length, angle) vector=1`` in 1-based ds9 image
    pixels of the unbinned OTA; :func:`read_fringe_vectors` reads them back
    to float precision.

    Parameters
    ----------
    path : str or Path
        File to write (replaced if it exists).
    vectors : array_like
        ``(N, 4)``: ``(x_dark, y_dark, x_bright, y_bright)`` in 0-based unbinned
        OTA pixels.
    """
    vectors = as_vectors(vectors)
    dx = vectors[:, 2] - vectors[:, 0]
    dy = vectors[:, 3] - vectors[:, 1]
    length = np.hypot(dx, dy)
    angle = np.degrees(np.arctan2(dy, dx)) % 360
    write_bpm_regions(path, vectors=zip(vectors[:, 0], vectors[:, 1], length, angle))


def relative_fringes(image, sky, mask_sources=True, binning=1):
    """Relative fringe amplitude ``(image - sky) / sky`` of a reduced OTA.

    Sources are pixels well above their local surroundings: after a
    :data:`_SOURCE_SMOOTHING`-pixel box mean, more than 3 robust standard
    deviations above a :data:`_SOURCE_BACKGROUND`-pixel local mean (computed a
    second time without the first detections, so that bright stars do not
    raise it), dilated by :data:`_SOURCE_DILATION` pixels (sizes unbinned). The
    local mean follows the fringes (low amplitude, periods of hundreds of
    pixels), so they are not masked. Noise peaks are masked too: about 3 % of
    the pixels of a source-free OTA at binning 2 and 5 % at binning 1, which a
    median of several frames does not miss.

    Parameters
    ----------
    image : numpy.ndarray
        Reduced OTA array ``[y, x]`` (bias, dark and flat corrected), data units.
    sky : float or numpy.ndarray
        Sky level in the units of ``image`` (broadcastable to it).
    mask_sources : bool
        Set source pixels to NaN.
    binning : int
        Binning of ``image`` (scales the detection sizes).

    Returns
    -------
    numpy.ndarray
        float32 array of the shape of ``image``: dimensionless relative
        amplitude; NaN where undefined or a source.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = ((image - sky) / sky).astype(np.float32)
    if not mask_sources:
        return relative
    smooth = _nan_box_mean(relative, max(_SOURCE_SMOOTHING // binning, 1))
    background_size = _SOURCE_BACKGROUND // binning
    sources = _sources(smooth, _nan_box_mean(relative, background_size))
    background = _nan_box_mean(np.where(sources, np.nan, relative), background_size)
    sources = _sources(smooth, background)
    radius = max(_SOURCE_DILATION // binning, 1)
    # A square dilation: a separable maximum filter, much faster than binary_dilation.
    sources = maximum_filter(sources, 2 * radius + 1)
    relative[sources] = np.nan
    return relative


def combine_fringe_frames(frames):
    """NaN-ignoring median of the relative fringe arrays of one OTA.

    Parameters
    ----------
    frames : sequence of numpy.ndarray
        Arrays of :func:`relative_fringes` of one OTA, same shape; not changed.
        Sources must differ in position between frames (dithers) to drop out.

    Returns
    -------
    numpy.ndarray
        float32 template (relative amplitude); NaN where no frame has a value.
    """
    frames = list(frames)
    combined = np.empty(frames[0].shape, np.float32)
    # Row blocks: only a block of the stack is held besides the inputs.
    for start in range(0, combined.shape[0], _COMBINE_ROWS):
        block = np.stack([frame[start:start + _COMBINE_ROWS] for frame in frames])
        finite = np.isfinite(block).any(axis=0)
        values = np.full(finite.shape, np.nan, np.float32)
        values[finite] = np.nanmedian(block[:, finite], axis=0)
        combined[start:start + _COMBINE_ROWS] = values
    return combined


def choose_fringe_vectors(template, binning, max_vectors=200, min_length=20.0,
                          max_length=300.0, min_significance=5.0):
    """Choose fringe vectors on a fringe template, strongest contrast first.

    The template is smoothed with a box mean of twice :data:`BOX_SIZE` pixels
    (:data:`_SELECTION_SMOOTHING`). Choosing extrema selects the template's noise
    too: at a minimum chosen on the measurement scale the box's noise is biased low
    by about 1.5 of its sigma, which inflates the template contrast and lowers every
    ratio (3 % for a template of 4 frames). Chosen on a twice smoother template,
    the measured boxes inherit half of that. Dark points are its local minima and bright
    points its local maxima within :data:`_EXTREMUM_SIZE` pixels. Each dark point
    is paired with the brightest bright point between ``min_length`` and
    ``max_length`` pixels away, and each bright point serves at most one pair
    (its strongest). A pair is kept if both measurement boxes lie inside the OTA
    and hold no NaN, and its contrast exceeds ``min_significance`` times the
    noise of the difference of two box medians of the smoothed size. Pairs are
    spread over the OTA by taking, in turn, the strongest remaining pair of each
    :data:`_SPREAD_CELL`-pixel cell. All sizes are unbinned pixels.

    Parameters
    ----------
    template : numpy.ndarray
        Fringe template of one OTA ``[y, x]`` (relative amplitude), NaN = undefined.
    binning : int
        Binning of ``template``.
    max_vectors : int
        Most vectors returned.
    min_length, max_length : float
        Range of vector lengths, unbinned pixels.
    min_significance : float
        Least contrast ``f_bright - f_dark`` in units of its noise.

    Returns
    -------
    numpy.ndarray
        ``(N, 4)`` vectors ``(x_dark, y_dark, x_bright, y_bright)`` in 0-based
        unbinned OTA pixels, ``N <= max_vectors``, by decreasing contrast.
    """
    size = max(_SELECTION_SMOOTHING // binning, 1)
    _, pixel_noise = robust_statistics(template - _nan_box_mean(template, BOX_SIZE // binning), step=2)
    smooth = _nan_box_mean(template, size)
    # Noise of the difference of two box medians of size x size pixels (sqrt(pi/2)
    # x sigma / size each): conservative for box means, and extrema of smoothed
    # noise stand out of the noise more than random points do.
    contrast_noise = math.sqrt(math.pi) * pixel_noise / size
    window = max(_EXTREMUM_SIZE // binning, 3)
    finite = np.isfinite(smooth)
    lowest = minimum_filter(np.where(finite, smooth, np.inf), window)
    highest = maximum_filter(np.where(finite, smooth, -np.inf), window)
    # Strict extrema: in a flat window (a constant template) every pixel would
    # be both, and pairing them all would take the memory.
    dark = _measurable(template, binning, (smooth == lowest) & (highest > smooth))
    bright = _measurable(template, binning, (smooth == highest) & (lowest < smooth))
    if not len(dark) or not len(bright):
        return np.empty((0, 4))
    pairs = cKDTree(dark).sparse_distance_matrix(cKDTree(bright), max_length / binning,
                                                 output_type="ndarray")
    pairs = pairs[pairs["v"] >= min_length / binning]
    dark, bright = dark[pairs["i"]], bright[pairs["j"]]
    contrast = (smooth[bright[:, 1], bright[:, 0]] - smooth[dark[:, 1], dark[:, 0]])
    good = contrast > min_significance * contrast_noise
    dark, bright, contrast = dark[good], bright[good], contrast[good]
    order = np.argsort(-contrast, kind="stable")
    # order runs strongest first, so np.unique's first occurrences keep the
    # strongest pair of each dark point, then of each bright point.
    for points in (dark, bright):
        _, first = np.unique(points[order], axis=0, return_index=True)
        order = order[np.sort(first)]
    order = order[_spread((dark[order] + bright[order]) / 2, _SPREAD_CELL / binning)]
    order = order[:max_vectors]
    order = order[np.argsort(-contrast[order], kind="stable")]
    vectors = np.column_stack([dark[order], bright[order]]).astype(float)
    return (vectors + 0.5) * binning - 0.5


def _nan_box_mean(image, size):
    """Mean of the finite pixels in a ``size`` square around each pixel (NaN if none)."""
    finite = np.isfinite(image)
    total = uniform_filter(np.where(finite, image, 0).astype(np.float32), size, mode="constant")
    count = uniform_filter(finite.astype(np.float32), size, mode="constant")
    # count is a fraction of the box: below half a pixel the box holds no data.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0.5 / size**2, total / count, np.nan).astype(np.float32)


def _sources(smooth, background):
    """Pixels of ``smooth`` more than _SOURCE_NSIGMA robust sigmas above ``background``."""
    excess = smooth - background
    # Every other row and column: the smoothing correlates neighbours anyway.
    _, sigma = robust_statistics(excess, step=2)
    with np.errstate(invalid="ignore"):
        return excess > _SOURCE_NSIGMA * sigma


def _measurable(template, binning, points):
    """``(x, y)`` binned pixels of the True ``points`` whose boxes
    :func:`measure_vectors` can measure: inside the OTA and free of NaN."""
    y, x = np.nonzero(points)
    size = BOX_SIZE // binning
    x0, y0, inside = box_origins((x + 0.5) * binning - 0.5, (y + 0.5) * binning - 0.5,
                                  binning, size, template.shape)
    x, y, x0, y0 = x[inside], y[inside], x0[inside], y0[inside]
    clean = np.isfinite(gather_boxes(template, x0, y0, size)).all(axis=(1, 2))
    return np.column_stack([x[clean], y[clean]])


def _spread(midpoints, cell):
    """Order of pairs (given strongest first) that takes the strongest of each cell in turn.

    ``midpoints`` ``(N, 2)`` and the cell side ``cell`` are in binned pixels.
    """
    _, cell_id = np.unique(np.floor(midpoints / cell), axis=0, return_inverse=True)
    cell_id = cell_id.ravel()
    # Rank of a pair within its cell: its place among the cell's pairs, which a
    # stable sort keeps strongest first.
    by_cell = np.argsort(cell_id, kind="stable")
    sorted_id = cell_id[by_cell]
    rank = np.empty(len(cell_id), np.intp)
    rank[by_cell] = np.arange(len(cell_id)) - np.searchsorted(sorted_id, sorted_id)
    return np.lexsort((np.arange(len(rank)), rank))
