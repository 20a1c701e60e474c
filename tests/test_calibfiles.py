"""Calibration file resolution with empty stand-in files: default names, flats by the raw
then the normalised filter name, -bpm=auto, bare -nonlinearity/-crosstalk under -cals,
and a missing calibration stopping the frame before any OTA is reduced."""

import logging
from pathlib import Path

import pytest

from podi_calibfiles import CalibrationNotFound, resolve_calibrations
from podi_commandline import parse_commandline

REPO = Path(__file__).resolve().parents[1]
PODI_MJD, ODI5X6_MJD = 56600.0, 57500.0
BINNING = 2

#: Raw header whose FILTER differs from the normalised name (FILTERID w105 = odi_r).
HEADER = {"MJD-OBS": PODI_MJD, "FILTER": "r odi", "FILTERID": "w105"}


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def resolve(*flags, header=HEADER, binning=BINNING):
    """Resolve the calibrations of 'in out.fits' with the given flags."""
    return resolve_calibrations(parse_commandline(["in", "out.fits", *flags]), header, binning)


def error_of(*flags, **kwargs):
    """The message of the CalibrationNotFound that resolving with these flags raises."""
    with pytest.raises(CalibrationNotFound) as info:
        resolve(*flags, **kwargs)
    return str(info.value)


@pytest.fixture
def cals(tmp_path):
    """A calibration folder with all three binning-2 masters (flat under the raw FILTER)."""
    folder = tmp_path / "cals"
    for name in ("bias_bin2.fits", "dark_yes_bin2.fits", "flat_r odi_bin2.fits"):
        touch(folder / name)
    return folder


def test_nothing_asked_for():
    assert resolve() == {
        "bias": None, "dark": None, "flat": None, "bpm": None, "nonlinearity": None,
        "wcs": str(REPO / "wcs" / "podi" / "podi_model.fits"), "crosstalk": "default",
        "fringe": None, "fringevectors": None, "pupilghost": None,
    }


# --- bias, dark, flat ---------------------------------------------------------------

def test_cals_gives_all_three_masters(cals):
    resolved = resolve(f"-cals={cals}")
    assert (resolved["bias"], resolved["dark"], resolved["flat"]) == (
        str(cals / "bias_bin2.fits"), str(cals / "dark_yes_bin2.fits"),
        str(cals / "flat_r odi_bin2.fits"))


def test_binning_chooses_the_master(cals):
    touch(cals / "bias_bin1.fits")
    assert resolve(f"-bias={cals}", binning=1)["bias"] == str(cals / "bias_bin1.fits")


def test_own_flag_overrides_cals(cals, tmp_path):
    other = touch(tmp_path / "other" / "bias_bin2.fits")
    single = touch(tmp_path / "my_dark.fits")
    resolved = resolve(f"-cals={cals}", f"-bias={other.parent}", f"-dark={single}")
    assert resolved["bias"] == str(other)
    assert resolved["dark"] == str(single)  # a file is used as it is, whatever its name
    assert resolved["flat"] == str(cals / "flat_r odi_bin2.fits")


def test_relative_paths_become_absolute(cals, monkeypatch):
    monkeypatch.chdir(cals.parent)
    assert resolve("-bias=cals")["bias"] == str(cals / "bias_bin2.fits")


def test_flat_falls_back_to_the_normalised_filter_name(tmp_path):
    flat = touch(tmp_path / "flat_odi_r_bin2.fits")
    assert resolve(f"-flat={tmp_path}")["flat"] == str(flat)
    raw = touch(tmp_path / "flat_r odi_bin2.fits")
    assert resolve(f"-flat={tmp_path}")["flat"] == str(raw)  # the raw FILTER name first


def test_missing_flat_lists_every_path_tried(tmp_path):
    assert error_of(f"-flat={tmp_path}") == (
        f"-flat={tmp_path}: no master flat found; tried "
        f"{tmp_path}/flat_r odi_bin2.fits, {tmp_path}/flat_odi_r_bin2.fits")


def test_missing_dark_under_cals_is_an_error(cals):
    (cals / "dark_yes_bin2.fits").unlink()
    assert error_of(f"-cals={cals}") == (
        f"-cals={cals}: no master dark found; tried {cals}/dark_yes_bin2.fits")


def test_dark_none_switches_the_dark_off_under_cals(cals):
    (cals / "dark_yes_bin2.fits").unlink()
    resolved = resolve(f"-cals={cals}", "-dark=none")
    assert resolved["dark"] is None
    assert resolved["bias"] == str(cals / "bias_bin2.fits")


def test_missing_explicit_file_is_an_error(tmp_path):
    missing = tmp_path / "bias_typo.fits"
    assert error_of(f"-bias={missing}") == f"-bias={missing}: no master bias found; tried {missing}"


# --- bad-pixel masks ----------------------------------------------------------------

@pytest.mark.parametrize("mjd, layout", [(PODI_MJD, "podi"), (ODI5X6_MJD, "odi_5x6")])
def test_bpm_auto_is_the_package_folder_of_the_layout(mjd, layout):
    resolved = resolve("-bpm", header={**HEADER, "MJD-OBS": mjd})
    assert resolved["bpm"] == str(REPO / "bpm" / layout)


def test_bpm_auto_without_package_files_warns(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr("podi_calibfiles.package_data_dir", lambda folder: tmp_path)
    with caplog.at_level(logging.WARNING, logger="podi_calibfiles"):
        assert resolve("-bpm")["bpm"] == str(tmp_path / "podi")
    assert "no bad-pixel regions for podi" in caplog.text


def test_bpm_folder_file_and_missing(tmp_path):
    regions = tmp_path / "regions"
    touch(regions / "bpm_xy33.reg")
    assert resolve(f"-bpm={regions}")["bpm"] == str(regions)
    file = regions / "bpm_xy33.reg"
    assert error_of(f"-bpm={file}") == (
        f"-bpm={file}: {file} is a file, not a folder of bpm_xy<NN>.reg files")
    assert error_of(f"-bpm={tmp_path}/gone") == f"-bpm={tmp_path}/gone: {tmp_path}/gone does not exist"


# --- nonlinearity and crosstalk: histories chosen by MJD ----------------------------

def write_history(folder, name, entries):
    """A history file plus empty stand-ins for the files it lists."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("# MJD file\n" + "".join(f"{mjd} {f}\n" for mjd, f in entries))
    for _, filename in entries:
        touch(folder / filename)


@pytest.fixture
def nonlin_cals(cals):
    write_history(cals / "nonlinearity", "nonlinearity.history",
                  [(0.0, "nl_old.fits"), (56582.0, "nl_new.fits")])
    return cals


@pytest.mark.parametrize("mjd, expected", [(56000.0, "nl_old.fits"), (PODI_MJD, "nl_new.fits")])
def test_bare_nonlinearity_uses_the_cals_history(nonlin_cals, mjd, expected):
    resolved = resolve(f"-cals={nonlin_cals}", "-nonlinearity", header={**HEADER, "MJD-OBS": mjd})
    assert resolved["nonlinearity"] == str(nonlin_cals / "nonlinearity" / expected)


def test_nonlinearity_folder_or_file(nonlin_cals):
    folder = nonlin_cals / "nonlinearity"
    assert resolve(f"-nonlinearity={folder}")["nonlinearity"] == str(folder / "nl_new.fits")
    table = folder / "nl_old.fits"
    assert resolve(f"-nonlinearity={table}")["nonlinearity"] == str(table)


def test_bare_nonlinearity_without_cals_is_an_error():
    assert error_of("-nonlinearity") == ("-nonlinearity without a file needs -cals=DIR: it "
                                         "looks for DIR/nonlinearity/nonlinearity.history")


def test_bare_nonlinearity_with_cals_but_no_history_names_the_paths(cals):
    (cals / "nonlinearity").mkdir()
    message = error_of(f"-cals={cals}", "-nonlinearity")
    assert message.startswith("-nonlinearity: no nonlinearity.history in")
    assert f"{cals}/nonlinearity/nonlinearity.history" in message
    assert f"{cals}/nonlinearity/podi/nonlinearity.history" in message


def test_history_naming_a_missing_file_is_an_error(nonlin_cals):
    (nonlin_cals / "nonlinearity" / "nl_new.fits").unlink()
    folder = nonlin_cals / "nonlinearity"
    assert error_of(f"-cals={nonlin_cals}", "-nonlinearity") == (
        f"-nonlinearity: {folder}/nonlinearity.history selects nl_new.fits for MJD 56600.0, "
        f"but {folder}/nl_new.fits does not exist")


def test_crosstalk_default_none_and_auto(cals):
    # The real crosstalk folder keeps one history per layout subfolder.
    write_history(cals / "crosstalk" / "podi", "crosstalk.history", [(0.0, "xtalk.fits")])
    assert resolve()["crosstalk"] == "default"
    assert resolve("-crosstalk=none")["crosstalk"] is None
    assert resolve(f"-cals={cals}", "-crosstalk")["crosstalk"] == str(
        cals / "crosstalk" / "podi" / "xtalk.fits")
    single = cals / "crosstalk" / "podi" / "xtalk.fits"
    assert resolve(f"-crosstalk={single}")["crosstalk"] == str(single)


def test_crosstalk_errors(tmp_path):
    assert error_of("-crosstalk").startswith("-crosstalk without a file needs -cals=DIR")
    assert error_of(f"-crosstalk={tmp_path}/x.fits") == (
        f"-crosstalk={tmp_path}/x.fits: calibration {tmp_path}/x.fits not found")


# --- canned WCS ---------------------------------------------------------------------

@pytest.mark.parametrize("flags", [(), ("-wcs",)])
@pytest.mark.parametrize("mjd, expected", [(PODI_MJD, "podi/podi_model.fits"),
                                           (ODI5X6_MJD, "odi_5x6/odi5x6_model.fits")])
def test_wcs_default_is_the_package_model_of_the_layout(flags, mjd, expected):
    resolved = resolve(*flags, header={**HEADER, "MJD-OBS": mjd})
    assert resolved["wcs"] == str(REPO / "wcs" / expected)


def test_wcs_none_file_and_missing(tmp_path):
    assert resolve("-wcs=none")["wcs"] is None
    canned = touch(tmp_path / "canned.fits")
    assert resolve(f"-wcs={canned}")["wcs"] == str(canned)
    assert error_of(f"-wcs={tmp_path}/gone.fits") == (
        f"-wcs={tmp_path}/gone.fits: calibration {tmp_path}/gone.fits not found")


def test_missing_mjd_is_an_error():
    with pytest.raises(ValueError, match="no usable MJD-OBS"):
        resolve(header={"FILTER": "odi_r"})


# --- fringe templates and vectors ------------------------------------------------------

def test_fringe_folder_gives_the_filter_template_and_its_vectors(tmp_path):
    template = touch(tmp_path / "fringe__r odi.fits")
    resolved = resolve(f"-fringe={tmp_path}")
    assert (resolved["fringe"], resolved["fringevectors"]) == (str(template), str(tmp_path))
    vectors = tmp_path / "vectors"
    touch(vectors / "fringevectors__r odi__OTA33.reg")
    assert resolve(f"-fringe={template}", f"-fringevectors={vectors}")["fringevectors"] == str(vectors)
    # A vector file stands for its folder.
    assert resolve(f"-fringe={template}",
                   f"-fringevectors={vectors / 'fringevectors__r odi__OTA33.reg'}")["fringevectors"] == \
        str(vectors)


def test_filter_without_fringe_template_is_left_alone(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        resolved = resolve(f"-fringe={tmp_path}")
    assert (resolved["fringe"], resolved["fringevectors"]) == (None, None)
    assert "no template for filter r odi" in caplog.text


@pytest.mark.parametrize("flags, message", [
    (("-fringe={tmp}/none.fits",), "-fringe=.*none.fits: no such file or folder"),
    (("-fringe={tmp}/fringe__r odi.fits", "-fringevectors={tmp}/novectors"),
     "-fringevectors=.*novectors: no such file or folder"),
])
def test_missing_fringe_files_are_errors(tmp_path, flags, message):
    touch(tmp_path / "fringe__r odi.fits")
    with pytest.raises(CalibrationNotFound, match=message):
        resolve(*(flag.format(tmp=tmp_path) for flag in flags))


# --- pupil-ghost templates ------------------------------------------------------------

#: The header with filter arm 1B in: level 1.
LEVEL1 = {**HEADER, "FLTARM1A": "OUT", "FLTARM1B": "IN"}


def test_pupilghost_folder_gives_the_template_of_the_level_and_binning(tmp_path):
    template = touch(tmp_path / "pupilghost_template___level_1__bin2.fits")
    touch(tmp_path / "pupilghost_template___level_2__bin2.fits")
    assert resolve(f"-pupilghost={tmp_path}", header=LEVEL1)["pupilghost"] == str(template)
    assert resolve(f"-pupilghost={template}", header=LEVEL1)["pupilghost"] == str(template)
    assert resolve(f"-cals={tmp_path}", "-pupilghost", "-bias=none", "-dark=none", "-flat=none",
                   header=LEVEL1)["pupilghost"] == str(template)


def test_pupilghost_of_the_other_binning_serves_with_a_warning(tmp_path, caplog):
    template = touch(tmp_path / "pupilghost_template___level_1__bin1.fits")
    assert resolve(f"-pupilghost={tmp_path}", header=LEVEL1)["pupilghost"] == str(template)
    assert "no template for binning 2" in caplog.text


def test_level_without_pupilghost_template_leaves_the_ghost(tmp_path, caplog):
    touch(tmp_path / "pupilghost_template___level_2__bin2.fits")
    assert resolve(f"-pupilghost={tmp_path}", header=LEVEL1)["pupilghost"] is None
    assert "no template for filter level 1" in caplog.text
    caplog.clear()
    assert resolve(f"-pupilghost={tmp_path}")["pupilghost"] is None  # no arm in: level 0
    assert "no template for filter level 0" in caplog.text


def test_missing_pupilghost_path_or_bare_flag_without_cals(tmp_path):
    assert error_of(f"-pupilghost={tmp_path / 'nothere'}") == \
        f"-pupilghost={tmp_path / 'nothere'}: no such file or folder"
    assert error_of("-pupilghost") == "-pupilghost without a folder needs -cals=DIR"
