"""Crosstalk between the cells of one cell row of an OTA.

Every amplifier picks up a small copy of the signal of the other cells read out in
the same row (same ``cy``) of its OTA. The coupling is described per cell row by
an 8x8 matrix; the matrices of the 8 rows form a cube indexed
``[row, source, target]`` (row = ``cy``, source and target = ``cx``), as astropy
reads the ``XTALK.FWD``/``XTALK.INV`` extensions of the real file. The matrices are
not symmetric, so the axis order matters (``docs/conventions.md``).

For cell row ``r`` the readout mixes true signals as
``raw[t] = sum_s true[s] * FWD[r, s, t]`` and the pipeline undoes it with
``corrected[t] = sum_s raw[s] * INV[r, s, t]``; :func:`apply_crosstalk` does both.
"""

import logging
from pathlib import Path

import numpy as np
from astropy.io import fits

from podi_definitions import CROSSTALK_DEFAULT_COEFF, N_CELLS
from podi_history import calibration_file_for_mjd

log = logging.getLogger(__name__)

#: Shape of a crosstalk cube: (cell rows, source cells, target cells).
CUBE_SHAPE = (N_CELLS, N_CELLS, N_CELLS)

#: Largest tolerated deviation of FWD @ INV from the identity.
INVERSE_TOLERANCE = 1e-6

HISTORY_NAME = "crosstalk.history"


def default_crosstalk():
    """The original's built-in crosstalk model (no file given).

    Returns
    -------
    fwd, inv : ndarray
        float64 cubes of shape (8, 8, 8): every row has 1 on the diagonal and
        ``CROSSTALK_DEFAULT_COEFF`` (5.6e-5) off it; ``inv`` is its inverse.
    """
    row = np.full((N_CELLS, N_CELLS), CROSSTALK_DEFAULT_COEFF)
    np.fill_diagonal(row, 1.0)
    fwd = np.broadcast_to(row, CUBE_SHAPE).copy()
    return fwd, np.linalg.inv(fwd)


def read_crosstalk(filename):
    """Read the forward and inverse crosstalk cubes of a real-format file.

    Parameters
    ----------
    filename : str or Path
        FITS file with image extensions ``XTALK.FWD`` and (optionally)
        ``XTALK.INV``, each an 8x8x8 cube ``[row, source, target]``.

    Returns
    -------
    fwd, inv : ndarray
        Native-endian float64 cubes of shape (8, 8, 8), used as astropy gives
        them (not transposed: the real matrix is not symmetric). ``inv`` is
        computed from ``fwd`` if the file lacks it or if the file's is not the
        inverse of ``fwd`` to ``INVERSE_TOLERANCE`` (with a warning): the
        simulator mixes with ``fwd``, so only its inverse undoes the mixing.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not FITS, lacks ``XTALK.FWD``, or holds a cube of the wrong
        shape, non-finite or singular.
    """
    filename = Path(filename)
    if not filename.is_file():
        raise FileNotFoundError(f"crosstalk file {filename} not found")
    try:
        with fits.open(filename) as hdus:
            fwd = _read_cube(hdus, "XTALK.FWD", filename)
            inv = _read_cube(hdus, "XTALK.INV", filename) if "XTALK.INV" in hdus else None
    except OSError as err:
        raise ValueError(f"crosstalk file {filename}: cannot read FITS ({err})") from None
    try:
        computed = np.linalg.inv(fwd)
    except np.linalg.LinAlgError:
        raise ValueError(f"crosstalk file {filename}: XTALK.FWD is singular") from None
    if inv is None:
        log.info("%s has no XTALK.INV; inverting XTALK.FWD", filename)
        return fwd, computed
    deviation = np.abs(fwd @ inv - np.eye(N_CELLS)).max()
    if deviation > INVERSE_TOLERANCE:
        log.warning("%s: XTALK.INV is not the inverse of XTALK.FWD (FWD @ INV "
                    "deviates from identity by %.2g); using the inverse of XTALK.FWD",
                    filename, deviation)
        return fwd, computed
    return fwd, inv


def _read_cube(hdus, extname, filename):
    """One crosstalk cube from an open FITS file, checked, native float64."""
    if extname not in hdus:
        raise ValueError(f"crosstalk file {filename}: extension {extname} missing")
    data = hdus[extname].data
    if data is None or data.shape != CUBE_SHAPE:
        shape = None if data is None else data.shape
        raise ValueError(f"crosstalk file {filename}: {extname} has shape {shape}, "
                         f"expected {CUBE_SHAPE} [row, source, target]")
    # FITS is big-endian; native order keeps the later matrix products fast.
    cube = np.asarray(data, dtype=np.float64)
    if not np.isfinite(cube).all():
        raise ValueError(f"crosstalk file {filename}: {extname} has non-finite values")
    return cube


def apply_crosstalk(cells, matrix, out=None):
    """Mix (or unmix) the cells of every cell row of an OTA with a crosstalk cube.

    ``out[r, t] = sum_s cells[r, s] * matrix[r, s, t]`` for every pixel. With
    ``fwd`` this is the readout (simulator), with ``inv`` the correction
    (pipeline).

    Parameters
    ----------
    cells : ndarray
        Floating-point array ``[cy, cx, rows, cols]`` of shape (8, 8, ny, nx):
        all raw cells of one OTA including overscan (ADU). A cell without data
        should hold zeros, which couple nothing into its neighbours.
    matrix : ndarray
        Cube ``[row, source, target]`` of shape (8, 8, 8).
    out : ndarray, optional
        Result array of the same shape and dtype; may be ``cells`` itself for an
        in-place update. A new array of ``cells.dtype`` by default.

    Returns
    -------
    ndarray
        ``out`` (ADU), in the dtype of ``cells``.

    Notes
    -----
    The diagonal term is applied element-wise and only the small off-diagonal
    sum goes through the matrix product: in float32 the result is then within
    about 1 unit in the last place (0.008 ADU at 65535 ADU) of the exact value,
    where a plain float32 product would lose a few units. Temporary memory is
    one cell row.
    """
    n_rows, n_cells = cells.shape[:2] if cells.ndim == 4 else (None, None)
    if n_rows is None or matrix.shape != (n_rows, n_cells, n_cells):
        raise ValueError(f"crosstalk: cells of shape {cells.shape} [cy, cx, y, x] do "
                         f"not match a matrix of shape {matrix.shape} [row, source, target]")
    if not np.issubdtype(cells.dtype, np.floating):
        raise TypeError(f"crosstalk: cells must be floating point, not {cells.dtype}")
    if out is None:
        out = np.empty_like(cells)
    elif out.shape != cells.shape or out.dtype != cells.dtype:
        raise ValueError("crosstalk: out must have the shape and dtype of cells")
    offdiag_sum = np.empty((n_cells, cells[0, 0].size), dtype=cells.dtype)
    for row in range(n_rows):
        diagonal = np.diagonal(matrix[row])
        # matmul wants [target, source]: transpose the [source, target] matrix.
        coupling = (matrix[row] - np.diag(diagonal)).T.astype(cells.dtype)
        sources = cells[row].reshape(n_cells, -1)
        np.matmul(coupling, sources, out=offdiag_sum)
        # Product computed before writing, so out may alias cells.
        target = out[row]
        np.multiply(cells[row], diagonal.astype(cells.dtype)[:, None, None], out=target)
        target += offdiag_sum.reshape(target.shape)
    return out


def crosstalk_file_for_mjd(directory_or_file, mjd):
    """The crosstalk file to use for an observation.

    Parameters
    ----------
    directory_or_file : str or Path
        A crosstalk file (taken as is), or a folder with ``crosstalk.history``
        (directly or in its ``podi``/``odi_5x6`` subfolder for ``mjd``).
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
