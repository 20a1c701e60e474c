"""The instrument model: geometry, layouts, header decoding."""

import numpy as np
import pytest
from astropy.io import fits

from podi_definitions import (N_CELLS, ODI_5X6, PODI, all_cells, binning_from_header,
                              cell_geometry, cell_is_science, cell_to_ota, filter_level,
                              focal_plane_to_ota, fppos_for_ota, layout_for_mjd,
                              normalised_filter_name, ota_from_fppos, ota_origin_in_focal_plane,
                              ota_to_cell, overscan_section, science_section, working_otas)


@pytest.mark.parametrize("binning", [1, 2])
def test_cells_tile_the_ota_without_overlap(binning):
    size = cell_geometry(binning).ota_size
    owner = np.zeros((size, size), int)
    for cx, cy in all_cells():
        owner[cell_to_ota(cx, cy, binning)] += 1
    assert owner.max() == 1
    rows, cols = science_section(binning)
    assert owner.sum() == 64 * (rows.stop * cols.stop)
    # Cell (0, 7) is the bottom-left one: cy counts top-down.
    assert cell_to_ota(0, 7, binning)[0].start == 0
    assert cell_to_ota(0, 0, binning)[0].start > size // 2


@pytest.mark.parametrize("binning", [1, 2])
def test_cell_to_ota_round_trip(binning):
    rng = np.random.default_rng(binning)
    rows, cols = science_section(binning)
    for cx, cy in all_cells():
        ys, xs = cell_to_ota(cx, cy, binning)
        for row, col in zip(rng.integers(0, rows.stop, 20), rng.integers(0, cols.stop, 20)):
            assert ota_to_cell(xs.start + col, ys.start + row, binning) == (cx, cy, col, row)


@pytest.mark.parametrize("layout", [PODI, ODI_5X6])
@pytest.mark.parametrize("binning", [1, 2])
def test_focal_plane_round_trip(layout, binning):
    """cell -> OTA array -> focal plane -> OTA array -> cell, for every OTA and cell."""
    for ota in layout.otas:
        x0, y0 = ota_origin_in_focal_plane(ota, binning)
        for cx, cy in all_cells():
            ys, xs = cell_to_ota(cx, cy, binning)
            found = focal_plane_to_ota(x0 + xs.start + 7, y0 + ys.start + 3, layout, binning)
            assert found == (ota, xs.start + 7, ys.start + 3)
            assert ota_to_cell(found[1], found[2], binning) == (cx, cy, 7, 3)
    # The optical axis lies in the gap between OTAs 33, 34, 43 and 44.
    assert focal_plane_to_ota(0.0, 0.0, layout, binning) is None


def test_geometry_numbers_of_the_original():
    assert cell_to_ota(3, 2, 1) == (slice(505 * 5, 505 * 5 + 494), slice(508 * 3, 508 * 3 + 480))
    assert cell_to_ota(1, 0, 2)[0].start == 1768          # ceil(252.5 * 7)
    assert overscan_section(1) == (slice(0, 494), slice(500, 550))
    assert overscan_section(2)[1] == slice(260, 277)
    assert ota_to_cell(490, 10, 1) is None                # in the gap between cells 0 and 1
    assert ota_to_cell(5000, 10, 1) is None


@pytest.mark.parametrize("layout,count", [(PODI, 13), (ODI_5X6, 30)])
def test_layouts(layout, count):
    assert len(layout.otas) == count
    assert sorted(layout.output_order) == sorted(layout.otas)
    assert layout.output_order[0] == 33
    assert set(layout.central_3x3) <= set(layout.otas)
    assert len(set(layout.serials.values())) == count


def test_layout_by_date():
    assert layout_for_mjd(56600) is PODI
    assert layout_for_mjd(57100) is ODI_5X6
    assert 21 in working_otas(ODI_5X6, 58000) and 21 not in working_otas(ODI_5X6, 58600)
    assert PODI.output_order == (33, 34, 44, 43, 42, 32, 22, 23, 24, 55, 61, 16, 0)


def test_cellmode_and_fppos():
    mode = "S" * 64
    mode = mode[:3 + 8 * 5] + "V" + mode[3 + 8 * 5 + 1:]
    assert not cell_is_science(mode, 3, 5)
    assert cell_is_science(mode, 5, 3)
    assert ota_from_fppos("xy33") == 33 and ota_from_fppos("XY00") == 0
    assert fppos_for_ota(0) == "xy00"
    with pytest.raises(ValueError, match="FPPOS"):
        ota_from_fppos("33")


def test_header_decoding():
    header = fits.Header({"FILTERID": "w105", "FILTER": "odi_r", "FLTARM2B": "IN"})
    assert normalised_filter_name(header) == "odi_r"
    assert normalised_filter_name(fits.Header({"FILTER": "Ha-wide"})) == "Ha-wide"
    assert normalised_filter_name(fits.Header()) == "unknown"
    assert filter_level(header) == 2
    assert filter_level(fits.Header({"FLTARM1A": "IN", "FLTARM3C": "IN"})) == -1
    assert binning_from_header(fits.Header({"CCDSUM": "2 2"})) == 2
    assert binning_from_header(fits.Header()) == 1
    with pytest.raises(ValueError, match="binning"):
        cell_geometry(4)
    assert N_CELLS == 8
