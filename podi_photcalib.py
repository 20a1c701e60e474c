"""Photometric calibration of a frame (``-photcalib``): the zero point from a reference catalog.

:func:`calibrate` works on catalog level only (no pixels): it takes the frame's
source catalog ``CAT.ODI`` (instrumental aperture magnitudes, FLAGS, positions after
the WCS calibration) and a reference catalog as :mod:`podi_ipprefcat` returns it, and
returns the primary-header keywords (the original's, with a better estimator: see
below) and the ``CAT.PHOTCALIB`` table.

1. The filter's reference band (:data:`REFERENCE_BAND`); none (narrow-band filters)
   or a catalog without that band: no calibration.
2. Calibration stars: clean sources (``FLAGS == 0``) with a 3"-diameter aperture
   magnitude ``MAG_D30`` no more uncertain than ``max_error``, and reference stars
   with the band no more uncertain than that either.
3. One-to-one nearest-neighbour matching within 2" of true angular distance
   (:func:`podi_sphere.match_radec`: RA 0/360 and high declinations need no special care).
4. Optional colour term, per star zero point normalised to 1 s, iterative clipping
   and an inverse-variance weighted mean (see :func:`combine_zeropoints`).

Zero point convention
---------------------
The convention of the whole program (``docs/conventions.md``). ``PHOTZP`` keeps the
original's meaning: the zero point of the 3"-diameter aperture, without aperture
correction, for 1 s of ``EXPTIME``: m = PHOTZP + MAG_D30 + 2.5 log10(EXPTIME), with
``MAG_D30`` = -2.5 log10(ADU in the whole exposure).
``PHOTZP_X`` is the same for the whole exposure. The caller adds the aperture
correction ``APCORR`` (3" aperture to total flux) for calibrated catalogs and for
the sky brightness and depth (:func:`sky_brightness`, :func:`point_source_depth`).

Keywords
--------
Success: ``PHOTCAL = T``, ``PHOTMCAT``, ``PHOTBAND``, ``PHOTZP``, ``PHOTZPER``,
``PHOTZPSD``, ``PHOTZPSP``/``PHOTZPSM`` (84th/16th percentiles), ``PHOTZPXS`` (scatter
beyond the errors), ``PHOTZP_N`` (kept), ``PHOTZPN0`` (matched), ``PHOTZP_X``, the
aliases ``MAGZERO``/``MAGZSIG``/``MAGZERR``, ``MAGZREF`` (g r i z), ``MAGZ_AM1`` (with
an airmass), ``MAGZ_CT``, ``MAGZ_COL``, ``SEEINGZP``/``SEEZP_N`` (of the kept stars; ``SEEING`` of
all stars is :mod:`podi_framecalib`'s)
and, with a radial centre, ``RADZPFIT``, ``RADZP_P0/P1/E0/E1``.
Failure: ``PHOTCAL = F``, ``PHOTMSG`` (why), ``PHOTMCAT``, ``PHOTZPN0``; no zero point.

Estimator
---------
The original took the median of the clipped zero points and their standard deviation.
Here ``PHOTZP`` is the weighted mean with weights 1/(err^2 + s^2), where s is the
scatter beyond the stated errors: unbiased for symmetric errors, about 1.25 times more
precise than the median, and its error 1/sqrt(sum w) (times sqrt(reduced chi^2) when
that exceeds 1) is an honest standard error that the tests check against the truth.
Clipping works on residuals normalised by sqrt(err^2 + s^2), because the per-star
errors of bright and faint stars differ by ten times.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

import podi_findstars
from podi_ipprefcat import filled
from podi_mef import text_keyword
from podi_sphere import angular_distance, match_radec

logger = logging.getLogger(__name__)

#: Reference-catalog band of each ODI filter (the original's ``sdss_equivalents``).
REFERENCE_BAND = {"odi_g": "g", "odi_r": "r", "odi_i": "i", "odi_z": "z", "odi_u": "u",
                  "sdss_u": "u", "mosaic_u": "u", "Us_solid": "u"}
#: Atmospheric extinction (mag/airmass) for ``MAGZ_AM1``. g r i z are the original's
#: values; u (which the original lacked) is the typical Kitt Peak / SDSS u-band value.
EXTINCTION = {"u": 0.50, "g": 0.20, "r": 0.12, "i": 0.058, "z": 0.04}
#: The original's colour terms, filter -> (c, band1, band2):
#: m_ref <- m_ref - c (m_band1 - m_band2). Off unless asked for (``-colourterms``):
#: they belong to SDSS and the original's filters (the simulator applies no colour
#: terms, so its frames calibrate without them).
ORIGINAL_COLOUR_TERMS = {"odi_g": (0.16, "g", "r"), "odi_z": (-0.1277, "i", "z")}
#: The original's reference zero points (mag, 1 s, 3" aperture), keyword ``MAGZREF``.
MAGZREF = {"g": 26.0, "r": 26.1, "i": 25.6, "z": 24.6}
#: Aperture diameter tags of ``CAT.ODI`` (0.5 ... 3.5 arcsec) and the calibration one.
APERTURES = ("05", "08", "10", "15", "20", "25", "30", "35")
CALIBRATION_APERTURE = "30"
BANDS = "ugriz"



#: With this many matched stars or fewer the zero points are not clipped (as in the original).
MAX_UNCLIPPED = 5
CLIP_SIGMA = 3.0
MAX_CLIP_ITERATIONS = 10
#: |x| of a standard normal variable has this median: a robust unit scatter.
_NORMAL_MEDIAN_ABS = 0.6744897501960817

#: ``-fitradialZP``: inner region (deg), stars outside needed for the reference level,
#: largest deviation used in the fit (mag), fewest stars for a fit (the original's values).
RADIAL_LIMIT_DEG = 0.3
RADIAL_MIN_OUTER = 16
RADIAL_MAX_DEVIATION = 0.3
RADIAL_MIN_STARS = 3
#: Offset (deg) of the original's radial centre from the first extension's CRVAL.
_RADIAL_CENTRE_OFFSET_DEG = 240.0 / 3600.0



@dataclass
class PhotCalibration:
    """Result of :func:`calibrate`.

    Attributes
    ----------
    success : bool
        True if a zero point was determined (``PHOTCAL``).
    message : str
        One line: why the calibration failed, or a summary.
    keywords : dict
        Primary-header keyword -> (value, comment).
    table : astropy.table.Table
        ``CAT.PHOTCALIB``, one row per matched star (no rows when nothing matched).
    zeropoint : float
        ``PHOTZP`` (mag, 3" aperture, 1 s); NaN on failure.
    zeropoint_error : float
        ``PHOTZPER`` (mag); NaN on failure.
    """

    success: bool
    message: str
    keywords: dict
    table: Table
    zeropoint: float = math.nan
    zeropoint_error: float = math.nan


def reference_band(filter_name):
    """Reference-catalog band (``'u'`` ... ``'z'``) of an ODI filter, None if it has none."""
    return REFERENCE_BAND.get(str(filter_name).strip())


def radial_zeropoint_centre(crval1, crval2):
    """Centre (RA, Dec in deg) of the original's ``-fitradialZP``, from the first
    extension's CRVAL1/CRVAL2 (deg): 240" east and 240" south of it."""
    ra = (crval1 + _RADIAL_CENTRE_OFFSET_DEG / math.cos(math.radians(crval2))) % 360.0
    return ra, crval2 - _RADIAL_CENTRE_OFFSET_DEG


# --- Catalogs --------------------------------------------------------------------------

def clean_sources(sources, max_error):
    """Indices of the sources usable for the calibration.

    Parameters
    ----------
    sources : astropy.table.Table
        ``CAT.ODI``.
    max_error : float
        Largest ``MAGERR_D30`` accepted (mag).

    Returns
    -------
    ndarray of int
        Rows with ``FLAGS == 0``, finite position and finite ``MAG_D30`` with
        ``MAGERR_D30 <= max_error``.
    """
    mag = filled(sources[f"MAG_D{CALIBRATION_APERTURE}"])
    err = filled(sources[f"MAGERR_D{CALIBRATION_APERTURE}"])
    usable = ((np.asarray(sources["FLAGS"]) == 0) & np.isfinite(mag) & (err <= max_error)
              & np.isfinite(filled(sources["RA"])) & np.isfinite(filled(sources["DEC"])))
    return np.flatnonzero(usable)


def _band_error(reference, band):
    # A catalog without errors is trusted (its stars pass any error cut).
    if f"{band}_err" in reference.colnames:
        return filled(reference[f"{band}_err"])
    return np.zeros(len(reference))


def reference_magnitudes(reference, band, colour_term=None):
    """Reference magnitude in the filter's system and its error, per reference star.

    Parameters
    ----------
    reference : astropy.table.Table
        Reference catalog with ``<band>`` and ``<band>_err`` columns (mag).
    band : str
        Reference band of the filter.
    colour_term : (float, str, str), optional
        (c, band1, band2): m = m_band - c (m_band1 - m_band2), the original's form.

    Returns
    -------
    mag, err : ndarray
        mag (NaN where a band is missing) and its error (mag), propagated from the
        errors of every band involved (the colour shares a band with m_band, so the
        bands' coefficients are summed first).
    """
    coefficients = {band: 1.0}
    if colour_term is not None:
        c, band1, band2 = colour_term
        coefficients[band1] = coefficients.get(band1, 0.0) - c
        coefficients[band2] = coefficients.get(band2, 0.0) + c
    mag = np.zeros(len(reference))
    variance = np.zeros(len(reference))
    for name, coefficient in coefficients.items():
        mag += coefficient * filled(reference[name])
        variance += (coefficient * _band_error(reference, name)) ** 2
    return mag, np.sqrt(variance)


# --- Statistics ------------------------------------------------------------------------

def star_zeropoints(mag_ref, err_ref, mag_inst, err_inst, exptime):
    """Per-star zero point normalised to 1 s and its error (mag).

    zp = m_ref - (m_inst + 2.5 log10(exptime)); err = hypot(err_ref, err_inst), where
    m_inst = -2.5 log10(ADU in the exposure) and exptime is in s.
    """
    zp = mag_ref - (mag_inst + 2.5 * math.log10(exptime))
    return zp, np.hypot(err_ref, err_inst)


def excess_scatter(residual, error):
    """Scatter s (mag) beyond the stated errors, from the robust spread of residuals.

    s >= 0 is chosen so that the residuals normalised by sqrt(error^2 + s^2) have the
    median absolute value of a unit normal distribution (0.674); s = 0 when they are
    already no wider than that. Unlike s^2 = var - mean(error^2), this holds for
    errors that differ from star to star and ignores outliers.
    """
    residual, error = np.abs(residual), np.asarray(error)

    def excess(s):
        return np.median(residual / np.sqrt(error**2 + s**2)) - _NORMAL_MEDIAN_ABS

    if len(residual) == 0 or excess(0.0) <= 0:
        return 0.0
    # At s = median|r| / 0.674 the normalised median is below 0.674 whatever the errors.
    # scipy.optimize costs 0.2 s of start-up, which only -photcalib runs should pay.
    from scipy.optimize import brentq
    return float(brentq(excess, 0.0, np.median(residual) / _NORMAL_MEDIAN_ABS))


def combine_zeropoints(zp, err):
    """Inverse-variance weighted mean of per-star zero points.

    Parameters
    ----------
    zp, err : ndarray
        Zero points and their errors (mag), at least one.

    Returns
    -------
    mean, error, scatter : float
        Weighted mean with weights 1/(err^2 + s^2), its standard error 1/sqrt(sum w)
        multiplied by sqrt(reduced chi^2) when that exceeds 1, and the excess
        scatter s (:func:`excess_scatter` about the median), all in mag.
    """
    scatter = excess_scatter(zp - np.median(zp), err)
    weight = 1.0 / (err**2 + scatter**2)
    mean = float(np.sum(weight * zp) / np.sum(weight))
    error = 1.0 / math.sqrt(np.sum(weight))
    if len(zp) > 1:
        reduced_chi2 = float(np.sum(weight * (zp - mean) ** 2)) / (len(zp) - 1)
        error *= math.sqrt(max(reduced_chi2, 1.0))
    return mean, error, scatter


def clip_zeropoints(zp, err):
    """Mask of the zero points kept by iterative 3-sigma clipping.

    Nothing is clipped for :data:`MAX_UNCLIPPED` stars or fewer. Otherwise a star
    is rejected when |zp - centre| > 3 sqrt(err^2 + s^2); the first centre is the
    median (robust to the outliers still present), later ones the weighted mean and s
    of the stars kept (:func:`combine_zeropoints`), until the selection is stable.
    """
    keep = np.ones(len(zp), bool)
    if len(zp) <= MAX_UNCLIPPED:
        return keep
    centre = float(np.median(zp))
    scatter = excess_scatter(zp - centre, err)
    for _ in range(MAX_CLIP_ITERATIONS):
        new_keep = np.abs(zp - centre) <= CLIP_SIGMA * np.hypot(err, scatter)
        if not new_keep.any() or np.array_equal(new_keep, keep):
            break
        keep = new_keep
        centre, _, scatter = combine_zeropoints(zp[keep], err[keep])
    return keep


def fit_radial_zeropoint(ra, dec, zp, err, centre):
    """Linear fit of the zero point against distance from a centre (``-fitradialZP``).

    Parameters
    ----------
    ra, dec : ndarray
        Positions of the calibration stars (deg).
    zp, err : ndarray
        Their zero points and errors (mag).
    centre : (float, float)
        RA, Dec of the centre (deg), e.g. :func:`radial_zeropoint_centre`.

    Returns
    -------
    dict
        Keywords ``RADZPFIT`` and, if fitted, ``RADZP_P0``, ``RADZP_P1`` (mag, mag/deg)
        and their 1-sigma errors ``RADZP_E0``, ``RADZP_E1``. The fit is
        (zp - ref) = p0 + p1 r by error-weighted least squares over stars with
        r < 0.3 deg and |zp - ref| < 0.3 mag, where ref is the median zero point of
        the stars beyond 0.3 deg if there are more than 15 of them, else of all; the
        errors are scaled by sqrt(reduced chi^2) when that exceeds 1.
    """
    r = angular_distance(ra, dec, *centre)
    outer = r > RADIAL_LIMIT_DEG
    level = np.median(zp[outer] if outer.sum() >= RADIAL_MIN_OUTER else zp)
    use = (r < RADIAL_LIMIT_DEG) & (np.abs(zp - level) < RADIAL_MAX_DEVIATION)
    if use.sum() < RADIAL_MIN_STARS:
        return {"RADZPFIT": (False, f"radial ZP fit: fewer than {RADIAL_MIN_STARS} stars")}
    design = np.column_stack([np.ones(use.sum()), r[use]]) / err[use, None]
    target = (zp[use] - level) / err[use]
    params, *_ = np.linalg.lstsq(design, target, rcond=None)
    covariance = np.linalg.inv(design.T @ design)
    if use.sum() > 2:
        reduced_chi2 = float(np.sum((target - design @ params) ** 2)) / (use.sum() - 2)
        covariance *= max(reduced_chi2, 1.0)
    p0, p1 = params
    e0, e1 = np.sqrt(np.diag(covariance))
    return {
        "RADZPFIT": (True, "radial ZP fit done (reported, not applied)"),
        "RADZP_P0": (round(float(p0), 5), "[mag] radial ZP fit: offset at centre"),
        "RADZP_P1": (round(float(p1), 5), "[mag/deg] radial ZP fit: slope"),
        "RADZP_E0": (round(float(e0), 5), "[mag] error of RADZP_P0"),
        "RADZP_E1": (round(float(e1), 5), "[mag/deg] error of RADZP_P1"),
    }


# --- Sky brightness and depth ------------------------------------------------------------

def sky_brightness(sky_level, pixel_scale, zp_total_exposure):
    """Surface brightness of the sky (mag/arcsec^2).

    SKYMAG = zp_total_exposure - 2.5 log10(sky_level / pixel_scale^2).

    Parameters
    ----------
    sky_level : float or ndarray
        Sky in ADU per pixel in the whole exposure.
    pixel_scale : float
        arcsec/pixel.
    zp_total_exposure : float
        Zero point of the exposure for total flux (``PHOTZP_X + APCORR``, mag): the sky
        is extended, so no aperture loses any of it.

    Returns
    -------
    float or ndarray
        NaN where the sky is not positive.
    """
    sky_level = np.asarray(sky_level, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitude = zp_total_exposure - 2.5 * np.log10(sky_level / pixel_scale**2)
    return np.where(sky_level > 0, magnitude, np.nan)[()]


def point_source_depth(sky_noise, pixel_scale, seeing, zp_total_exposure, nsigma=5.0,
                       moffat_beta=3.5):
    """Magnitude of the faintest point source detected at ``nsigma`` (``PHOTDPTH``).

    Background-limited detection in a circular aperture of radius = seeing FWHM (the
    original's aperture): noise = sky_noise sqrt(pi (seeing / pixel_scale)^2); the
    aperture holds the fraction f of a Moffat(beta) PSF (:func:`podi_findstars.moffat_enclosed`),
    so the total flux needed is nsigma noise / f and
    depth = zp_total_exposure - 2.5 log10(nsigma noise / f).

    Parameters
    ----------
    sky_noise : float
        Pixel noise of the background (ADU, read noise included).
    pixel_scale : float
        arcsec/pixel.
    seeing : float
        PSF FWHM (arcsec).
    zp_total_exposure : float
        Zero point of the exposure for total flux (``PHOTZP_X + APCORR``, mag).
    nsigma : float
        Detection significance.
    moffat_beta : float
        Moffat beta of the PSF (> 1).

    Returns
    -------
    float
        Depth (mag); NaN when the noise or seeing is not positive.
    """
    if not (sky_noise > 0 and seeing > 0):
        return math.nan
    noise = sky_noise * math.sqrt(math.pi * (seeing / pixel_scale) ** 2)
    flux = nsigma * noise / podi_findstars.moffat_enclosed(seeing, seeing, moffat_beta)
    return zp_total_exposure - 2.5 * math.log10(flux)


def aperture_correction(psf, seeing, moffat_beta=3.5):
    """``APCORR``: from the 3" aperture to total flux, in mag (positive).

    Parameters
    ----------
    psf : podi_findstars.MoffatFit or None
        The frame's Moffat profile fitted to the bright stars' curves of growth
        (radii in arcsec); it also gives the light beyond the largest aperture.
    seeing : float
        FWHM (arcsec) of a Moffat(``moffat_beta``) profile to use without ``psf``.

    Returns
    -------
    dict
        ``APCORR``, ``APCORRER`` (its error; -1 for the assumed profile) and
        ``APCORR_N`` (stars behind the fit).
    """
    radius = float(CALIBRATION_APERTURE) / 20  # tag 30: 3.0" diameter
    if psf is not None:
        value, error = psf.total_correction(radius)
        comment, n_stars = "[mag] 3\" aperture to total, fitted Moffat", psf.n_stars
    else:
        value = -2.5 * math.log10(podi_findstars.moffat_enclosed(radius, seeing, moffat_beta))
        error, n_stars = -1.0, 0
        comment = f"[mag] 3\" to total: assumed Moffat beta={moffat_beta:g}"
    return {"APCORR": (round(value, 5), comment),
            "APCORRER": (round(error, 5), "[mag] error of APCORR (-1: assumed profile)"),
            "APCORR_N": (n_stars, "bright isolated stars behind APCORR")}


def sky_and_depth(zp_total_exposure, sky_level, sky_noise, pixel_scale, seeing, moffat_beta=3.5):
    """``SKYMAG`` and ``PHOTDPTH`` keywords (:func:`sky_brightness`, :func:`point_source_depth`).

    Parameters are those functions' (ADU, arcsec/pixel, arcsec); non-finite results are
    left out.
    """
    keywords = {}
    skymag = sky_brightness(sky_level, pixel_scale, zp_total_exposure)
    if np.isfinite(skymag):
        keywords["SKYMAG"] = (round(float(skymag), 4), "[mag/arcsec2] sky surface brightness")
    depth = point_source_depth(sky_noise, pixel_scale, seeing, zp_total_exposure,
                               moffat_beta=moffat_beta)
    if math.isfinite(depth):
        keywords["PHOTDPTH"] = (round(depth, 4), "[mag] 5-sigma point-source depth, r=FWHM")
    return keywords


# --- CAT.PHOTCALIB ---------------------------------------------------------------------

def photcalib_table(sources, reference, src_index, ref_index, zp, err, used, match_radius):
    """``CAT.PHOTCALIB``: one row per matched star.

    Columns: ``ODI_RA ODI_DEC REF_RA REF_DEC`` (deg), ``OTA``, instrumental
    ``ODI_MAG_nn``/``ODI_ERR_nn`` of every aperture, ``REF_MAG_U..Z``/``REF_ERR_U..Z``
    (NaN where the catalog lacks them), ``ODI_FWHM`` (deg), the per-star ``ZP`` and
    ``ZP_ERR`` (mag, 1 s) and ``ZP_USED`` (kept by the clipping). The original called
    the reference columns ``SDSS_*``; they are ``REF_*`` because the catalog need not
    be SDSS (as in ``WCSCAL.CAT``).
    """
    table = Table(meta={"EXTNAME": "CAT.PHOTCALIB", "MATCHRAD": match_radius})
    table["ODI_RA"] = filled(sources["RA"])[src_index]
    table["ODI_DEC"] = filled(sources["DEC"])[src_index]
    table["REF_RA"] = filled(reference["ra"])[ref_index]
    table["REF_DEC"] = filled(reference["dec"])[ref_index]
    table["OTA"] = np.asarray(sources["OTA"], np.int16)[src_index]
    for aperture in APERTURES:
        for prefix, name in (("ODI_MAG", "MAG_D"), ("ODI_ERR", "MAGERR_D")):
            values = filled(sources[f"{name}{aperture}"])[src_index]
            table[f"{prefix}_{aperture}"] = values.astype(np.float32)
    for band in BANDS:
        for prefix, name in (("REF_MAG", band), ("REF_ERR", f"{band}_err")):
            values = (filled(reference[name]) if name in reference.colnames
                      else np.full(len(reference), np.nan))
            table[f"{prefix}_{band.upper()}"] = values[ref_index].astype(np.float32)
    table["ODI_FWHM"] = filled(sources["FWHM_WORLD"])[src_index]
    table["ZP"] = np.asarray(zp, np.float32)
    table["ZP_ERR"] = np.asarray(err, np.float32)
    table["ZP_USED"] = np.asarray(used, bool)
    for name in table.colnames:
        if name.endswith(("_RA", "_DEC", "_FWHM")):
            table[name].unit = "deg"
        elif name.startswith(("ODI_MAG", "ODI_ERR", "REF_MAG", "REF_ERR", "ZP")) and name != "ZP_USED":
            table[name].unit = "mag"
    return table


# --- Header keywords ---------------------------------------------------------------------

def _catalog_keyword(catalog_name):
    return text_keyword(catalog_name, "reference catalog for the photometry", keep_end=True)


def _failure(message, catalog_name, table, n_matched=0):
    logger.warning("photometric calibration failed: %s", message)
    keywords = {
        "PHOTCAL": (False, "photometric calibration done"),
        "PHOTMSG": text_keyword(message, "why there is no zero point"),
        "PHOTMCAT": _catalog_keyword(catalog_name),
        "PHOTZPN0": (int(n_matched), "stars matched to the reference catalog"),
    }
    return PhotCalibration(False, message, keywords, table)


def _colour_name(colour_term):
    return "none" if colour_term is None else f"{colour_term[1]}-{colour_term[2]}"


def _zeropoint_keywords(kept, n_matched, mean, error, scatter, exptime, band, airmass,
                        colour_term):
    """Keywords of the zero point (``mean``, ``error``, ``scatter`` of the ``kept`` per-star
    zero points, mag) and its statistics: the original's ``PHOTZP*``/``MAGZ*`` set."""
    spread = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    low, high = np.percentile(kept, [16, 84])
    exposure_zp = mean + 2.5 * math.log10(exptime)
    keywords = {
        "PHOTBAND": (band, "reference catalog band"),
        "PHOTZP": (round(mean, 5), "[mag] ZP 3\" diam. aperture, 1 s, no apcorr"),
        "PHOTZPER": (round(error, 5), "[mag] standard error of PHOTZP"),
        "PHOTZPSD": (round(spread, 5), "[mag] std of the per-star ZPs used"),
        "PHOTZPSP": (round(float(high), 5), "[mag] 84th percentile of per-star ZPs"),
        "PHOTZPSM": (round(float(low), 5), "[mag] 16th percentile of per-star ZPs"),
        "PHOTZPXS": (round(scatter, 5), "[mag] ZP scatter beyond the errors"),
        "PHOTZP_N": (len(kept), "stars used for PHOTZP (after clipping)"),
        "PHOTZPN0": (n_matched, "stars matched to the reference catalog"),
        "PHOTZP_X": (round(exposure_zp, 5), "[mag] ZP of this exposure (ADU), 3\" ap."),
        "MAGZERO": (round(mean, 5), "[mag] = PHOTZP"),
        "MAGZSIG": (round(spread, 5), "[mag] = PHOTZPSD"),
        "MAGZERR": (round(error, 5), "[mag] = PHOTZPER"),
    }
    if band in MAGZREF:
        keywords["MAGZREF"] = (MAGZREF[band], "[mag] reference ZP of the filter (1 s)")
    if airmass is not None and band in EXTINCTION:
        keywords["MAGZ_AM1"] = (round(mean + (airmass - 1.0) * EXTINCTION[band], 5),
                                f"[mag] PHOTZP at airmass 1, k={EXTINCTION[band]}")
    keywords["MAGZ_CT"] = (0.0 if colour_term is None else float(colour_term[0]),
                           "colour-term coefficient")
    keywords["MAGZ_COL"] = (_colour_name(colour_term), "colour of the colour term")
    return keywords


# --- The calibration ---------------------------------------------------------------------

def calibrate(sources, reference, filter_name, exptime, airmass=None, catalog_name="unknown",
              colour_terms=None, match_radius=2.0, max_error=0.05, min_stars=5,
              radial_centre=None):
    """Photometric zero point of one frame from its source and reference catalogs.

    Parameters
    ----------
    sources : astropy.table.Table
        ``CAT.ODI``: ``RA``, ``DEC`` (deg), ``FLAGS``, ``OTA``, ``FWHM_WORLD`` (deg),
        ``MAG_Dnn``/``MAGERR_Dnn`` (instrumental: -2.5 log10(ADU in the exposure)).
    reference : astropy.table.Table
        Reference catalog: ``ra``, ``dec`` (deg), magnitudes ``u g r i z`` and errors
        ``u_err`` ... ``z_err`` where it has them (masked or NaN entries allowed).
    filter_name : str
        ODI filter, e.g. ``odi_r``.
    exptime : float
        ``EXPTIME`` (s), > 0.
    airmass : float, optional
        ``AIRMASS``; without it ``MAGZ_AM1`` is not written.
    catalog_name : str
        Name or path of the reference catalog (``PHOTMCAT``; its last 68 characters).
    colour_terms : dict, optional
        Filter -> (c, band1, band2); None (the default): no colour terms, since
        :data:`ORIGINAL_COLOUR_TERMS` belong to SDSS and the original's filters.
    match_radius : float
        Largest source-reference distance (arcsec).
    max_error : float
        Largest magnitude error (mag) of a calibration star, instrumental and reference.
    min_stars : int
        Fewest stars kept after clipping for a zero point.
    radial_centre : (float, float), optional
        RA, Dec (deg) of the centre for the radial zero-point fit (``-fitradialZP``).

    Returns
    -------
    PhotCalibration
        Never raises for missing data: failures have ``success = False``, ``PHOTCAL = F``,
        ``PHOTMSG`` and no ``PHOTZP``.
    """
    if not exptime > 0:
        raise ValueError(f"EXPTIME must be positive for a zero point, got {exptime}")
    no_match = np.empty(0, int)

    def empty_table():
        return photcalib_table(sources, reference, no_match, no_match, [], [], [], match_radius)

    band = reference_band(filter_name)
    if band is None:
        return _failure(f"filter {filter_name} has no reference band", catalog_name, empty_table())
    if band not in reference.colnames or not np.isfinite(filled(reference[band])).any():
        return _failure(f"reference catalog has no {band} magnitudes", catalog_name, empty_table())
    colour_term = (colour_terms or {}).get(filter_name)
    if colour_term is not None and not {colour_term[1], colour_term[2]} <= set(reference.colnames):
        return _failure(f"reference catalog has no {_colour_name(colour_term)} colour",
                        catalog_name, empty_table())

    ref_mag, ref_err = reference_magnitudes(reference, band, colour_term)
    usable_ref = np.flatnonzero(np.isfinite(ref_mag) & (_band_error(reference, band) <= max_error))
    if len(usable_ref) == 0:
        return _failure(f"no reference stars with {band} error <= {max_error} mag",
                        catalog_name, empty_table())
    clean = clean_sources(sources, max_error)
    src_pairs, ref_pairs = match_radec(
        filled(sources["RA"])[clean], filled(sources["DEC"])[clean],
        filled(reference["ra"])[usable_ref], filled(reference["dec"])[usable_ref], match_radius)
    src_index, ref_index = clean[src_pairs], usable_ref[ref_pairs]

    aperture = CALIBRATION_APERTURE
    zp, err = star_zeropoints(ref_mag[ref_index], ref_err[ref_index],
                              filled(sources[f"MAG_D{aperture}"])[src_index],
                              filled(sources[f"MAGERR_D{aperture}"])[src_index], exptime)
    keep = clip_zeropoints(zp, err)
    table = photcalib_table(sources, reference, src_index, ref_index, zp, err, keep, match_radius)
    if keep.sum() < min_stars:
        return _failure(f"{keep.sum()} calibration stars ({len(zp)} matched), {min_stars} needed",
                        catalog_name, table, len(zp))

    keywords = {"PHOTCAL": (True, "photometric calibration done"),
                "PHOTMCAT": _catalog_keyword(catalog_name)}
    mean, error, scatter = combine_zeropoints(zp[keep], err[keep])
    keywords.update(_zeropoint_keywords(zp[keep], len(zp), mean, error, scatter, exptime, band,
                                        airmass, colour_term))
    seeing, n_seeing = podi_findstars.clipped_seeing(table["ODI_FWHM"][keep])
    if n_seeing:
        keywords["SEEINGZP"] = (round(seeing, 4), "[arcsec] clipped median FWHM of ZP stars")
        keywords["SEEZP_N"] = (n_seeing, "stars behind SEEINGZP")
    if radial_centre is not None:
        # Weighted by the full per-star uncertainty, as PHOTZP is.
        keywords.update(fit_radial_zeropoint(
            np.asarray(table["ODI_RA"])[keep], np.asarray(table["ODI_DEC"])[keep], zp[keep],
            np.hypot(err[keep], scatter), radial_centre))
    message = (f"PHOTZP = {mean:.4f} +- {error:.4f} mag ({band}, {keep.sum()} of "
               f"{len(zp)} matched stars)")
    logger.info("photometric calibration: %s", message)
    return PhotCalibration(True, message, keywords, table, mean, error)
