"""Choose the calibration file valid at a given time from a history file.

A history file lists calibration files with the MJD from which each is valid::

    # comment
    00000.0 nonlinearity_pre20131014_datafrom20130924.fits
    56582.0 nonlinearity_datafrom2013nov19.fits   [optional download url]

An entry is valid from its MJD up to the MJD of the next entry (the last one for
ever). File names are relative to the folder of the history file. Blank lines and
everything after ``#`` are ignored, so ``# 56582.0 old.fits`` disables an entry.
"""

import logging
import math
from pathlib import Path

from podi_definitions import layout_for_mjd

log = logging.getLogger(__name__)


def read_history(history_file):
    """Parse a history file.

    Parameters
    ----------
    history_file : str or Path

    Returns
    -------
    list of (float, str)
        ``(start_mjd, filename)`` in file order; MJDs never decrease.

    Raises
    ------
    FileNotFoundError
        The history file does not exist.
    ValueError
        A line is not ``<MJD> <filename> [url]``, or the MJDs decrease (the
        "valid until the next entry" rule would be ambiguous).
    """
    history_file = Path(history_file)
    try:
        text = history_file.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"history file {history_file} not found") from None
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        start = _parse_mjd(words[0]) if len(words) in (2, 3) else None
        if start is None:
            raise ValueError(f"{history_file}:{lineno}: malformed history line "
                             f"{line.strip()!r} (expected '<MJD> <filename> [url]')")
        if entries and start < entries[-1][0]:
            raise ValueError(f"{history_file}:{lineno}: MJD {start} is earlier than "
                             f"the previous entry's {entries[-1][0]}")
        entries.append((start, words[1]))
    return entries


def _parse_mjd(word):
    """A finite float from a history line's first word, else None."""
    try:
        value = float(word)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def select_from_history(history_file, mjd):
    """Path of the calibration file valid at ``mjd``.

    Parameters
    ----------
    history_file : str or Path
    mjd : float
        Time of the observation (``MJD-OBS``, days).

    Returns
    -------
    Path
        The last entry whose start MJD is <= ``mjd``, relative names resolved
        against the history file's folder. Its existence is not checked.

    Raises
    ------
    FileNotFoundError
        The history file does not exist.
    ValueError
        The file is malformed, or no entry starts at or before ``mjd``.
    """
    history_file = Path(history_file)
    mjd = float(mjd)
    if not math.isfinite(mjd):
        raise ValueError(f"{history_file}: cannot select a file for MJD {mjd}")
    valid = [name for start, name in read_history(history_file) if start <= mjd]
    if not valid:
        raise ValueError(f"{history_file}: no entry valid at MJD {mjd}")
    return history_file.parent / valid[-1]


def calibration_file_for_mjd(directory_or_file, history_name, mjd):
    """Resolve a calibration given either as a file or as a folder with a history.

    Parameters
    ----------
    directory_or_file : str or Path
        A calibration file (returned as is), or a folder holding ``history_name``
        directly or in the subfolder named after the focal plane in use at
        ``mjd`` (``podi`` or ``odi_5x6``, as the real crosstalk folder is laid out).
    history_name : str
        Name of the history file, e.g. ``crosstalk.history``.
    mjd : float
        ``MJD-OBS`` of the observation (days).

    Returns
    -------
    Path
        An existing calibration file.

    Raises
    ------
    FileNotFoundError
        Neither the file nor a history file exists, or the history names a file
        that is missing.
    ValueError
        The history file is malformed or has no entry valid at ``mjd``.
    """
    path = Path(directory_or_file)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"calibration {path} not found")
    candidates = [path / history_name, path / layout_for_mjd(mjd).name / history_name]
    history = next((c for c in candidates if c.is_file()), None)
    if history is None:
        raise FileNotFoundError(f"no {history_name} in {path}; looked for "
                                + " and ".join(str(c) for c in candidates))
    selected = select_from_history(history, mjd)
    if not selected.is_file():
        raise FileNotFoundError(f"{history} selects {selected.name} for MJD {mjd}, "
                                f"but {selected} does not exist")
    log.debug("%s selects %s for MJD %s", history, selected, mjd)
    return selected
