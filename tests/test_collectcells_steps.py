"""Crosstalk, nonlinearity, gain and the options of podi_collectcells."""

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from podi_definitions import PODI, cell_to_ota
from podi_rawdata import find_exposure, open_raw_ota
from podi_simulate import Effects, Instrument, simulate_exposure, true_ota_wcs, write_true_calibrations
from conftest import OBJECT_SPEC, run_collectcells, small_spec


def _sky_position(spec, ota, x, y):
    ra, dec = WCS(true_ota_wcs(spec, ota)).all_pix2world([x], [y], 0)
    return float(ra[0]), float(dec[0])


def _reduce(exposure, output, *flags):
    assert run_collectcells(exposure, output, *flags) == 0
    with fits.open(output) as hdus:
        return hdus[1].data.astype(np.float64)


@pytest.fixture(scope="module")
def saturated_star(tmp_path_factory):
    """One OTA with a saturated star in the middle of cell (3, 4), with and without crosstalk."""
    root = tmp_path_factory.mktemp("xtalk")
    ys, xs = cell_to_ota(3, 4, 2)
    spec = small_spec(otas=(33,), seed=11, star_density=500)
    star = _sky_position(spec, 33, (xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2)
    spec = dataclasses.replace(spec, extra_stars=(star + (11.0,),))
    return spec, root


def _ghost_footprint(exposure):
    """OTA pixels of the other cells of row 4 that sit where the source cell is saturated."""
    with open_raw_ota(find_exposure(exposure).ota_files[33]) as raw:
        saturated = raw.cells()[4, 3, :247, :240] >= 65535
    assert saturated.sum() > 100
    rows, cols = np.nonzero(saturated)
    footprint = []
    for cx in (0, 1, 2, 4, 5, 6, 7):
        ys, xs = cell_to_ota(cx, 4, 2)
        footprint.append((rows + ys.start, cols + xs.start))
    return tuple(np.concatenate(axis) for axis in zip(*footprint))


@pytest.mark.parametrize("matrix", ["default", "real"])
def test_crosstalk_ghosts_of_a_saturated_star_are_removed(saturated_star, mastercals, matrix, tmp_path):
    spec, root = saturated_star
    flags = []
    if matrix == "real":
        real = mastercals / "crosstalk" / "podi" / "crosstalk_odi_5x6.fits"
        spec = dataclasses.replace(spec, crosstalk_file=str(real))
        flags = [f"-crosstalk={real}"]
    with_xtalk = simulate_exposure(dataclasses.replace(spec, sequence=1), root / matrix, ncpus=1)
    clean_spec = dataclasses.replace(spec, sequence=2, effects=Effects(nonlinearity=False, crosstalk=False))
    without = simulate_exposure(clean_spec, root / matrix, ncpus=1)
    footprint = _ghost_footprint(with_xtalk)
    truth = _reduce(without, tmp_path / "clean.fits", "-crosstalk=none")
    corrected = _reduce(with_xtalk, tmp_path / "corrected.fits", *flags)
    uncorrected = _reduce(with_xtalk, tmp_path / "uncorrected.fits", "-crosstalk=none")
    ghost = np.mean(uncorrected[footprint] - truth[footprint])
    assert ghost > 2.0                      # the ghost is there without the correction
    assert abs(np.mean(corrected[footprint] - truth[footprint])) < 1.0


def test_nonlinearity_corrected_fluxes_are_linear(tmp_path):
    """Pixels up to 50 000 ADU agree with a linear detector to 0.2 % after the correction."""
    spec = small_spec(otas=(34,), seed=12, star_density=20000, exptime=600.0)
    linear = simulate_exposure(dataclasses.replace(spec, effects=Effects(nonlinearity=False)),
                               tmp_path / "linear", ncpus=1)
    nonlinear = simulate_exposure(dataclasses.replace(spec, effects=Effects()), tmp_path / "nonlinear",
                                  ncpus=1)
    table = Instrument(PODI).write_nonlinearity_table(tmp_path / "nonlinearity", (34,))
    reference = _reduce(linear, tmp_path / "linear.fits")
    corrected = _reduce(nonlinear, tmp_path / "corrected.fits", f"-nonlinearity={table}")
    uncorrected = _reduce(nonlinear, tmp_path / "uncorrected.fits")
    bright = np.isfinite(reference) & (reference > 20000) & (reference < 50000)
    assert bright.sum() > 100
    ratio = corrected[bright] / reference[bright]
    assert np.abs(ratio - 1).max() < 0.002
    assert np.abs(uncorrected[bright] / reference[bright] - 1).max() > 0.01
    # With -gain the table's relative gains (times the OTA's mean header gain) turn the
    # corrected counts into the electrons of the linear detector's header gains.
    reference_e = _reduce(linear, tmp_path / "linear_e.fits", "-gain")
    corrected_e = _reduce(nonlinear, tmp_path / "corrected_e.fits", f"-nonlinearity={table}", "-gain")
    assert fits.getval(tmp_path / "corrected_e.fits", "GAINMTHD", 1) == "relative"
    ratio_e = corrected_e[bright] / reference_e[bright]
    assert np.abs(np.median(ratio_e) - 1) < 0.003 and np.abs(ratio_e - 1).max() < 0.01


def test_gain_gives_electrons(object_exposure, tmp_path):
    cals = tmp_path / "cals_e"
    write_true_calibrations(OBJECT_SPEC, cals, gain=True)
    output = tmp_path / "electrons.fits"
    assert run_collectcells(object_exposure, output, f"-cals={cals}", "-gain") == 0
    truth = fits.getheader(object_exposure.parent / f"{object_exposure.name}.truth.fits")
    with fits.open(output) as hdus:
        primary = hdus[0].header
        assert primary["BUNIT"] == "electron" and primary["GAIN"] == 1.0
        assert primary["SKYLEVEL"] == pytest.approx(truth["SKY_E"] * truth["FLATNRME"], rel=0.005)
        assert primary["RDNOISE"] == pytest.approx(6.5 * 1.3, rel=0.08)


def test_ota_selection_and_header_options(object_exposure, true_cals, tmp_path):
    output = tmp_path / "%OBSID" / "%FILTER.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-skipota=34",
                            "-addfitskey=OBSERVER,A. Astronomer, KPNO", "-simplewcs") == 0
    written = tmp_path / object_exposure.name[1:] / "odi_r.fits"
    with fits.open(written) as hdus:
        assert [h.name for h in hdus[1:-1]] == ["OTA33.SCI", "OTA22.SCI"]
        assert hdus[0].header["OBSERVER"] == "A. Astronomer, KPNO"
        assert hdus[1].header["CTYPE1"] == "RA---TAN" and "PV1_7" not in hdus[1].header
    single = tmp_path / "single.fits"
    assert run_collectcells(object_exposure, single, f"-cals={true_cals}", "-singleota=22") == 0
    with fits.open(single) as hdus:
        assert [h.name for h in hdus[1:-1]] == ["OTA22.SCI"]


def test_wcsoffset_moves_the_pointing(object_exposure, true_cals, reduced_object, tmp_path):
    output = tmp_path / "offset.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-wcsoffset=0.01,-0.02") == 0
    with fits.open(output) as shifted, fits.open(reduced_object) as plain:
        assert shifted[1].header["CRVAL2"] - plain[1].header["CRVAL2"] == pytest.approx(-0.02, abs=1e-9)
        assert shifted[1].header["CRVAL1"] - plain[1].header["CRVAL1"] == pytest.approx(0.01, abs=1e-9)


def test_prep4sex(object_exposure, true_cals, tmp_path):
    output = tmp_path / "sex.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-prep4sex") == 0
    with fits.open(output) as hdus:
        data = hdus[1].data
        assert np.isnan(data).sum() == 0
        assert (data == np.float32(-1e31)).sum() > 0.05 * data.size
        assert "FILTER" in hdus[1].header and "INHERIT" not in hdus[1].header


def test_ota_selection_rules():
    from pathlib import Path
    from podi_collectcells import select_otas
    from podi_rawdata import Exposure
    exposure = Exposure(Path("/raw"), "o1", {ota: Path(f"/raw/o1.{ota:02d}.fits") for ota in (0, 33, 55, 44)})
    assert select_otas(exposure, PODI, {}) == [33, 44, 55, 0]          # inside-out order
    assert select_otas(exposure, PODI, {"centralonly": True}) == [33, 44]
    assert select_otas(exposure, PODI, {"skipota": [44, 0]}) == [33, 55]
    assert select_otas(exposure, PODI, {"singleota": 55}) == [55]


def test_real_canned_wcs_and_banner(object_exposure, true_cals, mastercals, tmp_path, caplog):
    """The real pODI solution through the whole program; -bgmode drops the banner."""
    canned = mastercals / "wcs" / "podi" / "2mass_distort5.fits"
    output = tmp_path / "real_wcs.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", f"-wcs={canned}", "-bgmode") == 0
    assert "reducing" not in caplog.text
    with fits.open(output) as hdus:
        header = hdus["OTA33.SCI"].header
        assert header["CTYPE1"] == "RA---TPV" and "PV1_22" in header
        # The header pointing lies near pixel (4200, 4200) of OTA 33 (binning 1): the
        # tangent point is the pointing minus the stored offsets (docs/conventions.md).
        x, y = WCS(header).all_world2pix([150.0], [30.0], 0)
        assert np.hypot(x[0] * 2 - 4152, y[0] * 2 - 4132) * 0.1126 < 15
        assert "2mass_distort5.fits" in set(hdus["ASSOCIATIONS"].data["filename"])


def test_overscan_median_option(object_exposure, true_cals, reduced_object, tmp_path):
    output = tmp_path / "median.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-overscan=median") == 0
    with fits.open(output) as median, fits.open(reduced_object) as clipped:
        assert "per-cell median of the overscan block" in "".join(median[1].header["HISTORY"])
        # Both estimate the same level: the sky agrees to a fraction of an ADU.
        assert median[0].header["SKYLEVEL"] == pytest.approx(clipped[0].header["SKYLEVEL"], abs=1.0)
