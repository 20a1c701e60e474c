"""Pupil-ghost removal: the template, its centre and scale in a frame, the subtraction.

ODI's optics reflect a broad ring of light, the *pupil ghost*, onto the four central
OTAs 33/34/43/44: a few per cent of the background from about 1100 to 3600 px from
its centre, with a sharp inner edge near 1270 px. It is additive light: in a dome
flat it is a fraction of the lamp, in a science frame the same fraction of the sky.

A pupil-ghost *template* holds the ghost as a fraction of the flat-field level
(flat-field-normalised units) on a coarse grid centred on the ghost
(:class:`GhostTemplate`). It is made from dome flats by
:func:`podi_pupilghosttemplate.fit_flat_ghost` (``podi_makecalibrations -pupilghost``),
which also divides the ghost out of the master flat; science frames reduced with such
a flat show the ghost as ``scale x template`` with ``scale`` close to their sky level.
:class:`PupilGhostCorrection` removes it as a frame-wide correction of
``podi_collectcells -pupilghost=DIR``:

* measure (the worker of each OTA the ghost reaches): clipped-mean profiles of the data
  along radial wedges around the template's nominal centre (:func:`polar_profiles`);
* combine (master): in each wedge the radial shift and amplitude of the (turned)
  template that best fit the data; the shifts of all wedges give the ghost's centre
  (a circle fit), the clipped median of the amplitudes at that centre the frame's
  scale (:func:`fit_ghost`);
* apply (workers): subtract ``scale x template``, rotated by the rotator angle and
  placed at the found centre (:func:`render_template`).

Coordinates
-----------
*Focal-plane coordinates* are unbinned pixels relative to the optical axis, x and y
along the OTA axes (:func:`podi_definitions.ota_origin_in_focal_plane`); the centre
of OTA pixel ``(j, i)`` (0-based, binning ``b``) lies at
``x0 + b j + (b - 1) / 2``, ``y0 + b i + (b - 1) / 2``. Angles are degrees,
counter-clockwise from +x (from +x towards +y). The rotator angle is the raw
``ROTSTART``: the telescope optics, and the ghost with them, appear turned by
``+ROTSTART`` on the detector, so a template made at rotator angle ``a`` is turned by
``ROTSTART - a`` about the ghost's centre before it is subtracted.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from podi_definitions import PIPELINE_NAME, fppos_for_ota, ota_extname, ota_origin_in_focal_plane
from podi_mef import CalibrationError, header_number, open_calibration, write_atomic
from podi_stats import bin_image

logger = logging.getLogger("podi_collectcells")

#: OTAs the ghost falls on.
GHOST_OTAS = (33, 34, 43, 44)
#: Unbinned pixels per pixel of the templates this package writes.
TEMPLATE_STEP = 8.0
#: The ghost's light ends within this radius of its centre (unbinned pixels).
GHOST_OUTER_RADIUS = 3800.0


def rotator_angle(header):
    """``ROTSTART`` in degrees; 0 when absent or ``unknown`` (not a number)."""
    try:
        angle = float(header.get("ROTSTART", 0.0))
    except (TypeError, ValueError):
        return 0.0
    return angle if math.isfinite(angle) else 0.0


def pixel_to_focal_plane(ota, binning, x, y):
    """Focal-plane coordinates of 0-based OTA pixel positions ``x, y`` (binning ``binning``)."""
    x0, y0 = ota_origin_in_focal_plane(ota, 1)
    half = (binning - 1) / 2
    return x0 + binning * np.asarray(x) + half, y0 + binning * np.asarray(y) + half


def focal_plane_to_pixel(ota, binning, x, y):
    """0-based OTA pixel position (binning ``binning``) of focal-plane coordinates."""
    x0, y0 = ota_origin_in_focal_plane(ota, 1)
    half = (binning - 1) / 2
    return (np.asarray(x) - x0 - half) / binning, (np.asarray(y) - y0 - half) / binning


@dataclass
class GhostTemplate:
    """A pupil-ghost template.

    Attributes
    ----------
    image : numpy.ndarray
        ``[y, x]`` float32, the ghost as a fraction of the flat-field level; 0 (or
        NaN, read as 0) where there is none. The ghost's centre is the array's
        centre, pixel ``((n - 1) / 2, (n - 1) / 2)`` (0-based).
    step : float
        Unbinned pixels per template pixel.
    centre : tuple of float
        Focal-plane position of the ghost's centre in the flats the template was
        made from (the nominal centre).
    rotator : float
        ``ROTSTART`` of those flats (degrees).
    radius : float
        Radius of the ghost's sharp inner edge (unbinned pixels).
    """

    image: np.ndarray
    step: float = TEMPLATE_STEP
    centre: tuple = (0.0, 0.0)
    rotator: float = 0.0
    radius: float = float("nan")

    def sample(self, x, y, centre, angle):
        """Template values at focal-plane points for a ghost at ``centre`` turned by ``angle``.

        Parameters
        ----------
        x, y : array_like
            Focal-plane coordinates (unbinned pixels).
        centre : (float, float)
            Where the ghost's centre lies (focal plane).
        angle : float
            Degrees the template is turned by, counter-clockwise.

        Returns
        -------
        numpy.ndarray
            float32, bilinear in the template; 0 outside it.
        """
        theta = math.radians(angle)
        dx, dy = np.asarray(x, float) - centre[0], np.asarray(y, float) - centre[1]
        # The point seen in the template before it was turned by +angle.
        u = (math.cos(theta) * dx + math.sin(theta) * dy) / self.step
        v = (-math.sin(theta) * dx + math.cos(theta) * dy) / self.step
        middle = (np.asarray(self.image.shape) - 1) / 2
        return bilinear(self.image, v + middle[0], u + middle[1])


def bilinear(image, row, column):
    """``image`` interpolated bilinearly at fractional (0-based) positions; 0 outside.

    Returns
    -------
    numpy.ndarray
        float32, of the shape of ``row`` and ``column`` broadcast together.
    """
    row, column = np.broadcast_arrays(row, column)
    low_row, low_column = np.floor(row).astype(np.intp), np.floor(column).astype(np.intp)
    inside = ((low_row >= 0) & (low_row < image.shape[0] - 1)
              & (low_column >= 0) & (low_column < image.shape[1] - 1))
    r, c = np.where(inside, low_row, 0), np.where(inside, low_column, 0)
    fr = (row - r).astype(np.float32)
    fc = (column - c).astype(np.float32)
    top = image[r, c] * (1 - fc) + image[r, c + 1] * fc
    bottom = image[r + 1, c] * (1 - fc) + image[r + 1, c + 1] * fc
    return np.where(inside, top * (1 - fr) + bottom * fr, np.float32(0.0)).astype(np.float32)


def write_template(path, template, otas=GHOST_OTAS, primary_cards=None):
    """Write ``template`` as a pupil-ghost template file (atomically).

    Layout: a primary header (``OBSTYPE = 'PUPILGHOST'``, ``PGSTEP``, ``PGCNTR_X/Y``,
    ``PGROTANG``, ``PGRADIUS`` and ``primary_cards``) and one image extension
    ``OTA<xy>.SCI`` per affected OTA holding the template (``PGTMPL_X/Y``: the
    ghost's centre, 1-based array pixels).
    """
    primary = fits.Header()
    primary["PIPELINE"] = PIPELINE_NAME
    primary["OBSTYPE"] = ("PUPILGHOST", "ghost as a fraction of the flat level")
    for card in (primary_cards or {}).items():
        primary[card[0]] = card[1]
    primary["PGSTEP"] = (float(template.step), "unbinned pixels per template pixel")
    primary["PGCNTR_X"] = (float(template.centre[0]), "nominal ghost centre x (focal plane px)")
    primary["PGCNTR_Y"] = (float(template.centre[1]), "nominal ghost centre y (focal plane px)")
    primary["PGROTANG"] = (float(template.rotator), "ROTSTART of the flats (deg)")
    primary["PGRADIUS"] = (float(template.radius), "inner edge radius (unbinned px)")
    middle = (template.image.shape[1] + 1) / 2, (template.image.shape[0] + 1) / 2
    data = np.asarray(template.image, np.float32)
    hdus = [fits.PrimaryHDU(header=primary)]
    for ota in otas:
        header = fits.Header([("FPPOS", fppos_for_ota(ota)), ("OTA", ota),
                              ("PGTMPL_X", middle[0], "ghost centre x (1-based template px)"),
                              ("PGTMPL_Y", middle[1], "ghost centre y (1-based template px)")])
        hdus.append(fits.ImageHDU(data, header, name=ota_extname(ota)))
    write_atomic(fits.HDUList(hdus), path)


def _unreadable(path, error):
    return CalibrationError(f"{path}: not a readable pupil-ghost template "
                            f"({' '.join(str(error).split())})")


def _open_template(path):
    """The open template file (cached) and its OTA -> extension index."""
    try:
        hdulist, by_ota = open_calibration(path)
    except Exception as error:
        raise _unreadable(path, error) from None
    if not by_ota:
        raise CalibrationError(f"{path}: no OTA<xy>.SCI extension: not a pupil-ghost template")
    return hdulist, by_ota


def _nominal(primary):
    return float(primary.get("PGCNTR_X", 0.0)), float(primary.get("PGCNTR_Y", 0.0))


def nominal_centre(path):
    """The nominal ghost centre (focal plane) of a template file.

    Raises
    ------
    CalibrationError
        The file is not a readable FITS file or has no OTA extension.
    """
    return _nominal(_open_template(path)[0][0].header)


def read_template(path, ota):
    """The template of one OTA from a template file.

    A file without ``PGSTEP``, ``PGCNTR_X/Y`` or ``PGROTANG`` (such as the original
    pipeline's) is read as one unbinned pixel per template pixel, centred on the
    optical axis, made at rotator angle 0.

    Raises
    ------
    CalibrationError
        The file is unreadable, has no extension for the OTA, or lacks ``PGSTEP``.
    """
    hdulist, by_ota = _open_template(path)
    if ota not in by_ota:
        raise CalibrationError(f"{path}: no pupil-ghost template for OTA {ota:02d}")
    primary, hdu = hdulist[0].header, hdulist[by_ota[ota]]
    try:
        # The data are read here: a truncated file fails now.
        data = hdu.data
    except Exception as error:
        raise _unreadable(path, error) from None
    if data is None or data.ndim != 2:
        raise CalibrationError(f"{path}: OTA {ota:02d} holds no image")
    return GhostTemplate(np.nan_to_num(np.array(data, dtype=np.float32), nan=0.0),
                         float(primary.get("PGSTEP", hdu.header.get("PGSTEP", 1.0))), _nominal(primary),
                         float(primary.get("PGROTANG", 0.0)), float(primary.get("PGRADIUS", float("nan"))))


# --- Profiles along radial wedges (measured in the workers) -----------------------------

#: Side of the blocks the image is averaged into before profiles are made (unbinned px).
BLOCK_SIZE = 8
#: Width of a wedge (degrees) and of a radial bin (unbinned px) of the profiles.
WEDGE_WIDTH = 4.0
RADIAL_STEP = 8.0
#: Radii the profiles cover (unbinned px from the trial centre): the ghost and some
#: ghost-free sky on both sides, which fixes each wedge's background.
PROFILE_RADII = (800.0, 3800.0)
#: Blocks further than this many robust standard deviations from the median of
#: their wedge bin (stars, cosmic rays, bad columns) are left out.
BLOCK_CLIP = 4.0


def profile_radii():
    """Middle radius of each radial bin of the profiles (unbinned px)."""
    count = int(round((PROFILE_RADII[1] - PROFILE_RADII[0]) / RADIAL_STEP))
    return PROFILE_RADII[0] + RADIAL_STEP * (np.arange(count) + 0.5)


@dataclass
class GhostProfiles:
    """Profiles of one OTA along radial wedges around a trial centre.

    Attributes
    ----------
    ota : int
    centre : tuple of float
        The trial centre (focal plane) the wedges start from.
    angles : numpy.ndarray
        ``(n_w,)`` middle angle of each wedge (degrees).
    data : numpy.ndarray
        ``(n_w, n_r)`` float32 mean of the blocks in each radial bin of
        :func:`profile_radii` (data units), NaN where there are none.
    weight : numpy.ndarray
        ``(n_w, n_r)`` number of blocks averaged.
    """

    ota: int
    centre: tuple
    angles: np.ndarray
    data: np.ndarray
    weight: np.ndarray


#: Pixels per block (along each axis) that its mean is taken over, at most.
BLOCK_SAMPLES = 4


def block_means(image, ota, binning):
    """Means of :data:`BLOCK_SIZE` blocks of an OTA and their focal-plane centres.

    A block's mean is taken over :data:`BLOCK_SAMPLES` x :data:`BLOCK_SAMPLES`
    evenly spaced pixels of it: the ghost is measured over thousands of blocks, so
    reading every pixel of an unbinned OTA (four times as many) would only cost time.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, numpy.ndarray)
        Block means ``[y, x]`` (NaN where a block has no finite pixel), and the
        focal-plane x (row vector) and y (column vector) of the block centres.
    """
    factor = max(1, BLOCK_SIZE // binning)
    stride = max(1, factor // BLOCK_SAMPLES)
    blocks = bin_image(image[::stride, ::stride], factor // stride)
    # The mean position of the pixels sampled in a block.
    middle = (factor - stride) / 2
    x, _ = pixel_to_focal_plane(ota, binning, factor * np.arange(blocks.shape[1]) + middle, 0)
    _, y = pixel_to_focal_plane(ota, binning, 0, factor * np.arange(blocks.shape[0]) + middle)
    return blocks, x[None, :], y[:, None]


def wedge_profiles(values, x, y, centre, ota=0):
    """Clipped mean profiles of block values along wedges around ``centre``.

    Parameters
    ----------
    values, x, y : numpy.ndarray
        Block values and their focal-plane coordinates (broadcastable).
    centre : (float, float)
        Focal-plane position the wedges start from.

    Returns
    -------
    GhostProfiles
        Only wedges that hold blocks.
    """
    radii = profile_radii()
    n_r, n_w = radii.size, int(round(360 / WEDGE_WIDTH))
    dx, dy = x - centre[0], y - centre[1]
    radius = np.hypot(dx, dy)
    ring = np.floor((radius - PROFILE_RADII[0]) / RADIAL_STEP).astype(np.intp)
    wedge = np.floor(np.degrees(np.arctan2(dy, dx)) % 360 / WEDGE_WIDTH).astype(np.intp) % n_w
    keep = (ring >= 0) & (ring < n_r) & np.isfinite(values)
    bins = (wedge * n_r + ring)[keep]
    kept = np.asarray(values, np.float64)[keep]
    order = np.lexsort((kept, bins))
    bins, kept = bins[order], kept[order]
    # Median of each bin: the middle element of its run in the sorted blocks.
    starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
    counts = np.diff(np.r_[starts, bins.size])
    medians = np.repeat(kept[starts + (counts - 1) // 2], counts)
    deviation = kept - medians
    sigma = 1.4826 * np.median(np.abs(deviation)) if deviation.size else 0.0
    good = np.abs(deviation) <= BLOCK_CLIP * sigma if sigma > 0 else np.ones(kept.size, bool)
    weight = np.bincount(bins[good], minlength=n_w * n_r).reshape(n_w, n_r)
    sums = np.bincount(bins[good], kept[good], minlength=n_w * n_r).reshape(n_w, n_r)
    with np.errstate(invalid="ignore", divide="ignore"):
        data = (sums / weight).astype(np.float32)
    present = weight.sum(axis=1) > 0
    return GhostProfiles(ota, (float(centre[0]), float(centre[1])),
                         ((np.arange(n_w) + 0.5) * WEDGE_WIDTH)[present], data[present],
                         weight[present].astype(np.float32))


def polar_profiles(image, ota, binning, centre):
    """:class:`GhostProfiles` of an OTA image (data units) around a focal-plane ``centre``."""
    values, x, y = block_means(image, ota, binning)
    return wedge_profiles(values, x, y, centre, ota)


# --- Centre and scale of the ghost (in the master) --------------------------------------

#: Radial shifts of the template tried in each wedge (unbinned px): the ghost's
#: centre may lie this far from the template's nominal centre.
SHIFTS = np.arange(-120.0, 121.0, 2.0)
#: A wedge's shift counts when its best amplitude has this significance.
MIN_WEDGE_SIGNIFICANCE = 5.0
#: The centre counts as found with this many wedges and errors below MAX_CENTRE_ERROR px.
MIN_WEDGES = 8
MAX_CENTRE_ERROR = 3.0
#: The frame's scale must exceed its standard error this many times to be subtracted.
MIN_SIGNIFICANCE = 3.0


@dataclass
class GhostFit:
    """Where the ghost is in a frame and how bright.

    Attributes
    ----------
    centre : tuple of float
        Focal-plane position of the ghost's centre (found, or the template's nominal one).
    found : bool
        Whether the centre was found in the data (else the nominal centre is used).
    radius_offset : float
        Ring radius in the data minus that of the template (unbinned px), NaN if not found.
    centre_error : float
        Standard error of each centre coordinate (unbinned px), NaN if not found.
    scale : float
        Data units per template unit; ``error`` its standard error; ``n_wedges`` the
        wedges used.
    ok : bool
        The scale is significant (the ghost is subtracted).
    angle : float
        Degrees the template is turned by (frame's minus template's rotator angle).
    """

    centre: tuple
    found: bool
    radius_offset: float
    centre_error: float
    scale: float
    error: float
    n_wedges: int
    ok: bool
    angle: float


def _template_rays(profiles, template, angle):
    """The template along each wedge's middle ray, on the radii minus every shift.

    Returns ``(n_w, n_shifts, n_r)``: ``rays[w, s, k]`` is the template at radius
    ``radii[k] - SHIFTS[s]`` from the trial centre, i.e. shifted outwards by
    ``SHIFTS[s]``. Each ray is sampled once on a grid of the shifts' step, which
    every shifted radius falls on.
    """
    radii = profile_radii()
    step = SHIFTS[1] - SHIFTS[0]
    fine = np.arange(radii[0] - SHIFTS[-1], radii[-1] - SHIFTS[0] + step / 2, step)
    theta = np.radians(profiles.angles)[:, None]
    ray = template.sample(profiles.centre[0] + fine * np.cos(theta),
                          profiles.centre[1] + fine * np.sin(theta), profiles.centre, angle)
    index = np.rint((radii[None, :] - SHIFTS[:, None] - fine[0]) / step).astype(np.intp)
    return ray[:, index].astype(np.float64)


def _linear_fits(data, weight, model):
    """Weighted fits ``data = background + amplitude x model`` for many models at once.

    ``data``, ``weight``: ``(..., n_r)``; ``model``: ``(..., n_models, n_r)``.
    Returns amplitude, its standard error and chi-square, each ``(..., n_models)``.
    """
    w = np.where(np.isfinite(data), weight, 0.0)[..., None, :]
    d = np.nan_to_num(data)[..., None, :]
    s0, sd, sdd = w.sum(-1), (w * d).sum(-1), (w * d * d).sum(-1)
    st, stt, std = (w * model).sum(-1), (w * model * model).sum(-1), (w * model * d).sum(-1)
    det = s0 * stt - st * st
    with np.errstate(invalid="ignore", divide="ignore"):
        amplitude = (s0 * std - st * sd) / det
        background = (sd - amplitude * st) / s0
        chi2 = sdd - background * sd - amplitude * std
        dof = np.maximum((w > 0).sum(-1) - 2, 1)
        error = np.sqrt(np.maximum(chi2, 0) / dof * s0 / det)
    return amplitude, error, chi2


def _best_shifts(amplitude, error, chi2):
    """Per wedge: the chi-square minimum over :data:`SHIFTS` (parabola-refined), its error."""
    best = np.nanargmin(np.where(np.isfinite(chi2), chi2, np.inf), axis=1)
    inner = np.clip(best, 1, SHIFTS.size - 2)
    rows = np.arange(chi2.shape[0])
    left, middle, right = (chi2[rows, inner + k] for k in (-1, 0, 1))
    curvature = left + right - 2 * middle
    step = SHIFTS[1] - SHIFTS[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = np.where(curvature > 0, 0.5 * (left - right) / curvature, 0.0)
        # chi2 is in data units squared: scale it by the residual variance per weight.
        variance = middle / np.maximum(np.isfinite(chi2).sum(axis=1) - 3, 1)
        shift_error = step * np.sqrt(2 * variance / curvature)
    interior = (best > 0) & (best < SHIFTS.size - 1)
    significant = amplitude[rows, best] > MIN_WEDGE_SIGNIFICANCE * error[rows, best]
    return SHIFTS[inner] + np.clip(offset, -1, 1) * step, shift_error, interior & significant


def _clipped(values, errors=None, nsigma=3.0):
    """Mask of the values kept by iterative clipping at ``nsigma`` x 1.4826 MAD."""
    keep = np.isfinite(values) if errors is None else np.isfinite(values) & np.isfinite(errors)
    while keep.sum() > 2:
        median = np.median(values[keep])
        sigma = 1.4826 * np.median(np.abs(values[keep] - median))
        inside = keep & (np.abs(values - median) <= nsigma * max(sigma, 1e-12))
        if inside.sum() == keep.sum():
            break
        keep = inside
    return keep


def _circle_offset(angles, shifts, errors):
    """Least-squares ``shift = dr + dx cos(angle) + dy sin(angle)`` with clipping.

    Returns ``(dx, dy, dr, centre_error, used)``; NaN where it cannot be fitted.
    """
    theta = np.radians(angles)
    design = np.column_stack([np.ones_like(theta), np.cos(theta), np.sin(theta)])
    keep = np.isfinite(shifts) & np.isfinite(errors) & (errors > 0)
    for _ in range(5):
        if keep.sum() < MIN_WEDGES:
            return math.nan, math.nan, math.nan, math.nan, int(keep.sum())
        weights = 1 / errors[keep] ** 2
        normal = design[keep].T @ (design[keep] * weights[:, None])
        solution = np.linalg.solve(normal, design[keep].T @ (shifts[keep] * weights))
        residual = shifts - design @ solution
        scatter = 1.4826 * np.median(np.abs(residual[keep]))
        inside = keep & (np.abs(residual) <= 3 * max(scatter, 0.5))
        if inside.sum() == keep.sum():
            break
        keep = inside
    covariance = np.linalg.inv(normal)
    # Errors from the scatter of the shifts, not their formal errors alone.
    chi2 = float(np.sum(residual[keep] ** 2 * weights)) / max(keep.sum() - 3, 1)
    centre_error = math.sqrt(max(covariance[1, 1], covariance[2, 2]) * max(chi2, 1.0))
    return solution[1], solution[2], solution[0], centre_error, int(keep.sum())


def fit_ghost(profiles, templates, angle):
    """The ghost's centre and scale in a frame from the wedge profiles of its OTAs.

    In each wedge the data profile is fitted as ``background + amplitude x template``
    with the template shifted radially by each of :data:`SHIFTS`; the best shifts of
    all wedges of all OTAs give the centre's offset from the trial centre (and a
    change of radius) by a weighted, clipped circle fit. The frame's scale is the
    clipped median of the wedges' amplitudes at the shifts the fitted centre implies
    (or at no shift when the centre is not found).

    Parameters
    ----------
    profiles : list of GhostProfiles
        All from the same trial centre.
    templates : dict
        OTA -> :class:`GhostTemplate` of that OTA.
    angle : float
        Degrees the templates are turned by.

    Returns
    -------
    GhostFit
    """
    nominal = profiles[0].centre if profiles else (0.0, 0.0)
    angles, data, weight, rays = [], [], [], []
    for profile in profiles:
        angles.append(profile.angles)
        data.append(profile.data.astype(np.float64))
        weight.append(profile.weight.astype(np.float64))
        rays.append(_template_rays(profile, templates[profile.ota], angle))
    if not angles or not sum(len(a) for a in angles):
        return GhostFit(nominal, False, math.nan, math.nan, math.nan, math.nan, 0, False, angle)
    angles, data, weight, rays = (np.concatenate(v) for v in (angles, data, weight, rays))
    amplitude, error, chi2 = _linear_fits(data, weight, rays)
    shifts, shift_errors, usable = _best_shifts(amplitude, error, chi2)
    dx, dy, dr, centre_error, _ = _circle_offset(
        angles, np.where(usable, shifts, np.nan), np.where(usable, shift_errors, np.nan))
    found = (math.isfinite(centre_error) and centre_error <= MAX_CENTRE_ERROR
             and math.hypot(dx, dy) < SHIFTS[-1] - 10)
    theta = np.radians(angles)
    model_shift = dx * np.cos(theta) + dy * np.sin(theta) if found else np.zeros_like(theta)
    # The template shifted by the model: interpolate each wedge's rays between shifts.
    position = np.interp(model_shift, SHIFTS, np.arange(SHIFTS.size))
    low = np.clip(np.floor(position).astype(int), 0, SHIFTS.size - 2)
    fraction = (position - low)[:, None]
    rows = np.arange(len(angles))
    model = rays[rows, low] * (1 - fraction) + rays[rows, low + 1] * fraction
    wedge_amplitude, wedge_error, _ = _linear_fits(data, weight, model[:, None, :])
    wedge_amplitude, wedge_error = wedge_amplitude[:, 0], wedge_error[:, 0]
    keep = _clipped(wedge_amplitude, wedge_error)
    n = int(keep.sum())
    if n == 0:
        return GhostFit(nominal, False, math.nan, math.nan, math.nan, math.nan, 0, False, angle)
    scale = float(np.median(wedge_amplitude[keep]))
    std = float(np.std(wedge_amplitude[keep], ddof=1)) if n > 1 else math.nan
    # The median of n values is sqrt(pi/2) times noisier than their mean.
    scale_error = math.sqrt(math.pi / 2) * std / math.sqrt(n) if n > 1 else math.nan
    ok = n >= 3 and scale > MIN_SIGNIFICANCE * scale_error
    centre = (nominal[0] + dx, nominal[1] + dy) if found else nominal
    return GhostFit((float(centre[0]), float(centre[1])), bool(found),
                    float(dr) if found else math.nan, float(centre_error) if found else math.nan,
                    scale, scale_error, n, bool(ok), angle)


# --- The ghost on an OTA (subtracted in the workers) ------------------------------------

def ghost_region(ota, binning, shape, centre, margin=0.0):
    """Slices ``(y, x)`` of an OTA array within :data:`GHOST_OUTER_RADIUS` (+ ``margin``,
    unbinned px) of ``centre``, or None when the ghost does not reach the OTA."""
    px, py = focal_plane_to_pixel(ota, binning, centre[0], centre[1])
    reach = (GHOST_OUTER_RADIUS + margin) / binning
    x0, x1 = max(0, int(math.floor(px - reach))), min(shape[1], int(math.ceil(px + reach)) + 1)
    y0, y1 = max(0, int(math.floor(py - reach))), min(shape[0], int(math.ceil(py + reach)) + 1)
    nearest_x, nearest_y = np.clip(px, 0, shape[1] - 1), np.clip(py, 0, shape[0] - 1)
    if x0 >= x1 or y0 >= y1 or math.hypot(px - nearest_x, py - nearest_y) > reach:
        return None
    return slice(y0, y1), slice(x0, x1)


def _interpolation(count, factor):
    """Lower node index and weight of each of ``count`` pixels between nodes ``factor`` apart."""
    position = np.arange(count) / factor
    low = np.floor(position).astype(np.intp)
    return low, (position - low).astype(np.float32)


def render_template(template, ota, binning, region, centre, angle, rows=256):
    """The template on part of an OTA, block by block of rows.

    The template is sampled at nodes :data:`BLOCK_SIZE` unbinned pixels apart
    (:meth:`GhostTemplate.sample`) and interpolated bilinearly between them: the
    ghost changes little over a block, and sampling every pixel would cost ten
    times more.

    Parameters
    ----------
    template : GhostTemplate
    ota, binning : int
    region : tuple of slice
        ``(y, x)`` part of the OTA array (:func:`ghost_region`).
    centre : (float, float)
        Focal-plane position of the ghost's centre.
    angle : float
        Degrees the template is turned by.
    rows : int
        Rows per block.

    Yields
    ------
    (int, numpy.ndarray)
        First row (within ``region``) and the float32 template on those rows.
    """
    factor = max(1, BLOCK_SIZE // binning)
    (y0, y1), (x0, x1) = (region[0].start, region[0].stop), (region[1].start, region[1].stop)
    ny, nx = y1 - y0, x1 - x0
    node_x = x0 + factor * np.arange((nx - 1) // factor + 2)
    node_y = y0 + factor * np.arange((ny - 1) // factor + 2)
    fx, _ = pixel_to_focal_plane(ota, binning, node_x, 0)
    _, fy = pixel_to_focal_plane(ota, binning, 0, node_y)
    nodes = template.sample(fx[None, :], fy[:, None], centre, angle)
    low_x, weight_x = _interpolation(nx, factor)
    along_x = nodes[:, low_x] * (1 - weight_x) + nodes[:, low_x + 1] * weight_x
    low_y, weight_y = _interpolation(ny, factor)
    for start in range(0, ny, rows):
        stop = min(ny, start + rows)
        wy = weight_y[start:stop, None]
        yield start, along_x[low_y[start:stop]] * (1 - wy) + along_x[low_y[start:stop] + 1] * wy


def subtract_ghost(image, template, ota, binning, centre, angle, scale):
    """``image -= scale x template`` where the ghost reaches the OTA; returns the region or None."""
    region = ghost_region(ota, binning, image.shape, centre)
    if region is None:
        return None
    part = image[region]
    factor = np.float32(scale)
    for start, block in render_template(template, ota, binning, region, centre, angle):
        block *= factor
        part[start:start + block.shape[0]] -= block
    return region


# --- The frame-wide correction of podi_collectcells -------------------------------------

class PupilGhostCorrection:
    """Pupil-ghost removal as a frame-wide correction of :mod:`podi_otaphases`.

    ``measure`` (in the worker of each OTA the ghost reaches) makes the OTA's wedge
    profiles around the template's nominal centre; ``combine`` (in the master) finds
    the centre and one clipped scale from all of them (:func:`fit_ghost`); ``apply``
    subtracts ``scale x template``, turned by the rotator angle and placed at that
    centre, from the measured OTAs. An OTA takes part only if its flat field was
    corrected for the ghost (``PGAFCTD = T``, copied from the master flat) or no
    flat was applied: an uncorrected flat divides the ghost out already.

    Parameters
    ----------
    template_file : str or Path
        ``pupilghost_template___level_<L>__bin<b>.fits`` (:func:`write_template`).
    rotator : float
        The frame's rotator angle (``ROTSTART``, degrees).
    """

    name = "pupilghost"

    def __init__(self, template_file, rotator):
        self.template_file = str(Path(template_file).resolve())
        self.rotator = rotator
        self.files_used = {"pupilghost": self.template_file}
        # An unreadable template stops the frame before any OTA is reduced, as an
        # unreadable master does.
        self.nominal = nominal_centre(self.template_file)

    def template(self, ota):
        """The OTA's :class:`GhostTemplate`, or a string saying why there is none."""
        try:
            return read_template(self.template_file, ota)
        except CalibrationError as error:
            return " ".join(str(error).split())

    def takes_part(self, frame):
        """Whether the ghost can reach the OTA (its centre may lie up to the largest of
        :data:`SHIFTS` from the nominal one)."""
        if ghost_region(frame.ota, frame.binning, frame.image.shape, self.nominal,
                        margin=SHIFTS[-1]) is None:
            self._note(frame, "OTA outside the pupil ghost", quiet=True)
            return False
        return True

    def measure(self, frame):
        """The OTA's :class:`GhostProfiles`, or None where the OTA cannot be measured."""
        if "flat" in frame.files_used and not frame.header.get("PGAFCTD", False):
            return self._note(frame, "the flat field is not pupil-ghost corrected (no PGAFCTD): "
                                     "it divided the ghost out, nothing subtracted")
        template = self.template(frame.ota)
        if isinstance(template, str):
            return self._note(frame, f"{template}; ghost not measured")
        return polar_profiles(frame.image, frame.ota, frame.binning, template.centre)

    def combine(self, measurements):
        """Centre and scale from every OTA's profiles: ``(GhostFit or None, keywords)``."""
        profiles = [m for m in measurements.values() if m is not None]
        templates = {p.ota: self.template(p.ota) for p in profiles}
        angle = self.rotator - next(iter(templates.values())).rotator if templates else 0.0
        fit = fit_ghost(profiles, templates, angle)
        keywords = {"PUPLGOST": (Path(self.template_file).name[:68], "pupil-ghost template"),
                    "PUPLGFAC": (header_number(fit.scale), "pupil-ghost scale (BUNIT/template)"),
                    "PUPLGERR": (header_number(fit.error), "standard error of PUPLGFAC"),
                    "PUPLGOK": (fit.ok, "pupil ghost subtracted: scale significant"),
                    "PUPLGFND": (fit.found, "ghost centre found in the data"),
                    "PUPLGCX": (header_number(round(fit.centre[0], 2)), "ghost centre x (focal plane px)"),
                    "PUPLGCY": (header_number(round(fit.centre[1], 2)), "ghost centre y (focal plane px)"),
                    "PUPLGCER": (header_number(fit.centre_error), "error of PUPLGCX/CY (px)"),
                    "PUPLGDR": (header_number(fit.radius_offset), "ring radius minus template's (px)"),
                    "PUPLGROT": (fit.angle, "template turned by (deg)"),
                    "PUPLGNW": (fit.n_wedges, "wedges used for PUPLGFAC")}
        if not profiles:
            logger.warning("-pupilghost: no OTA could be measured; ghost not subtracted")
        elif not fit.ok:
            logger.warning("-pupilghost: scale %.4g +- %.2g from %d wedges is not significant; "
                           "ghost not subtracted (PUPLGOK = F)", fit.scale, fit.error, fit.n_wedges)
        elif not fit.found:
            logger.warning("-pupilghost: ghost centre not found; the template's nominal centre "
                           "(%.1f, %.1f) is used (PUPLGFND = F)", *fit.centre)
        parameters = (fit, sorted(templates)) if fit.ok else None
        return parameters, keywords

    def apply(self, frame, parameters):
        """Subtract the ghost from a measured OTA; record the ``PG*`` keywords."""
        if parameters is None:
            frame.steps.setdefault(self.name, "ghost not subtracted")
            return
        fit, measured = parameters
        if frame.ota not in measured:
            return
        template = self.template(frame.ota)
        region = subtract_ghost(frame.image, template, frame.ota, frame.binning, fit.centre,
                                fit.angle, fit.scale)
        if region is None:
            return
        x, y = focal_plane_to_pixel(frame.ota, frame.binning, *fit.centre)
        header = frame.header
        header["PGCENTER"] = (f"{x + 1:.1f} {y + 1:.1f}", "ghost centre (1-based OTA px)")
        header["PGCNTR_X"] = (round(float(x) + 1, 2), "ghost centre x (1-based OTA px)")
        header["PGCNTR_Y"] = (round(float(y) + 1, 2), "ghost centre y (1-based OTA px)")
        header["PGTMPL_X"] = ((template.image.shape[1] + 1) / 2, "ghost centre x (template px)")
        header["PGTMPL_Y"] = ((template.image.shape[0] + 1) / 2, "ghost centre y (template px)")
        header["PGREG_X1"] = (region[1].start + 1, "first column the ghost was subtracted from")
        header["PGREG_X2"] = (region[1].stop, "last column the ghost was subtracted from")
        header["PGREG_Y1"] = (region[0].start + 1, "first row the ghost was subtracted from")
        header["PGREG_Y2"] = (region[0].stop, "last row the ghost was subtracted from")
        header["PGSCALNG"] = (header_number(fit.scale), "scale of the subtracted template")
        header["PGROTANG"] = (fit.angle, "template turned by (deg)")
        frame.record(self.name, f"{fit.scale:.5g} x template at ({fit.centre[0]:.1f}, "
                                f"{fit.centre[1]:.1f}), turned {fit.angle:g} deg")

    def _note(self, frame, reason, quiet=False):
        """Record why the OTA takes no part; returns None (no measurement)."""
        (logger.debug if quiet else logger.warning)("OTA %02d: %s", frame.ota, reason)
        frame.steps[self.name] = reason
        frame.header.add_history(f"pupilghost: {reason}")
