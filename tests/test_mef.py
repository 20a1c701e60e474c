"""The pipeline's file writing: streamed MEF with checksums, atomic renames."""

import numpy as np
import pytest
from astropy.io import fits

from podi_mef import StreamedMEF


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
