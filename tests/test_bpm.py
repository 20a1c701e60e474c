"""Bad-pixel masks from ds9 region files (podi_bpm)."""

import logging
import math
import re
import warnings

import numpy as np
import pytest

from podi_bpm import (_parse_regions, apply_bpm, bpm_filename, read_bpm_mask,
                      write_bpm_regions)
from podi_definitions import cell_to_ota, ota_to_cell

HEADER = (
    "# Region file format: DS9 version 4.1\n"
    'global color=green dashlist=8 3 width=1 font="helvetica 10 normal roman" select=1 '
    "highlite=1 dash=0 fixed=0 edit=1 move=1 delete=1 include=1 source=1\n"
    "image\n"
)  # three lines: the first region of a synthetic file is on line 4


@pytest.fixture
def region_file(tmp_path):
    """Write a region file made of HEADER and the given lines; return its path."""
    def write(*lines, name="bpm_xy33.reg"):
        path = tmp_path / name
        path.write_text(HEADER + "".join(line + "\n" for line in lines))
        return path
    return write


@pytest.fixture(scope="module")
def bpm_dir(mastercals):
    return mastercals / "bpm"


def only(mask, rows, cols):
    """Mask of the same shape, True exactly at ``[rows, cols]``."""
    expected = np.zeros_like(mask)
    expected[rows, cols] = True
    return expected


def vector_starts(path):
    """0-based start pixels and angles of all vectors in a real file, parsed here."""
    starts = []
    for match in re.finditer(r"vector\(([^)]*)\)", path.read_text()):
        x, y, _, angle = (float(v) for v in match.group(1).split(","))
        starts.append((math.floor(x - 1 + 0.5), math.floor(y - 1 + 0.5), angle))
    return starts


def without_vectors(path, tmp_path):
    """Copy of a real file without its vector lines, in tmp_path."""
    copy = tmp_path / path.name
    copy.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if "vector(" not in line))
    return copy


# --- real files --------------------------------------------------------------------

@pytest.mark.parametrize("layout, count", [("podi", 13), ("odi_5x6", 30)])
def test_every_real_file_loads(bpm_dir, layout, count):
    files = sorted((bpm_dir / layout).glob("bpm_xy*.reg"))
    assert len(files) == count
    for path in files:
        mask = read_bpm_mask(path)
        assert mask.shape == (4096, 4096) and mask.dtype == bool
        fraction = mask.mean()
        if path.name == "bpm_xy41.reg" and layout == "odi_5x6":
            assert fraction == 0  # header only
        else:
            assert 1e-4 < fraction < 0.3, path


@pytest.mark.parametrize("layout", ["podi", "odi_5x6"])
def test_boxes_agree_with_regions_package(bpm_dir, layout):
    regions = pytest.importorskip("regions")
    for path in sorted((bpm_dir / layout).glob("bpm_xy*.reg")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # regions warns about the vector it skips
            theirs = regions.Regions.read(str(path), format="ds9")
        ours, _ = _parse_regions(path)
        assert len(ours) == len(theirs), path
        for box, region in zip(ours, theirs):
            assert (box.xc, box.yc) == pytest.approx((region.center.x, region.center.y),
                                                     abs=1e-9)
            assert (box.width, box.height, box.angle) == pytest.approx(
                (region.width, region.height, region.angle.value), abs=1e-9)


def test_podi_xy33_strips_on_cell_gaps(bpm_dir):
    mask = read_bpm_mask(bpm_dir / "podi" / "bpm_xy33.reg")
    row = 250  # middle of the bottom cell row, clear of the horizontal strips
    # Strips centred on the vertical gaps between cells, all rows of a cell row.
    for x in (494, 1001, 1511, 2018, 2526, 3033, 3542):
        assert mask[row, x] and mask[2267, x] and mask[3780, x], x
    # box(1511.689,...,36.972737,...): 0-based edges 1492.20 and 1529.18
    assert not mask[row, 1492] and mask[row, 1493] and mask[row, 1529]
    assert not mask[row, 1530]
    # Full-width strips on the horizontal gaps (0-based y ~ 498.8, 1003.6, ...).
    for y in (499, 1004, 1508, 2013, 2518, 3024, 3530):
        assert mask[y, 250] and mask[y, 2267], y
    rows, cols = cell_to_ota(3, 3, 1)
    centre = ((rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2)
    assert not mask[centre]
    # ~358 masked columns (7 strips of ~37 px, edges of 9 and 90 px) and ~270 masked
    # rows (7 x ~25, edges of 9 and 54 px, the top 47 rows free): about
    # 1 - (1 - 358/4096) (1 - 270/4096) = 0.147 of the array.
    assert 0.12 < mask.mean() < 0.15
    assert np.count_nonzero(mask) == 2284921


def test_podi_xy00_boxes_off_the_array_warn_once(bpm_dir, caplog):
    path = bpm_dir / "podi" / "bpm_xy00.reg"
    with caplog.at_level(logging.WARNING, logger="podi_bpm"):
        mask = read_bpm_mask(path)
    # Lines 5-40 hold boxes drawn around (16000, 15000), far off the OTA.
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert str(path) in message and "36 box(es)" in message and "lines 5, 6," in message
    assert mask[250, 1510]


def test_odi_xy11_each_commented_vector_masks_its_cell_column(bpm_dir, tmp_path):
    path = bpm_dir / "odi_5x6" / "bpm_xy11.reg"
    starts = vector_starts(path)
    assert len(starts) == 15
    segments = set()
    for col, row, angle in starts:
        assert abs(angle % 180 - 90) <= 3  # all are columns
        cx, cy, *_ = ota_to_cell(col, row, 1)
        rows, _ = cell_to_ota(cx, cy, 1)
        segments.add((col, rows.start, rows.stop))
    assert len(segments) == 15  # column 1022 is bad in two cells
    expected = np.zeros((4096, 4096), dtype=bool)
    for col, start, stop in segments:
        expected[start:stop, col] = True
    assert np.count_nonzero(expected) == 15 * 494
    mask = read_bpm_mask(path)
    boxes = read_bpm_mask(without_vectors(path, tmp_path))
    assert np.array_equal(mask & ~boxes, expected & ~boxes)
    assert np.array_equal(mask, boxes | expected)


def test_odi_xy36_uncommented_vector(bpm_dir, tmp_path):
    path = bpm_dir / "odi_5x6" / "bpm_xy36.reg"
    mask = read_bpm_mask(path)
    boxes = read_bpm_mask(without_vectors(path, tmp_path))
    # vector(3888.8824,226.24,110.5504,89.891691): 0-based x 3887.88 is column 3888,
    # in cell (7, 7).
    assert cell_to_ota(7, 7, 1) == (slice(0, 494), slice(3556, 4036))
    assert np.array_equal(mask & ~boxes, only(mask, slice(0, 494), 3888) & ~boxes)
    assert np.count_nonzero(mask & ~boxes) == 494


def test_header_only_file_gives_empty_mask(bpm_dir, region_file):
    assert not read_bpm_mask(bpm_dir / "odi_5x6" / "bpm_xy41.reg").any()
    assert not read_bpm_mask(region_file(), binning=2).any()


# --- boxes -------------------------------------------------------------------------

def test_box_one_based_to_pixel_centres(region_file):
    mask = read_bpm_mask(region_file("box(11,21,3,5,0)"))
    # 0-based centre (10, 20): x in [8.5, 11.5), y in [17.5, 22.5).
    assert np.array_equal(mask, only(mask, slice(18, 23), slice(9, 12)))


def test_box_with_trailing_properties(region_file):
    mask = read_bpm_mask(region_file('box(11,21,3,5,0) # font="helvetica 10 normal roman"'))
    assert np.count_nonzero(mask) == 15


def test_box_rotated_45_degrees_is_a_diamond(region_file):
    side = 4.5 * math.sqrt(2)
    mask = read_bpm_mask(region_file(f"box(51,61,{side!r},{side!r},45)"))
    # A square of diagonal 9 turned by 45 deg holds the centres |dx| + |dy| <= 4.5.
    expected = np.zeros_like(mask)
    y, x = np.mgrid[50:71, 40:61]
    expected[50:71, 40:61] = np.abs(x - 50) + np.abs(y - 60) <= 4
    assert np.count_nonzero(expected) == 41
    assert np.array_equal(mask, expected)


def test_box_rotated_90_degrees_swaps_width_and_height(region_file):
    turned = read_bpm_mask(region_file("box(101,201,10,2,90)"))
    assert np.array_equal(turned, only(turned, slice(195, 205), slice(99, 101)))


def test_box_partly_outside_is_clipped(region_file):
    mask = read_bpm_mask(region_file("box(1,4096,10,10,0)"))
    # 0-based centre (0, 4095): x in [-5, 5), y in [4090, 4100).
    assert np.array_equal(mask, only(mask, slice(4090, 4096), slice(0, 5)))


# --- vectors -----------------------------------------------------------------------

def test_vertical_vector_masks_cell_column(region_file):
    rows, cols = cell_to_ota(2, 3, 1)
    x, y = cols.start + 100, rows.start + 50
    for angle in (90, 270, 268.5):
        mask = read_bpm_mask(region_file(f"# vector({x + 1},{y + 1},40,{angle}) vector=1"))
        assert np.array_equal(mask, only(mask, rows, x)), angle
    assert (rows, cols) == (slice(2020, 2514), slice(1016, 1496))


def test_horizontal_vector_masks_cell_row(region_file):
    rows, cols = cell_to_ota(2, 3, 1)
    x, y = cols.start + 300, rows.start + 7
    for angle in (0, 180, 2.9, 359):
        mask = read_bpm_mask(region_file(f"vector({x + 1},{y + 1},25,{angle}) vector=1"))
        assert np.array_equal(mask, only(mask, y, cols)), angle


def test_vector_at_odd_angle_warns(region_file, caplog):
    path = region_file("# vector(1200,2100,40,45) vector=1")
    with caplog.at_level(logging.WARNING, logger="podi_bpm"):
        mask = read_bpm_mask(path)
    assert not mask.any()
    assert f"{path}:4" in caplog.text and "45 deg" in caplog.text


def test_vector_in_cell_gap_warns(region_file, caplog):
    # 0-based x = 490 lies between cell 0 (x < 480) and cell 1 (x >= 508).
    path = region_file("# vector(491,201,40,90) vector=1")
    with caplog.at_level(logging.WARNING, logger="podi_bpm"):
        mask = read_bpm_mask(path)
    assert not mask.any()
    assert f"{path}:4" in caplog.text and "gap" in caplog.text


# --- other lines -------------------------------------------------------------------

def test_other_shapes_warn_and_are_ignored(region_file, caplog):
    path = region_file("circle(100,100,5)", "-box(11,21,3,5,0)", "# text(5,5) text={hi}")
    with caplog.at_level(logging.WARNING, logger="podi_bpm"):
        mask = read_bpm_mask(path)
    assert not mask.any()
    assert f"{path}:4: circle" in caplog.text
    assert f"{path}:5: exclude region box" in caplog.text
    assert len(caplog.records) == 2


def test_binary_garbage_raises_value_error(tmp_path):
    path = tmp_path / "bpm_xy99.reg"
    noise = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)
    path.write_bytes(noise.tobytes())
    with pytest.raises(ValueError, match="bpm_xy99.reg"):
        read_bpm_mask(path)


@pytest.mark.parametrize("line, reason", [
    ("hello world", "not a ds9 region line"),
    ("fk5", "coordinate system 'fk5'"),
    ("box(11,21,3a,5,0)", "not finite numbers"),
    ("box(11,nan,3,5,0)", "not finite numbers"),
])
def test_unparseable_line_names_file_and_line(region_file, line, reason):
    path = region_file("box(11,21,3,5,0)", line)
    pattern = re.escape(f"{path}:5: ") + ".*" + re.escape(reason)
    with pytest.raises(ValueError, match=pattern):
        read_bpm_mask(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_bpm_mask(tmp_path / "bpm_xy33.reg")


# --- binning, apply, write ---------------------------------------------------------

def test_binning_2_halves_coordinates(region_file):
    path = region_file("box(101,201,10,20,0)")
    # Unbinned columns 95..104 and rows 190..209 lie in binned 47..52 and 95..104.
    unbinned = read_bpm_mask(path)
    assert np.array_equal(unbinned, only(unbinned, slice(190, 210), slice(95, 105)))
    binned = read_bpm_mask(path, binning=2)
    assert binned.shape == (2048, 2048)
    assert np.array_equal(binned, only(binned, slice(95, 105), slice(47, 53)))


def test_binning_2_real_file(bpm_dir):
    mask = read_bpm_mask(bpm_dir / "podi" / "bpm_xy33.reg", binning=2)
    assert mask.shape == (2048, 2048)
    # Unbinned strip columns 1493..1529 -> binned 746..764.
    assert not mask[125, 745] and mask[125, 746] and mask[125, 764] and not mask[125, 765]


def test_binning_2_vector(region_file):
    rows, cols = cell_to_ota(2, 3, 1)
    x, y = cols.start + 101, rows.start + 50
    mask = read_bpm_mask(region_file(f"# vector({x + 1},{y + 1},40,90) vector=1"), 2)
    assert np.array_equal(mask, only(mask, slice(rows.start // 2, (rows.stop + 1) // 2),
                                     x // 2))


def test_apply_bpm(region_file):
    path = region_file("box(101,201,10,20,0)")
    data = np.ones((2048, 2048), dtype=np.float32)
    assert apply_bpm(data, path, binning=2) == 60
    assert np.isnan(data[95:105, 47:53]).all()
    assert np.count_nonzero(np.isnan(data)) == 60
    assert apply_bpm(data, path, binning=2, fill=-1) == 60
    assert (data[95:105, 47:53] == -1).all()
    with pytest.raises(ValueError, match="do not match"):
        apply_bpm(np.ones((4096, 4096), dtype=np.float32), path, binning=2)


def test_bpm_filename(tmp_path):
    assert bpm_filename(tmp_path, 33) == tmp_path / "bpm_xy33.reg"
    assert bpm_filename(str(tmp_path), 0).name == "bpm_xy00.reg"


def test_write_format(tmp_path):
    path = tmp_path / "bpm_xy33.reg"
    write_bpm_regions(path, boxes=[(10, 20, 3, 5)], vectors=[(1519.5, 2069, 40, 90)])
    lines = path.read_text().splitlines()
    assert lines[0] == "# Region file format: DS9 version 4.1"
    assert lines[1].startswith("global ") and lines[2] == "image"
    assert lines[3:] == ["box(11,21,3,5,0)", "# vector(1520.5,2070,40,90) vector=1"]


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    expected = np.zeros((4096, 4096), dtype=bool)
    boxes = []
    for _ in range(40):
        x0, y0 = rng.integers(-20, 4096, 2)
        x1, y1 = x0 + rng.integers(0, 120), y0 + rng.integers(0, 120)
        boxes.append(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0 + 1, y1 - y0 + 1))
        expected[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    vectors = []
    for cx, cy, angle in ((0, 0, 90), (5, 2, 270), (7, 7, 0), (3, 6, 180)):
        rows, cols = cell_to_ota(cx, cy, 1)
        x, y = cols.start + 17, rows.start + 33
        vectors.append((x + 0.3, y - 0.2, 55.5, angle))
        if angle % 180:
            expected[rows, x] = True
        else:
            expected[y, cols] = True
    path = tmp_path / "bpm_xy55.reg"
    write_bpm_regions(path, boxes=boxes, vectors=vectors)
    assert np.array_equal(read_bpm_mask(path), expected)
