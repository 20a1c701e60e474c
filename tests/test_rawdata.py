"""Reading raw exposures: finding OTA files, checking them, clear errors."""

import shutil

import numpy as np
import pytest
from astropy.io import fits

from podi_rawdata import RawDataError, find_exposure, open_raw_ota
from conftest import TEST_OTAS


@pytest.fixture
def exposure_copy(object_exposure, tmp_path):
    """A private copy of the object exposure that a test may damage."""
    target = tmp_path / object_exposure.name
    shutil.copytree(object_exposure, target)
    return target


def test_find_exposure_from_directory_and_file(object_exposure):
    by_dir = find_exposure(object_exposure)
    assert sorted(by_dir.ota_files) == sorted(TEST_OTAS)
    assert by_dir.base == object_exposure.name
    by_file = find_exposure(by_dir.ota_files[33])
    assert by_file.ota_files == by_dir.ota_files


def test_single_file_renamed_by_an_archive(object_exposure, tmp_path):
    """An OTA file without the usual name is placed by its FILENAME keyword."""
    source = find_exposure(object_exposure).ota_files[33]
    renamed = tmp_path / "archive_12345.fits"
    shutil.copy(source, renamed)
    shutil.copy(source, tmp_path / source.name)
    exposure = find_exposure(renamed)
    assert exposure.base == object_exposure.name
    assert list(exposure.ota_files) == [33]


def test_cells_are_read_in_adu(object_exposure):
    with open_raw_ota(find_exposure(object_exposure).ota_files[33]) as raw:
        cells = raw.cells()
        assert raw.ota == 33 and raw.binning == 2 and raw.cell_shape == (256, 280)
        assert cells.shape == (8, 8, 256, 280) and cells.dtype == np.float32
        direct = fits.getdata(raw.filename, "xy52")  # lower case: matched case-insensitively
        np.testing.assert_array_equal(cells[2, 5], direct.astype(np.float32))
        assert 1000 < np.median(cells[:, :, :, 500 // 2 + 20:]) < 1600   # overscan = bias level


def test_compressed_file_reads_the_same(object_exposure, tmp_path):
    source = find_exposure(object_exposure).ota_files[34]
    directory = tmp_path / object_exposure.name
    directory.mkdir()
    with fits.open(source) as hdus:
        packed = fits.HDUList([fits.PrimaryHDU(header=hdus[0].header)] +
                              [fits.CompImageHDU(h.data, h.header) for h in hdus[1:]])
        packed.writeto(directory / (source.name + ".fz"))
    exposure = find_exposure(directory)
    assert exposure.ota_files[34].name.endswith(".fits.fz")
    with open_raw_ota(source) as plain, open_raw_ota(exposure.ota_files[34]) as compressed:
        np.testing.assert_array_equal(plain.cells(), compressed.cells())


def _assert_one_line_naming(error, path, words):
    message = str(error.value)
    assert "\n" not in message
    assert path.name in message
    assert words in message


def test_truncated_file(exposure_copy):
    path = find_exposure(exposure_copy).ota_files[33]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(RawDataError) as error:
        open_raw_ota(path)
    _assert_one_line_naming(error, path, "truncated")


def test_missing_extensions(exposure_copy):
    path = find_exposure(exposure_copy).ota_files[33]
    with fits.open(path) as hdus:
        fits.HDUList(hdus[:40]).writeto(path, overwrite=True)
    with pytest.raises(RawDataError) as error:
        open_raw_ota(path)
    _assert_one_line_naming(error, path, "25 of 64 cell extensions missing")


def test_non_fits_file(exposure_copy):
    path = find_exposure(exposure_copy).ota_files[22]
    path.write_text("this is not a FITS file\n" * 100)
    with pytest.raises(RawDataError) as error:
        open_raw_ota(path)
    _assert_one_line_naming(error, path, "not a readable FITS file")


def test_wrong_binning_keyword(exposure_copy):
    path = find_exposure(exposure_copy).ota_files[34]
    with fits.open(path, mode="update") as hdus:
        for hdu in hdus[1:]:
            hdu.header["CCDBIN1"] = 1
    with pytest.raises(RawDataError) as error:
        open_raw_ota(path)
    _assert_one_line_naming(error, path, "too small for binning 1")


def test_missing_fppos(exposure_copy):
    path = find_exposure(exposure_copy).ota_files[34]
    with fits.open(path, mode="update") as hdus:
        del hdus[0].header["FPPOS"]
    with pytest.raises(RawDataError) as error:
        open_raw_ota(path)
    _assert_one_line_naming(error, path, "FPPOS")


def test_missing_input(tmp_path):
    with pytest.raises(RawDataError, match="no such file"):
        find_exposure(tmp_path / "o20131212T000000.1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RawDataError, match="no OTA files"):
        find_exposure(tmp_path / "empty")
