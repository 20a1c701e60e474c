"""Shared fixtures: real calibration files from ../shared and simulated exposures.

Simulations are made once per test session (binned, few OTAs) and shared.
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata():
    """Root of the real instrument files; tests skip with a reason where it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA}")
    return REALDATA


@pytest.fixture(scope="session")
def mastercals(realdata):
    return realdata / "mastercals"


# --- Simulated data, made once per session ------------------------------------------

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from podi_simulate import Effects, ExposureSpec, simulate_exposure  # noqa: E402

#: OTAs of the small test camera: two of the central 2x2 (they define the flat
#: level for broad-band filters... and one outer central OTA).
TEST_OTAS = (22, 33, 34)
TEST_BINNING = 2
N_CALIB = 5


def small_spec(**changes):
    """A small binned exposure without nonlinearity (the step that corrects it is off)."""
    base = ExposureSpec(otas=TEST_OTAS, binning=TEST_BINNING,
                        effects=Effects(nonlinearity=False))
    return dataclasses.replace(base, **changes)


#: The object exposure most tests reduce.
OBJECT_SPEC = small_spec(seed=7, mjd=56620.3)


def _simulate_series(root, obstype, count, first_seed, **changes):
    paths = []
    for i in range(count):
        spec = small_spec(obstype=obstype, seed=first_seed + i, sequence=i + 1,
                         mjd=56620.0 + (first_seed + i) / 1440, **changes)
        paths.append(simulate_exposure(spec, root, ncpus=2))
    return paths


@pytest.fixture(scope="session")
def calibration_exposures(tmp_path_factory):
    """Five biases, five 300 s darks and five r-band dome flats of the test camera."""
    root = tmp_path_factory.mktemp("rawcal")
    return {"bias": _simulate_series(root, "BIAS", N_CALIB, 100),
            "dark": _simulate_series(root, "DARK", N_CALIB, 200, exptime=300.0),
            "flat": _simulate_series(root, "DFLAT", N_CALIB, 300, exptime=20.0,
                                     flat_level=30000.0)}


@pytest.fixture(scope="session")
def masters(calibration_exposures, tmp_path_factory):
    """Master bias, dark and flat made by the podi_makecalibrations command from the exposures."""
    from podi_makecalibrations import main
    outdir = tmp_path_factory.mktemp("cals")
    inputs = [str(p) for paths in calibration_exposures.values() for p in paths]
    assert main(inputs + [str(outdir), "-ncpus=2"]) == 0
    return {path.name: path for path in sorted(outdir.glob("*.fits"))}


@pytest.fixture(scope="session")
def object_exposure(tmp_path_factory):
    """One 300 s r-band object exposure of the test camera."""
    root = tmp_path_factory.mktemp("object")
    return simulate_exposure(OBJECT_SPEC, root, ncpus=2)


@pytest.fixture(scope="session")
def true_cals(tmp_path_factory):
    """Perfect masters of the test camera (from the simulator's truth), in ADU."""
    from podi_simulate import write_true_calibrations
    directory = tmp_path_factory.mktemp("truecals")
    write_true_calibrations(OBJECT_SPEC, directory)
    return directory


def raw_ota_image(exposure, ota, binning=TEST_BINNING):
    """Science pixels of an OTA's raw cells as one OTA array (ADU; NaN between cells)."""
    from podi_definitions import all_cells, cell_to_ota, science_section
    from podi_rawdata import find_exposure, open_raw_ota
    rows, cols = science_section(binning)
    image = np.full((4096 // binning,) * 2, np.nan)
    with open_raw_ota(find_exposure(exposure).ota_files[ota]) as raw:
        cells = raw.cells()
    for cx, cy in all_cells():
        image[cell_to_ota(cx, cy, binning)] = cells[cy, cx, rows, cols]
    return image


def run_collectcells(*args):
    """Run the command line in this process; return its exit status."""
    from podi_collectcells import main
    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def reduced_object(object_exposure, true_cals, tmp_path_factory):
    """The object exposure reduced with the perfect masters."""
    output = tmp_path_factory.mktemp("reduced") / "object.fits"
    assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-ncpus=2") == 0
    return output


# --- Star fields for the astrometry and photometry tests ----------------------------

#: OTAs of the star fields: the central 2x2, so that every field spans OTA gaps.
STAR_FIELD_OTAS = (33, 34, 43, 44)

#: (pointing error dRA cos(dec), dDec in arcsec; rotator error in degrees)
STAR_FIELD_ERRORS = [((45.0, -30.0), 0.4), ((150.0, 60.0), -1.0), ((-240.0, 180.0), 1.5)]


def refcat_of(exposure):
    """The simulator's reference catalog of an exposure."""
    return exposure.parent / f"{exposure.name}.refcat.fits"


def true_star_offsets(exposure, hdus, otas):
    """Distance (arcsec) between the true pixels of the exposure's stars and where the
    output's WCS puts them, on the given OTAs of a binning-2 test frame."""
    import numpy as np
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS
    stars = Table(fits.getdata(exposure.parent / f"{exposure.name}.truth.fits", "STARS"))
    offsets = []
    for ota in otas:
        mine = stars[(stars["ota"] == ota) & (stars["x"] > 0) & (stars["x"] < 2047)
                     & (stars["y"] > 0) & (stars["y"] < 2047)]
        x, y = WCS(hdus[f"OTA{ota}.SCI"].header).all_world2pix(mine["ra"], mine["dec"], 0)
        offsets.append(np.hypot(x - mine["x"], y - mine["y"]) * 0.1126 * TEST_BINNING)
    return np.concatenate(offsets)


#: The star fields' true WCS departs from the canned model the reduction starts from,
#: by what it is not told: each OTA shifted and rotated (1.5" rms), the plate scale
#: (2e-4) and a radial cubic term (0.35" at the fields' corners).
STAR_FIELD_DEPARTURE = {"ota_offsets": 1.5, "scale_error": 2e-4, "cubic_distortion": 0.02}


@pytest.fixture(scope="session")
def star_fields(tmp_path_factory):
    """Three simulated fields with pointing and rotator errors and a true WCS that departs
    from the canned model (:data:`STAR_FIELD_DEPARTURE`), and their perfect masters."""
    from podi_simulate import write_true_calibrations
    root = tmp_path_factory.mktemp("starfields")
    fields = []
    for i, (error, rotation) in enumerate(STAR_FIELD_ERRORS):
        spec = small_spec(otas=STAR_FIELD_OTAS, seed=40 + i, ra=150.0 + 3 * i, dec=30.0 + 10 * i,
                          pointing_error=error, rotator_error=rotation, **STAR_FIELD_DEPARTURE)
        fields.append(simulate_exposure(spec, root / f"field{i}", ncpus=2))
    write_true_calibrations(small_spec(otas=STAR_FIELD_OTAS), root / "cals")
    return fields, root / "cals"


@pytest.fixture(scope="session")
def calibrated_fields(star_fields, tmp_path_factory):
    """Each star field reduced with -fixwcs -photcalib -fitradialZP, with its QA page and
    plots: a night of three frames.

    Returns a list of (exposure, output file, the summary line printed).
    """
    import contextlib
    import io
    exposures, cals = star_fields
    root = tmp_path_factory.mktemp("calibrated")
    results = []
    for i, exposure in enumerate(exposures):
        output = root / f"field{i}.fits"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = run_collectcells(exposure, output, f"-cals={cals}", "-fitradialZP",
                                      f"-refcat={refcat_of(exposure)}")
        assert status == 0
        results.append((exposure, output, printed.getvalue().strip()))
    return results
