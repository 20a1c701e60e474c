"""Typed settings of one ``podi_collectcells`` run, built once from the options.

The command line (:mod:`podi_commandline`) gives a dictionary of options; the master
turns it, with the resolved calibration files (:mod:`podi_calibfiles`), into one
:class:`RunSettings`. Every deeper module receives these typed settings, never the
options dictionary, so what a step may depend on is written down here.
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import podi_wcs
from podi_reduceota import ReductionSettings


@dataclass(frozen=True)
class WcsSettings:
    """The WCS written into every OTA header before any fit.

    Attributes
    ----------
    file : str or None
        Canned distortion solution (None: the project's optical model as plain TAN).
    canned : dict
        OTA -> header of the canned solution, read once by the master.
    simple : bool
        Plain TAN without distortion terms (``-simplewcs``, or no canned file).
    offset : tuple of float
        ``-wcsoffset`` (dRA, dDec) in degrees, added to the tangent point.
    """

    file: str = None
    canned: dict = field(default_factory=dict)
    simple: bool = False
    offset: tuple = (0.0, 0.0)


@dataclass(frozen=True)
class QASettings:
    """The QA page and plots after a calibrated frame is written (:mod:`podi_qapage`).

    ``otalevel`` is ``"panels"`` (one figure of all OTAs per plot kind), ``"files"``
    (``-otalevelplots``: one file per OTA and kind) or ``"none"`` (``-nootalevelplots``).
    """

    create: bool = True
    formats: tuple = ("png",)
    otalevel: str = "panels"
    subdirs: bool = False
    subdirname: str = "QA"


@dataclass(frozen=True)
class RunSettings:
    """Everything the per-OTA phases and the frame-wide steps need to know.

    Attributes
    ----------
    reduction : podi_reduceota.ReductionSettings
        The calibration stages of each OTA.
    wcs : WcsSettings
    corrections : tuple
        Frame-wide corrections asked for (objects with ``measure``, ``combine`` and
        ``apply``; see :mod:`podi_otaphases`), in the order they are applied.
    detect_sources : bool
        Source detection in the workers (``-fixwcs``).
    photcalib, fit_radial_zp, colour_terms : bool
        ``-photcalib``, ``-fitradialZP``, ``-colourterms``.
    refcat_name : str
        Name of the reference catalog for ``ASTRMCAT`` and ``PHOTMCAT``.
    undefined_value : float
        Value of undefined pixels in the output (NaN, or ``-indefval``).
    prep4sex : bool
        Every extension keeps its full header (no keywords inherited from the primary).
    ncpus : int
        Worker processes.
    serial : bool
        Run the OTAs in the master process (``-profile``, ``-ncpus=1``).
    timeout : float or None
        Seconds the frame may take.
    qa : QASettings
    binning : int
        Binning of the exposure (of most of its OTA files).
    nonsidereal : podi_nonsidereal.SkyMotion or None
        ``-nonsidereal``: the WCS follows a moving target.
    """

    reduction: ReductionSettings
    wcs: WcsSettings = WcsSettings()
    corrections: tuple = ()
    detect_sources: bool = False
    photcalib: bool = False
    fit_radial_zp: bool = False
    colour_terms: bool = False
    refcat_name: str = "unknown"
    undefined_value: float = math.nan
    prep4sex: bool = False
    ncpus: int = 1
    serial: bool = False
    timeout: float = None
    qa: QASettings = QASettings()
    binning: int = 1
    nonsidereal: object = None

    @property
    def header_rewritten(self):
        """Whether OTA headers are rewritten after the frame-wide calibrations, in the
        place of spare blank cards (:data:`podi_otaphases.WCS_SPARE_CARDS`)."""
        return self.detect_sources or self.nonsidereal is not None

    @property
    def makes_qa(self):
        """Whether the QA page and plots follow the written frame (with source detection,
        as the original's plots, unless ``-noqaplots``)."""
        return self.detect_sources and self.qa.create


def reduction_settings(calibrations, options):
    """The per-OTA calibration stages from the resolved calibration files."""
    return ReductionSettings(crosstalk=calibrations.get("crosstalk"),
                             overscan_method=options.get("overscan", "clippedmean"),
                             nonlinearity=calibrations.get("nonlinearity"),
                             gain=options.get("gain", False),
                             bias=calibrations.get("bias"), dark=calibrations.get("dark"),
                             flat=calibrations.get("flat"), bpm=calibrations.get("bpm"),
                             persistency=options.get("persistency"),
                             persistency_model=bool(options.get("persistency_model")))


def run_settings(options, calibrations, corrections=(), binning=1):
    """:class:`RunSettings` from the command-line options and resolved calibrations.

    Parameters
    ----------
    options : dict
        :func:`podi_commandline.parse_commandline` result.
    calibrations : dict
        :func:`podi_calibfiles.resolve_calibrations` result (step -> path or None).
    corrections : sequence
        The frame-wide correction objects, already set up for this exposure.
    binning : int
        The exposure's binning.
    """
    wcs_file = calibrations.get("wcs")
    ncpus = max(1, int(options.get("ncpus") or os.cpu_count() or 1))
    refcat = str(options.get("refcat") or os.environ.get("PODI_REFCAT", ""))
    return RunSettings(
        reduction=reduction_settings(calibrations, options),
        wcs=WcsSettings(file=wcs_file, canned=podi_wcs.read_canned_wcs(wcs_file) if wcs_file else {},
                        simple=bool(options.get("simplewcs")) or not wcs_file,
                        offset=tuple(options.get("wcsoffset") or (0.0, 0.0))),
        corrections=tuple(corrections),
        detect_sources=bool(options.get("fixwcs")),
        photcalib=bool(options.get("photcalib")),
        fit_radial_zp=bool(options.get("fitradialZP")),
        colour_terms=bool(options.get("colourterms")),
        refcat_name=Path(refcat).name or "unknown",
        undefined_value=float(options.get("indefval", math.nan)),
        prep4sex=bool(options.get("prep4sex")),
        ncpus=ncpus,
        serial=bool(options.get("profile")) or ncpus == 1,
        binning=binning,
        timeout=options.get("timeout") or None,
        nonsidereal=options.get("nonsidereal"),
        qa=QASettings(create=bool(options.get("create_qaplots", True)),
                      formats=tuple(options.get("plotformat") or ("png",)),
                      otalevel=options.get("otalevelplots", "panels"),
                      subdirs=bool(options.get("qasubdirs")),
                      subdirname=options.get("qasubdirname") or "QA"))
