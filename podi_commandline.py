"""Command line of ``podi_collectcells input output.fits [flags]``.

Flags keep the original single-dash style: ``-flag`` or ``-flag=value`` (the value
is everything after the first ``=``), in any order and anywhere among the
positional arguments. Positional arguments are the entries that do not start with
``-``, or that start with ``-`` followed by a digit (negative numbers).
:func:`parse_commandline` turns ``argv`` into one flat dictionary of options;
:func:`expand_output_name` fills in the output file name from the raw header.

Options (key = flag name unless noted; ``DEFAULTS`` holds the defaults)::

    input                      exposure directory or OTA file (1st positional)  required
    output                     output file, may hold %TAGs (2nd positional)     'mergedcells.fits'
    -cals=DIR                  folder of masters, nonlinearity/, crosstalk/     None
    -bias=DIR|FILE|none        master bias; overrides -cals; none: off          None (no bias)
    -dark=DIR|FILE|none        master dark; overrides -cals; none: off          None (no dark)
    -flat=DIR|FILE|none        master flat; overrides -cals; none: off          None (no flat)
    -bpm[=DIR]                 ds9 bad-pixel regions; bare: package's own       None (off)
    -nonlinearity[=FILE|DIR]   nonlinearity table; bare: <cals>/nonlinearity/   None (off)
    -wcs[=FILE|DIR|none]       canned WCS; bare: package's model; none: TAN     None (package's model)
    -crosstalk[=FILE|DIR|none] crosstalk matrix; bare: <cals>/crosstalk/        None (built-in coefficient)
    -gain                      output in electrons instead of ADU               False
    -fixwcs                    astrometric calibration against -refcat          False
    -refcat=PATH|gaia          reference catalog (table, tiled folder, gaia)    None ($PODI_REFCAT)
    -simplewcs                 plain TAN WCS, no distortion terms               False
    -wcsoffset=dRA,dDec        pointing offset (degrees), added to CRVAL        (0.0, 0.0)
    -prep4sex                  undefined pixels -1e31, headers self-contained   False
    -indefval=X                value of undefined pixels                        nan (-1e31 with -prep4sex)
    -singleota=XX              reduce only this OTA                             None (all)
    -skipota=XX,YY             OTAs to leave out                                []
    -centralonly               only the central 3x3 OTAs                        False
    -noclobber                 skip the exposure if the output exists           False
    -bgmode                    quiet background mode                            False
    -photcalib                 photometric zero point; implies -fixwcs          False
    -fitradialZP               radial zero-point gradient; implies -photcalib   False
    -colourterms               the original's colour terms in -photcalib        False
    -plotformat=a,b            QA plot file formats                             ['png']
    -otalevelplots             one QA plot file per OTA and kind                'panels' (one figure
                                                                                of all OTAs per kind)
    -nootalevelplots           key otalevelplots: no per-OTA QA plots           'panels' 
    -qasubdirs                 QA plots in a subfolder                          False
    -qasubdirname=NAME         name of that subfolder; implies -qasubdirs       'QA'
    -noqaplots                 key create_qaplots: no QA plots at all           True
    -addfitskey=KEY,value      add a primary keyword (repeatable)               {}
    -overscan=METHOD           clippedmean or median of each overscan block     'clippedmean'
    -ncpus=N                   worker processes                                 os.cpu_count()
    -timeout[=SEC]             stop after SEC seconds; bare: 900                None (no limit)
    -verbose                   more log output                                  False
    -profile                   one process, under cProfile                      False
    -update_persistency_only   with -persistency: write the exposure's           False
                               saturation catalog into DIR and nothing else
    -persistency_model         with -persistency: subtract the fitted persistent  False
                               charge where weak, mask only where strong
    -fringe=DIR|FILE           fringe template (folder: fringe__<FILTER>.fits)  None (off)
    -fringevectors=DIR|FILE    folder of the fringe vector regions              None (template's folder)
    -pupilghost[=DIR|FILE]     pupil-ghost template (folder: pupilghost_template___level_<L>__bin<b>.fits;
                               bare: the -cals folder)                           None (off)
    -nonsidereal=dRA,dDec,ref  WCS follows a target moving dRA cos(Dec), dDec   None (off)
                               arcsec/h since ref (an MJD or a FITS file's MJD-OBS)
    -persistency=DIR           mask saturation trails and the persistence of the None
                               exposures that ended within 10 min; write this
                               frame's saturation catalog into DIR
    -pointing, -dither, -target
                               defunct: accepted with a warning, ignored        (no key)
    -help, --help              print the usage text and exit

Unknown flags are reported with a warning and otherwise ignored. Every problem
raises :class:`OptionError` with a one-line message.
"""

import copy
import logging
import math
import os
import shutil
import re
from dataclasses import dataclass
from pathlib import Path

from podi_definitions import ota_from_fppos
from podi_nonsidereal import parse_motion
from podi_overscan import OVERSCAN_METHODS

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "mergedcells.fits"

#: File name used when the output names only a directory.
DIRECTORY_OUTPUT_NAME = "collectcells.fits"

#: Seconds for a bare ``-timeout``.
DEFAULT_TIMEOUT = 900.0

#: Flags of the original that no longer do anything -> hint for the warning.
DEFUNCT_FLAGS = {
    "pointing": "use -wcsoffset=dRA,dDec for a pointing offset",
    "dither": "use -wcsoffset=dRA,dDec for a pointing offset",
    "target": "the pointing is always taken from the raw header",
}

HELP_FLAGS = ("-help", "--help")

#: Header keywords that describe the file structure: -addfitskey must not set them.
RESERVED_KEYWORDS = frozenset({"SIMPLE", "BITPIX", "EXTEND", "XTENSION", "END", "EXTNAME",
                               "EXTVER", "PCOUNT", "GCOUNT", "GROUPS", "BSCALE", "BZERO",
                               "BLANK", "CHECKSUM", "DATASUM", "CONTINUE"})
_NAXIS = re.compile(r"NAXIS\d*")
_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")

#: Characters of ``%OBJECT`` (and every other tag value) that become ``_`` in file names.
_UNSAFE_IN_NAMES = re.compile(r"[ ,()/\\`\"']")
_OUTPUT_TAGS = ("FILTER", "OBJECT", "OBSSEQ", "OBSID", "EXPTIME")
# Known tags are tried first, so '%FILTERx' means the filter followed by 'x';
# the last alternative catches every other '%' so that it can be reported.
_TAG = re.compile(r"%(" + "|".join(_OUTPUT_TAGS) + r"|[A-Za-z0-9_]*)")


class OptionError(ValueError):
    """A command-line problem; the message is one line."""


class HelpRequested(Exception):
    """``-help`` or no arguments: the caller prints :func:`usage` and exits 0."""


# --- Value converters: text after '=' -> option value ------------------------------

def _text(flag, value):
    if not value:
        raise OptionError(f"-{flag} needs a non-empty value")
    return value


def _auto_or_text(flag, value):
    # 'auto' and 'none' are keywords in any case; anything else is a path.
    text = _text(flag, value)
    return text.lower() if text.lower() in ("auto", "none") else text


def _existing_directory(flag, value):
    text = _text(flag, value)
    if not Path(text).expanduser().is_dir():
        raise OptionError(f"-{flag}={text}: not an existing directory")
    return text


def _number(flag, value, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise OptionError(f"-{flag}={value}: not a{'n integer' if kind is int else ' number'}") from None


def _float(flag, value):
    return _number(flag, value)


def _positive_int(flag, value):
    number = _number(flag, value, int)
    if number < 1:
        raise OptionError(f"-{flag}={value}: must be at least 1")
    return number


def _positive_seconds(flag, value):
    seconds = _number(flag, value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise OptionError(f"-{flag}={value}: must be a positive number of seconds")
    return seconds


def _ota(flag, text):
    # OTAs are written as 33 or, as in FPPOS, xy33.
    text = text.strip()
    try:
        ota = ota_from_fppos(text) if text.lower().startswith("xy") else int(text)
    except ValueError:
        ota = -1
    if not 0 <= ota <= 99:
        raise OptionError(f"-{flag}: {text!r} is not an OTA number such as 33")
    return ota


def _ota_list(flag, value):
    return [_ota(flag, item) for item in _text(flag, value).split(",")]


def _offset_pair(flag, value):
    try:
        numbers = [float(part) for part in _text(flag, value).split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 2 or not all(map(math.isfinite, numbers)):
        raise OptionError(f"-{flag}={value}: expected two numbers dRA,dDec (degrees)")
    return tuple(numbers)


def _sky_motion(flag, value):
    try:
        return parse_motion(_text(flag, value))
    except ValueError as error:
        raise OptionError(f"-{flag}={value}: {error}") from None


def _overscan_method(flag, value):
    if value not in OVERSCAN_METHODS:
        raise OptionError(f"-{flag}={value}: use one of {', '.join(OVERSCAN_METHODS)}")
    return value


def _word_list(flag, value):
    words = [word.strip() for word in _text(flag, value).split(",")]
    if not all(words):
        raise OptionError(f"-{flag}={value}: empty entry in the list")
    return words


def _plot_formats(flag, value):
    """File formats matplotlib can write, e.g. ``png,pdf``."""
    formats = _word_list(flag, value)
    # matplotlib is imported only when the flag is given: it costs every start-up 0.3 s.
    from matplotlib.backend_bases import FigureCanvasBase
    known = FigureCanvasBase.get_supported_filetypes()
    unknown = [word for word in formats if word.lower() not in known]
    if unknown:
        raise OptionError(f"-{flag}={value}: {', '.join(unknown)} not a plot format "
                          f"(choose from {', '.join(sorted(known))})")
    formats = [word.lower() for word in formats]
    if "pgf" in formats:
        # matplotlib lays out pgf text with LaTeX: without it every plot would fail.
        from matplotlib import rcParams
        tex = rcParams["pgf.texsystem"]
        if shutil.which(tex) is None:
            raise OptionError(f"-{flag}={value}: pgf needs {tex} (LaTeX), which is not installed")
    return formats


def _fits_key(flag, value):
    """``KEY,value`` -> (KEY, value), split at the first comma."""
    if value is None or "," not in value:
        raise OptionError(f"-{flag}={value or ''}: expected KEY,value")
    key, text = value.split(",", 1)
    key = key.strip().upper()
    if not _KEYWORD.fullmatch(key):
        raise OptionError(f"-{flag}: keyword {key!r} must be 1-8 characters of A-Z, 0-9, '-', '_'")
    if key in RESERVED_KEYWORDS or _NAXIS.fullmatch(key):
        raise OptionError(f"-{flag}: keyword {key} describes the file structure and cannot be set")
    if not (text.isascii() and text.isprintable()):
        raise OptionError(f"-{flag}: value of {key} must be printable ASCII (FITS)")
    return key, text


# --- The flag table ---------------------------------------------------------------

_NEEDS_VALUE = object()  # 'bare' marker: the flag must be given as -flag=value


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    Attributes
    ----------
    name : str
        Flag without the leading ``-``.
    key : str
        Options-dictionary key it sets.
    default
        Value when the flag is absent.
    help : str
        One line for :func:`usage`.
    convert : callable or None
        ``convert(name, text)`` -> value for ``-flag=text``; None for switches,
        which take no value and set ``key`` to ``switch_value``.
    bare
        Value of the flag given without ``=value`` (``_NEEDS_VALUE``: an error).
    switch_value : bool or str
    repeat : bool
        May be given several times; ``convert`` returns ``(key, value)`` pairs
        collected in a dictionary.
    metavar : str
        What follows the flag in :func:`usage`, e.g. ``=DIR`` or ``[=FILE]``.
    """

    name: str
    key: str
    default: object
    help: str
    convert: object = None
    bare: object = _NEEDS_VALUE
    switch_value: object = True
    repeat: bool = False
    metavar: str = ""


def _switch(name, help, key=None, value=True, default=None):
    """A flag without a value; its key defaults to ``not value`` unless given."""
    return Flag(name, key or name, not value if default is None else default, help,
                switch_value=value)


FLAGS = (
    Flag("cals", "cals", None, "folder of master bias, dark and flat, and of nonlinearity/ and "
         "crosstalk/", _existing_directory,
         metavar="=DIR"),
    Flag("bias", "bias", None, "master bias file or folder; overrides -cals; "
         "none: off", _text, metavar="=DIR|FILE|none"),
    Flag("dark", "dark", None, "master dark file or folder; overrides -cals; "
         "none: off", _text, metavar="=DIR|FILE|none"),
    Flag("flat", "flat", None, "master flat file or folder; overrides -cals; "
         "none: off", _text, metavar="=DIR|FILE|none"),
    Flag("bpm", "bpm", None, "folder of bpm_xy<NN>.reg bad-pixel regions; bare: the "
         "package's own", _auto_or_text, bare="auto", metavar="[=DIR]"),
    Flag("nonlinearity", "nonlinearity", None, "nonlinearity table, or folder with "
         "nonlinearity.history; bare: <cals>/nonlinearity/", _auto_or_text, bare="auto",
         metavar="[=FILE|DIR]"),
    Flag("wcs", "wcs", None, "canned WCS file (or folder with wcs.history); none: plain TAN "
         "from the pointing; default: the package's model", _auto_or_text, bare="auto",
         metavar="[=FILE|DIR|none]"),
    Flag("crosstalk", "crosstalk", None, "crosstalk matrix file or folder with "
         "crosstalk.history; bare: <cals>/crosstalk/; none: off; default: built-in "
         "coefficient", _auto_or_text, bare="auto", metavar="[=FILE|DIR|none]"),
    _switch("gain", "output in electrons (each cell times its gain) instead of ADU"),
    _switch("fixwcs", "astrometric calibration against a reference catalog (-refcat)"),
    Flag("refcat", "refcat", None, "reference catalog for -fixwcs and -photcalib: a FITS or CSV "
         "table, a tiled folder with SkyTable.fits, or gaia (default: $PODI_REFCAT)", _text,
         metavar="=PATH|gaia"),
    _switch("simplewcs", "write a plain TAN WCS without distortion terms"),
    Flag("wcsoffset", "wcsoffset", (0.0, 0.0), "pointing offset in degrees, added to CRVAL",
         _offset_pair, metavar="=dRA,dDec"),
    _switch("prep4sex", "undefined pixels -1e31 (unless -indefval), every extension "
            "keeps its full header"),
    Flag("indefval", "indefval", math.nan, "value of undefined pixels (default NaN)",
         _float, metavar="=X"),
    Flag("singleota", "singleota", None, "reduce only this OTA", _ota, metavar="=XX"),
    Flag("skipota", "skipota", [], "leave out these OTAs", _ota_list, metavar="=XX,YY"),
    _switch("centralonly", "reduce only the central 3x3 OTAs"),
    _switch("noclobber", "skip the exposure if the output file exists"),
    _switch("bgmode", "background mode: less output"),
    _switch("photcalib", "photometric zero point, sky brightness and depth against the "
            "reference catalog's ugriz magnitudes; implies -fixwcs"),
    _switch("fitradialZP", "also fit a radial gradient of the zero point (reported, not "
            "applied); implies -photcalib"),
    _switch("colourterms", "apply the original's colour terms in -photcalib: odi_g 0.16 (g-r), "
            "odi_z -0.1277 (i-z)"),
    Flag("plotformat", "plotformat", ["png"], "file formats of the QA plots", _plot_formats,
         metavar="=png,pdf"),
    _switch("otalevelplots", "one QA plot file per OTA and kind (default: one figure of all "
            "OTAs per kind)", value="files", default="panels"),
    _switch("nootalevelplots", "no per-OTA QA plots", key="otalevelplots", value="none",
            default="panels"),
    _switch("qasubdirs", "write QA plots into a subfolder"),
    Flag("qasubdirname", "qasubdirname", "QA", "name of the QA subfolder (implies -qasubdirs)",
         _text, metavar="=NAME"),
    _switch("noqaplots", "no QA plots at all", key="create_qaplots", value=False),
    Flag("addfitskey", "addfitskey", {}, "add KEY = 'value' to the primary header; "
         "repeatable; the value may hold commas", _fits_key, repeat=True, metavar="=KEY,value"),
    Flag("overscan", "overscan", "clippedmean", "statistic of each cell's overscan block: "
         "clippedmean (default) or median", _overscan_method, metavar="=METHOD"),
    Flag("ncpus", "ncpus", os.cpu_count() or 1, "number of worker processes (default: all "
         "CPUs)", _positive_int, metavar="=N"),
    Flag("timeout", "timeout", None, f"stop after SEC seconds (bare: {DEFAULT_TIMEOUT:.0f})",
         _positive_seconds, bare=DEFAULT_TIMEOUT, metavar="[=SEC]"),
    _switch("verbose", "more log output"),
    _switch("profile", "run in one process under cProfile"),
    _switch("update_persistency_only", "with -persistency: write the exposure's saturation "
            "catalog and nothing else"),
    Flag("fringe", "fringe", None, "fringe template fringe__<FILTER>.fits, or its folder "
         "(a filter without one is left alone)", _text, metavar="=DIR|FILE"),
    Flag("fringevectors", "fringevectors", None, "folder of fringevectors__<FILTER>__OTA<xy>.reg "
         "(default: the template's folder)", _text, metavar="=DIR|FILE"),
    Flag("pupilghost", "pupilghost", None, "pupil-ghost template, or its folder (a filter level "
         "without one is left alone); bare: the -cals folder", _auto_or_text, bare="auto",
         metavar="[=DIR|FILE]"),
    Flag("nonsidereal", "nonsidereal", None, "the WCS follows a target moving dRA cos(Dec), dDec "
         "arcsec/hour since ref (an MJD or a FITS file's MJD-OBS)", _sky_motion,
         metavar="=dRA,dDec,ref"),
    Flag("persistency", "persistency", None, "folder of the night's saturation catalogs: mask "
         "saturation trails and the persistence of exposures that ended within 10 minutes; "
         "add this frame's catalog", _text, metavar="=DIR"),
    _switch("persistency_model", "with -persistency: subtract the fitted persistent charge of "
            "earlier exposures where it is weak, mask it only where it is strong"),
)

_FLAGS_BY_NAME = {flag.name: flag for flag in FLAGS}

#: Option key -> default, for every key :func:`parse_commandline` returns.
DEFAULTS = {"input": None, "output": DEFAULT_OUTPUT,
            **{flag.key: flag.default for flag in FLAGS}}

#: Fill value of undefined pixels with -prep4sex (SExtractor treats >= 1e30 as "no data").
PREP4SEX_INDEFVAL = -1e31


def usage():
    """The usage text: synopsis and one line per flag."""
    lines = ["Usage: podi_collectcells input output.fits [flags]", "",
             "input: exposure directory or one OTA file; output may contain %FILTER, "
             "%OBJECT, %OBSID, %OBSSEQ, %EXPTIME", "", "Flags:"]
    for flag in FLAGS:
        synopsis = f"-{flag.name}{flag.metavar}"
        lines.append(f"  {synopsis:<34} {flag.help}")
    for name, hint in DEFUNCT_FLAGS.items():
        lines.append(f"  {'-' + name:<34} defunct, ignored ({hint})")
    lines.append(f"  {'-help':<34} print this text")
    return "\n".join(lines)


# --- Parsing ----------------------------------------------------------------------

def is_positional(arg):
    """True for arguments that are not flags: no leading '-', or '-' then a digit."""
    return not arg.startswith("-") or (len(arg) > 1 and arg[1].isdigit())


def parse_commandline(argv):
    """Turn the command line into the options dictionary.

    Parameters
    ----------
    argv : sequence of str
        Arguments without the program name.

    Returns
    -------
    dict
        Every key of :data:`DEFAULTS`, with the values given on the command line.

    Raises
    ------
    HelpRequested
        No arguments, or ``-help``/``--help``.
    OptionError
        Any other problem: missing input, too many positional arguments, a bad value.
    """
    argv = list(argv)
    if not argv or any(arg in HELP_FLAGS for arg in argv):
        raise HelpRequested()
    options = copy.deepcopy(DEFAULTS)
    positional = [arg for arg in argv if is_positional(arg)]
    given = _apply_flags(options, [arg for arg in argv if not is_positional(arg)])
    _set_positional(options, positional)
    if "qasubdirname" in given:
        options["qasubdirs"] = True
    if options["prep4sex"] and "indefval" not in given:
        options["indefval"] = PREP4SEX_INDEFVAL
    # Each calibration needs the one before: the radial fit the zero point, the zero
    # point the stars' sky positions.
    for step, needs in (("fitradialZP", "photcalib"), ("photcalib", "fixwcs")):
        if options[step] and not options[needs]:
            logger.info("-%s needs -%s: turned on", step, needs)
            options[needs] = True
    for flag in ("update_persistency_only", "persistency_model"):
        if options[flag] and options["persistency"] is None:
            raise OptionError(f"-{flag} needs -persistency=DIR")
    return options


def _apply_flags(options, flag_args):
    """Set options from the flag arguments; return the names of the known flags given."""
    given = []
    for arg in flag_args:
        # One dash only: '--verbose' is not the original's style and is reported.
        name, has_value, value = arg[1:].partition("=")
        flag = _FLAGS_BY_NAME.get(name)
        if name in DEFUNCT_FLAGS:
            logger.warning("-%s is defunct and ignored: %s", name, DEFUNCT_FLAGS[name])
        elif flag is None:
            logger.warning("unknown flag %s ignored (see -help)", arg)
        else:
            if name in given and not flag.repeat:
                logger.warning("-%s given more than once; the last one counts", name)
            given.append(name)
            _apply_flag(options, flag, value if has_value else None)
    return given


def _apply_flag(options, flag, value):
    if flag.convert is None:
        if value is not None:
            raise OptionError(f"-{flag.name} takes no value (got -{flag.name}={value})")
        options[flag.key] = flag.switch_value
    elif flag.repeat:
        key, text = flag.convert(flag.name, value)
        options[flag.key][key] = text
    elif value is None:
        if flag.bare is _NEEDS_VALUE:
            raise OptionError(f"-{flag.name} needs a value: -{flag.name}{flag.metavar}")
        options[flag.key] = flag.bare
    else:
        options[flag.key] = flag.convert(flag.name, value)


def _set_positional(options, positional):
    if not positional:
        raise OptionError("no input given: podi_collectcells input output.fits [flags]")
    if len(positional) > 2:
        # Usually a flag written with a space, '-bias /dir', instead of '-bias=/dir'.
        raise OptionError(f"expected input and output, got {len(positional)} arguments: "
                          f"{' '.join(positional)} (flags take values as -flag=value)")
    options["input"] = positional[0]
    if len(positional) == 2:
        options["output"] = positional[1]


# --- Output file name -------------------------------------------------------------

def expand_output_name(output, primary_header):
    """Final output path: template tags filled in from the raw primary header.

    Parameters
    ----------
    output : str or Path
        Output name from the command line. ``%FILTER``, ``%OBJECT``, ``%OBSID``,
        ``%OBSSEQ`` (``OBSID`` up to its first ``.``) and ``%EXPTIME`` (``%.1f``)
        are replaced; characters that would break a file name (space ``,()/\\```
        and quotes) in the values become ``_``.
    primary_header : mapping
        Primary header of the first raw OTA file.

    Returns
    -------
    Path
        A name ending in ``/`` (or an existing directory) gets ``collectcells.fits``;
        a name not ending in ``.fits`` gets ``.fits`` appended. No directory is
        created here.

    Raises
    ------
    OptionError
        An unknown ``%`` tag, or a tag whose header keyword is missing.
    """
    text = str(output)
    expanded = _TAG.sub(lambda match: _tag_value(match.group(1), text, primary_header), text)
    if expanded.endswith("/") or Path(expanded).is_dir():
        expanded = os.path.join(expanded, DIRECTORY_OUTPUT_NAME)
    if not expanded.lower().endswith(".fits"):
        expanded += ".fits"
    return Path(expanded)


def _tag_value(tag, output, header):
    if tag not in _OUTPUT_TAGS:
        raise OptionError(f"output name {output}: unknown tag %{tag} (known: "
                          + ", ".join(f"%{t}" for t in _OUTPUT_TAGS) + ")")
    keyword = "OBSID" if tag == "OBSSEQ" else tag
    if header.get(keyword) is None:
        raise OptionError(f"output name {output}: %{tag} needs {keyword}, which the raw header lacks")
    value = header[keyword]
    if tag == "EXPTIME":
        try:
            return f"{float(value):.1f}"
        except (TypeError, ValueError):
            raise OptionError(f"output name {output}: EXPTIME = {value!r} is not a number") from None
    text = str(value).strip()
    if tag == "OBSSEQ":
        text = text.split(".", 1)[0]
    # Sanitise every value, not only OBJECT: a '/' anywhere would make a directory.
    return _UNSAFE_IN_NAMES.sub("_", text)
