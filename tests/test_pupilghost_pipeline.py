"""-pupilghost through podi_collectcells and podi_makecalibrations, against the simulator's truth.

The simulator adds the ghost ``G`` (fraction of the sky, or of the lamp in dome
flats) around a centre that moves with the rotator and a random wobble, with a
dipole that turns with the rotator, and records the centre (``PGCNTR_X/Y``) and
the scale a template equal to ``G`` must give (``PGSCALE``). The reduction is told
neither: it finds the centre, turns the template by ``ROTSTART`` and fits the scale.
Residuals are measured as reduced minus the ghost-free truth (``true_signal``)
in 40 px rings around the true centre, against the injected ghost.
"""

import dataclasses
import math
import shutil

import numpy as np
import pytest
from astropy.io import fits

import podi_pupilghost as pg
from conftest import REALDATA, run_collectcells, small_spec
from podi_calibfiles import pupilghost_template_name
from podi_makecalibrations import make_calibrations
from podi_reduceota import ReductionSettings
from podi_simulate import simulate_exposure, true_pupilghost, true_signal, write_true_calibrations

OTAS = (22, 33, 34, 43, 44)
#: The measured odi_r profile where the real data is at hand, else the simulator's copy.
PROFILE = REALDATA / "pupilghost" / "pupilghost__odi_r.profile"
GHOST_SPEC = small_spec(otas=OTAS, seed=81, mjd=56620.40, pupilghost=1.0,
                        pupilghost_profile=str(PROFILE) if PROFILE.is_file() else None)
ROTATORS = (0.0, 15.0, -30.0)
#: Rotator angle of the dome flats.
FLAT_ROTATOR = 5.0


def truth_of(exposure):
    return fits.getheader(exposure.parent / f"{exposure.name}.truth.fits")


@pytest.fixture(scope="session")
def ghost_cals(tmp_path_factory):
    """Perfect ghost-free masters (flat with PGAFCTD = T) and the true template at rotator 0."""
    directory = tmp_path_factory.mktemp("ghostcals")
    write_true_calibrations(GHOST_SPEC, directory)
    return directory


@pytest.fixture(scope="session")
def ghost_exposures(tmp_path_factory):
    """Object frames with the ghost at three rotator angles, and one without a ghost."""
    root = tmp_path_factory.mktemp("ghostobj")
    exposures = {rotator: simulate_exposure(
        dataclasses.replace(GHOST_SPEC, rotator_angle=rotator, seed=81 + i, sequence=i + 1), root, ncpus=2)
        for i, rotator in enumerate(ROTATORS)}
    exposures["none"] = simulate_exposure(dataclasses.replace(GHOST_SPEC, pupilghost=0.0, seed=90,
                                                              sequence=9), root, ncpus=2)
    return exposures


def reduce(exposure, output, *flags):
    assert run_collectcells(exposure, output, "-ncpus=2", *flags) == 0
    return output


@pytest.fixture(scope="session")
def ghost_reductions(ghost_exposures, ghost_cals, tmp_path_factory):
    """Every exposure with -pupilghost; the 15-degree and the ghost-free one also without."""
    root = tmp_path_factory.mktemp("ghostred")
    outputs = {key: reduce(exposure, root / f"{key}.fits", f"-cals={ghost_cals}",
                           f"-pupilghost={ghost_cals}")
               for key, exposure in ghost_exposures.items()}
    for key in (15.0, "none"):
        outputs[(key, "plain")] = reduce(ghost_exposures[key], root / f"{key}_plain.fits",
                                         f"-cals={ghost_cals}")
    return outputs


def focal_plane(ota, binning):
    index = np.arange(2048) * binning + (binning - 1) / 2
    x0, y0 = pg.pixel_to_focal_plane(ota, 1, 0, 0)
    return x0 + index[None, :], y0 + index[:, None]


def ring_profile(images, centre, binning):
    """Median of each image in 40 px rings (900-3800 px) around ``centre``: OTA -> array."""
    values, rings = [], []
    for ota, image in images.items():
        x, y = focal_plane(ota, binning)
        radius = np.hypot(x - centre[0], y - centre[1])
        keep = (radius > 900) & (radius < 3800) & np.isfinite(image)
        values.append(image[keep])
        rings.append((radius[keep] // 40).astype(int))
    values, rings = np.concatenate(values), np.concatenate(rings)
    return np.array([np.median(values[rings == k]) for k in np.unique(rings)])


def residual_and_injected(output, exposure, scale_truth=1.0):
    """Ring profiles of (reduced - truth) and of the injected ghost, in reduced ADU.

    ``scale_truth`` is the factor from the truth's ADU to the output's (the level of
    a master flat made from dome flats differs from the perfect flat's).
    """
    truth = truth_of(exposure)
    spec = dataclasses.replace(GHOST_SPEC, rotator_angle=truth["PGROTANG"], seed=truth["SEED"],
                               pupilghost=truth["PGAMP"])
    norm = truth["FLATNRMA"] * scale_truth
    centre = (truth["PGCNTR_X"], truth["PGCNTR_Y"])
    residual, injected = {}, {}
    with fits.open(output) as hdus:
        for ota in pg.GHOST_OTAS:
            residual[ota] = hdus[f"OTA{ota}.SCI"].data - true_signal(spec, ota) * np.float32(norm)
            injected[ota] = true_pupilghost(spec, ota) * np.float32(norm)
    return ring_profile(residual, centre, spec.binning), ring_profile(injected, centre, spec.binning)


@pytest.mark.parametrize("rotator", ROTATORS)
def test_ghost_removed_to_5_percent(ghost_reductions, ghost_exposures, rotator):
    residual, injected = residual_and_injected(ghost_reductions[rotator], ghost_exposures[rotator])
    assert injected.max() > 50  # the ghost is there to be removed: 3 % of a 2700 ADU sky
    assert np.abs(residual).max() < 0.05 * injected.max()


def test_unreduced_ghost_fails_that_check(ghost_reductions, ghost_exposures):
    residual, injected = residual_and_injected(ghost_reductions[(15.0, "plain")], ghost_exposures[15.0])
    assert np.abs(residual).max() > 0.5 * injected.max()


@pytest.mark.parametrize("rotator", ROTATORS)
def test_centre_and_scale(ghost_reductions, ghost_exposures, rotator):
    truth = truth_of(ghost_exposures[rotator])
    header = fits.getheader(ghost_reductions[rotator])
    assert header["PUPLGOK"] and header["PUPLGFND"]
    assert math.hypot(header["PUPLGCX"] - truth["PGCNTR_X"], header["PUPLGCY"] - truth["PGCNTR_Y"]) < 5
    assert header["PUPLGFAC"] == pytest.approx(truth["PGSCALE"], rel=0.05)
    assert header["PUPLGROT"] == rotator


def test_sky_away_from_the_ghost_is_unchanged(ghost_reductions, ghost_exposures):
    truth = truth_of(ghost_exposures[15.0])
    centre = (truth["PGCNTR_X"], truth["PGCNTR_Y"])
    with fits.open(ghost_reductions[15.0]) as corrected, \
            fits.open(ghost_reductions[(15.0, "plain")]) as plain:
        for ota in OTAS:
            x, y = focal_plane(ota, GHOST_SPEC.binning)
            radius = np.hypot(x - centre[0], y - centre[1])
            # Outside the ring (beyond its last light at 3620 px, or inside its edge).
            away = (radius > 3700) | (radius < 1000)
            change = corrected[f"OTA{ota}.SCI"].data - plain[f"OTA{ota}.SCI"].data
            assert np.nanmean(np.abs(change[away])) < 5e-4 * truth["SKY_ADU"]
        assert "PGSCALNG" not in corrected["OTA22.SCI"].header
        assert "OTA outside the pupil ghost" in str(corrected["OTA22.SCI"].header["HISTORY"])


def test_keywords_and_associations(ghost_reductions, ghost_cals):
    with fits.open(ghost_reductions[0.0]) as hdus:
        assert hdus[0].header["PUPLGOST"] == pupilghost_template_name(1, 2)
        header = hdus["OTA33.SCI"].header
        assert header["PGAFCTD"] and header["PGSCALNG"] == hdus[0].header["PUPLGFAC"]
        for key in ("PGCENTER", "PGCNTR_X", "PGCNTR_Y", "PGTMPL_X", "PGTMPL_Y", "PGREG_X1",
                    "PGREG_X2", "PGREG_Y1", "PGREG_Y2", "PGROTANG"):
            assert key in header
        table = hdus["ASSOCIATIONS"].data
        used = dict(zip(table["correction"], table["filename"]))
        assert used["pupilghost"] == pupilghost_template_name(1, 2)


def test_frame_without_ghost_is_not_harmed(ghost_reductions):
    header = fits.getheader(ghost_reductions["none"])
    assert not header["PUPLGOK"]
    assert abs(header["PUPLGFAC"]) < 3 * header["PUPLGERR"]
    with fits.open(ghost_reductions["none"]) as corrected, \
            fits.open(ghost_reductions[("none", "plain")]) as plain:
        for ota in OTAS:
            np.testing.assert_array_equal(corrected[f"OTA{ota}.SCI"].data, plain[f"OTA{ota}.SCI"].data)


def test_filter_level_without_template_is_left_alone(ghost_exposures, ghost_cals, tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    output = reduce(ghost_exposures["none"], tmp_path / "out.fits", f"-cals={ghost_cals}",
                    f"-pupilghost={empty}")
    assert "PUPLGOST" not in fits.getheader(output)
    assert "no template for filter level 1" in caplog.text


def test_otas_outside_the_ghost_finish_in_one_round(ghost_exposures, ghost_cals, tmp_path):
    output = reduce(ghost_exposures[0.0], tmp_path / "out.fits", f"-cals={ghost_cals}",
                    f"-pupilghost={ghost_cals}", "-singleota=22")
    with fits.open(output) as hdus:
        assert not hdus[0].header["PUPLGOK"] and hdus[0].header["NOTAS"] == 1
        assert "OTA outside the pupil ghost" in str(hdus["OTA22.SCI"].header["HISTORY"])


def test_unreadable_template_stops_the_frame(ghost_exposures, ghost_cals, tmp_path, capsys):
    broken = tmp_path / pupilghost_template_name(1, 2)
    broken.write_text("not FITS")
    output = tmp_path / "out.fits"
    assert run_collectcells(ghost_exposures["none"], output, f"-cals={ghost_cals}",
                            f"-pupilghost={broken}") == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and str(broken) in message[0] and "pupil-ghost template" in message[0]
    assert not output.exists()


# --- Flats: the ghost divided out by podi_makecalibrations -------------------------------

@pytest.fixture(scope="session")
def ghost_flats(tmp_path_factory, ghost_cals):
    """Three dome flats with the ghost, made into masters: with a fitted template, with the
    true template, and without -pupilghost (the ghost left in the flat)."""
    raw = tmp_path_factory.mktemp("ghostflatraw")
    flats = [simulate_exposure(dataclasses.replace(
        GHOST_SPEC, obstype="DFLAT", exptime=20.0, seed=300 + i, sequence=i + 1,
        mjd=56620.02 + i / 1440, rotator_angle=FLAT_ROTATOR), raw, ncpus=2) for i in range(3)]
    made = {}
    for name, option in (("fitted", True), ("given", str(ghost_cals)), ("left", None)):
        directory = tmp_path_factory.mktemp(f"ghostflat_{name}")
        for master in ("bias_bin2.fits", "dark_yes_bin2.fits"):
            shutil.copy(ghost_cals / master, directory / master)
        make_calibrations(flats, directory, ReductionSettings(crosstalk="default"), ncpus=2,
                          pupilghost=option)
        made[name] = directory
    return flats, made


def flat_ghost_left(flat_file, flats, ghost_cals):
    """Ring profile of master / true flat - 1 around the flats' mean true centre, and the ghost."""
    truths = [truth_of(flat) for flat in flats]
    centre = (np.mean([t["PGCNTR_X"] for t in truths]), np.mean([t["PGCNTR_Y"] for t in truths]))
    ratio = {}
    with fits.open(flat_file) as made, fits.open(ghost_cals / "flat_odi_r_bin2.fits") as true:
        for ota in pg.GHOST_OTAS:
            ratio[ota] = made[f"OTA{ota}.SCI"].data / true[f"OTA{ota}.SCI"].data
        level = np.nanmedian(made["OTA22.SCI"].data / true["OTA22.SCI"].data)
    return ring_profile(ratio, centre, 2) / level - 1, truths[0]["PGPEAK"], centre


def test_fitted_template_removes_the_ghost_from_the_flat(ghost_flats, ghost_cals):
    flats, made = ghost_flats
    left, peak, centre = flat_ghost_left(made["fitted"] / "flat_odi_r_bin2.fits", flats, ghost_cals)
    assert np.abs(left).max() < 0.05 * peak
    unremoved, _, _ = flat_ghost_left(made["left"] / "flat_odi_r_bin2.fits", flats, ghost_cals)
    assert np.abs(unremoved).max() > 0.8 * peak
    template = fits.getheader(made["fitted"] / pupilghost_template_name(1, 2))
    assert math.hypot(template["PGCNTR_X"] - centre[0], template["PGCNTR_Y"] - centre[1]) < 5
    assert template["PGROTANG"] == FLAT_ROTATOR
    extension = fits.getheader(made["fitted"] / "flat_odi_r_bin2.fits", "OTA44.SCI")
    assert extension["PGAFCTD"] and extension["PGSCALNG"] == 1.0
    assert "PGAFCTD" not in fits.getheader(made["fitted"] / "flat_odi_r_bin2.fits", "OTA22.SCI")


def test_given_template_is_scaled_into_the_flat(ghost_flats, ghost_cals):
    flats, made = ghost_flats
    left, peak, _ = flat_ghost_left(made["given"] / "flat_odi_r_bin2.fits", flats, ghost_cals)
    assert np.abs(left).max() < 0.05 * peak
    extension = fits.getheader(made["given"] / "flat_odi_r_bin2.fits", "OTA33.SCI")
    assert extension["PGSCALNG"] == pytest.approx(1.0, rel=0.05)
    assert extension["PGROTANG"] == FLAT_ROTATOR
    assert not (made["given"] / pupilghost_template_name(1, 2)).exists()


def test_science_frame_with_the_made_flat_ends_flat(ghost_flats, ghost_exposures, ghost_cals, tmp_path):
    """Reduced with the master flat and template of the same run: no ring, either sign."""
    flats, made = ghost_flats
    exposure = ghost_exposures[-30.0]
    output = reduce(exposure, tmp_path / "made.fits", f"-cals={made['fitted']}",
                    f"-pupilghost={made['fitted']}")
    with fits.open(output) as hdus, fits.open(made["fitted"] / "flat_odi_r_bin2.fits") as flat, \
            fits.open(ghost_cals / "flat_odi_r_bin2.fits") as true:
        # Output ADU per truth ADU: the two flats' levels differ.
        level = np.nanmedian(true["OTA22.SCI"].data / flat["OTA22.SCI"].data)
        assert hdus[0].header["PUPLGOK"]
    residual, injected = residual_and_injected(output, exposure, scale_truth=level)
    assert np.abs(residual).max() < 0.05 * injected.max()


def test_flat_with_the_ghost_left_in_is_not_subtracted_again(ghost_flats, ghost_exposures, tmp_path):
    flats, made = ghost_flats
    output = reduce(ghost_exposures[15.0], tmp_path / "left.fits", f"-cals={made['left']}",
                    f"-pupilghost={made['fitted']}")
    assert not fits.getheader(output)["PUPLGOK"]
    assert "flat field is not pupil-ghost corrected" in str(fits.getheader(output, "OTA33.SCI")["HISTORY"])
