"""Quick-look measurements of an OTA (podi_preview) against images with known content.

The expected cell positions are written out here from the camera's cell pitch
(binning 2: 254 x 252.5 px, cell row 0 at the top of the OTA), not taken from
podi_definitions, so that a wrong cell placement there cannot pass.
"""

import math

import numpy as np

from podi_definitions import PODI
from podi_preview import focal_plane_mosaic, ota_quicklook, preview_block

SIZE = 2048  # binning 2


def test_preview_block_makes_about_1000_pixels_across():
    # pODI spans OTA columns 0..6: 7 x 4216 unbinned px.
    assert preview_block(PODI.otas, 1) == 32
    assert preview_block(PODI.otas, 2) == 16
    assert round(7 * 4216 / 32) == 922


def test_block_means_saturation_and_undefined_blocks():
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    image = x.copy()
    image[500:506, 1000:1006] = 70000.0  # a saturated star, inside block (31, 62)
    image[:, 160:176] = np.nan  # a bad column block: preview column 10
    look = ota_quicklook(image, 2, 16, saturation=65000.0)
    assert look.preview.shape == (128, 128) and look.preview.dtype == np.float32
    # Samples every 2 px inside each 16-px block: x = 16 j + 0, 2, ..., 14 -> mean 16 j + 7.
    expected = 16 * np.arange(128) + 7.0
    good = np.ones(128, bool)
    good[10] = False
    star_row = 500 // 16
    rows = [r for r in range(128) if r != star_row]
    assert np.allclose(look.preview[np.ix_(rows, np.flatnonzero(good))], expected[good])
    assert np.isnan(look.preview[:, 10]).all()
    assert np.argwhere(look.saturated).tolist() == [[star_row, 1000 // 16]]


def test_cell_sky_levels_in_their_places():
    image = np.full((SIZE, SIZE), 100.0, np.float32)
    image += np.random.default_rng(1).normal(0, 5, image.shape).astype(np.float32)
    # Cell (cx=0, cy=7): x from 0, y from 0 (the bottom left of the array).
    image[0:247, 0:240] += 50.0
    # Cell (cx=7, cy=0): x from ceil(254 * 7) = 1778, y from ceil(252.5 * 7) = 1768.
    image[1768:2015, 1778:2018] -= 20.0
    # Cell (cx=3, cy=5): x from 762, y from ceil(252.5 * 2) = 505; undefined.
    image[505:752, 762:1002] = np.nan
    look = ota_quicklook(image, 2, 16, saturation=65000.0)
    expected = np.full((8, 8), 100.0)
    expected[0, 0], expected[7, 7], expected[2, 3] = 150.0, 80.0, np.nan
    assert np.allclose(look.cell_sky, expected, atol=0.5, equal_nan=True)


def test_mosaic_places_each_ota_with_the_gaps():
    looks = {}
    for value, ota in enumerate((33, 34, 43)):
        image = np.full((SIZE, SIZE), float(value), np.float32)
        looks[ota] = ota_quicklook(image, 2, 16, saturation=65000.0)
    mosaic = focal_plane_mosaic(looks, (33, 34, 43, 44), 2, 16)
    size = 128
    x33, y33, _ = mosaic.boxes[33]
    # Neighbouring OTAs are 4216 x 4330 unbinned px apart: 131.75 and 135.3 preview px.
    assert mosaic.boxes[43][:2] == (x33 + round(4216 / 32), y33)
    assert mosaic.boxes[34][:2] == (x33, y33 + round(4330 / 32))
    assert mosaic.image.shape == (y33 + round(4330 / 32) + size, x33 + round(4216 / 32) + size)
    for value, ota in enumerate((33, 34, 43)):
        x0, y0, _ = mosaic.boxes[ota]
        assert (mosaic.image[y0:y0 + size, x0:x0 + size] == value).all()
    # The gap between OTAs and OTA 44, which was not reduced, hold no data.
    assert np.isnan(mosaic.image[:, x33 + size:x33 + round(4216 / 32)]).all()
    x44, y44, _ = mosaic.boxes[44]
    assert np.isnan(mosaic.image[y44:y44 + size, x44:x44 + size]).all()
    assert not mosaic.saturated.any()
    assert math.isclose(4216 / 32 - size, 3.75)
