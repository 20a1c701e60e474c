"""Tests of podi_ipprefcat: reference catalogs from files, tiled directories and Gaia."""

import math
import sys
import types

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

import podi_ipprefcat as rc
import podi_sphere
from podi_ipprefcat import RefcatError, open_refcat, write_tiled_catalog

#: Query fields (ra, dec, radius): ordinary, RA wrap-around both sides, the poles, and
#: a field near the pole where a radius/cos(dec) RA half-width (51.6 deg) is too small.
FIELDS = [(150.0, 30.0, 1.0), (0.1, 20.0, 1.0), (359.9, -10.0, 1.0),
          (45.0, 89.8, 0.5), (200.0, -89.9, 0.3), (30.0, 89.0, 0.9)]


def cap_sample(rng, ra0, dec0, radius, number):
    """Points uniform on the sphere within ``radius`` degrees of (ra0, dec0)."""
    cos_r = 1 - rng.random(number) * (1 - math.cos(math.radians(radius)))
    rho, phi = np.arccos(cos_r), rng.uniform(0, 2 * np.pi, number)
    # Around the north pole, then rotated to the centre (about y by 90-dec0, z by ra0).
    xyz = np.array([np.sin(rho) * np.cos(phi), np.sin(rho) * np.sin(phi), np.cos(rho)])
    tilt, turn = math.radians(90 - dec0), math.radians(ra0)
    x = xyz[0] * math.cos(tilt) + xyz[2] * math.sin(tilt)
    z = -xyz[0] * math.sin(tilt) + xyz[2] * math.cos(tilt)
    x, y = (x * math.cos(turn) - xyz[1] * math.sin(turn),
            x * math.sin(turn) + xyz[1] * math.cos(turn))
    return np.degrees(np.arctan2(y, x)) % 360, np.degrees(np.arcsin(np.clip(z, -1, 1)))


@pytest.fixture(scope="module")
def sky():
    """A uniform whole-sky sample plus dense caps around the test fields (fixed seed)."""
    rng = np.random.default_rng(2024)
    n_sky = 100_000
    ra = [rng.uniform(0, 360, n_sky)]
    dec = [np.degrees(np.arcsin(rng.uniform(-1, 1, n_sky)))]
    for ra0, dec0, radius in FIELDS:
        r, d = cap_sample(rng, ra0, dec0, 1.5 * radius, 3000)
        ra.append(r)
        dec.append(d)
    ra, dec = np.concatenate(ra), np.concatenate(dec)
    table = Table({"id": np.arange(len(ra)), "ra": ra, "dec": dec})
    table["r"] = rng.uniform(14, 22, len(ra))
    table["r_err"] = 0.01 + 0.0 * table["r"]
    return table


@pytest.fixture(scope="module")
def sky_file(sky, tmp_path_factory):
    path = tmp_path_factory.mktemp("refcat") / "sky.fits"
    sky.write(path)
    return path


@pytest.fixture(scope="module")
def tiled_dir(sky, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiled")
    write_tiled_catalog(sky, directory, tile_deg=30)
    return directory


def brute_force_ids(table, ra0, dec0, radius):
    separation = SkyCoord(table["ra"], table["dec"], unit="deg").separation(
        SkyCoord(ra0, dec0, unit="deg")).deg
    return set(table["id"][separation <= radius])


# --- Cone search ----------------------------------------------------------------------

@pytest.mark.parametrize("ra0, dec0, radius", FIELDS)
def test_file_query_equals_brute_force(sky, sky_file, ra0, dec0, radius):
    result = open_refcat(sky_file).query(ra0, dec0, radius)
    expected = brute_force_ids(sky, ra0, dec0, radius)
    # The dense cap puts 3000/1.5**2 = 1333 stars inside the radius; expect >1200.
    assert len(expected) > 1200
    assert set(result["id"]) == expected
    assert len(result) == len(expected)
    assert {"ra", "dec", "r", "r_err"} <= set(result.colnames)


def test_wraparound_finds_stars_on_both_sides(sky_file):
    result = open_refcat(sky_file).query(0.1, 20.0, 1.0)
    ra = np.asarray(result["ra"])
    # Both sides of RA 0 contribute (about 45% of the circle lies at RA > 359).
    assert np.sum(ra > 359) > 400
    assert np.sum(ra < 1.2) > 400


def test_near_pole_needs_exact_ra_width(sky_file):
    ra0, dec0, radius = 30.0, 89.0, 0.9
    result = open_refcat(sky_file).query(ra0, dec0, radius)
    dra = np.abs((np.asarray(result["ra"]) - ra0 + 180) % 360 - 180)
    small_angle_width = radius / math.cos(math.radians(dec0))
    assert small_angle_width == pytest.approx(51.57, abs=0.01)
    # Stars beyond the small-angle width exist and are found (exact width is 64.2 deg).
    assert np.sum(dra > small_angle_width) > 10
    assert dra.max() < 64.2


def test_empty_field_returns_empty_table(tmp_path):
    path = tmp_path / "small.fits"
    Table({"ra": [150.0, 150.1], "dec": [30.0, 30.1], "g": [15.0, 16.0]}).write(path)
    result = open_refcat(path).query(10.0, -40.0, 1.0)
    assert len(result) == 0
    assert result.colnames == ["ra", "dec", "g"]


# --- Tiled directories ----------------------------------------------------------------

@pytest.mark.parametrize("ra0, dec0, radius", FIELDS)
def test_tiled_equals_single_file(sky_file, tiled_dir, ra0, dec0, radius):
    single = open_refcat(sky_file).query(ra0, dec0, radius)
    tiled = open_refcat(tiled_dir).query(ra0, dec0, radius)
    assert sorted(tiled["id"]) == sorted(single["id"])
    order = np.argsort(tiled["id"])
    np.testing.assert_array_equal(tiled["ra"][order], single["ra"][np.argsort(single["id"])])


@pytest.mark.parametrize("ra0, dec0, radius, tiles", [
    (100.0, 10.0, 1.0, 1),     # inside one 30x30 deg tile
    (150.0, 30.0, 1.0, 4),     # on a tile corner
    (0.1, 20.0, 1.0, 2),       # both sides of RA 0
    (45.0, 89.8, 0.5, 12),     # the whole polar band
])
def test_tiled_reads_only_needed_tiles(tiled_dir, ra0, dec0, radius, tiles):
    catalog = open_refcat(tiled_dir)
    assert len(catalog.index) == 72
    catalog.query(ra0, dec0, radius)
    assert len(catalog.tiles_read) == tiles
    catalog.query(ra0, dec0, radius)
    assert len(catalog.tiles_read) == tiles    # tiles are kept, not read again


def test_tile_wrapping_through_ra_zero(sky, sky_file, tmp_path):
    write_tiled_catalog(sky, tmp_path, tile_deg=30, ra_start=15.0)
    catalog = open_refcat(tmp_path)
    wrapping = catalog.index[catalog.index["ra_min"] > catalog.index["ra_max"]]
    assert len(wrapping) == 6                   # one per Dec band
    assert (wrapping["ra_min"][0], wrapping["ra_max"][0]) == (345.0, 15.0)
    for ra0 in (0.1, 359.9):
        result = catalog.query(ra0, 20.0, 1.0)
        assert set(result["id"]) == brute_force_ids(sky, ra0, 20.0, 1.0)
    assert [p.name for p in catalog.tiles_read] == ["tile_d003_r011.fits"]


def test_tiled_without_index_or_with_bad_tile(sky, tmp_path):
    with pytest.raises(RefcatError, match="has no SkyTable.fits"):
        open_refcat(tmp_path)
    write_tiled_catalog(sky, tmp_path, tile_deg=30)
    (tmp_path / "tile_d003_r003.fits").write_text("garbage")
    with pytest.raises(RefcatError, match="tile_d003_r003.fits"):
        open_refcat(tmp_path).query(100.0, 10.0, 1.0)


# --- Formats and errors -----------------------------------------------------------------

def test_csv_and_fits_agree(sky, tmp_path):
    part = sky[podi_sphere.select_circle(sky["ra"], sky["dec"], 150.0, 30.0, 3.0)]
    fits_path, csv_path = tmp_path / "part.fits", tmp_path / "part.csv"
    part.write(fits_path)
    renamed = part.copy()
    renamed.rename_columns(["ra", "dec"], ["RA", "DEC"])     # upper case is accepted
    renamed.write(csv_path, format="ascii.csv")
    from_fits = open_refcat(fits_path).query(150.0, 30.0, 1.0)
    from_csv = open_refcat(csv_path).query(150.0, 30.0, 1.0)
    assert len(from_csv) == len(from_fits) > 1200
    np.testing.assert_array_equal(from_csv["id"], from_fits["id"])
    np.testing.assert_allclose(from_csv["ra"], from_fits["ra"], rtol=0, atol=1e-12)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(RefcatError, match="nothere.fits does not exist"):
        open_refcat(tmp_path / "nothere.fits")
    bad = tmp_path / "bad.fits"
    bad.write_text("this is not FITS")
    with pytest.raises(RefcatError, match="cannot read reference catalog .*bad.fits"):
        open_refcat(bad).query(0, 0, 1)
    nocoords = tmp_path / "nocoords.fits"
    Table({"x": [1.0], "y": [2.0]}).write(nocoords)
    with pytest.raises(RefcatError, match="nocoords.fits has no ra/dec column"):
        open_refcat(nocoords).query(0, 0, 1)


def test_environment_variable(sky_file, monkeypatch):
    monkeypatch.setenv("PODI_REFCAT", str(sky_file))
    assert len(open_refcat(None).query(150.0, 30.0, 1.0)) == len(
        open_refcat(sky_file).query(150.0, 30.0, 1.0))
    monkeypatch.delenv("PODI_REFCAT")
    with pytest.raises(RefcatError) as error:
        open_refcat(None)
    assert str(error.value) == ("no reference catalog configured: use -refcat=PATH "
                                "or set PODI_REFCAT")


# --- Proper motion -----------------------------------------------------------------------

@pytest.mark.parametrize("epoch_in", ["column", "ref_epoch", "header"])
def test_proper_motion(tmp_path, epoch_in):
    table = Table({"ra": [150.0, 150.01], "dec": [30.0, 30.0], "pmra": [1000.0, 0.0],
                   "pmdec": [-500.0, 0.0]})
    if epoch_in == "header":
        table.meta["EPOCH"] = 2016.0
    else:
        table["epoch" if epoch_in == "column" else "ref_epoch"] = [2016.0, 2016.0]
    path = tmp_path / "pm.fits"
    table.write(path)
    catalog = open_refcat(path)
    moved = catalog.query(150.0, 30.0, 0.1, epoch=2026.0)
    assert (moved["ra"][0] - 150.0) * math.cos(math.radians(30.0)) == pytest.approx(
        10 / 3600, abs=1e-6)
    assert moved["dec"][0] - 30.0 == pytest.approx(-5 / 3600, abs=1e-6)
    assert (moved["ra"][1], moved["dec"][1]) == (pytest.approx(150.01, abs=1e-12), 30.0)
    # Without an epoch the positions are as stored.
    assert catalog.query(150.0, 30.0, 0.1)["ra"][0] == 150.0
    # A 2" circle around the old position is empty in 2026, not in 2016.
    assert len(catalog.query(150.0, 30.0, 2 / 3600, epoch=2026.0)) == 0
    assert len(catalog.query(150.0, 30.0, 2 / 3600, epoch=2016.0)) == 1


def test_proper_motion_at_pole():
    ra, dec = rc.propagate(np.array([0.0]), np.array([89.9999]), np.array([1000.0]),
                           np.array([0.0]), 10.0)
    moved = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(0.0, 89.9999, unit="deg")).arcsec
    assert moved[0] == pytest.approx(10.0, abs=1e-4)
    # 0.36" from the pole towards RA 0, then 10" east (towards RA 90): across the pole's side.
    assert ra[0] == pytest.approx(math.degrees(math.atan2(10.0, 0.36)), abs=1e-3)


def test_proper_motion_tiled(tmp_path):
    table = Table({"ra": [149.999], "dec": [30.0], "pmra": [1000.0], "pmdec": [0.0],
                   "epoch": [2016.0]})
    write_tiled_catalog(table, tmp_path, tile_deg=30)
    result = open_refcat(tmp_path).query(150.0, 30.0, 0.01, epoch=2026.0)
    assert result["ra"][0] == pytest.approx(149.999 + 10 / 3600 / math.cos(math.radians(30)),
                                           abs=1e-6)


# --- Real and simulated catalogs ----------------------------------------------------------

def test_simulator_refcat(tmp_path):
    from podi_simulate import ExposureSpec, simulate_exposure
    exposure = simulate_exposure(ExposureSpec(otas=(33,), binning=2), tmp_path, ncpus=1)
    path = exposure.parent / f"{exposure.name}.refcat.fits"
    stars = open_refcat(path).query(150.0, 30.0, 0.3)
    full = Table.read(path)
    full["id"] = np.arange(len(full))
    expected = brute_force_ids(full, 150.0, 30.0, 0.3)
    assert len(stars) == len(expected)
    # 4000 stars/deg^2 brighter than r = 22 over pi * 0.3^2 deg^2: 1131 expected.
    assert 1000 < len(stars) < 1270
    assert {f"{b}{s}" for b in "ugriz" for s in ("", "_err")} <= set(stars.colnames)


def test_real_gaia_chunk(realdata):
    path = realdata / "external" / "legacypipe" / "chunk-00799.fits"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    catalog = open_refcat(path)
    full = Table.read(path)
    ra0, dec0 = float(np.median(full["ra"])), float(np.median(full["dec"]))
    stars = catalog.query(ra0, dec0, 0.1)
    # 97 stars over about 0.5 x 0.2 deg: 0.1 deg around the median holds about half.
    assert 20 < len(stars) < 97
    assert "phot_g_mean_mag" in stars.colnames
    # At the catalog's own epoch (ref_epoch 2015.5) nothing moves.
    same = catalog.query(ra0, dec0, 0.1, epoch=2015.5)
    np.testing.assert_array_equal(same["ra"], stars["ra"])
    moved = catalog.query(ra0, dec0, 0.1, epoch=2025.5)
    shift = SkyCoord(moved["ra"], moved["dec"], unit="deg").separation(
        SkyCoord(stars["ra"], stars["dec"], unit="deg")).arcsec
    total_pm = np.hypot(stars["pmra"], stars["pmdec"]) / 1000
    np.testing.assert_allclose(shift, 10 * np.ma.filled(total_pm, 0.0), atol=1e-5)


def test_real_tycho_kdtree_file(realdata):
    path = realdata / "external" / "legacypipe" / "tycho2.kd.fits"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    stars = open_refcat(path).query(177.3, 59.5, 0.5)
    assert 10 < len(stars) < 90
    assert "mag_vt" in stars.colnames


# --- Gaia ---------------------------------------------------------------------------

@pytest.fixture
def no_astroquery(monkeypatch, tmp_path):
    monkeypatch.setenv("PODI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "astroquery", None)
    monkeypatch.setitem(sys.modules, "astroquery.gaia", None)


def test_gaia_without_astroquery(no_astroquery):
    catalog = open_refcat("gaia")
    with pytest.raises(RefcatError, match="needs astroquery"):
        catalog.query(150.0, 30.0, 0.2)


class FakeGaia:
    """Stands in for astroquery's Gaia: counts queries, answers with a fixed field."""

    def __init__(self, fail=False):
        self.queries, self.fail = [], fail

    def launch_job_async(self, adql):
        self.queries.append(adql)
        if self.fail:
            raise ConnectionError("Name or service not known\nmore detail")
        rng = np.random.default_rng(5)
        ra, dec = cap_sample(rng, 150.0, 30.0, 0.25, 500)
        table = Table({"source_id": np.arange(500), "ra": ra, "dec": dec,
                       "ref_epoch": np.full(500, 2016.0), "pmra": np.zeros(500),
                       "pmdec": np.zeros(500), "phot_g_mean_mag": rng.uniform(12, 20, 500)})
        return types.SimpleNamespace(get_results=lambda: table)


@pytest.fixture
def fake_gaia(monkeypatch, tmp_path):
    monkeypatch.setenv("PODI_CACHE", str(tmp_path / "cache"))
    service = FakeGaia()
    module = types.ModuleType("astroquery.gaia")
    module.Gaia = service
    monkeypatch.setitem(sys.modules, "astroquery", types.ModuleType("astroquery"))
    monkeypatch.setitem(sys.modules, "astroquery.gaia", module)
    return service


def test_gaia_query_is_cached(fake_gaia, tmp_path, monkeypatch):
    catalog = open_refcat("gaia")
    first = catalog.query(150.0, 30.0, 0.2, epoch=2026.0)
    assert len(fake_gaia.queries) == 1
    # The service is asked for the rounded radius plus one rounding step.
    assert "CIRCLE('ICRS', 150.000000, 30.000000, 0.210000)" in fake_gaia.queries[0]
    cached = sorted((tmp_path / "cache" / "gaia").iterdir())
    assert [p.name for p in cached] == ["gaiadr3_150.000_+30.000_0.200.fits"]
    # 500 stars in a 0.25 deg cap: (0.2/0.25)^2 of them inside 0.2 deg.
    assert 280 < len(first) < 360
    assert "phot_g_mean_mag" in first.colnames

    # Identical and nearly identical queries read the cache, even without astroquery.
    monkeypatch.setitem(sys.modules, "astroquery.gaia", None)
    second = open_refcat("gaia").query(150.0, 30.0, 0.2, epoch=2026.0)
    np.testing.assert_array_equal(second["source_id"], first["source_id"])
    shifted = open_refcat("gaia").query(150.003, 29.998, 0.2)
    everything = Table.read(cached[0])
    assert len(everything) == 500
    assert len(shifted) == len(brute_force_ids(
        Table({"id": everything["source_id"], "ra": everything["ra"], "dec": everything["dec"]}),
        150.003, 29.998, 0.2))
    assert len(fake_gaia.queries) == 1


def test_gaia_network_failure(fake_gaia):
    fake_gaia.fail = True
    with pytest.raises(RefcatError, match="Gaia DR3 query failed .*Name or service not known$"):
        open_refcat("gaia").query(150.0, 30.0, 0.2)
