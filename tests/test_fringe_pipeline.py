"""-fringe through podi_collectcells and podi_makecalibrations, against the simulator's truth.

The simulator adds fringe light ``FRNGAMP x sky x P`` (P: the camera's unit pattern,
rms 1) and records ``FRNGSCL = FRNGAMP x SKY_ADU``, the scale a template equal to P
must give. The reduction is never told P: it measures the scale at its vectors and
subtracts; the tests project the residual (reduced minus the fringe-free truth) on P.
"""

import dataclasses
import math

import numpy as np
import pytest
from astropy.io import fits

import podi_fringe
import podi_fringetemplate
from conftest import TEST_OTAS, run_collectcells, small_spec
from podi_calibfiles import fringe_vectors_name
from podi_definitions import PODI
from podi_simulate import Instrument, dithered, simulate_exposure, true_signal, write_true_calibrations

AMPLITUDE = 0.03
FRINGE_SPEC = small_spec(filter="odi_i", seed=61, mjd=56620.35, fringe_amplitude=AMPLITUDE)


def truth_of(exposure):
    return fits.getheader(exposure.parent / f"{exposure.name}.truth.fits")


@pytest.fixture(scope="session")
def fringe_cals(tmp_path_factory):
    """Perfect masters and the true template P of the test camera in odi_i, with vectors
    chosen on P by podi_fringetemplate (where they are does not depend on the scale)."""
    directory = tmp_path_factory.mktemp("fringecals")
    written = write_true_calibrations(FRINGE_SPEC, directory)
    with fits.open(written["fringe"]) as hdus:
        for ota in TEST_OTAS:
            vectors = podi_fringetemplate.choose_fringe_vectors(hdus[f"OTA{ota}.SCI"].data, FRINGE_SPEC.binning)
            podi_fringetemplate.write_fringe_vectors(directory / fringe_vectors_name("odi_i", ota), vectors)
    return directory


@pytest.fixture(scope="session")
def fringe_exposures(tmp_path_factory):
    """An odi_i exposure with fringes, and the same exposure without them."""
    root = tmp_path_factory.mktemp("fringeobj")
    return {"fringes": simulate_exposure(FRINGE_SPEC, root / "with", ncpus=2),
            "none": simulate_exposure(dataclasses.replace(FRINGE_SPEC, fringe_amplitude=0.0),
                                      root / "without", ncpus=2)}


@pytest.fixture(scope="session")
def fringe_reductions(fringe_exposures, fringe_cals, tmp_path_factory):
    """Each exposure reduced with and without -fringe."""
    root = tmp_path_factory.mktemp("fringered")
    outputs = {}
    for name, exposure in fringe_exposures.items():
        for flags in ((), (f"-fringe={fringe_cals}",)):
            output = root / f"{name}{'_corrected' if flags else ''}.fits"
            assert run_collectcells(exposure, output, f"-cals={fringe_cals}", *flags) == 0
            outputs[(name, bool(flags))] = output
    return outputs


def fringe_amplitude_in_residual(output, exposure, spec):
    """Amplitude (reduced ADU per unit of P) of the fringe pattern left in reduced minus
    the fringe-free truth, per OTA: least squares projection on P, outliers clipped."""
    truth = truth_of(exposure)
    instrument = Instrument(PODI)
    amplitudes = {}
    with fits.open(output) as hdus:
        for ota in TEST_OTAS:
            pattern = instrument.fringe_pattern(ota, spec.binning)
            fringe_free = (true_signal(spec, ota) - pattern * np.float32(truth["FRNGAMP"] * truth["SKY_E"]))
            residual = hdus[f"OTA{ota}.SCI"].data - fringe_free * np.float32(truth["FLATNRMA"])
            good = np.isfinite(residual)
            sigma = 1.4826 * np.median(np.abs(residual[good] - np.median(residual[good])))
            good &= np.abs(residual) < 5 * sigma
            r, p = residual[good] - np.mean(residual[good]), pattern[good]
            amplitudes[ota] = float(np.sum(r * p) / np.sum(p * p))
    return amplitudes


def test_fringe_scale_recovers_the_truth(fringe_reductions, fringe_exposures):
    truth = truth_of(fringe_exposures["fringes"])
    primary = fits.getheader(fringe_reductions[("fringes", True)])
    assert primary["FRNG_OK"]
    assert primary["FRNG_SCL"] == pytest.approx(truth["FRNGSCL"], rel=0.03)
    # Its stated error is honest: within 4 sigma of the truth.
    assert abs(primary["FRNG_SCL"] - truth["FRNGSCL"]) < 4 * primary["FRNG_ERR"] + 0.01 * truth["FRNGSCL"]
    with fits.open(fringe_reductions[("fringes", True)]) as hdus:
        for ota in TEST_OTAS:
            header = hdus[f"OTA{ota}.SCI"].header
            assert header["FRNG_SCL"] == pytest.approx(truth["FRNGSCL"], rel=0.05)
            assert header["FRNG_NV"] > 20
            assert any("fringe: subtracted" in line for line in header["HISTORY"])
        names = {row["correction"]: row["filename"] for row in hdus["ASSOCIATIONS"].data}
    assert names["fringemap"] == "fringe__odi_i.fits"


def test_fringe_residual_drops_by_95_percent(fringe_reductions, fringe_exposures):
    exposure = fringe_exposures["fringes"]
    truth = truth_of(exposure)
    before = fringe_amplitude_in_residual(fringe_reductions[("fringes", False)], exposure, FRINGE_SPEC)
    after = fringe_amplitude_in_residual(fringe_reductions[("fringes", True)], exposure, FRINGE_SPEC)
    for ota in TEST_OTAS:
        # Uncorrected, the whole fringe is in the residual: the check can fail.
        assert before[ota] == pytest.approx(truth["FRNGSCL"], rel=0.02)
        assert abs(after[ota]) < 0.05 * abs(before[ota])


def test_sky_and_sources_are_measured_after_the_subtraction(fringe_reductions):
    """The per-OTA sky noise of the corrected frame is lower: the fringes were part of it."""
    with fits.open(fringe_reductions[("fringes", False)]) as raw, \
            fits.open(fringe_reductions[("fringes", True)]) as corrected:
        for ota in TEST_OTAS:
            assert corrected[f"OTA{ota}.SCI"].header["SKY_STD"] < raw[f"OTA{ota}.SCI"].header["SKY_STD"]


def test_frame_without_fringes_is_left_alone(fringe_reductions):
    primary = fits.getheader(fringe_reductions[("none", True)])
    assert not primary["FRNG_OK"]
    assert abs(primary["FRNG_SCL"]) < 3 * primary["FRNG_ERR"]
    with fits.open(fringe_reductions[("none", True)]) as corrected, \
            fits.open(fringe_reductions[("none", False)]) as plain:
        for ota in TEST_OTAS:
            np.testing.assert_array_equal(corrected[f"OTA{ota}.SCI"].data, plain[f"OTA{ota}.SCI"].data)


def test_no_fringe_keywords_without_the_flag(fringe_reductions):
    """Without -fringe the frame-wide phases do not run: no fringe keyword is written."""
    primary = fits.getheader(fringe_reductions[("fringes", False)])
    assert "FRNG_SCL" not in primary


# --- Templates and vectors made by podi_makecalibrations -----------------------------------

N_DITHERS = 4


@pytest.fixture(scope="session")
def dithered_night(tmp_path_factory, fringe_cals):
    """Dithered odi_i sky frames, their template and vectors made by podi_makecalibrations
    (with the perfect bias, dark and flat already in the folder), and a science frame."""
    import shutil

    from podi_makecalibrations import make_calibrations
    from podi_reduceota import ReductionSettings
    root = tmp_path_factory.mktemp("night")
    caldir = root / "cals"
    caldir.mkdir()
    for name in ("bias_bin2.fits", "dark_yes_bin2.fits", "flat_odi_i_bin2.fits"):
        shutil.copy(fringe_cals / name, caldir / name)
    sky_frames = []
    for i in range(N_DITHERS):
        spec = dithered(dataclasses.replace(FRINGE_SPEC, seed=70 + i, sequence=i + 1,
                                            mjd=56620.36 + i / 1440, field_seed=70), 120.0)
        sky_frames.append(simulate_exposure(spec, root / "raw", ncpus=2))
    written = make_calibrations(sky_frames, caldir, ReductionSettings(crosstalk="default"), ncpus=2,
                                fringe=True)
    science = simulate_exposure(dataclasses.replace(FRINGE_SPEC, seed=80, mjd=56620.4), root / "sci",
                                ncpus=2)
    return caldir, written, science


def test_makecalibrations_writes_template_and_vectors(dithered_night):
    caldir, written, _ = dithered_night
    assert caldir / "fringe__odi_i.fits" in written
    instrument = Instrument(PODI)
    with fits.open(caldir / "fringe__odi_i.fits") as hdus:
        assert hdus[0].header["OBSTYPE"] == "FRINGE"
        for ota in TEST_OTAS:
            template = hdus[f"OTA{ota}.SCI"].data
            pattern = instrument.fringe_pattern(ota, FRINGE_SPEC.binning)
            good = np.isfinite(template)
            # The template is AMPLITUDE x P, up to the noise of a 4-frame median.
            slope = np.sum(template[good] * pattern[good]) / np.sum(pattern[good] ** 2)
            assert slope == pytest.approx(AMPLITUDE, rel=0.03)
            vectors = podi_fringe.read_fringe_vectors(caldir / fringe_vectors_name("odi_i", ota))
            assert len(vectors) > 20
            # Every vector runs from a dark to a bright place of the true pattern.
            dark = pattern[(vectors[:, 1] // 2).astype(int), (vectors[:, 0] // 2).astype(int)]
            bright = pattern[(vectors[:, 3] // 2).astype(int), (vectors[:, 2] // 2).astype(int)]
            assert np.mean(bright > dark) > 0.95


def test_collectcells_uses_the_made_template(dithered_night, tmp_path):
    caldir, _, science = dithered_night
    output = tmp_path / "science.fits"
    assert run_collectcells(science, output, f"-cals={caldir}", f"-fringe={caldir}") == 0
    truth = truth_of(science)
    primary = fits.getheader(output)
    # The template holds AMPLITUDE x P: the scale is the science frame's sky.
    assert primary["FRNG_SCL"] == pytest.approx(truth["FRNGSCL"] / AMPLITUDE, rel=0.03)
    before = truth["FRNGSCL"]
    after = fringe_amplitude_in_residual(output, science, FRINGE_SPEC)
    for ota in TEST_OTAS:
        assert abs(after[ota]) < 0.05 * before


# --- Real vector files and bad input --------------------------------------------------------

def test_real_vector_files_work_in_collectcells(fringe_exposures, fringe_cals, mastercals, tmp_path):
    vectors = mastercals / "fringevectors" / "podi" / "odi_i"
    output = tmp_path / "real.fits"
    assert run_collectcells(fringe_exposures["fringes"], output, f"-cals={fringe_cals}",
                            f"-fringe={fringe_cals}", f"-fringevectors={vectors}") == 0
    with fits.open(output) as hdus:
        for ota in TEST_OTAS:
            assert hdus[f"OTA{ota}.SCI"].header["FRNG_NV"] > 0
        assert "FRNG_SCL" in hdus[0].header


def test_filter_without_template_is_left_alone(object_exposure, true_cals, tmp_path, caplog):
    output = tmp_path / "r.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", f"-fringe={tmp_path}") == 0
    assert "no template for filter odi_r" in caplog.text
    assert "FRNG_SCL" not in fits.getheader(output)


def test_ota_without_template_extension_gets_a_note(fringe_exposures, fringe_cals, tmp_path):
    template = tmp_path / "fringe__odi_i.fits"
    with fits.open(fringe_cals / "fringe__odi_i.fits") as hdus:
        fits.HDUList([hdu for hdu in hdus if hdu.name != "OTA33.SCI"]).writeto(template)
    output = tmp_path / "out.fits"
    assert run_collectcells(fringe_exposures["fringes"], output, f"-cals={fringe_cals}",
                            f"-fringe={template}", f"-fringevectors={fringe_cals}") == 0
    with fits.open(output) as hdus:
        history = " ".join(hdus["OTA33.SCI"].header["HISTORY"])
        assert "no extension for OTA 33" in history
        assert "FRNG_SCL" in hdus["OTA34.SCI"].header
        assert math.isfinite(hdus[0].header["FRNG_SCL"])


def test_unreadable_vector_file_gets_a_note(fringe_exposures, fringe_cals, tmp_path):
    import shutil
    for path in fringe_cals.glob("fringevectors__*.reg"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / fringe_vectors_name("odi_i", 34)).write_text("# Region file\nimage\nvector(1,2,x,4)\n")
    output = tmp_path / "out.fits"
    assert run_collectcells(fringe_exposures["fringes"], output, f"-cals={fringe_cals}",
                            f"-fringe={fringe_cals}", f"-fringevectors={tmp_path}") == 0
    with fits.open(output) as hdus:
        assert hdus[0].header["NFAILED"] == 0
        assert "fringes not measured" in " ".join(hdus["OTA34.SCI"].header["HISTORY"])
        assert hdus[0].header["FRNG_OK"]


def test_missing_template_file_is_an_error(fringe_exposures, fringe_cals, tmp_path, capsys):
    output = tmp_path / "out.fits"
    assert run_collectcells(fringe_exposures["fringes"], output, f"-cals={fringe_cals}",
                            f"-fringe={tmp_path / 'nothere.fits'}") == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "nothere.fits: no such file or folder" in error
    assert not output.exists()


def test_unbinned_template_serves_binned_data_and_other_sizes_get_a_note(fringe_exposures,
                                                                         fringe_cals, tmp_path):
    """An unbinned template is block-averaged to binning 2 (same scale as the binned
    one); a template of any other size leaves its OTA alone with a note."""
    from podi_makecalibrations import master_extension
    template = tmp_path / "fringe__odi_i.fits"
    with fits.open(fringe_cals / "fringe__odi_i.fits") as hdus:
        unbinned = [master_extension(ota, np.repeat(np.repeat(hdus[f"OTA{ota}.SCI"].data, 2, 0), 2, 1))
                    for ota in (33, 34)]
        fits.HDUList([fits.PrimaryHDU()] + unbinned
                     + [master_extension(22, np.zeros((1000, 1000), np.float32))]).writeto(template)
    output = tmp_path / "out.fits"
    assert run_collectcells(fringe_exposures["fringes"], output, f"-cals={fringe_cals}",
                            f"-fringe={template}", f"-fringevectors={fringe_cals}") == 0
    truth = truth_of(fringe_exposures["fringes"])
    with fits.open(output) as hdus:
        assert hdus[0].header["FRNG_SCL"] == pytest.approx(truth["FRNGSCL"], rel=0.03)
        assert "is (1000, 1000), expected (2048, 2048)" in " ".join(hdus["OTA22.SCI"].header["HISTORY"])
