"""podi_collectcells: reduce one ODI exposure into one multi-extension FITS file.

Usage::

    podi_collectcells input output.fits [-cals=DIR] [flags ...]

``input`` is an exposure directory or any one OTA file of it (``podi_commandline``
lists every flag). The master process resolves the calibrations and builds the
run's typed settings (:mod:`podi_settings`), then runs the per-OTA phases of
:mod:`podi_otaphases` in worker processes (:mod:`podi_workers`, at most ``-ncpus``
at a time). Each worker reduces its OTA into a block of shared memory that the
master streams into the output file as soon as the OTA is finished, so pixel data
never travel through pickles. With frame-wide corrections (``-pupilghost``,
``-fringe``) the OTAs they take part in run in two rounds: reduce and measure, then
(after the master combined the measurements) apply and finish. An OTA that fails is logged, recorded in the
output's primary header and left out; the others still make a valid file. The
output is written under a temporary name and renamed: a crash, a kill or
``-timeout`` never leave a partial file.

Exit status: 0 when the output was written (or skipped by ``-noclobber``), 1 on
any error (nothing written).
"""

# Before numpy: one BLAS thread per worker process.
import podi_blasthreads  # noqa: F401, I001

import cProfile
import logging
import os
import pstats
import resource
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from astropy.io import fits

import podi_fringe
import podi_nonsidereal
import podi_otaphases
import podi_persistency
import podi_pupilghost
import podi_qapage
from podi_calibfiles import CalibrationNotFound, resolve_calibrations
from podi_commandline import (HelpRequested, OptionError, expand_output_name,
                              parse_commandline, usage)
from podi_definitions import PIPELINE_NAME, PIPELINE_VERSION, cell_geometry, layout_for_mjd
from podi_mef import (CalibrationError, StreamedMEF, add_keywords, check_calibration_binning,
                      header_number)
from podi_rawdata import RawDataError, find_exposure, read_exposure_header
from podi_reduceota import load_calibrations
from podi_settings import run_settings
from podi_sky import global_sky
from podi_workers import JobsTimedOut, SharedBuffers, WorkerPool, kill_point, time_limit

logger = logging.getLogger("podi_collectcells")


class ReductionError(Exception):
    """The frame cannot be reduced; the message is one line."""


# --- The output file --------------------------------------------------------------------

def select_otas(exposure, layout, options):
    """OTAs to reduce: files present, narrowed by -centralonly, -singleota, -skipota."""
    otas = [ota for ota in layout.output_order if ota in exposure.ota_files]
    extra = sorted(set(exposure.ota_files) - set(layout.otas))
    if extra:
        logger.warning("files of OTAs %s are not part of the %s focal plane: ignored", extra, layout.name)
    if options.get("centralonly"):
        otas = [ota for ota in otas if ota in layout.central_3x3]
    if options.get("singleota") is not None:
        otas = [ota for ota in otas if ota == options["singleota"]]
    skip = set(options.get("skipota") or ())
    return [ota for ota in otas if ota not in skip]


def _versions():
    versions = {"podi-quickreduce": PIPELINE_VERSION}
    for package in ("numpy", "astropy", "sep", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def primary_header(first_header, results, failures, settings, argv):
    """Primary header: inherited exposure keywords, pipeline and summary keywords.

    ``results`` are the :class:`podi_otaphases.OTAResult` of the reduced OTAs.
    """
    primary = fits.Header()
    if not settings.prep4sex:
        # The first OTA in the output order gives the exposure keywords (FILENAME
        # differs between OTAs), whatever order the OTAs finished in.
        order = layout_for_mjd(first_header.get("MJD-OBS", 0.0)).output_order
        for ota in sorted(results, key=order.index):
            for key, card in results[ota].inherited.items():
                if key not in primary:
                    primary[key] = card
    else:
        for key in ("OBSID", "OBJECT", "FILTER", "EXPTIME", "MJD-OBS", "RA", "DEC"):
            if key in first_header:
                primary[key] = first_header[key]
    primary["PIPELINE"] = (PIPELINE_NAME, "pipeline that made this file")
    primary["PLVERSIO"] = (PIPELINE_VERSION, "pipeline version")
    primary["PLVER"] = f"{PIPELINE_NAME} {PIPELINE_VERSION}"
    headers = [result.header for result in results.values()]
    binning = headers[0].get("CCDBIN1", 1)
    primary["BINNING"] = (binning, "binning factor")
    primary["BUNIT"] = (headers[0]["BUNIT"], "unit of the pixel values")
    cells = np.array([h.get("NCELLS", 1) for h in headers], float)
    primary["GAIN"] = (float(np.sum([h["GAIN"] for h in headers] * cells) / cells.sum()),
                       "mean effective gain (e-/BUNIT)")
    primary["RDNOISE"] = (float(np.median([h["RDNOISE"] for h in headers])), "read noise (BUNIT)")
    primary["SATURATE"] = (float(min(h["SATURATE"] for h in headers)), "lowest saturation level (BUNIT)")
    sky, noise = global_sky(results, first_header)
    primary["SKYLEVEL"] = (header_number(sky), "median sky level (BUNIT)")
    primary["SKYBG"] = (header_number(sky), "same as SKYLEVEL")
    primary["SKYNOISE"] = (header_number(noise), "pixel noise of the sky (BUNIT)")
    mjd = float(first_header.get("MJD-OBS", 0.0))
    primary["MJD-MID"] = (mjd + float(first_header.get("EXPTIME", 0.0)) / 2 / 86400,
                          "MJD at the middle of the exposure")
    primary["NOTAS"] = (len(results), "OTAs reduced")
    primary["NFAILED"] = (len(failures), "OTAs that failed and are missing")
    if failures:
        primary["FAILOTAS"] = (",".join(f"{ota:02d}" for ota in sorted(failures)), "failed OTAs")
    primary.add_history("command: " + " ".join(argv)[:1000])
    primary.add_history("versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
    for ota, message in sorted(failures.items()):
        primary.add_history(f"OTA {ota:02d} failed: {message}")
    return primary



def association_table(results, corrections=()):
    """``ASSOCIATIONS``: every input and calibration file by reduction step."""
    rows = []
    used = [result.files_used for result in results.values()]
    used += [correction.files_used for correction in corrections]
    for files_used in used:
        for step, path in files_used.items():
            if (step, path) not in rows:
                rows.append((step, path))
    steps, paths = zip(*rows) if rows else ((), ())
    return fits.BinTableHDU.from_columns(
        [fits.Column("correction", "25A", array=list(steps)),
         fits.Column("filename_full", "375A", array=list(paths)),
         fits.Column("filename", "100A", array=[Path(path).name[:100] for path in paths])],
        name="ASSOCIATIONS")


class OrderedSink:
    """Appends finished OTAs to the output file in the inside-out order, as they come.

    Writing overlaps with the reduction of the other OTAs; each shared buffer is
    freed once its OTA is in the file. ``offsets`` keeps where each OTA's header
    went, so that frame-wide steps (``-fixwcs``) can rewrite it in place.
    """

    def __init__(self, stream, order, buffers):
        self.stream, self.buffers = stream, buffers
        self.pending, self.ready, self.offsets = list(order), {}, {}

    def __call__(self, ota, result):
        """Take an OTA's :class:`podi_otaphases.OTAResult`, or None if it failed."""
        self.ready[ota] = result
        while self.pending and self.pending[0] in self.ready:
            ota = self.pending.pop(0)
            result = self.ready.pop(ota)
            if result is not None:
                self.offsets[ota] = self.stream.add_image(result.header_text, self.buffers.paths[ota],
                                                          self.buffers.nbytes)
                kill_point("first-ota" if len(self.offsets) == 1 else "later-ota")
            self.buffers.release(ota)


def reduce_otas(jobs, settings, pool, sink):
    """Run the per-OTA phases of every OTA (:mod:`podi_otaphases`) on the pool.

    Parameters
    ----------
    jobs : dict
        OTA -> raw file.
    sink : callable
        ``sink(ota, result)`` as each OTA is finished (None when it failed).

    Returns
    -------
    (dict, dict, dict)
        OTA -> :class:`podi_otaphases.OTAResult`, OTA -> error message, and the
        primary keywords of the frame-wide corrections.
    """
    files = {ota: (filename,) for ota, filename in jobs.items()}
    if not settings.corrections:
        results, failures = pool.run(podi_otaphases.collect_reduce_ota, files, sink, verb="reduced")
        return results, failures, {}
    def first_round(ota, result):
        # Failed and finished OTAs (no correction takes part) go to the stream at
        # once; the others wait for round two.
        if result is None or isinstance(result, podi_otaphases.OTAResult):
            sink(ota, result)

    first, failures = pool.run(podi_otaphases.reduce_and_measure, files, first_round,
                               verb="reduced and measured")
    finished = {ota: r for ota, r in first.items() if isinstance(r, podi_otaphases.OTAResult)}
    measured = {ota: r for ota, r in first.items() if ota not in finished}
    parameters, keywords = podi_otaphases.combine_measurements(
        {ota: measurements for ota, (_, measurements) in measured.items()}, settings)
    results, more = pool.run(podi_otaphases.apply_and_finish,
                             {ota: (frame, parameters) for ota, (frame, _) in measured.items()},
                             sink, verb="corrected")
    return {**finished, **results}, {**failures, **more}, keywords


# --- The run's summary and QA plots ----------------------------------------------------

def summary_line(base, primary, output, seconds):
    """The one line printed per frame: OTAs, seeing, zero point, sky, depth, WCS, time."""
    parts = [f"{primary['NOTAS']} OTAs reduced, {primary['NFAILED']} failed"]
    if primary.get("SEEING", -1) > 0:
        parts.append(f"seeing {primary['SEEING']:.2f}\"")
    if primary.get("PHOTCAL"):
        parts.append(f"ZP {primary['PHOTZP']:.4f}+-{primary['PHOTZPER']:.4f}")
    elif "PHOTCAL" in primary:
        parts.append("no ZP")
    if "SKYMAG" in primary:
        parts.append(f"sky {primary['SKYMAG']:.2f} mag/arcsec2")
    else:
        parts.append(f"sky {primary['SKYLEVEL']:.1f} {primary['BUNIT']}")
    if "PHOTDPTH" in primary:
        parts.append(f"depth {primary['PHOTDPTH']:.2f} (5 sigma)")
    if primary.get("WCSCAL"):
        parts.append(f"WCS rms {primary['WCS_RMS']:.3f}\"")
    elif "WCSCAL" in primary:
        parts.append("WCS not calibrated")
    return f"{base}: {', '.join(parts)}, {seconds:.1f} s -> {output}"


def cpu_seconds():
    """CPU-seconds (user + system) of this process and of its children that ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def quick_look(qa_data, primary, output, settings, report):
    """Write the QA plots (:mod:`podi_plots`) and the frame's QA page (:mod:`podi_qapage`).

    A problem here never fails the frame: it is on disk already. ``qa_data()`` returns
    what the plots show (:func:`podi_framecalib.qa_data`), ``primary`` is the primary
    header as written, ``report`` the run's :class:`podi_qapage.RunReport` so far.
    """
    start, cpu = time.monotonic(), cpu_seconds()
    qa = settings.qa
    plots = []
    try:
        import podi_plots  # loaded only for plots: see podi_framecalib.qa_data
        plots = podi_plots.make_plots(
            qa_data(), output, formats=list(qa.formats),
            otalevel=qa.otalevel, qasubdirs=qa.subdirs, qasubdirname=qa.subdirname,
            fitradial=settings.fit_radial_zp, ncpus=settings.ncpus)
    except Exception as error:  # noqa: BLE001 - the reduced frame is already safe on disk
        logger.warning("QA plots failed: %s", " ".join(str(error).split()))
    report.qa_seconds = time.monotonic() - start
    page = podi_qapage.frame_page_path(output, qa.subdirs, qa.subdirname)
    try:
        podi_qapage.write_frame_page(page, primary, report, plots, output)
    except OSError as error:
        logger.warning("QA page not written: %s", " ".join(str(error).split()))
        return
    logger.info("QA page %s: %d plot files, %.1f s, %.1f CPU-s", page,
                sum(len(files.paths) for files in plots), time.monotonic() - start, cpu_seconds() - cpu)


# --- The whole frame ----------------------------------------------------------------------

def exposure_header(exposure):
    """Primary header and binning of the exposure: the binning of most of its readable
    OTA files, the header of the first of them. A file of another binning, or one
    that cannot be read, fails its own OTA later, never the frame."""
    readable, problems = {}, []
    for ota in sorted(exposure.ota_files):
        try:
            readable[ota] = read_exposure_header(exposure.ota_files[ota])
        except RawDataError as error:
            problems.append(error)
    if not readable:
        raise ReductionError(f"{exposure.base}: no readable OTA file (first problem: {problems[0]})")
    binnings = [binning for _, binning in readable.values()]
    binning = max(sorted(set(binnings)), key=binnings.count)
    return next(header for header, found in readable.values() if found == binning), binning


def collectcells(options, argv=()):
    """Reduce the exposure ``options['input']`` into ``options['output']``.

    Every warning of the run is kept for the frame's QA page.

    Returns
    -------
    Path or None
        The output file, or None when ``-noclobber`` skipped an existing one or
        ``-update_persistency_only`` wrote only the saturation catalog.

    Raises
    ------
    ReductionError, RawDataError, CalibrationNotFound, CalibrationError, OptionError
        Each with a one-line message; nothing is written.
    """
    with podi_qapage.WarningCollector() as warnings:
        return reduce_exposure(options, argv, warnings)


def reduce_exposure(options, argv, warnings):
    """:func:`collectcells` with the run's warnings collected into ``warnings.lines``."""
    start = time.monotonic()
    exposure = find_exposure(options["input"])
    kill_point("start")
    if options.get("persistency"):
        podi_persistency.catalog_folder(options["persistency"])
    if options.get("update_persistency_only"):
        catalog = podi_persistency.catalog_of_exposure(exposure, options["persistency"])
        print(f"{exposure.base}: saturation catalog {catalog}, {time.monotonic() - start:.1f} s")
        return None
    first_header, binning = exposure_header(exposure)
    output = expand_output_name(options["output"], first_header)
    if options.get("noclobber") and output.exists():
        print(f"{output}: exists, skipped (-noclobber)")
        return None
    layout = layout_for_mjd(first_header.get("MJD-OBS", 0.0))
    otas = select_otas(exposure, layout, options)
    if not otas:
        raise ReductionError(f"{exposure.directory}: no OTA left to reduce")
    missing = [ota for ota in layout.otas if ota not in exposure.ota_files]
    if missing:
        logger.warning("%s: no files for OTAs %s", exposure.base, ", ".join(f"{o:02d}" for o in missing))
    calibrations = resolve_calibrations(options, first_header, binning)
    size = cell_geometry(binning).ota_size
    for step in ("bias", "dark", "flat"):
        if calibrations.get(step):
            check_calibration_binning(calibrations[step], size)
    corrections = frame_corrections(calibrations, first_header, binning)
    settings = run_settings(options, calibrations, corrections, binning)
    load_calibrations(settings.reduction)
    kill_point("calibrations")
    # A missing or unreadable catalog stops the frame before any work: a night loop
    # must not write frames that silently lack their calibration.
    refcat = None
    if settings.detect_sources:
        # Loaded only when needed (sep, scipy and astropy.table cost 0.6 s of every
        # start-up), and before the workers start, so that they share them.
        import podi_framecalib
        import podi_ipprefcat
        refcat = podi_ipprefcat.open_refcat(options.get("refcat"))
    if not options.get("bgmode"):
        logger.info("%s %s: reducing %s (%d OTAs, binning %d)", PIPELINE_NAME, PIPELINE_VERSION,
                    exposure.base, len(otas), binning)
    output.parent.mkdir(parents=True, exist_ok=True)
    stream = StreamedMEF(output)
    try:
        buffers = SharedBuffers(otas, (size, size))
    except OSError as error:
        stream.abort()
        raise ReductionError(error.strerror or str(error)) from None
    except BaseException:
        stream.abort()
        raise
    kill_point("buffers")
    deadline = start + settings.timeout if settings.timeout else None
    try:
        with time_limit(deadline - time.monotonic() if deadline else None):
            primary, results, failures, tables, keywords = write_frame(
                exposure, otas, first_header, binning, settings, refcat, options, argv, stream, buffers,
                deadline)
    except JobsTimedOut as error:
        stream.abort()
        raise ReductionError(f"timed out after {settings.timeout:g} s ({error}); no output written") \
            from None
    except BaseException:
        stream.abort()
        raise
    finally:
        buffers.remove()
    if settings.reduction.persistency:
        # Written once the frame is safe (and outside its time limit): the next
        # exposures mask its persistence.
        podi_persistency.write_catalog(settings.reduction.persistency, exposure.base, first_header,
                                       binning, {ota: r.saturated for ota, r in results.items()})
    seconds = time.monotonic() - start
    if settings.makes_qa:
        quick_look(lambda: podi_framecalib.qa_data(results, failures, tables, keywords, first_header, binning),
                   primary, output, settings, podi_qapage.RunReport(failures, warnings.lines, seconds))
    kill_point("qa")
    print(summary_line(exposure.base, primary, output, time.monotonic() - start))
    return output


def write_frame(exposure, otas, first_header, binning, settings, refcat, options, argv, stream, buffers,
                deadline):
    """Reduce the OTAs into ``stream``, run the frame-wide steps, write the tables and
    the primary header, and give the file its name.

    Returns
    -------
    (astropy.io.fits.Header, dict, dict, list, dict)
        The primary header written, the OTAs' results and failures, the tables and the
        frame-wide keywords.
    """
    output = stream.filename
    size = cell_geometry(binning).ota_size
    sink = OrderedSink(stream, otas, buffers)
    with WorkerPool(buffers, settings.ncpus, context=settings, deadline=deadline,
                    serial=settings.serial) as pool:
        jobs = {ota: exposure.ota_files[ota] for ota in otas}
        if options.get("profile"):
            profiler = cProfile.Profile()
            results, failures, keywords = profiler.runcall(reduce_otas, jobs, settings, pool, sink)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        else:
            results, failures, keywords = reduce_otas(jobs, settings, pool, sink)
    kill_point("reduced")
    if not results:
        ota, why = min(failures.items())
        raise ReductionError(f"{exposure.base}: every OTA failed (OTA {ota:02d}: {why}); no output written")
    tables = []
    if settings.detect_sources:
        import podi_framecalib  # loaded by reduce_exposure already, with sep and scipy
        found, tables = podi_framecalib.frame_calibrations(results, refcat, first_header, settings,
                                                           size)
        add_keywords(keywords, found)
    kill_point("calibrated")
    if settings.nonsidereal is not None:
        add_keywords(keywords, podi_nonsidereal.follow_target(
            results, settings.nonsidereal, float(first_header.get("MJD-OBS", 0.0))))
    if settings.header_rewritten:
        for ota, offset in sink.offsets.items():
            stream.patch_header(offset, results[ota].header_text)
    for table in tables + [association_table(results, settings.corrections)]:
        stream.add_table(table)
    kill_point("tables")
    primary = primary_header(first_header, results, failures, settings, argv)
    add_keywords(primary, keywords)
    if settings.makes_qa:
        page = podi_qapage.frame_page_path(output, settings.qa.subdirs, settings.qa.subdirname)
        primary["QAPAGE"] = (os.path.relpath(page, output.parent), "QA page of this frame")
    for key, value in (options.get("addfitskey") or {}).items():
        if key in primary:
            logger.warning("-addfitskey=%s replaces the pipeline's %s", key, key)
        primary[key] = (value, "user-added keyword")
    kill_point("primary")
    stream.finish(primary)
    kill_point("renamed")
    return primary, results, failures, tables, keywords


def frame_corrections(calibrations, first_header, binning):
    """The frame-wide corrections asked for, in the order they are applied."""
    corrections = []
    if calibrations.get("pupilghost"):
        corrections.append(podi_pupilghost.PupilGhostCorrection(
            calibrations["pupilghost"], podi_pupilghost.rotator_angle(first_header)))
    if calibrations.get("fringe"):
        corrections.append(podi_fringe.FringeCorrection(
            calibrations["fringe"], calibrations["fringevectors"],
            str(first_header.get("FILTER", "unknown")).strip(), binning))
    return corrections


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse_commandline(argv)
    except HelpRequested:
        print(usage())
        return 0
    except OptionError as error:
        print(f"podi_collectcells: error: {error}", file=sys.stderr)
        return 1
    # A terminated run unwinds (removing shared buffers and temporary files).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.DEBUG if options.get("verbose") else logging.INFO,
                        format="%(levelname)s: %(message)s" if options.get("verbose") else "%(message)s")
    try:
        collectcells(options, ["podi_collectcells"] + argv)
    except (ReductionError, RawDataError, CalibrationNotFound, CalibrationError, OptionError,
            OSError, ValueError) as error:
        print(f"podi_collectcells: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
