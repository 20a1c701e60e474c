"""Source detection and aperture photometry on one reduced OTA with ``sep`` (``CAT.ODI``).

:func:`find_sources` runs on the reduced pixels of one OTA while they are in memory
(in the per-OTA worker of ``podi_collectcells``) and returns one table row per source.

Speed
-----
Detection runs on block means (4x4 or 2x2 pixels, :func:`detection_binning`) where
stars are well sampled, which costs a fraction of a full-resolution pass. Every
measurement is then made at full resolution on background-subtracted cut-outs
stacked into one small image (:class:`StampMosaic`), so no full-size copy of the OTA
is made.

Pixel conventions
-----------------
numpy arrays are indexed ``image[y, x]``; ``sep`` and this module's internals use
0-based pixel coordinates where the centre of the first pixel is (0, 0). The output
columns ``X``, ``Y``, ``XWIN``, ``YWIN`` follow the FITS / SExtractor convention: the
centre of the first pixel is (1, 1), i.e. output = 0-based + 1.

Photometry
----------
Circular apertures of the original's diameters (:data:`APERTURE_DIAMETERS`,
0.5 ... 3.5", through the OTA's local pixel scale), centred on the windowed
position, exact pixel overlap, undefined pixels left out. Errors: the local pixel
noise over the aperture's area and, with a gain, the source's Poisson noise.

Flags
-----
``FLAGS`` is the OR of the ``FLAG_*`` bit values of this module (not SExtractor's
bits, although the meanings are close):

==  ======================  =====================================================
1   ``FLAG_BLENDED``        sep deblended the source from a neighbour
2   ``FLAG_SATURATED``      peak + background >= the saturation level
4   ``FLAG_NEAR_UNDEFINED`` an undefined (NaN) pixel inside the largest aperture:
                            cell gap, broken cell, masked bad pixel
8   ``FLAG_TRUNCATED``      the object or its largest aperture reaches the image edge
16  ``FLAG_SEP_OTHER``      any other flag sep raised (overflow, singular
                            moments, aperture problems)
==  ======================  =====================================================

Cosmic rays and hot pixels
--------------------------
They pass detection (they are significant). Most are dropped right after it because
their brightest pixel stands far above their block's mean
(:func:`spiky_detections`); the rest are removed after measurement as sources much
sharper than the PSF (:func:`reject_sharp`) or with too much flux in one pixel
(:func:`reject_concentrated`).
"""

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import sep
from astropy.stats import sigma_clip
from astropy.table import Table
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

FLAG_BLENDED = 1
FLAG_SATURATED = 2
FLAG_NEAR_UNDEFINED = 4
FLAG_TRUNCATED = 8
FLAG_SEP_OTHER = 16

#: Unbinned ODI pixel scale (arcsec/pixel).
PIXEL_SCALE = 0.1126

#: Seeing (arcsec) the detection filter is matched to.
NOMINAL_SEEING = 1.0

#: Background mesh (unbinned pixels): several stellar FWHM, small enough to follow
#: the cell-to-cell sky steps of the 8x8 cells (480 unbinned pixels wide).
BACKGROUND_BOX = 64

#: Largest half-width (pixels) of the detection kernel. The filter costs one
#: multiply-add per kernel pixel and image pixel; a 7x7 kernel keeps a 4k x 4k OTA
#: under a second, and a kernel truncated inside the PSF loses only a few percent of
#: the matched filter's S/N.
MAX_KERNEL_HALF = 3

#: Moffat beta assumed to turn the half-light radius into a FWHM (ODI seeing
#: profiles are Moffat-like with beta ~ 3-4.5).
DEFAULT_MOFFAT_BETA = 3.5

#: A source is "sharp" (cosmic ray, hot pixel) if its FWHM or its windowed minor
#: axis is below this fraction of the frame's stellar value.
SHARPNESS_LIMIT = 0.5

#: Sources with at least this S/N define the frame's stellar FWHM and width.
STELLAR_SNR = 20.0

#: Largest half-size (pixels) of the stamps for the windowed shape.
MAX_SHAPE_HALF = 24

#: sep's stack of object pixels; the default (300 000) overflows on crowded 4k frames.
PIXSTACK = 2_000_000

#: Block sizes (pixels square) of the detection image, largest first
#: (:func:`detection_binning`).
DETECTION_BLOCKS = (4, 2)

#: Smallest stellar FWHM (pixels of the detection image) worth detecting on.
MIN_DETECTION_FWHM = 2.0

#: A detection whose brightest pixel exceeds this many times its peak block's mean
#: is a cosmic ray or hot pixel (:func:`spiky_detections`); stars stay below ~1.3
#: apart from noise.
SPIKE_RATIO = 3.0

#: The original's aperture diameters (arcsec) by their column tag: MAG_D05 ... MAG_D35.
APERTURE_DIAMETERS = {"05": 0.5, "08": 0.8, "10": 1.0, "15": 1.5, "20": 2.0, "25": 2.5,
                      "30": 3.0, "35": 3.5}

#: Sub-pixel sampling of the windowed centroid (sep's default, 11, costs 3x the time
#: for a change of < 0.01 px at ODI's sampling).
WINPOS_SUBPIX = 4

#: Total flux for the aperture correction: within this many FWHM, with a local
#: background from the annulus between these radii (FWHM).
APCORR_RADIUS = 4.0
APCORR_ANNULUS = (5.0, 7.0)

#: Stars for the aperture correction have at least this detection S/N.
APCORR_SNR = 50.0

#: Fewest stars for a fit of the curve of growth (:func:`fit_moffat_growth`).
MIN_GROWTH_STARS = 5

COLUMNS = (("X", "Y", "XWIN", "YWIN", "FWHM_IMAGE", "FWHM_WORLD", "FLUX", "FLUX_ERR")
           + tuple(f"{kind}_D{tag}" for tag in APERTURE_DIAMETERS for kind in ("MAG", "MAGERR"))
           + ("FLUX_MAX", "BACKGROUND", "AWIN_IMAGE", "BWIN_IMAGE", "THETAWIN_IMAGE",
              "ELONGATION", "ELLIPTICITY", "FLAGS", "OTA"))


def fwhm_per_half_light_radius(beta):
    """Ratio FWHM / half-light radius of a Moffat profile (Gaussian for ``beta=inf``).

    For ``I(r) ~ (1 + (r/alpha)**2)**-beta`` the FWHM is
    ``2 alpha sqrt(2**(1/beta) - 1)`` and the half-light radius
    ``alpha sqrt(2**(1/(beta-1)) - 1)``; a Gaussian has FWHM = 2 r50 exactly.
    The ratio is 1.656 for beta = 3.5, 1.475 for 2.5, 1.737 for 4.765.
    """
    if math.isinf(beta):
        return 2.0
    return 2 * math.sqrt(2 ** (1 / beta) - 1) / math.sqrt(2 ** (1 / (beta - 1)) - 1)


def gaussian_kernel(fwhm):
    """Normalised 2-d Gaussian detection kernel of a given FWHM (pixels)."""
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    half = int(min(MAX_KERNEL_HALF, max(1, math.ceil(1.5 * sigma))))
    r = np.arange(-half, half + 1)
    kernel = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


def detection_binning(shape, fwhm_px):
    """Block size of the detection image: the largest of :data:`DETECTION_BLOCKS`
    that leaves :data:`MIN_DETECTION_FWHM` pixels per FWHM and divides the image.

    Detection needs only ~2 pixels per FWHM; ODI's unbinned 0.11" pixels give 9 per
    arcsecond of seeing, so detecting on block means costs a fraction of the time
    and loses nothing. Everything is then measured at full resolution.
    """
    for factor in DETECTION_BLOCKS:
        if fwhm_px >= factor * MIN_DETECTION_FWHM and not (shape[0] % factor or shape[1] % factor):
            return factor
    return 1


def block_mean(image, factor):
    """Mean of ``factor x factor`` pixel blocks, NaN where any pixel of a block is.

    Always a new native float32 array (``factor = 1``: a copy).
    """
    if factor == 1:
        return np.array(image, dtype=np.float32)
    blocks = [image[j::factor, i::factor] for j in range(factor) for i in range(factor)]
    total = np.add(blocks[0], blocks[1], dtype=np.float32)
    for block in blocks[2:]:
        total += block
    total *= np.float32(1.0 / factor**2)
    return total


def _background(detection, undefined, box, read_noise):
    """sep background and rms maps (float32) of the detection image."""
    background = sep.Background(detection, mask=undefined, bw=box, bh=box, fw=3, fh=3)
    back = background.back(dtype=np.float32)
    rms = background.rms(dtype=np.float32)
    if read_noise:
        # Where nearly all pixels of a mesh are undefined the rms estimate is poor;
        # the pixel noise can never be below the read noise.
        np.maximum(rms, np.float32(read_noise), out=rms)
    log.debug("background: box %d px, global %.1f, rms %.2f", box, background.globalback,
              background.globalrms)
    return back, rms


class StampMosaic:
    """Background-subtracted cut-outs around sources, stacked into one image for sep.

    Measuring on cut-outs touches a few percent of the pixels of an OTA instead of
    building a background-subtracted copy of all of it. Source ``i`` sits in rows
    ``i * size ... (i + 1) * size - 1`` of :attr:`data`; measurements must stay
    within ``half - 1`` pixels of a source so that they do not reach the next stamp.

    Parameters
    ----------
    image : numpy.ndarray
        The full image, NaN where undefined (any float dtype and byte order).
    x, y : numpy.ndarray
        0-based source positions in ``image``.
    background : numpy.ndarray
        Background at each source (image units), subtracted from its stamp.
    half : int
        Stamps are ``2 half + 1`` pixels square.

    Attributes
    ----------
    data : numpy.ndarray (float32)
        The stacked stamps, 0 where undefined or outside the image.
    mask : numpy.ndarray of bool
        Undefined or outside the image.
    undefined, outside : numpy.ndarray (float32)
        1 where the image has no data, and where the stamp leaves the image.
    """

    def __init__(self, image, x, y, background, half):
        self.half = half
        size = 2 * half + 1
        ny, nx = image.shape
        offsets = np.arange(size)
        self.x0 = np.rint(x).astype(int) - half
        self.y0 = np.rint(y).astype(int) - half
        cols, rows = self.x0[:, None] + offsets, self.y0[:, None] + offsets
        self.row0 = np.arange(len(x)) * size
        outside = (((rows < 0) | (rows >= ny))[:, :, None] | ((cols < 0) | (cols >= nx))[:, None, :])
        pixels = image[np.clip(rows, 0, ny - 1)[:, :, None],
                       np.clip(cols, 0, nx - 1)[:, None, :]].astype(np.float32, copy=False)
        pixels -= np.asarray(background, np.float32)[:, None, None]
        undefined = np.isnan(pixels) & ~outside
        mask = undefined | outside
        pixels[mask] = 0.0
        shape = (len(x) * size, size)
        self.data, self.mask = pixels.reshape(shape), mask.reshape(shape)
        self.undefined = undefined.reshape(shape).astype(np.float32)
        self.outside = outside.reshape(shape).astype(np.float32)

    def to_mosaic(self, x, y):
        """Image positions (0-based) of the sources -> positions in :attr:`data`."""
        return x - self.x0, y - self.y0 + self.row0

    def to_image(self, x, y):
        """Positions in :attr:`data` -> image positions (0-based)."""
        return x + self.x0, y + self.y0 - self.row0

    def touches(self, which, x, y, radius):
        """Whether circles of ``radius`` at mosaic positions (x, y) include pixels
        that are ``'undefined'`` or ``'outside'``."""
        area, _, _ = sep.sum_circle(getattr(self, which), x, y, radius, subpix=0)
        return area > 0


def peak_value(data, x, y, half=2):
    """Highest pixel within ``half`` pixels of (x, y) (0-based; the source's peak)."""
    ny, nx = data.shape
    offsets = np.arange(-half, half + 1)
    iy = np.clip(np.rint(y).astype(int)[:, None, None] + offsets[None, :, None], 0, ny - 1)
    ix = np.clip(np.rint(x).astype(int)[:, None, None] + offsets[None, None, :], 0, nx - 1)
    return data[iy, ix].max(axis=(1, 2))


def aperture_flux(data, x, y, radius, mask, noise, gain):
    """Flux, error and sep flags in circles of ``radius`` pixels at (x, y) (0-based).

    Exact pixel overlap; ``mask``-ed pixels are left out. The error is
    ``sqrt(area * noise**2 + flux / gain)``: ``noise`` is the pixel rms at each source
    (image units), the Poisson term is dropped without a gain.
    """
    flux, _, flags = sep.sum_circle(data, x, y, radius, mask=mask, subpix=0)
    variance = math.pi * np.asarray(radius) ** 2 * noise**2
    if gain:
        variance = variance + np.maximum(flux, 0) / gain
    return flux, np.sqrt(variance), flags


def magnitudes(flux, flux_err):
    """Instrumental magnitude ``-2.5 log10(flux)`` and its error; NaN for flux <= 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        positive = flux > 0
        mag = np.where(positive, -2.5 * np.log10(np.where(positive, flux, 1.0)), np.nan)
        err = np.where(positive, 2.5 / math.log(10) * flux_err / np.where(positive, flux, 1.0), np.nan)
    return mag, err


def moffat_enclosed(radius, fwhm, beta):
    """Fraction of a Moffat(beta) profile's flux inside ``radius`` (same unit as ``fwhm``).

    With alpha = FWHM / (2 sqrt(2^(1/beta) - 1)) the enclosed fraction is
    1 - (1 + (r/alpha)^2)^(1 - beta): 0.793 at r = FWHM and 0.934 at r = 1.5 FWHM for
    beta = 3.5. beta must exceed 1.
    """
    alpha2 = np.square(fwhm) / (4.0 * (2.0 ** (1.0 / beta) - 1.0))
    return 1.0 - (1.0 + np.square(radius) / alpha2) ** (1.0 - beta)


@dataclass
class MoffatFit:
    """The Moffat profile of a frame's stars (:func:`fit_moffat_growth`)."""

    fwhm: float        # same unit as the radii fitted
    beta: float
    covariance: np.ndarray  # of (fwhm, beta)
    n_stars: int

    def total_correction(self, radius):
        """Magnitudes from the flux within ``radius`` to the total flux, and its error."""
        def correction(params):
            return -2.5 * math.log10(moffat_enclosed(radius, *params))
        value = correction((self.fwhm, self.beta))
        steps = 1e-4 * np.array([self.fwhm, self.beta])
        gradient = np.array([(correction((self.fwhm, self.beta) + step) - value) / h
                             for step, h in zip(np.diag(steps), steps)])
        return value, float(math.sqrt(max(gradient @ self.covariance @ gradient, 0.0)))


def fit_moffat_growth(growth, radii, outer):
    """FWHM and beta of the Moffat profile whose curve of growth the stars follow.

    Fits ``growth[i, k] = f(radii[k]) / f(outer[i])`` with f the enclosed fraction
    (:func:`moffat_enclosed`) by robust least squares (soft L1, scale 0.01) over all
    stars and apertures. Unlike a FWHM from the half-light radius, which must assume
    beta, this is unbiased for any Moffat profile, and it extrapolates the wings
    beyond the largest aperture.

    Parameters
    ----------
    growth : numpy.ndarray
        (stars, apertures) flux in each aperture over the flux within ``outer``
        (:func:`growth_curves`).
    radii : numpy.ndarray
        Aperture radii.
    outer : numpy.ndarray
        Radius of each star's total-flux aperture (same unit as ``radii``).

    Returns
    -------
    MoffatFit or None
        None with fewer than :data:`MIN_GROWTH_STARS` stars or without convergence.
    """
    growth = np.asarray(growth, float)
    outer = np.asarray(outer, float)
    usable = np.isfinite(growth).all(axis=1) & np.isfinite(outer)
    growth, outer = growth[usable], outer[usable]
    if len(growth) < MIN_GROWTH_STARS:
        return None
    radii = np.asarray(radii, float)

    def residuals(params):
        return (growth - moffat_enclosed(radii, *params)
                / moffat_enclosed(outer, *params)[:, None]).ravel()

    # scipy.optimize costs 0.2 s of start-up, which only -fixwcs runs should pay.
    from scipy.optimize import least_squares

    # Start: the radius holding half the light of the median curve is ~0.6 FWHM.
    half = np.interp(0.5, np.median(growth, axis=0), radii)
    fit = least_squares(residuals, [half / 0.6, DEFAULT_MOFFAT_BETA], loss="soft_l1",
                        f_scale=0.01, bounds=([0.1 * half, 1.2], [10 * half, 30.0]))
    if not fit.success:
        return None
    # Covariance from the Jacobian, scaled by the robust scatter of the residuals.
    scatter = 1.4826 * np.median(np.abs(fit.fun))
    try:
        covariance = np.linalg.inv(fit.jac.T @ fit.jac) * scatter**2
    except np.linalg.LinAlgError:
        return None
    return MoffatFit(float(fit.x[0]), float(fit.x[1]), covariance, len(growth))


def clipped_seeing(fwhm_deg):
    """Seeing (arcsec) and the number of stars behind it: the 3-sigma clipped median
    (sigma from the MAD) of ``FWHM_WORLD`` (deg) x 3600; (NaN, 0) without values."""
    fwhm = np.asarray(fwhm_deg, float) * 3600.0
    fwhm = fwhm[np.isfinite(fwhm) & (fwhm > 0)]
    if len(fwhm) == 0:
        return math.nan, 0
    kept = sigma_clip(fwhm, sigma=3.0, maxiters=10, stdfunc="mad_std")
    return float(np.ma.median(kept)), int(kept.count())


def growth_curves(image, x, y, background, radii, fwhm, candidates):
    """Curves of growth of bright isolated stars: aperture fluxes over the total flux.

    The total flux is the flux within :data:`APCORR_RADIUS` FWHM (99.9 % of a
    beta = 3.5 Moffat profile). All apertures take their background from the annulus
    :data:`APCORR_ANNULUS` (in FWHM), so that the residual background the mesh leaves
    near bright stars cancels. Only ``candidates`` without another detection within
    the annulus' outer radius are used.

    Parameters
    ----------
    image : numpy.ndarray
        The image, NaN where undefined.
    x, y : numpy.ndarray
        0-based positions of all sources (neighbours count even if not candidates).
    background : numpy.ndarray
        Background at each source (image units).
    radii : sequence of float
        Aperture radii (pixels).
    fwhm : float
        Stellar FWHM (pixels).
    candidates : numpy.ndarray of bool
        Bright, unflagged stars.

    Returns
    -------
    growth : numpy.ndarray
        (stars, radii): flux in each aperture over the total flux.
    outer : float
        Radius (pixels) of the total-flux aperture.
    used : numpy.ndarray of int
        Index of each star among the sources.
    """
    outer = APCORR_RADIUS * fwhm
    if not math.isfinite(fwhm) or not candidates.any():
        return np.zeros((0, len(radii))), outer, np.zeros(0, int)
    annulus = (APCORR_ANNULUS[0] * fwhm, APCORR_ANNULUS[1] * fwhm)
    positions = np.column_stack([x, y])
    nearest = cKDTree(positions).query(positions[candidates], k=2)[0][:, 1]
    index = np.flatnonzero(candidates)[nearest > annulus[1]]
    stamps = StampMosaic(image, x[index], y[index], background[index], int(math.ceil(annulus[1])) + 2)
    xs, ys = stamps.to_mosaic(x[index], y[index])
    fluxes, flags = zip(*((f, fl) for f, _, fl in (
        sep.sum_circle(stamps.data, xs, ys, r, mask=stamps.mask, bkgann=annulus, subpix=0)
        for r in (*radii, outer))))
    fluxes = np.array(fluxes)
    good = ((np.bitwise_or.reduce(flags) == 0) & (fluxes[-1] > 0)
            & ~stamps.touches("undefined", xs, ys, annulus[1])
            & ~stamps.touches("outside", xs, ys, annulus[1]))
    return (fluxes[:-1, good] / fluxes[-1, good]).T, outer, index[good]


def windowed_shape(data, x, y, sigma, chunk=1000):
    """Windowed second moments, corrected for the window, of sources at (x, y).

    A Gaussian window of dispersion ``sigma`` (pixels, per source) multiplies the
    profile; for a Gaussian source of covariance S the weighted covariance is
    ``M = (S^-1 + sigma^-2 I)^-1``, so ``S = (M^-1 - sigma^-2 I)^-1`` recovers the
    profile's own moments (exact for Gaussians, close for stars). The window is cut
    at 4 sigma and at :data:`MAX_SHAPE_HALF` pixels (larger sources, saturated
    stars, come out too small).

    Returns
    -------
    a, b : numpy.ndarray
        rms extent along the major and minor axis (pixels); NaN where undefined.
    theta : numpy.ndarray
        Position angle of the major axis, degrees counter-clockwise from +x, (-90, 90].
    """
    half = int(min(MAX_SHAPE_HALF, np.ceil(4 * np.max(sigma))))
    offsets = np.arange(-half, half + 1)
    moments = [_weighted_moments(data, x[i:i + chunk], y[i:i + chunk], sigma[i:i + chunk], offsets)
               for i in range(0, len(x), chunk)]
    mxx, myy, mxy, total = (np.concatenate(m) for m in zip(*moments))
    with np.errstate(invalid="ignore", divide="ignore"):
        # Invert M, remove the window, invert back (2x2 matrices in closed form).
        det = mxx * myy - mxy**2
        ixx, iyy, ixy = myy / det - 1 / sigma**2, mxx / det - 1 / sigma**2, -mxy / det
        det_i = ixx * iyy - ixy**2
        sxx, syy, sxy = iyy / det_i, ixx / det_i, -ixy / det_i
        mean = (sxx + syy) / 2
        spread = np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
        a = np.sqrt(mean + spread)
        b = np.sqrt(mean - spread)
    # Noise can make M wider than the window itself: no shape is measurable then.
    valid = (total > 0) & (det > 0) & (ixx > 0) & (iyy > 0) & (det_i > 0)
    a[~valid] = np.nan
    b[~valid] = np.nan
    theta = np.degrees(0.5 * np.arctan2(2 * sxy, sxx - syy))
    return a, b, theta


def _weighted_moments(data, x, y, sigma, offsets):
    """Gaussian-weighted central second moments and weight sums of stamps at (x, y)."""
    ny, nx = data.shape
    ix = np.rint(x).astype(int)[:, None, None] + offsets[None, None, :]
    iy = np.rint(y).astype(int)[:, None, None] + offsets[None, :, None]
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    stamps = np.where(inside, data[np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)], 0.0)
    dx = ix - x[:, None, None]
    dy = iy - y[:, None, None]
    r2 = dx**2 + dy**2
    s2 = sigma[:, None, None] ** 2
    weight = stamps * np.exp(-r2 / (2 * s2)) * (r2 < 16 * s2)
    total = weight.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((weight * dx**2).sum(axis=(1, 2)) / total, (weight * dy**2).sum(axis=(1, 2)) / total,
                (weight * dx * dy).sum(axis=(1, 2)) / total, total)


def reject_sharp(fwhm, bwin, snr, nominal_fwhm):
    """Which sources are much sharper than the PSF (cosmic rays, hot pixels).

    The frame's stellar FWHM and minor axis are the medians over the "stellar"
    sources: S/N >= ``STELLAR_SNR``, FWHM within 0.4-2.5 times the nominal seeing
    (keeps galaxies and most cosmic rays out), and minor axis at least a third of the
    widest such sources' (their 90th percentile; removes cosmic-ray tracks, which
    can be long, often as many as and as bright as the stars). A source is rejected
    if its FWHM or its windowed minor axis ``BWIN`` is below ``SHARPNESS_LIMIT``
    (0.5) times the stellar value, or if either is undefined. A hot pixel has FWHM
    ~0.6 px, a cosmic-ray track a minor axis well under a pixel; stars, even faint
    ones, scatter by tens of percent at most.

    Parameters
    ----------
    fwhm, bwin, snr : numpy.ndarray
        FWHM and windowed minor axis (pixels), detection S/N of the sources.
    nominal_fwhm : float
        Expected seeing FWHM (pixels).

    Returns
    -------
    sharp : numpy.ndarray of bool
    stellar_fwhm, stellar_bwin : float
        The frame's values (pixels); NaN if no source qualifies (then only sources
        with undefined shapes are rejected).
    """
    bright = ((snr >= STELLAR_SNR) & np.isfinite(bwin) & (fwhm > 0.4 * nominal_fwhm)
              & (fwhm < 2.5 * nominal_fwhm))
    if bright.any():
        bright &= bwin >= np.percentile(bwin[bright], 90) / 3
    stellar_fwhm = float(np.median(fwhm[bright])) if bright.any() else math.nan
    stellar_bwin = float(np.median(bwin[bright])) if bright.any() else math.nan
    sharp = ~np.isfinite(fwhm) | ~np.isfinite(bwin)
    if bright.any():
        sharp |= (fwhm < SHARPNESS_LIMIT * stellar_fwhm) | (bwin < SHARPNESS_LIMIT * stellar_bwin)
    return sharp, stellar_fwhm, stellar_bwin


def _flags(objects, sep_flags, near_undefined, truncated, saturated):
    """This module's FLAG_* bits (int32) from sep's flags and the pixel tests.

    ``sep_flags`` are sep's APER_* bits of the apertures and the centroid window
    (OR-ed); the other arguments are boolean arrays (``saturated`` may be None).
    """
    flags = np.zeros(len(objects), np.int32)
    flags[(objects["flag"] & sep.OBJ_MERGED) != 0] |= FLAG_BLENDED
    if saturated is not None:
        flags[saturated] |= FLAG_SATURATED
    flags[near_undefined] |= FLAG_NEAR_UNDEFINED
    flags[truncated | ((objects["flag"] & sep.OBJ_TRUNC) != 0)] |= FLAG_TRUNCATED
    # Masked pixels are the two tests above; sep's remaining bits are overflows,
    # singular moments and the like.
    other = ((objects["flag"] & ~(sep.OBJ_MERGED | sep.OBJ_TRUNC))
             | (sep_flags & ~(sep.APER_HASMASKED | sep.APER_ALLMASKED | sep.APER_TRUNC)))
    flags[other != 0] |= FLAG_SEP_OTHER
    return flags


def find_sources(image, ota, gain=None, read_noise=None, saturation=None, binning=1,
                 threshold=5.0, moffat_beta=DEFAULT_MOFFAT_BETA, aperture_radius=None,
                 seeing=NOMINAL_SEEING, pixel_scale=None):
    """Detect and measure the sources of one reduced OTA.

    Detection runs on block means (4x4 or 2x2 pixels) where stars are well sampled
    (:func:`detection_binning`): sep background (mesh ``64 / binning`` unbinned-pixel
    equivalents, 3x3 median filter) with the NaN pixels masked, extraction at
    ``threshold`` times the local background rms after filtering with a Gaussian of
    the nominal seeing (at most 7x7 pixels), minimum area ``max(2, 5 // b)`` pixels
    for a detection image of binning ``b``, sep's default deblending; then the
    rejection of spiky detections (:func:`spiky_detections`). Everything else is
    measured on the full-resolution image minus that background: half-light radius,
    windowed centroid, FWHM, peak, windowed shape, the adaptive aperture flux, the
    eight aperture fluxes of :data:`APERTURE_DIAMETERS`, flags, the per-star aperture
    corrections of bright isolated stars, and finally the rejection of sharp and
    concentrated sources and duplicates.

    Parameters
    ----------
    image : numpy.ndarray
        Reduced OTA, 2-d, any float dtype, NaN where there is no data. Not modified.
    ota : int
        OTA number, copied into the ``OTA`` column.
    gain : float, optional
        Electrons per image unit (header ``GAIN``); adds the sources' Poisson noise to
        the flux errors. None: background noise only (SExtractor's ``GAIN = 0``).
    read_noise : float, optional
        Read noise in image units (header ``RDNOISE``): floor of the background rms.
    saturation : float, optional
        Level (image units, including the sky) above which pixels may be saturated
        (header ``SATURATE``). None: no saturation flag.
    binning : int
        Binning factor of ``image``; scales the background mesh.
    threshold : float
        Detection threshold in units of the local background rms (per filtered pixel).
    moffat_beta : float
        Profile assumed to convert the half-light radius to a FWHM (``inf``: Gaussian).
    aperture_radius : float, optional
        Radius (pixels) of the adaptive flux aperture (``FLUX``). None: 1.5 times the
        frame's stellar FWHM (an aperture of diameter 3 FWHM, 93 % of a beta = 3.5
        Moffat's flux).
    seeing : float
        Expected seeing FWHM (arcsec): the detection kernel is matched to it, and
        stars are looked for within 0.4-2.5 times it (:func:`reject_sharp`).
    pixel_scale : float, optional
        Local pixel scale of ``image`` (arcsec/pixel, from its WCS): converts the
        aperture diameters and the FWHM. None: ``PIXEL_SCALE * binning``.

    Returns
    -------
    astropy.table.Table
        One row per source, columns :data:`COLUMNS`:
        ``X``, ``Y`` isophotal barycentre and ``XWIN``, ``YWIN`` windowed centroid
        (pixels, 1-based FITS convention = 0-based + 1); ``FWHM_IMAGE`` (pixels) =
        half-light radius x :func:`fwhm_per_half_light_radius` (``moffat_beta``) and
        ``FWHM_WORLD`` (degrees, through ``pixel_scale``). The conversion is exact for
        the assumed profile and biased otherwise: a Gaussian star comes out 17 % too
        small with beta = 3.5, a beta = 2.5 Moffat 12 % too large (the frame's PSF
        fit, :func:`fit_moffat_growth`, removes this bias afterwards); pixelisation
        adds ~1/12 px^2 to the profile's variance. ``FLUX``, ``FLUX_ERR`` (image units;
        adaptive circular aperture); ``MAG_Dnn``, ``MAGERR_Dnn`` (instrumental
        magnitudes ``-2.5 log10(flux)`` in the apertures of :data:`APERTURE_DIAMETERS`,
        NaN where the flux is not positive); all apertures centred on the windowed
        position, undefined pixels excluded (and flagged), errors from the local
        pixel noise and, with ``gain``, the source's Poisson noise; ``FLUX_MAX``
        (peak above background, image units); ``BACKGROUND`` (image units at the
        source); ``AWIN_IMAGE``, ``BWIN_IMAGE`` (windowed rms extent along the axes,
        pixels), ``THETAWIN_IMAGE`` (degrees, counter-clockwise from +x),
        ``ELONGATION`` = A/B, ``ELLIPTICITY`` = 1 - B/A (windowed); ``FLAGS``
        (``FLAG_*`` bits); ``OTA``. Table meta: ``FWHM`` (stellar median, px),
        ``NREJECT`` (spiky, sharp, concentrated and duplicate detections removed),
        ``APERTURE`` (adaptive radius, px),
        ``GROWTH`` (:func:`growth_curves` of the bright isolated stars in the apertures
        of :data:`APERTURE_DIAMETERS`), ``GROWTH_R`` (arcsec, radius of their
        total-flux aperture) and ``GROWTH_FWHM`` (their FWHM, arcsec).
    """
    start = time.perf_counter()
    pixel_scale = pixel_scale or PIXEL_SCALE * binning
    fwhm_px = seeing / pixel_scale
    factor = detection_binning(image.shape, fwhm_px)
    detection = block_mean(image, factor)
    detection_undefined = np.isnan(detection)
    back, rms = _background(detection, detection_undefined,
                            max(8, BACKGROUND_BOX // (binning * factor)),
                            read_noise / factor if read_noise else None)
    np.subtract(detection, back, out=detection)
    detection[detection_undefined] = 0.0
    if sep.get_extract_pixstack() < PIXSTACK:
        sep.set_extract_pixstack(PIXSTACK)
    kernel = gaussian_kernel(fwhm_px / factor)
    # Plain convolution ('conv') is 3-4 times faster than sep's 'matched' filter. The
    # filtered noise is rms * sqrt(sum k^2) (kernel normalised to sum 1), so scaling the
    # threshold by that factor makes it a threshold in filtered S/N, as 'matched' does
    # where the noise is locally constant (it changes only from cell to cell).
    objects = sep.extract(detection, threshold * float(np.sqrt((kernel.astype(np.float64) ** 2).sum())),
                          err=rms, mask=detection_undefined, minarea=max(2, 5 // (binning * factor)),
                          filter_kernel=kernel, filter_type="conv")
    if len(objects) == 0:
        log.info("OTA %02d: no sources", ota)
        return _table([], {"FWHM": math.nan, "NREJECT": 0, "APERTURE": math.nan,
                           "GROWTH": np.zeros((0, len(APERTURE_DIAMETERS))), "GROWTH_R": math.nan,
                           "GROWTH_FWHM": np.zeros(0)})

    spiky = spiky_detections(image, objects, back, rms, factor)
    objects = objects[~spiky]
    # Block (i, j) of the detection image covers pixels factor*i ... factor*i + factor-1,
    # so its centre is at factor*i + (factor-1)/2.
    ix, iy = (np.clip(np.rint(objects[c]).astype(int), 0, n - 1)
              for c, n in (("x", detection.shape[1]), ("y", detection.shape[0])))
    background = back[iy, ix]
    # The noise of a block mean is the pixel noise over factor (uncorrelated pixels).
    noise = rms[iy, ix] * factor
    snr = objects["flux"] / (np.sqrt(np.maximum(objects["npix"], 1)) * rms[iy, ix])
    radii = {tag: diameter / 2 / pixel_scale for tag, diameter in APERTURE_DIAMETERS.items()}
    stamps = StampMosaic(image, factor * objects["x"] + (factor - 1) / 2,
                         factor * objects["y"] + (factor - 1) / 2, background,
                         # Room for an adaptive aperture of stars up to twice the seeing.
                         int(math.ceil(max(MAX_SHAPE_HALF, *radii.values(), 2 * 1.5 * fwhm_px))) + 3)
    reach = stamps.half - 1
    data = stamps.data
    x, y = stamps.to_mosaic(factor * objects["x"] + (factor - 1) / 2,
                            factor * objects["y"] + (factor - 1) / 2)

    # The isophotal extent bounds the light profile; the floor keeps faint sources'
    # radius from being cut off at the noise.
    rmax = np.clip(6 * factor * objects["a"], 2 * fwhm_px, reach)
    r50, _ = sep.flux_radius(data, x, y, rmax, 0.5, mask=stamps.mask, subpix=3)
    # SExtractor's window: Gaussian with FWHM = the half-light diameter.
    window = np.clip(2 * r50 / 2.3548, 0.3, reach / 4)
    xwin, ywin, winpos_flags = sep.winpos(data, x, y, window, mask=stamps.mask, subpix=WINPOS_SUBPIX)
    fwhm = r50 * fwhm_per_half_light_radius(moffat_beta)
    awin, bwin, theta = windowed_shape(data, xwin, ywin, window)
    peak = peak_value(data, xwin, ywin)

    sharp, stellar_fwhm, _ = reject_sharp(fwhm, bwin, snr, fwhm_px)
    radius = aperture_radius if aperture_radius is not None else 1.5 * (
        stellar_fwhm if math.isfinite(stellar_fwhm) else fwhm_px)
    radius = min(radius, reach)
    flux, flux_err, aperture_flags = aperture_flux(data, xwin, ywin, radius, stamps.mask, noise, gain)
    photometry = {}
    for tag, r in radii.items():
        f, e, flags = aperture_flux(data, xwin, ywin, r, stamps.mask, noise, gain)
        photometry[f"MAG_D{tag}"], photometry[f"MAGERR_D{tag}"] = magnitudes(f, e)
        aperture_flags |= flags
    largest = max(radius, *radii.values())
    stellar = ~sharp & (snr >= STELLAR_SNR) & (objects["flag"] == 0)
    concentrated = reject_concentrated(peak, flux, noise, stellar)
    keep = ~sharp & ~concentrated & ~duplicates(xwin, ywin, objects["flux"])

    flags = _flags(objects, aperture_flags | winpos_flags,
                   near_undefined=stamps.touches("undefined", xwin, ywin, largest),
                   truncated=stamps.touches("outside", xwin, ywin, largest),
                   saturated=(peak + background >= saturation) if saturation is not None else None)
    xwin, ywin = stamps.to_image(xwin, ywin)
    x, y = stamps.to_image(x, y)
    growth, outer, grown = growth_curves(image, xwin, ywin, background, list(radii.values()),
                                         stellar_fwhm, keep & stellar & (flags == 0) & (snr >= APCORR_SNR))
    columns = {"X": x + 1, "Y": y + 1, "XWIN": xwin + 1, "YWIN": ywin + 1, "FWHM_IMAGE": fwhm,
               "FWHM_WORLD": fwhm * pixel_scale / 3600, "FLUX": flux, "FLUX_ERR": flux_err,
               **photometry, "FLUX_MAX": peak, "BACKGROUND": background, "AWIN_IMAGE": awin,
               "BWIN_IMAGE": bwin, "THETAWIN_IMAGE": theta, "ELONGATION": awin / bwin,
               "ELLIPTICITY": 1 - bwin / awin, "FLAGS": flags,
               "OTA": np.full(len(flux), ota, np.int16)}
    table = _table([columns[name] for name in COLUMNS],
                   {"FWHM": stellar_fwhm, "NREJECT": int(spiky.sum() + (~keep).sum()),
                    "APERTURE": float(radius), "GROWTH": growth,
                    "GROWTH_R": outer * pixel_scale, "GROWTH_FWHM": fwhm[grown] * pixel_scale})[keep]
    log.info("OTA %02d: %d sources (%d spiky, %d sharp, %d concentrated, %d duplicates "
             "removed), FWHM %.2f px, aperture radius %.2f px, %.2f s", ota, len(table),
             spiky.sum(), sharp.sum(), (concentrated & ~sharp).sum(),
             (~keep & ~sharp & ~concentrated).sum(), stellar_fwhm, radius,
             time.perf_counter() - start)
    return table


def spiky_detections(image, objects, back, rms, factor):
    """Which detections are cosmic rays or hot pixels, judged before measuring them.

    Their light sits in a few pixels, so the brightest pixel of the detection's peak
    block far exceeds the block mean; a star, at least :data:`MIN_DETECTION_FWHM`
    blocks wide, is nearly flat across one block. A detection is spiky if its
    brightest pixel (above the background) exceeds :data:`SPIKE_RATIO` times the
    block mean by more than 5 times the pixel noise: the noise of faint stars alone
    never qualifies. Always False for ``factor = 1`` (no blocks).

    Parameters
    ----------
    image : numpy.ndarray
        The full-resolution image.
    objects : numpy.ndarray
        sep's detections on the block-mean image (``xpeak``, ``ypeak``, ``peak``
        above the background).
    back, rms : numpy.ndarray
        Background and noise maps of the block-mean image.
    factor : int
        Block size.
    """
    if factor == 1:
        return np.zeros(len(objects), bool)
    xpeak, ypeak = objects["xpeak"], objects["ypeak"]
    offsets = np.arange(factor)
    rows = (factor * ypeak)[:, None, None] + offsets[None, :, None]
    cols = (factor * xpeak)[:, None, None] + offsets[None, None, :]
    # The peak block has data in every pixel: a block with an undefined pixel is
    # undefined itself and cannot be a detection's peak.
    brightest = image[rows, cols].max(axis=(1, 2)) - back[ypeak, xpeak]
    excess = brightest - SPIKE_RATIO * objects["peak"]
    return (excess > 0) & (excess > 5 * factor * rms[ypeak, xpeak])


def reject_concentrated(peak, flux, noise, stellar):
    """Which sources have much more of their flux in one pixel than a star.

    Catches cosmic rays that :func:`reject_sharp` misses because the detection merged
    them with a neighbour or a second hit (the merged shape is wide). The stellar
    peak fraction ``c`` is the median ``peak / flux`` of the ``stellar`` sources. A
    source is rejected if its peak exceeds ``3 c flux`` and the excess ``peak - c
    flux`` is above 5 times the pixel noise: faint stars, whose peak is mostly noise,
    are never rejected on noise alone, and a star's peak fraction changes by far less
    than 3x with its sub-pixel position unless the PSF is below ~2 px FWHM.

    Parameters
    ----------
    peak, flux : numpy.ndarray
        Peak above background and aperture flux (image units).
    noise : numpy.ndarray
        Background rms at the sources (image units per pixel).
    stellar : numpy.ndarray of bool
        Sources known to be stars (bright, clean, not sharp).
    """
    if not stellar.any():
        return np.zeros(len(peak), bool)
    c = float(np.median(peak[stellar] / flux[stellar]))
    return (peak > 3 * c * flux) & (peak - c * flux > 5 * noise)


def duplicates(x, y, strength, distance=1.0):
    """Which sources duplicate a stronger one within ``distance`` pixels.

    sep's deblender can split one star (typically one hit by a cosmic ray) into
    parts whose windowed centroids converge on the same position; the part with the
    larger isophotal flux ``strength`` is kept.
    """
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(distance, output_type="ndarray")
    weaker = np.where(strength[pairs[:, 0]] < strength[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    drop = np.zeros(len(x), bool)
    drop[weaker] = True
    return drop


def _table(columns, meta):
    """The output table; float columns as float32 (the E format of CAT.ODI)."""
    if not len(columns):
        columns = [np.zeros(0, np.float32)] * (len(COLUMNS) - 2) + [np.zeros(0, np.int32),
                                                                    np.zeros(0, np.int16)]
    table = Table(dict(zip(COLUMNS, columns)), meta=meta)
    for name in COLUMNS[:-2]:
        # Positions keep float64: float32 resolves only ~0.0002 px at x ~ 4000.
        if name not in ("X", "Y", "XWIN", "YWIN"):
            table[name] = table[name].astype(np.float32)
    for name in COLUMNS:
        table[name].unit = column_unit(name)
    return table


def column_unit(name):
    """FITS unit of a ``CAT.ODI`` column (None: dimensionless or the image's ``BUNIT``)."""
    if name.startswith(("MAG_", "MAGERR_")):
        return "mag"
    if name in ("FWHM_WORLD", "THETAWIN_IMAGE"):
        return "deg"
    if name in ("X", "Y", "XWIN", "YWIN", "FWHM_IMAGE", "AWIN_IMAGE", "BWIN_IMAGE"):
        return "pix"
    return None
