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


def test_two_reductions_into_one_folder_at_once(masked_sequence, tmp_path):
    """Two podi_collectcells processes reduce different frames into one folder at the same
    time; a third process reads an index that lists both."""
    import subprocess
    import sys
    folder = tmp_path / "shared"
    cals = masked_sequence["bright"].parent / "cals"
    runs = [subprocess.Popen([sys.executable, "-m", "podi_collectcells", str(exposure),
                              str(tmp_path / f"{minutes}.fits"), f"-cals={cals}", "-ncpus=1",
                              f"-persistency={folder}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for minutes, exposure in masked_sequence["later"].items()]
    assert [run.wait(300) for run in runs] == [0, 0]
    listing = subprocess.run([sys.executable, "-c", "import sys, podi_persistency; print(*[row[1] for "
                              "row in podi_persistency.indexed_catalogs(sys.argv[1])])", str(folder)],
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listing) == sorted(exposure.name for exposure in masked_sequence["later"].values())


def test_no_index_yet_lists_nothing(tmp_path):
    assert podi_persistency.indexed_catalogs(tmp_path) == []


# --- Masks in a sequence: the bright frame, 5 and 15 minutes after it ends --------------

@pytest.fixture(scope="module")
def masked_sequence(bright_exposure, tmp_path_factory):
    """The bright exposure and two exposures of the field without the star, starting 5 and
    15 minutes after it ended, reduced in order into one persistency folder (the later
    ones also without -persistency)."""
    import dataclasses

    from podi_simulate import write_true_calibrations
    root = tmp_path_factory.mktemp("masked")
    write_true_calibrations(BRIGHT, root / "cals")
    end = BRIGHT.mjd + BRIGHT.exptime / 86400
    # The simulator leaves the bright frame's persistent charge in the later ones.
    truth = bright_exposure.parent / f"{bright_exposure.name}.truth.fits"
    later = {minutes: simulate_exposure(dataclasses.replace(
        BRIGHT, extra_stars=(), seed=22 + minutes, sequence=2 + minutes, mjd=end + minutes / 1440,
        persistence_from=(str(truth),)), root / "raw", ncpus=2) for minutes in (5, 15)}
    outputs = {}
    for key, exposure in (("bright", bright_exposure), (5, later[5]), (15, later[15])):
        outputs[key] = root / f"{key}.fits"
        assert run_collectcells(exposure, outputs[key], f"-cals={root / 'cals'}", "-ncpus=2",
                                f"-persistency={root / 'persistency'}") == 0
    for minutes in (5, 15):
        outputs[(minutes, "plain")] = root / f"{minutes}_plain.fits"
        assert run_collectcells(later[minutes], outputs[(minutes, "plain")], f"-cals={root / 'cals'}",
                                "-ncpus=2") == 0
    outputs["later"] = later
    return outputs


def saturated_in_image(exposure, ota, binning=2):
    """OTA pixels (rows, columns) that hold a raw pixel at 65535 (science sections only)."""
    from podi_definitions import cell_to_ota
    rows, columns = [], []
    for cx, cy, x, y in raw_saturated(exposure / f"{exposure.name}.{ota}.fits"):
        cell_rows, cell_columns = cell_to_ota(cx, cy, binning)
        if x < cell_columns.stop - cell_columns.start and y < cell_rows.stop - cell_rows.start:
            rows.append(cell_rows.start + y)
            columns.append(cell_columns.start + x)
    return np.array(rows), np.array(columns)


def test_trails_are_masked_in_their_own_frame(masked_sequence, bright_exposure):
    rows, columns = saturated_in_image(bright_exposure, 33)
    with fits.open(masked_sequence["bright"]) as hdus:
        image = hdus["OTA33.SCI"].data
        assert hdus["OTA33.SCI"].header["NSATPIX"] > 20
        assert hdus["OTA33.SCI"].header["SATMASK"] == f"{bright_exposure.name}.saturated.fits"
        assert np.isnan(image[rows, columns]).all()
        assert np.isfinite(image).mean() > 0.9


def test_persistence_masked_5_minutes_later_untouched_15_minutes_later(masked_sequence, bright_exposure):
    rows, columns = saturated_in_image(bright_exposure, 33)
    exposure = masked_sequence["later"][5]
    charge = fits.getdata(exposure.parent / f"{exposure.name}.truth.fits", "PERSIST")
    charge = charge[(charge["ota"] == 33) & (charge["electrons"] > 10)]
    assert len(charge) > 20  # the simulator left charge to be masked
    with fits.open(masked_sequence[5]) as hdus:
        assert np.isnan(hdus["OTA33.SCI"].data[charge["y"], charge["x"]]).all()
        assert np.isnan(hdus["OTA33.SCI"].data[rows, columns]).all()
        assert hdus["OTA33.SCI"].header["PERSIS01"] == f"{bright_exposure.name}.saturated.fits"
    with fits.open(masked_sequence[15]) as hdus, fits.open(masked_sequence[(15, "plain")]) as plain:
        # The 5-minute frame (nothing saturated) is within 10 minutes, the bright one is not.
        used = [value for key, value in hdus["OTA33.SCI"].header.items() if key.startswith("PERSIS")]
        assert f"{bright_exposure.name}.saturated.fits" not in used and len(used) == 1
        # Where the bright star saturated, the 15-minute frame is as reduced without masks.
        np.testing.assert_array_equal(hdus["OTA33.SCI"].data[rows, columns],
                                      plain["OTA33.SCI"].data[rows, columns])
        assert np.isfinite(hdus["OTA33.SCI"].data[rows, columns]).all()


def one_pixel_catalog(cell_x, cell_y, x, y):
    table = np.zeros(1, dtype=[("CELL_X", ">i2"), ("CELL_Y", ">i2"), ("X", ">i2"), ("Y", ">i2")])
    table[0] = (cell_x, cell_y, x, y)
    return table


@pytest.mark.parametrize("catalog_binning, binning", [(1, 2), (2, 1), (2, 2)])
def test_masks_across_binnings(catalog_binning, binning):
    """A pixel saturated at one binning is masked at the same place of a frame of another:
    raw-cell pixel (x, y) at binning b covers unbinned (b x .. b x + b - 1)."""
    from podi_definitions import cell_origin, cell_to_ota
    size = 4096 // binning
    x_unbinned, y_unbinned = 200, 100  # first unbinned pixel of the saturated one
    catalog = one_pixel_catalog(3, 5, x_unbinned // catalog_binning, y_unbinned // catalog_binning)
    x0, y0 = cell_origin(3, 5, binning)
    width = max(1, catalog_binning // binning)  # binned columns the pixel covers
    column = slice(x0 + x_unbinned // binning, x0 + x_unbinned // binning + width)
    top = y0 + (y_unbinned + catalog_binning - 1) // binning  # its highest row

    persistent = np.ones((size, size), np.float32)
    podi_persistency.mask_saturation(persistent, catalog, binning, trails=False,
                                     catalog_binning=catalog_binning)
    assert np.isnan(persistent[y0:top + 1, column]).all()
    assert np.isfinite(persistent[top + 1:, column]).all() and np.isfinite(persistent[:, column.stop]).all()
    assert np.isnan(persistent).sum() == (top + 1 - y0) * width

    trail = np.ones((size, size), np.float32)
    podi_persistency.mask_saturation(trail, catalog, binning, trails=True, catalog_binning=catalog_binning)
    lowest = y0 + y_unbinned // binning
    cell_rows, _ = cell_to_ota(3, 5, binning)
    assert np.isnan(trail[lowest:cell_rows.stop, column]).all()
    assert np.isfinite(trail[:lowest, column]).all() and np.isfinite(trail[cell_rows.stop:, column]).all()


def test_model_corrects_weak_persistence_to_the_noise(masked_sequence, bright_exposure, tmp_path):
    """With -persistency_model the 5-minute frame's persistent pixels are corrected, not
    masked: they equal those of the same frame (same seed) simulated without
    persistence, within the noise; uncorrected they stand far out."""
    import dataclasses
    exposure = masked_sequence["later"][5]
    cals = masked_sequence["bright"].parent / "cals"
    folder = masked_sequence["bright"].parent / "persistency"
    spec = dataclasses.replace(BRIGHT, extra_stars=(), seed=27, sequence=7,
                               mjd=fits.getval(exposure / f"{exposure.name}.33.fits", "MJD-OBS"))
    clean = simulate_exposure(spec, tmp_path / "clean", ncpus=2)
    modelled, plain = tmp_path / "modelled.fits", tmp_path / "plain.fits"
    assert run_collectcells(exposure, modelled, f"-cals={cals}", "-ncpus=2", f"-persistency={folder}",
                            "-persistency_model") == 0
    assert run_collectcells(clean, plain, f"-cals={cals}", "-ncpus=2") == 0
    rows, columns = saturated_in_image(bright_exposure, 33)
    with fits.open(modelled) as hdus, fits.open(plain) as reference, \
            fits.open(masked_sequence[(5, "plain")]) as uncorrected:
        header = hdus["OTA33.SCI"].header
        corrected = hdus["OTA33.SCI"].data[rows, columns]
        truth = reference["OTA33.SCI"].data[rows, columns]
        noise = reference["OTA33.SCI"].header["SKYNOISE"]
        assert np.mean(uncorrected["OTA33.SCI"].data[rows, columns] - truth) > 3 * noise
    assert header["PERSCORR"] >= len(rows) and header["PERSAMP"] > 0
    assert np.isfinite(corrected).all()
    difference = corrected - truth
    # Noise of the same pixels in two frames with different seeds: sqrt(2) x noise each.
    assert abs(np.mean(difference)) < 3 * math.sqrt(2) * noise / math.sqrt(len(rows))
    assert np.std(difference) < 1.5 * math.sqrt(2) * noise


def test_unreadable_earlier_catalog_is_a_warning(tmp_path, caplog):
    broken = tmp_path / "o1.saturated.fits"
    broken.write_text("not FITS")
    assert podi_persistency.read_catalog(broken, 33) is None
    assert "unreadable" in caplog.text and str(broken) in caplog.text


def test_unusable_catalog_folder_stops_before_any_output(bright_exposure, tmp_path, capsys):
    """A catalog folder that cannot be made stops the frame first: never a written frame
    whose catalog is then missing."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    output = tmp_path / "out.fits"
    assert run_collectcells(bright_exposure, output, f"-persistency={blocker}") == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "cannot create the catalog folder" in message[0] and str(blocker) in message[0]
    assert not output.exists()
