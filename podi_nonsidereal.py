"""Non-sidereal tracking: a WCS that follows a moving target (``-nonsidereal``).

Observers of comets and asteroids stack frames on their target. With
``-nonsidereal=dRA,dDec,ref`` every extension's WCS is shifted, after the astrometric
and photometric calibration, by the target's motion since the reference time, so that
the target keeps the same sky coordinates in every frame (and the stars move)::

    dt = (MJD-OBS - MJD_ref) x 24                        hours
    CRVAL2 -= dDec x dt / 3600                           degrees
    CRVAL1 -= dRA x dt / 3600 / cos(CRVAL2)

``dRA`` and ``dDec`` are the apparent motion in arcsec per hour, ``dRA`` on the sky
(already multiplied by cos(Dec)); ``ref`` is an MJD or a FITS file whose primary
``MJD-OBS`` is used. As the original pipeline, the frame's time is its start,
``MJD-OBS``. The source catalogs keep the stars' sidereal coordinates.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from podi_mef import header_text_with_checksum


@dataclass(frozen=True)
class SkyMotion:
    """Apparent motion of a target and its reference time.

    Attributes
    ----------
    dra, ddec : float
        Arcsec per hour; ``dra`` on the sky (times cos(Dec)).
    reference_mjd : float
        MJD at which the WCS is left unshifted.
    reference : str
        The ``ref`` text as given (an MJD or a file).
    """

    dra: float
    ddec: float
    reference_mjd: float
    reference: str


def parse_motion(text):
    """:class:`SkyMotion` from ``dRA,dDec,ref``.

    Raises
    ------
    ValueError
        Not three items, a rate that is not a number, a reference that is neither a
        number nor a readable FITS file with a numeric ``MJD-OBS``; one line.
    """
    items = [item.strip() for item in str(text).split(",")]
    if len(items) != 3:
        raise ValueError(f"expected three items dRA,dDec,ref, got {len(items)}")
    try:
        dra, ddec = float(items[0]), float(items[1])
    except ValueError:
        raise ValueError(f"rates {items[0]!r}, {items[1]!r} must be numbers (arcsec/hour)") from None
    if not (math.isfinite(dra) and math.isfinite(ddec)):
        raise ValueError("rates must be finite numbers (arcsec/hour)")
    return SkyMotion(dra, ddec, reference_mjd(items[2]), items[2])


def reference_mjd(reference):
    """The reference time: ``reference`` as an MJD, or the ``MJD-OBS`` of that FITS file."""
    try:
        mjd = float(reference)
    except ValueError:
        mjd = None
    if mjd is None:
        path = Path(reference)
        if not path.is_file():
            raise ValueError(f"reference {reference!r} is neither an MJD nor an existing file")
        from astropy.io import fits  # only for a file reference
        try:
            mjd = float(fits.getheader(path)["MJD-OBS"])
        except Exception as error:  # noqa: BLE001 - any unreadable file is one message
            raise ValueError(f"reference file {reference}: no usable MJD-OBS "
                             f"({' '.join(str(error).split())})") from None
    if not math.isfinite(mjd):
        raise ValueError(f"reference MJD {reference!r} is not finite")
    return mjd


def follow_target(results, motion, mjd):
    """Shift the WCS of every reduced OTA by the target's motion since the reference.

    Parameters
    ----------
    results : dict
        OTA -> :class:`podi_otaphases.OTAResult`; headers (and their text) are
        updated in place, the new keywords taking the place of spare blank cards.
    motion : SkyMotion
    mjd : float
        ``MJD-OBS`` of the frame.

    Returns
    -------
    dict
        Primary keywords ``NSIDPMRA``, ``NSIDPMDE``, ``NSIDBASE``.
    """
    hours = (mjd - motion.reference_mjd) * 24.0
    shift_dec = motion.ddec * hours / 3600.0
    for result in results.values():
        header = result.header
        header["CRVAL2"] = header["CRVAL2"] - shift_dec
        shift_ra = motion.dra * hours / 3600.0 / math.cos(math.radians(header["CRVAL2"]))
        header["CRVAL1"] = (header["CRVAL1"] - shift_ra) % 360.0
        header["NSIDDRA"] = (shift_ra, "non-sidereal shift of CRVAL1 (deg)")
        header["NSIDDDEC"] = (shift_dec, "non-sidereal shift of CRVAL2 (deg)")
        result.header_text = header_text_with_checksum(result.header)
    return {"NSIDPMRA": (motion.dra, "non-sidereal rate dRA cos(Dec) (arcsec/h)"),
            "NSIDPMDE": (motion.ddec, "non-sidereal rate dDec (arcsec/h)"),
            "NSIDBASE": (motion.reference_mjd, "MJD at which the WCS is not shifted")}
