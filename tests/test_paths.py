"""Paths through the whole program that no other test runs end to end: one process or
several, -profile, -indefval, -wcs=none, compressed input, and what ASSOCIATIONS says."""

import numpy as np
import pytest
from astropy.io import fits

from conftest import run_collectcells
from podi_rawdata import find_exposure
from podi_wcs import parse_pointing

OTAS = ("OTA33.SCI", "OTA34.SCI", "OTA22.SCI")


def images(path):
    with fits.open(path) as hdus:
        return {name: np.array(hdus[name].data) for name in OTAS}


def assert_same_pixels(first, second):
    for name in OTAS:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


@pytest.mark.parametrize("flags", [["-ncpus=1"], ["-profile"]])
def test_one_process_gives_the_pixels_of_several(object_exposure, true_cals, reduced_object, tmp_path,
                                                 capsys, flags):
    output = tmp_path / "serial.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", *flags) == 0
    assert_same_pixels(images(output), images(reduced_object))
    if "-profile" in flags:
        assert "function calls" in capsys.readouterr().err


def test_indefval_fills_exactly_the_undefined_pixels(object_exposure, true_cals, reduced_object, tmp_path):
    output = tmp_path / "indef.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-indefval=-999") == 0
    filled, undefined = images(output), images(reduced_object)
    for name in OTAS:
        nan = np.isnan(undefined[name])
        assert nan.any() and not np.isnan(filled[name]).any()
        assert (filled[name][nan] == -999).all()
        np.testing.assert_array_equal(filled[name][~nan], undefined[name][~nan])


def test_wcs_none_is_plain_tan_at_the_pointing(object_exposure, true_cals, tmp_path):
    output = tmp_path / "tan.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-wcs=none") == 0
    pointing = parse_pointing(fits.getheader(find_exposure(object_exposure).ota_files[33]))
    with fits.open(output) as hdus:
        for name in OTAS:
            header = hdus[name].header
            assert (header["CTYPE1"], header["CTYPE2"]) == ("RA---TAN", "DEC--TAN")
            assert not [key for key in header if key.startswith("PV")]
            # Plain TAN from the pointing: every OTA has the same tangent point.
            assert (header["CRVAL1"], header["CRVAL2"]) == pytest.approx(pointing, abs=1e-9)


def test_compressed_input_through_the_whole_program(object_exposure, true_cals, reduced_object, tmp_path):
    """fpack-style .fits.fz files (lossless for counts) reduce to the same pixels."""
    folder = tmp_path / object_exposure.name
    folder.mkdir()
    for ota, path in find_exposure(object_exposure).ota_files.items():
        with fits.open(path) as hdus:
            packed = fits.HDUList([fits.PrimaryHDU(header=hdus[0].header)]
                                  + [fits.CompImageHDU(hdu.data, header=hdu.header) for hdu in hdus[1:]])
            packed.writeto(folder / (path.name + ".fz"))
    assert all(path.name.endswith(".fits.fz") for path in find_exposure(folder).ota_files.values())
    output = tmp_path / "from_fz.fits"
    assert run_collectcells(folder, output, f"-cals={true_cals}") == 0
    assert_same_pixels(images(output), images(reduced_object))


def test_associations_name_every_input(object_exposure, true_cals, reduced_object):
    table = fits.getdata(reduced_object, "ASSOCIATIONS")
    rows = {(step.strip(), path.strip()) for step, path in zip(table["correction"], table["filename_full"])}
    raw = {("raw", str(path.resolve())) for path in find_exposure(object_exposure).ota_files.values()}
    masters = {(step, str(next(true_cals.glob(f"{step}*.fits")).resolve())) for step in ("bias", "dark", "flat")}
    assert raw | masters <= rows
    assert all(path.startswith("/") for _, path in rows)
    assert [name.strip() for name in table["filename"]] == [path.split("/")[-1] for path in
                                                            (p.strip() for p in table["filename_full"])]


def test_shipped_bad_pixel_regions_mask_the_cameras_defects(object_exposure, true_cals, reduced_object,
                                                             tmp_path):
    """-bpm=auto with the package's bpm/ files: the simulated camera's hot pixels and bad
    columns (its truth, not the region files) are undefined in the output."""
    from podi_definitions import PODI
    from podi_simulate import Instrument
    output = tmp_path / "bpm.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-bpm=auto") == 0
    camera = Instrument(PODI)
    masked, plain = images(output), images(reduced_object)
    with fits.open(output) as hdus:
        for name in OTAS:
            ota = int(name[3:5])
            new = np.isnan(masked[name]) & ~np.isnan(plain[name])
            assert hdus[name].header["BPMPIX"] >= new.sum() > 0
            x, y, rate = camera.hot_pixels(ota)
            hot = rate > 1.0  # e-/s: 300 e- or more in the darks the regions were made from
            assert np.isnan(masked[name][y[hot] // 2, x[hot] // 2]).mean() > 0.95
            for column, y0, y1 in zip(*camera.bad_columns(ota)):
                assert np.isnan(masked[name][y0 // 2:y1 // 2, column // 2]).mean() > 0.95


def test_centralonly_leaves_out_the_outer_otas(object_exposure, true_cals, tmp_path):
    """An exposure with an outer OTA (16, a copy of OTA 22's file saying so, for which the
    masters have no extension): attempted without -centralonly (and failed), not with it."""
    import shutil
    folder = tmp_path / object_exposure.name
    shutil.copytree(object_exposure, folder)
    outer = folder / f"{object_exposure.name}.16.fits"
    shutil.copy(find_exposure(folder).ota_files[22], outer)
    fits.setval(outer, "FPPOS", value="xy16")
    for flags, failed in (((), "16"), (("-centralonly",), None)):
        output = tmp_path / f"out{len(flags)}.fits"
        assert run_collectcells(folder, output, f"-cals={true_cals}", *flags) == 0
        with fits.open(output) as hdus:
            assert {hdu.name for hdu in hdus if hdu.name.endswith(".SCI")} == set(OTAS)
            assert hdus[0].header.get("FAILOTAS") == failed
