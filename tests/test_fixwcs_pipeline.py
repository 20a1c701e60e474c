"""-fixwcs through the whole program on simulated pixels, against the true WCS."""

import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from conftest import (STAR_FIELD_ERRORS, STAR_FIELD_OTAS as WCS_OTAS, refcat_of, run_collectcells,
                      true_star_offsets)


@pytest.mark.parametrize("field", range(len(STAR_FIELD_ERRORS)))
def test_fixwcs_recovers_the_true_wcs(star_fields, calibrated_fields, field, tmp_path):
    exposures, cals = star_fields
    exposure, output, _ = calibrated_fields[field]
    # Without -fixwcs the pointing and rotator errors put stars arcseconds off.
    assert run_collectcells(exposure, tmp_path / "canned.fits", f"-cals={cals}") == 0
    with fits.open(tmp_path / "canned.fits") as hdus:
        assert np.median(true_star_offsets(exposure, hdus, WCS_OTAS)) > 5.0
    with fits.open(output, checksum=True) as hdus:
        primary = hdus[0].header
        assert primary["WCSCAL"] is True and primary["WCS_QUAL"] > 4
        offsets = true_star_offsets(exposure, hdus, WCS_OTAS)
        assert np.sqrt(np.mean(offsets**2)) < 0.05
        assert primary["WCS_RMS"] < 0.05 and primary["WCS_NSRC"] > 30
        assert primary["ASTRMCAT"] == refcat_of(exposure).name
        assert primary["SEEING"] == pytest.approx(1.0, rel=0.05)   # the simulator's FWHM
        assert primary["SEEING_N"] > 100
        assert all(hdu.verify_checksum() == 1 for hdu in hdus)
        catalog = Table(hdus["CAT.ODI"].data)
        assert {"RA", "DEC", "XWIN", "YWIN", "FWHM_IMAGE", "FLAGS", "OTA"} <= set(catalog.colnames)
        assert len(hdus["WCSCAL.CAT"].data) == primary["WCS_NSRC"]
        assert len(hdus["CAT.WCSREF"].data) > 100


def test_catalog_of_another_field_keeps_the_canned_wcs_and_no_zero_point(star_fields, tmp_path, caplog):
    exposures, cals = star_fields
    elsewhere = Table.read(refcat_of(exposures[0]))
    elsewhere["dec"] += 0.5  # the same stars half a degree north: no match
    refcat = tmp_path / "elsewhere.fits"
    elsewhere.write(refcat)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposures[0], output, f"-cals={cals}", "-photcalib", f"-refcat={refcat}") == 0
    assert "WCSCAL = F" in caplog.text
    assert "no zero point without a calibrated WCS" in caplog.text
    with fits.open(output) as hdus:
        primary = hdus[0].header
        assert primary["WCSCAL"] is False
        assert primary["PHOTCAL"] is False and primary["PHOTMSG"] == "WCS not calibrated"
        assert "PHOTZP" not in primary and "CAT.PHOTCALIB" not in hdus
        assert hdus["CAT.ODI"].header["MAGCALIB"] is False
        assert hdus["OTA33.SCI"].header["CTYPE1"] == "RA---TPV"


def test_fixwcs_without_a_catalog_stops(star_fields, tmp_path, monkeypatch, capsys):
    exposures, cals = star_fields
    monkeypatch.delenv("PODI_REFCAT", raising=False)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposures[0], output, f"-cals={cals}", "-fixwcs") == 1
    assert "no reference catalog configured" in capsys.readouterr().err
    assert not output.exists()


SOURCE_EXTRACTOR = shutil.which("source-extractor") or shutil.which("sex")


@pytest.mark.skipif(SOURCE_EXTRACTOR is None, reason="source-extractor is not installed")
def test_source_extractor_reads_our_wcs(star_fields, tmp_path):
    """SExtractor, run on a -prep4sex output, puts the stars at their true RA/Dec."""
    exposures, cals = star_fields
    exposure = exposures[0]
    output = tmp_path / "sex.fits"
    assert run_collectcells(exposure, output, f"-cals={cals}", "-fixwcs", "-prep4sex", "-noqaplots",
                            f"-refcat={refcat_of(exposure)}") == 0
    params = tmp_path / "sex.param"
    params.write_text("XWIN_IMAGE\nYWIN_IMAGE\nALPHAWIN_J2000\nDELTAWIN_J2000\nFLAGS\nSNR_WIN\n")
    config = tmp_path / "empty.sex"
    config.write_text("")
    catalog = tmp_path / "sex.cat.fits"
    with fits.open(output) as hdus:
        index = hdus.index_of("OTA33.SCI")
    subprocess.run([SOURCE_EXTRACTOR, f"{output}[{index}]", "-c", str(config),
                    "-PARAMETERS_NAME", str(params), "-CATALOG_NAME", str(catalog),
                    "-CATALOG_TYPE", "FITS_1.0", "-FILTER", "N", "-DETECT_THRESH", "10",
                    "-VERBOSE_TYPE", "QUIET"], check=True, cwd=tmp_path, timeout=120)
    found = Table.read(catalog, hdu=1)
    found = found[(found["FLAGS"] == 0) & (found["SNR_WIN"] > 30)]
    stars = Table(fits.getdata(exposure.parent / f"{exposure.name}.truth.fits", "STARS"))
    stars = stars[stars["ota"] == 33]
    separations = []
    for row in found:
        distance = np.hypot(stars["x"] + 1 - row["XWIN_IMAGE"], stars["y"] + 1 - row["YWIN_IMAGE"])
        nearest = np.argmin(distance)
        if distance[nearest] < 0.5:
            true = stars[nearest]
            d_ra = (row["ALPHAWIN_J2000"] - true["ra"]) * np.cos(np.radians(true["dec"]))
            separations.append(np.hypot(d_ra, row["DELTAWIN_J2000"] - true["dec"]) * 3600)
    assert len(separations) > 20
    assert np.max(separations) < 0.1
