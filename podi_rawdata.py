"""Reading raw ODI exposures: find the OTA files of an exposure, open and check them.

An exposure is a directory ``o20131212T012345.1/`` holding one FITS file per OTA,
``o20131212T012345.1.33.fits`` (or ``.fits.fz``). Each OTA file has an empty primary
HDU and 64 cell extensions ``XY<cx><cy>`` (names matched case-insensitively; the
first of duplicated names wins, as in some Dec 2012 files).

Every problem with a file raises :class:`RawDataError` whose message is one line
naming the file and what is wrong.
"""

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from podi_definitions import (N_CELLS, all_cells, binning_from_header, cell_geometry,
                              ota_from_fppos)

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
                self._hdul = fits.open(self.filename, memmap=True, lazy_load_hdus=False,
                                       do_not_scale_image_data=True)
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
        if "FPPOS" not in self.header:
            raise RawDataError(self.filename, "primary header has no FPPOS keyword")
        try:
            self.ota = ota_from_fppos(self.header["FPPOS"])
        except ValueError as error:
            raise RawDataError(self.filename, str(error)) from None
        self._cell_hdu = {}
        for hdu in hdul[1:]:
            name = str(hdu.header.get("EXTNAME", "")).strip().upper()
            match = re.fullmatch(r"XY(\d)(\d)", name)
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
        first = self._cell_hdu[(0, 0)].header
        self.binning = binning_from_header(first)
        try:
            geometry = cell_geometry(self.binning)
        except ValueError as error:
            raise RawDataError(self.filename, str(error)) from None
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
                bscale = float(hdu.header.get("BSCALE", 1.0))
                if bscale != 1.0:
                    cell *= np.float32(bscale)
                cell += np.float32(hdu.header.get("BZERO", 0.0))
            except Exception as error:
                raise RawDataError(self.filename, f"cell XY{cx}{cy} unreadable ({_one_line(error)})") from None
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
            header = hdulist[0].header.copy()
            binning = binning_from_header(header if "CCDBIN1" in header or "CCDSUM" in header
                                          else hdulist[1].header)
    except Exception as error:
        raise RawDataError(Path(filename), f"not a readable FITS file ({_one_line(error)})") from None
    return header, binning
