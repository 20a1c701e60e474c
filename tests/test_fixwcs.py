"""Tests of podi_fixwcs on catalog level: simulated fields with known truth.

Each field: the true WCS of every OTA (model distortion, true pointing, rotator error)
from podi_simulate, the true stars of podi_simulate.star_field, detected sources = true
pixel positions of stars brighter than SOURCE_MAG plus 0.02 px centroid noise, initial
headers = canned model + header pointing (true + pointing error, no rotation) as
collectcells writes them, reference catalog = stars brighter than REF_MAG with 10 mas
noise.
"""

import dataclasses
import logging
import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

import podi_definitions as pd
import podi_fixwcs
import podi_simulate
import podi_sphere
import podi_wcs

SOURCE_MAG = 22.0
REF_MAG = 21.0
CENTROID_NOISE_PX = 0.02
REF_NOISE_ARCSEC = 0.010
OTA_SIZE = pd.cell_geometry(1).ota_size
CENTRAL = pd.PODI.central_3x3
ALL = pd.PODI.otas
#: Expected rms of a matched distance: both axes of centroid and reference noise.
EXPECTED_RMS = math.sqrt(2 * (REF_NOISE_ARCSEC**2 + (CENTROID_NOISE_PX * pd.PIXEL_SCALE) ** 2))


@dataclasses.dataclass
class Field:
    spec: podi_simulate.ExposureSpec
    otas: tuple
    true_headers: dict
    initial_headers: dict
    sources: dict
    refcat: Table
    stars: Table


def header_pointing(spec):
    """Header pointing = true + pointing error, as podi_simulate.simulate_exposure has it."""
    ra_error = spec.pointing_error[0] / 3600 / math.cos(math.radians(spec.dec))
    return (spec.ra + ra_error) % 360, spec.dec + spec.pointing_error[1] / 3600


def make_field(seed, density, pointing_error, rotator_error, ra=150.0, dec=30.0, otas=CENTRAL,
               ref_seed=None, source_mag=SOURCE_MAG, ref_mag=REF_MAG):
    """A catalog-level field; ref_seed draws the reference catalog from another star field."""
    spec = podi_simulate.ExposureSpec(seed=seed, ra=ra, dec=dec, star_density=density,
                                      pointing_error=pointing_error, rotator_error=rotator_error)
    rng = np.random.default_rng([seed, 1234])
    stars = podi_simulate.star_field(spec)
    canned = podi_wcs.model_canned_wcs(pd.PODI)
    hdr_ra, hdr_dec = header_pointing(spec)
    true_headers, initial, sources = {}, {}, {}
    bright = stars[stars["r"] < source_mag]
    for ota in otas:
        true_headers[ota] = podi_simulate.true_ota_wcs(spec, ota)
        extension = canned[pd.ota_extname(ota)].header
        initial[ota] = podi_wcs.ota_wcs_header(extension, hdr_ra, hdr_dec, binning=1)
        x, y = true_pixels(true_headers[ota], bright["ra"], bright["dec"])
        sources[ota] = (x + CENTROID_NOISE_PX * rng.standard_normal(len(x)),
                        y + CENTROID_NOISE_PX * rng.standard_normal(len(y)))
    ref_stars = stars if ref_seed is None else podi_simulate.star_field(
        dataclasses.replace(spec, seed=ref_seed))
    ref_stars = ref_stars[ref_stars["r"] < ref_mag]
    noise = REF_NOISE_ARCSEC / 3600 * rng.standard_normal((2, len(ref_stars)))
    refcat = Table({"ra": ref_stars["ra"] + noise[0] / np.cos(np.radians(ref_stars["dec"])),
                    "dec": ref_stars["dec"] + noise[1]})
    return Field(spec, tuple(otas), true_headers, initial, sources, refcat, stars)


def true_pixels(header, ra, dec):
    """0-based pixels of the stars that fall on the OTA (with a 5 px margin)."""
    ra, dec = np.asarray(ra), np.asarray(dec)
    # Cheap pre-selection (within 1.2 x the half-diagonal of the OTA centre) before
    # astropy's iterative inverse TPV, which would also be slow far off the OTA.
    wcs = WCS(header)
    corners = wcs.all_pix2world([OTA_SIZE / 2, 0], [OTA_SIZE / 2, 0], 0)
    tangent = header["CRVAL1"], header["CRVAL2"]
    (xi_c, xi_0), (eta_c, eta_0) = podi_sphere.project(*corners, *tangent)
    xi, eta = podi_sphere.project(ra, dec, *tangent)
    near = np.hypot(xi - xi_c, eta - eta_c) < 1.2 * np.hypot(xi_0 - xi_c, eta_0 - eta_c)
    x, y = wcs.all_world2pix(ra[near], dec[near], 0)
    inside = (x > 5) & (x < OTA_SIZE - 5) & (y > 5) & (y < OTA_SIZE - 5)
    return x[inside], y[inside]


def mapping_rms(field, headers, otas=None):
    """rms (arcsec) between true pixels and pixels through the refined WCS, on a grid."""
    grid = np.linspace(20, OTA_SIZE - 20, 8)
    x, y = (a.ravel() for a in np.meshgrid(grid, grid))
    squares = []
    for ota in otas or field.otas:
        ra, dec = WCS(field.true_headers[ota]).all_pix2world(x, y, 0)
        x_fit, y_fit = WCS(headers[ota]).all_world2pix(ra, dec, 0, tolerance=1e-8)
        squares.append((x_fit - x) ** 2 + (y_fit - y) ** 2)
    return math.sqrt(np.mean(squares)) * pd.PIXEL_SCALE


def solve(field, **kwargs):
    return podi_fixwcs.solve_wcs(field.sources, field.initial_headers, field.refcat, **kwargs)


# --- A sweep over densities, pointing and rotator errors, RA wrap and high Dec -------------

#: seed, stars/deg^2 (r < 22), pointing error (arcsec: dRA cos Dec, dDec), rotator error
#: (deg), RA, Dec, OTAs
SWEEP = [
    (1, 300, (12, 0), 0.0, 150.0, 30.0, CENTRAL),
    (2, 300, (-150, 200), 1.5, 210.0, 10.0, ALL),
    (3, 500, (300, 0), -1.0, 40.0, -20.0, CENTRAL),
    (4, 500, (0, -300), 0.3, 150.0, 30.0, CENTRAL),
    (5, 800, (-210, 210), -1.5, 300.0, 45.0, CENTRAL),
    (6, 800, (60, 45), 0.8, 0.05, 5.0, CENTRAL),   # straddles RA 0/360
    (7, 1000, (-250, -120), 1.2, 150.0, 70.0, CENTRAL),  # high declination
    (8, 1000, (20, -10), -0.5, 80.0, 60.0, ALL),
    (9, 1500, (180, 180), -1.3, 120.0, -45.0, CENTRAL),
    (10, 1500, (-90, 240), 0.1, 359.9, -5.0, CENTRAL),
    (11, 2000, (270, -60), 1.5, 200.0, 20.0, CENTRAL),
    (12, 2000, (-12, 12), -0.9, 20.0, 0.0, CENTRAL),
    (13, 3000, (150, -250), 0.6, 250.0, 35.0, CENTRAL),
    (14, 3000, (-300, 30), -0.2, 100.0, -60.0, CENTRAL),
    (15, 4000, (100, 100), 1.0, 330.0, 15.0, CENTRAL),
    (16, 4000, (-40, -280), -1.4, 60.0, 50.0, CENTRAL),
    (17, 5000, (240, 90), 0.4, 170.0, -30.0, CENTRAL),
    (18, 6000, (-200, -200), -0.7, 280.0, 25.0, CENTRAL),
    (19, 8000, (45, -150), 1.4, 10.0, 40.0, CENTRAL),
    (20, 8000, (-280, 110), -1.1, 230.0, 65.0, CENTRAL),
]


@pytest.mark.parametrize("seed, density, error, rotation, ra, dec, otas", SWEEP,
                         ids=[f"field{row[0]}" for row in SWEEP])
def test_sweep_solves_every_field(seed, density, error, rotation, ra, dec, otas):
    field = make_field(seed, density, error, rotation, ra, dec, otas)
    result = solve(field)
    assert result.success, result.message
    assert result.keywords["WCSCAL"][0] is True
    assert mapping_rms(field, result.headers) < 0.05
    # The canned (initial) WCS is off by the pointing error: the test can fail.
    assert mapping_rms(field, field.initial_headers) > 5.0
    rms = result.keywords["WCS_RMS"][0]
    assert 0.6 * EXPECTED_RMS < rms < 1.5 * EXPECTED_RMS
    assert result.keywords["WCS_QUAL"][0] >= podi_fixwcs.MIN_CONTRAST
    # The scale is the canned model's: only shift and rotation were wrong.
    assert result.keywords["WCS2_SCL"][0] == pytest.approx(1.0, abs=2e-4)
    assert len(result.matches) == result.keywords["WCS_NSRC"][0]
    assert set(result.headers) == set(otas)


def test_offsets_and_rotation_are_reported():
    # At Dec 0 with a small RA error the tangent planes of header and truth agree on
    # north, so the reported rotation is the rotator error itself.
    field = make_field(21, 3000, (150.0, -100.0), 0.9, ra=30.0, dec=0.0)
    result = solve(field)
    assert result.success
    keywords = result.keywords
    assert keywords["WCS2_DA"][0] == pytest.approx(0.9, abs=0.01)
    assert keywords["WCS1_DA"][0] == pytest.approx(0.9, abs=0.1)
    # Offsets are "reference minus initial": minus the pointing error, plus the
    # shift that a rotation about the optical axis makes at the frame centre.
    assert abs(keywords["WCS1_DRA"][0] + 150.0) < 10.0
    assert abs(keywords["WCS1_DDE"][0] - 100.0) < 10.0
    for key in ("WCS_ERRA", "WCS_ERRD"):
        assert 0 < keywords[key][0] < 3 * EXPECTED_RMS / math.sqrt(keywords["WCS_NSRC"][0])
    assert set(result.matches.colnames) >= {"ODI_RA", "ODI_DEC", "REF_RA", "REF_DEC", "OTA"}
    separation = np.hypot((result.matches["ODI_RA"] - result.matches["REF_RA"]) * 3600,
                          (result.matches["ODI_DEC"] - result.matches["REF_DEC"]) * 3600)
    assert np.max(separation) < 0.1
    assert result.reference.colnames == ["RA", "DEC"]
    assert len(result.reference) >= len(result.matches)
    for ota in field.otas:
        assert result.ota_keywords[ota]["WCSMODE"][0] == "OTA shift+CD"
        assert result.ota_keywords[ota]["WCS_NSRC"][0] >= podi_fixwcs.MIN_OTA_MATCHES


def test_otas_without_sources_get_the_frame_solution():
    field = make_field(22, 2000, (-100.0, 60.0), -0.8, otas=ALL)
    sources = {ota: xy for ota, xy in field.sources.items() if ota not in (0, 61)}
    result = podi_fixwcs.solve_wcs(sources, field.initial_headers, field.refcat)
    assert result.success
    assert result.ota_keywords[61]["WCSMODE"][0] == "frame"
    assert mapping_rms(field, result.headers, otas=(0, 61)) < 0.05


def test_frame_solution_alone_is_accurate():
    # Sparse fields leave most OTAs on the frame solution: it must hold by itself.
    field = make_field(23, 4000, (200.0, 150.0), 1.3, otas=ALL)
    result = solve(field, min_ota_matches=10**6)
    assert result.success
    assert {values["WCSMODE"][0] for values in result.ota_keywords.values()} == {"frame"}
    assert mapping_rms(field, result.headers) < 0.05


def test_larger_offset_found_on_retry():
    # 7' is outside the first search (5') but inside the retry (10').
    field = make_field(24, 2000, (420.0, -60.0), 0.5)
    result = solve(field)
    assert result.success, result.message
    assert mapping_rms(field, result.headers) < 0.05


# --- Failures ----------------------------------------------------------------------------------

def assert_failed(result, field, caplog, reason):
    assert not result.success
    assert result.keywords["WCSCAL"][0] is False
    assert reason in result.message
    for ota, header in result.headers.items():
        assert header == field.initial_headers[ota]
        assert header is not field.initial_headers[ota]
    assert any(record.levelno == logging.WARNING and reason in record.getMessage()
               for record in caplog.records)


def test_too_few_reference_stars(caplog):
    field = make_field(31, 2000, (60.0, 30.0), 0.2)
    field.refcat = field.refcat[:5]
    with caplog.at_level(logging.WARNING, logger="podi_fixwcs"):
        result = solve(field)
    assert_failed(result, field, caplog, "reference stars in the field")


def test_too_few_sources(caplog):
    field = make_field(32, 2000, (60.0, 30.0), 0.2)
    field.sources = {33: (np.array([100.0, 2000.0, 3000.0]), np.array([50.0, 1000.0, 4000.0]))}
    with caplog.at_level(logging.WARNING, logger="podi_fixwcs"):
        result = solve(field)
    assert_failed(result, field, caplog, "sources")


def test_catalog_of_another_part_of_the_sky(caplog):
    field = make_field(33, 2000, (60.0, 30.0), 0.2)
    other = make_field(33, 2000, (0.0, 0.0), 0.0, ra=field.spec.ra + 3.0, otas=(33,))
    field.refcat = other.refcat
    with caplog.at_level(logging.WARNING, logger="podi_fixwcs"):
        result = solve(field)
    assert_failed(result, field, caplog, "reference stars in the field")


@pytest.mark.parametrize("density", [500, 4000])
def test_unrelated_catalog_has_no_contrast(caplog, density):
    # Same place, different stars: plenty of pairs but no true match. The solver must
    # not return a solution (the original would have taken the best chance peak).
    field = make_field(34, density, (60.0, 30.0), 0.2, ref_seed=777)
    with caplog.at_level(logging.WARNING, logger="podi_fixwcs"):
        result = solve(field)
    assert_failed(result, field, caplog, "no clear match")
    assert result.keywords["WCS_QUAL"][0] < podi_fixwcs.MIN_CONTRAST


def test_missing_catalog_columns_are_an_error():
    field = make_field(35, 300, (0.0, 0.0), 0.0, otas=(33,))
    with pytest.raises(ValueError, match="dec"):
        podi_fixwcs.solve_wcs(field.sources, field.initial_headers, Table({"ra": [1.0]}))


# --- Building blocks ---------------------------------------------------------------------------

def real_canned(mastercals):
    return podi_wcs.read_canned_wcs(mastercals / "wcs/podi/2mass_distort5.fits")


@pytest.mark.parametrize("ota, ra0, dec0", [(22, 150.0, 30.0), (44, 359.99, 1.0), (33, 12.0, 88.5)])
def test_pixel_to_sky_agrees_with_astropy(mastercals, ota, ra0, dec0):
    # 5th-order real model, including the r terms and both argument orders.
    header = podi_wcs.ota_wcs_header(real_canned(mastercals)[ota], ra0, dec0)
    x, y = (a.ravel() for a in np.meshgrid(np.linspace(0, 4095, 7), np.linspace(0, 4095, 7)))
    ra, dec = WCS(header).all_pix2world(x, y, 0)
    ra_own, dec_own = podi_fixwcs.pixel_to_sky(header, x, y)
    np.testing.assert_allclose(np.mod(ra_own - ra + 180, 360) - 180, 0, atol=1e-10)
    np.testing.assert_allclose(dec_own, dec, atol=1e-10)
    u, v = podi_fixwcs._cd(header) @ np.vstack([x + 1 - header["CRPIX1"], y + 1 - header["CRPIX2"]])
    xi, eta = podi_fixwcs._Tpv(header).forward(u, v)
    np.testing.assert_allclose(podi_fixwcs._Tpv(header).inverse(xi, eta), (u, v), atol=1e-12)


def test_real_canned_model_with_rotation_and_offset(mastercals):
    # A non-radial 5th-order distortion: a rotation of CD no longer commutes with it,
    # so the per-OTA shift + CD fits have to take up what the frame fit leaves.
    canned = real_canned(mastercals)
    field = make_field(41, 4000, (0.0, 0.0), 0.0, otas=ALL)
    truth = dataclasses.replace(field.spec, ra=field.spec.ra + 0.05, dec=field.spec.dec - 0.03)
    rotation = math.radians(0.8)
    matrix = np.array([[math.cos(rotation), -math.sin(rotation)],
                       [math.sin(rotation), math.cos(rotation)]])
    rng = np.random.default_rng(3)
    bright = field.stars[field.stars["r"] < SOURCE_MAG]
    for ota in ALL:
        header = podi_wcs.ota_wcs_header(canned[ota], truth.ra, truth.dec)
        (header["CD1_1"], header["CD1_2"]), (header["CD2_1"], header["CD2_2"]) = \
            matrix @ podi_fixwcs._cd(header)
        field.true_headers[ota] = header
        field.initial_headers[ota] = podi_wcs.ota_wcs_header(canned[ota], field.spec.ra,
                                                             field.spec.dec)
        x, y = true_pixels(header, bright["ra"], bright["dec"])
        field.sources[ota] = (x + CENTROID_NOISE_PX * rng.standard_normal(len(x)),
                              y + CENTROID_NOISE_PX * rng.standard_normal(len(y)))
    result = solve(field)
    assert result.success, result.message
    assert mapping_rms(field, result.headers) < 0.05


def test_fit_header_recovers_a_known_header():
    # Exact data: shift + CD fitted to positions of a shifted, rotated, scaled header.
    canned = podi_wcs.model_canned_wcs(pd.PODI)[pd.ota_extname(0)].header
    start = podi_wcs.ota_wcs_header(canned, 150.0, 70.0)
    target = podi_wcs.ota_wcs_header(canned, 150.04, 69.97)
    target["CD1_2"], target["CD2_1"] = 2e-7, -3e-7
    target["CD1_1"] *= 1.001
    x, y = (a.ravel() for a in np.meshgrid(np.linspace(0, 4095, 6), np.linspace(0, 4095, 6)))
    ra, dec = WCS(target).all_pix2world(x, y, 0)
    fitted, keep = podi_fixwcs.fit_header(start, x, y, ra, dec)
    assert keep.all()
    # OTA 00 lies ~2 deg from CRPIX: CRVAL and CD trade off a little (1e-8 deg = 36 uas).
    for key in ("CRVAL1", "CRVAL2"):
        assert fitted[key] == pytest.approx(target[key], abs=1e-8)
    np.testing.assert_allclose(podi_fixwcs._cd(fitted), podi_fixwcs._cd(target), atol=1e-12)
    x_fit, y_fit = WCS(fitted).all_world2pix(ra, dec, 0, tolerance=1e-10)
    np.testing.assert_allclose(np.hypot(x_fit - x, y_fit - y), 0, atol=1e-5)
    assert fitted["CRPIX1"] == start["CRPIX1"]


# --- A full frame -------------------------------------------------------------------------------

def test_full_frame_of_sources():
    """13 OTAs with ~400 sources each against ~5000 reference stars in the area (its
    time is measured by benchmarks/bench_collectcells.py --fixwcs, not here)."""
    field = make_field(51, 8000, (-200.0, 120.0), 1.0, otas=ALL, source_mag=23.5,
                       ref_mag=22.0)
    n_sources = sum(len(x) for x, _ in field.sources.values())
    result = solve(field)
    assert result.success
    assert n_sources > 4000
    assert len(result.reference) > 4000
