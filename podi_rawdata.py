"""Reading raw ODI exposures: find the OTA files of an exposure, open and check them.

An exposure is a directory ``o20131212T012345.1/`` holding one FITS file per OTA,
``o20131212T012345.1.33.fits`` (or ``.fits.fz``). Each OTA file has an empty primary
HDU and 64 cell extensions ``XY<cx><cy>`` (names matched case-insensitively; the
first of duplicated names wins, as in some Dec 2012 files).

Every problem with a file raises :class:`RawDataError` whose message is one line
naming the file and what is wrong. Every header keyword the program relies on is
checked once, when the file is opened (:data:`PRIMARY_CHECKS`, :func:`check_cell_header`):
a garbage value stops that OTA with a message naming the file, the keyword and the
value, instead of a traceback or a silently wrong result further on.
"""

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from podi_definitions import (N_CELLS, all_cells, binning_from_header, cell_geometry,
                              ota_from_fppos)
from podi_mef import open_fits, valid_cards
from podi_wcs import parse_angle

_OTA_FILE = re.compile(r"^(?P<base>.+)\.(?P<ota>\d\d)\.fits(\.fz)?$")


class RawDataError(Exception):
    """A raw file that cannot be used; the message names the file and the problem."""

    def __init__(self, filename, problem):
        self.filename = str(filename)
        self.problem = problem
        super().__init__(f"{filename}: {problem}")


@dataclass
class Exposure:
    """The OTA files of one exposure.

    Attributes
    ----------
    directory : Path
    base : str
        Exposure name, e.g. ``o20131212T012345.1``.
    ota_files : dict
        OTA number -> Path of its raw file, for every OTA file present.
    """

    directory: Path
    base: str
    ota_files: dict = field(default_factory=dict)


def exposure_base_from_file(filename):
    """The exposure name of one of its OTA files (from the file name, else `FILENAME`)."""
    match = _OTA_FILE.match(filename.name)
    if match:
        return match.group("base")
    # Archive downloads rename files; FILENAME minus '.NN.fits' is the exposure name.
    try:
        header = fits.getheader(filename, 0)
    except Exception as error:
        raise RawDataError(filename, f"not a readable FITS file ({error})") from None
    if "FILENAME" not in header:
        raise RawDataError(filename, "cannot tell the exposure name: no FILENAME keyword")
    return str(header["FILENAME"]).strip()[:-8]


def find_exposure(path):
    """Find all OTA files of the exposure that ``path`` belongs to.

    Parameters
    ----------
    path : str or Path
        The exposure directory, or any one OTA file of it.

    Returns
    -------
    Exposure
    """
    path = Path(path)
    if path.is_dir():
        directory, base = path, path.name
    elif path.is_file():
        directory, base = path.parent, exposure_base_from_file(path)
    else:
        raise RawDataError(path, "no such file or directory")
    exposure = Exposure(directory.resolve(), base)
    for candidate in sorted(directory.iterdir()):
        match = _OTA_FILE.match(candidate.name)
        if match and match.group("base") == base:
            ota = int(match.group("ota"))
            # .fits sorts before .fits.fz: the uncompressed file wins, as in the original.
            exposure.ota_files.setdefault(ota, candidate)
    if not exposure.ota_files:
        raise RawDataError(path, f"no OTA files named {base}.NN.fits[.fz] found in {directory}")
    return exposure


# --- Header checks ----------------------------------------------------------------------

#: Exposure types whose exposure time may be 0.
ZERO_TIME_TYPES = ("BIAS", "ZERO")
#: MJD-OBS the camera can have written: 2011 to 2040.
MJD_RANGE = (55500.0, 66500.0)


def _number(value):
    """A header value as a finite float, or None (strings, booleans, NaN are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _check_mjd(header):
    mjd = _number(header["MJD-OBS"])
    if mjd is None or not MJD_RANGE[0] <= mjd <= MJD_RANGE[1]:
        return f"not a date of the camera (an MJD from {MJD_RANGE[0]:.0f} to {MJD_RANGE[1]:.0f})"
    return None


def _check_exptime(header):
    exptime = _number(header["EXPTIME"])
    if exptime is None or exptime < 0:
        return "not an exposure time (a number of seconds, at least 0)"
    obstype = str(header.get("OBSTYPE", "")).strip().upper()
    if exptime == 0 and obstype not in ZERO_TIME_TYPES:
        return f"0 s, but OBSTYPE is {obstype or 'not given'}: only a bias has no exposure time"
    return None


def _check_text(header, key):
    if not isinstance(header[key], str):
        return "not a text"
    return None


def _check_filter(header):
    if not isinstance(header["FILTER"], str):
        return "not a text"
    obstype = str(header.get("OBSTYPE", "")).strip().upper()
    if not header["FILTER"].strip() and obstype not in ZERO_TIME_TYPES + ("DARK",):
        return f"empty, but a{'n' if obstype[:1] in 'AEIOU' else ''} {obstype or 'exposure'} needs its filter"
    return None


def _check_binning(header, key):
    """``CCDBIN1`` (an integer) or ``CCDSUM`` (``'b b'``) must be a binning of the camera."""
    value = header[key]
    words = str(value).split() if key == "CCDSUM" and isinstance(value, str) else [value]
    if words and all(isinstance(word, (int, str)) and not isinstance(word, bool) and str(word).strip() in ("1", "2")
                     for word in words):
        return None
    return "not a binning of the camera (1 or 2)"


def _check_pointing(header, key):
    try:
        parse_angle(key, header[key])
    except ValueError as error:
        return str(error)
    return None


def _check_fppos(header):
    try:
        ota_from_fppos(header["FPPOS"])
    except ValueError:
        return "not of the form 'xyNN'"
    return None


def _check_rotator(header):
    return "not an angle in degrees" if _number(header["ROTSTART"]) is None else None


#: Primary-header keywords: (keyword, required, check(header) -> problem or None). A
#: present keyword is always checked; a missing one is a problem only if required.
PRIMARY_CHECKS = (
    ("FPPOS", True, _check_fppos),
    ("MJD-OBS", True, _check_mjd),
    ("EXPTIME", True, _check_exptime),
    ("RA", True, lambda header: _check_pointing(header, "RA")),
    ("DEC", True, lambda header: _check_pointing(header, "DEC")),
    ("FILTER", False, _check_filter),
    ("OBSTYPE", False, lambda header: _check_text(header, "OBSTYPE")),
    ("CELLMODE", False, lambda header: _check_text(header, "CELLMODE")),
    ("OBSID", False, lambda header: _check_text(header, "OBSID")),
    ("ROTSTART", False, _check_rotator),
    ("CCDBIN1", False, lambda header: _check_binning(header, "CCDBIN1")),
    ("CCDSUM", False, lambda header: _check_binning(header, "CCDSUM")),
)


def check_primary_header(filename, header):
    """Check every keyword of :data:`PRIMARY_CHECKS` in a raw OTA file's primary header.

    Raises
    ------
    RawDataError
        Naming the file, the first bad keyword and its value.
    """
    for key, required, check in PRIMARY_CHECKS:
        try:
            present = key in header and header[key] is not None
            problem = check(header) if present else None
        except Exception as error:  # noqa: BLE001 - a garbled card: astropy raises VerifyError
            raise RawDataError(filename, f"{key}: unreadable header card ({_one_line(error)})") from None
        if not present:
            if required:
                raise RawDataError(filename, f"primary header has no {key} keyword")
            continue
        if problem:
            raise RawDataError(filename, f"{key} = {header[key]!r}: {problem}")


#: Raw cells hold unsigned 16-bit counts: BITPIX 16 with BZERO 32768 (or 32-bit or
#: float pixels of the same counts), and no scaling.
RAW_BITPIX = (16, 32, -32)


def check_cell_header(filename, extname, header):
    """Check the keywords of one raw cell that the reduction relies on: ``BITPIX``,
    ``BSCALE``, ``BZERO`` (unsigned 16-bit counts) and ``GAIN``.

    Raises
    ------
    RawDataError
        Naming the file, the cell, the keyword and its value.
    """
    try:
        _check_cell_cards(filename, extname, header)
    except RawDataError:
        raise
    except Exception as error:  # noqa: BLE001 - a garbled card: astropy raises VerifyError
        raise RawDataError(filename, f"cell {extname}: unreadable header card ({_one_line(error)})") from None


def _check_cell_cards(filename, extname, header):
    # A compressed cell's header shows the image's BITPIX; its ZBITPIX is the storage.
    bitpix = header.get("BITPIX")
    if bitpix not in RAW_BITPIX:
        raise RawDataError(filename, f"cell {extname}: BITPIX = {bitpix!r}: raw counts need "
                                     f"one of {', '.join(map(str, RAW_BITPIX))}")
    bscale = header.get("BSCALE", 1)
    if _number(bscale) != 1.0:
        raise RawDataError(filename, f"cell {extname}: BSCALE = {bscale!r}: raw counts are not scaled (1)")
    bzero = header.get("BZERO", 0)
    if _number(bzero) is None:
        raise RawDataError(filename, f"cell {extname}: BZERO = {bzero!r}: not a number")
    if bitpix == 16 and _number(bzero) != 32768.0:
        raise RawDataError(filename, f"cell {extname}: BZERO = {bzero!r} with BITPIX 16: unsigned "
                                     "counts need BZERO = 32768 (counts above 32767 would wrap)")
    if "GAIN" in header:
        gain = _number(header["GAIN"])
        if gain is None or gain <= 0:
            raise RawDataError(filename, f"cell {extname}: GAIN = {header['GAIN']!r}: not a gain "
                                         "(a positive number of e-/ADU)")


class RawOTA:
    """One raw OTA file, opened and checked.

    Attributes
    ----------
    filename : Path
    header : astropy.io.fits.Header
        Primary header.
    ota : int
        From ``FPPOS``.
    binning : int
    cell_shape : tuple of int
        ``(rows, cols)`` of every raw cell, read from the data (never assumed: it
        depends on the binning and on the file).
    """

    def __init__(self, filename):
        self.filename = Path(filename)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._hdul = open_fits(self.filename, memmap=True, do_not_scale_image_data=True)
        except Exception as error:
            raise RawDataError(self.filename, f"not a readable FITS file ({_one_line(error)})") from None
        try:
            self._check_structure()
        except RawDataError:
            self.close()
            raise

    def _check_structure(self):
        hdul = self._hdul
        self.header = hdul[0].header
        check_primary_header(self.filename, self.header)
        self.ota = ota_from_fppos(self.header["FPPOS"])
        self._cell_hdu = {}
        for hdu in hdul[1:]:
            name = str(hdu.header.get("EXTNAME", "")).strip().upper()
            # Cells are XY00 to XY77; other extensions are not cells.
            match = re.fullmatch(r"XY([0-7])([0-7])", name)
            if match:
                self._cell_hdu.setdefault((int(match.group(1)), int(match.group(2))), hdu)
        missing = [f"XY{cx}{cy}" for cx, cy in all_cells() if (cx, cy) not in self._cell_hdu]
        if missing:
            raise RawDataError(self.filename, f"{len(missing)} of 64 cell extensions missing "
                                              f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        size = self.filename.stat().st_size
        for (cx, cy), hdu in self._cell_hdu.items():
            info = hdu.fileinfo()
            if info["datLoc"] + info["datSpan"] > size:
                raise RawDataError(self.filename, f"truncated: data of cell XY{cx}{cy} end beyond "
                                                  f"the end of the file ({size} bytes)")
        for (cx, cy), hdu in self._cell_hdu.items():
            check_cell_header(self.filename, f"XY{cx}{cy}", hdu.header)
        first = self._cell_hdu[(0, 0)].header
        for key in ("CCDBIN1", "CCDSUM"):
            if key in first and _check_binning(first, key):
                raise RawDataError(self.filename, f"cell XY00: {key} = {first[key]!r}: "
                                                  f"{_check_binning(first, key)}")
        self.binning = binning_from_header(first)
        geometry = cell_geometry(self.binning)
        shapes = {self._shape(hdu) for hdu in self._cell_hdu.values()}
        if len(shapes) != 1:
            raise RawDataError(self.filename, f"cells differ in size: {sorted(shapes)}")
        self.cell_shape = shapes.pop()
        rows, cols = self.cell_shape
        if rows < geometry.science_rows or cols < geometry.overscan_cols[1]:
            raise RawDataError(self.filename, f"cells are {cols}x{rows} pixels, too small for "
                                              f"binning {self.binning} (needs at least "
                                              f"{geometry.overscan_cols[1]}x{geometry.science_rows});"
                                              f" wrong binning keyword?")

    @staticmethod
    def _shape(hdu):
        # astropy shows a compressed HDU through its image header (NAXIS, not ZNAXIS).
        header = hdu.header
        if header.get("NAXIS", 0) != 2:
            return (0, 0)
        return int(header["NAXIS2"]), int(header["NAXIS1"])

    def cell_header(self, cx, cy):
        """Header of cell (cx, cy)."""
        return self._cell_hdu[(cx, cy)].header

    def cells(self, out=None):
        """All raw cells as one float32 array ``[cy, cx, row, col]`` in ADU.

        Parameters
        ----------
        out : numpy.ndarray, optional
            float32 array of shape ``(8, 8, rows, cols)`` to fill.

        Returns
        -------
        numpy.ndarray
            Shape ``(8, 8, rows, cols)``: ``out``, or a fresh array; the caller may
            change it in place.
        """
        rows, cols = self.cell_shape
        if out is None:
            out = np.empty((N_CELLS, N_CELLS, rows, cols), dtype=np.float32)
        for (cx, cy), hdu in self._cell_hdu.items():
            try:
                cell = out[cy, cx]
                cell[...] = hdu.data
                cell += np.float32(hdu.header.get("BZERO", 0.0))
            except Exception as error:
                raise RawDataError(self.filename, f"cell XY{cx}{cy} unreadable ({_one_line(error)})") from None
            # Counts are finite: NaN or infinity means a broken file (float pixels only).
            if cell.dtype.kind == "f" and hdu.header.get("BITPIX") == -32 and not np.isfinite(cell).all():
                bad = int(np.count_nonzero(~np.isfinite(cell)))
                raise RawDataError(self.filename, f"cell XY{cx}{cy}: {bad} pixels are NaN or infinite")
        return out

    def close(self):
        self._hdul.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def open_raw_ota(filename):
    """Open and check one raw OTA file (see :class:`RawOTA`)."""
    return RawOTA(filename)


def read_exposure_header(filename):
    """Primary header and binning of a raw OTA file, reading only its first two headers.

    The binning is the primary's (``CCDBIN1``/``CCDSUM``), else the first cell's.
    The file's cells are not checked (:func:`open_raw_ota` does that).

    Raises
    ------
    RawDataError
        The file is not readable as FITS.
    """
    try:
        with fits.open(filename, lazy_load_hdus=True) as hdulist:
            # The exposure's keywords come from this header: a garbled card is left out.
            header, _ = valid_cards(hdulist[0].header)
            binned = header if "CCDBIN1" in header or "CCDSUM" in header else hdulist[1].header.copy()
    except Exception as error:
        raise RawDataError(Path(filename), f"not a readable FITS file ({_one_line(error)})") from None
    check_primary_header(Path(filename), header)
    for key in ("CCDBIN1", "CCDSUM"):
        if key in binned and _check_binning(binned, key):
            raise RawDataError(Path(filename), f"{key} = {binned[key]!r}: {_check_binning(binned, key)}")
    return header, binning_from_header(binned)
