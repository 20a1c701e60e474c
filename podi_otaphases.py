"""The phases of one OTA in ``podi_collectcells``: reduce, measure, apply, finish.

Each OTA goes through ordered phases; between them its image stays in shared memory
(:class:`podi_workers.SharedBuffers`), native float32::

    reduce   calibration stages of podi_reduceota, then PLACEMENT_STAGES
    measure  every frame-wide correction measures the OTA      (worker)
             the master combines the measurements of all OTAs  (master)
    apply    every frame-wide correction corrects the OTA      (worker)
    finish   FINISH_STAGES (sky, sources, undefined value, inherited keywords),
             then FITS byte order and checksums for the output stream

Without frame-wide corrections one job per OTA runs reduce then finish
(:func:`collect_reduce_ota`): the measure and apply phases cost nothing. With
corrections the OTAs run in two rounds on the same worker processes
(:func:`reduce_and_measure`, then :func:`combine_measurements` in the master, then
:func:`apply_and_finish`). Frame-wide corrections come before the finish phase, so
the sky statistics, sources and photometry describe the corrected frame.

A frame-wide correction is an object with

* ``name``: the key of its measurements and parameters;
* ``takes_part(frame)``, in the worker: whether the correction may change this OTA
  (recording in its header why not); an OTA no correction takes part in is finished
  in the first round and never waits for the others;
* ``measure(frame)``, in the worker: a small picklable measurement of one OTA
  (or None where the OTA cannot be measured);
* ``combine(measurements)``, in the master: ``{ota: measurement}`` ->
  ``(parameters, primary_keywords)``;
* ``apply(frame, parameters)``, in the worker: corrects ``frame.image`` in place and
  records itself in the OTA header;
* ``files_used``: step -> file, for the ``ASSOCIATIONS`` table.

Adding one means a module with such a class and an entry where the master builds
``RunSettings.corrections`` (:mod:`podi_collectcells`). Every stage here has the form
of those in :mod:`podi_reduceota`: ``stage(frame, settings)``, recorded in ``HISTORY``.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

import podi_preview
import podi_wcs
from podi_definitions import cell_geometry, layout_for_mjd
from podi_mef import add_keywords, header_number, header_text_with_checksum, native_datasum
from podi_reduceota import reduce_ota
from podi_sky import sky_samples, sky_statistics

#: Keywords moved from the OTA extensions to the primary header, which the
#: extensions inherit (``INHERIT = T``); RADESYS stays: each extension's WCS needs it.
INHERITED_KEYWORDS = (
    "RA DEC TARGRA TARGDEC TELRAOFF TELDECOF FILTER FILTERID FILTDSCR EXPTIME OBSID OBJECT "
    "OBSTYPE WCSASTRM EXPMEAS ORIGIN INSTRUME FILENAME OBSLOGIN TIMESYS LSTHDR OBSERVAT "
    "TELESCOP OBSERVER PROPOSER PROPID PROGID TACID PROPPERD DATE-OBS TIME-OBS MJD-OBS DATE ZD "
    "AIRMASS TELFOCUS TRACK ELMAP AZMAP ROTPORT FOLDPOS OBSBLOCK ADCMODE ADCANG1 ADCANG2 ADCJD "
    "ROTSTART ROTEND ROTOFF TEMPSTAT DEWAR COOLHEAD COLPLATE FOCPLATE DEWPRESS FLTARM1A FLTARM1B "
    "FLTARM1C FLTARM2A FLTARM2B FLTARM2C FLTARM3A FLTARM3B FLTARM3C SHUTDIR SHUTOPEN SHUTCLOS "
    "CONTROLR IMAGESWV").split()

#: The raw IRAF WCS, replaced by the canned solution.
_RAW_WCS_PREFIXES = ("WAT", "CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "PV1_", "PV2_", "CUNIT",
                     "RADECSYS")


#: Blank cards kept at the end of each OTA header written before the WCS fit
#: (``-fixwcs``, :mod:`podi_framecalib`): the fit's keywords take their place, so
#: the header keeps its size in the file.
WCS_SPARE_CARDS = 72


@dataclass
class OTAResult:
    """What the master receives of a finished OTA (its pixels are in the shared buffer).

    Attributes
    ----------
    ota : int
    header : astropy.io.fits.Header
        The extension header, with checksums over the big-endian buffer.
    header_text : str
        ``header`` as FITS text, ready to be written before the data.
    inherited : dict
        Exposure keywords moved out of ``header`` for the primary: key -> (value, comment).
    sky_samples : numpy.ndarray
        :func:`podi_sky.sky_samples` boxes (BUNIT).
    files_used : dict
        Reduction step -> absolute path of the file used.
    steps : dict
        Stage -> ``'done'`` or why it was skipped.
    sources : astropy.table.Table or None
        Detections of :mod:`podi_findstars` (with ``-fixwcs``).
    pixel_scale : float or None
        arcsec/pixel at the OTA's centre (with ``-fixwcs``).
    saturated : numpy.ndarray or None
        Saturated raw pixels, for the saturation catalog (with ``-persistency``).
    quicklook : podi_preview.QuickLook or None
        Preview and cell sky levels for the QA page.
    """

    ota: int
    header: fits.Header
    header_text: str
    inherited: dict
    sky_samples: np.ndarray
    files_used: dict
    steps: dict
    sources: object = None
    pixel_scale: float = None
    saturated: np.ndarray = None
    quicklook: object = None


# --- Placement: where the OTA is --------------------------------------------------------

def detector_section(frame, settings):
    """``DETSEC`` (1-based, inclusive) and ``LTV1/2`` of the OTA in the focal plane."""
    size = cell_geometry(frame.binning).ota_size
    x0, y0 = (frame.ota // 10) * size, (frame.ota % 10) * size
    frame.header["DETSEC"] = (f"[{x0 + 1}:{x0 + size},{y0 + 1}:{y0 + size}]", "section in the focal plane")
    frame.header["LTV1"] = -x0
    frame.header["LTV2"] = -y0
    frame.record("detsec", f"DETSEC {frame.header['DETSEC']}")


def canned_wcs(frame, settings):
    """Replace the raw IRAF WCS by the canned TPV solution at the header pointing.

    The tangent point is the pointing minus the solution's stored CRVAL offsets,
    plus ``-wcsoffset`` (docs/conventions.md). ``-simplewcs`` writes plain TAN.
    Without a canned file, or where it lacks the OTA, the project's optical model
    places the OTA (plain TAN, or with its distortion, respectively).
    """
    header, wcs = frame.header, settings.wcs
    for key in [k for k in header if k.startswith(_RAW_WCS_PREFIXES)]:
        del header[key]
    ra, dec = podi_wcs.parse_pointing(frame.primary)
    canned = wcs.canned
    if frame.ota in canned:
        frame.files_used["wcs"] = str(Path(wcs.file).resolve())
        source = wcs.file
    else:
        layout = layout_for_mjd(frame.primary.get("MJD-OBS", 0.0))
        canned = {int(hdu.name[3:5]): hdu.header for hdu in podi_wcs.model_canned_wcs(layout)[1:]}
        source = "optical model of the project"
        if wcs.file:
            frame.steps["wcs"] = f"no solution in {wcs.file}"
            frame.header.add_history(f"wcs: OTA not in {wcs.file}, optical model used")
    header.update(podi_wcs.ota_wcs_header(canned[frame.ota], ra, dec, frame.binning,
                                          offset=wcs.offset, simple=wcs.simple))
    frame.record("wcs", f"{source}{' (plain TAN)' if wcs.simple else ''}")


PLACEMENT_STAGES = [detector_section, canned_wcs]


# --- Finish: what is measured on the final pixels ------------------------------------------

def sky_level(frame, settings):
    """``SKY_MEDI``, ``SKY_MEAN``, ``SKY_STD``, ``SKYNOISE``: sigma-clipped random boxes."""
    frame.sky_samples = sky_samples(frame.image, frame.binning, seed=frame.ota)
    median, mean, std = sky_statistics(frame.sky_samples)
    noise = float(np.median(frame.sky_samples["noise"])) if len(frame.sky_samples) else math.nan
    frame.header["SKY_MEDI"] = (header_number(median), "median sky level of the boxes (BUNIT)")
    frame.header["SKY_MEAN"] = (header_number(mean), "mean sky level of the boxes (BUNIT)")
    frame.header["SKY_STD"] = (header_number(std), "std of the box sky levels (BUNIT)")
    frame.header["SKYNOISE"] = (header_number(noise), "pixel noise: median over boxes of 1.4826 MAD")
    frame.header["SKYNBOX"] = (len(frame.sky_samples), "sky boxes used")
    frame.record("sky", f"{len(frame.sky_samples)} boxes, median {header_number(median)}")


def detect_sources(frame, settings):
    """Sources of the OTA (:mod:`podi_findstars`), for ``-fixwcs`` and ``-photcalib``."""
    if not settings.detect_sources:
        return
    # Loaded only here: sep, scipy and astropy.wcs would add 0.5 s to every start-up.
    # The master loads them before the workers start, so they share them.
    from astropy.wcs import WCS

    import podi_findstars
    size = frame.image.shape[0]
    frame.pixel_scale = podi_wcs.local_pixel_scale(WCS(frame.header), size / 2, size / 2)
    frame.sources = podi_findstars.find_sources(
        frame.image, frame.ota, gain=frame.header["GAIN"], read_noise=frame.header["RDNOISE"],
        saturation=frame.header["SATURATE"], binning=frame.binning, pixel_scale=frame.pixel_scale)
    frame.record("sources", f"{len(frame.sources)} sources detected")


def quick_look(frame, settings):
    """Preview and cell sky levels for the QA page (:mod:`podi_preview`), on the final
    pixels before undefined ones get ``-indefval``."""
    if not settings.makes_qa:
        return
    otas = layout_for_mjd(frame.primary.get("MJD-OBS", 0.0)).otas
    frame.quicklook = podi_preview.ota_quicklook(
        frame.image, frame.binning, podi_preview.preview_block(otas, frame.binning), frame.saturation)


def undefined_value(frame, settings):
    """Give undefined pixels the value of ``-indefval`` (they are NaN until here)."""
    value = settings.undefined_value
    if math.isnan(value):
        return
    frame.image[~np.isfinite(frame.image)] = np.float32(value)
    frame.record("indefval", f"undefined pixels set to {value:g}")


def inherited_keywords(frame, settings):
    """Move the exposure keywords to the primary header (not with ``-prep4sex``)."""
    if settings.prep4sex:
        return
    for key in INHERITED_KEYWORDS:
        if key in frame.header:
            frame.inherited[key] = (frame.header[key], frame.header.comments[key])
            frame.header.remove(key, remove_all=True)
    frame.header["INHERIT"] = (True, "inherit the primary header")
    frame.record("inherit", f"{len(frame.inherited)} exposure keywords are in the primary header")


FINISH_STAGES = [sky_level, detect_sources, quick_look, undefined_value, inherited_keywords]



# --- The phases ---------------------------------------------------------------------------

def reduce_phase(ota, filename, image, settings):
    """Calibrate the raw file of OTA ``ota`` into ``image`` and place it (WCS, detector
    section); the file must be that OTA's and of the exposure's binning."""
    frame = reduce_ota(filename, settings.reduction, out=image, expected=(ota, settings.binning))
    for stage in PLACEMENT_STAGES:
        stage(frame, settings)
    return frame


def finish_phase(frame, settings):
    """Run :data:`FINISH_STAGES`, put the image in FITS byte order, make its header text.

    With ``-fixwcs`` or ``-nonsidereal`` the header ends in :data:`WCS_SPARE_CARDS`
    blank cards, room for the keywords of the WCS fit and of the non-sidereal shift
    added after the OTA is in the output file: they take
    the place of blank cards, so the header keeps its length and is rewritten in place.
    """
    for stage in FINISH_STAGES:
        stage(frame, settings)
    # FITS has no NaN in headers: a measurement that came out undefined says so here,
    # by name, instead of failing in astropy.
    undefined = [key for key, value in frame.header.items()
                 if isinstance(value, float) and not math.isfinite(value)]
    if undefined:
        raise ValueError(f"OTA {frame.ota:02d}: {', '.join(undefined[:5])} came out undefined "
                         "(NaN or infinite); the data are unusable")
    image = frame.image
    datasum = native_datasum(image)
    if sys.byteorder == "little":
        image.byteswap(inplace=True)
        image = image.view(image.dtype.newbyteorder(">"))
    if isinstance(frame.image, np.memmap):
        frame.image.flush()
    hdu = fits.ImageHDU(data=image, header=frame.header)
    for _ in range(WCS_SPARE_CARDS if settings.header_rewritten else 0):
        hdu.header.add_blank()
    hdu.header["CHECKSUM"] = ("0" * 16, "HDU checksum")
    hdu.header["DATASUM"] = (str(datasum), "data unit checksum")
    text = header_text_with_checksum(hdu.header)
    return OTAResult(ota=frame.ota, header=hdu.header, header_text=text,
                     inherited=frame.inherited, sky_samples=frame.sky_samples,
                     files_used=frame.files_used, steps=frame.steps, sources=frame.sources,
                     pixel_scale=frame.pixel_scale, saturated=frame.saturated,
                     quicklook=frame.quicklook)


def measure_phase(frame, settings, taking):
    """The measurements of this OTA by the corrections named in ``taking``: name ->
    measurement (None for the others)."""
    return {correction.name: correction.measure(frame) if correction.name in taking else None
            for correction in settings.corrections}


def combine_measurements(measurements, settings):
    """In the master: the frame-wide parameters from every OTA's measurements.

    Parameters
    ----------
    measurements : dict
        OTA -> :func:`measure_phase` result.

    Returns
    -------
    (dict, dict)
        Correction name -> parameters, and the primary-header keywords.
    """
    parameters, keywords = {}, {}
    for correction in settings.corrections:
        parameters[correction.name], found = correction.combine(
            {ota: measured[correction.name] for ota, measured in measurements.items()})
        add_keywords(keywords, found)
    return parameters, keywords


def apply_phase(frame, settings, parameters):
    """Apply every frame-wide correction with its frame-wide parameters."""
    for correction in settings.corrections:
        correction.apply(frame, parameters[correction.name])


# --- Jobs for podi_workers.WorkerPool: function(ota, image, settings, *args) ------------

def collect_reduce_ota(ota, image, settings, filename):
    """Reduce and finish one OTA in one go (no frame-wide correction asked for)."""
    return finish_phase(reduce_phase(ota, filename, image, settings), settings)


def reduce_and_measure(ota, image, settings, filename):
    """First round with frame-wide corrections: reduce, then measure.

    Returns
    -------
    (podi_reduceota.OTAFrame, dict) or OTAResult
        The OTA's state without its pixels (they stay in ``image``), and its
        measurements; or, when no correction takes part in the OTA, the finished OTA.
    """
    frame = reduce_phase(ota, filename, image, settings)
    # Every correction decides (and records) whether it takes part.
    taking = [correction.name for correction in settings.corrections if correction.takes_part(frame)]
    if not taking:
        return finish_phase(frame, settings)
    measured = measure_phase(frame, settings, taking)
    frame.image = None
    return frame, measured


def apply_and_finish(ota, image, settings, frame, parameters):
    """Second round: apply the frame-wide corrections, then finish."""
    frame.image = image
    apply_phase(frame, settings, parameters)
    return finish_phase(frame, settings)

