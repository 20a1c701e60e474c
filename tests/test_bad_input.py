"""Inputs that used to give a traceback, a lost frame or a silently wrong result: each now
fails its OTA with a message naming the file, the keyword and the value, or stops the
run with one line, and the other OTAs are reduced as before."""

import re
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from conftest import TEST_BINNING, refcat_of, run_collectcells, small_spec
from podi_rawdata import find_exposure


@pytest.fixture
def exposure_copy(object_exposure, tmp_path):
    target = tmp_path / "raw" / object_exposure.name
    shutil.copytree(object_exposure, target)
    return target


@pytest.fixture
def cals_copy(true_cals, tmp_path):
    target = tmp_path / "cals"
    shutil.copytree(true_cals, target)
    return target


def reduce(exposure, cals, output, caplog, *flags):
    """Reduce; returns the output's primary header and the failed OTAs' messages."""
    assert run_collectcells(exposure, output, f"-cals={cals}", *flags) == 0
    with fits.open(output, checksum=True) as hdus:
        names = [hdu.name for hdu in hdus]
        assert len(names) == len(set(names)), names
        primary = hdus[0].header
    failed = dict(re.findall(r"OTA (\d\d) failed: (.*)", caplog.text))
    return primary, failed


def one_line_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("podi_collectcells: error:"), lines
    return lines[0]


# --- Raw primary headers ----------------------------------------------------------------------

@pytest.mark.parametrize("key, value, says", [
    ("EXPTIME", "abc", "EXPTIME = 'abc': not an exposure time"),
    ("EXPTIME", 0.0, "EXPTIME = 0.0: 0 s, but OBSTYPE is OBJECT"),
    ("EXPTIME", -300.0, "EXPTIME = -300.0: not an exposure time"),
    ("EXPTIME", None, "primary header has no EXPTIME keyword"),
    ("MJD-OBS", "abc", "MJD-OBS = 'abc': not a date of the camera"),
    ("MJD-OBS", None, "primary header has no MJD-OBS keyword"),
    ("FILTER", "", "FILTER = '': empty, but an OBJECT needs its filter"),
    ("RA", "12:xx:00", "RA = '12:xx:00': cannot parse RA"),
    ("CCDSUM", "a b", "CCDSUM = 'a b': not a binning of the camera"),
    ("FPPOS", "xy43", "FPPOS = 'xy43' says OTA 43, the file name says OTA 22"),
])
def test_bad_keyword_in_the_first_ota_file_fails_only_that_ota(exposure_copy, true_cals, tmp_path,
                                                               caplog, key, value, says):
    # OTA 22's file sorts first: it used to set the frame's header.
    path = find_exposure(exposure_copy).ota_files[22]
    with fits.open(path, mode="update") as hdus:
        if value is None:
            del hdus[0].header[key]
        else:
            hdus[0].header[key] = value
    primary, failed = reduce(exposure_copy, true_cals, tmp_path / "out.fits", caplog)
    assert primary["FAILOTAS"] == "22" and primary["NOTAS"] == 2
    assert path.name in failed["22"] and says in failed["22"]
    assert primary["EXPTIME"] == 300.0 and primary["FILTER"].strip() == "odi_r"


def test_keyword_broken_in_every_file_stops_with_one_line(exposure_copy, true_cals, tmp_path, capsys):
    for path in find_exposure(exposure_copy).ota_files.values():
        fits.setval(path, "MJD-OBS", value="abc")
    assert run_collectcells(exposure_copy, tmp_path / "out.fits", f"-cals={true_cals}") == 1
    message = one_line_error(capsys)
    assert "no readable OTA file" in message and "MJD-OBS = 'abc'" in message
    assert not (tmp_path / "out.fits").exists()


def test_all_video_ota_fails_with_its_reason(exposure_copy, true_cals, tmp_path, caplog):
    path = find_exposure(exposure_copy).ota_files[34]
    fits.setval(path, "CELLMODE", value="V" * 64)
    primary, failed = reduce(exposure_copy, true_cals, tmp_path / "out.fits", caplog)
    assert primary["FAILOTAS"] == "34" and "no cell holds science data" in failed["34"]


# --- Raw cells -----------------------------------------------------------------------------------

def rewrite_cell(path, extname, transform):
    with fits.open(path) as hdus:
        hdus = fits.HDUList([hdus[0].copy()] + [fits.ImageHDU(h.data, header=h.header) for h in hdus[1:]])
    index = [h.name for h in hdus].index(extname)
    hdus[index] = transform(hdus[index])
    hdus.writeto(path, overwrite=True)


@pytest.mark.parametrize("damage, says", [
    (lambda hdu: fits.ImageHDU(hdu.data.astype(np.uint8), header=hdu.header), "cell XY34: BITPIX = 8"),
    (lambda hdu: fits.ImageHDU(np.where(hdu.data > 4000, np.nan, hdu.data).astype(np.float32),
                               header=hdu.header), "cell XY34: "),
])
def test_garbage_cell_fails_its_ota(exposure_copy, true_cals, tmp_path, caplog, damage, says):
    path = find_exposure(exposure_copy).ota_files[33]
    rewrite_cell(path, "XY34", damage)
    primary, failed = reduce(exposure_copy, true_cals, tmp_path / "out.fits", caplog)
    assert primary["FAILOTAS"] == "33" and says in failed["33"]


def test_bscale_zero_fails_its_ota(exposure_copy, true_cals, tmp_path, caplog):
    path = find_exposure(exposure_copy).ota_files[33]
    data = bytearray(path.read_bytes())
    with fits.open(path) as hdus:
        start, end = hdus["XY12"].fileinfo()["hdrLoc"], hdus["XY12"].fileinfo()["datLoc"]
    card = data.index(b"BSCALE  =", start, end)
    data[card:card + 80] = fits.Card("BSCALE", 0.0).image.encode()
    path.write_bytes(bytes(data))
    primary, failed = reduce(exposure_copy, true_cals, tmp_path / "out.fits", caplog)
    assert primary["FAILOTAS"] == "33" and "cell XY12: BSCALE = 0.0: raw counts are not scaled" in failed["33"]


def test_binned_ota_among_unbinned_ones_fails_alone(exposure_copy, true_cals, tmp_path, caplog):
    """An unbinned OTA 22 file (it sorts first) in a binned exposure: the frame keeps the
    binning of the other files."""
    from podi_simulate import simulate_exposure
    other = simulate_exposure(small_spec(binning=1, otas=(22,), seed=7, mjd=56620.3), tmp_path / "unbinned")
    target = find_exposure(exposure_copy).ota_files[22]
    shutil.copy(find_exposure(other).ota_files[22], target)
    primary, failed = reduce(exposure_copy, true_cals, tmp_path / "out.fits", caplog)
    assert primary["BINNING"] == TEST_BINNING and primary["FAILOTAS"] == "22"
    assert "binned 1x1, the exposure's other OTA files 2x2" in failed["22"]


# --- Masters -----------------------------------------------------------------------------------

def edit_master(cals, prefix, ota, edit):
    path = next(cals.glob(f"{prefix}*.fits"))
    with fits.open(path, mode="update") as hdus:
        edit(hdus, f"OTA{ota}.SCI")
    return path


@pytest.mark.parametrize("prefix, edit, says", [
    ("flat", lambda hdus, name: hdus[name].data.__setitem__(Ellipsis, np.nan), "is only 0 % positive"),
    ("flat", lambda hdus, name: hdus[name].data.__setitem__(Ellipsis, 0.0), "is only 0 % positive"),
    ("bias", lambda hdus, name: hdus[name].data.__iadd__(np.float32(2500.0)), "median of 2500"),
    ("dark", lambda hdus, name: hdus[name].data.__setitem__(Ellipsis, np.nan), "is only 0 % finite"),
])
def test_meaningless_master_fails_its_ota(object_exposure, cals_copy, tmp_path, caplog, prefix, edit, says):
    path = edit_master(cals_copy, prefix, 33, edit)
    primary, failed = reduce(object_exposure, cals_copy, tmp_path / "out.fits", caplog)
    assert primary["FAILOTAS"] == "33" and path.name in failed["33"] and says in failed["33"]


def test_master_extension_of_the_wrong_shape_fails_only_its_ota(object_exposure, cals_copy, tmp_path, caplog):
    path = next(cals_copy.glob("flat*.fits"))
    with fits.open(path) as hdus:
        hdus = fits.HDUList([hdu.copy() for hdu in hdus])
    hdus["OTA34.SCI"].data = hdus["OTA34.SCI"].data[::2, ::2].copy()
    hdus.writeto(path, overwrite=True)
    primary, failed = reduce(object_exposure, cals_copy, tmp_path / "out.fits", caplog)
    assert primary["FAILOTAS"] == "34" and "binning does not match" in failed["34"]


def test_zeroed_flat_cell_gives_undefined_pixels_not_infinite(object_exposure, cals_copy, tmp_path, caplog):
    # Cell (cx=2, cy=5) of OTA 33 at binning 2: x from 508, y from 505.
    edit_master(cals_copy, "flat", 33, lambda hdus, name: hdus[name].data[505:752, 508:748].__setitem__(
        Ellipsis, 0.0))
    primary, failed = reduce(object_exposure, cals_copy, tmp_path / "out.fits", caplog)
    assert "FAILOTAS" not in primary
    data = fits.getdata(tmp_path / "out.fits", "OTA33.SCI")
    assert np.isnan(data[505:752, 508:748]).all()
    assert not np.isinf(data).any() and np.isfinite(data[0:247, 0:240]).all()


# --- Reference catalog ---------------------------------------------------------------------------

def test_reference_catalog_with_text_coordinates_stops_with_one_line(object_exposure, true_cals, tmp_path,
                                                                      capsys):
    table = Table.read(refcat_of(object_exposure))
    table["ra"] = [f"{value:.5f}deg" for value in table["ra"]]
    table.write(tmp_path / "text.fits")
    assert run_collectcells(object_exposure, tmp_path / "out.fits", f"-cals={true_cals}", "-fixwcs",
                            f"-refcat={tmp_path / 'text.fits'}") == 1
    message = one_line_error(capsys)
    assert "text.fits" in message and "column ra holds" in message and "not numbers" in message
    assert not (tmp_path / "out.fits").exists()


def test_master_header_with_a_negative_size_stops_quickly(object_exposure, cals_copy, tmp_path, capsys):
    """A flipped byte made NAXIS2 negative: astropy would loop over the same extensions
    with growing memory; the run stops at once with one line naming the file."""
    path = next(cals_copy.glob("bias*.fits"))
    data = bytearray(path.read_bytes())
    card = data.index(b"NAXIS2  =", data.index(b"XTENSION"))
    data[card:card + 80] = fits.Card("NAXIS2", -48).image.encode()
    path.write_bytes(bytes(data))
    assert run_collectcells(object_exposure, tmp_path / "out.fits", f"-cals={cals_copy}") == 1
    message = one_line_error(capsys)
    assert path.name in message and "not a readable FITS file" in message
