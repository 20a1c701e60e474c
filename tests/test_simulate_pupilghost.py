"""The simulator's pupil ghost: its geometry, its raw light, its truth and true template.

Expected values are computed here from the model's definition (profile table, centre
``R(rho) (30, -20)`` plus the seed's offset, dipole ``1 + 0.1 cos(theta - 40 - rho)``),
not by the simulator's helpers.
"""

import dataclasses
import math

import numpy as np
import pytest
from astropy.io import fits

import podi_pupilghost
from podi_calibfiles import pupilghost_template_name
from conftest import raw_ota_image
from podi_definitions import PODI, all_cells, cell_to_ota, ota_origin_in_focal_plane
from podi_simulate import (Effects, ExposureSpec, Instrument, build_parser, main, simulate_exposure,
                           sky_electrons, spec_from_args, true_pupilghost, true_signal,
                           write_true_calibrations)

BINNING = 2
AMPLITUDE = 1.5
ROTATOR = 15.0
CENTRAL = (33, 34, 43, 44)

#: The built-in profile: radius (unbinned px), fraction of the background.
PROFILE = np.array([(1100, 0.0), (1180, 0.0007), (1260, 0.0043), (1300, 0.0166), (1400, 0.0236),
                    (1500, 0.0280), (1660, 0.0318), (1900, 0.0335), (2100, 0.0320), (2300, 0.0281),
                    (2500, 0.0247), (2700, 0.0218), (2900, 0.0190), (3100, 0.0159), (3180, 0.0125),
                    (3260, 0.0069), (3340, 0.0030), (3460, 0.0009), (3620, 0.0)])
#: Where the built-in profile first reaches half its peak 0.0335: between 1300 and 1400 px.
INNER_EDGE = 1300 + (0.0335 / 2 - 0.0166) / (0.0236 - 0.0166) * 100


def ghost_spec(**changes):
    """An object exposure with the ghost, binning 2, no stars (they are no part of it)."""
    base = ExposureSpec(otas=(33,), binning=BINNING, seed=5, pupilghost=AMPLITUDE,
                        rotator_angle=ROTATOR, effects=Effects(nonlinearity=False, stars=False))
    return dataclasses.replace(base, **changes)


def expected_centre(rotator, seed):
    """``R(rotator) (30, -20)`` plus the uniform +-8 px offset drawn from ``[seed, 17]``."""
    angle = math.radians(rotator)
    offset = np.random.default_rng([seed, 17]).uniform(-8, 8, 2)
    return (30 * math.cos(angle) + 20 * math.sin(angle) + offset[0],
            30 * math.sin(angle) - 20 * math.cos(angle) + offset[1])


def pixel_centres(ota):
    """Focal-plane coordinates of the centres of a binning-2 OTA's pixels, ``[y, x]``."""
    x0, y0 = ota_origin_in_focal_plane(ota, 1)
    coords = BINNING * np.arange(4096 // BINNING) + (BINNING - 1) / 2
    return np.meshgrid(x0 + coords, y0 + coords)


def expected_fraction(x, y, centre, rotator, amplitude=AMPLITUDE, profile=PROFILE):
    """Ghost light / background at focal-plane points."""
    r = np.hypot(x - centre[0], y - centre[1])
    theta = np.arctan2(y - centre[1], x - centre[0])
    radial = np.interp(r, profile[:, 0], profile[:, 1], left=0.0, right=0.0)
    return amplitude * radial * (1 + 0.1 * np.cos(theta - math.radians(40 + rotator)))


@pytest.fixture(scope="module")
def central_ghost():
    """Per central OTA: pixel coordinates relative to the true centre and ghost / sky."""
    spec = ghost_spec(otas=CENTRAL)
    centre = expected_centre(ROTATOR, spec.seed)
    out = {}
    for ota in CENTRAL:
        x, y = pixel_centres(ota)
        out[ota] = (x - centre[0], y - centre[1], true_pupilghost(spec, ota) / sky_electrons(spec))
    return out


def pooled(central_ghost):
    """Offsets from the centre and ghost / sky of all central OTAs, flattened."""
    dx, dy, ghost = (np.concatenate([part[i].ravel() for part in central_ghost.values()]) for i in range(3))
    return dx, dy, ghost


def test_centre_moves_with_the_rotator():
    """Pixel by pixel, OTA 33 holds the ghost around ``R(rho) (30, -20)`` plus the offset."""
    for rotator in (0.0, 90.0, 200.0):
        spec = ghost_spec(rotator_angle=rotator, seed=11)
        centre = expected_centre(rotator, spec.seed)
        x, y = pixel_centres(33)
        np.testing.assert_allclose(true_pupilghost(spec, 33) / sky_electrons(spec),
                                   expected_fraction(x, y, centre, rotator), rtol=1e-5, atol=1e-8)


def test_ghost_is_a_ring_on_the_central_otas(central_ghost):
    dx, dy, ghost = pooled(central_ghost)
    r = np.hypot(dx, dy)
    assert np.all(ghost[r < 1100] == 0) and np.all(ghost[r > 3620] == 0)
    assert np.all(ghost[(r > 1150) & (r < 3600)] > 0)
    assert ghost.max() == pytest.approx(AMPLITUDE * 0.0335 * 1.1, rel=0.01)
    for ota in (22, 23, 32, 45, 54):
        assert not true_pupilghost(ghost_spec(), ota).any()


def test_azimuthal_mean_at_the_peak(central_ghost):
    dx, dy, ghost = pooled(central_ghost)
    ring = np.abs(np.hypot(dx, dy) - 1900) < 4
    # The dipole averages out over the azimuth (the OTA gaps cut a few per cent of it).
    assert ghost[ring].mean() == pytest.approx(AMPLITUDE * 0.0335, rel=0.02)


def dipole(central_ghost):
    """Relative amplitude and direction (deg) of the dipole, fitted on 1700-2100 px."""
    dx, dy, ghost = pooled(central_ghost)
    r = np.hypot(dx, dy)
    ring = (r > 1700) & (r < 2100)
    radial = AMPLITUDE * np.interp(r[ring], PROFILE[:, 0], PROFILE[:, 1])
    theta = np.arctan2(dy[ring], dx[ring])
    (cosine, sine), *_ = np.linalg.lstsq(np.column_stack([np.cos(theta), np.sin(theta)]),
                                         ghost[ring] / radial - 1, rcond=None)
    return math.hypot(cosine, sine), math.degrees(math.atan2(sine, cosine)) % 360


def test_dipole_phase_follows_the_rotator(central_ghost):
    strength, phase = dipole(central_ghost)
    assert strength == pytest.approx(0.1, rel=1e-3)
    assert phase == pytest.approx(40 + ROTATOR, abs=0.05)
    spec = ghost_spec(rotator_angle=-70.0)
    centre = expected_centre(-70.0, spec.seed)
    turned = {}
    for ota in CENTRAL:
        x, y = pixel_centres(ota)
        turned[ota] = (x - centre[0], y - centre[1], true_pupilghost(spec, ota) / sky_electrons(spec))
    assert dipole(turned)[1] == pytest.approx((40 - 70) % 360, abs=0.05)


def test_true_signal_has_no_ghost():
    spec = ghost_spec()
    np.testing.assert_array_equal(true_signal(spec, 33), true_signal(dataclasses.replace(spec, pupilghost=0.0), 33))
    assert not true_pupilghost(dataclasses.replace(spec, pupilghost=0.0), 33).any()
    for obstype in ("BIAS", "DARK"):
        assert not true_pupilghost(dataclasses.replace(spec, obstype=obstype), 33).any()


def truth_header(exposure, extension=0):
    return fits.getheader(exposure.parent / f"{exposure.name}.truth.fits", extension)


def write_profile(path, rows):
    path.write_text("# radius (4x4-binned px)  fraction\n\n" + "\n".join(f"{r} {f}" for r, f in rows))
    return path


def test_profile_file(tmp_path):
    # A triangle from 1200 to 2400 unbinned px, peak 0.05 at 1800, no trailing newline.
    rows = [(300, 0.0), (450, 0.05), (600, 0.0)]
    spec = ghost_spec(pupilghost_profile=str(write_profile(tmp_path / "triangle.profile", rows)))
    x, y = pixel_centres(33)
    profile = np.array(rows, float) * (4, 1)
    expected = expected_fraction(x, y, expected_centre(ROTATOR, spec.seed), ROTATOR, profile=profile)
    np.testing.assert_allclose(true_pupilghost(spec, 33) / sky_electrons(spec), expected, rtol=1e-5, atol=1e-8)

    sky_only = Effects(**{f.name: f.name in ("sky", "gain") for f in dataclasses.fields(Effects)})
    truth = truth_header(simulate_exposure(dataclasses.replace(spec, effects=sky_only), tmp_path / "sim", ncpus=1))
    assert truth["PGRADIUS"] == pytest.approx(1500.0)
    assert truth["PGPEAK"] == pytest.approx(AMPLITUDE * 0.05)


def test_real_profile_file(realdata):
    path = realdata / "pupilghost" / "pupilghost__odi_r.profile"
    spec = ghost_spec(pupilghost_profile=str(path))
    x, y = pixel_centres(33)
    profile = np.loadtxt(path) * (4, 1)
    expected = expected_fraction(x, y, expected_centre(ROTATOR, spec.seed), ROTATOR, profile=profile)
    np.testing.assert_allclose(true_pupilghost(spec, 33) / sky_electrons(spec), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("text, message", [
    ("300 0.0\n450\n", "line 2"),
    ("300 0.0\n450 high\n", "line 2"),
    ("300 0.0\n", "at least two rows"),
    ("450 0.0\n300 0.01\n", "increasing"),
    ("300 0.0\n1000 0.0\n", "beyond"),
])
def test_malformed_profile_is_named(tmp_path, text, message):
    path = tmp_path / "bad.profile"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        simulate_exposure(ghost_spec(pupilghost_profile=str(path)), tmp_path / "out")
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path, capsys):
    profile = write_profile(tmp_path / "p.profile", [(300, 0.0), (450, 0.05), (600, 0.0)])
    spec = spec_from_args(build_parser().parse_args(
        [str(tmp_path), "--pupilghost", "0.8", "--pupilghost-profile", str(profile), "--rotator", "-12.5"]))
    assert (spec.pupilghost, spec.pupilghost_profile, spec.rotator_angle) == (0.8, str(profile), -12.5)
    defaults = spec_from_args(build_parser().parse_args([str(tmp_path)]))
    assert (defaults.pupilghost, defaults.pupilghost_profile, defaults.rotator_angle) == (0.0, None, 0.0)

    missing = tmp_path / "missing.profile"
    status = main([str(tmp_path / "out"), "--otas", "33", "--binning", "2", "--pupilghost", "1",
                   "--pupilghost-profile", str(missing)])
    error = capsys.readouterr().err
    assert status == 1
    assert error.count("\n") == 1 and error.startswith("podi_simulate: error: ")
    assert str(missing) in error
    assert not (tmp_path / "out").exists()




def test_dome_flat_shows_the_ring(tmp_path):
    """Without noise, gain spread and flat field a dome flat is ``level x (1 + G)``."""
    quiet = Effects(**{f.name: False for f in dataclasses.fields(Effects)})
    level = 20000.0
    spec = ghost_spec(obstype="DFLAT", exptime=10.0, flat_level=level, effects=quiet)
    exposure = simulate_exposure(spec, tmp_path, ncpus=1)
    x, y = pixel_centres(33)
    centre = expected_centre(ROTATOR, spec.seed)
    expected = level * (1 + expected_fraction(x, y, centre, ROTATOR))
    raw = raw_ota_image(exposure, 33)
    cells = np.isfinite(raw)
    # Rounding to 16 bits, and float32 sums.
    assert np.max(np.abs(raw - expected)[cells]) <= 0.51
    r = np.hypot(x - centre[0], y - centre[1])
    assert np.all(raw[cells & (r < 1090)] == level)
    # The ring's peak, weakened by at most the 10 % dipole.
    ring = cells & (np.abs(r - 1900) < 4)
    assert ring.sum() > 1000 and np.all(raw[ring] > level * (1 + 0.89 * AMPLITUDE * 0.0335))

    with fits.open(exposure / f"{exposure.name}.33.fits") as hdus:
        assert hdus[0].header["ROTSTART"] == hdus[0].header["ROTEND"] == ROTATOR
    truth = truth_header(exposure)
    assert truth["PGAMP"] == AMPLITUDE and "PGSCALE" not in truth
    assert (truth["PGCNTR_X"], truth["PGCNTR_Y"]) == pytest.approx(centre, abs=1e-9)


def test_object_frame_ghost_and_truth(tmp_path):
    """The ghost of an object frame passes through the flat; PGSCALE is the sky in reduced ADU."""
    effects = Effects(nonlinearity=False, stars=False, poisson=False, read_noise=False, cosmics=False,
                      crosstalk=False, dark=False)
    spec = ghost_spec(effects=effects)
    with_ghost = simulate_exposure(spec, tmp_path / "ghost", ncpus=1)
    without = simulate_exposure(dataclasses.replace(spec, pupilghost=0.0), tmp_path / "none", ncpus=1)
    instrument = Instrument(PODI, effects=effects)
    gain_map = np.full((4096 // BINNING,) * 2, np.nan)
    for cx, cy in all_cells():
        gain_map[cell_to_ota(cx, cy, BINNING)] = instrument.gains(33)[cy, cx]
    expected = true_pupilghost(spec, 33) * instrument.flat(33, BINNING) / gain_map
    difference = raw_ota_image(with_ghost, 33) - raw_ota_image(without, 33)
    cells = np.isfinite(difference)
    assert np.max(np.abs(difference - expected)[cells]) <= 1.01   # two roundings to 16 bits

    header = truth_header(with_ghost)
    centre = expected_centre(ROTATOR, spec.seed)
    assert header["PGAMP"] == AMPLITUDE
    assert header["PGPEAK"] == pytest.approx(AMPLITUDE * 0.0335)
    assert (header["PGCNTR_X"], header["PGCNTR_Y"]) == pytest.approx(centre, abs=1e-9)
    assert header["PGRADIUS"] == pytest.approx(INNER_EDGE)
    assert header["PGROTANG"] == ROTATOR
    assert header["PGDIPOLE"] == 0.1
    assert header["PGDIPANG"] == pytest.approx(40 + ROTATOR)
    # Reduced ghost = ghost electrons x FLATNRMA = SKY_E G FLATNRMA = SKY_ADU G.
    assert header["PGSCALE"] == header["SKY_ADU"] == pytest.approx(header["SKY_E"] * header["FLATNRMA"])
    assert header["SKY_E"] == sky_electrons(spec)
    # The rotator does not move the sky: the true WCS is the one of rotator angle 0.
    assert truth_header(without, "OTA33.WCS") == truth_header(with_ghost, "OTA33.WCS")
    assert truth_header(without)["PGAMP"] == 0.0


def test_true_template(tmp_path):
    spec = ghost_spec(otas=(22, 33))
    written = write_true_calibrations(spec, tmp_path)
    path = written["pupilghost"]
    assert path.name == pupilghost_template_name(1, BINNING) == "pupilghost_template___level_1__bin2.fits"
    with fits.open(path) as hdus:
        primary = hdus[0].header
        assert (primary["FILTER"], primary["FLTLEVEL"], primary["BINNING"], primary["TRUTH"]) == \
            ("odi_r", 1, BINNING, True)
        assert primary["MJD-OBS"] == spec.mjd
        assert [hdu.name for hdu in hdus[1:]] == ["OTA33.SCI"]
        assert hdus[1].data.shape == (951, 951)   # 2 ceil(3800 / 8) + 1
    with fits.open(written["flat"]) as hdus:
        assert hdus["OTA33.SCI"].header["PGAFCTD"] is True and "PGAFCTD" not in hdus["OTA22.SCI"].header

    template = podi_pupilghost.read_template(path, 33)
    # Centred on R(rho) (30, -20): one exposure's offset is no part of the optics.
    angle = math.radians(ROTATOR)
    nominal = (30 * math.cos(angle) + 20 * math.sin(angle), 30 * math.sin(angle) - 20 * math.cos(angle))
    assert template.centre == pytest.approx(nominal, abs=1e-9)
    assert (template.step, template.rotator) == (8.0, ROTATOR)
    assert template.radius == pytest.approx(INNER_EDGE)

    # The exposure's ghost is the template placed at the true centre, turned by
    # ROTSTART - PGROTANG = 0: to 1 % of the peak but near the sharp inner edge.
    x, y = pixel_centres(33)
    centre = expected_centre(ROTATOR, spec.seed)
    truth = true_pupilghost(spec, 33) / sky_electrons(spec)
    sampled = template.sample(x, y, centre, 0.0)
    r = np.hypot(x - centre[0], y - centre[1])
    away = (r < 1050) | (r > 1450)
    peak = AMPLITUDE * 0.0335
    assert np.max(np.abs(sampled - truth)[away]) < 0.01 * peak
    # The template's dipole matters: turned by a wrong angle it does not fit.
    assert np.max(np.abs(template.sample(x, y, centre, 40.0) - truth)[away]) > 0.05 * peak

    others = write_true_calibrations(ghost_spec(filter="odi_i", pupilghost=0.0), tmp_path / "none")
    assert "pupilghost" not in others
    with fits.open(others["flat"]) as hdus:
        assert "PGAFCTD" not in hdus["OTA33.SCI"].header
    i_band = write_true_calibrations(ghost_spec(filter="odi_i", otas=(22,)), tmp_path / "i")
    assert i_band["pupilghost"].name == pupilghost_template_name(2, BINNING)
    with fits.open(i_band["pupilghost"]) as hdus:
        assert [hdu.name for hdu in hdus[1:]] == [f"OTA{ota}.SCI" for ota in podi_pupilghost.GHOST_OTAS]
