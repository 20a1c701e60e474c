"""The night's manifest: one SQLite row per frame (or master) with its state, and the
night summary table written from it.

A row is keyed by its output file, relative to the output folder. Its *fingerprint*
covers what the result depends on: the name, size and modification time (ns) of
every input file, the options, and the code version (:data:`CODE_VERSION`). A rerun
skips a row that is ``done`` with the same fingerprint and whose output exists;
any other row is reduced again. States: ``pending`` (known, not started),
``running``, ``done``, ``failed``. Only the command's own process writes the
manifest, each change in one transaction, so a killed run leaves it consistent: rows
left ``running`` are set back to ``pending`` by the next run.

Input files are fingerprinted by size and time, as ``make`` and ``rsync`` do, not by
content: hashing a full exposure (470 MB) would cost a second per frame on every rerun.
"""

import hashlib
import json
import math
import os
import sqlite3
import time
from pathlib import Path

from podi_definitions import PIPELINE_VERSION
from podi_mef import replaced_atomically

#: File name of the manifest in the output folder.
MANIFEST_NAME = "multicollect.sqlite"
#: Night summary tables in the output folder.
SUMMARY_NAME = "night_summary"

#: Summary columns from the output's primary header: column -> (keyword, type).
HEADER_COLUMNS = {"date_obs": ("DATE-OBS", str), "mjd": ("MJD-OBS", float), "object": ("OBJECT", str),
                  "filter": ("FILTER", str), "exptime": ("EXPTIME", float), "airmass": ("AIRMASS", float),
                  "seeing": ("SEEING", float), "sky_level": ("SKYLEVEL", float), "sky_mag": ("SKYMAG", float),
                  "zero_point": ("PHOTZP", float), "depth": ("PHOTDPTH", float), "wcs_rms": ("WCS_RMS", float),
                  "failed_otas": ("FAILOTAS", str)}
#: Every column of the manifest, in summary order (SQLite type).
COLUMNS = {"output": "TEXT PRIMARY KEY", "kind": "TEXT", "input": "TEXT", "state": "TEXT",
           "fingerprint": "TEXT", "attempts": "INTEGER", "started": "REAL", "finished": "REAL",
           "seconds": "REAL", "cpu_seconds": "REAL", "error": "TEXT",
           **{name: ("REAL" if kind is float else "TEXT") for name, (_, kind) in HEADER_COLUMNS.items()}}


def _code_version():
    """PIPELINE_VERSION and a digest of the program's modules: a changed module is new code."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).resolve().parent.glob("podi_*.py")):
        digest.update(module.read_bytes())
    return f"{PIPELINE_VERSION}+{digest.hexdigest()[:12]}"


CODE_VERSION = _code_version()


def fingerprint(files, options):
    """Digest of the input files (name, size, mtime) and the options, with the code version."""
    stats = []
    for path in sorted(map(str, files)):
        try:
            status = os.stat(path)
            stats.append((path, status.st_size, status.st_mtime_ns))
        except OSError:
            stats.append((path, None, None))
    text = json.dumps({"files": stats, "options": list(options), "code": CODE_VERSION})
    return hashlib.sha256(text.encode()).hexdigest()


class Manifest:
    """The SQLite manifest of an output folder (created if new)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        # Autocommit: every statement is its own transaction.
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS frames "
                        f"({', '.join(f'{name} {kind}' for name, kind in COLUMNS.items())})")
        self.db.execute("UPDATE frames SET state = 'pending', error = 'interrupted' WHERE state = 'running'")

    def close(self):
        self.db.close()

    def row(self, output):
        cursor = self.db.execute("SELECT * FROM frames WHERE output = ?", (output,))
        values = cursor.fetchone()
        return None if values is None else dict(zip([c[0] for c in cursor.description], values))

    def rows(self):
        cursor = self.db.execute("SELECT * FROM frames ORDER BY mjd, output")
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, values)) for values in cursor.fetchall()]

    def is_done(self, output, digest):
        """Whether ``output`` was made by a run with this fingerprint and still exists."""
        row = self.row(output)
        return (row is not None and row["state"] == "done" and row["fingerprint"] == digest
                and (self.folder / output).exists())

    def plan(self, output, kind, source, digest, header):
        """Record a frame as ``pending`` with what is known before it runs."""
        values = {"output": output, "kind": kind, "input": str(source), "state": "pending",
                  "fingerprint": digest, "attempts": 0, "started": None, "finished": None,
                  "seconds": None, "cpu_seconds": None, "error": None, **_header_values(header)}
        self.db.execute(f"INSERT OR REPLACE INTO frames ({', '.join(values)}) VALUES "
                        f"({', '.join('?' * len(values))})", list(values.values()))

    def update(self, output, **values):
        self.db.execute(f"UPDATE frames SET {', '.join(f'{key} = ?' for key in values)} WHERE output = ?",
                        list(values.values()) + [output])

    def running(self, output):
        self.update(output, state="running", started=time.time(), error=None)

    def finished(self, output, result, header=None):
        """Record a task's outcome (:class:`podi_multicollect.TaskResult`); on success the
        QA numbers come from the output's primary header."""
        self.update(output, state="done" if result.ok else "failed", attempts=result.attempts,
                    started=result.started or None, finished=time.time(), seconds=round(result.seconds, 2),
                    cpu_seconds=round(result.cpu_seconds, 2), error=result.error or None,
                    **(_header_values(header) if header is not None else {}))

    def write_summary(self):
        """The night summary, ``night_summary.csv`` and ``.fits``, from every row
        (each file replaced whole: a reader never sees half a table)."""
        import numpy as np
        from astropy.table import Table
        rows = self.rows()
        table = Table({name: np.array([_column_value(row[name], name) for row in rows],
                                      dtype=float if _numeric(name) else str) for name in COLUMNS})
        for suffix, form in ((".csv", "ascii.csv"), (".fits", "fits")):
            with replaced_atomically(self.folder / (SUMMARY_NAME + suffix)) as temporary:
                table.write(temporary, format=form, overwrite=True)


def _numeric(name):
    return COLUMNS[name] in ("REAL", "INTEGER")


def _column_value(value, name):
    if _numeric(name):
        return math.nan if value is None else float(value)
    return "" if value is None else str(value)


def _header_values(header):
    """The summary's header columns from a primary header (None where absent or unusable)."""
    values = {}
    for name, (key, kind) in HEADER_COLUMNS.items():
        value = header.get(key) if header is not None else None
        try:
            value = None if value is None else kind(value)
        except (TypeError, ValueError):
            value = None
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        values[name] = value.strip() if isinstance(value, str) else value
    return values
