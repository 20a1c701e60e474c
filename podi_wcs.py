"""Telescope pointing and canned (pre-computed) WCS solutions of the OTAs.

A *canned WCS* file is a "mini-MEF": an empty primary HDU and one data-less IMAGE
extension per OTA, ``EXTNAME = OTA<xy>.SCI``, holding a TAN/TPV solution whose
``CRVAL1/2`` is not a sky position but the offset (degrees) of the tangent point
from the telescope pointing, as the original's ``podi_scamp2minifits`` wrote them.
:func:`ota_wcs_header` turns one such extension plus the raw header's ``RA``/``DEC``
into the final WCS of an OTA: the tangent point is the pointing *minus* the stored
offset (``docs/conventions.md`` says why).

Pixel conventions
-----------------
``CRPIX`` values are FITS pixel coordinates (1-based, pixel centres at integers);
everything else in this package is 0-based numpy ``[y, x]``, so 0-based pixel
``(x, y)`` is FITS pixel ``(x + 1, y + 1)``. astropy's ``pixel_to_world`` and
``world_to_pixel`` use 0-based coordinates.

Run ``python -m podi_wcs [OUTDIR]`` to regenerate the shipped model files
``wcs/<layout>/*.fits`` and their ``wcs.history`` from :mod:`podi_definitions`.
"""

import logging
import math
import re
import sys
from pathlib import Path

from astropy.io import fits

import podi_definitions as pd
import podi_history
from podi_sphere import wrap_180

logger = logging.getLogger(__name__)

#: File name of the project's model solution for each layout.
MODEL_FILENAMES = {pd.PODI.name: "podi_model.fits", pd.ODI_5X6.name: "odi5x6_model.fits"}

HISTORY_FILENAME = "wcs.history"

_EXTNAME = re.compile(r"OTA(\d\d)\.SCI", re.IGNORECASE)
_PV_KEY = re.compile(r"PV([12])_(\d+)")
_SEXAGESIMAL = re.compile(r"\s*([+-]?)(\d+):(\d+):(\d+(?:\.\d*)?)\s*")
_REQUIRED = ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")
_STATISTICS = ("ASTIRMS1", "ASTIRMS2", "ASTRRMS1", "ASTRRMS2")
_N_MODEL_PV = 11  # PVi_0 .. PVi_10: every TPV term up to third order


# --- Telescope pointing -------------------------------------------------------------

#: keyword -> (degrees per sexagesimal unit, largest leading field, expected form)
_POINTING_KEYS = {"RA": (15.0, 24, "'HH:MM:SS.sss'"), "DEC": (1.0, 90, "'+DD:MM:SS.ss'")}


def parse_angle(key, value):
    """``RA`` (hours, sexagesimal) or ``DEC`` (degrees) of a raw header in degrees; a number
    is taken as degrees. Raises ValueError naming the keyword."""
    # Header values are numbers (degrees) or sexagesimal strings (hours for RA).
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    unit_deg, max_lead, form = _POINTING_KEYS[key]
    match = _SEXAGESIMAL.fullmatch(str(value))
    if not match:
        raise ValueError(f"cannot parse {key} = {value!r}: expected {form} or degrees")
    sign, lead, minutes, seconds = match.groups()
    if int(lead) > max_lead or int(minutes) >= 60 or float(seconds) >= 60:
        raise ValueError(f"{key} = {value!r} is out of range")
    magnitude = int(lead) + int(minutes) / 60 + float(seconds) / 3600
    return (-1 if sign == "-" else 1) * magnitude * unit_deg


def parse_pointing(header):
    """Telescope pointing from the raw header's ``RA`` and ``DEC``.

    Parameters
    ----------
    header : mapping
        Raw primary header. ``RA`` is ``'HH:MM:SS.sss'`` (hours), ``DEC`` is
        ``'+DD:MM:SS.ss'`` (degrees); either may instead be a number in degrees.
        Both are ICRS/J2000 and used as they are (no precession).

    Returns
    -------
    tuple of float
        ``(ra_deg, dec_deg)``, RA in [0, 360).

    Raises
    ------
    ValueError
        If a keyword is missing, unparsable or out of range.
    """
    values = []
    for key in _POINTING_KEYS:
        if header.get(key) is None:
            raise ValueError(f"raw header has no {key} keyword (telescope pointing)")
        values.append(parse_angle(key, header[key]))
    ra, dec = values
    if not -90 <= dec <= 90:
        raise ValueError(f"DEC = {header['DEC']!r} is out of range")
    return _wrap_360(ra), dec


def format_pointing(ra_deg, dec_deg):
    """Header strings for a pointing: RA ``'HH:MM:SS.sss'``, DEC ``'+DD:MM:SS.ss'``.

    RA is rounded to 0.001 s, DEC to 0.01 arcsec, so that
    ``format_pointing(*parse_pointing(...))`` reproduces the strings exactly.
    """
    # Round once in the last written unit, then split, so a carry never yields '60'.
    ms = round(_wrap_360(ra_deg) / 15 * 3600e3) % (24 * 3600 * 1000)
    hours, ms = divmod(ms, 3600 * 1000)
    minutes, ms = divmod(ms, 60 * 1000)
    ra = f"{hours:02d}:{minutes:02d}:{ms / 1000:06.3f}"
    centi = round(abs(dec_deg) * 3600e2)
    sign = "-" if dec_deg < 0 and centi else "+"
    degrees, centi = divmod(centi, 3600 * 100)
    arcmin, centi = divmod(centi, 60 * 100)
    return ra, f"{sign}{degrees:02d}:{arcmin:02d}:{centi / 100:05.2f}"


def _wrap_360(angle):
    wrapped = angle % 360.0
    return 0.0 if wrapped >= 360.0 else wrapped  # -1e-17 % 360 rounds to 360.0


# --- Canned WCS files -------------------------------------------------------------------

def read_canned_wcs(filename):
    """Read a canned-WCS mini-MEF.

    Parameters
    ----------
    filename : str or Path

    Returns
    -------
    dict
        OTA number (``10 * x + y``) -> copy of that extension's header. Extensions
        not named ``OTA<xy>.SCI`` are ignored. OTAs outside the current layouts are
        kept (the real ``wcs_5x6_skeleton.fits`` describes an 8x8 grid).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not FITS, has no OTA extension, names an OTA twice, or an
        extension lacks one of ``CRVAL1/2``, ``CRPIX1/2``, ``CD1_1 .. CD2_2`` or has
        a non-numeric value there or in a ``PVi_j`` card.
    """
    try:
        with fits.open(filename) as hdus:
            headers = [hdu.header.copy() for hdu in hdus[1:]]
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"canned WCS {filename}: not a FITS file ({error})") from None
    solutions = {}
    for header in headers:
        match = _EXTNAME.fullmatch(str(header.get("EXTNAME", "")).strip())
        if not match:
            logger.debug("canned WCS %s: ignoring extension %r", filename, header.get("EXTNAME"))
            continue
        ota = int(match.group(1))
        if ota in solutions:
            raise ValueError(f"canned WCS {filename}: OTA{ota:02d}.SCI appears twice")
        _check_solution(filename, header)
        solutions[ota] = header
    if not solutions:
        raise ValueError(f"canned WCS {filename}: no OTA<xy>.SCI extension")
    return solutions


def _check_solution(filename, header):
    extname = header["EXTNAME"]
    missing = [key for key in _REQUIRED if key not in header]
    if missing:
        raise ValueError(f"canned WCS {filename}, {extname}: missing {', '.join(missing)}")
    numeric = list(_REQUIRED) + _pv_cards(header)
    for key in numeric:
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"canned WCS {filename}, {extname}: {key} = {value!r} is not a number")


def _pv_cards(header):
    # Sorted by axis and term so the output header reads in order.
    keys = [key for key in header if _PV_KEY.fullmatch(key)]
    return sorted(keys, key=lambda key: tuple(map(int, _PV_KEY.fullmatch(key).groups())))


def ota_wcs_header(canned, ra_deg, dec_deg, binning=1, offset=(0.0, 0.0), simple=False):
    """Final WCS of one OTA from its canned solution and the telescope pointing.

    Parameters
    ----------
    canned : astropy.io.fits.Header
        One OTA's solution from :func:`read_canned_wcs`; its ``CRVAL1/2`` = (C1, C2)
        is the offset of the tangent point from the pointing (degrees).
    ra_deg, dec_deg : float
        Telescope pointing (degrees, ICRS).
    binning : int
        Binning factor b. As in the original, ``CRPIX`` is divided by b and ``CD``
        multiplied by b; this puts a sky position at binned 0-based pixel
        ``p / b + 1 / b - 1`` instead of the exact ``(p + 0.5) / b - 0.5`` of the
        unbinned 0-based position p: 0.25 px low at b = 2.
    offset : tuple of float
        ``(dRA, dDec)`` in degrees added to the pointing first (``-wcsoffset``).
    simple : bool
        Plain TAN without distortion terms (``-simplewcs``).

    Returns
    -------
    astropy.io.fits.Header
        ``CTYPE`` ``RA---TPV``/``DEC--TPV`` (``TAN`` if simple or if the canned
        solution has no PV cards), ``CUNIT``, ``CRVAL`` (tangent point; CRVAL2 = DEC
        - C2, CRVAL1 = RA - C1 / cos(CRVAL2) in [0, 360), C1 first wrapped into
        (-180, 180]), ``CRPIX`` (1-based), ``CD`` (deg/px), ``RADESYS = 'ICRS'``,
        ``EQUINOX = 2000``, the PV cards and the ``ASTIRMS``/``ASTRRMS`` strings.

    Raises
    ------
    ValueError
        For a binning below 1 or a tangent point at or beyond a pole.
    """
    if int(binning) != binning or binning < 1:
        raise ValueError(f"binning must be a positive integer, not {binning!r}")
    ra = ra_deg + offset[0]
    dec = dec_deg + offset[1]
    crval2 = dec - canned["CRVAL2"]
    if abs(crval2) >= 90:
        raise ValueError(f"tangent point Dec {crval2:.4f} deg is at or beyond a pole")
    crval1 = _wrap_360(ra - wrap_180(canned["CRVAL1"]) / math.cos(math.radians(crval2)))
    pv_keys = [] if simple else _pv_cards(canned)
    projection = "TPV" if pv_keys else "TAN"
    header = fits.Header()
    header["CTYPE1"] = (f"RA---{projection}", "WCS projection type for this axis")
    header["CTYPE2"] = (f"DEC--{projection}", "WCS projection type for this axis")
    header["CUNIT1"] = ("deg", "Axis unit")
    header["CUNIT2"] = ("deg", "Axis unit")
    header["CRVAL1"] = (crval1, "Tangent point RA (deg)")
    header["CRVAL2"] = (crval2, "Tangent point Dec (deg)")
    for axis in (1, 2):
        header[f"CRPIX{axis}"] = (canned[f"CRPIX{axis}"] / binning, "Reference pixel (1-based)")
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        header[key] = (canned[key] * binning, "Linear projection matrix (deg/px)")
    header["RADESYS"] = ("ICRS", "Astrometric system")
    header["EQUINOX"] = (2000.0, "Mean equinox")
    for key in pv_keys:
        header[key] = (canned[key], "Projection distortion parameter")
    for key in _STATISTICS:
        if key in canned:
            header[key] = (canned[key], canned.comments[key])
    return header


# --- The project's optical model -----------------------------------------------------

def model_canned_wcs(layout):
    """Canned WCS of the project's optical model for a focal plane.

    The tangent point is the optical axis, which is the telescope pointing, so every
    stored ``CRVAL`` offset is 0. Per OTA, ``CRPIX`` is the optical axis in that OTA's
    FITS pixel coordinates, ``1 - ota_origin_in_focal_plane(ota)``; ``CD`` is
    ``diag(PIXEL_SCALE, PIXEL_SCALE) / 3600`` (RA grows with x like the real files,
    a mirror image of the sky). The radial distortion xi = x'(1 + k r'^2),
    eta = y'(1 + k r'^2) with k = ``DISTORTION_K3`` (deg^-2) and x', y', r' the
    intermediate coordinates in degrees is written exactly in TPV: PVi_1 = 1,
    PVi_7 = PVi_9 = k, the other PVi_0 .. PVi_10 zero (axis 2 swaps its arguments,
    so its T7 = y'^3 and T9 = y' x'^2).

    Parameters
    ----------
    layout : podi_definitions.FocalPlaneLayout

    Returns
    -------
    astropy.io.fits.HDUList
        Empty primary HDU (``LAYOUT``, ``PIXSCALE``, ``DISTK3``) and one data-less
        ``OTA<xy>.SCI`` extension per OTA, in the layout's output order.
    """
    primary = fits.PrimaryHDU()
    primary.header["LAYOUT"] = (layout.name, "Focal plane of this canned WCS")
    primary.header["PIXSCALE"] = (pd.PIXEL_SCALE, "Model pixel scale at the axis (arcsec/px)")
    primary.header["DISTK3"] = (pd.DISTORTION_K3, "Model radial distortion k (deg^-2)")
    primary.header["COMMENT"] = f"{pd.PIPELINE_NAME} optical model, not a fit to real data"
    return fits.HDUList([primary] + [_model_extension(ota) for ota in layout.output_order])


def _model_extension(ota):
    scale = pd.PIXEL_SCALE / 3600.0
    k = pd.DISTORTION_K3
    origin = pd.ota_origin_in_focal_plane(ota)
    hdu = fits.ImageHDU(name=pd.ota_extname(ota))
    header = hdu.header
    header["CTYPE1"] = "RA---TPV"
    header["CTYPE2"] = "DEC--TPV"
    header["CUNIT1"] = "deg"
    header["CUNIT2"] = "deg"
    header["CRVAL1"] = (0.0, "Tangent point offset from the pointing (deg)")
    header["CRVAL2"] = (0.0, "Tangent point offset from the pointing (deg)")
    header["CRPIX1"] = (1.0 - origin[0], "Optical axis (1-based)")
    header["CRPIX2"] = (1.0 - origin[1], "Optical axis (1-based)")
    header["CD1_1"] = scale
    header["CD1_2"] = 0.0
    header["CD2_1"] = 0.0
    header["CD2_2"] = scale
    header["EQUINOX"] = 2000.0
    header["RADESYS"] = "ICRS"
    terms = {1: 1.0, 7: k, 9: k}
    for axis in (1, 2):
        for term in range(_N_MODEL_PV):
            header[f"PV{axis}_{term}"] = terms.get(term, 0.0)
    return hdu


# --- Shipped files ------------------------------------------------------------------------

def default_canned_wcs_file(layout, mjd=None):
    """Path of the shipped canned WCS for a layout, chosen by its ``wcs.history``.

    Parameters
    ----------
    layout : podi_definitions.FocalPlaneLayout
    mjd : float, optional
        ``MJD-OBS`` of the frame: the last entry starting at or before it is used;
        None takes the newest entry.

    Raises
    ------
    FileNotFoundError, ValueError
        From :mod:`podi_history` for a missing or unusable history file.
    """
    history = pd.package_data_dir("wcs") / layout.name / HISTORY_FILENAME
    # The largest finite MJD selects the newest entry (podi_history rejects inf).
    return podi_history.select_from_history(history, sys.float_info.max if mjd is None else mjd)


def write_model_files(outdir):
    """Write each layout's model canned WCS and a one-line ``wcs.history`` under outdir."""
    for name, filename in MODEL_FILENAMES.items():
        folder = Path(outdir) / name
        folder.mkdir(parents=True, exist_ok=True)
        model_canned_wcs(pd.layout_by_name(name)).writeto(folder / filename, overwrite=True)
        (folder / HISTORY_FILENAME).write_text(
            f"# <start MJD> <file>; written by python -m podi_wcs\n0.0 {filename}\n")
        logger.info("wrote %s", folder / filename)


def local_pixel_scale(wcs, x, y):
    """Pixel scale (arcsec/pixel, square root of the pixel area) at pixel (x, y)."""
    ra, dec = wcs.all_pix2world([x, x + 1, x], [y, y, y + 1], 0)
    cos_d = math.cos(math.radians(dec[0]))
    # RA differences wrapped into (-180, 180]: a pixel may straddle RA 0.
    dx = (wrap_180(ra[1] - ra[0]) * cos_d, dec[1] - dec[0])
    dy = (wrap_180(ra[2] - ra[0]) * cos_d, dec[2] - dec[0])
    return math.sqrt(abs(dx[0] * dy[1] - dx[1] * dy[0])) * 3600


def main(argv=None):
    """``python -m podi_wcs [OUTDIR]``: regenerate the shipped model files."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_model_files(args[0] if args else Path(__file__).resolve().parent / "wcs")


if __name__ == "__main__":
    main()
