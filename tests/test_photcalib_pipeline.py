"""-photcalib through the whole program on simulated pixels, against the truth.

The star fields are those of the astrometry tests (``conftest.star_fields``), reduced
once per session with -fitradialZP (which turns on -photcalib and -fixwcs).
"""

import math
import re

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

import podi_findstars
import podi_wcs
from conftest import STAR_FIELD_ERRORS, STAR_FIELD_OTAS, refcat_of, run_collectcells, small_spec
from podi_simulate import simulate_exposure


def truth_of(exposure):
    return fits.getheader(exposure.parent / f"{exposure.name}.truth.fits")


def median_pixel_scale(hdus):
    """Median over the OTAs of the local pixel scale (arcsec/px) at their centres."""
    return float(np.median([podi_wcs.local_pixel_scale(WCS(hdu.header), hdu.data.shape[1] / 2,
                                                       hdu.data.shape[0] / 2)
                            for hdu in hdus if hdu.name.endswith(".SCI")]))


@pytest.mark.parametrize("field", range(len(STAR_FIELD_ERRORS)))
def test_zero_point_sky_and_depth_match_the_truth(calibrated_fields, field):
    exposure, output, _ = calibrated_fields[field]
    truth = truth_of(exposure)
    with fits.open(output) as hdus:
        primary = hdus[0].header
        scale = median_pixel_scale(hdus)
        photcalib = Table(hdus["CAT.PHOTCALIB"].data)
        photcalib_header = hdus["CAT.PHOTCALIB"].header
    assert primary["PHOTCAL"] is True and primary["PHOTZP_N"] >= 20
    # PHOTZP is the 3" aperture zero point, APCORR takes it to total flux.
    assert primary["PHOTZP"] == pytest.approx(truth["PHOTZP3"], abs=0.01)
    assert primary["PHOTZP"] + primary["APCORR"] == pytest.approx(truth["PHOTZPT"], abs=0.01)
    assert primary["APCORR_N"] >= 5 and 0 < primary["APCORRER"] < 0.02
    assert primary["PHOTZP_X"] == pytest.approx(primary["PHOTZP"] + 2.5 * math.log10(truth["EXPTIME"]),
                                                abs=1e-4)
    assert primary["MAGZERO"] == primary["PHOTZP"] and primary["MAGZERR"] == primary["PHOTZPER"]
    assert primary["MAGZ_AM1"] == pytest.approx(primary["PHOTZP"] + (primary["AIRMASS"] - 1) * 0.12,
                                                abs=1e-4)
    assert primary["PHOTZP_N"] <= primary["PHOTZPN0"] == len(photcalib)
    assert photcalib["ZP_USED"].sum() == primary["PHOTZP_N"]
    assert photcalib_header["EXPTIME"] == truth["EXPTIME"] and photcalib_header["FILTER"] == "odi_r"

    assert primary["SKYLEVEL"] == pytest.approx(truth["SKY_ADU"], rel=0.002)
    assert primary["SEEING"] == pytest.approx(truth["FWHM"], rel=0.05)
    assert primary["PSFFWHM"] == pytest.approx(truth["FWHM"], rel=0.03)
    # beta is the fit's least constrained parameter: 0.3 covers the three fields' samples
    # of bright isolated stars (FWHM and aperture correction above are held to 3 % and 0.01 mag).
    assert primary["PSFBETA"] == pytest.approx(truth["MOFFBETA"], abs=0.3) and primary["PSF_N"] >= 20
    # The sky is extended: its surface brightness uses the total-flux zero point.
    exposure_zp = truth["PHOTZPT"] + 2.5 * math.log10(truth["EXPTIME"])
    true_skymag = exposure_zp - 2.5 * math.log10(truth["SKY_ADU"] / scale**2)
    assert primary["SKYMAG"] == pytest.approx(true_skymag, abs=0.015)
    # PHOTDPTH: a point source of that magnitude has S/N 5 in an aperture of radius
    # FWHM, whose noise is the measured pixel noise over the aperture's area.
    depth_flux = 10 ** (-0.4 * (primary["PHOTDPTH"] - primary["PHOTZP_X"] - primary["APCORR"]))
    in_aperture = depth_flux * podi_findstars.moffat_enclosed(1.0, 1.0, primary["PSFBETA"])
    noise = primary["SKYNOISE"] * math.sqrt(math.pi) * primary["SEEING"] / scale
    assert in_aperture / noise == pytest.approx(5.0, rel=1e-3)
    # No radial gradient in the simulator: the fit finds none.
    assert primary["RADZPFIT"] is True
    assert abs(primary["RADZP_P1"]) < 3 * primary["RADZP_E1"] + 0.01


def test_aperture_fluxes_match_the_truth(calibrated_fields):
    """Isolated, unflagged stars: 3" aperture flux = true flux x the Moffat PSF's 3"
    fraction, within the reported errors."""
    ratios, pulls = [], []
    for exposure, output, _ in calibrated_fields:
        truth = truth_of(exposure)
        stars = Table(fits.getdata(exposure.parent / f"{exposure.name}.truth.fits", "STARS"))
        with fits.open(output) as hdus:
            catalog = Table(hdus["CAT.ODI"].data)
            zeropoint = hdus["CAT.ODI"].header["MAGZP"]
            saturate = hdus[0].header["SATURATE"]
        assert hdus["CAT.ODI"].header["MAGCALIB"] is True
        for ota in np.unique(catalog["OTA"]):
            mine = catalog[(catalog["OTA"] == ota) & (catalog["FLAGS"] == 0)]
            true = stars[stars["ota"] == ota]
            positions = np.c_[true["x"] + 1, true["y"] + 1]
            # Isolated: no other star within 20 binned pixels (4.5") brighter than 5 mag
            # below it.
            tree = cKDTree(positions)
            isolated = np.array([not any(j != i and true["mag"][j] < true["mag"][i] + 5
                                         for j in tree.query_ball_point(p, 20))
                                 for i, p in enumerate(positions)])
            distance, index = tree.query(np.c_[mine["XWIN"], mine["YWIN"]])
            use = (distance < 0.5) & isolated[index] & (mine["FLUX_MAX"] < 0.5 * saturate)
            flux = 10 ** (-0.4 * (mine["MAG_D30"][use] - zeropoint))
            error = flux * mine["MAGERR_D30"][use] / 1.0857
            expected = true["flux_e"][index[use]] * truth["FLATNRMA"] * truth["APFRAC3"]
            good = flux / error > 20
            ratios.append((flux / expected)[good])
            pulls.append(((flux - expected) / error)[good])
    ratios, pulls = np.concatenate(ratios), np.concatenate(pulls)
    assert len(ratios) > 100
    assert np.median(ratios) == pytest.approx(1.0, abs=0.005)
    robust_sigma = 1.4826 * np.median(np.abs(pulls - np.median(pulls)))
    assert 0.7 < robust_sigma < 1.4


def test_calibrated_catalog_magnitudes(calibrated_fields):
    """CAT.ODI MAG_D30 = instrumental + PHOTZP_X + APCORR: for stars the true magnitude
    plus the 3" aperture loss."""
    exposure, output, _ = calibrated_fields[0]
    truth = truth_of(exposure)
    with fits.open(output) as hdus:
        catalog = Table(hdus["CAT.ODI"].data)
        primary = hdus[0].header
        assert hdus["CAT.ODI"].header["MAGZP"] == pytest.approx(primary["PHOTZP_X"] + primary["APCORR"],
                                                                abs=1e-5)
        photcalib = Table(hdus["CAT.PHOTCALIB"].data)
    used = photcalib[photcalib["ZP_USED"]]
    rows = cKDTree(np.c_[catalog["RA"], catalog["DEC"]]).query(np.c_[used["ODI_RA"], used["ODI_DEC"]])[1]
    offset = catalog["MAG_D30"][rows] - used["REF_MAG_R"]
    assert np.median(offset) == pytest.approx(-2.5 * math.log10(truth["APFRAC3"]), abs=0.01)


def test_summary_line(calibrated_fields):
    _, output, printed = calibrated_fields[0]
    with fits.open(output) as hdus:
        primary = hdus[0].header
    line = printed.splitlines()[-1]
    assert re.fullmatch(
        rf"o\S+: 4 OTAs reduced, 0 failed, seeing {primary['SEEING']:.2f}\", "
        rf"ZP {primary['PHOTZP']:.4f}\+-{primary['PHOTZPER']:.4f}, sky {primary['SKYMAG']:.2f} "
        rf"mag/arcsec2, depth {primary['PHOTDPTH']:.2f} \(5 sigma\), WCS rms "
        rf"{primary['WCS_RMS']:.3f}\", \d+\.\d s -> {re.escape(str(output))}", line)


def test_catalog_without_the_band_gives_no_zero_point(star_fields, tmp_path, caplog):
    exposures, cals = star_fields
    reference = Table.read(refcat_of(exposures[1]))
    reference.remove_columns(["r", "r_err"])
    refcat = tmp_path / "no_r.fits"
    reference.write(refcat)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposures[1], output, f"-cals={cals}", "-photcalib", "-noqaplots",
                            f"-refcat={refcat}") == 0
    assert "reference catalog has no r magnitudes" in caplog.text
    with fits.open(output) as hdus:
        primary = hdus[0].header
        assert primary["WCSCAL"] is True and primary["PHOTCAL"] is False
        assert primary["PHOTMSG"] == "reference catalog has no r magnitudes"
        assert not {"PHOTZP", "MAGZERO", "APCORR", "SKYMAG", "PHOTDPTH"} & set(primary)
        assert hdus["CAT.ODI"].header["MAGCALIB"] is False
        assert len(hdus["CAT.PHOTCALIB"].data) == 0


@pytest.mark.parametrize("beta, fwhm", [(2.5, 1.3), (4.5, 0.8)])
def test_seeing_and_aperture_correction_follow_the_profile(star_fields, tmp_path, beta, fwhm):
    """Other Moffat profiles than the beta = 3.5 the FWHMs are first measured with: the
    PSF fit recovers beta, SEEING stays within 5 % and the aperture correction takes the
    3" zero point to the total-flux truth."""
    _, cals = star_fields
    spec = small_spec(otas=STAR_FIELD_OTAS, seed=60, moffat_beta=beta, fwhm=fwhm)
    exposure = simulate_exposure(spec, tmp_path / "raw", ncpus=2)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposure, output, f"-cals={cals}", "-photcalib", "-noqaplots",
                            f"-refcat={refcat_of(exposure)}") == 0
    truth = truth_of(exposure)
    primary = fits.getheader(output)
    assert primary["PSFBETA"] == pytest.approx(beta, rel=0.1)
    assert primary["SEEING"] == pytest.approx(fwhm, rel=0.05)
    assert primary["PHOTZP"] == pytest.approx(truth["PHOTZP3"], abs=0.01)
    assert primary["PHOTZP"] + primary["APCORR"] == pytest.approx(truth["PHOTZPT"], abs=0.01)


def test_catalog_columns_carry_units(calibrated_fields):
    """TOPCAT and astropy read the units of every table column from TUNITn."""
    _, output, _ = calibrated_fields[0]
    catalog = Table.read(output, hdu="CAT.ODI")
    assert (catalog["RA"].unit, catalog["XWIN"].unit, catalog["MAG_D30"].unit) == ("deg", "pix", "mag")
    assert catalog["FWHM_WORLD"].unit == "deg" and catalog["FLUX"].unit == "adu"
    assert catalog["FLAGS"].unit is None
    photcalib = Table.read(output, hdu="CAT.PHOTCALIB")
    assert (photcalib["ODI_RA"].unit, photcalib["ZP"].unit, photcalib["REF_MAG_R"].unit) == ("deg", "mag", "mag")
    matches = Table.read(output, hdu="WCSCAL.CAT")
    assert (matches["REF_DEC"].unit, matches["D_RA"].unit) == ("deg", "arcsec")
    assert Table.read(output, hdu="CAT.WCSREF")["RA"].unit == "deg"


def test_electron_frames_write_catalogs_without_unit_warnings(star_fields, tmp_path, recwarn):
    """FITS has no unit for electrons: with -gain the flux columns carry none, and
    writing the catalogs warns about nothing."""
    exposures, cals = star_fields
    output = tmp_path / "electrons.fits"
    assert run_collectcells(exposures[2], output, f"-cals={cals}", "-gain", "-fixwcs", "-noqaplots",
                            f"-refcat={refcat_of(exposures[2])}") == 0
    assert not [w for w in recwarn if "unit" in str(w.message).lower()]
    assert fits.getheader(output)["BUNIT"] == "electron"
    catalog = Table.read(output, hdu="CAT.ODI")
    assert catalog["FLUX"].unit is None and catalog["MAG_D30"].unit == "mag"


def test_colour_terms_shift_each_star_by_its_colour(tmp_path):
    """-colourterms on an odi_g frame: each calibration star's reference magnitude becomes
    g - 0.16 (g - r), so its zero point moves by -0.16 (g - r) of its catalog colour
    (found here by position in the simulator's catalog), and the frame's with them."""
    from podi_simulate import write_true_calibrations
    spec = small_spec(otas=(33,), seed=61, filter="odi_g")
    exposure = simulate_exposure(spec, tmp_path / "raw", ncpus=2)
    write_true_calibrations(spec, tmp_path / "cals")
    runs = {}
    for name, flags in (("plain", ()), ("colour", ("-colourterms",))):
        output = tmp_path / f"{name}.fits"
        assert run_collectcells(exposure, output, f"-cals={tmp_path / 'cals'}", "-photcalib", "-noqaplots",
                                f"-refcat={refcat_of(exposure)}", *flags) == 0
        with fits.open(output) as hdus:
            runs[name] = (hdus[0].header, Table(hdus["CAT.PHOTCALIB"].data))
    (plain, plain_stars), (colour, colour_stars) = runs["plain"], runs["colour"]
    assert (colour["MAGZ_CT"], colour["MAGZ_COL"]) == (0.16, "g-r")
    assert (plain["MAGZ_CT"], plain["MAGZ_COL"]) == (0.0, "none")
    catalog = Table.read(refcat_of(exposure))
    tree = cKDTree(np.column_stack([catalog["ra"], catalog["dec"]]))
    _, nearest = tree.query(np.column_stack([colour_stars["ODI_RA"], colour_stars["ODI_DEC"]]))
    g_r = np.asarray(catalog["g"] - catalog["r"])[nearest]
    np.testing.assert_allclose(np.asarray(colour_stars["ZP"]) - np.asarray(plain_stars["ZP"]), -0.16 * g_r,
                               atol=1e-4)
    # The frame's zero point moves with its stars (to 0.02 mag: the colours widen the
    # scatter, so the clipping keeps a few other stars).
    used = np.asarray(colour_stars["ZP_USED"], bool)
    assert colour["PHOTZP"] - plain["PHOTZP"] == pytest.approx(np.median(-0.16 * g_r[used]), abs=0.02)
