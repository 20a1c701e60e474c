"""Tests of podi_wcs: pointing strings, canned WCS files (tangent point = pointing minus
the stored offset), the optical model."""

import math
import warnings

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

import podi_definitions as pd
import podi_sphere
import podi_wcs

LOOSE_FILE = "20150623T221133.1.2mass.l3-fromloose1.fits"


def make_wcs(header):
    # Any astropy warning (PV on a TAN axis, fixed keywords) counts as a failure.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return WCS(header)


def sky(ra, dec):
    return SkyCoord(ra, dec, unit="deg")


# --- Pointing -------------------------------------------------------------------------

def test_parse_pointing_sexagesimal_and_degrees():
    assert podi_wcs.parse_pointing({"RA": "10:00:00.000", "DEC": "+30:00:00.00"}) == (150.0, 30.0)
    ra, dec = podi_wcs.parse_pointing({"RA": "00:00:36.000", "DEC": "-00:30:36.00"})
    assert ra == pytest.approx(0.15, abs=1e-12)
    assert dec == pytest.approx(-0.51, abs=1e-12)
    assert podi_wcs.parse_pointing({"RA": 210.5, "DEC": -12.25}) == (210.5, -12.25)


def test_parse_pointing_errors_name_keyword_and_value():
    with pytest.raises(ValueError, match="RA"):
        podi_wcs.parse_pointing({"DEC": "+30:00:00.00"})
    with pytest.raises(ValueError, match="DEC = 'abc'"):
        podi_wcs.parse_pointing({"RA": "10:00:00.000", "DEC": "abc"})
    with pytest.raises(ValueError, match="RA = '10:61:00.000'"):
        podi_wcs.parse_pointing({"RA": "10:61:00.000", "DEC": "+30:00:00.00"})
    with pytest.raises(ValueError, match="DEC"):
        podi_wcs.parse_pointing({"RA": "10:00:00.000", "DEC": "+91:00:00.00"})


def test_format_pointing_rounds_and_carries():
    assert podi_wcs.format_pointing(150.0, 30.0) == ("10:00:00.000", "+30:00:00.00")
    # 59.9996 s rounds into the next minute, 359.99999999 deg wraps to 0 h.
    assert podi_wcs.format_pointing(15 * (59 + 59.9996 / 60) / 60, 0.0)[0] == "01:00:00.000"
    assert podi_wcs.format_pointing(359.99999999, -1e-9) == ("00:00:00.000", "+00:00:00.00")
    assert podi_wcs.format_pointing(0.0, -0.5 / 3600) == ("00:00:00.000", "-00:00:00.50")


def test_format_parse_round_trip_is_stable():
    rng = np.random.default_rng(1)
    for ra, dec in zip(rng.uniform(0, 360, 2000), rng.uniform(-90, 90, 2000)):
        strings = podi_wcs.format_pointing(ra, dec)
        parsed = podi_wcs.parse_pointing({"RA": strings[0], "DEC": strings[1]})
        assert podi_wcs.format_pointing(*parsed) == strings
        # 0.001 s of RA and 0.01" of Dec: half of that is the largest rounding.
        assert abs(parsed[0] - ra) <= 0.0005 * 15 / 3600 + 1e-12
        assert abs(parsed[1] - dec) <= 0.005 / 3600 + 1e-12


# --- Real canned files ---------------------------------------------------------------------

EXPECTED_OTAS = {
    "2mass_distort5.fits": 13, "wcs_distort2.fits": 13, LOOSE_FILE: 30,
    "odi56__2mass_level3.fits": 30, "odi5x6_GAIA_level4.fits": 30, "wcs_podi56.fits": 30,
    "wcs_zero2.fits": 30, "wcs_5x6_skeleton.fits": 64,
}


def test_every_real_canned_file_loads_and_gives_valid_wcs(mastercals):
    files = sorted(mastercals.glob("wcs/podi/*.fits")) + sorted(
        mastercals.glob("wcs/odi_5x6/*.fits"))
    assert sorted(f.name for f in files) == sorted(EXPECTED_OTAS)
    for path in files:
        solutions = podi_wcs.read_canned_wcs(path)
        assert len(solutions) == EXPECTED_OTAS[path.name], path.name
        # The skeleton has no PV cards: it becomes plain TAN, everything else TPV.
        projection = "TAN" if path.name == "wcs_5x6_skeleton.fits" else "TPV"
        for ota, canned in solutions.items():
            header = podi_wcs.ota_wcs_header(canned, 150.0, 30.0)
            assert header["CTYPE1"] == f"RA---{projection}", (path.name, ota)
            assert 0 <= header["CRVAL1"] < 360
            # Positive diagonals of ~0.11"/px in every real file (odi5x6_GAIA_level4
            # has the extremes, its PV terms absorb part of the scale).
            assert 2.8e-5 < header["CD1_1"] < 3.3e-5 and 2.8e-5 < header["CD2_2"] < 3.4e-5
            make_wcs(header)


def test_real_statistics_copied_as_strings(mastercals):
    canned = podi_wcs.read_canned_wcs(mastercals / "wcs/podi/2mass_distort5.fits")[33]
    header = podi_wcs.ota_wcs_header(canned, 150.0, 30.0)
    assert header["ASTIRMS1"] == "8.499436727E-05"
    assert header["ASTRRMS2"] == "1.187438334E-04"
    assert header["PV1_22"] == pytest.approx(-12.84147408)
    assert header["RADESYS"] == "ICRS" and "RADECSYS" not in header
    assert not any(key.startswith("WAT") for key in header)


@pytest.mark.parametrize("ra, dec", [(150.0, 30.0), (150.0, 60.0), (0.01, 10.0)])
def test_decisions1_pointing_falls_near_pixel_4200(mastercals, ra, dec):
    canned = podi_wcs.read_canned_wcs(mastercals / "wcs/podi/2mass_distort5.fits")[33]
    header = podi_wcs.ota_wcs_header(canned, ra, dec)
    wcs = make_wcs(header)
    separation = wcs.pixel_to_world(4200, 4200).separation(sky(ra, dec)).arcsec
    assert separation < 15
    x, y = wcs.world_to_pixel(sky(ra, dec))
    assert abs(x - 4152) < 4 and abs(y - 4132) < 4
    if ra < 1:
        expected = 360 + 0.01 - 0.06516842 / math.cos(math.radians(10 - 0.0645417))
        assert header["CRVAL1"] == pytest.approx(expected, abs=1e-7)

    # Adding the stored offset (the later original) is the same as flipping its sign:
    # the pointing moves by twice the offset, 0.13 deg along each axis (0.185 deg).
    flipped = canned.copy()
    flipped["CRVAL1"], flipped["CRVAL2"] = -canned["CRVAL1"], -canned["CRVAL2"]
    wrong = make_wcs(podi_wcs.ota_wcs_header(flipped, ra, dec))
    wrong_x, wrong_y = wrong.world_to_pixel(sky(ra, dec))
    assert (x - wrong_x) * canned["CD1_1"] == pytest.approx(0.130, abs=0.003)
    assert (y - wrong_y) * canned["CD2_2"] == pytest.approx(0.130, abs=0.003)
    separation = wrong.pixel_to_world(4200, 4200).separation(sky(ra, dec)).deg
    assert separation == pytest.approx(0.185, abs=0.003)


def test_crval1_minus_359_is_wrapped(mastercals):
    canned = podi_wcs.read_canned_wcs(mastercals / "wcs/odi_5x6" / LOOSE_FILE)[33]
    assert canned["CRVAL1"] == pytest.approx(-359.96394)
    header = podi_wcs.ota_wcs_header(canned, 150.0, 30.0)
    tangent = sky(header["CRVAL1"], header["CRVAL2"])
    # C1 wraps to +0.036 deg: the tangent point's RA is that close, not 360 deg off.
    ra_offset = abs(tangent.ra.deg - 150.0) * math.cos(math.radians(header["CRVAL2"]))
    assert ra_offset == pytest.approx(0.0360609, abs=1e-6)
    # The whole offset also holds C2 = 0.2128 deg, so the separation is ~0.216 deg.
    separation = tangent.separation(sky(150.0, 30.0)).deg
    assert separation == pytest.approx(math.hypot(0.0360609, 0.2127757), abs=2e-4)


def test_loose_file_follows_the_adding_convention(mastercals):
    # Unlike 2mass_distort5, this file was made for CRVAL = pointing + offset: with
    # the subtracting convention the pointing lands far off the optical axis, with the
    # sign flipped on it.
    canned = podi_wcs.read_canned_wcs(mastercals / "wcs/odi_5x6" / LOOSE_FILE)[33]
    x, y = make_wcs(podi_wcs.ota_wcs_header(canned, 150.0, 30.0)).world_to_pixel(sky(150, 30))
    assert abs(x - 6638) < 5 and abs(y - 18173) < 5
    flipped = canned.copy()
    flipped["CRVAL1"], flipped["CRVAL2"] = -canned["CRVAL1"], -canned["CRVAL2"]
    x, y = make_wcs(podi_wcs.ota_wcs_header(flipped, 150.0, 30.0)).world_to_pixel(sky(150, 30))
    assert abs(x - pd.OPTICAL_AXIS_OTA33[0]) < 10 and abs(y - pd.OPTICAL_AXIS_OTA33[1]) < 10


# --- Canned-file errors and options ----------------------------------------------------------

def write_mef(path, *extensions):
    fits.HDUList([fits.PrimaryHDU()] + list(extensions)).writeto(path)
    return path


def solution_hdu(name="OTA33.SCI", **cards):
    hdu = fits.ImageHDU(name=name)
    values = {"CRVAL1": 0.0, "CRVAL2": 0.0, "CRPIX1": 10.0, "CRPIX2": 20.0,
              "CD1_1": 3e-5, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 3e-5}
    values.update(cards)
    for key, value in values.items():
        if value is not None:
            hdu.header[key] = value
    return hdu


def test_read_canned_wcs_errors(tmp_path):
    text = tmp_path / "notfits.fits"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="notfits.fits: not a FITS file"):
        podi_wcs.read_canned_wcs(text)
    with pytest.raises(FileNotFoundError):
        podi_wcs.read_canned_wcs(tmp_path / "absent.fits")
    empty = write_mef(tmp_path / "empty.fits", solution_hdu(name="SKY"))
    with pytest.raises(ValueError, match="empty.fits: no OTA"):
        podi_wcs.read_canned_wcs(empty)
    nocrpix = write_mef(tmp_path / "nocrpix.fits",
                        solution_hdu(CRVAL1=None, CRPIX2=None, CD2_1=None))
    with pytest.raises(ValueError, match=r"nocrpix.fits, OTA33.SCI: missing CRVAL1, CRPIX2, CD2_1"):
        podi_wcs.read_canned_wcs(nocrpix)
    twice = write_mef(tmp_path / "twice.fits", solution_hdu(), solution_hdu(name="ota33.sci"))
    with pytest.raises(ValueError, match="OTA33.SCI appears twice"):
        podi_wcs.read_canned_wcs(twice)
    text_value = write_mef(tmp_path / "text.fits", solution_hdu(PV1_1="one"))
    with pytest.raises(ValueError, match="PV1_1 = 'one' is not a number"):
        podi_wcs.read_canned_wcs(text_value)


def test_extensions_in_any_order_and_other_names_ignored(tmp_path):
    path = write_mef(tmp_path / "mixed.fits", solution_hdu("OTA44.SCI", CRPIX1=-5.0),
                     fits.ImageHDU(name="CAT"), solution_hdu("OTA33.SCI"))
    solutions = podi_wcs.read_canned_wcs(path)
    assert sorted(solutions) == [33, 44]
    assert solutions[44]["CRPIX1"] == -5.0


def test_offset_simple_and_binning_cards():
    canned = podi_wcs.model_canned_wcs(pd.PODI)["OTA33.SCI"].header
    header = podi_wcs.ota_wcs_header(canned, 150.0, 30.0, binning=2, offset=(0.01, -0.02))
    assert (header["CRVAL1"], header["CRVAL2"]) == pytest.approx((150.01, 29.98), abs=1e-12)
    assert header["CRPIX1"] == pytest.approx(4157.0 / 2)
    assert header["CD2_2"] == pytest.approx(2 * pd.PIXEL_SCALE / 3600)
    simple = podi_wcs.ota_wcs_header(canned, 150.0, 30.0, simple=True)
    assert simple["CTYPE1"] == "RA---TAN" and not any(key.startswith("PV") for key in simple)
    make_wcs(simple)
    with pytest.raises(ValueError, match="binning"):
        podi_wcs.ota_wcs_header(canned, 150.0, 30.0, binning=0)


# --- The project's optical model -------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return podi_wcs.read_canned_wcs(podi_wcs.default_canned_wcs_file(pd.PODI, 56000.0))


def test_pointing_lands_on_optical_axis(model):
    wcs = make_wcs(podi_wcs.ota_wcs_header(model[33], 150.0, 30.0))
    x, y = wcs.world_to_pixel(sky(150.0, 30.0))
    assert x == pytest.approx(pd.OPTICAL_AXIS_OTA33[0], abs=1e-6)
    assert y == pytest.approx(pd.OPTICAL_AXIS_OTA33[1], abs=1e-6)


def test_pixel_scale_at_axis(model):
    wcs = make_wcs(podi_wcs.ota_wcs_header(model[33], 150.0, 30.0))
    x0, y0 = pd.OPTICAL_AXIS_OTA33
    along_x = wcs.pixel_to_world(x0 - 1, y0).separation(wcs.pixel_to_world(x0 + 1, y0)).arcsec / 2
    along_y = wcs.pixel_to_world(x0, y0 - 1).separation(wcs.pixel_to_world(x0, y0 + 1)).arcsec / 2
    assert along_x == pytest.approx(pd.PIXEL_SCALE, abs=1e-6)
    assert along_y == pytest.approx(pd.PIXEL_SCALE, abs=1e-6)
    # Mirror image like the real files: RA and Dec both grow with pixel index.
    assert wcs.pixel_to_world(x0 + 100, y0).ra.deg > 150.0
    assert wcs.pixel_to_world(x0, y0 + 100).dec.deg > 30.0


@pytest.mark.parametrize("x_deg, y_deg", [(0.5, 0.0), (0.0, -0.5), (0.3, 0.4), (-0.4, 0.3)])
def test_model_is_radial_k_r3(model, x_deg, y_deg):
    # Points at r' = 0.5 deg (intermediate coordinates); the asymmetric ones catch a
    # wrong TPV axis-2 argument order.
    wcs = make_wcs(podi_wcs.ota_wcs_header(model[33], 150.0, 30.0))
    scale = pd.PIXEL_SCALE / 3600
    x0, y0 = pd.OPTICAL_AXIS_OTA33
    coord = wcs.pixel_to_world(x0 + x_deg / scale, y0 + y_deg / scale)
    xi, eta = podi_sphere.project(coord.ra.deg, coord.dec.deg, 150.0, 30.0)
    r = math.hypot(x_deg, y_deg)
    displacement = math.hypot(xi, eta) - r
    assert displacement == pytest.approx(pd.DISTORTION_K3 * r ** 3, abs=1e-9)
    assert displacement == pytest.approx(-3.125e-3, abs=1e-9)
    assert xi == pytest.approx(x_deg * (1 + pd.DISTORTION_K3 * r ** 2), abs=1e-9)
    assert eta == pytest.approx(y_deg * (1 + pd.DISTORTION_K3 * r ** 2), abs=1e-9)


def test_binning_2_is_a_quarter_pixel_low(model):
    unbinned = make_wcs(podi_wcs.ota_wcs_header(model[33], 150.0, 30.0))
    binned = make_wcs(podi_wcs.ota_wcs_header(model[33], 150.0, 30.0, binning=2))
    p = np.array([1000.3, 3000.7])
    q = np.array(binned.world_to_pixel(unbinned.pixel_to_world(*p)), dtype=float)
    exact = (p + 0.5) / 2 - 0.5
    assert np.all(np.abs(q - exact) < 0.3)
    # CRPIX / b puts unbinned 0-based p at p / b + 1 / b - 1: 0.5 / b - 0.5 below exact.
    assert q == pytest.approx(exact - 0.25, abs=1e-6)


@pytest.mark.parametrize("ota", [34, 43, 44])
def test_neighbour_origins_match_focal_plane(model, ota):
    wcs33 = make_wcs(podi_wcs.ota_wcs_header(model[33], 150.0, 30.0))
    wcs = make_wcs(podi_wcs.ota_wcs_header(model[ota], 150.0, 30.0))
    x, y = wcs33.world_to_pixel(wcs.pixel_to_world(0, 0))
    origin, origin33 = pd.ota_origin_in_focal_plane(ota), pd.ota_origin_in_focal_plane(33)
    assert x == pytest.approx(origin[0] - origin33[0], abs=1e-6)
    assert y == pytest.approx(origin[1] - origin33[1], abs=1e-6)
    assert (x, y) == pytest.approx({34: (0, 4330), 43: (4216, 0), 44: (4216, 4330)}[ota], abs=1e-6)


@pytest.mark.parametrize("layout", [pd.PODI, pd.ODI_5X6])
def test_shipped_model_files_match_definitions(layout):
    path = podi_wcs.default_canned_wcs_file(layout, 60000.0)
    assert path.name == podi_wcs.MODEL_FILENAMES[layout.name]
    with fits.open(path) as hdus:
        assert hdus[0].header["LAYOUT"] == layout.name
        assert hdus[0].header["PIXSCALE"] == pd.PIXEL_SCALE
        assert hdus[0].header["DISTK3"] == pd.DISTORTION_K3
    shipped = podi_wcs.read_canned_wcs(path)
    assert sorted(shipped) == sorted(layout.otas)
    fresh = podi_wcs.model_canned_wcs(layout)
    for ota, header in shipped.items():
        expected = fresh[pd.ota_extname(ota)].header
        for key in ["CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD2_2"] + [
                f"PV{axis}_{term}" for axis in (1, 2) for term in range(11)]:
            assert header[key] == pytest.approx(expected[key], rel=1e-14, abs=1e-20), (ota, key)


def test_default_file_follows_history():
    newest = podi_wcs.default_canned_wcs_file(pd.ODI_5X6)
    assert newest == podi_wcs.default_canned_wcs_file(pd.ODI_5X6, 0.0)
    assert newest.name == "odi5x6_model.fits" and newest.is_file()
    with pytest.raises(ValueError, match="no entry valid at MJD -1"):
        podi_wcs.default_canned_wcs_file(pd.PODI, -1.0)
