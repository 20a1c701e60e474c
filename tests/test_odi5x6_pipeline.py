"""The ODI 5x6 focal plane (from 2015) through the whole program with -photcalib."""

import numpy as np
import pytest
from astropy.io import fits

from conftest import refcat_of, run_collectcells, small_spec, true_star_offsets
from podi_definitions import ODI_5X6
from podi_simulate import simulate_exposure, write_true_calibrations

#: Two OTAs of the flat-normalisation set and two outer ones of the wider 5x6 plane.
OTAS = (22, 33, 35, 53)
MJD_5X6 = 57500.2


@pytest.fixture(scope="module")
def odi5x6_frame(tmp_path_factory):
    root = tmp_path_factory.mktemp("odi5x6")
    spec = small_spec(layout="odi_5x6", otas=OTAS, seed=70, mjd=MJD_5X6,
                      pointing_error=(60.0, -40.0), rotator_error=0.5)
    exposure = simulate_exposure(spec, root / "raw", ncpus=2)
    write_true_calibrations(small_spec(layout="odi_5x6", otas=OTAS, mjd=MJD_5X6), root / "cals")
    output = root / "out.fits"
    assert run_collectcells(exposure, output, f"-cals={root / 'cals'}", "-photcalib", "-noqaplots",
                            f"-refcat={refcat_of(exposure)}") == 0
    return exposure, output


def test_odi5x6_frame_is_calibrated(odi5x6_frame):
    exposure, output = odi5x6_frame
    truth = fits.getheader(exposure.parent / f"{exposure.name}.truth.fits")
    with fits.open(output, checksum=True) as hdus:
        primary = hdus[0].header
        # The 5x6 plane's own inside-out order.
        order = [f"OTA{ota}.SCI" for ota in ODI_5X6.output_order if ota in OTAS]
        assert [hdu.name for hdu in hdus if hdu.name.endswith(".SCI")] == order
        assert primary["WCSCAL"] is True and primary["WCS_RMS"] < 0.05
        offsets = true_star_offsets(exposure, hdus, OTAS)
        assert np.sqrt(np.mean(offsets**2)) < 0.05
    assert primary["SKYLEVEL"] == pytest.approx(truth["SKY_ADU"], rel=0.002)
    assert primary["SEEING"] == pytest.approx(truth["FWHM"], rel=0.05)
    assert primary["PHOTZP"] == pytest.approx(truth["PHOTZP3"], abs=0.01)
    assert primary["PHOTZP"] + primary["APCORR"] == pytest.approx(truth["PHOTZPT"], abs=0.01)
