"""Tests of podi_photcalib on catalog level: simulated fields with a known zero point.

Each field: the true stars of podi_simulate.star_field within FIELD_RADIUS of the
pointing; the reference catalog of podi_simulate.reference_catalog (noisy magnitudes
with their errors); a CAT.ODI-like source catalog whose 3" instrumental magnitudes
come from the true magnitudes and the true zero point TRUE_ZP (mag, 1 s) with a
background + Poisson noise model, a few flagged (saturated, blended) sources, and
a few unflagged outliers (undetected blends, BLEND_OFFSET brighter) that the
clipping must remove.
"""

import dataclasses
import math
import warnings

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table

import podi_photcalib as pc
import podi_simulate
from podi_sphere import angular_distance, select_circle

TRUE_ZP = 25.95
GAIN = 1.3                # e-/ADU
SKY_NOISE = 15.0          # ADU per pixel in the exposure
APERTURE_PIXELS = 560     # pixels in the 3"-diameter aperture
FIELD_RADIUS = 0.4        # deg
SEEING = 1.0              # arcsec
BETA = 3.5
POSITION_NOISE = 0.05     # arcsec, per axis
FLAGGED_FRACTION = 0.05
OUTLIER_FRACTION = 0.03
BLEND_OFFSET = 0.5        # mag
SATURATED_MAG = 15.0
DIAMETERS = {tag: int(tag) / 10 for tag in pc.APERTURES}


@dataclasses.dataclass
class Field:
    sources: Table
    reference: Table
    outlier: np.ndarray   # per source: an unflagged blend
    exptime: float
    centre: tuple


def instrumental(flux, rng):
    """Observed 3" magnitudes and errors of true fluxes (ADU in the exposure)."""
    error = np.sqrt(APERTURE_PIXELS * SKY_NOISE**2 + flux / GAIN)
    observed = flux + error * rng.standard_normal(len(flux))
    with np.errstate(invalid="ignore"):
        mag = -2.5 * np.log10(observed)
    return mag, 1.0857 * error / observed, observed / error


def make_field(seed, density=2000.0, exptime=300.0, filter_name="odi_r", ra=150.0, dec=30.0,
               colour_term=None, gradient=0.0):
    """A field whose true zero point is TRUE_ZP + gradient * (distance from centre, deg),
    with ``colour_term`` = (c, band1, band2) applied to the instrumental magnitudes."""
    spec = podi_simulate.ExposureSpec(seed=seed, star_density=density, filter=filter_name,
                                      ra=ra, dec=dec)
    rng = np.random.default_rng([seed, 4711])
    stars = podi_simulate.star_field(spec)
    reference = podi_simulate.reference_catalog(stars, rng)
    stars = stars[select_circle(stars["ra"], stars["dec"], ra, dec, FIELD_RADIUS)]
    band = podi_simulate.FILTER_BAND[filter_name]
    magnitude = np.asarray(stars[band])
    if colour_term is not None:
        c, band1, band2 = colour_term
        magnitude = magnitude - c * (np.asarray(stars[band1]) - np.asarray(stars[band2]))
    zeropoint = TRUE_ZP + gradient * angular_distance(stars["ra"], stars["dec"], ra, dec)
    outlier = rng.random(len(stars)) < OUTLIER_FRACTION
    magnitude = magnitude - BLEND_OFFSET * outlier
    mag, err, snr = instrumental(10 ** (-0.4 * (magnitude - zeropoint)) * exptime, rng)
    detected = snr > 5
    flags = np.where(rng.random(len(stars)) < FLAGGED_FRACTION, 1, 0)
    flags[magnitude < SATURATED_MAG] |= 2
    noise = POSITION_NOISE / 3600 * rng.standard_normal((2, len(stars)))
    sources = Table({
        "RA": (stars["ra"] + noise[0] / np.cos(np.radians(stars["dec"]))) % 360.0,
        "DEC": stars["dec"] + noise[1],
        "FLAGS": flags.astype(np.int16),
        "OTA": rng.choice([22, 33, 34, 44], len(stars)).astype(np.int16),
        "FWHM_WORLD": (SEEING + 0.03 * rng.standard_normal(len(stars))) / 3600,
    })
    calibration_fraction = podi_simulate.moffat_enclosed(1.5, SEEING, BETA)
    for tag, diameter in DIAMETERS.items():
        fraction = podi_simulate.moffat_enclosed(diameter / 2, SEEING, BETA)
        sources[f"MAG_D{tag}"] = mag - 2.5 * math.log10(fraction / calibration_fraction)
        sources[f"MAGERR_D{tag}"] = err
    return Field(sources[detected], reference, outlier[detected], exptime, (ra, dec))


def calibrate(field, filter_name="odi_r", **options):
    return pc.calibrate(field.sources, field.reference, filter_name, field.exptime, **options)


def assert_failed(result, text):
    assert not result.success
    assert text in result.message
    assert result.keywords["PHOTCAL"][0] is False
    assert result.keywords["PHOTMSG"][0] == result.message[:68]
    assert "PHOTZP" not in result.keywords and "MAGZERO" not in result.keywords
    assert math.isnan(result.zeropoint)


# --- The zero point -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def standard():
    field = make_field(seed=3, density=2000.0, exptime=300.0)
    return field, calibrate(field, airmass=1.37, catalog_name="simulated SDSS")


def test_zeropoint_recovers_truth_with_outliers(standard):
    field, result = standard
    assert result.success, result.message
    assert field.outlier.sum() > 10
    assert result.keywords["PHOTZP_N"][0] >= 20
    assert abs(result.zeropoint - TRUE_ZP) < 0.01
    assert result.keywords["PHOTZP"][0] == pytest.approx(result.zeropoint, abs=1e-5)
    assert result.keywords["PHOTCAL"][0] is True
    assert result.keywords["PHOTMCAT"][0] == "simulated SDSS"
    assert result.keywords["PHOTBAND"][0] == "r"


def test_derived_keywords(standard):
    field, result = standard
    kw = {key: value for key, (value, _) in result.keywords.items()}
    assert kw["PHOTZP_X"] == pytest.approx(kw["PHOTZP"] + 2.5 * math.log10(300.0), abs=2e-5)
    assert kw["MAGZ_AM1"] == pytest.approx(kw["PHOTZP"] + 0.37 * 0.12, abs=2e-5)
    assert kw["MAGZERO"] == kw["PHOTZP"] and kw["MAGZERR"] == kw["PHOTZPER"]
    assert kw["MAGZSIG"] == kw["PHOTZPSD"]
    assert kw["MAGZREF"] == 26.1
    assert kw["MAGZ_CT"] == 0.0 and kw["MAGZ_COL"] == "none"
    assert kw["PHOTZP_N"] <= kw["PHOTZPN0"] == len(result.table)
    assert kw["PHOTZPSM"] < kw["PHOTZP"] < kw["PHOTZPSP"]
    used = result.table["ZP_USED"]
    assert kw["PHOTZPSD"] == pytest.approx(np.std(result.table["ZP"][used], ddof=1), abs=1e-4)
    assert kw["SEEINGZP"] == pytest.approx(SEEING, abs=0.01)
    assert 0 < kw["SEEZP_N"] <= kw["PHOTZP_N"]
    assert "SEEING" not in kw  # podi_framecalib's keyword
    assert all(len(key) <= 8 for key in result.keywords)
    assert "RADZPFIT" not in kw


def test_zeropoint_is_the_weighted_mean_of_the_table(standard):
    _, result = standard
    used = result.table[result.table["ZP_USED"]]
    scatter = result.keywords["PHOTZPXS"][0]
    weight = 1.0 / (np.asarray(used["ZP_ERR"], float) ** 2 + scatter**2)
    mean = np.sum(weight * used["ZP"]) / np.sum(weight)
    assert result.zeropoint == pytest.approx(mean, abs=2e-5)
    assert result.zeropoint_error >= 0.999 / math.sqrt(np.sum(weight))


def test_excess_scatter():
    rng = np.random.default_rng(5)
    error = rng.uniform(0.005, 0.05, 20000)
    residual = np.hypot(error, 0.02) * rng.standard_normal(len(error))
    assert pc.excess_scatter(residual, error) == pytest.approx(0.02, rel=0.05)
    assert pc.excess_scatter(error * rng.standard_normal(len(error)), error) < 0.002
    assert pc.excess_scatter(np.zeros(3), np.full(3, 0.01)) == 0.0


def test_combine_inflates_error_by_chi2():
    # Residuals of one star far beyond the errors (the robust scatter ignores it).
    zp, err = np.array([0.0, 0.0, 0.0, 0.0, 1.0]), np.full(5, 0.01)
    mean, error, scatter = pc.combine_zeropoints(zp, err)
    assert scatter == 0.0 and mean == pytest.approx(0.2)
    chi2 = (4 * 0.2**2 + 0.8**2) / 0.01**2 / 4
    assert error == pytest.approx(0.01 / math.sqrt(5) * math.sqrt(chi2))
    # Consistent data keep the plain standard error.
    _, error, _ = pc.combine_zeropoints(np.array([0.0, 0.005, -0.005]), np.full(3, 0.01))
    assert error == pytest.approx(0.01 / math.sqrt(3))


def test_outliers_are_clipped(standard):
    field, result = standard
    table = result.table
    matched_outlier = np.isin(table["ODI_RA"], field.sources["RA"][field.outlier])
    assert matched_outlier.sum() > 5
    assert not table["ZP_USED"][matched_outlier].any()
    # and few good stars are lost (3 sigma clips 0.3 % of a normal distribution)
    assert (~table["ZP_USED"][~matched_outlier]).mean() < 0.02


def test_no_airmass_no_magz_am1():
    field = make_field(seed=5, density=1000.0)
    assert "MAGZ_AM1" not in calibrate(field).keywords


def test_errors_are_honest():
    """The stated PHOTZPER matches the true scatter of PHOTZP over many fields."""
    rng = np.random.default_rng(99)
    pulls = []
    for k, density in enumerate(np.geomspace(300, 8000, 20)):
        exptime = float(rng.choice([30.0, 60.0, 150.0, 300.0, 600.0]))
        result = calibrate(make_field(seed=100 + k, density=density, exptime=exptime))
        assert result.success, result.message
        if result.keywords["PHOTZP_N"][0] >= 20:
            assert abs(result.zeropoint - TRUE_ZP) < 0.01
        pulls.append((result.zeropoint - TRUE_ZP) / result.zeropoint_error)
    assert 0.5 < np.std(pulls) < 2.0, pulls
    assert abs(np.mean(pulls)) < 1.0, pulls


# --- Matching -----------------------------------------------------------------------------

def test_shifted_reference_matches_nothing():
    field = make_field(seed=11, density=300.0)
    field.reference["dec"] += 3.0 / 3600
    result = calibrate(field)
    assert_failed(result, "calibration stars")
    assert result.keywords["PHOTZPN0"][0] <= 2


@pytest.mark.parametrize("ra, dec", [(0.05, 10.0), (359.98, -20.0), (120.0, 80.0)])
def test_wrap_and_high_declination(ra, dec):
    field = make_field(seed=21, density=1500.0, ra=ra, dec=dec)
    result = calibrate(field)
    assert result.success, result.message
    assert abs(result.zeropoint - TRUE_ZP) < 3 * result.zeropoint_error + 0.002
    # The same pairs as astropy's independent matcher finds.
    clean = field.sources[pc.clean_sources(field.sources, 0.05)]
    reference = field.reference[field.reference["r_err"] <= 0.05]
    sources = SkyCoord(clean["RA"], clean["DEC"], unit="deg")
    _, separation, _ = sources.match_to_catalog_sky(
        SkyCoord(reference["ra"], reference["dec"], unit="deg"))
    expected = int((separation.arcsec <= 2.0).sum())
    assert expected > 300
    assert abs(result.keywords["PHOTZPN0"][0] - expected) <= 2
    table = result.table
    pairs = SkyCoord(table["ODI_RA"], table["ODI_DEC"], unit="deg").separation(
        SkyCoord(table["REF_RA"], table["REF_DEC"], unit="deg"))
    assert np.all(pairs.arcsec <= 2.0)
    if ra < 1 or ra > 359:
        odi_ra = np.asarray(table["ODI_RA"])
        assert (odi_ra > 359).sum() > 20 and (odi_ra < 1).sum() > 20


# --- Failures -------------------------------------------------------------------------------

def test_narrow_band_filter_fails(standard):
    field, _ = standard
    result = calibrate(field, filter_name="CTIO_Ha", catalog_name="simulated SDSS")
    assert_failed(result, "filter CTIO_Ha has no reference band")
    assert result.keywords["PHOTZPN0"][0] == 0
    assert result.keywords["PHOTMCAT"][0] == "simulated SDSS"
    assert len(result.table) == 0 and "ZP_USED" in result.table.colnames


def test_reference_without_band_fails(standard):
    field, _ = standard
    reference = field.reference.copy()
    reference.remove_columns(["r", "r_err"])
    result = pc.calibrate(field.sources, reference, "odi_r", field.exptime)
    assert_failed(result, "reference catalog has no r magnitudes")
    reference["r"] = np.nan
    assert_failed(pc.calibrate(field.sources, reference, "odi_r", field.exptime),
                  "reference catalog has no r magnitudes")


def test_too_few_stars_fails(standard):
    field, _ = standard
    matched = np.isin(field.sources["RA"], standard[1].table["ODI_RA"])
    result = pc.calibrate(field.sources[matched][:3], field.reference, "odi_r", field.exptime)
    assert_failed(result, "5 needed")
    assert result.keywords["PHOTZPN0"][0] == 3
    assert len(result.table) == 3


def test_reference_elsewhere_fails(standard):
    field, _ = standard
    reference = field.reference.copy()
    reference["ra"] = (reference["ra"] + 2.0) % 360.0
    result = calibrate(dataclasses.replace(field, reference=reference))
    assert_failed(result, "calibration stars")
    assert result.keywords["PHOTZPN0"][0] == 0


def test_reference_errors_too_large_fails(standard):
    field, _ = standard
    reference = field.reference.copy()
    reference["r_err"] = 0.1
    assert_failed(pc.calibrate(field.sources, reference, "odi_r", field.exptime),
                  "no reference stars with r error <= 0.05 mag")


def test_keywords_make_valid_header_cards(standard):
    field, result = standard
    failure = calibrate(field, filter_name="CTIO_Ha", catalog_name="x" * 100)
    radial = calibrate(field, radial_centre=field.centre)
    for keywords in (result.keywords, failure.keywords, radial.keywords):
        header = fits.Header()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no truncated comments, no invalid values
            for key, (value, comment) in keywords.items():
                header[key] = (value, comment)
            header.tostring()
        assert all(len(str(value)) <= 68 for value in header.values())
    assert failure.keywords["PHOTMCAT"][0] == "x" * 68
    assert pc.text_keyword("/data/catalogs/" + "d" * 80 + "/sdss.fits", "c", keep_end=True)[
        0].endswith("/sdss.fits")


# --- Colour term ------------------------------------------------------------------------------

def test_colour_term():
    colour_term = pc.ORIGINAL_COLOUR_TERMS["odi_g"]
    assert colour_term == (0.16, "g", "r")
    field = make_field(seed=31, density=2000.0, filter_name="odi_g", colour_term=colour_term)
    with_term = calibrate(field, "odi_g", colour_terms=pc.ORIGINAL_COLOUR_TERMS)
    assert with_term.success, with_term.message
    assert abs(with_term.zeropoint - TRUE_ZP) < max(3 * with_term.zeropoint_error, 0.005)
    assert with_term.keywords["MAGZ_COL"][0] == "g-r"
    assert with_term.keywords["MAGZ_CT"][0] == 0.16
    assert with_term.keywords["PHOTBAND"][0] == "g"
    # Without it the zero point absorbs c times the mean colour (g - r is 0.2 ... 1.4).
    without = calibrate(field, "odi_g")
    assert without.zeropoint - TRUE_ZP > 0.08
    assert without.keywords["MAGZ_COL"][0] == "none"
    # A colour term for another filter does not apply.
    other = calibrate(field, "odi_g", colour_terms={"odi_z": pc.ORIGINAL_COLOUR_TERMS["odi_z"]})
    assert other.zeropoint == without.zeropoint


# --- Radial zero-point fit ------------------------------------------------------------------

@pytest.mark.parametrize("gradient", [0.0, 0.1])
def test_radial_fit(gradient):
    field = make_field(seed=41, density=6000.0, exptime=300.0, gradient=gradient)
    result = calibrate(field, radial_centre=field.centre)
    kw = {key: value for key, (value, _) in result.keywords.items()}
    assert kw["RADZPFIT"] is True
    assert kw["RADZP_E1"] < 0.02  # precise enough to tell 0.1 mag/deg from 0
    assert abs(kw["RADZP_P1"] - gradient) < 3 * kw["RADZP_E1"]


def test_radial_fit_needs_three_stars():
    zp = np.array([26.0, 26.01, 25.99, 26.0])
    ra = np.array([150.0, 150.5, 150.6, 150.7])
    dec = np.full(4, 30.0)
    kw = pc.fit_radial_zeropoint(ra, dec, zp, np.full(4, 0.01), (150.0, 30.0))
    assert kw["RADZPFIT"][0] is False and "RADZP_P1" not in kw


def test_radial_zeropoint_centre():
    ra, dec = pc.radial_zeropoint_centre(359.99, 60.0)
    assert ra == pytest.approx((359.99 + 240 / 3600 / 0.5) % 360)
    assert dec == pytest.approx(60.0 - 240 / 3600)


# --- Sky brightness and depth -------------------------------------------------------------

def test_sky_brightness():
    # 1000 ADU per 0.11" pixel = 82644.6 ADU/arcsec^2 = 12.2930 mag brighter than the ZP.
    assert pc.sky_brightness(1000.0, 0.11, 30.0) == pytest.approx(17.70699, abs=1e-4)
    assert math.isnan(pc.sky_brightness(0.0, 0.11, 30.0))
    levels = np.array([100.0, -5.0])
    assert np.isnan(pc.sky_brightness(levels, 0.11, 30.0)).tolist() == [False, True]


def test_point_source_depth():
    zp, sky_noise, scale, seeing = 32.0, 20.0, 0.1126, 1.2
    depth = pc.point_source_depth(sky_noise, scale, seeing, zp)
    flux = 10 ** (-0.4 * (depth - zp))
    in_aperture = flux * podi_simulate.moffat_enclosed(seeing, seeing, BETA)
    noise = sky_noise * math.sqrt(math.pi * (seeing / scale) ** 2)
    assert in_aperture / noise == pytest.approx(5.0, rel=1e-9)
    # Hand-computed: noise 20 x sqrt(pi) x 10.657 = 377.8 ADU, fraction 0.7932.
    assert depth == pytest.approx(zp - 2.5 * math.log10(5 * 377.79 / 0.79325), abs=1e-3)
    assert pc.point_source_depth(sky_noise, scale, seeing, zp, nsigma=1.0) == pytest.approx(
        depth + 2.5 * math.log10(5.0))
    assert math.isnan(pc.point_source_depth(0.0, scale, seeing, zp))


# --- CAT.PHOTCALIB --------------------------------------------------------------------------

def test_photcalib_table(standard):
    field, result = standard
    table = result.table
    expected = (["ODI_RA", "ODI_DEC", "REF_RA", "REF_DEC", "OTA"]
                + [f"ODI_{kind}_{tag}" for tag in pc.APERTURES for kind in ("MAG", "ERR")]
                + [f"REF_MAG_{b}" for b in "UGRIZ"] + [f"REF_ERR_{b}" for b in "UGRIZ"]
                + ["ODI_FWHM", "ZP", "ZP_ERR", "ZP_USED"])
    assert sorted(table.colnames) == sorted(expected)
    for name in ("ODI_RA", "ODI_DEC", "REF_RA", "REF_DEC", "ODI_FWHM"):
        assert table[name].dtype == np.float64
    assert table["OTA"].dtype == np.int16
    assert table["ZP_USED"].dtype == bool
    for name in expected[5:-4] + ["ZP", "ZP_ERR"]:
        assert table[name].dtype == np.float32, name
    assert table.meta["EXTNAME"] == "CAT.PHOTCALIB"
    assert table["ZP_USED"].sum() == result.keywords["PHOTZP_N"][0]
    # Per-star zero points as documented: reference minus exposure-normalised instrumental.
    zp = table["REF_MAG_R"] - (table["ODI_MAG_30"] + 2.5 * math.log10(field.exptime))
    assert np.allclose(table["ZP"], zp, atol=1e-4)
    assert np.allclose(table["ZP_ERR"], np.hypot(table["REF_ERR_R"], table["ODI_ERR_30"]),
                       atol=1e-6)


def test_missing_reference_bands_are_nan(standard):
    field, _ = standard
    reference = field.reference.copy()
    reference.remove_columns(["u", "u_err"])
    reference["z"] = np.ma.masked_array(reference["z"], mask=np.ones(len(reference), bool))
    table = pc.calibrate(field.sources, reference, "odi_r", field.exptime).table
    assert np.isnan(table["REF_MAG_U"]).all() and np.isnan(table["REF_ERR_U"]).all()
    assert np.isnan(table["REF_MAG_Z"]).all()
    assert np.isfinite(table["REF_MAG_G"]).all()


# --- Aperture correction and the frame's sky keywords ----------------------------------------

def test_aperture_correction_from_the_psf_fit_and_from_the_assumed_profile():
    import podi_findstars
    psf = podi_findstars.MoffatFit(1.2, 2.5, np.diag([1e-4, 1e-3]), 40)
    fitted = pc.aperture_correction(psf, SEEING)
    expected = -2.5 * math.log10(podi_simulate.moffat_enclosed(1.5, 1.2, 2.5))
    assert fitted["APCORR"][0] == pytest.approx(expected, abs=1e-5)
    assert 0 < fitted["APCORRER"][0] < 0.01 and fitted["APCORR_N"][0] == 40
    assert "fitted Moffat" in fitted["APCORR"][1]
    # Without a fit: the assumed Moffat of the seeing, 3" diameter against total flux.
    assumed = pc.aperture_correction(None, SEEING)
    fraction = podi_simulate.moffat_enclosed(1.5, SEEING, BETA)
    assert assumed["APCORR"][0] == pytest.approx(-2.5 * math.log10(fraction), abs=1e-5)
    assert assumed["APCORRER"][0] == -1.0 and assumed["APCORR_N"][0] == 0
    assert "assumed Moffat" in assumed["APCORR"][1]


def test_sky_and_depth_keywords():
    keywords = pc.sky_and_depth(32.0, 1000.0, 20.0, 0.11, 1.2)
    assert keywords["SKYMAG"][0] == pytest.approx(pc.sky_brightness(1000.0, 0.11, 32.0), abs=1e-4)
    assert keywords["PHOTDPTH"][0] == pytest.approx(pc.point_source_depth(20.0, 0.11, 1.2, 32.0),
                                                    abs=1e-4)
    assert "5-sigma" in keywords["PHOTDPTH"][1]
    assert pc.sky_and_depth(32.0, -5.0, 20.0, 0.11, -1.0) == {}
