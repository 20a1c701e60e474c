"""The pipeline's multi-extension FITS format, shared by reduced frames and masters.

A primary HDU without data, then one float32 image extension ``OTA<xy>.SCI`` per OTA
(header ``FPPOS``) in the inside-out order of the focal plane, then tables. Files are
written under a temporary name and renamed, so that a crash or a kill never leaves
a partial file behind.
"""

import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from podi_definitions import ota_extname, ota_from_fppos


class CalibrationError(Exception):
    """A calibration file that cannot be used; the message names file and problem."""


def write_atomic(hdulist, filename, overwrite=True):
    """Write an HDUList under a temporary name in the target folder, then rename.

    Parameters
    ----------
    hdulist : astropy.io.fits.HDUList
    filename : str or Path
    overwrite : bool
        If False, an existing file is an error (``FileExistsError``).
    """
    filename = Path(filename)
    if not overwrite and filename.exists():
        raise FileExistsError(f"{filename}: exists")
    tmp = filename.with_name(f".{filename.name}.{os.getpid()}.tmp")
    try:
        hdulist.writeto(tmp, overwrite=True, checksum=True)
        os.replace(tmp, filename)
    finally:
        if tmp.exists():
            tmp.unlink()


def ota_hdu_index(hdulist, ota):
    """Index of the image extension of an OTA (by ``FPPOS``, else ``EXTNAME``), or None."""
    name = ota_extname(ota)
    for index, hdu in enumerate(hdulist):
        header = hdu.header
        if "FPPOS" in header:
            try:
                if ota_from_fppos(header["FPPOS"]) == ota:
                    return index
            except ValueError:
                continue
        elif str(header.get("EXTNAME", "")).strip().upper() == name:
            return index
    return None


def read_ota_image(filename, ota, size):
    """Read the image of one OTA from a pipeline-format file (a master calibration).

    Parameters
    ----------
    filename : str or Path
    ota : int
    size : int
        Expected side of the OTA array (4096 at binning 1, 2048 at binning 2).

    Returns
    -------
    (numpy.ndarray, astropy.io.fits.Header, astropy.io.fits.Header)
        float32 image, the extension header and the primary header.

    Raises
    ------
    CalibrationError
        File unreadable, OTA missing or of the wrong size (binning).
    """
    try:
        with fits.open(filename, memmap=True) as hdulist:
            index = ota_hdu_index(hdulist, ota)
            if index is None:
                raise CalibrationError(f"{filename}: has no extension for OTA {ota:02d}")
            hdu = hdulist[index]
            if hdu.data is None or hdu.data.shape != (size, size):
                shape = None if hdu.data is None else hdu.data.shape
                raise CalibrationError(f"{filename}: OTA {ota:02d} is {shape}, expected "
                                       f"({size}, {size}): binning does not match the raw data")
            return np.array(hdu.data, dtype=np.float32), hdu.header.copy(), hdulist[0].header.copy()
    except CalibrationError:
        raise
    except Exception as error:
        raise CalibrationError(f"{filename}: not a readable FITS file "
                               f"({' '.join(str(error).split())})") from None


def check_calibration_binning(filename, size):
    """Raise :class:`CalibrationError` unless the OTA images of a master are ``size`` square.

    Checked once per frame, before any OTA is reduced, so that a master of the
    wrong binning stops the frame with one clear message.
    """
    try:
        with fits.open(filename, memmap=True) as hdulist:
            shapes = {hdu.data.shape for hdu in hdulist if hdu.is_image and hdu.data is not None}
    except Exception as error:
        raise CalibrationError(f"{filename}: not a readable FITS file "
                               f"({' '.join(str(error).split())})") from None
    if not shapes:
        raise CalibrationError(f"{filename}: holds no OTA images")
    if shapes != {(size, size)}:
        found = ", ".join(f"{s[1]}x{s[0]}" for s in sorted(shapes))
        raise CalibrationError(f"{filename}: OTA images are {found}, the raw data need "
                               f"{size}x{size}: binning does not match")
