"""The pipeline's file writing: streamed MEF with checksums, atomic renames."""

import numpy as np
import pytest
from astropy.io import fits

from podi_mef import (MAX_OPEN_CALIBRATIONS, StreamedMEF, header_text_with_checksum, native_datasum,
                      open_calibration, read_ota_image, release_calibration_pages)


def _image_parts(tmp_path, value, name):
    data = np.full((64, 64), value, dtype=">f4")
    path = tmp_path / f"{name}.f32"
    data.tofile(path)
    hdu = fits.ImageHDU(data=data, name=name)
    hdu.add_checksum()
    return hdu.header.tostring(), path, data.nbytes


@pytest.mark.parametrize("cards", [10, 200])
def test_streamed_file_is_valid_fits(tmp_path, cards):
    """Small and oversized primary headers (the latter moves the extensions)."""
    output = tmp_path / "out.fits"
    stream = StreamedMEF(output, reserved_blocks=2)
    for value, name in ((1.5, "OTA33.SCI"), (-2.0, "OTA34.SCI")):
        stream.add_image(*_image_parts(tmp_path, value, name))
    stream.add_table(fits.BinTableHDU.from_columns([fits.Column("step", "10A", array=["raw"])],
                                                   name="ASSOCIATIONS"))
    assert not output.exists()
    header = fits.Header([(f"KEY{i}", i) for i in range(cards)])
    stream.finish(header)
    with fits.open(output, checksum=True) as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "OTA33.SCI", "OTA34.SCI", "ASSOCIATIONS"]
        assert all(h.verify_checksum() == 1 for h in hdus)
        assert hdus[0].header[f"KEY{cards - 1}"] == cards - 1
        assert (hdus[2].data == -2.0).all() and hdus[1].data.shape == (64, 64)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_aborted_stream_leaves_nothing(tmp_path):
    output = tmp_path / "out.fits"
    stream = StreamedMEF(output)
    stream.add_image(*_image_parts(tmp_path, 1.0, "OTA33.SCI"))
    stream.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OTA33.SCI.f32"]


def test_checksum_without_the_data_matches_astropy():
    rng = np.random.default_rng(3)
    for size in (1, 7, 40):
        hdu = fits.ImageHDU(rng.normal(size=(size, 13)).astype(">f4"))
        hdu.header["NOTE"] = "x" * size
        hdu.add_checksum()
        assert header_text_with_checksum(hdu.header) == hdu.header.tostring()


def test_patched_header_keeps_its_size_and_checksums(tmp_path):
    output = tmp_path / "out.fits"
    stream = StreamedMEF(output)
    text, path, nbytes = _image_parts(tmp_path, 3.0, "OTA33.SCI")
    header = fits.Header.fromstring(text)
    for _ in range(10):
        header.add_blank()
    offset = stream.add_image(header.tostring(), path, nbytes)
    header["CRVAL1"] = 150.25          # a new keyword takes a blank card's place
    stream.patch_header(offset, header_text_with_checksum(header))
    header["LONGER"] = "y" * 60
    for _ in range(40):
        header.append(("HISTORY", "more than the spare cards"))
    with pytest.raises(ValueError, match="must keep its"):
        stream.patch_header(offset, header_text_with_checksum(header))
    stream.finish(fits.Header())
    with fits.open(output, checksum=True) as hdus:
        assert hdus[1].header["CRVAL1"] == 150.25
        assert hdus[1].verify_checksum() == 1 and hdus[1].verify_datasum() == 1
        assert (hdus[1].data == 3.0).all()


def test_native_datasum_is_the_datasum_of_the_written_data():
    rng = np.random.default_rng(3)
    image = rng.normal(1000, 300, (64, 48)).astype(np.float32)
    image[5, 7] = np.nan
    hdu = fits.ImageHDU(image)
    hdu.add_checksum()
    assert native_datasum(image) == int(hdu.header["DATASUM"])


def _master_file(path, value, otas=(33, 34, 43, 44), size=1024):
    hdus = [fits.PrimaryHDU()]
    for ota in otas:
        hdus.append(fits.ImageHDU(np.full((size, size), value, np.float32), name=f"OTA{ota}.SCI"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def _mapped_file_mb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss_File:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no Pss_File in /proc/self/smaps_rollup (Linux before 5.13)")


def test_read_master_pages_are_released_after_an_ota(tmp_path):
    # Four 4 MB extensions read through the map, as a worker does over four OTAs.
    master = _master_file(tmp_path / "flat.fits", 1.0)
    before = _mapped_file_mb()
    total = sum(float(np.sum(read_ota_image(master, ota, 1024, mapped=True)[0], dtype=np.float64))
                for ota in (33, 34, 43, 44))
    assert total == 4 * 1024 * 1024
    held = _mapped_file_mb() - before
    release_calibration_pages()
    released = _mapped_file_mb() - before
    assert held > 14, held
    assert released < 2, released
    # Still open and readable after the release.
    assert float(read_ota_image(master, 44, 1024, mapped=True)[0][5, 5]) == 1.0


def test_a_rewritten_master_is_opened_anew_and_the_old_map_closed(tmp_path):
    master = _master_file(tmp_path / "bias.fits", 1.0)
    old, _ = open_calibration(master)
    assert float(read_ota_image(master, 33, 1024)[0][0, 0]) == 1.0
    _master_file(tmp_path / "bias.fits", 2.0, otas=(33, 34))
    assert float(read_ota_image(master, 33, 1024)[0][0, 0]) == 2.0
    assert old._file.closed
    assert sorted(open_calibration(master)[1]) == [33, 34]


def test_at_most_a_few_calibration_files_stay_open(tmp_path):
    files = [_master_file(tmp_path / f"m{index}.fits", index, otas=(33,), size=16)
             for index in range(MAX_OPEN_CALIBRATIONS + 1)]
    first, _ = open_calibration(files[0])
    for path in files[1:]:
        open_calibration(path)
    assert first._file.closed
    assert float(read_ota_image(files[0], 33, 16)[0][0, 0]) == 0.0
