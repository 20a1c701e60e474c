"""Bad-pixel masks of ODI OTAs, read from and written to ds9 region files.

Each OTA has a file ``bpm_xy<NN>.reg`` in ds9 *image* coordinates of the unbinned
4096x4096 OTA array, with two kinds of defect:

* ``box(xc, yc, width, height, angle)`` masks every pixel whose centre lies inside
  the (possibly rotated) box;
* ``vector(x, y, length, angle)``, which ds9 writes as a comment
  (``# vector(...) vector=1``), marks a bad column or row: the whole column
  (angle near 90 or 270 degrees) or row (near 0 or 180 degrees) through the
  vector's start is masked, over the science section of the cell holding that
  start. The vector's length is not used.

Pixel conventions
-----------------
ds9 coordinates are 1-based: the centre of ds9 pixel 1 is numpy index 0. All
coordinates in this module's API are 0-based, in pixels of the *unbinned* OTA
array; masks are numpy ``[y, x]`` arrays. A pixel with index ``i`` spans
``[i - 0.5, i + 0.5)``; a box covers the half-open ranges
``-width/2 <= u < width/2`` and ``-height/2 <= v < height/2`` of its own
(rotated) axes, so an unrotated box of integer size masks exactly
``width x height`` pixels, also where its edges fall on pixel centres as in
hand-made files (there ``regions``' ``to_mask(mode='center')`` leaves out both
edges). At binning 2 a binned pixel is bad if any of the unbinned pixels it
holds is bad.

Why a parser of our own: the ``regions`` package (0.12) reads every real file
correctly but drops vectors (ds9 writes them as comments, and ``regions`` skips
an uncommented ``vector`` with a warning), only warns and returns nothing for a
file of text garbage, and cannot name the line of a problem. The files use two
shapes in image coordinates, which a few lines parse fully; the tests check
this parser against ``regions`` on every real file.
"""

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from podi_definitions import cell_geometry, cell_to_ota, ota_to_cell

logger = logging.getLogger(__name__)

#: A vector within this many degrees of the x or y axis marks a bad row or column.
VECTOR_ANGLE_TOLERANCE = 3.0

_HEADER = (
    "# Region file format: DS9 version 4.1\n"
    'global color=green dashlist=8 3 width=1 font="helvetica 10 normal roman" '
    "select=1 highlite=1 dash=0 fixed=0 edit=1 move=1 delete=1 include=1 source=1\n"
    "image\n"
)

# ds9 writes vectors as comments, yet in these files they are defects.
_COMMENTED_VECTOR = re.compile(r"#\s*vector\s*\(")
_SHAPE = re.compile(r"([+-]?)\s*([a-z]+)\s*\(([^()]*)\)", re.IGNORECASE)
_WORD = re.compile(r"[a-z][a-z0-9]*", re.IGNORECASE)


@dataclass(frozen=True)
class _Box:
    """A ds9 box, 0-based unbinned OTA pixels; ``angle`` in degrees counter-clockwise."""

    xc: float
    yc: float
    width: float
    height: float
    angle: float
    line: int


@dataclass(frozen=True)
class _Vector:
    """A ds9 vector: start 0-based unbinned OTA pixels, ``angle`` in degrees."""

    x: float
    y: float
    length: float
    angle: float
    line: int


def bpm_filename(directory, ota):
    """Path of the region file of one OTA.

    Parameters
    ----------
    directory : str or Path
        Folder holding the ``bpm_xy<NN>.reg`` files of one focal-plane layout.
    ota : int
        OTA position ``10 * x + y``, e.g. 33 or 0.

    Returns
    -------
    Path
        ``directory / 'bpm_xy<NN>.reg'``, e.g. ``bpm_xy00.reg`` for OTA 0.
    """
    return Path(directory) / f"bpm_xy{int(ota):02d}.reg"


def read_bpm_mask(filename, binning=1):
    """Read the bad-pixel mask of one OTA from a ds9 region file.

    Parameters
    ----------
    filename : str or Path
        ds9 region file in 1-based image coordinates of the unbinned OTA array.
    binning : int
        1 or 2: binning of the OTA array the mask is made for.

    Returns
    -------
    numpy.ndarray of bool
        Shape ``(ota_size, ota_size)`` (4096 at binning 1, 2048 at binning 2),
        indexed 0-based ``[y, x]``; True marks a bad pixel.

    Raises
    ------
    ValueError
        If the file is not a ds9 region file in image coordinates (the message
        names the file, and the line where one is at fault).
    FileNotFoundError
        If the file does not exist.
    """
    geometry = cell_geometry(binning)
    path = Path(filename)
    boxes, vectors = _parse_regions(path)
    mask = np.zeros((cell_geometry(1).ota_size,) * 2, dtype=bool)
    # One message per file: a file drawn on another frame has dozens of such boxes.
    missing = [str(box.line) for box in boxes if not _mask_box(mask, box)]
    if missing:
        logger.warning("%s: %d box(es) mask no pixel of the OTA array, ignored "
                       "(lines %s)", path, len(missing), ", ".join(missing))
    for vector in vectors:
        _mask_vector(mask, vector, path)
    return _bin_mask(mask, geometry.binning)


def apply_bpm(data, filename, binning=1, fill=np.nan):
    """Set the bad pixels of an OTA array to ``fill``, in place.

    Parameters
    ----------
    data : numpy.ndarray
        OTA array (float32), 0-based ``[y, x]``, of the shape
        :func:`read_bpm_mask` returns for ``binning``.
    filename : str or Path
        ds9 region file of this OTA (see :func:`read_bpm_mask`).
    binning : int
        Binning of ``data``.
    fill : float
        Value given to bad pixels.

    Returns
    -------
    int
        Number of pixels masked.
    """
    mask = read_bpm_mask(filename, binning)
    if data.shape != mask.shape:
        raise ValueError(f"{filename}: data of shape {data.shape} do not match the "
                         f"{mask.shape} OTA array at binning {binning}")
    data[mask] = fill
    return int(np.count_nonzero(mask))


def write_bpm_regions(filename, boxes=(), vectors=()):
    """Write defects as a ds9 4.1 region file in image coordinates.

    The file has the header of the real ODI files; :func:`read_bpm_mask` gives
    back exactly the pixels of each box (pixel-centre rule) and each vector.

    Parameters
    ----------
    filename : str or Path
        File to write (replaced if it exists).
    boxes : iterable of tuple
        ``(xc, yc, width, height)``: centre in 0-based unbinned OTA pixel
        coordinates and size in pixels; written unrotated. Columns ``x0..x1`` and
        rows ``y0..y1`` (inclusive) are ``((x0 + x1) / 2, (y0 + y1) / 2,
        x1 - x0 + 1, y1 - y0 + 1)``.
    vectors : iterable of tuple
        ``(x, y, length, angle)``: start in 0-based unbinned OTA pixel
        coordinates, length in pixels, angle in degrees counter-clockwise from +x;
        written as ds9 comments ``# vector(...) vector=1`` like the real files.
    """
    lines = [_HEADER]
    for xc, yc, width, height in boxes:
        lines.append(f"box({_number(xc + 1)},{_number(yc + 1)},"
                     f"{_number(width)},{_number(height)},0)\n")
    for x, y, length, angle in vectors:
        lines.append(f"# vector({_number(x + 1)},{_number(y + 1)},"
                     f"{_number(length)},{_number(angle)}) vector=1\n")
    Path(filename).write_text("".join(lines))


def _number(value):
    """Shortest text that reads back as the same float (no trailing ``.0``)."""
    return np.format_float_positional(float(value), trim="-")


def _parse_regions(path):
    """Boxes and vectors of a region file, converted to 0-based coordinates."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a ds9 region file (not text)") from None
    boxes, vectors = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        statement = line.strip()
        if _COMMENTED_VECTOR.match(statement):
            statement = statement[1:]
        # Properties and comments follow '#'; ';' separates regions on one line.
        for part in statement.split("#", 1)[0].split(";"):
            shape = _parse_statement(part.strip(), path, lineno)
            if isinstance(shape, _Box):
                boxes.append(shape)
            elif isinstance(shape, _Vector):
                vectors.append(shape)
    return boxes, vectors


def _parse_statement(statement, path, lineno):
    """One ds9 statement as a :class:`_Box`, a :class:`_Vector` or None (ignored)."""
    where = f"{path}:{lineno}"
    if not statement or statement.lower() == "image" or statement.split()[0] == "global":
        return None
    match = _SHAPE.match(statement)
    if match is None:
        if _WORD.fullmatch(statement):
            raise ValueError(f"{where}: coordinate system {statement!r} is not "
                             "supported; bad-pixel regions must be in 'image' pixels")
        raise ValueError(f"{where}: not a ds9 region line: {statement[:60]!r}")
    sign, name, args = match.groups()
    name = name.lower()
    values = _numbers(args, where)
    if sign == "-":
        logger.warning("%s: exclude region %s(...) ignored", where, name)
    elif name == "box" and len(values) in (4, 5):
        xc, yc, width, height, angle = (values + [0.0])[:5]
        return _Box(xc - 1, yc - 1, width, height, angle, lineno)
    elif name == "vector" and len(values) == 4:
        x, y, length, angle = values
        return _Vector(x - 1, y - 1, length, angle, lineno)
    else:
        logger.warning("%s: %s region with %d parameters ignored (only box and vector "
                       "are bad-pixel regions)", where, name, len(values))
    return None


def _numbers(args, where):
    """Floats of a ds9 argument list (separated by commas or blanks)."""
    try:
        values = [float(arg) for arg in re.split(r"[\s,]+", args.strip()) if arg]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"{where}: region parameters {args[:60]!r} are not finite "
                         "numbers (only image pixel coordinates are supported)")
    return values


def _box_axes(box):
    """Half width, half height, cos and sin of the angle of a box.

    A box turned by a multiple of 90 degrees is taken as unturned (with width and
    height swapped for odd quarters), so that a pixel centre on its edge resolves
    the same way in all four orientations.
    """
    quarters, rest = divmod(box.angle, 90)
    if rest == 0:
        if quarters % 2:
            return box.height / 2, box.width / 2, 1.0, 0.0
        return box.width / 2, box.height / 2, 1.0, 0.0
    theta = math.radians(box.angle)
    return box.width / 2, box.height / 2, math.cos(theta), math.sin(theta)


def _mask_box(mask, box):
    """Mask the pixels whose centres lie in ``box``; return whether any did.

    Only the pixels of the box's bounding box are tested.
    """
    half_w, half_h, cos, sin = _box_axes(box)
    extent_x = abs(cos) * half_w + abs(sin) * half_h
    extent_y = abs(sin) * half_w + abs(cos) * half_h
    size_y, size_x = mask.shape
    x0 = max(math.ceil(box.xc - extent_x), 0)
    x1 = min(math.floor(box.xc + extent_x) + 1, size_x)
    y0 = max(math.ceil(box.yc - extent_y), 0)
    y1 = min(math.floor(box.yc + extent_y) + 1, size_y)
    if x0 >= x1 or y0 >= y1:
        return False
    dx = np.arange(x0, x1, dtype=float)[np.newaxis, :] - box.xc
    dy = np.arange(y0, y1, dtype=float)[:, np.newaxis] - box.yc
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    inside = (-half_w <= u) & (u < half_w) & (-half_h <= v) & (v < half_h)
    mask[y0:y1, x0:x1] |= inside
    return bool(inside.any())


def _vector_axis(angle):
    """``'row'`` or ``'column'`` for a vector along x or y (within tolerance), else None."""
    folded = angle % 180
    if min(folded, 180 - folded) <= VECTOR_ANGLE_TOLERANCE:
        return "row"
    if abs(folded - 90) <= VECTOR_ANGLE_TOLERANCE:
        return "column"
    return None


def _mask_vector(mask, vector, path):
    """Mask the row or column through the vector's start over its cell (binning 1)."""
    col, row = math.floor(vector.x + 0.5), math.floor(vector.y + 0.5)
    cell = ota_to_cell(col, row, 1)
    if cell is None:
        logger.warning("%s:%d: vector starts at (x, y) = (%d, %d), in a gap between cells "
                       "or outside the OTA; ignored", path, vector.line, col, row)
        return
    rows, cols = cell_to_ota(cell[0], cell[1], 1)
    axis = _vector_axis(vector.angle)
    if axis == "row":
        mask[row, cols] = True
    elif axis == "column":
        mask[rows, col] = True
    else:
        logger.warning("%s:%d: vector at %.6g deg is neither a row nor a column "
                       "(tolerance %g deg); ignored", path, vector.line, vector.angle,
                       VECTOR_ANGLE_TOLERANCE)


def _bin_mask(mask, binning):
    """Binned mask: a binned pixel is bad if any unbinned pixel in it is bad."""
    if binning == 1:
        return mask
    size = mask.shape[0] // binning
    return mask.reshape(size, binning, size, binning).any(axis=(1, 3))
