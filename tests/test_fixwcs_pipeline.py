"""-fixwcs through the whole program on simulated pixels, against the true WCS."""

import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from podi_simulate import simulate_exposure, write_true_calibrations
from conftest import run_collectcells, small_spec

WCS_OTAS = (33, 34, 43, 44)

#: (pointing error dRA cos(dec), dDec in arcsec; rotator error in degrees)
FIELDS = [((45.0, -30.0), 0.4), ((150.0, 60.0), -1.0), ((-240.0, 180.0), 1.5)]


@pytest.fixture(scope="session")
def wcs_fields(tmp_path_factory):
    """Three simulated fields with pointing and rotator errors, and their masters."""
    root = tmp_path_factory.mktemp("wcsfields")
    fields = []
    for i, (error, rotation) in enumerate(FIELDS):
        spec = small_spec(otas=WCS_OTAS, seed=40 + i, ra=150.0 + 3 * i, dec=30.0 + 10 * i,
                          pointing_error=error, rotator_error=rotation)
        fields.append(simulate_exposure(spec, root / f"field{i}", ncpus=2))
    write_true_calibrations(small_spec(otas=WCS_OTAS), root / "cals")
    return fields, root / "cals"


def _refcat(exposure):
    return exposure.parent / f"{exposure.name}.refcat.fits"


def _true_offsets(exposure, hdus):
    """Distance (arcsec) between true star pixels and where the output WCS puts them."""
    stars = Table(fits.getdata(exposure.parent / f"{exposure.name}.truth.fits", "STARS"))
    offsets = []
    for ota in WCS_OTAS:
        mine = stars[(stars["ota"] == ota) & (stars["x"] > 0) & (stars["x"] < 2048)
                     & (stars["y"] > 0) & (stars["y"] < 2048)]
        x, y = WCS(hdus[f"OTA{ota}.SCI"].header).all_world2pix(mine["ra"], mine["dec"], 0)
        offsets.append(np.hypot(x - mine["x"], y - mine["y"]) * 0.1126 * 2)
    return np.concatenate(offsets)


@pytest.mark.parametrize("field", range(len(FIELDS)))
def test_fixwcs_recovers_the_true_wcs(wcs_fields, field, tmp_path):
    exposures, cals = wcs_fields
    exposure = exposures[field]
    output = tmp_path / "out.fits"
    # Without -fixwcs the pointing and rotator errors put stars arcseconds off.
    assert run_collectcells(exposure, tmp_path / "canned.fits", f"-cals={cals}") == 0
    with fits.open(tmp_path / "canned.fits") as hdus:
        assert np.median(_true_offsets(exposure, hdus)) > 5.0
    assert run_collectcells(exposure, output, f"-cals={cals}", "-fixwcs",
                            f"-refcat={_refcat(exposure)}") == 0
    with fits.open(output, checksum=True) as hdus:
        primary = hdus[0].header
        assert primary["WCSCAL"] is True and primary["WCS_QUAL"] > 4
        offsets = _true_offsets(exposure, hdus)
        assert np.sqrt(np.mean(offsets**2)) < 0.05
        assert primary["WCS_RMS"] < 0.05 and primary["WCS_NSRC"] > 30
        assert primary["ASTRMCAT"] == _refcat(exposure).name
        assert primary["SEEING"] == pytest.approx(1.0, rel=0.05)   # the simulator's FWHM
        assert primary["SEEING_N"] > 100
        assert all(hdu.verify_checksum() == 1 for hdu in hdus)
        catalog = Table(hdus["CAT.ODI"].data)
        assert {"RA", "DEC", "XWIN", "YWIN", "FWHM_IMAGE", "FLAGS", "OTA"} <= set(catalog.colnames)
        assert len(hdus["WCSCAL.CAT"].data) == primary["WCS_NSRC"]
        assert len(hdus["CAT.WCSREF"].data) > 100


def test_catalog_of_another_field_keeps_the_canned_wcs(wcs_fields, tmp_path, caplog):
    exposures, cals = wcs_fields
    elsewhere = Table.read(_refcat(exposures[0]))
    elsewhere["dec"] += 0.5  # the same stars half a degree north: no match
    refcat = tmp_path / "elsewhere.fits"
    elsewhere.write(refcat)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposures[0], output, f"-cals={cals}", "-fixwcs", f"-refcat={refcat}") == 0
    assert "WCSCAL = F" in caplog.text
    with fits.open(output) as hdus:
        assert hdus[0].header["WCSCAL"] is False
        assert hdus["OTA33.SCI"].header["CTYPE1"] == "RA---TPV"


def test_fixwcs_without_a_catalog_stops(wcs_fields, tmp_path, monkeypatch, capsys):
    exposures, cals = wcs_fields
    monkeypatch.delenv("PODI_REFCAT", raising=False)
    output = tmp_path / "out.fits"
    assert run_collectcells(exposures[0], output, f"-cals={cals}", "-fixwcs") == 1
    assert "no reference catalog configured" in capsys.readouterr().err
    assert not output.exists()


SOURCE_EXTRACTOR = shutil.which("source-extractor") or shutil.which("sex")


@pytest.mark.skipif(SOURCE_EXTRACTOR is None, reason="source-extractor is not installed")
def test_source_extractor_reads_our_wcs(wcs_fields, tmp_path):
    """SExtractor, run on a -prep4sex output, puts the stars at their true RA/Dec."""
    exposures, cals = wcs_fields
    exposure = exposures[0]
    output = tmp_path / "sex.fits"
    assert run_collectcells(exposure, output, f"-cals={cals}", "-fixwcs", "-prep4sex",
                            f"-refcat={_refcat(exposure)}") == 0
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
