"""Astrometric calibration of a frame (``-fixwcs``): match sources to a reference catalog.

:func:`solve_wcs` takes the sources detected on every OTA (pixel positions), the
initial TPV WCS of every OTA (canned distortion + header pointing, as collectcells
writes it) and a reference catalog, and returns refined headers plus the original's
quality keywords (``WCS_NSRC``, ``WCS_RMS*``, ``WCS_ERR*``, ``WCS_SIG*`` of the matched
residuals). It is more robust than the original ``ccmatch`` (a rotation/shift grid
search on raw RA/Dec differences, then per-OTA shift and shear fits):

1. Every source goes through its OTA's initial WCS to RA/Dec and, with the reference
   stars, onto one tangent plane (true gnomonic projection, :func:`podi_sphere.project`,
   so high declinations and RA 0/360 need no special care) about the centre of the frame.
2. Offset-density voting over a grid of rotator angles: for each angle the sources are
   rotated about the tangent point and every source-reference difference within the
   maximum offset votes in a 2" histogram. The best (angle, offset) is the highest
   peak; its *contrast* is the peak over the highest peak elsewhere in the same
   histogram. Without contrast the search is repeated once with twice the offset.
3. Matching within a few arcsec and an iterative 3-sigma-clipped least-squares fit of
   shift + rotation + scale for the whole frame.
4. Per OTA with enough matches: a clipped fit of the shift, then of shift + CD (six
   parameters; ``CRPIX`` and the ``PV`` distortion terms stay fixed); other OTAs keep
   the frame solution.
5. Final match through the refined headers (evaluated by astropy) and statistics.

A failure (too few sources or reference stars, no contrast, a solution that does not
match well) never raises: the result has ``success = False``, the initial headers,
``WCSCAL = False``, ``WCSMSG`` (why) and a logged warning.

Conventions
-----------
Pixel positions are 0-based (the centre of the first pixel is (0, 0)); ``CRPIX`` is
1-based as in FITS. Tangent-plane coordinates (xi, eta) are in degrees, xi growing
to the east (along RA), eta to the north. Offsets and residuals are reported in
arcsec on the sky, i.e. RA differences are multiplied by cos(Dec).
"""

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

import podi_definitions as pd
from podi_mef import text_keyword
from podi_sphere import deproject, match_nearest, mean_direction, project, wrap_180

logger = logging.getLogger(__name__)

#: Fewer detected sources than this (all OTAs together) cannot give a solution that
#: can be checked: a similarity transform has 4 parameters, and the check needs spares.
MIN_SOURCES = 8
#: Fewer reference stars within the search area of the sources: no catalog coverage.
MIN_REFERENCE = 8
#: Fewer matched pairs than this in the voting peak or in the final match: failure.
MIN_MATCHES = 8
#: Minimum contrast of the voting peak. For unrelated catalogs the best peak is a
#: Poisson maximum and barely beats the next one: at most 1.7 in 32 simulated fields
#: with 300-8000 stars/deg^2. True matches gave 14 (300 stars/deg^2) to 37. 4 keeps a
#: wide margin on both sides; the original used 3 (``min_wcs_quality``) for a ratio
#: of scores between rotation angles.
MIN_CONTRAST = 4.0
#: Largest acceptable rms (arcsec) of the final matched residuals: a wrong solution
#: matches only chance pairs, spread over the whole matching radius (rms ~ 1.4").
MAX_RMS_ARCSEC = 0.5
#: Bin of the offset histogram (arcsec). Peaks are taken from 2x2 bin sums, so a
#: cluster of matches is caught whole wherever it falls relative to the bin edges.
VOTE_BIN_ARCSEC = 2.0
#: Coarse rotator grid step (degrees): at the edge of the pODI field (~0.35 deg from
#: the centre) 0.1 deg moves a star by 2.2", about one 2x2 vote window.
ANGLE_STEP_DEG = 0.1
#: Fine grid about the coarse best angle (degrees).
FINE_ANGLE_STEP_DEG = 0.02
#: Sub-sample limits for the voting (only): beyond them the vote costs time without
#: improving the contrast, which is already large for thousands of stars.
MAX_VOTE_SOURCES = 800
MAX_VOTE_REFERENCE = 3000
#: Minimum matches on an OTA for its own shift + CD fit.
MIN_OTA_MATCHES = 10
#: Largest relative change of an OTA's CD matrix against the frame solution that a
#: per-OTA fit may make (optics and detectors do not move by more than that).
MAX_CD_CHANGE = 0.01
#: Outlier rejection threshold (in units of the per-axis sigma).
CLIP_SIGMA = 3.0
#: Floor of that sigma (arcsec), so noiseless data keep all points.
SIGMA_FLOOR_ARCSEC = 1e-3

_MAX_FIT_ITERATIONS = 20
_CONVERGED_DEG = 1e-10  # tangent-point shift (deg, 0.4 micro-arcsec) ending the iteration
_GRID_POINTS = 9  # per axis, grid that turns the frame solution into OTA headers


@dataclass
class WcsSolution:
    """Result of :func:`solve_wcs`.

    Attributes
    ----------
    success : bool
        True if the frame was calibrated (``WCSCAL``).
    headers : dict
        OTA -> astropy Header with the refined WCS (the initial headers, copied,
        when ``success`` is False).
    keywords : dict
        Primary-header keyword -> (value, comment).
    ota_keywords : dict
        OTA -> dict of keyword -> (value, comment) for that OTA's extension.
    matches : astropy.table.Table
        ``WCSCAL.CAT``: ``ODI_RA ODI_DEC REF_RA REF_DEC`` (deg, ODI through the refined
        WCS) and ``OTA`` of the pairs behind the statistics.
    reference : astropy.table.Table
        ``CAT.WCSREF``: ``RA DEC`` (deg) of the reference stars in the search area.
    message : str
        Why the calibration failed, or a one-line summary.
    """

    success: bool
    headers: dict
    keywords: dict
    ota_keywords: dict = field(default_factory=dict)
    matches: Table = None
    reference: Table = None
    message: str = ""


# --- TPV distortion ----------------------------------------------------------------------

def _tpv_terms(x, y, order):
    """TPV basis T_0, T_1, ... of (x, y) up to polynomial order, in the order of the TPV
    convention (SCAMP's TAN + PV): per order n the terms x^n, x^(n-1) y, ..., y^n, then
    r^n for odd n."""
    r = np.hypot(x, y)
    terms = [np.ones_like(x)]
    for degree in range(1, order + 1):
        terms.extend(x ** (degree - k) * y ** k for k in range(degree + 1))
        if degree % 2:
            terms.append(r ** degree)
    return terms


def _n_tpv_terms(order):
    """Number of TPV terms up to a polynomial order (order 3: T_0 .. T_11, i.e. 12)."""
    return 1 + sum(degree + 1 + degree % 2 for degree in range(1, order + 1))


class _Tpv:
    """The PV polynomial of one header: intermediate (x', y') -> standard (xi, eta), deg."""

    def __init__(self, header):
        self.identity = not str(header.get("CTYPE1", "")).endswith("TPV")
        self.coefficients = np.zeros((2, 40))
        if self.identity:
            return
        for axis in (1, 2):
            for term in range(40):
                self.coefficients[axis - 1, term] = header.get(f"PV{axis}_{term}", 0.0)
        # The polynomial would map everything to a constant without a linear term;
        # wcslib then uses the identity, and so does this class.
        if not self.coefficients[:, 1].any():
            self.coefficients[:, 1] = 1.0
        # Only the terms up to the highest order used are evaluated.
        last = int(np.max(np.nonzero(self.coefficients)[1]))
        self.order = next(n for n in range(8) if _n_tpv_terms(n) > last)

    def forward(self, x, y):
        if self.identity:
            return x, y
        xi = sum(c * t for c, t in zip(self.coefficients[0], _tpv_terms(x, y, self.order)) if c)
        eta = sum(c * t for c, t in zip(self.coefficients[1], _tpv_terms(y, x, self.order)) if c)
        return xi, eta

    def inverse(self, xi, eta):
        """Intermediate coordinates of standard coordinates, by fixed-point iteration.

        The distortion is a few percent, so each step shrinks the error about 30 times.
        """
        if self.identity:
            return xi, eta
        x, y = xi.copy(), eta.copy()
        for _ in range(50):
            fx, fy = self.forward(x, y)
            dx, dy = xi - fx, eta - fy
            x, y = x + dx, y + dy
            if np.nanmax(np.abs(np.concatenate([dx, dy])), initial=0.0) < 1e-13:
                break
        return x, y


def pixel_to_sky(header, x, y):
    """RA, Dec (deg) of 0-based pixel positions through a TAN or TPV header.

    The same mapping as astropy's ``WCS(header).all_pix2world(x, y, 0)`` (CD matrix,
    PV polynomial, gnomonic projection about CRVAL) without building a wcslib
    object, which costs tens of milliseconds per header.
    """
    dx = np.asarray(x, float) - (header["CRPIX1"] - 1.0)
    dy = np.asarray(y, float) - (header["CRPIX2"] - 1.0)
    cd = _cd(header)
    xi, eta = _Tpv(header).forward(cd[0, 0] * dx + cd[0, 1] * dy, cd[1, 0] * dx + cd[1, 1] * dy)
    return deproject(xi, eta, header["CRVAL1"], header["CRVAL2"])


# --- Least squares -----------------------------------------------------------------------

def _clipped_lstsq(design, target):
    """Least squares with iterative outlier rejection.

    Parameters
    ----------
    design : ndarray, shape (2 n, p)
        Rows 0..n-1 are the first coordinate of n points, rows n..2n-1 the second.
    target : ndarray, shape (2 n,)
        Observed coordinates (arcsec, so that the sigma floor applies).

    Returns
    -------
    params : ndarray or None
        None if the remaining points do not determine the parameters.
    keep : ndarray of bool, shape (n,)
        Points used in the final fit.
    """
    n_axes = 2
    n = len(target) // n_axes
    keep = np.ones(n, bool)
    params = None
    for _ in range(_MAX_FIT_ITERATIONS):
        rows = np.tile(keep, n_axes)
        params, _, rank, _ = np.linalg.lstsq(design[rows], target[rows], rcond=None)
        if rank < design.shape[1]:
            return None, keep
        residual = (target - design @ params).reshape(n_axes, n)
        radius2 = np.sum(residual**2, axis=0)
        # For 2-d Gaussian residuals r^2 / sigma^2 is chi^2 with 2 degrees of freedom,
        # median 2 ln 2: a robust per-axis sigma even with many outliers.
        sigma = max(math.sqrt(np.median(radius2[keep]) / (2 * math.log(2))), SIGMA_FLOOR_ARCSEC)
        new_keep = radius2 <= (CLIP_SIGMA * sigma) ** 2
        if np.array_equal(new_keep, keep) or new_keep.sum() * n_axes <= design.shape[1]:
            break
        keep = new_keep
    return params, keep


def _fit_similarity(src, ref):
    """Fit ref = s R(theta) src + t (plane coordinates in arcsec), clipped.

    Returns
    -------
    params : ndarray (a, b, tx, ty) with a = s cos(theta), b = s sin(theta), or None
    keep : ndarray of bool
    """
    x, y = src
    one, zero = np.ones_like(x), np.zeros_like(x)
    design = np.vstack([np.column_stack([x, -y, one, zero]), np.column_stack([y, x, zero, one])])
    return _clipped_lstsq(design, np.concatenate(ref))


def _apply_similarity(params, x, y):
    a, b, tx, ty = params
    return a * x - b * y + tx, b * x + a * y + ty


# --- Per-OTA headers -----------------------------------------------------------------------

def _cd(header):
    return np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])


def fit_header(header, x, y, ra, dec, free_cd=True, clip=True):
    """Refit ``CRVAL`` (and ``CD``) of a TPV header so pixels map onto given sky positions.

    ``CRPIX`` and the ``PV`` terms stay fixed. The reference positions are projected
    about the current ``CRVAL`` and taken back through the distortion polynomial, where
    the model is linear in the parameters; the fitted shift moves the tangent point and
    the projection is repeated until that shift vanishes.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Starting WCS (not modified).
    x, y : ndarray
        0-based pixel positions.
    ra, dec : ndarray
        Their sky positions (deg).
    free_cd : bool
        Fit the CD matrix as well (6 parameters) instead of the shift only.
    clip : bool
        Reject outliers (3-sigma, iterated).

    Returns
    -------
    header : astropy.io.fits.Header or None
        The refined copy; None if the points do not determine the parameters.
    keep : ndarray of bool
        Points used.
    """
    header = header.copy()
    tpv = _Tpv(header)
    dx = np.asarray(x, float) - (header["CRPIX1"] - 1.0)
    dy = np.asarray(y, float) - (header["CRPIX2"] - 1.0)
    # Centred pixel coordinates keep the 6-parameter system well conditioned although
    # CRPIX (the optical axis) lies far outside most OTAs.
    cx, cy = np.mean(dx), np.mean(dy)
    keep = np.ones(len(dx), bool)
    for _ in range(_MAX_FIT_ITERATIONS):
        xi, eta = project(ra, dec, header["CRVAL1"], header["CRVAL2"])
        u, v = tpv.inverse(xi, eta)
        # All points every time: outliers are judged against the converged model, not
        # against a linearisation about a tangent point that is still far off.
        params, keep = _fit_linear(_cd(header), dx - cx, dy - cy, u, v, free_cd, clip)
        if params is None:
            return None, np.zeros(len(dx), bool)
        matrix, centre = params
        # Intermediate coordinates of CRPIX: the tangent point moves there.
        shift = centre - matrix @ np.array([cx, cy])
        crval1, crval2 = deproject(shift[0], shift[1], header["CRVAL1"], header["CRVAL2"])
        header["CRVAL1"], header["CRVAL2"] = float(crval1), float(crval2)
        (header["CD1_1"], header["CD1_2"]), (header["CD2_1"], header["CD2_2"]) = matrix
        if np.max(np.abs(shift)) < _CONVERGED_DEG:
            break
    return header, keep


def _fit_linear(cd, px, py, u, v, free_cd, clip):
    """Fit intermediate coordinates (u, v) = M (px, py) + c (deg); M = cd unless free_cd.

    Returns ((M, c), points used) or (None, None).
    """
    one, zero = np.ones_like(px), np.zeros_like(px)
    deg_to_arcsec = 3600.0
    if free_cd:
        design = np.vstack([np.column_stack([px, py, zero, zero, one, zero]),
                            np.column_stack([zero, zero, px, py, zero, one])])
        target = np.concatenate([u, v])
        # Matrix columns in deg/px, the constant in arcsec like the target, so that
        # the clipping works in arcsec.
        design[:, :4] *= deg_to_arcsec
    else:
        design = np.vstack([np.column_stack([one, zero]), np.column_stack([zero, one])])
        fixed_u, fixed_v = cd @ np.vstack([px, py])
        target = np.concatenate([u - fixed_u, v - fixed_v])
    target = target * deg_to_arcsec
    if clip:
        params, fit_keep = _clipped_lstsq(design, target)
    else:
        params, _, rank, _ = np.linalg.lstsq(design, target, rcond=None)
        params = params if rank == design.shape[1] else None
        fit_keep = np.ones(len(px), bool)
    if params is None:
        return None, None
    if free_cd:
        matrix = params[:4].reshape(2, 2)
        centre = params[4:] / deg_to_arcsec
    else:
        matrix = cd
        centre = params / deg_to_arcsec
    return (matrix, centre), fit_keep


def _frame_header(header, similarity, plane, ota_size):
    """Header of one OTA that reproduces the frame solution (exact fit on a pixel grid)."""
    grid = np.linspace(0.0, ota_size - 1.0, _GRID_POINTS)
    x, y = (array.ravel() for array in np.meshgrid(grid, grid))
    ra, dec = pixel_to_sky(header, x, y)
    xi, eta = project(ra, dec, *plane)
    xi, eta = _apply_similarity(similarity, xi * 3600.0, eta * 3600.0)
    ra, dec = deproject(xi / 3600.0, eta / 3600.0, *plane)
    refined, _ = fit_header(header, x, y, ra, dec, free_cd=True, clip=False)
    return refined


# --- Offset-density voting ------------------------------------------------------------------

@dataclass
class _Vote:
    angle: float     # rotation applied to the sources (deg, counter-clockwise on the plane)
    offset: tuple    # (dxi, deta) added after the rotation (arcsec)
    peak: int        # pairs in the best 2x2 window
    contrast: float  # peak / highest window away from the peak


def _pairs(src, ref, half_width):
    """All (source, reference) index pairs closer than half_width along both axes."""
    order = np.argsort(ref[1])
    ref_y = ref[1][order]
    lo = np.searchsorted(ref_y, src[1] - half_width)
    hi = np.searchsorted(ref_y, src[1] + half_width, side="right")
    counts = hi - lo
    src_index = np.repeat(np.arange(len(src[0])), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    ref_index = order[lo[src_index] + np.arange(counts.sum()) - start]
    close = np.abs(ref[0][ref_index] - src[0][src_index]) <= half_width
    return src_index[close], ref_index[close]


def _histogram(base, src, angle, max_offset, n_bins):
    """2x2-window counts of the offsets ref - R(angle) src within +-max_offset."""
    cos_m1, sin = math.cos(math.radians(angle)) - 1.0, math.sin(math.radians(angle))
    # ref - R src = (ref - src) - (R - 1) src: the pair differences are computed once.
    dx = base[0] - (cos_m1 * src[0] - sin * src[1])
    dy = base[1] - (sin * src[0] + cos_m1 * src[1])
    ix = np.floor((dx + max_offset) / VOTE_BIN_ARCSEC).astype(np.int64)
    iy = np.floor((dy + max_offset) / VOTE_BIN_ARCSEC).astype(np.int64)
    inside = (ix >= 0) & (ix < n_bins) & (iy >= 0) & (iy < n_bins)
    counts = np.bincount(iy[inside] * n_bins + ix[inside], minlength=n_bins * n_bins)
    counts = counts.reshape(n_bins, n_bins)
    return counts[:-1, :-1] + counts[1:, :-1] + counts[:-1, 1:] + counts[1:, 1:]


def _vote(src, ref, max_offset, max_rotation):
    """Best rotation and offset by offset-density voting.

    Parameters
    ----------
    src, ref : tuple of ndarray
        Plane coordinates (arcsec) of the sources and the reference stars.
    max_offset : float
        Largest offset searched along each axis (arcsec).
    max_rotation : float
        Largest rotation searched (deg).

    Returns
    -------
    _Vote
    """
    lever = np.max(np.hypot(*src)) * math.radians(max_rotation)
    src_index, ref_index = _pairs(src, ref, max_offset + lever)
    pair_src = (src[0][src_index], src[1][src_index])
    base = (ref[0][ref_index] - pair_src[0], ref[1][ref_index] - pair_src[1])
    n_bins = int(math.ceil(2 * max_offset / VOTE_BIN_ARCSEC))

    def best_over(angles):
        peaks = [_histogram(base, pair_src, angle, max_offset, n_bins).max() for angle in angles]
        return angles[int(np.argmax(peaks))]

    n_coarse = int(round(max_rotation / ANGLE_STEP_DEG))
    angle = best_over(np.arange(-n_coarse, n_coarse + 1) * ANGLE_STEP_DEG)
    n_fine = int(round(ANGLE_STEP_DEG / FINE_ANGLE_STEP_DEG))
    angle = best_over(angle + np.arange(-n_fine, n_fine + 1) * FINE_ANGLE_STEP_DEG)
    window = _histogram(base, pair_src, angle, max_offset, n_bins)
    iy, ix = np.unravel_index(np.argmax(window), window.shape)
    peak = int(window[iy, ix])
    # Contrast: the peak against the best window that does not share its matches
    # (windows within 3 bins overlap the peak or catch its smeared wings).
    background = window.copy()
    background[max(iy - 3, 0):iy + 4, max(ix - 3, 0):ix + 4] = 0
    contrast = peak / max(int(background.max()), 1)
    # The window covers bins ix, ix + 1: its centre is the upper edge of bin ix.
    offset = ((ix + 1) * VOTE_BIN_ARCSEC - max_offset, (iy + 1) * VOTE_BIN_ARCSEC - max_offset)
    return _Vote(float(angle), offset, peak, float(contrast))


def _subsample(n, limit, rng):
    # A random subset keeps the vote's signal-to-noise while bounding its cost.
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, limit, replace=False))


# --- Statistics ------------------------------------------------------------------------------

def _statistics(d_ra, d_dec):
    """The original's quality keywords of matched residuals (arcsec, RA scaled by cos Dec)."""
    n = len(d_ra)
    if n == 0:
        return {"WCS_NSRC": (0, "number of matched stars")}
    distance = np.hypot(d_ra, d_dec)

    def half_width(values):
        low, high = np.percentile(values, [16, 84])
        return float(0.5 * (high - low))

    rms_ra, rms_dec = float(np.sqrt(np.mean(d_ra**2))), float(np.sqrt(np.mean(d_dec**2)))
    return {
        "WCS_NSRC": (n, "number of matched stars"),
        "WCS_RMSA": (rms_ra, "[arcsec] rms of RA*cos(Dec) residuals"),
        "WCS_RMSD": (rms_dec, "[arcsec] rms of Dec residuals"),
        "WCS_RMS": (float(math.hypot(rms_ra, rms_dec)), "[arcsec] rms of residual distances"),
        "WCS_ERRA": (float(np.std(d_ra) / math.sqrt(n)), "[arcsec] error of mean RA residual"),
        "WCS_ERRD": (float(np.std(d_dec) / math.sqrt(n)), "[arcsec] error of mean Dec residual"),
        "WCS_SIGA": (half_width(d_ra), "[arcsec] (84-16 percentile)/2 of RA residuals"),
        "WCS_SIGD": (half_width(d_dec), "[arcsec] (84-16 percentile)/2 of Dec residuals"),
        "WCS_SIG": (half_width(distance), "[arcsec] (84-16 percentile)/2 of distances"),
    }


# --- The solver --------------------------------------------------------------------------------

@dataclass
class _Catalog:
    """Sources of all OTAs: pixel positions, OTA, initial sky and plane positions."""

    ota: np.ndarray
    x: np.ndarray
    y: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    plane: tuple = None  # tangent point (deg)
    xi: np.ndarray = None  # arcsec
    eta: np.ndarray = None


def _source_catalog(sources, headers):
    parts = []
    for ota, (x, y) in sources.items():
        if ota not in headers:
            raise ValueError(f"sources given for OTA {ota}, which has no header")
        x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
        finite = np.isfinite(x) & np.isfinite(y)
        x, y = x[finite], y[finite]
        if len(x) == 0:
            continue
        ra, dec = pixel_to_sky(headers[ota], x, y)
        parts.append((np.full(len(x), ota), x, y, ra, dec))
    if not parts:
        return _Catalog(*(np.empty(0) for _ in range(5)))
    return _Catalog(*(np.concatenate(column) for column in zip(*parts)))


def _fail(message, headers, keywords, reference=None):
    logger.warning("WCS calibration failed: %s; keeping the initial WCS", message)
    keywords["WCSCAL"] = (False, "WCS calibrated")
    keywords["WCSMSG"] = text_keyword(message, "why the WCS is not calibrated")
    return WcsSolution(False, {ota: header.copy() for ota, header in headers.items()},
                       keywords, message=message, reference=reference)


def solve_wcs(sources, headers, refcat, max_offset_arcmin=5.0, max_rotation_deg=3.0,
              match_radius_arcsec=3.0, final_radius_arcsec=2.0, min_contrast=MIN_CONTRAST,
              max_rms_arcsec=MAX_RMS_ARCSEC, min_ota_matches=MIN_OTA_MATCHES,
              ota_size=None, seed=0):
    """Calibrate the WCS of a frame against a reference catalog.

    Parameters
    ----------
    sources : dict
        OTA -> (x, y) arrays of 0-based pixel positions of detected sources
        (windowed centroids); non-finite entries are ignored.
    headers : dict
        OTA -> astropy Header with the initial TPV (or TAN) WCS of that OTA. Every OTA
        here gets a refined header, with or without sources.
    refcat : astropy.table.Table
        Reference stars, columns ``ra``, ``dec`` (deg, at the epoch of observation).
    max_offset_arcmin : float
        Largest pointing error searched (arcmin, along each axis); without contrast
        the search is repeated once with twice this value.
    max_rotation_deg : float
        Largest rotator error searched (deg).
    match_radius_arcsec : float
        Matching radius after the voting (arcsec).
    final_radius_arcsec : float
        Matching radius of the final match through the refined headers (arcsec).
    min_contrast : float
        Minimum contrast of the voting peak.
    max_rms_arcsec : float
        Largest acceptable rms of the final residuals (arcsec).
    min_ota_matches : int
        Minimum matches for an OTA's own fit; OTAs with fewer keep the frame solution.
    ota_size : int, optional
        Side of an OTA in the pixels of the headers (default: unbinned pODI OTA);
        the frame solution is transferred to each header on a grid over it.
    seed : int
        Seed of the random sub-sample used in the voting of very dense fields.

    Returns
    -------
    WcsSolution
        ``keywords`` holds ``WCSCAL``, ``WCS_QUAL`` (contrast), ``WCS_NSRC``,
        ``WCS_RMSA/RMSD/RMS``, ``WCS_ERRA/ERRD``, ``WCS_SIGA/SIGD/SIG``, ``WCSXRMS``,
        ``WCSYRMS`` (arcsec), ``WCS1_DA`` (deg), ``WCS1_DRA``, ``WCS1_DDE`` (arcsec),
        ``WCS1_N`` from the voting and ``WCS2_DA/DRA/DDE/SCL/N`` from the frame fit.
        Offsets are what was added to the initial positions (reference minus initial),
        on the tangent plane about the frame centre.

    Raises
    ------
    ValueError
        For inconsistent input (sources of an OTA without header, a catalog without
        ``ra``/``dec``); bad data only make the calibration fail.
    """
    missing = {"ra", "dec"} - set(refcat.colnames)
    if missing:
        raise ValueError(f"reference catalog lacks column(s) {', '.join(sorted(missing))}")
    ota_size = pd.cell_geometry(1).ota_size if ota_size is None else ota_size
    keywords = {"WCS_QUAL": (0.0, "contrast of the offset/rotation search")}
    catalog = _source_catalog(sources, headers)
    if len(catalog.x) < MIN_SOURCES:
        return _fail(f"only {len(catalog.x)} sources (need {MIN_SOURCES})", headers, keywords)

    catalog.plane = mean_direction(catalog.ra, catalog.dec)
    xi, eta = project(catalog.ra, catalog.dec, *catalog.plane)
    catalog.xi, catalog.eta = xi * 3600.0, eta * 3600.0
    ref_xi, ref_eta = project(np.asarray(refcat["ra"], float), np.asarray(refcat["dec"], float),
                              *catalog.plane)
    ref = (ref_xi * 3600.0, ref_eta * 3600.0)
    rng = np.random.default_rng(seed)

    for max_offset in (max_offset_arcmin * 60.0, 2 * max_offset_arcmin * 60.0):
        in_area = _reference_in_area(catalog, ref, max_offset, max_rotation_deg)
        reference = Table({"RA": np.asarray(refcat["ra"], float)[in_area],
                           "DEC": np.asarray(refcat["dec"], float)[in_area]}, units=("deg", "deg"))
        if len(reference) < MIN_REFERENCE:
            return _fail(f"{len(reference)} reference stars in the field (need {MIN_REFERENCE})",
                         headers, keywords, reference)
        vote = _vote_subsampled(catalog, ref, in_area, max_offset, max_rotation_deg, rng)
        logger.info("offset search +-%.1f': rotation %.2f deg, offset (%.1f, %.1f)\", "
                    "%d pairs, contrast %.1f", max_offset / 60, vote.angle, *vote.offset,
                    vote.peak, vote.contrast)
        if vote.contrast >= min_contrast and vote.peak >= MIN_MATCHES:
            break
    keywords.update(_vote_keywords(vote))
    if vote.contrast < min_contrast or vote.peak < MIN_MATCHES:
        return _fail(f"no clear match (contrast {vote.contrast:.1f}, need {min_contrast}; "
                     f"{vote.peak} pairs, need {MIN_MATCHES})", headers, keywords, reference)

    ref_area = (ref[0][in_area], ref[1][in_area])
    ref_tree = cKDTree(np.column_stack(ref_area))
    similarity = _frame_fit(catalog, ref_tree, ref_area, vote, match_radius_arcsec)
    if similarity is None:
        return _fail("the frame fit is undetermined", headers, keywords, reference)
    keywords.update(_frame_keywords(*similarity))

    refined, ota_keywords = _refine_otas(catalog, headers, similarity[0], ref_tree, reference,
                                         match_radius_arcsec, min_ota_matches, ota_size)
    matches, final = _final_match(catalog, refined, ref_tree, reference, final_radius_arcsec)
    keywords.update(final)
    keywords["WCSXRMS"] = (final.get("WCS_RMSA", (-1.0,))[0], "[arcsec] = WCS_RMSA")
    keywords["WCSYRMS"] = (final.get("WCS_RMSD", (-1.0,))[0], "[arcsec] = WCS_RMSD")
    for ota, values in _ota_statistics(matches).items():
        ota_keywords.setdefault(ota, {}).update(values)

    n_final = final["WCS_NSRC"][0]
    rms = final.get("WCS_RMS", (math.inf,))[0]
    if n_final < MIN_MATCHES or not rms <= max_rms_arcsec:
        return _fail(f"solution does not hold: {n_final} matches (need {MIN_MATCHES}), "
                     f"rms {rms:.3f}\" (limit {max_rms_arcsec}\")", headers, keywords, reference)
    keywords["WCSCAL"] = (True, "WCS calibrated")
    message = (f"WCS calibrated: {n_final} stars, rms {rms:.3f}\", rotation "
               f"{keywords['WCS2_DA'][0]:.3f} deg, contrast {vote.contrast:.1f}")
    logger.info(message)
    return WcsSolution(True, refined, keywords, ota_keywords, matches, reference, message)


def _reference_in_area(catalog, ref, max_offset, max_rotation):
    """Reference stars within reach of a source (offset plus rotation lever)."""
    lever = np.max(np.hypot(catalog.xi, catalog.eta)) * math.radians(max_rotation)
    finite = np.isfinite(ref[0]) & np.isfinite(ref[1])
    tree = cKDTree(np.column_stack([catalog.xi, catalog.eta]))
    points = np.column_stack([np.where(finite, ref[0], 0.0), np.where(finite, ref[1], 0.0)])
    distance, _ = tree.query(points, distance_upper_bound=max_offset + lever, p=np.inf)
    return finite & np.isfinite(distance)


def _vote_subsampled(catalog, ref, in_area, max_offset, max_rotation, rng):
    src_index = _subsample(len(catalog.xi), MAX_VOTE_SOURCES, rng)
    ref_index = np.flatnonzero(in_area)
    ref_index = ref_index[_subsample(len(ref_index), MAX_VOTE_REFERENCE, rng)]
    return _vote((catalog.xi[src_index], catalog.eta[src_index]),
                 (ref[0][ref_index], ref[1][ref_index]), max_offset, max_rotation)


def _vote_keywords(vote):
    return {
        "WCS_QUAL": (vote.contrast, "contrast of the offset/rotation search"),
        "WCS1_DA": (vote.angle, "[deg] rotation found by the search"),
        "WCS1_DRA": (vote.offset[0], "[arcsec] RA*cos(Dec) offset found by the search"),
        "WCS1_DDE": (vote.offset[1], "[arcsec] Dec offset found by the search"),
        "WCS1_N": (vote.peak, "pairs in the search peak"),
    }


def _frame_fit(catalog, ref_tree, ref_area, vote, radius):
    """Shift + rotation + scale of the frame: match with the vote, fit, match again, refit.

    Returns
    -------
    (params, n_used) or None
    """
    angle = math.radians(vote.angle)
    params = np.array([math.cos(angle), math.sin(angle), *vote.offset])
    used = 0
    for _ in range(2):
        moved = _apply_similarity(params, catalog.xi, catalog.eta)
        src_index, ref_index = match_nearest(moved, ref_tree, radius)
        if len(src_index) < MIN_MATCHES:
            return None
        src = (catalog.xi[src_index], catalog.eta[src_index])
        params, keep = _fit_similarity(src, (ref_area[0][ref_index], ref_area[1][ref_index]))
        if params is None:
            return None
        used = int(keep.sum())
    return params, used


def _frame_keywords(params, n_used):
    a, b, tx, ty = params
    return {
        "WCS2_DA": (math.degrees(math.atan2(b, a)), "[deg] rotation of the frame fit"),
        "WCS2_DRA": (float(tx), "[arcsec] RA*cos(Dec) offset of the frame fit"),
        "WCS2_DDE": (float(ty), "[arcsec] Dec offset of the frame fit"),
        "WCS2_SCL": (float(math.hypot(a, b)), "scale factor of the frame fit"),
        "WCS2_N": (n_used, "stars used in the frame fit"),
    }


def _refine_otas(catalog, headers, similarity, ref_tree, reference, radius, min_matches,
                 ota_size):
    """Frame solution in every header, then each OTA's own fit where it has the stars."""
    moved = _apply_similarity(similarity, catalog.xi, catalog.eta)
    src_index, ref_index = match_nearest(moved, ref_tree, radius)
    refined, ota_keywords = {}, {}
    for ota, header in headers.items():
        frame_header = _frame_header(header, similarity, catalog.plane, ota_size)
        mine = catalog.ota[src_index] == ota
        pairs = (src_index[mine], ref_index[mine])
        own = None
        if mine.sum() >= min_matches:
            own = _ota_fit(frame_header, catalog, pairs, reference)
        refined[ota] = own if own is not None else frame_header
        mode = "OTA shift+CD" if own is not None else "frame"
        logger.debug("OTA %02d: %d matches, WCS from the %s fit", ota, mine.sum(), mode)
        ota_keywords[ota] = {"WCSMODE": (mode, "source of this OTA's WCS solution")}
    return refined, ota_keywords


def _ota_fit(frame_header, catalog, pairs, reference):
    """Shift, then shift + CD of one OTA; None if undetermined or implausible."""
    src_index, ref_index = pairs
    x, y = catalog.x[src_index], catalog.y[src_index]
    ra = np.asarray(reference["RA"])[ref_index]
    dec = np.asarray(reference["DEC"])[ref_index]
    shifted, keep = fit_header(frame_header, x, y, ra, dec, free_cd=False)
    if shifted is None or keep.sum() < MIN_OTA_MATCHES:
        return None
    sheared, _ = fit_header(shifted, x[keep], y[keep], ra[keep], dec[keep], free_cd=True)
    if sheared is None:
        return None
    change = np.linalg.norm(_cd(sheared) - _cd(frame_header)) / np.linalg.norm(_cd(frame_header))
    if change > MAX_CD_CHANGE:
        logger.warning("OTA fit changes CD by %.1f%% (limit %.1f%%); keeping the frame solution",
                       100 * change, 100 * MAX_CD_CHANGE)
        return None
    return sheared


def _final_match(catalog, refined, ref_tree, reference, radius):
    """Sources through the refined headers, matched and clipped: table and statistics."""
    ra, dec = np.empty_like(catalog.x), np.empty_like(catalog.x)
    for ota in np.unique(catalog.ota):
        mine = catalog.ota == ota
        ra[mine], dec[mine] = pixel_to_sky(refined[ota], catalog.x[mine], catalog.y[mine])
    xi, eta = project(ra, dec, *catalog.plane)
    src_index, ref_index = match_nearest((xi * 3600.0, eta * 3600.0), ref_tree, radius)
    # Residuals on the sky at each star (RA difference scaled by cos Dec).
    ref_ra = np.asarray(reference["RA"])[ref_index]
    ref_dec = np.asarray(reference["DEC"])[ref_index]
    d_ra = wrap_180(ra[src_index] - ref_ra) * np.cos(np.radians(ref_dec)) * 3600
    d_dec = (dec[src_index] - ref_dec) * 3600.0
    if len(src_index) > 0:
        design = np.vstack([np.column_stack([np.ones_like(d_ra), np.zeros_like(d_ra)]),
                            np.column_stack([np.zeros_like(d_ra), np.ones_like(d_ra)])])
        _, keep = _clipped_lstsq(design, np.concatenate([d_ra, d_dec]))
        src_index, ref_ra, ref_dec, d_ra, d_dec = (
            a[keep] for a in (src_index, ref_ra, ref_dec, d_ra, d_dec))
    matches = Table({"ODI_RA": ra[src_index], "ODI_DEC": dec[src_index],
                     "REF_RA": ref_ra, "REF_DEC": ref_dec,
                     "OTA": catalog.ota[src_index].astype(np.int16)})
    matches["D_RA"], matches["D_DEC"] = d_ra, d_dec
    for name, unit in (("ODI_RA", "deg"), ("ODI_DEC", "deg"), ("REF_RA", "deg"),
                       ("REF_DEC", "deg"), ("D_RA", "arcsec"), ("D_DEC", "arcsec")):
        matches[name].unit = unit
    return matches, _statistics(d_ra, d_dec)


def _ota_statistics(matches):
    return {int(ota): _statistics(np.asarray(matches["D_RA"][matches["OTA"] == ota]),
                                  np.asarray(matches["D_DEC"][matches["OTA"] == ota]))
            for ota in np.unique(matches["OTA"])}

