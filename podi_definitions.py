"""Instrument model of the WIYN One Degree Imager: every number in one place.

Two focal planes are described: pODI (13 OTAs, 2012-2014) and ODI 5x6 (30 OTAs,
from 2015); :func:`layout_for_mjd` chooses between them by ``MJD-OBS``.

Pixel conventions
-----------------
All pixel indices are 0-based numpy ``[row, col] = [y, x]``; slices are
end-exclusive. A raw *cell* is one CCD amplifier (8x8 cells per OTA); its science
section is placed without flips into the monolithic OTA array (4096x4096 at
binning 1, 2048x2048 at binning 2). Cell ``cx`` grows with x; cell ``cy`` counts
top-down (``cy = 0`` is the top cell row, pixel y grows upward).
"""

import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

PIPELINE_NAME = "QuickReduce"
PIPELINE_VERSION = "0.1.0"

#: Full well of the 16-bit converter: raw values at this level are saturated (ADU).
SATURATION_ADU = 65535

#: Nominal pixel scale the original used everywhere (arcsec/pixel). Only for
#: rough numbers; real work uses the local WCS scale.
PIXEL_SCALE_NOMINAL = 0.11

#: True pixel scale at the optical axis of the project's optical model
#: (arcsec/pixel, binning 1); the real canned solutions give 0.1126.
PIXEL_SCALE = 0.1126

#: Radial optical distortion of the project's model: an undistorted tangent-plane
#: offset r (degrees) maps to r * (1 + k r^2) on the sky, k in deg^-2. Negative
#: (barrel): outer pixels see less sky, as the real canned solutions show.
DISTORTION_K3 = -0.025

#: Built-in crosstalk coefficient of the original: every off-diagonal term of the
#: forward matrix of every cell row, used without a crosstalk file; the simulator
#: shares it.
CROSSTALK_DEFAULT_COEFF = 5.6e-5

#: ``MJD-OBS`` from which data are ODI 5x6 (2015-01-01), and from which OTA 21 is dead.
ODI5X6_START_MJD = 57023.0
OTA21_DEAD_MJD = 58530.0

N_CELLS = 8  # cells per OTA along each axis


@dataclass(frozen=True)
class CellGeometry:
    """Fixed geometry of raw cells and their place in the OTA array for one binning.

    Attributes
    ----------
    binning : int
    science_rows, science_cols : int
        Size of the science (data) section, starting at row 0, column 0 of the cell.
    overscan_cols : tuple of int
        First and end-exclusive column of the serial overscan block used.
    overscan_rows : int
        Rows of the overscan block used (starting at row 0).
    pitch_x, pitch_y : float
        Distance between the origins of neighbouring cells in the OTA array (pixels).
    ota_size : int
        Side of the square OTA array (pixels).
    raw_shape : tuple of int
        ``(rows, cols)`` of the raw cells that the simulator writes; readers never
        assume it and take the real size from the data.
    """

    binning: int
    science_rows: int
    science_cols: int
    overscan_cols: tuple
    overscan_rows: int
    pitch_x: float
    pitch_y: float
    ota_size: int
    raw_shape: tuple


_GEOMETRY = {
    1: CellGeometry(1, 494, 480, (500, 550), 494, 508, 505, 4096, (512, 552)),
    2: CellGeometry(2, 247, 240, (260, 277), 247, 254, 252.5, 2048, (256, 280)),
}


def cell_geometry(binning):
    """Return the :class:`CellGeometry` for binning 1 or 2."""
    try:
        return _GEOMETRY[int(binning)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unsupported binning {binning!r} (only 1 and 2 exist)") from None


def science_section(binning):
    """Slices ``(rows, cols)`` of the science section inside a raw cell."""
    g = cell_geometry(binning)
    return slice(0, g.science_rows), slice(0, g.science_cols)


def overscan_section(binning):
    """Slices ``(rows, cols)`` of the overscan block inside a raw cell."""
    g = cell_geometry(binning)
    return slice(0, g.overscan_rows), slice(*g.overscan_cols)


def cell_origin(cx, cy, binning):
    """OTA-array pixel ``(x1, y1)`` where the science section of cell (cx, cy) starts."""
    g = cell_geometry(binning)
    return int(math.ceil(g.pitch_x * cx)), int(math.ceil(g.pitch_y * (N_CELLS - 1 - cy)))


def cell_to_ota(cx, cy, binning):
    """Slices ``(y, x)`` of the OTA array that receive the science section of a cell."""
    g = cell_geometry(binning)
    x1, y1 = cell_origin(cx, cy, binning)
    return slice(y1, y1 + g.science_rows), slice(x1, x1 + g.science_cols)


def ota_to_cell(x, y, binning):
    """Find the cell whose science section holds OTA pixel (x, y).

    Returns
    -------
    tuple or None
        ``(cx, cy, col, row)`` with the pixel's column and row inside the raw cell,
        or None where (x, y) falls into a gap between cells or outside the array.
    """
    g = cell_geometry(binning)
    cx = int(x // g.pitch_x)
    cy = N_CELLS - 1 - int(y // g.pitch_y)
    if not (0 <= cx < N_CELLS and 0 <= cy < N_CELLS):
        return None
    x1, y1 = cell_origin(cx, cy, binning)
    col, row = int(x) - x1, int(y) - y1
    if 0 <= col < g.science_cols and 0 <= row < g.science_rows:
        return cx, cy, col, row
    return None


def cell_extname(cx, cy):
    """Raw extension name of a cell (upper case; readers match case-insensitively)."""
    return f"XY{cx}{cy}"


def all_cells():
    """All ``(cx, cy)`` pairs in the raw file's HDU order."""
    return [(cx, cy) for cy in range(N_CELLS) for cx in range(N_CELLS)]


def cell_is_science(cellmode, cx, cy):
    """True if the ``CELLMODE`` character of cell (cx, cy) is ``S`` (science)."""
    if not cellmode or len(cellmode) < N_CELLS * N_CELLS:
        return True
    return cellmode[cx + N_CELLS * cy] == "S"


def is_guide_ota(cellmode):
    """An OTA with any video (``V``) cell is a guide OTA."""
    return bool(cellmode) and "V" in cellmode


@dataclass(frozen=True)
class FocalPlaneLayout:
    """One focal plane of ODI.

    Attributes
    ----------
    name : str
        ``podi`` or ``odi_5x6`` (also the folder name of per-layout calibrations).
    otas : tuple of int
        All OTA positions, ``10 * x + y``.
    output_order : tuple of int
        Inside-out order of the OTA extensions in output files.
    central_3x3, central_2x2, non_vignetted : tuple of int
    serials : dict
        OTA position -> detector serial (``OTA_ID``).
    broken_cells : dict
        OTA position -> cells ``(cx, cy)`` never used (pODI only; the broken cells
        of ODI 5x6 are not known, so there the ``CELLMODE`` keyword is the authority).
    """

    name: str
    otas: tuple
    output_order: tuple
    central_3x3: tuple
    central_2x2: tuple
    non_vignetted: tuple
    serials: dict
    broken_cells: dict


_CENTRAL_3X3 = (22, 23, 24, 32, 33, 34, 42, 43, 44)
_CENTRAL_2X2 = (22, 23, 32, 33)

PODI = FocalPlaneLayout(
    name="podi",
    otas=(0, 16, 22, 23, 24, 32, 33, 34, 42, 43, 44, 55, 61),
    output_order=(33, 34, 44, 43, 42, 32, 22, 23, 24, 55, 61, 16, 0),
    central_3x3=_CENTRAL_3X3,
    central_2x2=_CENTRAL_2X2,
    non_vignetted=(16, 22, 23, 24, 32, 33, 34, 42, 43, 44, 55, 61),
    serials={0: 13838, 16: 13880, 22: 13835, 23: 13901, 24: 13968, 32: 13974,
             33: 13879, 34: 13923, 42: 13792, 43: 13902, 44: 13947, 55: 13946,
             61: 13837},
    broken_cells={0: tuple((7, cy) for cy in range(N_CELLS)), 23: ((6, 6),),
                  34: ((1, 7), (3, 1)), 61: ((1, 3), (3, 1))},
)


def _inside_out(otas):
    # The original sorts positions by distance from focal-plane point (17000, 17000),
    # an OTA's centre being at (4300 x + 2000, 4300 y + 2000).
    def distance(ota):
        x, y = divmod(ota, 10)
        return math.hypot(4300 * x + 2000 - 17000, 4300 * y + 2000 - 17000)
    return tuple(sorted(otas, key=lambda ota: (distance(ota), ota)))


_ODI5X6_OTAS = tuple(10 * x + y for x in range(1, 6) for y in range(1, 7))

ODI_5X6 = FocalPlaneLayout(
    name="odi_5x6",
    otas=_ODI5X6_OTAS,
    output_order=_inside_out(_ODI5X6_OTAS),
    central_3x3=_CENTRAL_3X3,
    central_2x2=_CENTRAL_2X2,
    non_vignetted=_CENTRAL_2X2,
    serials={11: 13968, 12: 13974, 13: 13923, 14: 13901, 15: 13837, 16: 13946,
             21: 17189, 22: 17297, 23: 17144, 24: 17275, 25: 13880, 26: 13835,
             31: 17187, 32: 17231, 33: 17121, 34: 17166, 35: 13947, 36: 13902,
             41: 17234, 42: 17277, 43: 17341, 44: 17167, 45: 13879, 46: 13792,
             51: 17253, 52: 17190, 53: 17278, 54: 17122, 55: 13838, 56: 8101},
    broken_cells={},
)

LAYOUTS = {PODI.name: PODI, ODI_5X6.name: ODI_5X6}


def layout_for_mjd(mjd):
    """The focal plane in use at ``MJD-OBS`` (pODI before 2015, ODI 5x6 after)."""
    return PODI if float(mjd) < ODI5X6_START_MJD else ODI_5X6


def layout_by_name(name):
    """Look up a layout by its name (``podi`` or ``odi_5x6``)."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown focal plane {name!r}; known: {', '.join(LAYOUTS)}") from None


def working_otas(layout, mjd):
    """OTAs that deliver data at ``mjd`` (OTA 21 of ODI 5x6 died in 2019)."""
    if layout is ODI_5X6 and float(mjd) >= OTA21_DEAD_MJD:
        return tuple(ota for ota in layout.otas if ota != 21)
    return layout.otas


def broken_cells(layout, ota):
    """Cells ``(cx, cy)`` of an OTA that are never used."""
    return layout.broken_cells.get(ota, ())


def ota_from_fppos(fppos):
    """OTA number from an ``FPPOS`` value such as ``'xy33'``."""
    match = re.fullmatch(r"\s*xy(\d)(\d)\s*", str(fppos), re.IGNORECASE)
    if not match:
        raise ValueError(f"FPPOS {fppos!r} is not of the form 'xyNN'")
    return int(match.group(1) + match.group(2))


def fppos_for_ota(ota):
    """``FPPOS`` value of an OTA: 33 -> ``'xy33'``."""
    return f"xy{ota:02d}"


def ota_extname(ota):
    """Name of an OTA's image extension in pipeline output files: ``OTA33.SCI``."""
    return f"OTA{ota:02d}.SCI"


def binning_from_header(header):
    """Binning factor from ``CCDBIN1``, else the first integer of ``CCDSUM``, else 1."""
    if "CCDBIN1" in header:
        return int(header["CCDBIN1"])
    if "CCDSUM" in header:
        return int(str(header["CCDSUM"]).split()[0])
    return 1


# --- Focal-plane positions of the project's optical model -------------------------

#: Distance between the origins of neighbouring OTAs in the focal plane (pixels,
#: binning 1) along x and y, as the real canned WCS solutions place them.
OTA_PITCH = (4216.0, 4330.0)

#: Optical axis (= telescope pointing = tangent point of the model) in the pixel
#: coordinates of OTA 33 (0-based, binning 1): the middle of the gap cross between
#: OTAs 33, 34, 43 and 44, where the real canned solutions put it too.
OPTICAL_AXIS_OTA33 = ((4096 + OTA_PITCH[0]) / 2, (4096 + OTA_PITCH[1]) / 2)


def ota_origin_in_focal_plane(ota, binning=1):
    """Focal-plane position of pixel (0, 0) of an OTA, relative to the optical axis.

    Returns
    -------
    tuple of float
        ``(x, y)`` in pixels of the given binning, 0-based, the focal-plane axes
        parallel to the OTA axes (x grows with the OTA's first digit).
    """
    ota_x, ota_y = divmod(ota, 10)
    x = (ota_x - 3) * OTA_PITCH[0] - OPTICAL_AXIS_OTA33[0]
    y = (ota_y - 3) * OTA_PITCH[1] - OPTICAL_AXIS_OTA33[1]
    return x / binning, y / binning


def focal_plane_to_ota(x, y, layout, binning=1):
    """Which OTA of a layout holds a focal-plane position, and where.

    Parameters
    ----------
    x, y : float
        Position relative to the optical axis (pixels of the given binning), as
        returned by :func:`ota_origin_in_focal_plane` plus an offset.

    Returns
    -------
    tuple or None
        ``(ota, x_ota, y_ota)`` in 0-based OTA pixels, or None between OTAs.
    """
    size = cell_geometry(binning).ota_size
    for ota in layout.otas:
        x0, y0 = ota_origin_in_focal_plane(ota, binning)
        if 0 <= x - x0 < size and 0 <= y - y0 < size:
            return ota, x - x0, y - y0
    return None


# --- Filters ----------------------------------------------------------------------

_FILTERID_NAMES = {
    "4": "odi_g", "w104": "odi_g", "w105": "odi_r", "w103": "odi_i", "w101": "odi_z",
    "c6009": "CTIO_Ha", "c6022": "sdss_u", "c6014": "CTIO_OIII", "k1053": "BATC_420",
    "k1052": "BATC_390", "clear": "OPEN", "k1047": "823_v2", "k1028": "918R_v1",
}

#: Filters that illuminate the whole focal plane.
FULL_FIELD_FILTERS = ("odi_g", "odi_r", "odi_i", "odi_z", "OPEN", "windowGlass")

#: Filter centre and width (nm) of the broad bands.
FILTER_BANDPASS = {"odi_g": (476, 74), "odi_r": (635, 75), "odi_i": (760, 60),
                   "odi_z": (905, 75)}


def normalised_filter_name(header):
    """Filter name from ``FILTERID`` (known ids), else ``FILTER``, else ``unknown``."""
    filter_id = str(header.get("FILTERID", "")).strip().lower()
    if filter_id in _FILTERID_NAMES:
        return _FILTERID_NAMES[filter_id]
    name = str(header.get("FILTER", "")).strip()
    return name or "unknown"


def filter_level(header):
    """Filter arm level: the ``l`` of the first ``FLTARM<l><a>`` that is ``IN``.

    Returns 0 if no arm is in, -1 if more than one is.
    """
    levels = [level for level in (1, 2, 3) for arm in "ABC"
              if str(header.get(f"FLTARM{level}{arm}", "")).strip().upper() == "IN"]
    if not levels:
        return 0
    return levels[0] if len(levels) == 1 else -1


def otas_to_normalize_flat(filter_name, layout):
    """OTAs whose pooled pixels define the level 1.0 of a master flat."""
    if filter_name == "windowGlass":
        return layout.otas
    if filter_name in FULL_FIELD_FILTERS:
        return layout.non_vignetted
    return layout.central_2x2


# --- Data shipped with the package -------------------------------------------------

def package_data_dir(folder):
    """Path of a data folder shipped with the package (``wcs`` or ``bpm``).

    Installed packages carry them as ``podi_data.<folder>``; a source checkout has
    them beside this module.
    """
    try:
        path = Path(str(resources.files(f"podi_data.{folder}")))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent / folder


def undefined_value(prep4sex=False):
    """Value of pixels without data: NaN, or -1e31 for SExtractor (``-prep4sex``)."""
    return np.float32(-1e31) if prep4sex else np.float32(np.nan)
