"""Calibration histories, crosstalk and nonlinearity, checked against the real files."""

import logging

import numpy as np
import pytest
from astropy.io import fits

from podi_crosstalk import (apply_crosstalk, crosstalk_file_for_mjd, default_crosstalk,
                            read_crosstalk)
from podi_history import calibration_file_for_mjd, select_from_history
from podi_nonlinearity import (apply_inverse_nonlinearity, correct_nonlinearity,
                               nonlinearity_file_for_mjd, read_nonlinearity,
                               write_nonlinearity)

NY, NX = 16, 12  # small cells keep the tests fast; the code does not care


# --- history files ------------------------------------------------------------------

@pytest.fixture(scope="module")
def nonlin_dir(mastercals):
    return mastercals / "nonlinearity"


@pytest.mark.parametrize("mjd, expected", [
    (0.0, "nonlinearity_pre20131014_datafrom20130924.fits"),
    (56581.999, "nonlinearity_pre20131014_datafrom20130924.fits"),
    # 56582.0 has a commented-out twin (gain_20131119) that must not win.
    (56582.0, "nonlinearity_datafrom2013nov19.fits"),
    (56750.2, "nonlinearity_datafrom2013nov19.fits"),
    (56750.3, "nonlinearity_april2014.fits"),
    # 57174.0: "# 57174.0 nonlinearity_odi56__20150602.fits" is commented out.
    (57174.0, "nonlinearity_odi56__20150602v2.fits"),
    (60000.0, "nonlinearity_odi56__20150602v2.fits"),
])
def test_real_nonlinearity_history(nonlin_dir, mjd, expected):
    selected = select_from_history(nonlin_dir / "nonlinearity.history", mjd)
    assert selected == nonlin_dir / expected
    assert nonlinearity_file_for_mjd(nonlin_dir, mjd) == nonlin_dir / expected


def test_history_before_first_entry_and_url(tmp_path):
    history = tmp_path / "x.history"
    history.write_text("\n  # header\n56000.5 a.fits http://example.org/a.fits\n"
                       "57000 sub/b.fits  # trailing comment\n")
    assert select_from_history(history, 56000.5) == tmp_path / "a.fits"
    assert select_from_history(history, 57000.0) == tmp_path / "sub" / "b.fits"
    with pytest.raises(ValueError, match=r"x\.history: no entry valid at MJD 56000\.4"):
        select_from_history(history, 56000.4)


@pytest.mark.parametrize("text, lineno", [
    ("56000 a.fits\nfoo.fits\n", 2),
    ("# c\n56000 a.fits b c\n", 2),
    ("56000x a.fits\n", 1),
    ("nan a.fits\n", 1),
    ("57000 a.fits\n56000 b.fits\n", 2),
])
def test_history_malformed_lines(tmp_path, text, lineno):
    history = tmp_path / "bad.history"
    history.write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.history:{lineno}:"):
        select_from_history(history, 58000)


def test_history_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.history"):
        select_from_history(tmp_path / "none.history", 58000)


def test_calibration_file_resolution(tmp_path, mastercals):
    crosstalk = mastercals / "crosstalk"
    # The real crosstalk folder has one history per focal plane.
    assert crosstalk_file_for_mjd(crosstalk, 56500) == (
        crosstalk / "podi" / "crosstalk_odi_5x6.fits")
    assert crosstalk_file_for_mjd(crosstalk, 58000) == (
        crosstalk / "odi_5x6" / "crosstalk_odi_5x6.fits")
    given = crosstalk / "podi" / "crosstalk_odi_5x6.fits"
    assert crosstalk_file_for_mjd(given, 58000) == given
    with pytest.raises(FileNotFoundError, match="crosstalk.history"):
        crosstalk_file_for_mjd(tmp_path, 58000)
    with pytest.raises(FileNotFoundError, match="nothing.fits"):
        crosstalk_file_for_mjd(tmp_path / "nothing.fits", 58000)
    (tmp_path / "n.history").write_text("0 gone.fits\n")
    with pytest.raises(FileNotFoundError, match="gone.fits"):
        calibration_file_for_mjd(tmp_path, "n.history", 58000)


# --- crosstalk ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_crosstalk(mastercals):
    return read_crosstalk(mastercals / "crosstalk" / "podi" / "crosstalk_odi_5x6.fits")


def test_default_crosstalk():
    fwd, inv = default_crosstalk()
    assert fwd.shape == inv.shape == (8, 8, 8)
    assert fwd[5, 2, 6] == fwd[0, 7, 0] == 5.6e-5
    assert np.all(fwd[:, np.arange(8), np.arange(8)] == 1.0)
    assert np.allclose(fwd @ inv, np.eye(8), rtol=0, atol=1e-15)


def test_real_crosstalk_values(real_crosstalk):
    fwd, inv = real_crosstalk
    assert fwd.dtype == np.float64 and fwd.dtype.isnative
    assert fwd[0, 1, 2] == pytest.approx(7.5228e-4, rel=1e-4)
    assert fwd[0, 2, 1] == pytest.approx(6.2914e-5, rel=1e-4)
    assert fwd[0, 1, 0] == pytest.approx(1.1088e-4, rel=1e-3)
    assert np.abs(fwd @ inv - np.eye(8)).max() < 1e-12


def test_crosstalk_orientation(real_crosstalk):
    fwd, _ = real_crosstalk
    signal = 40000.0
    true = np.zeros((8, 8, NY, NX))
    true[3, 1] = signal  # only source cell x=1 of cell row 3 is lit
    raw = apply_crosstalk(true, fwd)
    assert raw[3, 1] == pytest.approx(signal)
    assert np.all(raw[3, 2] == signal * fwd[3, 1, 2])  # ~30.1 ADU
    assert raw[3, 2, 0, 0] == pytest.approx(30.09, abs=0.01)
    assert raw[3, 0, 0, 0] == pytest.approx(signal * 1.1088e-4, rel=1e-3)
    assert np.all(raw[np.arange(8) != 3] == 0)


def test_crosstalk_round_trip(real_crosstalk):
    fwd, inv = real_crosstalk
    rng = np.random.default_rng(3)
    true = rng.integers(60000, 65536, size=(8, 8, NY, NX)).astype(np.float64)
    raw = apply_crosstalk(true, fwd)
    assert np.abs(raw - true).max() > 50  # the mixing is not negligible
    assert np.abs(apply_crosstalk(raw, inv) - true).max() < 1e-3
    raw32 = raw.astype(np.float32)
    back32 = apply_crosstalk(raw32, inv)
    assert back32.dtype == np.float32
    # float32 spacing at 65535 is 0.0039 ADU; a few units of it are allowed.
    assert np.abs(back32 - true).max() < 0.02


def test_crosstalk_in_place(real_crosstalk):
    _, inv = real_crosstalk
    cells = np.random.default_rng(4).uniform(0, 65535, (8, 8, NY, NX)).astype(np.float32)
    expected = apply_crosstalk(cells, inv)
    result = apply_crosstalk(cells, inv, out=cells)
    assert result is cells
    assert np.array_equal(cells, expected)


def test_crosstalk_bad_input(real_crosstalk):
    fwd, _ = real_crosstalk
    with pytest.raises(TypeError):
        apply_crosstalk(np.zeros((8, 8, 4, 4), dtype=np.uint16), fwd)
    with pytest.raises(ValueError, match="shape"):
        apply_crosstalk(np.zeros((8, 7, 4, 4)), fwd)


def _write_cubes(path, **cubes):
    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(cube, name=name.replace("_", "."))
                                  for name, cube in cubes.items()]
    fits.HDUList(hdus).writeto(path)


def test_read_crosstalk_inverse_handling(tmp_path, real_crosstalk, caplog):
    fwd, inv = real_crosstalk
    _write_cubes(tmp_path / "fwd_only.fits", XTALK_FWD=fwd)
    _, computed = read_crosstalk(tmp_path / "fwd_only.fits")
    assert np.allclose(computed, inv, rtol=0, atol=1e-15)

    wrong = inv.copy()
    wrong[2, 1, 2] += 1e-4
    _write_cubes(tmp_path / "wrong_inv.fits", XTALK_FWD=fwd, XTALK_INV=wrong)
    with caplog.at_level(logging.WARNING, logger="podi_crosstalk"):
        _, used = read_crosstalk(tmp_path / "wrong_inv.fits")
    assert "wrong_inv.fits" in caplog.text and "not the inverse" in caplog.text
    assert np.allclose(used, inv, rtol=0, atol=1e-15)


def test_read_crosstalk_errors(tmp_path):
    _write_cubes(tmp_path / "flat.fits", XTALK_FWD=np.eye(8))
    with pytest.raises(ValueError, match=r"flat\.fits.*shape \(8, 8\)"):
        read_crosstalk(tmp_path / "flat.fits")
    _write_cubes(tmp_path / "noext.fits", OTHER=np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match=r"noext\.fits.*XTALK\.FWD"):
        read_crosstalk(tmp_path / "noext.fits")
    (tmp_path / "text.fits").write_text("not fits")
    with pytest.raises(ValueError, match=r"text\.fits"):
        read_crosstalk(tmp_path / "text.fits")
    with pytest.raises(FileNotFoundError, match=r"absent\.fits"):
        read_crosstalk(tmp_path / "absent.fits")


# --- nonlinearity -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gain2013(nonlin_dir):
    return read_nonlinearity(nonlin_dir / "nonlinearity_gain_20131119.fits")


REAL_ROWS = {
    "nonlinearity_april2014.fits": 819,
    "nonlinearity_asis_20131011.fits": 815,
    "nonlinearity_datafrom2013nov19.fits": 819,
    "nonlinearity_gain_20131119.fits": 819,
    "nonlinearity_odi56__20150602.fits": 1832,
    "nonlinearity_odi56__20150602v2.fits": 1833,
    "nonlinearity_pre20131014.fits": 815,
    "nonlinearity_pre20131014_datafrom20130924.fits": 815,
}


def test_all_real_tables_load(nonlin_dir):
    files = sorted(nonlin_dir.glob("*.fits"))
    assert {f.name for f in files} == set(REAL_ROWS)
    for path in files:
        table = read_nonlinearity(path)
        assert table.polyorder == 3
        assert len(table.keys) == REAL_ROWS[path.name]
        assert table.coeffs.shape == (len(table.keys), 2)
        assert (table.saturation is not None) == ("odi56" in path.name)


def test_oldest_table_has_unit_gains(nonlin_dir):
    table = read_nonlinearity(nonlin_dir / "nonlinearity_pre20131014.fits")
    assert table.relative_gain(33, 3, 3) == 1.0
    assert table.coefficients(33, 3, 3)[0] < 0


def test_real_correction_at_40000(gain2013):
    coeffs = gain2013.coefficients(33, 3, 3)
    assert coeffs == pytest.approx([-7.41475e-7, 5.85318e-12], rel=1e-5)
    assert gain2013.relative_gain(33, 3, 3) == pytest.approx(0.91574, abs=1e-5)
    data = np.full(3, 40000.0, dtype=np.float32)
    correct_nonlinearity(data, coeffs)
    assert data.dtype == np.float32
    assert data[0] - 40000 == pytest.approx(-811.76, abs=0.01)
    # Typical over the whole table: about -1.9 % at 40000 ADU.
    corrections = [correct_nonlinearity(np.array([40000.0]), gain2013.coeffs[row])[0]
                   - 40000 for row in range(len(gain2013.keys))]
    assert not gain2013.absurd
    assert np.median(corrections) == pytest.approx(-766.4, abs=0.1)


def test_correction_float32_and_nan(gain2013):
    coeffs = gain2013.coefficients(22, 5, 2)
    levels = np.array([np.nan, -50.0, 0.0, 1000.0, 30000.0, 65535.0])
    exact = levels + coeffs[0] * levels**2 + coeffs[1] * levels**3
    single = correct_nonlinearity(levels.astype(np.float32), coeffs)
    assert np.isnan(single[0])
    assert np.abs(single[1:] - exact[1:]).max() < 0.01


def test_inverse_round_trip(gain2013):
    levels = np.linspace(-200.0, 70000.0, 5001)
    levels[7] = np.nan
    for key in [(33, 3, 3), (22, 5, 2), (61, 0, 0), (0, 2, 7)]:
        coeffs = gain2013.coefficients(*key)
        raw = apply_inverse_nonlinearity(levels.copy(), coeffs)
        assert np.isnan(raw[7])
        assert np.nanmax(np.abs(raw - levels)) > 100  # inverse does something
        back = correct_nonlinearity(raw, coeffs)
        assert np.nanmax(np.abs(back - levels)) < 1e-3
    single = levels.astype(np.float32)
    coeffs = gain2013.coefficients(33, 3, 3)
    correct_nonlinearity(apply_inverse_nonlinearity(single, coeffs), coeffs)
    assert np.nanmax(np.abs(single - levels)) < 0.02


def test_missing_cells_warn_once_per_ota(gain2013, caplog):
    with caplog.at_level(logging.WARNING, logger="podi_nonlinearity"):
        values = {(cx, cy): (gain2013.coefficients(34, cx, cy),
                             gain2013.relative_gain(34, cx, cy))
                  for cx in range(8) for cy in range(8)}
    assert values[(3, 1)] == (None, 1.0) and values[(1, 7)] == (None, 1.0)
    assert sum(coeffs is None for coeffs, _ in values.values()) == 2
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "OTA 34" in message and "XY31" in message and "XY17" in message


def test_ota_missing_from_table(gain2013, caplog):
    with caplog.at_level(logging.WARNING, logger="podi_nonlinearity"):
        assert gain2013.coefficients(45, 0, 0) is None
    assert "OTA 45 is not in nonlinearity_gain_20131119.fits" in caplog.text


def test_absurd_rows_ignored(nonlin_dir, caplog):
    v2 = read_nonlinearity(nonlin_dir / "nonlinearity_odi56__20150602v2.fits")
    row = v2.keys.index((33, 0, 6))
    assert v2.gains[row] == pytest.approx(549.09, abs=0.01)
    with caplog.at_level(logging.WARNING, logger="podi_nonlinearity"):
        assert v2.coefficients(33, 0, 6) is None
        assert v2.relative_gain(33, 0, 6) == 1.0
        assert v2.saturation_level(33, 0, 6) is None
    assert "XY06" in caplog.text and "549" in caplog.text
    assert v2.relative_gain(33, 1, 6) == pytest.approx(v2.gains[v2.keys.index((33, 1, 6))])
    assert 0.2 < v2.relative_gain(33, 1, 6) < 5
    # The pODI table in use until MJD 56582 has one cell correcting by -27 % at 60000.
    old = read_nonlinearity(nonlin_dir / "nonlinearity_pre20131014_datafrom20130924.fits")
    assert old.coefficients(32, 0, 5) is None
    assert old.coefficients(32, 1, 5) is not None


# The real files carry prose in TDISPn, which astropy flags when they are opened raw.
@pytest.mark.filterwarnings("ignore::astropy.io.fits.verify.VerifyWarning")
def test_write_read_round_trip(tmp_path, nonlin_dir):
    rng = np.random.default_rng(5)
    keys = [(ota, cx, cy) for ota in (33, 0) for cx in range(8) for cy in range(8)]
    ota, cellx, celly = np.array(keys).T
    coeffs = np.column_stack([rng.uniform(-1e-6, -3e-7, len(keys)),
                              rng.uniform(0, 1e-11, len(keys))])
    gains = rng.uniform(0.8, 1.2, len(keys))
    uncert = rng.uniform(0, 1e-8, coeffs.shape)
    path = tmp_path / "nl.fits"
    write_nonlinearity(path, ota, cellx, celly, coeffs, gains, uncertainties=uncert)
    table = read_nonlinearity(path)
    assert table.polyorder == 3 and table.keys == keys
    assert np.array_equal(table.coeffs, coeffs)
    assert np.array_equal(table.gains, gains)
    assert np.array_equal(table.uncertainties, uncert)
    assert table.coefficients(0, 7, 2).tolist() == coeffs[keys.index((0, 7, 2))].tolist()
    # Same layout as the real files, so the original pipeline reads it too.
    real = fits.open(nonlin_dir / "nonlinearity_gain_20131119.fits")
    ours = fits.open(path)
    assert ours[0].header["POLYORDR"] == 3
    assert ours[1].columns.names == real[1].columns.names
    assert ours[1].columns.formats == real[1].columns.formats
    with pytest.raises(OSError):
        write_nonlinearity(path, ota, cellx, celly, coeffs, gains)


def test_write_higher_order_default_uncertainties(tmp_path):
    path = tmp_path / "p4.fits"
    write_nonlinearity(path, [22], [1], [2], [[-1e-6, 2e-11, -3e-16]], [1.1])
    table = read_nonlinearity(path)
    assert table.polyorder == 4
    assert table.coefficients(22, 1, 2).tolist() == [-1e-6, 2e-11, -3e-16]
    assert table.uncertainties.tolist() == [[0.0, 0.0, 0.0]]
    data = np.array([20000.0])
    correct_nonlinearity(data, table.coefficients(22, 1, 2))
    assert data[0] == pytest.approx(20000 - 400 + 160 - 48, abs=1e-6)


def test_write_and_read_errors(tmp_path):
    with pytest.raises(ValueError, match="one value per row"):
        write_nonlinearity(tmp_path / "a.fits", [33, 33], [0], [0], [[1e-7, 0]], [1.0])
    with pytest.raises(ValueError, match="cell indices"):
        write_nonlinearity(tmp_path / "b.fits", [33], [8], [0], [[1e-7, 0]], [1.0])
    with pytest.raises(FileNotFoundError, match="absent.fits"):
        read_nonlinearity(tmp_path / "absent.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("OTA", "B", array=[33])])]).writeto(tmp_path / "nopoly.fits")
    with pytest.raises(ValueError, match=r"nopoly\.fits: POLYORDR"):
        read_nonlinearity(tmp_path / "nopoly.fits")
    primary = fits.PrimaryHDU()
    primary.header["POLYORDR"] = 3
    fits.HDUList([primary, fits.BinTableHDU.from_columns(
        [fits.Column("OTA", "B", array=[33])])]).writeto(tmp_path / "nocol.fits")
    with pytest.raises(ValueError, match=r"nocol\.fits.*CELLX.*COEFF_X\*\*3"):
        read_nonlinearity(tmp_path / "nocol.fits")
