"""Saturation trails, persistence, and the night's saturation catalogs (``-persistency=DIR``).

A saturated star bleeds along its column, and a pixel that saturated releases
trapped charge for minutes afterwards. Each frame reduced with ``-persistency=DIR``
masks (NaN, :func:`mask_saturation`, in the worker of each OTA) its own trails and
the persistence of the exposures that ended within :data:`PERSISTENCE_SECONDS`
before it started, found from the catalog of saturated pixels that every exposure
leaves in one folder for the night:

* ``DIR/<exposure>.saturated.fits``: the primary header of the exposure's first OTA
  file (it carries ``MJD-OBS`` and ``EXPTIME``), and one binary table
  ``OTA<xy>.SATPIX`` per OTA read, with columns ``CELL_X``, ``CELL_Y`` (the cell) and
  ``X``, ``Y`` (0-based column and row in the raw cell, overscan included) of every
  raw pixel at 65535 ADU or more. An empty table means the OTA had none.
* ``DIR/persistency.sqlite``: the index, one row per catalog (path, exposure,
  ``MJD-OBS``, end of exposure). It is an SQLite database, so that several processes
  reducing frames into the same folder at once each add their row without losing
  another's (the original rewrote a pickle, and the last writer won).

``podi_collectcells`` adds each frame's catalog once the frame is written, so a
night reduced in order keeps its own history; ``-update_persistency_only`` writes an
exposure's catalog and nothing else (the original needed a separate tool for both).
"""

import logging
import math
import os
import sqlite3
from pathlib import Path

import numpy as np
from astropy.io import fits

from podi_definitions import SATURATION_ADU, cell_geometry, cell_to_ota, ota_extname
from podi_mef import write_atomic
from podi_rawdata import RawDataError, open_raw_ota

logger = logging.getLogger("podi_collectcells")

#: Suffix of a catalog after the exposure's name.
CATALOG_SUFFIX = ".saturated.fits"
#: File name of the index in the catalog folder.
INDEX_NAME = "persistency.sqlite"
#: Seconds a writer waits for another to finish its row before it gives up.
INDEX_TIMEOUT = 60.0


def saturated_pixels(cells):
    """The raw pixels at saturation in an OTA's cells.

    Parameters
    ----------
    cells : numpy.ndarray
        Raw cells ``[cy, cx, row, col]`` in ADU, before any correction.

    Returns
    -------
    numpy.ndarray
        Structured int16 array with fields ``CELL_X``, ``CELL_Y``, ``X`` (column) and
        ``Y`` (row) in the raw cell, 0-based.
    """
    cell_y, cell_x, row, column = np.nonzero(cells >= SATURATION_ADU)
    table = np.empty(cell_x.size, dtype=[("CELL_X", ">i2"), ("CELL_Y", ">i2"), ("X", ">i2"),
                                         ("Y", ">i2")])
    table["CELL_X"], table["CELL_Y"], table["X"], table["Y"] = cell_x, cell_y, column, row
    return table


def catalog_folder(directory):
    """Create the catalog folder if needed; ValueError (one line) if it cannot be written.

    Checked before a frame is reduced: a frame must not be written whose catalog then
    cannot be.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"-persistency={directory}: cannot create the catalog folder "
                         f"({error.strerror or error})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"-persistency={directory}: the catalog folder is not writable")
    return directory


def catalog_name(exposure_name):
    """File name of an exposure's saturation catalog: ``<exposure>.saturated.fits``."""
    return f"{exposure_name}{CATALOG_SUFFIX}"


def catalog_path(directory, exposure_name):
    return Path(directory) / catalog_name(exposure_name)


def write_catalog(directory, exposure_name, primary_header, binning, saturated):
    """Write an exposure's saturation catalog (atomically) and add it to the index.

    Parameters
    ----------
    directory : str or Path
        The night's catalog folder (created if needed).
    exposure_name : str
    primary_header : astropy.io.fits.Header
        Raw primary header of the exposure (``MJD-OBS``, ``EXPTIME``).
    binning : int
        Binning of the raw cells (``SATBIN``: catalogs are read at any binning).
    saturated : dict
        OTA -> :func:`saturated_pixels` table.

    Returns
    -------
    Path
        The catalog.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    primary = fits.PrimaryHDU(header=primary_header.copy())
    primary.header["SATBIN"] = (binning, "binning of the raw cells")
    primary.header["NSATOTA"] = (len(saturated), "OTAs read")
    primary.header["NSATPIX"] = (int(sum(len(t) for t in saturated.values())), "saturated raw pixels")
    tables = [fits.BinTableHDU(saturated[ota], name=f"{ota_extname(ota)[:5]}.SATPIX")
              for ota in sorted(saturated)]
    path = catalog_path(directory, exposure_name)
    write_atomic(fits.HDUList([primary] + tables), path)
    mjd = float(primary_header["MJD-OBS"])
    end = mjd + float(primary_header.get("EXPTIME", 0.0)) / 86400
    add_to_index(directory, path, exposure_name, mjd, end)
    return path


def _connect(directory):
    connection = sqlite3.connect(Path(directory) / INDEX_NAME, timeout=INDEX_TIMEOUT)
    connection.execute("CREATE TABLE IF NOT EXISTS catalogs (path TEXT PRIMARY KEY, exposure TEXT, "
                       "mjd REAL NOT NULL, mjd_end REAL NOT NULL)")
    return connection


def add_to_index(directory, path, exposure_name, mjd, mjd_end):
    """Add (or renew) one catalog's row in the folder's index."""
    connection = _connect(directory)
    try:
        with connection:
            connection.execute("INSERT OR REPLACE INTO catalogs VALUES (?, ?, ?, ?)",
                               (str(Path(path).resolve()), exposure_name, mjd, mjd_end))
    finally:
        connection.close()


def indexed_catalogs(directory, mjd_from=-np.inf, mjd_to=np.inf, by_end=False):
    """Catalogs of the index whose ``MJD-OBS`` (or, ``by_end``, end of exposure) lies in
    [mjd_from, mjd_to], in time order.

    Returns
    -------
    list of (str, str, float, float)
        Path, exposure, ``MJD-OBS`` and end of exposure (MJD).
    """
    if not (Path(directory) / INDEX_NAME).is_file():
        return []
    connection = _connect(directory)
    try:
        return connection.execute(f"SELECT path, exposure, mjd, mjd_end FROM catalogs WHERE "
                                  f"{'mjd_end' if by_end else 'mjd'} BETWEEN ? AND ? ORDER BY mjd",
                                  (mjd_from, mjd_to)).fetchall()
    finally:
        connection.close()


def catalog_of_exposure(exposure, directory):
    """Read the raw OTA files of an exposure and write its saturation catalog.

    An OTA file that cannot be read is left out with a warning (its table is
    missing from the catalog, unlike an OTA without saturated pixels).

    Returns
    -------
    Path
    """
    saturated, primary, binning = {}, None, 1
    for ota, filename in sorted(exposure.ota_files.items()):
        try:
            with open_raw_ota(filename) as raw:
                saturated[ota] = saturated_pixels(raw.cells())
                if primary is None:
                    primary, binning = raw.header.copy(), raw.binning
        except RawDataError as error:
            logger.warning("OTA %02d left out of the saturation catalog: %s", ota, error)
    if primary is None:
        raise RawDataError(f"{exposure.base}: no readable OTA file for the saturation catalog")
    return write_catalog(directory, exposure.base, primary, binning, saturated)


# --- Masks (in each OTA's worker) -------------------------------------------------------

#: Earlier exposures whose saturated pixels are masked: those that ended at most this
#: many seconds before the frame started.
PERSISTENCE_SECONDS = 600.0


def _columns(saturated, catalog_binning, binning, extreme):
    """Per cell column with saturated pixels: ``(cx, cy, first, last column, row)`` in
    the cell at ``binning``, with the lowest (``extreme = min``) or highest (``max``)
    saturated row; raw-cell coordinates at ``catalog_binning`` are converted through
    unbinned pixels."""
    rows = {}
    for cx, cy, x, y in zip(saturated["CELL_X"], saturated["CELL_Y"], saturated["X"], saturated["Y"]):
        key = (int(cx), int(cy), int(x))
        rows[key] = extreme(rows.get(key, y), y)
    for (cx, cy, x), y in rows.items():
        first, last = _rebinned(x, catalog_binning, binning)
        yield cx, cy, first, last, extreme(_rebinned(int(y), catalog_binning, binning))


def _rebinned(index, catalog_binning, binning):
    """First and last pixel at ``binning`` covered by pixel ``index`` at ``catalog_binning``
    (through the unbinned pixels it holds)."""
    return index * catalog_binning // binning, ((index + 1) * catalog_binning - 1) // binning


def mask_saturation(image, saturated, binning, trails, catalog_binning=None):
    """Set saturation trails or persistent pixels of an OTA image to NaN.

    Parameters
    ----------
    image : numpy.ndarray
        The OTA ``[y, x]`` at ``binning``.
    saturated : numpy.ndarray
        :func:`saturated_pixels` of this exposure (``trails``) or of an earlier one.
    trails : bool
        True: this frame's trails, from each column's lowest saturated row to the top
        of its cell (a saturated star bleeds along its column). False: an earlier
        frame's persistence, from the bottom of the cell to each column's highest
        saturated row (the trapped charge is released, and read out through the rows
        below).
    catalog_binning : int, optional
        Binning of the exposure the catalog was made from (default ``binning``).

    Returns
    -------
    int
        Pixels set to NaN that were not NaN already.
    """
    geometry = cell_geometry(binning)
    masked = 0
    for cx, cy, first, last, row in _columns(saturated, catalog_binning or binning, binning,
                                             min if trails else max):
        # Saturation in the overscan only leaves nothing to mask in the image.
        if first >= geometry.science_cols or (trails and row >= geometry.science_rows):
            continue
        rows, columns = cell_to_ota(cx, cy, binning)
        y0, y1 = (rows.start + row, rows.stop) if trails else (rows.start, rows.start + min(
            row, geometry.science_rows - 1) + 1)
        part = image[y0:y1, columns.start + first:columns.start + min(last, geometry.science_cols - 1) + 1]
        masked += int(np.isfinite(part).sum())
        part[...] = np.nan
    return masked


def earlier_catalogs(directory, mjd):
    """Index rows of the exposures that ended within :data:`PERSISTENCE_SECONDS` before
    ``mjd`` (the decay is counted from the end of the saturating exposure)."""
    return indexed_catalogs(directory, mjd - PERSISTENCE_SECONDS / 86400, mjd, by_end=True)


def read_catalog(path, ota):
    """An OTA's saturated pixels and the binning of a catalog, or None without its table.

    A catalog that cannot be read gives a warning and None: a broken file of an
    earlier frame must not cost this one.
    """
    name = f"{ota_extname(ota)[:5]}.SATPIX"
    try:
        with fits.open(path) as hdus:
            if name not in hdus:
                return None
            return np.array(hdus[name].data), int(hdus[0].header.get("SATBIN", 1))
    except Exception as error:  # noqa: BLE001 - any unreadable catalog is one warning
        logger.warning("OTA %02d: saturation catalog %s unreadable (%s); its persistence is not "
                       "masked", ota, path, " ".join(str(error).split()))
        return None


# --- The persistence model (-persistency_model) -----------------------------------------

#: Decay time (s) of the model's persistent charge, ``A exp(-t / tau)`` per second after
#: the end of the saturating exposure: the original's legacy model (125 s).
PERSISTENCE_TAU = 125.0
#: Persistent charge up to this many times the sky noise is subtracted; above, masked.
CORRECTABLE_SIGMA = 10.0


def _pixels(saturated, catalog_binning, binning):
    """OTA pixels ``(rows, columns, cells)`` at ``binning`` of a catalog's saturated raw
    pixels, with their cell's slices (science sections only; a binned catalog pixel
    covers several unbinned ones)."""
    geometry = cell_geometry(binning)
    found = {}
    for cx, cy, x, y in zip(saturated["CELL_X"], saturated["CELL_Y"], saturated["X"], saturated["Y"]):
        cell = cell_to_ota(int(cx), int(cy), binning)
        (first_column, last_column), (first_row, last_row) = (
            _rebinned(int(i), catalog_binning, binning) for i in (x, y))
        for column in range(first_column, min(last_column, geometry.science_cols - 1) + 1):
            for row in range(first_row, min(last_row, geometry.science_rows - 1) + 1):
                found[(cell[0].start + row, cell[1].start + column)] = cell
    rows = np.array([pixel[0] for pixel in found], dtype=np.intp)
    columns = np.array([pixel[1] for pixel in found], dtype=np.intp)
    return rows, columns, list(found.values())


def decayed_charge(seconds_after, exptime):
    """Model charge per unit amplitude collected in ``[t, t + exptime]`` seconds after the
    end of the saturating exposure: ``tau (exp(-t/tau) - exp(-(t + exptime)/tau))``."""
    return PERSISTENCE_TAU * (math.exp(-seconds_after / PERSISTENCE_TAU)
                              - math.exp(-(seconds_after + exptime) / PERSISTENCE_TAU))


def _fit_amplitude(excess, model):
    """Least-squares ``excess = A x model``, clipped at 4 robust sigma; NaN without data."""
    keep = np.isfinite(excess)
    amplitude = math.nan
    for _ in range(5):
        if not np.any(model[keep] > 0):
            return math.nan
        amplitude = float(np.sum(excess[keep] * model[keep]) / np.sum(model[keep] ** 2))
        residual = excess - amplitude * model
        sigma = 1.4826 * float(np.median(np.abs(residual[keep])))
        inside = keep & (np.abs(residual) <= 4 * max(sigma, 1e-12))
        if (inside == keep).all():
            break
        keep = inside
    return amplitude


def correct_persistence(image, earlier, binning, exptime):
    """Subtract the fitted persistent charge of earlier exposures; mask where it is strong.

    The excess of the earlier exposures' saturated pixels over the median of their
    cells is fitted, over all of them, as ``A x decayed_charge(t, exptime)`` (t: seconds
    between each exposure's end and this one's start). Each exposure's charge
    ``A x decayed_charge`` is subtracted from its pixels where it is at most
    :data:`CORRECTABLE_SIGMA` times the sky noise (robust std of the image), and the
    pixels are masked (NaN) where it is larger.

    Parameters
    ----------
    image : numpy.ndarray
        The OTA (data units), changed in place.
    earlier : list of (numpy.ndarray, int, float)
        Each earlier exposure's saturated pixels on this OTA, its binning, and the
        seconds between its end and this exposure's start.
    binning : int
    exptime : float
        This exposure's time (s).

    Returns
    -------
    (float, int, int)
        The fitted amplitude ``A`` (data units per second; NaN without pixels), and the
        pixels corrected and masked.
    """
    groups = [(*_pixels(saturated, catalog_binning, binning), decayed_charge(seconds, exptime))
              for saturated, catalog_binning, seconds in earlier]
    if not sum(len(rows) for rows, *_ in groups):
        return math.nan, 0, 0
    sample = image[::7, ::7]
    sample = sample[np.isfinite(sample)]
    noise = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    medians = {}
    excess, model = [], []
    for rows, columns, cells, charge in groups:
        for cell in cells:
            key = (cell[0].start, cell[1].start)
            if key not in medians:
                medians[key] = float(np.nanmedian(image[cell]))
        background = np.array([medians[(cell[0].start, cell[1].start)] for cell in cells])
        excess.append(image[rows, columns] - background)
        model.append(np.full(len(rows), charge))
    amplitude = _fit_amplitude(np.concatenate(excess), np.concatenate(model))
    corrected = masked = 0
    for rows, columns, _, charge in groups:
        level = amplitude * charge
        if not math.isfinite(level):
            continue
        if level <= CORRECTABLE_SIGMA * noise:
            image[rows, columns] -= np.float32(level)
            corrected += len(rows)
        else:
            image[rows, columns] = np.nan
            masked += len(rows)
    return amplitude, corrected, masked
