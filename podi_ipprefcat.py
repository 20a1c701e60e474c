"""Reference star catalogs for the astrometric calibration (``-refcat``).

A reference catalog is opened once with :func:`open_refcat` and then asked for the
stars of a field with ``query(ra, dec, radius_deg, epoch=None)``. Sources:

* one FITS or CSV table with columns ``ra``, ``dec`` (degrees ICRS, any case),
  optionally ``pmra``, ``pmdec`` (mas/yr, ``pmra`` includes cos(dec)) with an epoch
  (column ``epoch`` or ``ref_epoch``, or header keyword ``EPOCH``; decimal years),
  and magnitudes ``u g r i z`` with errors ``u_err`` ... ``z_err``;
* a directory of such tables tiled on the sky, indexed by ``SkyTable.fits``
  (columns ``filename``, ``ra_min``, ``ra_max``, ``dec_min``, ``dec_max`` in degrees;
  ``ra_min > ra_max`` means the tile wraps through RA 0/360); only the tiles that
  overlap a query are read. :func:`write_tiled_catalog` makes such a directory;
* ``gaia``: Gaia DR3 through astroquery (optional dependency), cached on disk under
  ``$PODI_CACHE/gaia`` or ``~/.cache/podi_quickreduce/gaia``;
* ``None``: the value of the environment variable ``PODI_REFCAT``.

Query results hold every column of the source, with ``ra``/``dec`` (and ``pmra``,
``pmdec``, ``epoch``, ``ref_epoch``, ``u``...``z_err``) under lower-case names.
"""

import importlib
import logging
import math
import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

from podi_mef import open_fits
from podi_sphere import search_box, select_circle, unit_vectors

logger = logging.getLogger(__name__)

ENV_REFCAT = "PODI_REFCAT"
ENV_CACHE = "PODI_CACHE"
INDEX_NAME = "SkyTable.fits"

#: Columns recognised whatever their case in the source; renamed to these names.
_CANONICAL = ("ra", "dec", "pmra", "pmdec", "epoch", "ref_epoch") + tuple(
    name for band in "ugriz" for name in (band, f"{band}_err"))

#: Largest known proper motion (Barnard's star, 10.4"/yr), rounded up, degrees/yr.
#: Tiles are selected with this margin so fast stars that moved across a tile
#: border are still found.
_MAX_PM_DEG_PER_YEAR = 11.0 / 3600
#: Epoch assumed when choosing tiles (before any tile's true epoch is known);
#: the margin covers catalogs with epochs within 25 years of it.
_NOMINAL_EPOCH, _EPOCH_SLACK_YEARS = 2000.0, 25.0

#: Gaia cache keys round centre and radius to this step (degrees); the service is
#: asked for a circle larger by one step so the rounded circle still covers the query.
_GAIA_KEY_STEP = 0.01
_GAIA_COLUMNS = ("source_id, ra, dec, ra_error, dec_error, ref_epoch, pmra, pmdec, parallax, "
                 "phot_g_mean_mag, phot_bp_mean_mag, phot_rp_mean_mag")


class RefcatError(ValueError):
    """A reference catalog is missing, unreadable or cannot be queried (a bad input)."""


# --- Proper motion ------------------------------------------------------------------

def propagate(ra, dec, pmra, pmdec, years):
    """Move positions by their proper motion.

    Parameters
    ----------
    ra, dec : array
        Positions, degrees.
    pmra, pmdec : array
        Proper motions, mas/yr (``pmra`` includes cos(dec)); NaN means none.
    years : array or float
        Time to move over, years.

    Returns
    -------
    ra, dec : ndarray
        New positions, degrees.
    """
    # Along the tangent vectors of the sphere, so that it stays right at the poles
    # where dRA = pmra / cos(dec) would blow up.
    ra_rad, dec_rad = np.radians(ra), np.radians(dec)
    east = np.array([-np.sin(ra_rad), np.cos(ra_rad), np.zeros_like(ra_rad)])
    north = np.array([-np.sin(dec_rad) * np.cos(ra_rad), -np.sin(dec_rad) * np.sin(ra_rad),
                      np.cos(dec_rad)])
    scale = np.radians(np.asarray(years, dtype=float) / 3.6e6)
    d_east = np.nan_to_num(np.asarray(pmra, dtype=float) * scale)
    d_north = np.nan_to_num(np.asarray(pmdec, dtype=float) * scale)
    vector = unit_vectors(ra, dec) + east * d_east + north * d_north
    vector /= np.linalg.norm(vector, axis=0)
    ra_out = np.degrees(np.arctan2(vector[1], vector[0])) % 360.0
    dec_out = np.degrees(np.arcsin(np.clip(vector[2], -1.0, 1.0)))
    return ra_out, dec_out


# --- Tables ---------------------------------------------------------------------------

def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_table(path):
    """A catalog file as a Table with canonical column names."""
    path = Path(path)
    logger.debug("reading reference catalog %s", path)
    try:
        if path.name.lower().endswith((".csv", ".csv.gz")):
            table = Table.read(path, format="ascii.csv")
        else:
            with open_fits(path) as hdul:
                # The first table extension, whatever follows (kd-tree files carry more).
                tables = (h for h in hdul[1:] if isinstance(h, (fits.BinTableHDU, fits.TableHDU)))
                hdu = next(tables, None)
                if hdu is None:
                    raise RefcatError(f"{path}: no table extension")
                table = Table.read(hdu)
    except RefcatError:
        raise
    except Exception as exc:  # astropy raises many types for a bad file
        raise RefcatError(f"cannot read reference catalog {path}: {_first_line(exc)}") from exc
    return _normalise(table, path)


def _normalise(table, source):
    """Rename recognised columns to their canonical lower-case names; require ra/dec."""
    by_lower = {}
    for name in table.colnames:
        by_lower.setdefault(name.lower(), name)
    for canonical in _CANONICAL:
        name = by_lower.get(canonical)
        if name is not None and name != canonical and canonical not in table.colnames:
            table.rename_column(name, canonical)
    missing = [c for c in ("ra", "dec") if c not in table.colnames]
    if missing:
        raise RefcatError(f"reference catalog {source} has no {'/'.join(missing)} column")
    for name in [c for c in _CANONICAL if c in table.colnames]:
        if table[name].dtype.kind not in "fiu":
            raise RefcatError(f"reference catalog {source}: column {name} holds "
                              f"{table[name].dtype.name} values, not numbers")
    return table


def filled(column, fill=np.nan):
    """Float array of a (possibly masked) column, masked entries set to ``fill``."""
    data = np.ma.asarray(column).astype(float)
    return np.ma.filled(data, fill)


def _source_epoch(table):
    """Per-row epoch (decimal years) of the positions, or None when unknown."""
    for name in ("epoch", "ref_epoch"):
        if name in table.colnames:
            return filled(table[name])
    for key, value in table.meta.items():
        if key.upper() == "EPOCH":
            return np.full(len(table), float(value))
    return None


def _at_epoch(table, epoch):
    """Copy of ``table`` with positions moved to ``epoch`` where the source allows."""
    source_epoch = _source_epoch(table)
    if epoch is None or source_epoch is None or not {"pmra", "pmdec"} <= set(table.colnames):
        return table
    pmra, pmdec = filled(table["pmra"]), filled(table["pmdec"])
    years = epoch - source_epoch
    # Rows without motion, epoch or time to move keep their stored positions exactly
    # (no round-off from the vector arithmetic).
    moving = (np.isfinite(years) & (years != 0) & np.isfinite(pmra) & np.isfinite(pmdec)
              & ((pmra != 0) | (pmdec != 0)))
    ra, dec = filled(table["ra"]), filled(table["dec"])
    ra[moving], dec[moving] = propagate(ra[moving], dec[moving], pmra[moving], pmdec[moving],
                                        years[moving])
    out = table.copy()
    out["ra"], out["dec"] = ra, dec
    out.meta["EPOCH"] = epoch
    return out


def _cone(table, ra, dec, radius_deg, epoch):
    """Rows of ``table`` within the circle, with positions at ``epoch``."""
    moved = _at_epoch(table, epoch)
    return moved[select_circle(filled(moved["ra"]), filled(moved["dec"]), ra, dec, radius_deg)]


# --- Catalog kinds --------------------------------------------------------------------

class FileCatalog:
    """One FITS or CSV table, read on the first query and kept in memory."""

    def __init__(self, path):
        self.path = Path(path)
        self._table = None

    def query(self, ra, dec, radius_deg, epoch=None):
        """Stars within ``radius_deg`` (degrees) of (ra, dec), positions at ``epoch``.

        Parameters
        ----------
        ra, dec : float
            Field centre, degrees ICRS.
        radius_deg : float
            Search radius, degrees.
        epoch : float, optional
            Decimal year to move positions to; None keeps them as stored.

        Returns
        -------
        astropy.table.Table
            Possibly empty.
        """
        if self._table is None:
            self._table = _read_table(self.path)
        return _cone(self._table, ra, dec, radius_deg, epoch)


class TiledCatalog:
    """A directory of tables tiled on the sky with a ``SkyTable.fits`` index.

    ``tiles_read`` lists the tile files read so far (each is read once and kept).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise RefcatError(f"reference catalog directory {self.directory} has no {INDEX_NAME}")
        try:
            self.index = Table.read(index_path)
        except Exception as exc:
            raise RefcatError(f"cannot read {index_path}: {_first_line(exc)}") from exc
        missing = {"filename", "ra_min", "ra_max", "dec_min", "dec_max"} - set(self.index.colnames)
        if missing:
            raise RefcatError(f"{index_path} lacks columns {', '.join(sorted(missing))}")
        self.tiles_read = []
        self._tiles = {}

    def _overlapping(self, ra, dec, radius_deg):
        """Index rows of tiles that overlap the search box of the circle."""
        ra_ranges, (dec_lo, dec_hi) = search_box(ra, dec, radius_deg)
        rows = []
        for row in self.index:
            if row["dec_min"] > dec_hi or row["dec_max"] < dec_lo:
                continue
            lo, hi = float(row["ra_min"]), float(row["ra_max"])
            tile_ranges = [(lo, hi)] if lo <= hi else [(lo, 360.0), (0.0, hi)]
            if any(t_lo <= q_hi and t_hi >= q_lo
                   for t_lo, t_hi in tile_ranges for q_lo, q_hi in ra_ranges):
                rows.append(row)
        return rows

    def _tile(self, filename):
        if filename not in self._tiles:
            path = self.directory / filename
            self._tiles[filename] = _read_table(path)
            self.tiles_read.append(path)
        return self._tiles[filename]

    def query(self, ra, dec, radius_deg, epoch=None):
        """Stars within ``radius_deg`` (degrees) of (ra, dec) at ``epoch``; see FileCatalog."""
        margin = 0.0
        if epoch is not None:
            margin = _MAX_PM_DEG_PER_YEAR * (abs(epoch - _NOMINAL_EPOCH) + _EPOCH_SLACK_YEARS)
        rows = self._overlapping(ra, dec, radius_deg + margin)
        logger.debug("reference tiles for (%.4f, %.4f) r=%.3f: %d of %d", ra, dec, radius_deg,
                     len(rows), len(self.index))
        parts = [_cone(self._tile(str(row["filename"]).strip()), ra, dec, radius_deg, epoch)
                 for row in rows]
        found = [part for part in parts if len(part)]
        if len(found) > 1:
            return vstack(found, metadata_conflicts="silent")
        if found:
            return found[0]
        # Empty, but with the catalog's columns when any tile was looked at.
        return parts[0] if parts else Table(names=("ra", "dec"), dtype=(float, float))


def gaia_cache_dir():
    """Directory of cached Gaia queries.

    ``$PODI_CACHE/gaia`` when ``PODI_CACHE`` is set, else ``~/.cache/podi_quickreduce/gaia``.
    """
    root = os.environ.get(ENV_CACHE)
    base = Path(root) if root else Path.home() / ".cache" / "podi_quickreduce"
    return base / "gaia"


class GaiaCatalog:
    """Gaia DR3 through astroquery, each query cached as a FITS table.

    Queries are keyed by centre and radius rounded to 0.01 degrees; the service is
    asked for a slightly larger circle and the exact circle is cut locally, so
    nearby queries share a cache file without losing stars at the edge.
    """

    def __init__(self, cache_dir=None):
        self.cache_dir = Path(cache_dir) if cache_dir else gaia_cache_dir()

    def _key(self, ra, dec, radius_deg):
        step = _GAIA_KEY_STEP
        ra_key = round((ra % 360.0) / step) * step % 360.0
        dec_key = round(dec / step) * step
        # The tolerance keeps 0.2 / 0.01 = 20.000000000000004 from rounding up to 21.
        radius_key = math.ceil(radius_deg / step - 1e-9) * step
        return ra_key, dec_key, radius_key

    def cache_path(self, ra, dec, radius_deg):
        """File that caches the query of this field (whether or not it exists yet)."""
        ra_key, dec_key, radius_key = self._key(ra, dec, radius_deg)
        return self.cache_dir / f"gaiadr3_{ra_key:07.3f}_{dec_key:+07.3f}_{radius_key:.3f}.fits"

    def _fetch(self, ra, dec, radius_deg):
        """Gaia DR3 sources within the (enlarged) circle, from the archive."""
        try:
            gaia = importlib.import_module("astroquery.gaia")
        except ImportError as exc:
            raise RefcatError("-refcat=gaia needs astroquery (pip install "
                              "'podi-quickreduce[gaia]')") from exc
        adql = (f"SELECT {_GAIA_COLUMNS} FROM gaiadr3.gaia_source WHERE 1 = CONTAINS("
                f"POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra:.6f}, {dec:.6f}, {radius_deg:.6f}))")
        logger.info("querying Gaia DR3 around (%.4f, %.4f), radius %.3f deg", ra, dec, radius_deg)
        try:
            table = gaia.Gaia.launch_job_async(adql).get_results()
        except Exception as exc:  # network and service errors come in many types
            raise RefcatError(f"Gaia DR3 query failed (network?): {_first_line(exc)}") from exc
        return table

    def query(self, ra, dec, radius_deg, epoch=None):
        """Gaia stars within ``radius_deg`` (degrees) of (ra, dec) at ``epoch``.

        Returns Gaia's columns (``phot_g_mean_mag`` ...): Gaia has no ugriz.
        """
        path = self.cache_path(ra, dec, radius_deg)
        if path.is_file():
            logger.debug("Gaia cache hit %s", path)
            table = _read_table(path)
        else:
            ra_key, dec_key, radius_key = self._key(ra, dec, radius_deg)
            fetched = self._fetch(ra_key, dec_key, radius_key + _GAIA_KEY_STEP)
            table = _normalise(fetched, "Gaia DR3")
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written under a temporary name first so a crash never leaves a truncated cache.
            partial = path.with_name(path.name + ".part")
            table.write(partial, format="fits", overwrite=True)
            partial.replace(path)
        return _cone(table, ra, dec, radius_deg, epoch)


def open_refcat(spec=None):
    """Open a reference catalog.

    Parameters
    ----------
    spec : str, Path or None
        A FITS/CSV file, a tiled directory with ``SkyTable.fits``, ``"gaia"``, or
        None for the environment variable ``PODI_REFCAT``.

    Returns
    -------
    FileCatalog, TiledCatalog or GaiaCatalog
        An object with ``query(ra, dec, radius_deg, epoch=None)``.

    Raises
    ------
    RefcatError
        Nothing configured, or the path does not exist or is not a catalog.
    """
    if spec is None or str(spec).strip() == "":
        spec = os.environ.get(ENV_REFCAT, "").strip()
        if not spec:
            raise RefcatError("no reference catalog configured: "
                              "use -refcat=PATH or set PODI_REFCAT")
    if str(spec).lower() == "gaia":
        return GaiaCatalog()
    path = Path(spec).expanduser()
    if path.is_dir():
        return TiledCatalog(path)
    if not path.is_file():
        raise RefcatError(f"reference catalog {path} does not exist")
    return FileCatalog(path)


# --- Writing tiled catalogs ------------------------------------------------------------

def write_tiled_catalog(table, directory, tile_deg=10.0, ra_start=0.0):
    """Split a catalog into sky tiles and write them with a ``SkyTable.fits`` index.

    Parameters
    ----------
    table : astropy.table.Table
        Catalog with ``ra``, ``dec`` columns (degrees).
    directory : str or Path
        Output directory, created if needed.
    tile_deg : float
        Nominal tile size, degrees; rounded so tiles divide 360 (RA) and 180 (Dec).
    ra_start : float
        RA of the first tile edge, degrees; non-zero makes one tile wrap through 0/360.

    Returns
    -------
    Path
        The index file. Empty tiles are neither written nor indexed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = _normalise(table.copy(copy_data=False), "table to tile")
    n_ra, n_dec = math.ceil(360.0 / tile_deg), math.ceil(180.0 / tile_deg)
    width, height = 360.0 / n_ra, 180.0 / n_dec
    ra = np.asarray(table["ra"], dtype=float)
    dec = np.asarray(table["dec"], dtype=float)
    i_ra = np.minimum(((ra - ra_start) % 360.0 // width).astype(int), n_ra - 1)
    i_dec = np.clip(((dec + 90.0) // height).astype(int), 0, n_dec - 1)
    index = Table(names=("filename", "ra_min", "ra_max", "dec_min", "dec_max"),
                  dtype=("U32", float, float, float, float))
    cell = i_dec * n_ra + i_ra
    for number in np.unique(cell):
        j, i = divmod(int(number), n_ra)
        filename = f"tile_d{j:03d}_r{i:03d}.fits"
        table[cell == number].write(directory / filename, overwrite=True)
        ra_min = (ra_start + i * width) % 360.0
        # The last tile ends exactly where the first begins (no rounding slivers);
        # an end at 0 is stored as 360, since ra_max < ra_min would mean wrapping.
        ra_max = (ra_start + (i + 1) * width if i < n_ra - 1 else ra_start) % 360.0
        ra_max = 360.0 if ra_max == 0.0 else ra_max
        index.add_row((filename, ra_min, ra_max, -90.0 + j * height, -90.0 + (j + 1) * height))
    path = directory / INDEX_NAME
    index.write(path, overwrite=True)
    logger.info("wrote %d reference tiles to %s", len(index), directory)
    return path
