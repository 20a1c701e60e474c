"""The simulator's persistence: saturated pixels release charge into later exposures.

Expected charges are computed here from the definition (a double exponential in e-/s
per unbinned pixel, integrated over the later exposure), not by the simulator's helpers.
"""

import dataclasses
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from conftest import raw_ota_image
from podi_definitions import SATURATION_ADU, ota_to_cell
from podi_simulate import Effects, ExposureSpec, main, simulate_exposure, true_ota_wcs

BINNING = 2
OTA = 33
EXPTIME = 300.0
MJD = 56620.1
#: The rates and decay times the simulator documents (e-/s per unbinned pixel, s).
TERMS = ((2.0, 30.0), (5.0, 150.0))
#: A mag-13 star saturates ~100 binned pixels in 300 s; placed in the middle of cell (3, 4).
BRIGHT_MAG = 13.0
BRIGHT_PIXEL = (882.0, 881.0)
#: Random effects off, and nonlinearity and crosstalk too: raw ADU = electrons / gain
#: + bias, exactly, and a saturated pixel stays at 65535.
EFFECTS = dict(poisson=False, read_noise=False, cosmics=False, nonlinearity=False, crosstalk=False)


def expected_charge(t0, t1):
    """Electrons per binned pixel released from t0 to t1 seconds after saturation ended."""
    return BINNING**2 * sum(a * tau * (math.exp(-t0 / tau) - math.exp(-t1 / tau)) for a, tau in TERMS)


def spec_at(seconds_after_first_end=None, **changes):
    """One binned OTA, no field stars; ``seconds_after_first_end``: start after the first frame."""
    mjd = MJD if seconds_after_first_end is None else MJD + (EXPTIME + seconds_after_first_end) / 86400
    base = ExposureSpec(otas=(OTA,), binning=BINNING, seed=3, exptime=EXPTIME, mjd=mjd,
                        star_density=0.0, effects=Effects(**EFFECTS))
    return dataclasses.replace(base, **changes)


def truth_path(exposure):
    return exposure.parent / f"{exposure.name}.truth.fits"




def table(truth, name):
    with fits.open(truth) as hdus:
        return Table(hdus[name].data), hdus[0].header


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A frame with a saturated star, and frames 300 s and 900 s after its end."""
    root = tmp_path_factory.mktemp("persistence")
    wcs = WCS(true_ota_wcs(spec_at(), OTA))
    (ra,), (dec,) = wcs.all_pix2world([BRIGHT_PIXEL[0]], [BRIGHT_PIXEL[1]], 0)
    first = simulate_exposure(spec_at(extra_stars=((ra, dec, BRIGHT_MAG),)), root / "first", ncpus=1)
    source = (str(truth_path(first)),)
    return {"first": first,
            "later": simulate_exposure(spec_at(300.0, persistence_from=source), root / "later", ncpus=1),
            "clean": simulate_exposure(spec_at(300.0), root / "clean", ncpus=1),
            "much_later": simulate_exposure(spec_at(900.0, persistence_from=source), root / "much_later",
                                            ncpus=1)}


def test_saturated_pixels_are_the_raw_65535_of_the_bright_star(frames):
    saturated, header = table(truth_path(frames["first"]), "SATURATED")
    stars, _ = table(truth_path(frames["first"]), "STARS")
    assert header["MJDEND"] == pytest.approx(MJD + EXPTIME / 86400, abs=1e-9)
    assert len(saturated) > 50 and set(saturated["ota"]) == {OTA}
    raw = raw_ota_image(frames["first"], OTA)
    y, x = np.nonzero(raw == SATURATION_ADU)
    assert set(zip(saturated["x"], saturated["y"])) == set(zip(x, y))
    (star,) = stars[stars["mag"] == BRIGHT_MAG]
    assert np.hypot(star["x"] - BRIGHT_PIXEL[0], star["y"] - BRIGHT_PIXEL[1]) < 0.01
    # The star's core, and its trail: the charge above the full well bleeds along columns.
    assert np.all(np.abs(saturated["x"] - star["x"]) < 15)
    assert np.ptp(saturated["y"]) > 2 * np.ptp(saturated["x"])
    # Nothing saturated, nothing recorded.
    assert len(table(truth_path(frames["clean"]), "SATURATED")[0]) == 0


def test_five_minutes_later_the_pixels_hold_the_released_charge(frames):
    saturated, _ = table(truth_path(frames["first"]), "SATURATED")
    persist, header = table(truth_path(frames["later"]), "PERSIST")
    assert [header[k] for k in ("PERSA1", "PERST1", "PERSA2", "PERST2")] == [v for t in TERMS for v in t]
    assert set(zip(persist["ota"], persist["x"], persist["y"])) == \
        set(zip(saturated["ota"], saturated["x"], saturated["y"]))
    expected = expected_charge(300.0, 300.0 + EXPTIME)
    np.testing.assert_allclose(persist["electrons"], expected, rtol=1e-6)
    # Clearly there: several times the sky's photon noise per pixel.
    assert expected > 5 * math.sqrt(header["SKY_E"])

    cells, _ = table(truth_path(frames["later"]), "CELLS")
    gain = {(row["cx"], row["cy"]): row["gain"] for row in cells}
    difference = raw_ota_image(frames["later"], OTA) - raw_ota_image(frames["clean"], OTA)
    pixel_gain = np.array([gain[ota_to_cell(x, y, BINNING)[:2]] for x, y in zip(persist["x"], persist["y"])])
    # Each raw value is rounded to an integer ADU.
    np.testing.assert_allclose(difference[persist["y"], persist["x"]], persist["electrons"] / pixel_gain,
                               atol=1.0)
    difference[persist["y"], persist["x"]] = 0
    assert np.nanmax(np.abs(difference)) == 0


def test_fifteen_minutes_later_much_less_is_left(frames):
    five, _ = table(truth_path(frames["later"]), "PERSIST")
    fifteen, _ = table(truth_path(frames["much_later"]), "PERSIST")
    np.testing.assert_allclose(fifteen["electrons"], expected_charge(900.0, 900.0 + EXPTIME), rtol=1e-6)
    assert np.all(fifteen["electrons"] < 0.1 * five["electrons"])


def test_wrong_binning_and_overlapping_exposures_are_refused(frames, tmp_path):
    source = (str(truth_path(frames["first"])),)
    with pytest.raises(ValueError, match="binning 2 differs from this exposure's 1"):
        simulate_exposure(spec_at(300.0, binning=1, persistence_from=source), tmp_path)
    # Starts 100 s after the first frame started, 200 s before it ended.
    overlapping = spec_at(persistence_from=source, mjd=MJD + 100 / 86400)
    with pytest.raises(ValueError, match=r"ends 200\.000 s after this exposure starts"):
        simulate_exposure(overlapping, tmp_path)
    not_truth = tmp_path / "not_truth.fits"
    fits.PrimaryHDU().writeto(not_truth)
    with pytest.raises(ValueError, match="not a truth record with a SATURATED table"):
        simulate_exposure(spec_at(300.0, persistence_from=(str(not_truth),)), tmp_path)
    # Refused before anything was written.
    assert [p.name for p in tmp_path.iterdir()] == [not_truth.name]


def test_a_sequence_carries_its_own_persistence(tmp_path):
    effects = [f"--no-{name.replace('_', '-')}" for name in EFFECTS]
    assert main([str(tmp_path), "--otas", str(OTA), "--binning", str(BINNING), "--count", "3",
                 "--exptime", str(EXPTIME), "--interval", "600", "--ncpus", "1"] + effects) == 0
    truths = sorted(tmp_path.glob("*.truth.fits"))
    saturated = [table(truth, "SATURATED")[0] for truth in truths]
    # The field's bright stars saturate the same pixels in every exposure.
    pixels = set(zip(saturated[0]["x"], saturated[0]["y"]))
    assert len(pixels) > 10 and all(set(zip(s["x"], s["y"])) == pixels for s in saturated)
    with fits.open(truths[0]) as hdus:
        assert "PERSIST" not in hdus
    second, _ = table(truths[1], "PERSIST")
    np.testing.assert_allclose(second["electrons"], expected_charge(300.0, 600.0), rtol=1e-6)
    # The third exposure gets the charge of both earlier ones.
    third, _ = table(truths[2], "PERSIST")
    np.testing.assert_allclose(third["electrons"],
                               expected_charge(900.0, 1200.0) + expected_charge(300.0, 600.0), rtol=1e-6)


def test_charge_above_the_full_well_bleeds_along_the_column_within_the_cell():
    """Ten full wells in one pixel become a trail of ten full pixels, up and down in turn;
    at the cell's edge the trail runs on the other way."""
    from podi_definitions import cell_to_ota
    from podi_simulate import FULL_WELL, _bleed
    spec = ExposureSpec(binning=2)
    full = FULL_WELL * 4
    image = np.zeros((2048, 2048), np.float32)
    rows, columns = cell_to_ota(2, 3, 2)
    image[rows.start + 100, columns.start + 50] = 10 * full
    _bleed(image, spec, None, 33, None)
    column = image[rows, columns.start + 50]
    assert np.flatnonzero(column).tolist() == list(range(96, 106))
    assert np.all(column[96:106] == np.float32(full)) and image.sum() == pytest.approx(10 * full)
    image[...] = 0
    image[rows.start + 1, columns.start + 50] = 10 * full  # near the bottom edge of the cell
    _bleed(image, spec, None, 33, None)
    assert image[rows, columns.start + 50][:12].tolist() == [np.float32(full)] * 10 + [0.0, 0.0]
    assert image.sum() == pytest.approx(10 * full)
