"""podi_findstars: detections against the simulator's truth and against SExtractor."""

import math

import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

import podi_findstars as pf
from podi_simulate import moffat_alpha
from conftest import TEST_BINNING, TEST_OTAS


@pytest.fixture(scope="module")
def catalogs(reduced_object, object_exposure):
    """Per OTA: (table, truth stars of the OTA, image, header); plus the truth header."""
    truth = fits.open(object_exposure.parent / f"{object_exposure.name}.truth.fits")
    stars = truth["STARS"].data
    out = {}
    with fits.open(reduced_object) as hdus:
        for ota in TEST_OTAS:
            hdu = hdus[f"OTA{ota:02d}.SCI"]
            image = hdu.data.astype(np.float32)
            before = image.copy()
            table = pf.find_sources(image, ota, gain=hdu.header["GAIN"],
                                    read_noise=hdu.header["RDNOISE"],
                                    saturation=hdu.header["SATURATE"], binning=TEST_BINNING)
            np.testing.assert_array_equal(image, before)  # the caller's array is untouched
            out[ota] = (table, stars[stars["ota"] == ota], image, hdu.header)
    return out, truth[0].header


def _peak_adu(flux_e, header, binning):
    """Peak pixel of a truth star above the sky, in reduced ADU."""
    fwhm_px = header["FWHM"] / (0.1126 * binning)
    alpha = moffat_alpha(fwhm_px, header["MOFFBETA"])
    return flux_e * (header["MOFFBETA"] - 1) / (math.pi * alpha**2) * header["FLATNRMA"]


def test_recovery_positions_fwhm(catalogs):
    per_ota, truth = catalogs
    fwhm_px = truth["FWHM"] / (0.1126 * TEST_BINNING)
    found, total, dx, dy, fwhm = 0, 0, [], [], []
    for ota, (table, stars, image, header) in per_ota.items():
        tx, ty = stars["x"], stars["y"]  # 0-based truth
        flux_adu = stars["flux_e"] * truth["FLATNRMA"]
        # S/N > 20 in the 1.5 FWHM radius aperture (93 % of the flux), background noise only.
        noise = header["SKYNOISE"] * math.sqrt(math.pi) * 1.5 * fwhm_px
        neighbours = cKDTree(np.c_[tx, ty]).query(np.c_[tx, ty], k=2)[0][:, 1]
        iy, ix = np.rint(ty).astype(int), np.rint(tx).astype(int)
        r = int(3 * fwhm_px)
        inside = (ix >= r) & (iy >= r) & (ix < image.shape[1] - r) & (iy < image.shape[0] - r)
        clean = np.array([ok and np.isfinite(image[y - r:y + r + 1, x - r:x + r + 1]).all()
                          for ok, x, y in zip(inside, ix, iy)])
        wanted = (0.93 * flux_adu > 20 * noise) & clean & (neighbours > 3 * fwhm_px) & \
                 (_peak_adu(stars["flux_e"], truth, TEST_BINNING) + truth["SKY_ADU"] < header["SATURATE"])
        distance, index = cKDTree(np.c_[table["XWIN"], table["YWIN"]]).query(np.c_[tx + 1, ty + 1])
        hit = wanted & (distance < 1)
        found += hit.sum()
        total += wanted.sum()
        dx.extend(table["XWIN"][index[hit]] - (tx[hit] + 1))
        dy.extend(table["YWIN"][index[hit]] - (ty[hit] + 1))
        fwhm.extend(table["FWHM_IMAGE"][index[hit]])
    assert total > 100
    assert found / total > 0.95
    assert abs(np.median(dx)) < 0.05 and abs(np.median(dy)) < 0.05
    assert np.median(np.hypot(dx, dy)) < 0.1
    assert np.median(fwhm) == pytest.approx(fwhm_px, rel=0.05)


def test_no_false_detections_or_cosmic_rays(catalogs):
    per_ota, _ = catalogs
    detections, false = 0, 0
    for ota, (table, stars, image, header) in per_ota.items():
        assert (table["OTA"] == ota).all()
        # The simulator hits each OTA with ~300 cosmic rays in 300 s: they were detected
        # and removed, not just missed.
        assert table.meta["NREJECT"] > 150
        distance = cKDTree(np.c_[stars["x"] + 1, stars["y"] + 1]).query(
            np.c_[table["XWIN"], table["YWIN"]])[0]
        unmatched = distance > 2
        median = np.median(table["FWHM_IMAGE"])
        assert not (unmatched & (table["FWHM_IMAGE"] < 0.5 * median)).any()
        # A star centred in a cell gap or off the edge shows up displaced at its visible
        # part: flagged, and not counted as false.
        usable = (table["FLAGS"] & (pf.FLAG_NEAR_UNDEFINED | pf.FLAG_TRUNCATED)) == 0
        detections += usable.sum()
        false += (unmatched & usable).sum()
    assert false / detections < 0.02


def test_saturated_stars_are_flagged(catalogs):
    per_ota, truth = catalogs
    saturated_seen = 0
    for ota, (table, stars, image, header) in per_ota.items():
        level = _peak_adu(stars["flux_e"], truth, TEST_BINNING) + truth["SKY_ADU"]
        tree = cKDTree(np.c_[table["XWIN"], table["YWIN"]])
        for star, peak in zip(stars, level):
            near = tree.query_ball_point([star["x"] + 1, star["y"] + 1], 3)
            if not near:
                continue
            flagged = (table["FLAGS"][near] & pf.FLAG_SATURATED) != 0
            if peak > 1.2 * header["SATURATE"]:
                saturated_seen += 1
                assert flagged.any()
            elif peak < 0.5 * header["SATURATE"]:
                assert not flagged.any()
    assert saturated_seen >= 3


@pytest.mark.filterwarnings("ignore:The following header keyword is invalid")  # ESO-LOG cards
def test_agrees_with_sextractor(realdata):
    """sep_image.cat is SExtractor's catalog of sep_image.fits (background mesh 64 px,
    GAIN = 0, FLUX_APER in a radius 5 px aperture). For the bright (S/N > 20) sources
    unflagged by both, the windowed positions agree to 0.1 px and the 5 px aperture
    fluxes (ours centred on XWIN, SExtractor's on X) to 2 %, their errors to 5 %."""
    directory = realdata / "external"
    image = fits.getdata(directory / "sep_image.fits")
    reference = np.loadtxt(directory / "sep_image.cat")
    xwin, ywin, flux, flux_err, flags = (reference[:, 3], reference[:, 4], reference[:, 12],
                                         reference[:, 13], reference[:, 20])
    # The stars of this image are ~2.2 px FWHM; seeing in arcsec at ODI's pixel scale.
    table = pf.find_sources(image, 0, aperture_radius=5.0, seeing=2.2 * pf.PIXEL_SCALE)
    distance, index = cKDTree(np.c_[table["XWIN"], table["YWIN"]]).query(np.c_[xwin, ywin])
    bright = (flags == 0) & (flux / flux_err > 20)
    assert (distance[bright] < 1).all()  # every bright SExtractor source is found
    common = bright & (table["FLAGS"][index] == 0)
    assert common.sum() >= 10
    mine = table[index[common]]
    assert np.abs(mine["XWIN"] - xwin[common]).max() < 0.1
    assert np.abs(mine["YWIN"] - ywin[common]).max() < 0.1
    np.testing.assert_allclose(mine["FLUX"], flux[common], rtol=0.02)
    # Our errors use the local rms map, SExtractor's the global rms: a few percent apart.
    np.testing.assert_allclose(mine["FLUX_ERR"], flux_err[common], rtol=0.05)


@pytest.fixture(scope="module")
def unbinned_field():
    """A 2048 px unbinned field: Moffat stars of 1" FWHM on a 1000 e- sky, gain 1,
    read noise 8 e-, and 150 cosmic-ray hits of one or two pixels."""
    from podi_simulate import render_stars
    rng = np.random.default_rng(11)
    size, fwhm = 2048, 1.0 / pf.PIXEL_SCALE
    x, y = rng.uniform(40, size - 40, (2, 150))
    flux = 10 ** rng.uniform(3.5, 6.0, 150)
    image = np.full((size, size), 1000.0, np.float32)
    render_stars(image, x, y, flux, fwhm, 3.5)
    image = (rng.poisson(image) + rng.normal(0, 8, image.shape)).astype(np.float32)
    hx, hy = rng.integers(5, size - 6, (2, 150))
    image[hy, hx] += rng.uniform(300, 20000, 150).astype(np.float32)
    image[hy[::2], hx[::2] + 1] += 2000
    table = pf.find_sources(image, 33, gain=1.0, read_noise=8.0, binning=1)
    return table, x, y, flux, fwhm


def test_unbinned_images_are_detected_on_blocks_and_measured_at_full_resolution(unbinned_field):
    table, x, y, flux, fwhm = unbinned_field
    assert pf.detection_binning((2048, 2048), fwhm) == 4
    tree = cKDTree(np.c_[x + 1, y + 1])
    isolated = tree.query(np.c_[x + 1, y + 1], k=2)[0][:, 1] > 4 * fwhm
    distance, index = tree.query(np.c_[table["XWIN"], table["YWIN"]])
    # Every detection is a star (faint ones and unresolved pairs a few pixels off): the
    # hits were rejected, most before measuring.
    assert (distance < fwhm).all()
    significant = (table["FLAGS"] == 0) & (table["FLUX"] / table["FLUX_ERR"] > 10) & isolated[index]
    assert (distance[significant] < 1).all()
    assert table.meta["NREJECT"] > 100  # the faintest hits are below the threshold
    clean = (table["FLAGS"] == 0) & isolated[index]
    bright = clean & (table["FLUX"] / table["FLUX_ERR"] > 50)
    assert bright.sum() > 40
    assert np.median(np.abs(table["XWIN"][bright] - (x[index[bright]] + 1))) < 0.02
    assert np.median(np.abs(table["YWIN"][bright] - (y[index[bright]] + 1))) < 0.02
    assert np.median(table["FWHM_IMAGE"][bright]) == pytest.approx(fwhm, rel=0.03)
    assert np.median(table["FWHM_WORLD"][bright]) * 3600 == pytest.approx(1.0, rel=0.03)
    # 3" aperture: the true flux times the Moffat fraction inside 1.5", within the errors.
    fraction = 1 - (1 + (1.5 / moffat_alpha(1.0, 3.5)) ** 2) ** (1 - 3.5)
    measured = 10 ** (-0.4 * table["MAG_D30"][clean])
    error = measured * table["MAGERR_D30"][clean] / 1.0857
    expected = flux[index[clean]] * fraction
    assert np.median(measured[bright[clean]] / expected[bright[clean]]) == pytest.approx(1.0, abs=0.005)
    pulls = (measured - expected) / error
    assert 0.7 < 1.4826 * np.median(np.abs(pulls - np.median(pulls))) < 1.4
    # The bright isolated stars' curves of growth give back the Moffat profile.
    growth = table.meta["GROWTH"]
    assert len(growth) >= 20 and table.meta["GROWTH_R"] == pytest.approx(4.0, rel=0.05)
    radii = np.array(list(pf.APERTURE_DIAMETERS.values())) / 2
    psf = pf.fit_moffat_growth(growth, radii, np.full(len(growth), table.meta["GROWTH_R"]))
    assert psf.fwhm == pytest.approx(1.0, rel=0.02) and psf.beta == pytest.approx(3.5, abs=0.15)
    correction, error = psf.total_correction(1.5)
    assert correction == pytest.approx(-2.5 * math.log10(fraction), abs=max(0.005, 3 * error))
    assert np.median(table.meta["GROWTH_FWHM"]) == pytest.approx(1.0, rel=0.03)


def test_moffat_growth_fit_needs_stars():
    radii = np.array([0.5, 1.0, 1.5])
    assert pf.fit_moffat_growth(np.full((3, 3), 0.5), radii, np.full(3, 4.0)) is None
