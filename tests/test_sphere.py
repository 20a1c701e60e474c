"""Tests of podi_sphere: unit vectors, distances, tangent plane, circles and matching,
with known answers at the poles and across RA 0/360."""

import math

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.spatial import cKDTree

import podi_sphere as sphere

ONE_DEG_ON_PLANE = math.degrees(math.tan(math.radians(1.0)))  # xi or eta of a point 1 deg away


# --- Directions and distances ----------------------------------------------------------------

def test_unit_vectors():
    vectors = sphere.unit_vectors([0.0, 90.0, 17.0, 180.0], [0.0, 0.0, 90.0, -45.0])
    half = math.sqrt(0.5)
    expected = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [-half, 0, -half]]
    np.testing.assert_allclose(vectors.T, expected, atol=1e-15)


def test_angular_distance_at_the_pole():
    # Every point at Dec 89 is 1 deg from the pole, whatever the RA of either.
    np.testing.assert_allclose(
        sphere.angular_distance([0.0, 90.0, 180.0, 270.0], 89.0, 123.0, 90.0), 1.0, atol=1e-12)
    assert sphere.angular_distance(10.0, -90.0, 200.0, -90.0) == pytest.approx(0.0, abs=1e-12)
    # Across the pole: RA 0 and RA 180 at Dec 89 are 2 deg apart.
    assert sphere.angular_distance(0.0, 89.0, 180.0, 89.0) == pytest.approx(2.0, abs=1e-12)


def test_angular_distance_across_ra_zero():
    assert sphere.angular_distance(359.5, 0.0, 0.5, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert sphere.angular_distance(0.5, 0.0, 359.5, 0.0) == pytest.approx(1.0, abs=1e-12)
    # At Dec 60 a 0.2 deg RA step is a chord of 2 asin(cos 60 sin 0.1 deg).
    expected = 2 * math.degrees(math.asin(0.5 * math.sin(math.radians(0.1))))
    assert sphere.angular_distance(359.9, 60.0, 0.1, 60.0) == pytest.approx(expected, rel=1e-12)


def test_angular_distance_tiny_and_antipodal():
    one_mas = 1e-3 / 3600
    assert sphere.angular_distance(150.0, 30.0 + one_mas, 150.0, 30.0) == pytest.approx(
        one_mas, rel=1e-9)
    assert sphere.angular_distance(0.0, 0.0, 180.0, 0.0) == pytest.approx(180.0, abs=1e-12)
    assert sphere.angular_distance(190.0, -30.0, 10.0, 30.0) == pytest.approx(180.0, abs=1e-12)


def test_wrap_180():
    np.testing.assert_array_equal(sphere.wrap_180(np.array([0.0, 180.0, -180.0, 359.0, -359.0,
                                                            540.0])),
                                  [0.0, 180.0, 180.0, -1.0, 1.0, 180.0])


def test_mean_direction_across_ra_zero_and_at_the_pole():
    ra, dec = sphere.mean_direction([359.0, 1.0], [0.0, 0.0])
    assert (sphere.wrap_180(ra), dec) == (pytest.approx(0.0, abs=1e-12),
                                          pytest.approx(0.0, abs=1e-12))
    # Symmetric about RA 0 at Dec 10: RA 0, and the Dec of the mean vector.
    ra, dec = sphere.mean_direction([350.0, 10.0], [10.0, 10.0])
    d = math.radians(10.0)
    assert sphere.wrap_180(ra) == pytest.approx(0.0, abs=1e-12)
    assert dec == pytest.approx(math.degrees(math.atan2(math.sin(d), math.cos(d) ** 2)), abs=1e-12)
    _, dec = sphere.mean_direction([0.0, 90.0, 180.0, 270.0], [80.0] * 4)
    assert dec == pytest.approx(90.0, abs=1e-12)


# --- Tangent plane ------------------------------------------------------------------------------

def test_project_known_answers():
    assert sphere.project(150.0, 30.0, 150.0, 30.0) == (0.0, 0.0)
    xi, eta = sphere.project(150.0, 31.0, 150.0, 30.0)
    assert (xi, eta) == (pytest.approx(0.0, abs=1e-15), pytest.approx(ONE_DEG_ON_PLANE, rel=1e-12))
    # Across RA 0: 1 deg west of the tangent point.
    xi, eta = sphere.project(359.5, 0.0, 0.5, 0.0)
    assert (xi, eta) == (pytest.approx(-ONE_DEG_ON_PLANE, rel=1e-12), pytest.approx(0.0, abs=1e-15))
    # About the north pole: RA 90 lies along +xi, RA 0 along -eta.
    xi, eta = sphere.project([90.0, 0.0], [89.0, 89.0], 0.0, 90.0)
    np.testing.assert_allclose(xi, [ONE_DEG_ON_PLANE, 0.0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(eta, [0.0, -ONE_DEG_ON_PLANE], rtol=1e-12, atol=1e-13)
    # More than 90 deg away there is no projection.
    assert np.all(np.isnan(sphere.project(120.0, 0.0, 0.0, 0.0)))


@pytest.mark.parametrize("ra0, dec0", [(150.0, 30.0), (0.1, -89.0), (359.95, 75.0)])
def test_projection_round_trip_matches_astropy(ra0, dec0):
    rng = np.random.default_rng(5)
    xi, eta = rng.uniform(-0.8, 0.8, (2, 200))
    ra, dec = sphere.deproject(xi, eta, ra0, dec0)
    header = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": ra0, "CRVAL2": dec0,
              "CRPIX1": 1.0, "CRPIX2": 1.0, "CD1_1": 1.0, "CD2_2": 1.0, "CD1_2": 0.0, "CD2_1": 0.0}
    ra_astropy, dec_astropy = WCS(header).wcs_pix2world(xi, eta, 0)
    np.testing.assert_allclose(np.mod(ra - ra_astropy + 180, 360) - 180, 0, atol=1e-10)
    np.testing.assert_allclose(dec, dec_astropy, atol=1e-10)
    assert np.all((ra >= 0) & (ra < 360))
    back = sphere.project(ra, dec, ra0, dec0)
    np.testing.assert_allclose(back, (xi, eta), atol=1e-12)


# --- Circles ------------------------------------------------------------------------------------

def test_search_box_values():
    assert sphere.search_box(150.0, 60.0, 1.0)[0] == [pytest.approx((147.9997, 152.0003), abs=1e-4)]
    ranges, dec_range = sphere.search_box(0.5, 0.0, 1.0)
    assert ranges == [pytest.approx((359.5, 360.0)), pytest.approx((0.0, 1.5))]
    assert dec_range == (-1.0, 1.0)
    assert sphere.search_box(10.0, -89.5, 0.5) == ([(0.0, 360.0)], (-90.0, -89.0))


def test_select_circle_across_ra_zero_and_at_the_pole():
    inside = sphere.select_circle([359.9, 0.05, 1.5, 180.0], [0.0, 0.0, 0.0, 0.0], 0.0, 0.0, 0.2)
    assert inside.tolist() == [True, True, False, False]
    inside = sphere.select_circle([0.0, 180.0, 77.0, 77.0], [89.5, 89.5, 89.01, 88.99],
                                  0.0, 90.0, 1.0)
    assert inside.tolist() == [True, True, True, False]


# --- Matching -----------------------------------------------------------------------------------

def test_match_nearest_on_a_plane():
    tree = cKDTree(np.array([[0.0, 0.0], [10.0, 0.0]]))
    src, ref = sphere.match_nearest((np.array([0.5, 9.0, 0.2, 50.0]), np.zeros(4)), tree, 1.5)
    # Sources 0 and 2 both claim reference 0: the nearer (2) keeps it; source 3 is too far.
    assert src.tolist() == [1, 2] and ref.tolist() == [1, 0]


def test_match_is_one_to_one_and_nearest():
    ref_ra, ref_dec = np.array([10.0, 10.0]), np.array([0.0, 1.0 / 3600])
    ra = np.array([10.0, 10.0, 10.0 + 1.5 / 3600])
    dec = np.array([0.2 / 3600, 0.7 / 3600, 1.0 / 3600])
    src, ref = sphere.match_radec(ra, dec, ref_ra, ref_dec, 2.0)
    # Sources 1 (0.3" away) and 2 (1.5") both claim reference 1: the nearer keeps it.
    assert src.tolist() == [0, 1] and ref.tolist() == [0, 1]
    # 2" is a true angular distance: at Dec 80 a 0.01 deg RA step is 6.25".
    for offset, matches in ((1.9, [0]), (2.1, [])):
        ra_offset = offset / 3600 / math.cos(math.radians(80.0))
        src, _ = sphere.match_radec([10.0], [80.0], [10.0 + ra_offset], [80.0], 2.0)
        assert src.tolist() == matches


def test_match_across_ra_zero():
    # 0.0002 deg of RA at Dec 10 is 0.709"; 0.0004 deg at Dec -5 is 1.434".
    ra, dec = [359.9999, 0.0002], [10.0, -5.0]
    ref_ra, ref_dec = [359.9998, 0.0001], [-5.0, 10.0]
    src, ref = sphere.match_radec(ra, dec, ref_ra, ref_dec, 2.0)
    assert src.tolist() == [0, 1] and ref.tolist() == [1, 0]
    src, ref = sphere.match_radec(ra, dec, ref_ra, ref_dec, 1.0)
    assert src.tolist() == [0] and ref.tolist() == [1]


def test_match_at_the_pole():
    # Opposite RAs 0.5" from the pole are 1" apart.
    dec = 90.0 - 0.5 / 3600
    assert sphere.match_radec([0.0], [dec], [180.0], [dec], 1.5)[0].tolist() == [0]
    assert sphere.match_radec([0.0], [dec], [180.0], [dec], 0.9)[0].tolist() == []
    # The pole itself has any RA.
    assert sphere.match_radec([33.0], [90.0], [250.0], [90.0], 0.01)[0].tolist() == [0]


def test_match_without_positions():
    for args in (([], [], [1.0], [2.0]), ([1.0], [2.0], [], [])):
        src, ref = sphere.match_radec(*args, 2.0)
        assert src.dtype.kind == ref.dtype.kind == "i" and len(src) == len(ref) == 0
