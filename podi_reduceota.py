"""Reduction of one OTA: from raw cells to a calibrated OTA array.

The reduction is an ordered list of stages (:data:`CELL_STAGES` on the raw cells,
then :data:`OTA_STAGES` on the assembled OTA array). Each stage is a small function
``stage(frame, settings)`` that does one job, records itself in the OTA header
(a ``HISTORY`` line and its keywords, as ccdproc does) and in ``frame.steps``, and
returns silently when its calibration is not asked for.

Units: ADU until the gain stage (``settings.gain``), electrons after it.
Pixel conventions: OTA arrays are numpy ``[y, x]``, 0-based; undefined pixels
(gaps, broken cells, masked pixels) are NaN, which every stage treats as no data.
"""

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

import podi_bpm
import podi_crosstalk
import podi_nonlinearity
import podi_persistency
from podi_definitions import (N_CELLS, SATURATION_ADU, all_cells, broken_cells, cell_geometry, cell_is_science,
                              cell_to_ota, layout_for_mjd, ota_extname)
from podi_mef import (CalibrationError, header_number, open_calibration, read_ota_image,
                      release_calibration_pages, valid_cards)
from podi_overscan import subtract_overscan
from podi_rawdata import RawDataError, exposure_base_from_file, open_raw_ota

logger = logging.getLogger(__name__)

#: Primary-header cards of a raw file that describe the file, not the data.
_STRUCTURE_CARDS = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "NEXTEND",
                    "BZERO", "BSCALE", "CHECKSUM", "DATASUM", "CELLGAP1", "CELLGAP2",
                    "CNAXIS1", "CNAXIS2", "NAMPS", "PRESCAN1", "PRESCAN2", "OVRSCAN1",
                    "OVRSCAN2", "IMNAXIS1", "IMNAXIS2")


@dataclass
class ReductionSettings:
    """What to do to each OTA. Paths are resolved files (not directories).

    Attributes
    ----------
    crosstalk : str or None
        ``'default'`` (built-in coefficient), a matrix file, or None (off).
    overscan_method : str
    nonlinearity : str or None
        Coefficient table file.
    gain : bool
        Multiply each cell by its gain: output in electrons.
    bias, dark, flat : str or None
        Master calibration files (pipeline format).
    bpm : str or None
        Directory of ``bpm_xy<NN>.reg`` region files.
    persistency : str or None
        Folder of the night's saturation catalogs (:mod:`podi_persistency`): mask this
        frame's saturation trails and the persistence of the exposures before it.
    persistency_model : bool
        Subtract the fitted persistent charge where it is weak instead of masking.
    """

    crosstalk: str = None
    overscan_method: str = "clippedmean"
    nonlinearity: str = None
    gain: bool = False
    bias: str = None
    dark: str = None
    flat: str = None
    bpm: str = None
    persistency: str = None
    persistency_model: bool = False


@dataclass
class OTAFrame:
    """One OTA while it is being reduced.

    Attributes
    ----------
    filename : Path
    ota, binning : int
    primary : astropy.io.fits.Header
        Raw primary header.
    header : astropy.io.fits.Header
        Header of the output extension, filled by the stages.
    cells : numpy.ndarray or None
        Raw cells ``[cy, cx, row, col]`` until assembly.
    header_gains : numpy.ndarray
        ``GAIN`` of every raw cell header, ``[cy, cx]`` (e-/ADU).
    image : numpy.ndarray or None
        The OTA array after assembly.
    files_used : dict
        Reduction step -> absolute path of the calibration used.
    steps : dict
        Stage name -> ``'done'`` or a reason it was skipped.
    read_noise : float
        Median read noise of the used cells, in the data's current units.
    saturation : float
        Lowest level at which a pixel may be saturated, in the data's current units.
    sky_samples : numpy.ndarray or None
        Sky boxes of :func:`podi_sky.sky_samples`, once measured.
    sources : astropy.table.Table or None
        Detected sources, once detected.
    pixel_scale : float or None
        arcsec/pixel at the OTA's centre, once sources are detected.
    inherited : dict
        Exposure keywords moved out of ``header`` for the primary header.
    saturated : numpy.ndarray or None
        Saturated raw pixels (:func:`podi_persistency.saturated_pixels`), with
        ``-persistency``.
    quicklook : podi_preview.QuickLook or None
        Preview and cell sky levels for the QA page, once measured.
    """

    filename: Path
    ota: int
    binning: int
    primary: fits.Header
    header: fits.Header
    cells: np.ndarray = None
    header_gains: np.ndarray = None
    image: np.ndarray = None
    files_used: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    read_noise: float = np.nan
    saturation: float = float(SATURATION_ADU)
    sky_samples: np.ndarray = None
    sources: object = None
    pixel_scale: float = None
    inherited: dict = field(default_factory=dict)
    saturated: np.ndarray = None
    quicklook: object = None

    def record(self, step, message, filename=None):
        self.steps[step] = "done"
        self.header.add_history(f"{step}: {message}")
        if filename is not None:
            self.files_used[step] = str(Path(filename).resolve())

    @property
    def used_cells(self):
        """Cells that hold science data: ``S`` in CELLMODE and not known broken."""
        layout = layout_for_mjd(self.primary.get("MJD-OBS", 0.0))
        broken = broken_cells(layout, self.ota)
        cellmode = str(self.primary.get("CELLMODE", ""))
        return [(cx, cy) for cx, cy in all_cells()
                if (cx, cy) not in broken and cell_is_science(cellmode, cx, cy)]


# --- Stages on the raw cells ----------------------------------------------------------

def find_saturation(frame, settings):
    """Note the raw pixels at saturation (before any correction changes them)."""
    if settings.persistency is None:
        return
    frame.saturated = podi_persistency.saturated_pixels(frame.cells)
    frame.record("saturation", f"{len(frame.saturated)} saturated raw pixels")


def correct_crosstalk(frame, settings):
    """Remove crosstalk between the cells of each cell row (on raw ADU, incl. overscan)."""
    if settings.crosstalk is None:
        return
    if settings.crosstalk == "default":
        inverse = podi_crosstalk.default_crosstalk()[1]
        source = "built-in coefficient"
    else:
        inverse = _crosstalk_inverse(settings.crosstalk)
        source = settings.crosstalk
    podi_crosstalk.apply_crosstalk(frame.cells, inverse, out=frame.cells)
    frame.record("crosstalk", source, None if settings.crosstalk == "default" else settings.crosstalk)


def overscan(frame, settings):
    """Subtract each cell's overscan level."""
    levels, noise = subtract_overscan(frame.cells, frame.binning, settings.overscan_method)
    used = [(cy, cx) for cx, cy in frame.used_cells]
    if used:
        cy, cx = np.array(used).T
        frame.read_noise = float(np.median(noise[cy, cx]))
        frame.saturation = float(SATURATION_ADU - levels[cy, cx].max())
    frame.record("overscan", f"per-cell {settings.overscan_method} of the overscan block")


def nonlinearity(frame, settings):
    """Correct each cell's nonlinearity (polynomial in overscan-subtracted ADU)."""
    if settings.nonlinearity is None:
        return
    table = _nonlinearity_table(settings.nonlinearity)
    rows, cols = (slice(0, n) for n in _science_shape(frame.binning))
    saturation = []
    for cx, cy in frame.used_cells:
        coefficients = table.coefficients(frame.ota, cx, cy)
        if coefficients is not None:
            podi_nonlinearity.correct_nonlinearity(frame.cells[cy, cx, rows, cols], coefficients)
            level = np.array([frame.saturation])
            podi_nonlinearity.correct_nonlinearity(level, coefficients)
            saturation.append(level[0])
    if saturation:
        frame.saturation = float(min(saturation))
    frame.header["NONLIN"] = (Path(settings.nonlinearity).name, "nonlinearity table")
    frame.record("nonlinearity", settings.nonlinearity, settings.nonlinearity)


def gain(frame, settings):
    """Multiply each cell by its gain (output in electrons).

    The gain is the cell header's ``GAIN``, or with a nonlinearity table its
    ``RELATIVE_GAIN`` times the OTA's mean header gain: the table's gains are relative.
    """
    if not settings.gain:
        return
    gains = cell_gains(frame)
    if settings.nonlinearity is not None:
        table = _nonlinearity_table(settings.nonlinearity)
        mean = np.mean([gains[cy, cx] for cx, cy in frame.used_cells])
        for cx, cy in frame.used_cells:
            gains[cy, cx] = table.relative_gain(frame.ota, cx, cy) * mean
        method = "relative"
    else:
        method = "header"
    for cx, cy in frame.used_cells:
        frame.cells[cy, cx] *= np.float32(gains[cy, cx])
    used = [gains[cy, cx] for cx, cy in frame.used_cells]
    frame.saturation *= float(min(used))
    frame.read_noise *= float(np.median(used))
    frame.header["GAINMTHD"] = (method, "cell gains: header GAIN or RELATIVE_GAIN x mean")
    frame.record("gain", f"each cell times its {method} gain")


def cell_gains(frame):
    """Header ``GAIN`` of every cell, ``[cy, cx]`` (e-/ADU): a copy the caller may change."""
    return frame.header_gains.copy()


def _science_shape(binning):
    geometry = cell_geometry(binning)
    return geometry.science_rows, geometry.science_cols


def assemble(frame, settings):
    """Place the science sections of the used cells into the OTA array.

    The array is ``frame.image`` if the caller provided one (e.g. shared memory
    that the master process reads), else a new one.
    """
    size = cell_geometry(frame.binning).ota_size
    rows, cols = (slice(0, n) for n in _science_shape(frame.binning))
    image = frame.image if frame.image is not None else np.empty((size, size), np.float32)
    if image.shape != (size, size):
        raise ValueError(f"{frame.filename}: output array is {image.shape}, the OTA is {size}x{size}")
    image[...] = np.nan
    for cx, cy in frame.used_cells:
        image[cell_to_ota(cx, cy, frame.binning)] = frame.cells[cy, cx, rows, cols]
    frame.image, frame.cells = image, None
    frame.header["NCELLS"] = (len(frame.used_cells), "cells with science data")


# --- Stages on the OTA array ----------------------------------------------------------

#: Masters are checked on every this many pixels along each axis (65,000 of an OTA).
MASTER_SAMPLE_STEP = 16
#: A master OTA image with less than this fraction of finite (for a flat: positive)
#: sampled pixels is broken: the OTA fails rather than come out meaningless.
MIN_GOOD_FRACTION = 0.5
#: A master bias is overscan-subtracted, a master dark bias-subtracted: the median of
#: either lies within this (BUNIT) of 0.
LEVEL_LIMIT = 200.0


def _master(frame, filename, step):
    """A master's image of this OTA (a read-only memory map), its extension and primary
    headers, after checking that it is usable (:data:`MIN_GOOD_FRACTION`, :data:`LEVEL_LIMIT`).

    Raises
    ------
    CalibrationError
        Naming the file, the OTA and what is wrong: the OTA fails, not the frame.
    """
    size = cell_geometry(frame.binning).ota_size
    data, header, primary = read_ota_image(filename, frame.ota, size, mapped=True)
    sample = np.asarray(data[::MASTER_SAMPLE_STEP, ::MASTER_SAMPLE_STEP], dtype=np.float32)
    good = sample > 0 if step == "flat" else np.isfinite(sample)
    if good.mean() < MIN_GOOD_FRACTION:
        what = "positive" if step == "flat" else "finite"
        raise CalibrationError(f"{filename}: master {step} of OTA {frame.ota:02d} is only "
                               f"{100 * good.mean():.0f} % {what}: unusable")
    if step in ("bias", "dark") and abs(float(np.median(sample[good]))) > LEVEL_LIMIT:
        raise CalibrationError(f"{filename}: master {step} of OTA {frame.ota:02d} has a median of "
                               f"{float(np.median(sample[good])):.0f}, not near 0: a master {step} is "
                               f"{'overscan' if step == 'bias' else 'bias'}-subtracted")
    frame.header[f"CC-{step.upper()[:5]}"] = (Path(filename).name, f"master {step}")
    return data, header, primary


def bias(frame, settings):
    """Subtract the master bias."""
    if settings.bias is None:
        return
    data, _, _ = _master(frame, settings.bias, "bias")
    frame.image -= data
    frame.record("bias", settings.bias, settings.bias)


def dark(frame, settings):
    """Subtract the master dark scaled by the ratio of exposure times (science / dark)."""
    if settings.dark is None:
        return
    data, _, primary = _master(frame, settings.dark, "dark")
    dark_time = float(primary.get("EXPTIME", 0.0))
    if dark_time <= 0:
        raise CalibrationError(f"{settings.dark}: master dark has no positive EXPTIME")
    scale = float(frame.primary.get("EXPTIME", 0.0)) / dark_time
    subtract_scaled(frame.image, data, scale)
    frame.header["DARKSCAL"] = (scale, "EXPTIME science / EXPTIME dark")
    frame.record("dark", f"{settings.dark} x {scale:.4f}", settings.dark)


def subtract_scaled(image, data, scale, rows=256, undefined_as_zero=False):
    """``image -= scale * data`` in place, a block of rows at a time.

    The product of a whole OTA would be a fresh 64 MB temporary, whose pages the
    kernel must zero each time; a block of rows stays in reused heap memory.
    ``data`` may be a memory map of a file in any byte order. With
    ``undefined_as_zero``, NaN in ``data`` subtracts nothing.
    """
    factor = np.float32(scale)
    for start in range(0, image.shape[0], rows):
        block = data[start:start + rows] * factor
        if undefined_as_zero:
            np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        image[start:start + rows] -= block


#: Keywords of a master flat's extension copied to the OTA (podi_makecalibrations -pupilghost).
PUPIL_GHOST_FLAT_KEYWORDS = ("PGAFCTD", "PGEFCTVX", "PGEFCTVY")


def flat(frame, settings):
    """Divide by the master flat; the flat's gain becomes the OTA's gain."""
    if settings.flat is None:
        return
    data, header, primary = _master(frame, settings.flat, "flat")
    # A flat with the pupil ghost divided out leaves the ghost in the data
    # (podi_pupilghost subtracts it); the flat says where its ghost was.
    for key in PUPIL_GHOST_FLAT_KEYWORDS:
        if key in header:
            frame.header[key] = (header[key], header.comments[key])
    with np.errstate(divide="ignore", invalid="ignore"):
        frame.image /= data
    # No response, no data: a pixel whose flat is 0 or negative is undefined (NaN),
    # never of the wrong sign (infinite ones become NaN when the OTA is finished).
    if (np.asarray(data[::MASTER_SAMPLE_STEP, ::MASTER_SAMPLE_STEP]) <= 0).any():
        np.copyto(frame.image, np.float32(np.nan), where=~(data > 0))
    response = data[::8, ::8]
    response = response[np.isfinite(response)]
    if response.size:
        # A saturated pixel of high response comes out lowest.
        frame.saturation /= float(np.percentile(response, 99.9))
        frame.read_noise /= float(np.median(response))
    if "GAIN" in primary:
        frame.header["GAIN"] = (primary["GAIN"], "gain of the master flat (e-/ADU)")
    frame.record("flat", settings.flat, settings.flat)


def bad_pixels(frame, settings):
    """Mask the bad pixels of the OTA's ds9 region file."""
    if settings.bpm is None:
        return
    region_file = podi_bpm.bpm_filename(settings.bpm, frame.ota)
    if not Path(region_file).is_file():
        logger.warning("%s: no bad-pixel region file %s; OTA %02d not masked",
                       frame.filename.name, region_file, frame.ota)
        frame.steps["bpm"] = f"no file {region_file}"
        return
    count = podi_bpm.apply_bpm(frame.image, region_file, frame.binning)
    frame.header["BPMPIX"] = (count, "pixels masked from the bad-pixel regions")
    frame.record("bpm", str(region_file), region_file)


def persistency(frame, settings):
    """Mask this frame's saturation trails and the persistence of the exposures that
    ended within 10 minutes before it started (their catalogs in the folder's index)."""
    if settings.persistency is None:
        return
    masked = podi_persistency.mask_saturation(frame.image, frame.saturated, frame.binning, trails=True)
    catalog = podi_persistency.catalog_name(exposure_base_from_file(frame.filename))
    frame.header["SATMASK"] = (catalog[:68], "saturation catalog of this frame (trails masked)")
    frame.header["NSATPIX"] = (len(frame.saturated), "saturated raw pixels")
    mjd = float(frame.primary.get("MJD-OBS", 0.0))
    earlier = []
    catalogs = podi_persistency.earlier_catalogs(settings.persistency, mjd)
    for number, (path, _, _, end) in enumerate(catalogs, 1):
        found = podi_persistency.read_catalog(path, frame.ota)
        if found is not None:
            earlier.append((*found, (mjd - end) * 86400))
        frame.header[f"PERSIS{number:02d}"] = (Path(path).name[:68], "saturation catalog used")
    if settings.persistency_model:
        amplitude, corrected, strong = podi_persistency.correct_persistence(
            frame.image, earlier, frame.binning, float(frame.primary.get("EXPTIME", 0.0)))
        frame.header["PERSAMP"] = (header_number(amplitude), "fitted persistence amplitude (BUNIT/s)")
        frame.header["PERSTAU"] = (podi_persistency.PERSISTENCE_TAU, "persistence model decay time (s)")
        frame.header["PERSCORR"] = (corrected, "persistent pixels corrected")
        masked += strong
    else:
        for saturated, catalog_binning, _ in earlier:
            masked += podi_persistency.mask_saturation(frame.image, saturated, frame.binning, trails=False,
                                                       catalog_binning=catalog_binning)
    frame.record("persistency", f"{masked} pixels masked: trails and {len(earlier)} earlier exposures"
                 + (f", {corrected} corrected" if settings.persistency_model else ""))


def infinite_pixels(frame, settings):
    """Pixels that came out infinite (a master's infinite values) are undefined (NaN),
    as every other pixel without a meaningful value."""
    infinite = np.isinf(frame.image)
    if infinite.any():
        frame.image[infinite] = np.nan
        frame.record("infinite", f"{int(infinite.sum())} infinite pixels made undefined")


CELL_STAGES = [find_saturation, correct_crosstalk, overscan, nonlinearity, gain, assemble]
OTA_STAGES = [bias, dark, flat, bad_pixels, persistency, infinite_pixels]


def check_expected(raw, ota, binning):
    """Raise :class:`RawDataError` unless an opened raw file is OTA ``ota`` (its name's)
    at ``binning``: a file whose ``FPPOS`` names another OTA would be calibrated with
    that OTA's masters and written twice."""
    if raw.ota != ota:
        raise RawDataError(raw.filename, f"FPPOS = {raw.header['FPPOS']!r} says OTA {raw.ota:02d}, "
                                         f"the file name says OTA {ota:02d}")
    if raw.binning != binning:
        raise RawDataError(raw.filename, f"binned {raw.binning}x{raw.binning}, the exposure's other "
                                         f"OTA files {binning}x{binning}")


def _header_gains(raw):
    gains = np.ones((N_CELLS, N_CELLS))
    for cx, cy in all_cells():
        gains[cy, cx] = float(raw.cell_header(cx, cy).get("GAIN", 1.0))
    return gains


def _output_header(raw, gains):
    """The OTA's output header: the raw primary's cards (but structure and comments),
    the OTA and every cell's gain. A raw card that is not valid FITS (a garbled
    byte) is left out with a HISTORY note rather than failing the OTA when written."""
    header, dropped = valid_cards(raw.header, leave_out=set(_STRUCTURE_CARDS) | {"", "COMMENT"})
    for keyword in dropped:
        header.add_history(f"raw card {keyword[:20]!r} left out: not valid FITS")
    header["EXTNAME"] = ota_extname(raw.ota)
    header["OTA"] = (raw.ota, "OTA position")
    for cx, cy in all_cells():
        header[f"GAIN_C{cx}{cy}"] = (float(gains[cy, cx]), f"gain of cell {cx},{cy} (e-/ADU)")
    return header


def load_calibrations(settings):
    """Read the tables and open the masters of ``settings`` in this process.

    Each is then read once per process; processes forked afterwards (the workers)
    inherit them parsed.
    """
    if settings.crosstalk not in (None, "default"):
        _crosstalk_inverse(settings.crosstalk)
    if settings.nonlinearity is not None:
        _nonlinearity_table(settings.nonlinearity)
    for master in (settings.bias, settings.dark, settings.flat):
        if master is not None:
            open_calibration(master)


# A worker reduces several OTAs with the same tables: each is read once per process.
@functools.lru_cache(maxsize=4)
def _crosstalk_inverse(filename):
    return podi_crosstalk.read_crosstalk(filename)[1]


@functools.lru_cache(maxsize=4)
def _nonlinearity_table(filename):
    return podi_nonlinearity.read_nonlinearity(filename)


@functools.lru_cache(maxsize=1)
def _cell_buffer(cell_shape):
    """The raw-cell array of this process, reused by every OTA it reduces.

    A fresh 72 MB array per unbinned OTA would cost 18,000 page faults each time;
    the cells are no longer needed once :func:`assemble` has placed them.
    """
    return np.empty((N_CELLS, N_CELLS) + tuple(cell_shape), np.float32)


def reduce_ota(filename, settings, stop_after=None, out=None, expected=None):
    """Reduce one raw OTA file.

    Parameters
    ----------
    filename : str or Path
    settings : ReductionSettings
    stop_after : str, optional
        Name of the last stage to run (e.g. ``'bias'`` for master darks).
    out : numpy.ndarray, optional
        float32 OTA array to assemble into (filled completely).
    expected : (int, int), optional
        The OTA (from the file's name) and binning the exposure expects of this file.

    Returns
    -------
    OTAFrame

    Raises
    ------
    RawDataError
        The file is unusable, or not the expected OTA or binning.
    """
    with open_raw_ota(filename) as raw:
        if expected is not None:
            check_expected(raw, *expected)
        gains = _header_gains(raw)
        frame = OTAFrame(Path(filename), raw.ota, raw.binning, raw.header.copy(), _output_header(raw, gains),
                         cells=raw.cells(out=_cell_buffer(raw.cell_shape)), header_gains=gains,
                         image=out)
    frame.files_used["raw"] = str(Path(filename).resolve())
    gains = cell_gains(frame)
    used = frame.used_cells
    if not used:
        raise RawDataError(filename, f"no cell holds science data (CELLMODE = "
                                     f"{str(frame.primary.get('CELLMODE', ''))[:20]!r}...)")
    frame.header["GAIN"] = (float(np.mean([gains[cy, cx] for cx, cy in used])) if used else 1.0,
                            "mean gain of the used cells (e-/ADU)")
    for stage in CELL_STAGES + OTA_STAGES:
        stage(frame, settings)
        if stage.__name__ == stop_after:
            break
    # The masters' pages of this OTA are not needed again by this process.
    release_calibration_pages()
    if settings.gain:
        frame.header["GAIN"] = (1.0, "data are in electrons")
    frame.header["BUNIT"] = ("electron" if settings.gain else "adu", "unit of the pixel values")
    frame.header["RDNOISE"] = (round(frame.read_noise, 4), "read noise in BUNIT (from the overscan)")
    frame.header["SATURATE"] = (round(frame.saturation, 1), "data above this may be saturated (BUNIT)")
    return frame
