"""Detector nonlinearity: per-cell polynomial correction and its inverse.

The correction of the overscan-subtracted signal ``D`` (ADU) of one cell is

    D_corrected = D + sum_{k=2..P} c_k D^k

with ``P`` = ``POLYORDR`` of the coefficient file. The file also gives every
cell's ``RELATIVE_GAIN``: with ``-gain`` a cell's gain is that times the OTA's mean
header ``GAIN``. Format (the original's): primary ``POLYORDR``;
extension 1 a binary table with one row per (OTA, cell) and columns ``OTA``,
``CELLX``, ``CELLY`` (B), ``COEFF_X**2`` .. ``COEFF_X**P``, ``UNCERT_COEFF_X**2`` ..
``UNCERT_COEFF_X**P``, ``RELATIVE_GAIN`` (D; absent in the oldest files) and, in
ODI 5x6 files, ``SATLEVEL`` (E).

Cells missing from the table and rows with absurd values get no correction and
relative gain 1, with one warning per OTA: the original zeroed missing cells, and the
current ODI 5x6 table has a relative gain of 549.
"""

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

from podi_definitions import N_CELLS, all_cells, cell_extname
from podi_history import calibration_file_for_mjd

log = logging.getLogger(__name__)

HISTORY_NAME = "nonlinearity.history"

#: Relative gains outside this range (inclusive bounds are fine) are absurd.
RELATIVE_GAIN_RANGE = (0.2, 5.0)

#: A row whose correction at ``ABSURD_TEST_LEVEL`` ADU exceeds this fraction of
#: the level is absurd.
ABSURD_TEST_LEVEL = 60000.0
ABSURD_CORRECTION_FRACTION = 0.2

#: Newton iterations of the inverse stop when no pixel moves more than this (ADU);
#: convergence is quadratic, so the error left is far smaller.
NEWTON_STEP_TOLERANCE = 1e-4
NEWTON_MAX_ITERATIONS = 10

def coefficient_column(k):
    """Name of the column holding the coefficient of ``D**k``."""
    return f"COEFF_X**{k}"


def uncertainty_column(k):
    """Name of the column holding the uncertainty of the ``D**k`` coefficient."""
    return f"UNCERT_COEFF_X**{k}"


@dataclass(eq=False)
class NonlinearityTable:
    """Nonlinearity coefficients and relative gains of all cells in one file.

    Attributes
    ----------
    filename : Path
    polyorder : int
        ``POLYORDR``: highest power ``P`` of the correction polynomial.
    keys : list of tuple
        ``(ota, cx, cy)`` of every table row.
    coeffs : ndarray
        float64 ``(rows, P - 1)``: ``c_2 .. c_P`` of every row.
    uncertainties : ndarray or None
        float64 ``(rows, P - 1)``, None if the file has no such columns.
    gains : ndarray
        float64 ``(rows,)``: ``RELATIVE_GAIN`` (1.0 where the file has none).
    saturation : ndarray or None
        float64 ``(rows,)``: ``SATLEVEL`` (ADU), None if the file has none.
    absurd : dict
        Row index -> reason, for rows that are ignored.
    """

    filename: Path
    polyorder: int
    keys: list
    coeffs: np.ndarray
    uncertainties: np.ndarray
    gains: np.ndarray
    saturation: np.ndarray
    absurd: dict
    _index: dict = field(init=False, repr=False)
    _checked_otas: set = field(init=False, repr=False, default_factory=set)

    def __post_init__(self):
        self._index = {key: row for row, key in enumerate(self.keys)}
        if len(self._index) < len(self.keys):
            log.warning("%s lists some cells more than once; the last row of each "
                        "is used", self.filename)

    @property
    def otas(self):
        """Sorted OTA numbers present in the table."""
        return sorted({key[0] for key in self.keys})

    def coefficients(self, ota, cx, cy):
        """Correction coefficients of one cell.

        Returns
        -------
        ndarray or None
            float64 ``c_2 .. c_P`` (ADU^(1-k)), or None if the cell has no valid
            row (no correction).
        """
        row = self._valid_row(ota, cx, cy)
        return None if row is None else self.coeffs[row].copy()

    def relative_gain(self, ota, cx, cy):
        """``RELATIVE_GAIN`` of one cell; 1.0 if the cell has no valid row."""
        row = self._valid_row(ota, cx, cy)
        return 1.0 if row is None else float(self.gains[row])

    def saturation_level(self, ota, cx, cy):
        """``SATLEVEL`` of one cell (ADU), or None if unknown."""
        row = self._valid_row(ota, cx, cy)
        if row is None or self.saturation is None:
            return None
        return float(self.saturation[row])

    def _valid_row(self, ota, cx, cy):
        """Row index of a cell, None if missing or absurd (warned once per OTA)."""
        ota = int(ota)
        if ota not in self._checked_otas:
            self._checked_otas.add(ota)
            self._warn_about_ota(ota)
        row = self._index.get((ota, int(cx), int(cy)))
        return None if row is None or row in self.absurd else row

    def _warn_about_ota(self, ota):
        """One warning for all missing cells of an OTA, one per absurd row."""
        cells = all_cells()
        missing = [cell for cell in cells if (ota, *cell) not in self._index]
        if len(missing) == len(cells):
            log.warning("OTA %02d is not in %s: no nonlinearity correction and "
                        "relative gain 1 for all its cells", ota, self.filename.name)
        elif missing:
            log.warning("OTA %02d: cells %s are missing from %s: no nonlinearity "
                        "correction and relative gain 1 there", ota,
                        " ".join(cell_extname(cx, cy) for cx, cy in missing),
                        self.filename.name)
        for row, reason in self.absurd.items():
            if self.keys[row][0] == ota:
                _, cx, cy = self.keys[row]
                log.warning("OTA %02d cell %s: ignoring its row of %s (%s): no "
                            "nonlinearity correction and relative gain 1", ota,
                            cell_extname(cx, cy),
                            self.filename.name, reason)


def read_nonlinearity(filename):
    """Read a nonlinearity coefficient file of the real format.

    Parameters
    ----------
    filename : str or Path

    Returns
    -------
    NonlinearityTable
        All rows of the file; absurd rows (relative gain outside
        ``RELATIVE_GAIN_RANGE``, correction beyond 20 % at 60000 ADU, non-finite
        values) are marked and later ignored.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Not a FITS file, no or bad ``POLYORDR``, or a required column missing.
    """
    filename = Path(filename)
    if not filename.is_file():
        raise FileNotFoundError(f"nonlinearity file {filename} not found")
    try:
        # The real files put prose into TDISPn, which astropy flags on every read.
        with warnings.catch_warnings(), fits.open(filename) as hdus:
            warnings.simplefilter("ignore", VerifyWarning)
            polyorder = _read_polyorder(hdus[0].header, filename)
            if len(hdus) < 2 or not isinstance(hdus[1], fits.BinTableHDU):
                raise ValueError(f"nonlinearity file {filename}: extension 1 is not "
                                 "a binary table")
            table = hdus[1].data
            present = {name.upper(): name for name in table.columns.names}
            powers = range(2, polyorder + 1)
            key_names = ["OTA", "CELLX", "CELLY"]
            coeff_names = [coefficient_column(k) for k in powers]
            missing = [name for name in key_names + coeff_names if name not in present]
            if missing:
                raise ValueError(f"nonlinearity file {filename}: column(s) "
                                 f"{', '.join(missing)} missing")
            keys = [tuple(key) for key in
                    _float_columns(table, present, key_names).astype(int).tolist()]
            coeffs = _float_columns(table, present, coeff_names)
            uncertainties = _float_columns(table, present,
                                           [uncertainty_column(k) for k in powers])
            gains = _float_columns(table, present, ["RELATIVE_GAIN"])
            saturation = _float_columns(table, present, ["SATLEVEL"])
    except OSError as err:
        raise ValueError(f"nonlinearity file {filename}: cannot read FITS ({err})") from None
    gains = np.ones(len(keys)) if gains is None else gains[:, 0]
    saturation = None if saturation is None else saturation[:, 0]
    nl = NonlinearityTable(filename, polyorder, keys, coeffs, uncertainties, gains,
                           saturation, _find_absurd_rows(coeffs, gains))
    log.debug("%s: POLYORDR %d, %d rows, %d absurd", filename, polyorder, len(keys),
              len(nl.absurd))
    return nl


def _read_polyorder(header, filename):
    """``POLYORDR`` from the primary header, checked to be an integer >= 2."""
    value = header.get("POLYORDR")
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"nonlinearity file {filename}: POLYORDR is {value!r}, "
                         "expected an integer >= 2")
    return value


def _float_columns(table, present, names):
    """Native float64 ``(rows, len(names))`` of the named columns, None if one is absent."""
    if not all(name in present for name in names):
        return None
    return np.column_stack([np.asarray(table[present[name]], dtype=np.float64)
                            for name in names])


def _find_absurd_rows(coeffs, gains):
    """Row index -> reason for rows whose values cannot be physical (relative gain outside
    ``RELATIVE_GAIN_RANGE``, or a correction beyond 20 % at 60000 ADU)."""
    level = ABSURD_TEST_LEVEL
    correction = _polynomial_term(np.full(len(coeffs), level), coeffs.T)
    low, high = RELATIVE_GAIN_RANGE
    absurd = {}
    for row, (gain, corr) in enumerate(zip(gains, correction)):
        if not (np.isfinite(coeffs[row]).all() and np.isfinite(gain)):
            absurd[row] = "non-finite values"
        elif not low <= gain <= high:
            absurd[row] = f"relative gain {gain:.4g} outside {low}-{high}"
        elif abs(corr) > ABSURD_CORRECTION_FRACTION * level:
            absurd[row] = f"correction {corr:.4g} ADU at {level:.0f} ADU"
    return absurd


def _polynomial_term(data, coeffs, lowest_power=2):
    """``sum_i coeffs[i] * data**(i + lowest_power)`` in Horner form.

    ``coeffs`` are scalars (or arrays broadcasting with ``data``); the result
    has the dtype of ``data`` and is its only full-size temporary.
    """
    coeffs = [c.item() if isinstance(c, np.generic) else c for c in coeffs]
    # Python floats keep float32 data float32 (NumPy scalars would promote).
    term = np.multiply(data, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        term += c
        term *= data
    for _ in range(lowest_power - 1):
        term *= data
    return term


def correct_nonlinearity(data, coeffs):
    """Correct one cell for nonlinearity, in place.

    Parameters
    ----------
    data : ndarray
        Floating-point overscan-subtracted signal (ADU); NaN stays NaN.
    coeffs : sequence of float or None
        ``c_2 .. c_P``; None or empty leaves ``data`` unchanged.

    Returns
    -------
    ndarray
        ``data`` itself, now ``D + sum_k c_k D^k`` (ADU).
    """
    if coeffs is None or len(coeffs) == 0:
        return data
    _require_float(data)
    data += _polynomial_term(data, list(coeffs))
    return data


def apply_inverse_nonlinearity(data, coeffs):
    """Undo :func:`correct_nonlinearity`, in place (the simulator's readout).

    Solves ``D + sum_k c_k D^k = data`` for ``D`` pixel by pixel with Newton
    iterations started from the first-order inverse ``data - sum_k c_k data^k``.

    Parameters
    ----------
    data : ndarray
        Floating-point linear signal (ADU); NaN stays NaN.
    coeffs : sequence of float or None
        ``c_2 .. c_P``; None or empty leaves ``data`` unchanged.

    Returns
    -------
    ndarray
        ``data`` itself, now the nonlinear signal (ADU). For the real tables'
        coefficients the inversion is exact to < 1e-6 ADU in float64 (float32
        keeps its own rounding, ~0.004 ADU at 65535 ADU). Logs a warning if the
        iteration does not converge (coefficients not invertible over the data).
    """
    if coeffs is None or len(coeffs) == 0:
        return data
    _require_float(data)
    coeffs = list(coeffs)
    slope_coeffs = [k * c for k, c in enumerate(coeffs, start=2)]
    target = data.copy()
    data -= _polynomial_term(target, coeffs)
    finite = np.isfinite(target)
    tolerance = max(NEWTON_STEP_TOLERANCE,
                    4 * float(np.spacing(np.abs(target).max(where=finite, initial=0))))
    for _ in range(NEWTON_MAX_ITERATIONS):
        step = _polynomial_term(data, coeffs)
        step += data
        step -= target
        slope = _polynomial_term(data, slope_coeffs, lowest_power=1)
        slope += 1
        step /= slope
        data -= step
        largest_step = float(np.abs(step).max(where=finite, initial=0))
        if largest_step <= tolerance:
            return data
    log.warning("inverse nonlinearity did not converge (last step %.3g ADU) for "
                "coefficients %s", largest_step, coeffs)
    return data


def _require_float(data):
    """In-place work needs a floating-point ndarray."""
    if not (isinstance(data, np.ndarray) and np.issubdtype(data.dtype, np.floating)):
        raise TypeError("nonlinearity: data must be a floating-point numpy array, not "
                        f"{getattr(data, 'dtype', type(data))}")


def write_nonlinearity(filename, ota, cellx, celly, coeffs, relative_gain,
                       uncertainties=None, overwrite=False):
    """Write a coefficient table in the real format.

    Parameters
    ----------
    filename : str or Path
    ota, cellx, celly : array_like of int
        One entry per row: OTA position (e.g. 33) and cell indices 0..7.
    coeffs : array_like
        ``(rows, P - 1)``: ``c_2 .. c_P`` of every row; ``POLYORDR`` = ``P``.
    relative_gain : array_like
        ``(rows,)``.
    uncertainties : array_like, optional
        ``(rows, P - 1)``; zeros by default (exact coefficients of a model).
    overwrite : bool
        Replace an existing file.

    Notes
    -----
    Columns and formats are those of the real files (``B`` for indices, ``D``
    for the rest, extension ``NONLINCORR``). The real files' descriptions sit
    in ``TDISPn``, which is not valid FITS; here they are the ``TTYPEn`` comments.
    """
    keys = [np.asarray(values) for values in (ota, cellx, celly)]
    coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
    relative_gain = np.asarray(relative_gain, dtype=np.float64)
    uncertainties = (np.zeros_like(coeffs) if uncertainties is None
                     else np.atleast_2d(np.asarray(uncertainties, dtype=np.float64)))
    _check_table_shapes(keys, coeffs, relative_gain, uncertainties)
    polyorder = coeffs.shape[1] + 1
    powers = range(2, polyorder + 1)
    columns = [fits.Column(name, "B", array=values)
               for name, values in zip(("OTA", "CELLX", "CELLY"), keys)]
    columns += [fits.Column(coefficient_column(k), "D", array=coeffs[:, k - 2])
                for k in powers]
    columns += [fits.Column(uncertainty_column(k), "D", array=uncertainties[:, k - 2])
                for k in powers]
    columns.append(fits.Column("RELATIVE_GAIN", "D", array=relative_gain))
    table = fits.BinTableHDU.from_columns(columns, name="NONLINCORR")
    descriptions = (["ota", "cell-x", "cell-y"]
                    + [f"polynomial coeff x^{k}" for k in powers]
                    + [f"uncertainty of polynomial coeff x^{k}" for k in powers]
                    + ["relative gain factor, linear slope"])
    for number, text in enumerate(descriptions, start=1):
        table.header.comments[f"TTYPE{number}"] = text
    primary = fits.PrimaryHDU()
    primary.header["POLYORDR"] = (polyorder, "order of the nonlinearity polynomial")
    fits.HDUList([primary, table]).writeto(filename, overwrite=overwrite)


def _check_table_shapes(keys, coeffs, relative_gain, uncertainties):
    """Raise ValueError unless all columns have one entry per row and fit 'B'."""
    rows = len(keys[0])
    if (any(k.shape != (rows,) for k in keys) or relative_gain.shape != (rows,)
            or coeffs.shape[0] != rows or uncertainties.shape != coeffs.shape):
        raise ValueError("write_nonlinearity: ota, cellx, celly, relative_gain need "
                         "one value per row, coeffs and uncertainties (rows, P-1)")
    if coeffs.shape[1] < 1:
        raise ValueError("write_nonlinearity: need at least the D**2 coefficient")
    if not (0 <= keys[0].min(initial=0) and keys[0].max(initial=0) <= 255):
        raise ValueError("write_nonlinearity: OTA numbers must be 0..255")
    if any(not (0 <= k.min(initial=0) and k.max(initial=0) < N_CELLS) for k in keys[1:]):
        raise ValueError(f"write_nonlinearity: cell indices must be 0..{N_CELLS - 1}")


def nonlinearity_file_for_mjd(directory_or_file, mjd):
    """The nonlinearity file to use for an observation.

    Parameters
    ----------
    directory_or_file : str or Path
        A coefficient file (taken as is), or a folder with ``nonlinearity.history``.
    mjd : float
        ``MJD-OBS`` (days).

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError, ValueError
        See :func:`podi_history.calibration_file_for_mjd`.
    """
    return calibration_file_for_mjd(directory_or_file, HISTORY_NAME, mjd)
