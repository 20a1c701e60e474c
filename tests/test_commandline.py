"""Command line of podi_collectcells: flags and defaults, parsing conventions, output names."""

import logging
import math
import os
import re
from pathlib import Path

import pytest
from astropy.io import fits

import podi_commandline as cl
from podi_commandline import (HelpRequested, OptionError,
                              expand_output_name, parse_commandline)


def parse(*flags):
    """Parse 'in out.fits' plus the given flags."""
    return parse_commandline(["in", "out.fits", *flags])


# --- defaults and every flag ----------------------------------------------------------

def test_defaults():
    options = parse_commandline(["in"])
    assert options == {
        "input": "in", "output": "mergedcells.fits",
        "cals": None, "bias": None, "dark": None, "flat": None,
        "bpm": None, "nonlinearity": None, "wcs": None, "crosstalk": None,
        "gain": False, "fixwcs": False, "refcat": None, "simplewcs": False, "wcsoffset": (0.0, 0.0),
        "prep4sex": False, "indefval": options["indefval"], "singleota": None, "skipota": [],
        "centralonly": False, "noclobber": False, "bgmode": False, "photcalib": False,
        "fitradialZP": False, "colourterms": False, "plotformat": ["png"], "otalevelplots": "panels",
        "qasubdirs": False, "qasubdirname": "QA", "create_qaplots": True, "addfitskey": {},
        "overscan": "clippedmean", "ncpus": os.cpu_count(), "timeout": None, "verbose": False, "profile": False,
        "update_persistency_only": False, "pupilghost": None, "fringe": None,
        "fringevectors": None, "persistency": None, "persistency_model": False, "nonsidereal": None,
    }
    assert math.isnan(options["indefval"])
    assert set(options) == set(cl.DEFAULTS)


def test_mutable_defaults_are_not_shared():
    first = parse_commandline(["in"])
    first["skipota"].append(33)
    first["addfitskey"]["X"] = "y"
    first["plotformat"].append("pdf")
    second = parse_commandline(["in"])
    assert (second["skipota"], second["addfitskey"], second["plotformat"]) == ([], {}, ["png"])


@pytest.mark.parametrize("flag, key, expected", [
    ("-bias=/b", "bias", "/b"),
    ("-dark=/d/dark_yes_bin1.fits", "dark", "/d/dark_yes_bin1.fits"),
    ("-flat=/f", "flat", "/f"),
    ("-bpm", "bpm", "auto"),
    ("-bpm=/regions", "bpm", "/regions"),
    ("-bpm=AUTO", "bpm", "auto"),
    ("-nonlinearity", "nonlinearity", "auto"),
    ("-nonlinearity=/n/table.fits", "nonlinearity", "/n/table.fits"),
    ("-wcs", "wcs", "auto"),
    ("-wcs=/w/canned.fits", "wcs", "/w/canned.fits"),
    ("-wcs=none", "wcs", "none"),
    ("-crosstalk", "crosstalk", "auto"),
    ("-crosstalk=None", "crosstalk", "none"),
    ("-crosstalk=/x/xtalk.fits", "crosstalk", "/x/xtalk.fits"),
    ("-gain", "gain", True),
    ("-simplewcs", "simplewcs", True),
    ("-wcsoffset=0.01,-0.002", "wcsoffset", (0.01, -0.002)),
    ("-prep4sex", "prep4sex", True),
    ("-indefval=-999", "indefval", -999.0),
    ("-singleota=33", "singleota", 33),
    ("-singleota=xy00", "singleota", 0),
    ("-skipota=16,xy61,0", "skipota", [16, 61, 0]),
    ("-centralonly", "centralonly", True),
    ("-noclobber", "noclobber", True),
    ("-bgmode", "bgmode", True),
    ("-overscan=median", "overscan", "median"),
    ("-fixwcs", "fixwcs", True),
    ("-colourterms", "colourterms", True),
    ("-refcat=gaia", "refcat", "gaia"),
    ("-plotformat=png,pdf", "plotformat", ["png", "pdf"]),
    ("-nootalevelplots", "otalevelplots", "none"),
    ("-otalevelplots", "otalevelplots", "files"),
    ("-qasubdirs", "qasubdirs", True),
    ("-qasubdirname=diagnostics", "qasubdirname", "diagnostics"),
    ("-noqaplots", "create_qaplots", False),
    ("-addfitskey=OBSERVER,Jane Doe", "addfitskey", {"OBSERVER": "Jane Doe"}),
    ("-ncpus=3", "ncpus", 3),
    ("-timeout=120.5", "timeout", 120.5),
    ("-timeout", "timeout", 900.0),
    ("-verbose", "verbose", True),
    ("-profile", "profile", True),
])
def test_flag_lands_in_options(flag, key, expected):
    value = parse(flag)[key]
    assert value == expected
    assert type(value) is type(expected)


def test_cals_must_be_an_existing_directory(tmp_path):
    assert parse(f"-cals={tmp_path}")["cals"] == str(tmp_path)
    (tmp_path / "file.fits").touch()
    for bad in (tmp_path / "file.fits", tmp_path / "missing"):
        with pytest.raises(OptionError) as info:
            parse(f"-cals={bad}")
        assert str(info.value) == f"-cals={bad}: not an existing directory"


def test_qasubdirname_turns_on_qasubdirs():
    options = parse("-qasubdirname=plots")
    assert (options["qasubdirs"], options["qasubdirname"]) == (True, "plots")


def test_later_flags_keep_one_another():
    options = parse("-gain", "-noqaplots", "-nootalevelplots", "-skipota=33")
    assert (options["gain"], options["create_qaplots"], options["otalevelplots"],
            options["skipota"]) == (True, False, "none", [33])


# --- parsing conventions (single-dash flags, =value, positionals) ------------------

def test_flags_anywhere():
    options = parse_commandline(["-gain", "raw/o20131212T012345.1", "-verbose",
                                 "out/%OBSID.fits", "-simplewcs"])
    assert options["input"] == "raw/o20131212T012345.1"
    assert options["output"] == "out/%OBSID.fits"
    assert options["gain"] and options["verbose"] and options["simplewcs"]


def test_value_keeps_everything_after_the_first_equals():
    assert parse("-flat=/data/a=b")["flat"] == "/data/a=b"


@pytest.mark.parametrize("argv, expected", [
    (["-5", "-2.fits"], ("-5", "-2.fits")),
    (["in", "-1.5e3.fits", "-gain"], ("in", "-1.5e3.fits")),
])
def test_negative_numbers_are_positional(argv, expected):
    options = parse_commandline(argv)
    assert (options["input"], options["output"]) == expected


def test_missing_input_is_an_error():
    with pytest.raises(OptionError, match="no input given"):
        parse_commandline(["-gain", "-verbose"])


def test_too_many_positional_arguments_is_an_error():
    # The classic mistake: '-bpm /dir' instead of '-bpm=/dir' (a bare -bpm is valid).
    with pytest.raises(OptionError, match=r"got 3 arguments: /dir in out\.fits"):
        parse_commandline(["-bpm", "/dir", "in", "out.fits"])


@pytest.mark.parametrize("argv", [[], ["-help"], ["in", "out.fits", "--help"]])
def test_help(argv):
    with pytest.raises(HelpRequested):
        parse_commandline(argv)


def test_usage_and_docstring_name_every_flag():
    text = cl.usage()
    assert text.startswith("Usage: podi_collectcells input output.fits [flags]")
    for flag in cl.FLAGS:
        line = next(line for line in text.splitlines() if line.startswith(f"  -{flag.name}"))
        assert flag.help in line
        assert f"-{flag.name}" in cl.__doc__
    for name in cl.DEFUNCT_FLAGS:
        assert f"-{name}" in text and f"-{name}" in cl.__doc__


# --- warnings and refusals ---------------------------------------------------------

@pytest.mark.parametrize("flag", ["-pointing=0.1,0.1", "-dither=0.01,0.02",
                                  "-target=12:00:00,+30:00:00"])
def test_defunct_flags_warn_and_are_ignored(flag, caplog):
    with caplog.at_level(logging.WARNING, logger="podi_commandline"):
        options = parse(flag)
    name = flag[1:].split("=")[0]
    assert f"-{name} is defunct and ignored" in caplog.text
    assert options["wcsoffset"] == (0.0, 0.0)
    assert name not in options


def test_unknown_flags_warn_by_name(caplog):
    with caplog.at_level(logging.WARNING, logger="podi_commandline"):
        options = parse("-frobnicate=3", "--verbose", "-Gain")
    for arg in ("-frobnicate=3", "--verbose", "-Gain"):
        assert f"unknown flag {arg} ignored" in caplog.text
    assert options["verbose"] is False and options["gain"] is False


def test_repeated_flag_warns_and_the_last_counts(caplog):
    with caplog.at_level(logging.WARNING, logger="podi_commandline"):
        assert parse("-ncpus=2", "-ncpus=5")["ncpus"] == 5
    assert "-ncpus given more than once" in caplog.text


@pytest.mark.parametrize("flags, expected", [
    (("-photcalib",), {"photcalib": True, "fixwcs": True, "fitradialZP": False}),
    (("-fitradialZP",), {"photcalib": True, "fixwcs": True, "fitradialZP": True}),
    (("-fixwcs",), {"photcalib": False, "fixwcs": True, "fitradialZP": False}),
])
def test_calibrations_turn_on_the_steps_they_need(flags, expected, caplog):
    with caplog.at_level(logging.INFO, logger="podi_commandline"):
        options = parse(*flags)
    assert {key: options[key] for key in expected} == expected
    if flags == ("-photcalib",):
        assert "-photcalib needs -fixwcs: turned on" in caplog.text


def test_overscan_method_is_checked():
    with pytest.raises(OptionError, match="clippedmean, median"):
        parse("-overscan=mean")


def test_persistency_takes_a_folder_and_update_only_needs_it():
    assert parse("-persistency=/p")["persistency"] == "/p"
    assert parse("-persistency=/p", "-update_persistency_only")["update_persistency_only"]
    with pytest.raises(OptionError, match="^-update_persistency_only needs -persistency=DIR$"):
        parse("-update_persistency_only")


def test_fringe_flags_take_paths():
    options = parse("-fringe=/cals", "-fringevectors=/cals/vectors")
    assert (options["fringe"], options["fringevectors"]) == ("/cals", "/cals/vectors")


def test_nonsidereal_takes_rates_and_a_reference(tmp_path):
    motion = parse("-nonsidereal=60,-40.5,56620.25")["nonsidereal"]
    assert (motion.dra, motion.ddec, motion.reference_mjd) == (60.0, -40.5, 56620.25)
    reference = tmp_path / "ref.fits"
    fits.PrimaryHDU(header=fits.Header({"MJD-OBS": 56621.5})).writeto(reference)
    assert parse(f"-nonsidereal=1,2,{reference}")["nonsidereal"].reference_mjd == 56621.5


@pytest.mark.parametrize("value, message", [
    ("1,2", "expected three items dRA,dDec,ref, got 2"),
    ("a,2,56000", "rates 'a', '2' must be numbers"),
    ("1,2,/no/such.fits", "neither an MJD nor an existing file"),
    ("1,2,nan", "is not finite"),
])
def test_malformed_nonsidereal_is_an_option_error(value, message):
    with pytest.raises(OptionError, match=f"^-nonsidereal={re.escape(value)}: .*{re.escape(message)}"):
        parse(f"-nonsidereal={value}")


def test_pupilghost_takes_a_path_or_means_the_cals_folder():
    assert parse("-pupilghost=/cals/pg")["pupilghost"] == "/cals/pg"
    assert parse("-pupilghost")["pupilghost"] == "auto"


# --- values ------------------------------------------------------------------------

def test_addfitskey_splits_at_the_first_comma_and_repeats():
    options = parse("-addfitskey=comment,a, b, c", "-addfitskey=PROGID,2013B-0123",
                    "-addfitskey=EMPTY,", "-addfitskey=proj-id,x=1")
    assert options["addfitskey"] == {"COMMENT": "a, b, c", "PROGID": "2013B-0123",
                                     "EMPTY": "", "PROJ-ID": "x=1"}


@pytest.mark.parametrize("value, message", [
    ("TOOLONGKEY,x", "keyword 'TOOLONGKEY' must be 1-8 characters"),
    ("BAD KEY,x", "keyword 'BAD KEY' must be 1-8 characters"),
    (",x", "keyword '' must be 1-8 characters"),
    ("NAXIS2,5", "keyword NAXIS2 describes the file structure"),
    ("naxis,5", "keyword NAXIS describes the file structure"),
    ("bitpix,8", "keyword BITPIX describes the file structure"),
    ("EXTNAME,foo", "keyword EXTNAME describes the file structure"),
    ("END,x", "keyword END describes the file structure"),
    ("NOCOMMA", "expected KEY,value"),
    ("OBSERVER,Jürgen", "value of OBSERVER must be printable ASCII"),
])
def test_addfitskey_bad_input(value, message):
    with pytest.raises(OptionError, match=message) as info:
        parse(f"-addfitskey={value}")
    assert "\n" not in str(info.value)


def test_addfitskey_bare_is_an_error():
    with pytest.raises(OptionError, match="-addfitskey=: expected KEY,value"):
        parse("-addfitskey")


@pytest.mark.parametrize("flags, expected", [
    ((), math.nan),
    (("-prep4sex",), -1e31),
    (("-prep4sex", "-indefval=0"), 0.0),
    (("-indefval=0", "-prep4sex"), 0.0),
    (("-indefval=nan", "-prep4sex"), math.nan),
    (("-indefval=-5",), -5.0),
])
def test_prep4sex_and_indefval(flags, expected):
    value = parse(*flags)["indefval"]
    assert (math.isnan(value) and math.isnan(expected)) or value == expected


@pytest.mark.parametrize("flag, message", [
    ("-timeout=0", "must be a positive number of seconds"),
    ("-timeout=soon", "-timeout=soon: not a number"),
    ("-ncpus=0", "must be at least 1"),
    ("-ncpus=2.5", "-ncpus=2.5: not an integer"),
    ("-wcsoffset=0.1", "expected two numbers dRA,dDec"),
    ("-wcsoffset=0.1,0.2,0.3", "expected two numbers dRA,dDec"),
    ("-wcsoffset=a,b", "-wcsoffset=a,b: expected two numbers"),
    ("-singleota=99x", "'99x' is not an OTA number"),
    ("-singleota=100", "'100' is not an OTA number"),
    ("-skipota=33,,34", "'' is not an OTA number"),
    ("-plotformat=png,", "empty entry in the list"),
    ("-plotformat=png,jpx", r"jpx not a plot format \(choose from .*pdf.*png"),
    ("-gain=relative", "-gain takes no value"),
    ("-bias", "-bias needs a value"),
    ("-flat=", "-flat needs a non-empty value"),
    ("-wcsoffset", "-wcsoffset needs a value"),
])
def test_bad_values(flag, message):
    with pytest.raises(OptionError, match=message) as info:
        parse(flag)
    assert "\n" not in str(info.value)


def test_pgf_plots_need_latex(monkeypatch):
    monkeypatch.setattr(cl.shutil, "which", lambda name: None)
    with pytest.raises(OptionError, match=r"-plotformat=png,pgf: pgf needs xelatex \(LaTeX\), which is "
                                          "not installed"):
        parse("-plotformat=png,pgf")
    monkeypatch.setattr(cl.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert parse("-plotformat=png,pgf")["plotformat"] == ["png", "pgf"]


# --- output file names (templates, folders, .fits) ---------------------------------

HEADER = {"FILTER": "odi_r", "OBJECT": "M 31 (field 2), 'A'/\"B\" \\x`y", "OBSID": "o20131212T012345.1",
          "EXPTIME": 300}


@pytest.mark.parametrize("output, expected", [
    ("out/%OBSID.fits", "out/o20131212T012345.1.fits"),
    ("out/%OBSSEQ_%FILTER_%EXPTIME.fits", "out/o20131212T012345_odi_r_300.0.fits"),
    ("%OBJECT.fits", "M_31__field_2____A___B___x_y.fits"),
    ("%FILTERx", "odi_rx.fits"),
    ("red/%OBSID", "red/o20131212T012345.1.fits"),
    ("red/", "red/collectcells.fits"),
    ("mergedcells.fits", "mergedcells.fits"),
    ("a.FITS", "a.FITS"),
])
def test_expand_output_name(output, expected):
    assert expand_output_name(output, HEADER) == Path(expected)


def test_output_naming_an_existing_directory(tmp_path):
    assert expand_output_name(str(tmp_path), HEADER) == tmp_path / "collectcells.fits"
    assert not (tmp_path / "new").exists()
    assert expand_output_name(f"{tmp_path}/new/", HEADER) == tmp_path / "new" / "collectcells.fits"
    assert not (tmp_path / "new").exists()  # the caller creates directories


@pytest.mark.parametrize("output, message", [
    ("out/%OBSDATE.fits", "unknown tag %OBSDATE"),
    ("out/%filter.fits", "unknown tag %filter"),
    ("100%.fits", r"unknown tag % \(known: %FILTER"),
])
def test_unknown_tag_is_an_error(output, message):
    with pytest.raises(OptionError, match=message):
        expand_output_name(output, HEADER)


def test_tag_without_header_keyword_is_an_error():
    with pytest.raises(OptionError, match="%OBSSEQ needs OBSID, which the raw header lacks"):
        expand_output_name("%OBSSEQ.fits", {"FILTER": "odi_r"})
