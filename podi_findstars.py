"""Source detection on one reduced OTA with ``sep`` (the ``CAT.ODI`` catalog of an OTA).

:func:`find_sources` runs on the reduced pixels of one OTA while they are in memory
(in the per-OTA worker of ``podi_collectcells``) and returns one table row per source.

Pixel conventions
-----------------
numpy arrays are indexed ``image[y, x]``; ``sep`` and this module's internals use
0-based pixel coordinates where the centre of the first pixel is (0, 0). The output
columns ``X``, ``Y``, ``XWIN``, ``YWIN`` follow the FITS / SExtractor convention: the
centre of the first pixel is (1, 1), i.e. output = 0-based + 1.

Flags
-----
``FLAGS`` is the OR of the ``FLAG_*`` bit values of this module (not SExtractor's
bits, although the meanings are close):

==  ======================  =====================================================
1   ``FLAG_BLENDED``        sep deblended the source from a neighbour
2   ``FLAG_SATURATED``      peak + background >= the saturation level
4   ``FLAG_NEAR_UNDEFINED`` an undefined (NaN) pixel inside the flux aperture:
                            cell gap, broken cell, masked bad pixel
8   ``FLAG_TRUNCATED``      the object or its aperture reaches the image edge
16  ``FLAG_SEP_OTHER``      any other flag sep raised (overflow, singular
                            moments, aperture problems)
==  ======================  =====================================================

Cosmic rays and hot pixels
--------------------------
They pass detection (they are significant), and are removed afterwards as sources much
sharper than the PSF; see :func:`reject_sharp`.
"""

import logging
import math
import time

import numpy as np
import sep
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

COLUMNS = ("X", "Y", "XWIN", "YWIN", "FWHM_IMAGE", "FLUX", "FLUX_ERR", "FLUX_MAX",
           "BACKGROUND", "AWIN_IMAGE", "BWIN_IMAGE", "THETAWIN_IMAGE", "ELONGATION",
           "ELLIPTICITY", "FLAGS", "OTA")


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


def _prepare(image, binning, read_noise):
    """Background-subtracted copy, NaN mask, background and error maps.

    The caller's array is only read: sep needs C-contiguous native float32, and the
    subtraction makes the new array anyway.
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    if not data.dtype.isnative:
        data = data.astype(np.float32)  # FITS big-endian buffers
    undefined = ~np.isfinite(data)
    box = max(8, BACKGROUND_BOX // binning)
    background = sep.Background(data, mask=undefined, bw=box, bh=box, fw=3, fh=3)
    back = background.back(dtype=np.float32)
    rms = background.rms(dtype=np.float32)
    if read_noise:
        # Where nearly all pixels of a mesh are undefined the rms estimate is poor;
        # the pixel noise can never be below the read noise.
        np.maximum(rms, np.float32(read_noise), out=rms)
    # Subtract into the background's buffer: a second 4k x 4k array costs more time
    # (page faults) than the subtraction itself.
    subtracted = np.subtract(data, back, out=back)
    subtracted[undefined] = 0.0
    log.debug("background: box %d px, global %.1f, rms %.2f", box, background.globalback,
              background.globalrms)
    return data, subtracted, undefined, rms


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


def _flags(objects, aperture_flags, saturation_level, saturation):
    """This module's FLAG_* bits from sep's flags and the saturation test.

    ``aperture_flags`` are sep's APER_* bits of the flux aperture and the centroid
    window (OR-ed); ``saturation_level`` is peak + background (image units).
    """
    flags = np.zeros(len(objects), np.int32)
    flags[(objects["flag"] & sep.OBJ_MERGED) != 0] |= FLAG_BLENDED
    if saturation is not None:
        flags[saturation_level >= saturation] |= FLAG_SATURATED
    masked = sep.APER_HASMASKED | sep.APER_ALLMASKED
    flags[(aperture_flags & masked) != 0] |= FLAG_NEAR_UNDEFINED
    flags[((objects["flag"] & sep.OBJ_TRUNC) | (aperture_flags & sep.APER_TRUNC)) != 0] |= FLAG_TRUNCATED
    other = (objects["flag"] & ~(sep.OBJ_MERGED | sep.OBJ_TRUNC)) | (aperture_flags & ~(masked | sep.APER_TRUNC))
    flags[other != 0] |= FLAG_SEP_OTHER
    return flags


def find_sources(image, ota, gain=None, read_noise=None, saturation=None, binning=1,
                 threshold=5.0, moffat_beta=DEFAULT_MOFFAT_BETA, aperture_radius=None,
                 seeing=NOMINAL_SEEING):
    """Detect and measure the sources of one reduced OTA.

    Steps: sep background (mesh ``64 / binning`` px, 3x3 median filter) with the NaN
    pixels masked; extraction on the background-subtracted image at ``threshold``
    times the local background rms after filtering with a Gaussian of the nominal
    seeing (at most 9x9 pixels), minimum area ``max(2, 5 // binning)`` pixels, sep's
    default deblending; half-light radius; windowed centroid; FWHM; aperture flux;
    windowed shape; flags; rejection of sharp sources (:func:`reject_sharp`).

    Parameters
    ----------
    image : numpy.ndarray
        Reduced OTA, 2-d, any float dtype, NaN where there is no data. Not modified.
    ota : int
        OTA number, copied into the ``OTA`` column.
    gain : float, optional
        Electrons per image unit (header ``GAIN``); adds the sources' Poisson noise to
        ``FLUX_ERR``. None: background noise only (SExtractor's ``GAIN = 0``).
    read_noise : float, optional
        Read noise in image units (header ``RDNOISE``): floor of the background rms.
    saturation : float, optional
        Level (image units, including the sky) above which pixels may be saturated
        (header ``SATURATE``). None: no saturation flag.
    binning : int
        Binning factor; scales the background mesh, the minimum area and the kernel.
    threshold : float
        Detection threshold in units of the local background rms (per filtered pixel).
    moffat_beta : float
        Profile assumed to convert the half-light radius to a FWHM (``inf``: Gaussian).
    aperture_radius : float, optional
        Radius (pixels) of the flux aperture. None: 1.5 times the frame's stellar FWHM
        (an aperture of diameter 3 FWHM, 93 % of a beta = 3.5 Moffat's flux).
    seeing : float
        Expected seeing FWHM (arcsec; pixel scale 0.1126"/px x ``binning``): the
        detection kernel is matched to it, and stars are looked for within 0.4-2.5
        times it (:func:`reject_sharp`).

    Returns
    -------
    astropy.table.Table
        One row per source, columns :data:`COLUMNS`:
        ``X``, ``Y`` isophotal barycentre and ``XWIN``, ``YWIN`` windowed centroid
        (pixels, 1-based FITS convention = 0-based + 1); ``FWHM_IMAGE`` (pixels) =
        half-light radius x :func:`fwhm_per_half_light_radius` (``moffat_beta``).
        The conversion is exact for the assumed profile and biased otherwise: a
        Gaussian star comes out 17 % too small with beta = 3.5, a beta = 2.5 Moffat
        12 % too large; pixelisation adds ~1/12 px^2 to the profile's variance.
        ``FLUX``, ``FLUX_ERR`` (image units; circular aperture, centred on the
        windowed position, undefined pixels excluded); ``FLUX_MAX`` (peak above
        background, image units); ``BACKGROUND`` (image units at the source);
        ``AWIN_IMAGE``, ``BWIN_IMAGE`` (windowed rms extent along the axes, pixels),
        ``THETAWIN_IMAGE`` (degrees, counter-clockwise from +x), ``ELONGATION`` =
        A/B, ``ELLIPTICITY`` = 1 - B/A (windowed); ``FLAGS`` (``FLAG_*`` bits);
        ``OTA``. Table meta: ``FWHM`` (stellar median, px), ``NREJECT`` (sharp
        sources removed), ``APERTURE`` (radius used, px).
    """
    start = time.perf_counter()
    original, data, undefined, rms = _prepare(image, binning, read_noise)
    if sep.get_extract_pixstack() < PIXSTACK:
        sep.set_extract_pixstack(PIXSTACK)
    kernel_fwhm = seeing / (PIXEL_SCALE * binning)
    kernel = gaussian_kernel(kernel_fwhm)
    # Plain convolution ('conv') is 3-4 times faster than sep's 'matched' filter. The
    # filtered noise is rms * sqrt(sum k^2) (kernel normalised to sum 1), so scaling the
    # threshold by that factor makes it a threshold in filtered S/N, as 'matched' does
    # where the noise is locally constant (it changes only from cell to cell).
    objects = sep.extract(data, threshold * float(np.sqrt((kernel.astype(np.float64) ** 2).sum())),
                          err=rms, mask=undefined, minarea=max(2, 5 // binning),
                          filter_kernel=kernel, filter_type="conv")
    if len(objects) == 0:
        log.info("OTA %02d: no sources", ota)
        return _table([], {"FWHM": math.nan, "NREJECT": 0, "APERTURE": math.nan})

    x, y = objects["x"], objects["y"]
    # The isophotal extent bounds the light profile; the floor keeps faint sources'
    # radius from being cut off at the noise.
    rmax = np.clip(6 * objects["a"], 2 * kernel_fwhm, 100.0)
    r50, _ = sep.flux_radius(data, x, y, rmax, 0.5, mask=undefined, subpix=5)
    # SExtractor's window: Gaussian with FWHM = the half-light diameter.
    window = np.maximum(2 * r50 / 2.3548, 0.3)
    xwin, ywin, winpos_flags = sep.winpos(data, x, y, window, mask=undefined)
    fwhm = r50 * fwhm_per_half_light_radius(moffat_beta)
    awin, bwin, theta = windowed_shape(data, xwin, ywin, window)

    # S/N of the detection (isophotal flux over its noise) picks the bright sources
    # that define the stellar FWHM; the aperture flux needs that FWHM first.
    iy = np.clip(np.rint(y).astype(int), 0, data.shape[0] - 1)
    ix = np.clip(np.rint(x).astype(int), 0, data.shape[1] - 1)
    noise = rms[iy, ix]
    snr = objects["flux"] / (np.sqrt(np.maximum(objects["npix"], 1)) * noise)
    sharp, stellar_fwhm, _ = reject_sharp(fwhm, bwin, snr, kernel_fwhm)
    radius = aperture_radius if aperture_radius is not None else 1.5 * (
        stellar_fwhm if math.isfinite(stellar_fwhm) else kernel_fwhm)
    flux, flux_err, aperture_flags = sep.sum_circle(data, xwin, ywin, radius, err=rms,
                                                    mask=undefined, gain=gain, subpix=5)
    stellar = ~sharp & (snr >= STELLAR_SNR) & (objects["flag"] == 0)
    concentrated = reject_concentrated(objects["peak"], flux, noise, stellar)
    keep = ~sharp & ~concentrated & ~duplicates(xwin, ywin, objects["flux"])

    background = original[iy, ix] - data[iy, ix]
    flags = _flags(objects, aperture_flags | winpos_flags, objects["peak"] + background, saturation)
    table = _table(
        [x + 1, y + 1, xwin + 1, ywin + 1, fwhm, flux, flux_err, objects["peak"], background,
         awin, bwin, theta, awin / bwin, 1 - bwin / awin, flags,
         np.full(len(flux), ota, np.int16)],
        {"FWHM": stellar_fwhm, "NREJECT": int((~keep).sum()), "APERTURE": float(radius)})[keep]
    log.info("OTA %02d: %d sources (%d sharp, %d concentrated, %d duplicates removed), "
             "FWHM %.2f px, aperture radius %.2f px, %.2f s", ota, len(table), sharp.sum(),
             (concentrated & ~sharp).sum(), (~keep & ~sharp & ~concentrated).sum(),
             stellar_fwhm, radius, time.perf_counter() - start)
    return table


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
    return table
