"""A seeded fuzzer: raw OTA files, masters and reference catalogs broken in every way a
real file breaks, each reduced by the whole program; and raw calibration exposures
with a broken OTA file, made into masters by podi_makecalibrations.

For every broken input the run either succeeds (exit 0) with a complete, valid output
file in which the broken OTA is reduced or named in ``FAILOTAS``, or stops (exit 1)
with one line naming the problem and no output file at all. Never a traceback, never
a partial or temporary file left behind.

``make test`` runs a seeded sample (:data:`DEFAULT_CASES` per kind of input); the full
run takes the number from the environment:

    PODI_FUZZ_CASES=450 .venv/bin/python -m pytest -q tests/test_fuzz.py   # 1,162 files
"""

import io
import os
import random
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from conftest import refcat_of, run_collectcells

#: Broken inputs per kind (raw OTA file, master, reference catalog) in ``make test``.
DEFAULT_CASES = 20
CASES = int(os.environ.get("PODI_FUZZ_CASES", DEFAULT_CASES))
#: The OTA whose file is broken; the exposure's others stay intact.
BROKEN_OTA = 34
#: Header keywords of the raw primary that the program relies on, and garbage for them.
PRIMARY_GARBAGE = {"EXPTIME": ["abc", -5.0, 0.0, "NaN", True], "MJD-OBS": ["abc", -1.0, 1e9],
                   "FILTER": ["", 42], "RA": ["xx:yy", "25:00:00", 400.0], "DEC": ["+95:00:00", "abc"],
                   "FPPOS": ["xy3", "ab33", 33], "CCDSUM": ["a b", "3 3", "0 0"], "CCDBIN1": ["x", 7],
                   "OBSTYPE": [5], "ROTSTART": ["north"], "CELLMODE": [3.5]}
CELL_GARBAGE = {"BZERO": [None, 0, "abc", 1e5], "BSCALE": [0.0, 2.0, "x"],
                "GAIN": [0.0, -1.3, "abc"], "EXTNAME": ["XY88", "FOO", "XY00"]}


# --- Running one case ---------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _remove_case_files(tmp_path):
    """Each case's copies and output go when it ends: a full run would keep 80 GB."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def run_case(args, output, capsys):
    """Run podi_collectcells in this process; check the outcome's invariants.

    Returns
    -------
    (int, str, astropy.io.fits.Header or None)
        Exit status, what it printed to stderr, the output's primary header.
    """
    status = run_collectcells(*args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert status in (0, 1)
    leftovers = [p.name for p in output.parent.glob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == [], leftovers
    if status == 1:
        errors = [line for line in captured.err.splitlines() if line.startswith("podi_collectcells: error:")]
        assert len(errors) == 1, captured.err
        assert not output.exists()
        return status, errors[0], None
    with fits.open(output, checksum=True) as hdus:
        hdus.verify("exception")
        primary = hdus[0].header
        names = [hdu.name for hdu in hdus]
        assert len(set(names)) == len(names), names
        reduced = {int(name[3:5]) for name in names if name.startswith("OTA") and name.endswith(".SCI")}
        failed = {int(ota) for ota in str(primary.get("FAILOTAS", "")).split(",") if ota}
        assert primary["NOTAS"] == len(reduced) and primary["NFAILED"] == len(failed)
        for ota in reduced:
            data = hdus[f"OTA{ota:02d}.SCI"].data
            assert not np.isinf(data).any()
    return status, captured.err, primary


def broken_exposure(exposure, tmp_path, write_broken):
    """A copy of the exposure (its intact files linked) whose OTA 34 file
    ``write_broken(source, target)`` writes."""
    folder = tmp_path / exposure.name
    folder.mkdir(parents=True)
    for path in exposure.iterdir():
        if path.name.endswith(f".{BROKEN_OTA}.fits"):
            write_broken(path, folder / path.name)
        else:
            (folder / path.name).symlink_to(path)
    return folder


# --- Ways to break a raw OTA file ------------------------------------------------------------

def truncate(rng, source, target):
    data = source.read_bytes()
    target.write_bytes(data[:rng.randrange(len(data))])


def flip_bytes(rng, source, target, in_header):
    data = bytearray(source.read_bytes())
    with fits.open(source, do_not_scale_image_data=True) as hdus:
        hdu = rng.choice(list(hdus))
        info = hdu.fileinfo()
        start, end = (info["hdrLoc"], info["datLoc"]) if in_header or hdu.data is None else \
            (info["datLoc"], info["datLoc"] + info["datSpan"])
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(start, end)
        data[position] = rng.randrange(256) if not in_header else ord(rng.choice("x'=/ 9.-E\x00"))
    target.write_bytes(bytes(data))


def edit_hdus(rng, source, target, edit):
    """Rewrite the file with ``edit(rng, hdus)`` applied (cells read as unsigned counts,
    written back with their BZERO)."""
    with fits.open(source) as hdus:
        hdus = fits.HDUList([hdus[0].copy()] + [fits.ImageHDU(hdu.data, header=hdu.header) for hdu in hdus[1:]])
    edit(rng, hdus)
    hdus.writeto(target, output_verify="ignore")


def garbage_primary(rng, hdus):
    key = rng.choice(sorted(PRIMARY_GARBAGE))
    if rng.random() < 0.25:
        hdus[0].header.remove(key, ignore_missing=True)
    else:
        hdus[0].header[key] = rng.choice(PRIMARY_GARBAGE[key])


def garbage_cell(rng, source, target):
    """One cell header card replaced by garbage, or blanked, in the file's bytes (as a
    controller or a disk would do it; astropy would rewrite BZERO itself)."""
    data = bytearray(source.read_bytes())
    with fits.open(source, do_not_scale_image_data=True) as hdus:
        cell = rng.randrange(1, len(hdus))
        info = hdus[cell].fileinfo()
        if rng.random() < 0.2:
            # The same counts stored as another type: bytes, doubles or signed integers.
            counts = hdus[cell].data.astype(np.int64) + 32768
            stored = counts.astype(rng.choice([np.uint8, np.float64, np.int32]))
            hdus = fits.HDUList([hdu.copy() for hdu in hdus])
            header = hdus[cell].header
            hdus[cell] = fits.ImageHDU(stored, header=header)
            with fits.open(source) as scaled:
                for i, hdu in enumerate(scaled):
                    if i and i != cell:
                        hdus[i] = fits.ImageHDU(hdu.data, header=hdu.header)
            hdus.writeto(target, output_verify="ignore")
            return
    key = rng.choice(sorted(CELL_GARBAGE))
    value = rng.choice(CELL_GARBAGE[key] or [None])
    image = " " * 80 if value is None else fits.Card(key, value).image
    block = data[info["hdrLoc"]:info["datLoc"]]
    for start in range(0, len(block), 80):
        if block[start:start + 8].decode("ascii", "replace").rstrip() == key:
            data[info["hdrLoc"] + start:info["hdrLoc"] + start + 80] = image.encode("ascii")
            break
    target.write_bytes(bytes(data))


def cell_structure(rng, hdus):
    cell = rng.randrange(1, len(hdus))
    choice = rng.randrange(4)
    if choice == 0:
        del hdus[cell]
    elif choice == 1:
        hdus.append(hdus[cell].copy())
    elif choice == 2:
        rows, cols = hdus[cell].data.shape
        hdus[cell].data = hdus[cell].data[:rows - rng.randint(1, 40), :cols - rng.randint(0, 40)].copy()
    else:
        hdus[cell].header["EXTNAME"] = hdus[rng.randrange(1, len(hdus))].header["EXTNAME"]


def strange_values(rng, hdus):
    """A cell stored as floats, part of it NaN, infinite, negative, 0 or huge."""
    cell = rng.randrange(1, len(hdus))
    data = hdus[cell].data.astype(np.float32)
    rows = slice(rng.randrange(data.shape[0]), None)
    data[rows] = rng.choice([np.nan, np.inf, -500.0, 0.0, 1e9])
    hdus[cell] = fits.ImageHDU(data, header=hdus[cell].header)


def compressed_truncated(rng, source, target):
    with fits.open(source, do_not_scale_image_data=True) as hdus:
        packed = fits.HDUList([fits.PrimaryHDU(header=hdus[0].header)]
                              + [fits.CompImageHDU(hdu.data, header=hdu.header) for hdu in hdus[1:]])
        buffer = io.BytesIO()
        packed.writeto(buffer)
    data = buffer.getvalue()
    (target.parent / (target.name + ".fz")).write_bytes(data[:rng.randrange(len(data) // 2, len(data))])


RAW_BREAKERS = [
    truncate,
    lambda rng, s, t: flip_bytes(rng, s, t, in_header=True),
    lambda rng, s, t: flip_bytes(rng, s, t, in_header=False),
    lambda rng, s, t: edit_hdus(rng, s, t, garbage_primary),
    garbage_cell,
    lambda rng, s, t: edit_hdus(rng, s, t, cell_structure),
    lambda rng, s, t: edit_hdus(rng, s, t, strange_values),
    compressed_truncated,
]


@pytest.mark.parametrize("case", range(CASES))
def test_broken_raw_ota_file(object_exposure, true_cals, tmp_path, capsys, case):
    rng = random.Random(1000 + case)
    breaker = RAW_BREAKERS[case % len(RAW_BREAKERS)]
    exposure = broken_exposure(object_exposure, tmp_path, lambda s, t: breaker(rng, s, t))
    output = tmp_path / "out" / "frame.fits"
    status, message, primary = run_case([exposure, output, f"-cals={true_cals}", "-ncpus=1"], output,
                                        capsys)
    if status == 1:
        # Only the frame-wide inputs may stop the frame; a broken OTA file never does.
        pytest.fail(f"the frame was lost to one broken OTA file: {message}")
    with fits.open(output) as hdus:
        assert "OTA22.SCI" in hdus and "OTA33.SCI" in hdus


# --- Broken masters -----------------------------------------------------------------------------

def break_master(rng, source, target):
    choice = rng.randrange(7)
    if choice == 0:
        truncate(rng, source, target)
        return
    if choice == 1:
        flip_bytes(rng, source, target, in_header=rng.random() < 0.5)
        return
    with fits.open(source) as hdus:
        hdus = fits.HDUList([hdu.copy() for hdu in hdus])
    extension = next(i for i, hdu in enumerate(hdus) if hdu.name == f"OTA{BROKEN_OTA}.SCI")
    data = hdus[extension].data
    if choice == 2:
        data[...] = rng.choice([np.nan, 0.0, -1.0])
    elif choice == 3:
        data[:, : data.shape[1] // rng.randint(2, 8)] = rng.choice([0.0, np.nan, np.inf])
    elif choice == 4:
        hdus[extension].data = data[::2, ::2].copy()
    elif choice == 5:
        del hdus[extension]
    else:
        data += np.float32(rng.choice([1000.0, -3000.0]))
    hdus.writeto(target, output_verify="ignore")


@pytest.mark.parametrize("case", range(CASES))
def test_broken_master(object_exposure, true_cals, tmp_path, capsys, case):
    rng = random.Random(2000 + case)
    cals = tmp_path / "cals"
    cals.mkdir()
    kinds = sorted(p.name for p in true_cals.iterdir() if p.suffix == ".fits")
    broken = kinds[case % len(kinds)]
    for path in true_cals.iterdir():
        if path.name == broken:
            break_master(rng, path, cals / path.name)
        elif path.is_file():
            (cals / path.name).symlink_to(path)
    output = tmp_path / "out" / "frame.fits"
    status, message, primary = run_case([object_exposure, output, f"-cals={cals}", "-ncpus=1"], output,
                                        capsys)
    if status == 1:
        assert broken in message


# --- Broken reference catalogs -----------------------------------------------------------------

def break_catalog(rng, source, target):
    choice = rng.randrange(6)
    if choice == 0:
        truncate(rng, source, target)
        return
    table = Table.read(source)
    if choice == 1:
        table["ra"] = table["ra"].astype(str)
    elif choice == 2:
        table.remove_column(rng.choice(["ra", "dec"]))
    elif choice == 3:
        table["dec"][: len(table) // 2] = np.nan
    elif choice == 4:
        table = table[:0]
    else:
        table["r"] = np.full(len(table), "bright")
    table.write(target)


@pytest.mark.parametrize("case", range(max(CASES // 3, 6)))
def test_broken_reference_catalog(object_exposure, true_cals, tmp_path, capsys, case):
    rng = random.Random(3000 + case)
    refcat = tmp_path / "refcat.fits"
    break_catalog(rng, refcat_of(object_exposure), refcat)
    output = tmp_path / "out" / "frame.fits"
    status, message, primary = run_case([object_exposure, output, f"-cals={true_cals}", "-ncpus=1",
                                         "-photcalib", "-noqaplots", f"-refcat={refcat}"], output, capsys)
    if status == 1:
        assert "refcat.fits" in message
    else:
        assert primary["NOTAS"] == 3


# --- Broken calibration exposures (podi_makecalibrations) ------------------------------------

#: Largest change of an OTA's median in a master made with one broken input frame:
#: ADU for a bias or dark, a fraction for a flat (normalised to 1). A median of five
#: frames absorbs one outlier; more means the broken frame was combined in.
MASTER_TOLERANCE = {"bias": 1.0, "dark": 1.0, "flat": 0.005}


@pytest.mark.parametrize("case", range(max(CASES // 4, 6)))
def test_broken_calibration_exposure(calibration_exposures, masters, tmp_path, capsys, case):
    """One OTA file of one raw bias, dark or flat broken: the master of that kind is made
    from the rest (the OTA from the other frames) or the command stops with one line."""
    from podi_makecalibrations import main
    rng = random.Random(4000 + case)
    kind = ("bias", "dark", "flat")[case % 3]
    frames = calibration_exposures[kind]
    victim = rng.randrange(len(frames))
    inputs = [broken_exposure(frame, tmp_path / f"in{i}", lambda s, t: rng.choice(RAW_BREAKERS)(rng, s, t))
              if i == victim else frame for i, frame in enumerate(frames)]
    outdir = tmp_path / "cals"
    outdir.mkdir()
    earlier = {"bias": [], "dark": ["bias"], "flat": ["bias", "dark"]}[kind]
    for name, path in masters.items():
        if name.split("_")[0] in earlier:
            (outdir / name).symlink_to(path)
    status = main([str(p) for p in inputs] + [str(outdir), "-ncpus=1"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert [p.name for p in outdir.iterdir() if p.name.startswith(".") or ".tmp" in p.name] == []
    made = [p for p in outdir.glob(f"{kind}_*.fits") if not p.is_symlink()]
    if status != 0:
        errors = captured.err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("podi_makecalibrations: error:"), errors
        assert made == []
        return
    (master,) = made
    with fits.open(master, checksum=True) as hdus, fits.open(masters[master.name]) as good:
        hdus.verify("exception")
        for ota in (22, 33, 34):
            name = f"OTA{ota}.SCI"
            if ota == BROKEN_OTA and name not in hdus:
                continue
            change = float(np.nanmedian(hdus[name].data) - np.nanmedian(good[name].data))
            assert abs(change) < MASTER_TOLERANCE[kind], (name, change)
