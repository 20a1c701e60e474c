"""Fringe removal: the fringe scale of a frame at its fringe vectors, and the subtraction.

Red filters (odi_i, odi_z) show fringes: a fixed interference pattern whose
amplitude follows the night-sky lines. A fringe *template* holds the relative
fringe amplitude ``(image - sky) / sky`` of each OTA (dimensionless). The fringe
*scale* of a frame, in data units (ADU) per unit of template, is measured with
fringe *vectors* (method of Snodgrass & Carry 2013, The Messenger 152, 14): pairs of a dark
and a nearby bright fringe point, at which the data and the template are
compared. Fringes are then removed as ``data - scale * template``
(:class:`FringeCorrection`, a frame-wide correction of ``podi_collectcells``).
Templates and vectors are made by :mod:`podi_fringetemplate`.

Pixel conventions
-----------------
Images are numpy arrays ``[y, x]``, 0-based; NaN marks undefined pixels. Vector
coordinates in this module's API are 0-based pixel centres of the *unbinned*
4096x4096 OTA; region files hold ds9 image coordinates, 1-based. At binning
``b`` the unbinned pixel centre ``u`` lies at binned coordinate
``(u + 0.5) / b - 0.5`` (binned pixel ``j`` holds unbinned pixels ``b*j`` to
``b*j + b - 1``). Box sizes are given in unbinned pixels and divided by the
binning.

A box of ``n`` pixels around a point holds the pixels ``p - n//2`` to
``p - n//2 + n - 1`` along each axis, where ``p`` is the pixel nearest to the
point.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from podi_bpm import _parse_regions
from podi_calibfiles import fringe_vectors_name
from podi_definitions import is_guide_ota
from podi_mef import CalibrationError, header_number, read_ota_image
from podi_reduceota import subtract_scaled
from podi_stats import bin_image

logger = logging.getLogger("podi_collectcells")

#: Side of the boxes whose medians are compared, in unbinned pixels.
BOX_SIZE = 20
#: Ratios are kept within (-RATIO_LIMIT, RATIO_LIMIT) before clipping.
RATIO_LIMIT = 1e9
#: A scale is ``ok`` with at least this many ratios kept by the clipping ...
MIN_RATIOS = 3
#: ... and a value above this many times its standard error.
MIN_SIGNIFICANCE = 3.0



class FringeError(ValueError):
    """A fringe-vector file cannot be read (the message names the file)."""


@dataclass(frozen=True)
class VectorMeasurement:
    """Box medians at the fringe vectors of one OTA.

    Attributes
    ----------
    index : numpy.ndarray of int
        Rows of the input vectors that were measured (the others were skipped).
    d_dark, d_bright : numpy.ndarray
        Median of the data in the box at the dark and the bright point (data units).
    f_dark, f_bright : numpy.ndarray
        Mean of the template in the same boxes (relative fringe amplitude).
    ratio : numpy.ndarray
        ``(d_bright - d_dark) / (f_bright - f_dark)``: data units per unit of
        template; NaN or infinite where the template difference is 0.
    n_skipped : int
        Vectors not measured: a box (partly) outside the OTA, or a box without
        any finite pixel in the data or the template.
    """

    index: np.ndarray
    d_dark: np.ndarray
    d_bright: np.ndarray
    f_dark: np.ndarray
    f_bright: np.ndarray
    ratio: np.ndarray
    n_skipped: int


class FringeScale(NamedTuple):
    """Result of :func:`clipped_scale`; unpacks as ``(scale, std, n_used, ok)``."""

    scale: float
    std: float
    n_used: int
    ok: bool

    @property
    def error(self):
        """Standard error of the scale (data units per template unit); NaN below 2 ratios."""
        if self.n_used < 2:
            return math.nan
        # The median of n values is sqrt(pi/2) times noisier than their mean.
        return math.sqrt(math.pi / 2) * self.std / math.sqrt(self.n_used)


def read_fringe_vectors(path):
    """Read the fringe vectors of one OTA from a ds9 region file.

    Each ``vector(x, y, length, angle)`` line, commented (``# vector(...)``, as
    ds9 writes them) or not, is one vector: its start is the dark point and its
    end ``(x + length cos(angle), y + length sin(angle))`` the bright point,
    ``angle`` in degrees, in 1-based ds9 image pixels of the unbinned OTA. Other
    shapes, comments and blank lines are ignored.

    Parameters
    ----------
    path : str or Path
        Region file, e.g. ``fringevectors__odi_i__OTA33.reg``.

    Returns
    -------
    numpy.ndarray
        Float array ``(N, 4)`` of ``(x_dark, y_dark, x_bright, y_bright)`` in
        0-based unbinned OTA pixels; ``(0, 4)`` for a file without vectors.

    Raises
    ------
    FringeError
        If the file is missing, not text, or has a line that is not a ds9 region
        in image coordinates; the one-line message names the file.
    """
    path = Path(path)
    try:
        _, vectors = _parse_regions(path)
    except OSError as error:
        raise FringeError(f"{path}: cannot read fringe vectors "
                          f"({error.strerror or error})") from None
    except ValueError as error:
        # podi_bpm's messages already name the file and line.
        raise FringeError(f"fringe vectors: {error}") from None
    if not vectors:
        return np.empty((0, 4))
    x, y, length, angle = np.array([(v.x, v.y, v.length, v.angle) for v in vectors]).T
    theta = np.radians(angle)
    return np.column_stack([x, y, x + length * np.cos(theta), y + length * np.sin(theta)])


def measure_vectors(image, template, vectors, binning):
    """Box statistics of data and template at the dark and bright end of each vector.

    Boxes are :data:`BOX_SIZE` unbinned pixels wide (10 pixels at binning 2),
    centred on the points (see the module's pixel conventions); NaN pixels are
    ignored.

    Parameters
    ----------
    image : numpy.ndarray
        OTA array ``[y, x]`` in data units, sky included.
    template : numpy.ndarray
        Fringe template of the OTA (relative amplitude), same shape and binning.
    vectors : array_like
        ``(N, 4)`` vectors in 0-based unbinned OTA pixels, as
        :func:`read_fringe_vectors` returns.
    binning : int
        Binning of ``image`` and ``template``.

    Returns
    -------
    VectorMeasurement
        Medians and ratios of the measured vectors and the number skipped.

    Notes
    -----
    The data's boxes give their median (robust to stars and cosmic rays), the
    template's their mean. At a fringe extremum the pixel values of a smooth
    template are skewed, so a template median would lie beyond the mean, while the
    median of noisy data follows the data's mean: with medians on both sides the
    ratio came out 1.5-2 % low for fringe periods of 75-150 unbinned pixels. A
    template holds no stars (they are masked when it is made), so its mean is safe.
    """
    if image.shape != template.shape:
        raise ValueError(f"data of shape {image.shape} and fringe template of shape "
                         f"{template.shape} differ")
    vectors = as_vectors(vectors)
    size = BOX_SIZE // binning
    dark_x, dark_y, inside_dark = box_origins(vectors[:, 0], vectors[:, 1], binning, size,
                                               image.shape)
    bright_x, bright_y, inside_bright = box_origins(vectors[:, 2], vectors[:, 3], binning,
                                                     size, image.shape)
    index = np.flatnonzero(inside_dark & inside_bright)
    # One (4, N, size * size) gather: data and template at both ends.
    boxes = np.stack([
        gather_boxes(array, x[index], y[index], size)
        for array in (image, template)
        for x, y in ((dark_x, dark_y), (bright_x, bright_y))
    ]).reshape(4, len(index), size * size)
    defined = np.isfinite(boxes).any(axis=2).all(axis=0)
    index, boxes = index[defined], boxes[:, defined]
    d_dark, d_bright = np.nanmedian(boxes[:2], axis=2)
    f_dark, f_bright = np.nanmean(boxes[2:], axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (d_bright - d_dark) / (f_bright - f_dark)
    return VectorMeasurement(index, d_dark, d_bright, f_dark, f_bright, ratio,
                             len(vectors) - len(index))


def clipped_scale(ratios, nsigma=3.0):
    """Fringe scale of an OTA or a frame from the ratios of its vectors.

    The finite ratios within ``(-RATIO_LIMIT, RATIO_LIMIT)`` are clipped
    iteratively at ``nsigma`` robust standard deviations (1.4826 x MAD) around
    their median; the scale is the median of the kept ratios.

    Unlike the original pipeline, negative ratios are kept: without fringes the
    ratios scatter around 0, and keeping only the positive half would report a
    spurious positive scale of about 0.7 times their scatter. Instead a scale is
    ``ok`` only if it is significant: at least :data:`MIN_RATIOS` ratios kept and
    ``scale > MIN_SIGNIFICANCE * error``. A frame without fringes thus gives a
    scale consistent with 0 and ``ok = False``.

    Parameters
    ----------
    ratios : array_like
        Ratios of :func:`measure_vectors`, of one OTA or of all OTAs of a frame
        concatenated (data units per unit of template).
    nsigma : float
        Clipping threshold in robust standard deviations.

    Returns
    -------
    FringeScale
        ``(scale, std, n_used, ok)``: median and standard deviation of the kept
        ratios (data units per unit of template, NaN if none), their number and
        whether the scale is significant; ``.error`` is the standard error of
        the scale.
    """
    ratios = np.asarray(ratios, dtype=float).ravel()
    with np.errstate(invalid="ignore"):
        kept = ratios[np.abs(ratios) < RATIO_LIMIT]
    while kept.size:
        median = np.median(kept)
        sigma = 1.4826 * np.median(np.abs(kept - median))
        inside = np.abs(kept - median) <= nsigma * sigma
        if inside.all():
            break
        kept = kept[inside]
    n_used = kept.size
    if not n_used:
        return FringeScale(math.nan, math.nan, 0, False)
    std = float(np.std(kept, ddof=1)) if n_used > 1 else math.nan
    result = FringeScale(float(np.median(kept)), std, n_used, False)
    ok = n_used >= MIN_RATIOS and result.scale > MIN_SIGNIFICANCE * result.error
    return result._replace(ok=bool(ok))


def as_vectors(vectors):
    """``vectors`` as a float ``(N, 4)`` array; ValueError for another shape."""
    vectors = np.asarray(vectors, dtype=float)
    if vectors.size == 0:
        return vectors.reshape(0, 4)
    if vectors.ndim != 2 or vectors.shape[1] != 4:
        raise ValueError(f"fringe vectors must be an (N, 4) array, not {vectors.shape}")
    return vectors


def box_origins(x, y, binning, size, shape):
    """First column and row of the boxes at unbinned points, and whether inside ``shape``."""
    # Pixel nearest to the binned position of the point, then the box's first pixel.
    x0 = np.floor((x + 0.5) / binning).astype(np.intp) - size // 2
    y0 = np.floor((y + 0.5) / binning).astype(np.intp) - size // 2
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + size <= shape[1]) & (y0 + size <= shape[0])
    return x0, y0, inside


def gather_boxes(array, x0, y0, size):
    """``(N, size, size)`` boxes of ``array`` starting at columns ``x0``, rows ``y0``."""
    offsets = np.arange(size)
    rows = (y0[:, None] + offsets)[:, :, None]
    cols = (x0[:, None] + offsets)[:, None, :]
    return array[rows, cols]


# --- The frame-wide correction of podi_collectcells -------------------------------------

class FringeCorrection:
    """Fringe removal as a frame-wide correction of :mod:`podi_otaphases`.

    ``measure`` (in each OTA's worker) compares the OTA with its template at its
    fringe vectors; ``combine`` (in the master) clips all ratios of the frame into
    one scale; ``apply`` (in the workers) subtracts ``scale x template`` from every
    OTA that has a template, guide OTAs included (they are only left out of the
    measurement: their video cells follow no sky). A frame whose scale is not
    significant (no fringes, or no vectors) is left alone, ``FRNG_OK = F``. An OTA
    without a template extension or without vectors gets a note, never an error.

    Parameters
    ----------
    template_file : str or Path
        ``fringe__<FILTER>.fits``: one image extension ``OTA<xy>.SCI`` per OTA (matched
        by ``FPPOS`` or ``EXTNAME``) holding ``(image - sky) / sky``, at the binning of
        the data or unbinned (then block-averaged).
    vector_dir : str or Path
        Folder of ``fringevectors__<FILTER>__OTA<xy>.reg`` (unbinned ds9 pixels).
    filter_name : str
        The raw ``FILTER`` value, which names the vector files.
    binning : int
    """

    name = "fringe"

    def __init__(self, template_file, vector_dir, filter_name, binning):
        self.template_file = str(Path(template_file).resolve())
        self.vector_dir = Path(vector_dir).resolve()
        self.filter_name, self.binning = filter_name, binning
        self.files_used = {"fringemap": self.template_file, "fringevector": str(self.vector_dir)}

    def template(self, ota, shape):
        """The OTA's template, an array of ``shape`` (NaN = undefined), or a string
        saying why there is none.

        A template of the data's binning is the memory map of the file: measuring
        reads only the pages of the vectors' boxes, subtracting streams through it.
        """
        size = shape[0]
        try:
            return read_ota_image(self.template_file, ota, size, mapped=True)[0]
        except CalibrationError as error:
            if self.binning == 1 or "binning does not match" not in str(error):
                return " ".join(str(error).split())
            try:
                return bin_image(read_ota_image(self.template_file, ota, size * self.binning)[0],
                                 self.binning)
            except CalibrationError:
                return " ".join(str(error).split())

    def vector_file(self, ota):
        return self.vector_dir / fringe_vectors_name(self.filter_name, ota)

    def takes_part(self, frame):
        """Every OTA: a template extension, if the file has one, is subtracted from guide
        OTAs too."""
        return True

    def measure(self, frame):
        """Ratios of the OTA's vectors (data units per template unit), or None."""
        if is_guide_ota(str(frame.primary.get("CELLMODE", ""))):
            return self._note(frame, "guide OTA, fringes not measured")
        template = self.template(frame.ota, frame.image.shape)
        if isinstance(template, str):
            return self._note(frame, f"{template}; fringes not measured")
        path = self.vector_file(frame.ota)
        if not path.is_file():
            return self._note(frame, f"no fringe vectors {path}; fringes not measured")
        try:
            vectors = read_fringe_vectors(path)
        except FringeError as error:
            return self._note(frame, f"{error}; fringes not measured")
        measured = measure_vectors(frame.image, template, vectors, self.binning)
        scale = clipped_scale(measured.ratio)
        frame.header["FRNG_SCL"] = (header_number(scale.scale), "fringe scale of this OTA (BUNIT/template)")
        frame.header["FRNG_STD"] = (header_number(scale.std), "std of the clipped vector ratios")
        frame.header["FRNG_OK"] = (scale.ok, "significant fringe scale in this OTA")
        frame.header["FRNG_NV"] = (scale.n_used, "fringe vectors used in this OTA")
        frame.header.add_history(f"fringe: {scale.n_used} of {len(measured.index) + measured.n_skipped} "
                                 f"vectors measured, scale {scale.scale:.4g}")
        return measured.ratio.astype(np.float32)

    def combine(self, measurements):
        """One clipped scale from the ratios of every OTA; returns (scale or None, keywords)."""
        ratios = [ratio for ratio in measurements.values() if ratio is not None]
        scale = clipped_scale(np.concatenate(ratios) if ratios else [])
        keywords = {"FRNG_SCL": (header_number(scale.scale), "fringe scale of the frame (BUNIT/template)"),
                    "FRNG_ERR": (header_number(scale.error), "standard error of FRNG_SCL"),
                    "FRNG_STD": (header_number(scale.std), "std of the clipped vector ratios"),
                    "FRNG_OK": (scale.ok, "fringes subtracted: scale significant"),
                    "FRNG_NV": (scale.n_used, "fringe vectors used in the frame")}
        if not scale.ok:
            logger.warning(
                "-fringe: scale %.4g +- %.2g from %d vectors is not significant; fringes not "
                "subtracted (FRNG_OK = F)", scale.scale, scale.error, scale.n_used)
        return (scale.scale if scale.ok else None), keywords

    def apply(self, frame, scale):
        """Subtract ``scale x template`` from the OTA's pixels."""
        if scale is None:
            frame.steps[self.name] = "scale not significant"
            return
        template = self.template(frame.ota, frame.image.shape)
        if isinstance(template, str):
            self._note(frame, f"{template}; fringes not subtracted")
            return
        # Undefined template pixels carry no fringe to subtract.
        subtract_scaled(frame.image, template, scale, undefined_as_zero=True)
        frame.record(self.name, f"subtracted {scale:.4g} x {self.template_file}")

    def _note(self, frame, reason):
        """Log and record why the OTA is left alone; returns None (no measurement)."""
        logger.warning("OTA %02d: %s", frame.ota, reason)
        frame.steps[self.name] = reason
        frame.header.add_history(f"fringe: {reason}")

