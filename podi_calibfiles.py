"""Which calibration file each reduction step uses for one exposure.

:func:`resolve_calibrations` turns the command-line options of
:mod:`podi_commandline` plus the raw primary header into one absolute path (or
None = step off) per step. Only existence is checked here; reading the files is
the job of the steps. Rules:

* ``bias``, ``dark``, ``flat``: the step's own flag wins over ``-cals``. The value
  is a file (used as is) or a folder holding the master under its default name
  (:func:`master_name`): ``bias_bin<b>.fits``,
  ``dark_yes_bin<b>.fits``, ``flat_<FILTER>_bin<b>.fits`` with the raw ``FILTER``
  value (as :mod:`podi_makecalibrations` names flats), then the normalised filter
  name. ``-dark=none`` (likewise for bias and flat) switches the step off even
  with ``-cals``.
* ``bpm``: ``auto`` is the package's ``bpm/<layout>/``; otherwise a folder of
  ``bpm_xy<NN>.reg`` files.
* ``nonlinearity``, ``crosstalk``: a file, or a folder with a history file chosen
  by ``MJD-OBS``; the bare flag (``auto``) looks in ``<cals>/nonlinearity/`` or
  ``<cals>/crosstalk/`` (the package ships no instrument tables of its own). An
  absent ``-crosstalk`` gives ``'default'`` (the built-in coefficient),
  ``-crosstalk=none`` None.
* ``wcs``: absent or ``auto`` is the package's model for the focal plane in use;
  ``none`` is None (plain TAN from the pointing); otherwise a file, or a folder
  with ``wcs.history``.

A calibration that was asked for and cannot be found stops the frame before any
OTA is reduced, so that no frame is written without a correction it was asked for:
:class:`CalibrationNotFound` with a one-line message naming the flag and every path
tried.

Decision: the dark under ``-cals``
----------------------------------
``-cals=DIR`` asks for bias, dark and flat alike, so a missing dark is an error
just like a missing bias or flat. Treating it as optional would need a way to tell
"this camera has no dark" from "the dark is in another folder or was made at the
other binning", and the resolver has none; the frame would silently lose its dark
and amplifier-glow correction, which is exactly what the rule above forbids. Nights
without darks are still easy to reduce, explicitly: ``-cals=DIR -dark=none``.
"""

import logging
import os
from pathlib import Path

import podi_history
import podi_wcs
from podi_crosstalk import crosstalk_file_for_mjd
from podi_definitions import filter_level, layout_for_mjd, normalised_filter_name, package_data_dir
from podi_nonlinearity import nonlinearity_file_for_mjd

logger = logging.getLogger(__name__)

#: Keys of the dictionary returned by :func:`resolve_calibrations`.
STEPS = ("bias", "dark", "flat", "bpm", "nonlinearity", "wcs", "crosstalk", "fringe",
         "fringevectors", "pupilghost")

#: Value of the ``crosstalk`` entry meaning "built-in coefficient" (no file).
DEFAULT_CROSSTALK = "default"


class CalibrationNotFound(Exception):
    """A calibration that was asked for cannot be found; the message is one line."""


def resolve_calibrations(options, primary_header, binning):
    """Resolve every calibration file of one exposure.

    Parameters
    ----------
    options : dict
        Options from :func:`podi_commandline.parse_commandline` (keys ``cals``,
        ``bias``, ``dark``, ``flat``, ``bpm``, ``nonlinearity``, ``wcs``,
        ``crosstalk``; missing keys count as absent flags).
    primary_header : mapping
        Raw primary header: ``MJD-OBS`` chooses the focal plane and the history
        entries, ``FILTER``/``FILTERID`` the flat.
    binning : int

    Returns
    -------
    dict
        Step -> absolute path string, or None (step off); ``crosstalk`` may also
        be ``'default'`` (built-in coefficient).

    Raises
    ------
    CalibrationNotFound
        A calibration asked for is missing (or its history file is unusable).
    ValueError
        The header has no usable ``MJD-OBS``.
    """
    mjd = observation_mjd(primary_header)
    layout = layout_for_mjd(mjd)
    cals = options.get("cals")
    resolved = {step: resolve_master(step, options, master_candidates(step, primary_header, binning))
                for step in ("bias", "dark", "flat")}
    resolved["bpm"] = resolve_bpm(options.get("bpm"), layout)
    resolved["nonlinearity"] = resolve_nonlinearity(options.get("nonlinearity"), cals, mjd)
    resolved["wcs"] = resolve_wcs(options.get("wcs"), layout, mjd)
    resolved["crosstalk"] = resolve_crosstalk(options.get("crosstalk"), cals, mjd)
    resolved["fringe"], resolved["fringevectors"] = resolve_fringe(
        options.get("fringe"), options.get("fringevectors"), primary_header)
    resolved["pupilghost"] = resolve_pupilghost(options.get("pupilghost"), cals, primary_header,
                                                binning)
    for step in STEPS:
        logger.debug("%s: %s", step, resolved[step])
    return resolved


def resolve_fringe(template, vectors, primary_header):
    """Fringe template file and vector folder, or (None, None) when fringes stay.

    ``-fringe=FILE`` names the template; ``-fringe=DIR`` looks for
    ``fringe__<FILTER>.fits`` (raw ``FILTER``, then the normalised name) and, when the
    filter has none, leaves the frame alone with a warning: a night loop passes the
    same folder for every filter, and only the red ones have fringes. The vectors
    are ``fringevectors__<FILTER>__OTA<xy>.reg`` in ``-fringevectors=DIR`` (a file
    there stands for its folder), by default next to the template.

    Raises
    ------
    CalibrationNotFound
        A named file or folder does not exist.
    """
    if template is None:
        if vectors is not None:
            logger.warning("-fringevectors=%s without -fringe: ignored", vectors)
        return None, None
    path = _path(template)
    if path.is_dir():
        raw = str(primary_header.get("FILTER", "unknown")).strip()
        names = dict.fromkeys([master_name("fringe", 1, raw),
                               master_name("fringe", 1, normalised_filter_name(primary_header))])
        found = next((path / name for name in names if (path / name).is_file()), None)
        if found is None:
            logger.warning("-fringe=%s: no template for filter %s (tried %s); fringes not removed",
                           template, raw, ", ".join(names))
            return None, None
        path = found
    elif not path.is_file():
        raise CalibrationNotFound(f"-fringe={template}: no such file or folder")
    if vectors is None:
        return _absolute(path), _absolute(path.parent)
    folder = _path(vectors)
    folder = folder.parent if folder.is_file() else folder
    if not folder.is_dir():
        raise CalibrationNotFound(f"-fringevectors={vectors}: no such file or folder")
    return _absolute(path), _absolute(folder)


def resolve_pupilghost(value, cals, primary_header, binning):
    """Pupil-ghost template file, or None when the ghost stays.

    ``-pupilghost=FILE`` names the template; ``-pupilghost=DIR`` (bare: the ``-cals``
    folder) looks for :func:`pupilghost_template_name` of the frame's filter level
    (``FLTARM`` keywords) and binning. A template holds the ghost in unbinned-pixel
    units, so one made from flats of the other binning serves too (with a warning).
    A level without a template leaves the frame alone with a warning: a night loop
    passes the same folder for every filter.

    Raises
    ------
    CalibrationNotFound
        A named file or folder does not exist, or a bare flag without ``-cals``.
    """
    if value is None:
        return None
    if value == "auto":
        if cals is None:
            raise CalibrationNotFound("-pupilghost without a folder needs -cals=DIR")
        value = cals
    path = _path(value)
    if path.is_file():
        return _absolute(path)
    if not path.is_dir():
        raise CalibrationNotFound(f"-pupilghost={value}: no such file or folder")
    level = filter_level(primary_header)
    names = [pupilghost_template_name(level, b) for b in dict.fromkeys([binning, 1, 2])]
    found = next((path / name for name in names if (path / name).is_file()), None)
    if found is None or level <= 0:
        logger.warning("-pupilghost=%s: no template for filter level %d (tried %s); pupil ghost "
                       "not removed", value, level, ", ".join(names[:1] if level <= 0 else names))
        return None
    if found.name != names[0]:
        logger.warning("-pupilghost: no template for binning %d; %s is used", binning, found.name)
    return _absolute(found)


def pupilghost_template_name(level, binning):
    """``pupilghost_template___level_<L>__bin<b>.fits`` (three, then two underscores)."""
    return f"pupilghost_template___level_{level}__bin{binning}.fits"


def observation_mjd(primary_header):
    """``MJD-OBS`` as a float; ValueError (one line) if missing or not a number."""
    value = primary_header.get("MJD-OBS")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"raw primary header has no usable MJD-OBS ({value!r}); "
                         "calibrations are chosen by date") from None


def master_name(kind, binning, filter_name=None):
    """Default file name of a master: ``bias_bin1.fits``, ``flat_odi_r_bin1.fits``...

    Fringe templates carry no binning in their name (``fringe__odi_i.fits``): a
    template serves any binning it can be block-averaged to.
    """
    if kind == "bias":
        return f"bias_bin{binning}.fits"
    if kind == "dark":
        return f"dark_yes_bin{binning}.fits"
    if kind == "fringe":
        return f"fringe__{filter_name}.fits"
    return f"flat_{filter_name}_bin{binning}.fits"


def fringe_vectors_name(filter_name, ota):
    """File name of an OTA's fringe vectors: ``fringevectors__odi_i__OTA33.reg``."""
    return f"fringevectors__{filter_name}__OTA{ota:02d}.reg"


def master_candidates(step, primary_header, binning):
    """File names a master of ``step`` may have in a calibration folder, in order."""
    if step != "flat":
        return [master_name(step, binning)]
    # podi_makecalibrations names flats with the raw FILTER value; other folders may
    # use the normalised name.
    raw = str(primary_header.get("FILTER", "unknown")).strip()
    names = [master_name("flat", binning, raw),
             master_name("flat", binning, normalised_filter_name(primary_header))]
    return list(dict.fromkeys(names))


def resolve_master(step, options, names):
    """Path of the master bias, dark or flat, or None if the step is off.

    Parameters
    ----------
    step : {'bias', 'dark', 'flat'}
    options : dict
    names : list of str
        Default file names to look for in a folder (:func:`master_candidates`).
    """
    flag, value = step, options.get(step)
    if value is None:
        flag, value = "cals", options.get("cals")
        if value is None:
            return None
    elif value.lower() == "none":
        return None
    path = _path(value)
    if path.is_file():
        return _absolute(path)
    tried = [path / name for name in names] if path.is_dir() else [path]
    found = next((candidate for candidate in tried if candidate.is_file()), None)
    if found is None:
        raise CalibrationNotFound(f"-{flag}={value}: no master {step} found; tried "
                                  + ", ".join(_absolute(p) for p in tried))
    return _absolute(found)


def resolve_bpm(value, layout):
    """Folder of ``bpm_xy<NN>.reg`` files, or None without ``-bpm``.

    ``auto`` is the package's folder for ``layout``. Where it does not exist the
    frame is still reduced: every OTA without a region file is left unmasked with
    a warning: a missing region file costs the masking, not the frame.
    """
    if value is None:
        return None
    if value == "auto":
        folder = package_data_dir("bpm") / layout.name
        if not folder.is_dir():
            logger.warning("-bpm: the package has no bad-pixel regions for %s (%s); "
                           "no OTA will be masked", layout.name, folder)
        return _absolute(folder)
    path = _path(value)
    if path.is_dir():
        return _absolute(path)
    problem = "is a file, not a folder of bpm_xy<NN>.reg files" if path.is_file() else "does not exist"
    raise CalibrationNotFound(f"-bpm={value}: {_absolute(path)} {problem}")


def resolve_nonlinearity(value, cals, mjd):
    """Nonlinearity table for ``mjd``, or None without ``-nonlinearity``."""
    if value is None:
        return None
    source = _auto_source("nonlinearity", value, cals)
    return _select_by_date("nonlinearity", value, nonlinearity_file_for_mjd, source, mjd)


def resolve_crosstalk(value, cals, mjd):
    """Crosstalk matrix file for ``mjd``; ``'default'`` without the flag, None for ``none``."""
    if value is None:
        return DEFAULT_CROSSTALK
    if value == "none":
        return None
    source = _auto_source("crosstalk", value, cals)
    return _select_by_date("crosstalk", value, crosstalk_file_for_mjd, source, mjd)


def resolve_wcs(value, layout, mjd):
    """Canned WCS file; the package's model unless ``-wcs`` names one; None for ``none``."""
    if value == "none":
        return None
    if value in (None, "auto"):
        try:
            model = podi_wcs.default_canned_wcs_file(layout, mjd)
        except (FileNotFoundError, ValueError) as error:
            raise CalibrationNotFound(f"-wcs: package model for {layout.name}: {error}") from None
        if not model.is_file():
            raise CalibrationNotFound(f"-wcs: package model {_absolute(model)} does not exist")
        return _absolute(model)

    def finder(source, when):
        return podi_history.calibration_file_for_mjd(source, podi_wcs.HISTORY_FILENAME, when)

    return _select_by_date("wcs", value, finder, _path(value), mjd)


def _auto_source(step, value, cals):
    # A bare flag means the step's subfolder of -cals: the package ships no tables.
    if value != "auto":
        return _path(value)
    if cals is None:
        raise CalibrationNotFound(f"-{step} without a file needs -cals=DIR: it looks for "
                                  f"DIR/{step}/{step}.history")
    return _path(cals) / step


def _select_by_date(step, value, finder, source, mjd):
    flag = f"-{step}" if value == "auto" else f"-{step}={value}"
    try:
        return _absolute(finder(source, mjd))
    except (FileNotFoundError, ValueError) as error:
        raise CalibrationNotFound(f"{flag}: {error}") from None


def _path(value):
    return Path(value).expanduser()


def _absolute(path):
    # abspath, not resolve(): keep the user's symlinked folder names in headers.
    return os.path.abspath(path)
