"""podi_pupilghost and podi_pupilghosttemplate on synthetic images with a known ghost.

The ghost here is written out in the test (a piecewise-linear ring with a dipole,
placed by hand in focal-plane coordinates), not taken from the simulator, so that
these tests check the fits against numbers the modules are not told: the centre,
the rotation and the scale of the ghost, and the cell responses of a flat.
"""

import math

import numpy as np
import pytest

import podi_pupilghost as pg
import podi_pupilghosttemplate as pgt
from podi_definitions import OPTICAL_AXIS_OTA33, cell_to_ota

BINNING = 2
SIZE = 2048
#: A ring with a sharp inner edge, like the measured odi_r profile (radius px, fraction).
RING = np.array([(1100, 0.0), (1260, 0.004), (1300, 0.017), (1500, 0.028), (1900, 0.0335),
                 (2500, 0.025), (3100, 0.016), (3300, 0.005), (3620, 0.0)])
DIPOLE = 0.1


def ring_light(x, y, centre, dipole_angle):
    """The test ghost at focal-plane points (fraction of the background)."""
    dx, dy = x - centre[0], y - centre[1]
    profile = np.interp(np.hypot(dx, dy), RING[:, 0], RING[:, 1], left=0.0, right=0.0)
    return profile * (1 + DIPOLE * np.cos(np.arctan2(dy, dx) - math.radians(dipole_angle)))


def focal_plane(ota):
    """Focal-plane coordinates of every pixel of a binning-2 OTA, computed here from the
    optical axis's position in OTA 33 and the OTA pitch of the project's optical model."""
    pitch = (4216.0, 4330.0)
    origin_x = (ota // 10 - 3) * pitch[0] - OPTICAL_AXIS_OTA33[0]
    origin_y = (ota % 10 - 3) * pitch[1] - OPTICAL_AXIS_OTA33[1]
    index = np.arange(SIZE) * BINNING + 0.5
    return origin_x + index[None, :], origin_y + index[:, None]


def template_of(rotator, dipole_angle=0.0):
    """A template of the test ghost made at ``rotator`` (its dipole at ``dipole_angle``)."""
    half = int(math.ceil(pg.GHOST_OUTER_RADIUS / pg.TEMPLATE_STEP))
    grid = np.arange(-half, half + 1) * pg.TEMPLATE_STEP
    image = ring_light(grid[None, :], grid[:, None], (0.0, 0.0), dipole_angle).astype(np.float32)
    return pg.GhostTemplate(image, pg.TEMPLATE_STEP, (0.0, 0.0), rotator, 1290.0)


def science(centre, dipole_angle, sky=1000.0, amplitude=1.0, noise=10.0, seed=1):
    """Flat-fielded OTAs: sky x (1 + amplitude x ghost) plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    images = {}
    for ota in pg.GHOST_OTAS:
        x, y = focal_plane(ota)
        light = sky * (1 + amplitude * ring_light(x, y, centre, dipole_angle))
        images[ota] = (light + rng.normal(0, noise, light.shape)).astype(np.float32)
    return images


def ring_samples(images, centre, width=40):
    """Every other pixel (each axis) of the images within 900-3800 px of ``centre``:
    values, their ring numbers (rings ``width`` px wide) and their angles (radians)."""
    values, rings, angles = [], [], []
    for ota, image in images.items():
        x, y = (coordinate[::2, ::2] for coordinate in np.broadcast_arrays(*focal_plane(ota)))
        radius = np.hypot(x - centre[0], y - centre[1])
        keep = (radius > 900) & (radius < 3800)
        values.append(image[::2, ::2][keep])
        rings.append((radius[keep] // width).astype(int))
        angles.append(np.arctan2(y - centre[1], x - centre[0])[keep])
    return np.concatenate(values), np.concatenate(rings), np.concatenate(angles)


def ring_medians(values, rings):
    return np.array([np.median(values[rings == k]) for k in np.unique(rings) if (rings == k).sum() > 50])


def radial_residual(images, centre, sky):
    """Median of (image - sky) in 40 px rings around ``centre``, between 900 and 3800 px."""
    values, rings, _ = ring_samples(images, centre)
    return ring_medians(values - sky, rings)


def worst_sector(images, centre, sky):
    """Largest ring residual over eight 45-degree sectors: where a wrongly turned
    template leaves its dipole (most at 90 degrees from the dipole's direction); 80 px
    rings keep the noise of a sector's ring well below the 3 % the tests allow."""
    values, rings, angles = ring_samples(images, centre, width=80)
    worst = 0.0
    for sector in np.radians(np.arange(0, 360, 45)):
        inside = np.cos(angles - sector) > math.cos(math.radians(22.5))
        worst = max(worst, np.abs(ring_medians(values[inside] - sky, rings[inside])).max())
    return worst


def fit_frame(images, template, rotator):
    profiles = [pg.polar_profiles(image, ota, BINNING, template.centre) for ota, image in images.items()]
    return pg.fit_ghost(profiles, {ota: template for ota in images}, rotator - template.rotator)


@pytest.mark.parametrize("rotator", [0.0, 15.0, -30.0])
def test_centre_scale_and_rotation_are_recovered(rotator):
    centre, sky = (25.0 + rotator, -37.0), 1000.0
    images = science(centre, 40.0 + rotator, sky)
    template = template_of(0.0, 40.0)
    fit = fit_frame(images, template, rotator)
    assert fit.found and fit.ok
    assert math.hypot(fit.centre[0] - centre[0], fit.centre[1] - centre[1]) < 2.0
    assert fit.scale == pytest.approx(sky, rel=0.01)
    for ota, image in images.items():
        pg.subtract_ghost(image, template, ota, BINNING, fit.centre, fit.angle, fit.scale)
    peak = sky * RING[:, 1].max()
    assert np.abs(radial_residual(images, centre, sky)).max() < 0.02 * peak
    assert worst_sector(images, centre, sky) < 0.03 * peak


def test_template_turned_the_wrong_way_leaves_the_dipole():
    """The sector check above can fail: with the rotation ignored, the dipole is left."""
    rotator, centre, sky = -30.0, (10.0, 5.0), 1000.0
    images = science(centre, 40.0 + rotator, sky)
    template = template_of(0.0, 40.0)
    fit = fit_frame(images, template, 0.0)
    for ota, image in images.items():
        pg.subtract_ghost(image, template, ota, BINNING, fit.centre, fit.angle, fit.scale)
    assert worst_sector(images, centre, sky) > 0.03 * sky * 0.0335


def test_no_ghost_gives_a_scale_consistent_with_zero():
    images = science((0.0, 0.0), 0.0, amplitude=0.0)
    fit = fit_frame(images, template_of(0.0), 0.0)
    assert not fit.ok and not fit.found
    assert abs(fit.scale) < 3 * fit.error
    assert fit.centre == (0.0, 0.0)


def test_centre_not_found_falls_back_to_the_nominal_centre(monkeypatch):
    monkeypatch.setattr(pg, "MIN_WEDGES", 10_000)
    images = science((6.0, -4.0), 40.0)
    fit = fit_frame(images, template_of(0.0, 40.0), 0.0)
    assert not fit.found and fit.ok
    assert fit.centre == (0.0, 0.0)
    assert fit.scale == pytest.approx(1000.0, rel=0.05)


def test_template_file_round_trip_and_sampling(tmp_path):
    template = template_of(5.0, 40.0)
    path = tmp_path / "pg.fits"
    pg.write_template(path, template, primary_cards={"FILTER": "odi_r"})
    read = pg.read_template(path, 34)
    assert read.rotator == 5.0 and read.step == pg.TEMPLATE_STEP and read.radius == 1290.0
    np.testing.assert_array_equal(read.image, template.image)
    # Turned by 90 degrees, the dipole's bright side moves from 40 to 130 degrees.
    bright = read.sample(np.array([1900 * math.cos(math.radians(130))]),
                         np.array([1900 * math.sin(math.radians(130))]), (0.0, 0.0), 90.0)
    assert bright[0] == pytest.approx(0.0335 * (1 + DIPOLE), rel=0.01)
    with pytest.raises(pg.CalibrationError, match="no pupil-ghost template for OTA 22"):
        pg.read_template(path, 22)


def test_outside_the_ghost_nothing_changes():
    image = np.full((SIZE, SIZE), 100.0, np.float32)
    assert pg.subtract_ghost(image, template_of(0.0), 22, BINNING, (0.0, 0.0), 0.0, 100.0) is None
    image33 = np.full((SIZE, SIZE), 100.0, np.float32)
    pg.subtract_ghost(image33, template_of(0.0), 33, BINNING, (0.0, 0.0), 0.0, 100.0)
    x, y = focal_plane(33)
    radius = np.hypot(x, y)
    assert np.all(image33[(radius > 3660) | (radius < 1070)] == 100.0)


def cell_response(seed):
    """Flat-field response of the four OTAs: 2 % cell factors, a vignetting, 1 % pixel noise."""
    rng = np.random.default_rng(seed)
    flats = {}
    for ota in pg.GHOST_OTAS:
        x, y = focal_plane(ota)
        flat = (1 - 0.08 * (x**2 + y**2) / 20000.0**2).astype(np.float32)
        for cy in range(8):
            for cx in range(8):
                flat[cell_to_ota(cx, cy, BINNING)] *= np.float32(1 + 0.02 * rng.standard_normal())
        flat *= (1 + 0.01 * rng.standard_normal(flat.shape)).astype(np.float32)
        flats[ota] = flat
    return flats


@pytest.fixture(scope="module")
def flat_with_ghost():
    rotator, centre = 10.0, (24.0, -36.0)
    response = cell_response(3)
    flats = {}
    for ota, flat in response.items():
        x, y = focal_plane(ota)
        flats[ota] = (flat * (1 + ring_light(x, y, centre, 40.0 + rotator))).astype(np.float32)
    return rotator, centre, response, flats


def ghost_left_in_flat(flats, response, centre):
    """Radial profile of flat / true response - 1 (normalised outside the ghost)."""
    ratio = {ota: flats[ota] / response[ota] for ota in flats}
    level = np.median(np.concatenate([
        r[(np.hypot(*focal_plane(ota)) > 3900)] for ota, r in ratio.items()]))
    return radial_residual({ota: r / level for ota, r in ratio.items()}, centre, 1.0)


def test_free_fit_removes_the_ghost_from_a_flat(flat_with_ghost):
    rotator, centre, response, flats = flat_with_ghost
    flats = {ota: image.copy() for ota, image in flats.items()}
    ghost = pgt.fit_flat_ghost(flats, BINNING, rotator)
    assert ghost.found and ghost.scale == 1.0
    assert math.hypot(ghost.centre[0] - centre[0], ghost.centre[1] - centre[1]) < 2.0
    assert ghost.template.radius == pytest.approx(1290, abs=30)
    keywords = pgt.remove_flat_ghost(flats, ghost, BINNING)
    assert keywords[33]["PGAFCTD"][0] is True
    assert np.abs(ghost_left_in_flat(flats, response, centre)).max() < 0.05 * 0.0335


def test_given_template_is_scaled_into_a_flat(flat_with_ghost):
    rotator, centre, response, flats = flat_with_ghost
    flats = {ota: image.copy() for ota, image in flats.items()}
    ghost = pgt.fit_flat_ghost(flats, BINNING, rotator, template=template_of(0.0, 40.0))
    assert ghost.scale == pytest.approx(1.0, rel=0.03)
    assert ghost.angle == rotator
    assert math.hypot(ghost.centre[0] - centre[0], ghost.centre[1] - centre[1]) < 2.0
    pgt.remove_flat_ghost(flats, ghost, BINNING)
    assert np.abs(ghost_left_in_flat(flats, response, centre)).max() < 0.05 * 0.0335
