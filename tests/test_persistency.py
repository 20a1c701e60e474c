"""podi_persistency: saturation catalogs and their index, against the raw data.

The saturated pixels are checked against the raw cells read here with astropy, not
through the pipeline's reader; the index against two processes writing at once.
"""

import math
import multiprocessing
import sqlite3

import numpy as np
import pytest
from astropy.io import fits

import podi_persistency
from conftest import run_collectcells, small_spec
from podi_simulate import simulate_exposure

#: A star of magnitude 9 near the pointing saturates on OTA 33 in 300 s.
BRIGHT = small_spec(otas=(33, 34), seed=21, mjd=56620.35,
                    extra_stars=((150.0 - 0.03 / math.cos(math.radians(30.0)), 29.97, 9.0),))


@pytest.fixture(scope="module")
def bright_exposure(tmp_path_factory):
    return simulate_exposure(BRIGHT, tmp_path_factory.mktemp("bright"), ncpus=2)


def raw_saturated(path):
    """(cell x, cell y, column, row) of every raw pixel at 65535, read with astropy."""
    found = set()
    with fits.open(path) as hdus:
        for hdu in hdus[1:]:
            for row, column in np.argwhere(hdu.data >= 65535):
                found.add((hdu.header["WN_CELLX"], hdu.header["WN_CELLY"], column, row))
    return found


def test_update_only_writes_the_catalog_and_nothing_else(bright_exposure, tmp_path, capsys):
    folder = tmp_path / "persistency"
    output = tmp_path / "out.fits"
    assert run_collectcells(bright_exposure, output, f"-persistency={folder}",
                            "-update_persistency_only") == 0
    assert not output.exists()
    catalog = folder / f"{bright_exposure.name}.saturated.fits"
    assert str(catalog) in capsys.readouterr().out
    with fits.open(catalog) as hdus:
        assert hdus[0].header["MJD-OBS"] == BRIGHT.mjd
        for ota in (33, 34):
            table = hdus[f"OTA{ota}.SATPIX"].data
            listed = set(zip(table["CELL_X"], table["CELL_Y"], table["X"], table["Y"]))
            assert listed == raw_saturated(bright_exposure / f"{bright_exposure.name}.{ota}.fits")
        assert len(hdus["OTA33.SATPIX"].data) > 20  # the star saturated: the check can fail
    rows = podi_persistency.indexed_catalogs(folder)
    assert [(row[0], row[1], row[2]) for row in rows] == [(str(catalog.resolve()), bright_exposure.name,
                                                            BRIGHT.mjd)]
    assert rows[0][3] == pytest.approx(BRIGHT.mjd + BRIGHT.exptime / 86400)


def _write_rows(folder, prefix, count):
    for i in range(count):
        podi_persistency.add_to_index(folder, f"{folder}/{prefix}{i}.saturated.fits", f"{prefix}{i}",
                                      56620.0 + i / 1440, 56620.0 + (i + 1) / 1440)


def test_two_processes_write_one_index(tmp_path):
    """Two writers at once leave an index that lists both, readable by a third."""
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_rows, args=(tmp_path, prefix, 40)) for prefix in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    rows = podi_persistency.indexed_catalogs(tmp_path)
    assert sorted(row[1] for row in rows) == sorted(f"{p}{i}" for p in "ab" for i in range(40))
    within = podi_persistency.indexed_catalogs(tmp_path, 56620.0 + 9.5 / 1440, 56620.0 + 12.5 / 1440)
    assert sorted(row[1] for row in within) == ["a10", "a11", "a12", "b10", "b11", "b12"]
    # The index is a plain SQLite database: any tool reads it.
    with sqlite3.connect(tmp_path / podi_persistency.INDEX_NAME) as connection:
        assert connection.execute("SELECT COUNT(*) FROM catalogs").fetchone() == (80,)


def test_no_index_yet_lists_nothing(tmp_path):
    assert podi_persistency.indexed_catalogs(tmp_path) == []
