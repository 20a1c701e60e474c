"""podi_collectcells: reduce one ODI exposure into one multi-extension FITS file.

Usage::

    podi_collectcells input output.fits [-cals=DIR] [flags ...]

``input`` is an exposure directory or any one OTA file of it (``podi_commandline``
lists every flag). The master process resolves the calibrations, then runs one
worker process per OTA (at most ``-ncpus`` at a time) through
:func:`collect_reduce_ota`. Each worker assembles its OTA directly into a block of
shared memory that the master writes out, so pixel data never travel through
pickles. An OTA that fails is logged, recorded in the output's primary header and
left out; the others still make a valid file. The output is written under a
temporary name and renamed: a crash, a kill or ``-timeout`` never leave a partial
file.

Exit status: 0 when the output was written (or skipped by ``-noclobber``), 1 on
any error (nothing written).

Test hook: the environment variable ``PODI_FAULT=<kind>:<ota>`` makes the worker of
that OTA ``crash`` (exit without a result), ``hang`` or ``raise`` an exception, so
that failure handling is tested by injected faults.
"""

import cProfile
import logging
import math
import multiprocessing
import os
import pstats
import queue
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

import podi_findstars
import podi_framecalib
import podi_ipprefcat
import podi_wcs
from podi_calibfiles import CalibrationNotFound, resolve_calibrations
from podi_commandline import HelpRequested, OptionError, expand_output_name, parse_commandline, usage
from podi_definitions import PIPELINE_NAME, PIPELINE_VERSION, cell_geometry, layout_for_mjd
from podi_mef import CalibrationError, StreamedMEF, check_calibration_binning
from podi_rawdata import RawDataError, find_exposure, open_raw_ota
from podi_reduceota import ReductionSettings, reduce_ota
from podi_sky import global_sky, sky_samples, sky_statistics

logger = logging.getLogger("podi_collectcells")

#: Keywords moved from the OTA extensions to the primary header (facts 1.7), but
#: for RADESYS: the WCS of every extension needs its own.
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


class ReductionError(Exception):
    """The frame cannot be reduced; the message is one line."""


# --- One OTA, in a worker process -----------------------------------------------------

def reduction_settings(options):
    """The per-OTA reduction steps from the options and resolved calibrations."""
    calibrations = options["calibrations"]
    return ReductionSettings(crosstalk=calibrations.get("crosstalk"),
                             overscan_method=options.get("overscan", "clippedmean"),
                             nonlinearity=calibrations.get("nonlinearity"),
                             gain=options.get("gain", False),
                             bias=calibrations.get("bias"), dark=calibrations.get("dark"),
                             flat=calibrations.get("flat"), bpm=calibrations.get("bpm"))


def apply_wcs(header, frame, options):
    """Replace the raw IRAF WCS of an OTA header by the canned TPV solution.

    The tangent point follows DECISIONS 1 from the header pointing plus
    ``-wcsoffset``; ``-simplewcs`` writes plain TAN. Without a canned file
    (``-wcs=none``), or where it lacks the OTA, the project's optical model places
    the OTA, as plain TAN or with its distortion respectively.
    """
    for key in [k for k in header if k.startswith(_RAW_WCS_PREFIXES)]:
        del header[key]
    ra, dec = podi_wcs.parse_pointing(frame.primary)
    wcs_file = options["calibrations"].get("wcs")
    canned = options.get("canned_wcs")
    if canned is None:
        canned = podi_wcs.read_canned_wcs(wcs_file) if wcs_file else {}
    simple = options.get("simplewcs", False) or not wcs_file
    if frame.ota in canned:
        frame.files_used["wcs"] = str(Path(wcs_file).resolve())
        source = wcs_file
    else:
        layout = layout_for_mjd(frame.primary.get("MJD-OBS", 0.0))
        canned = {ota: hdu.header for ota, hdu in _model_extensions(layout).items()}
        source = "optical model of the project"
        if wcs_file:
            logger.warning("OTA %02d: no solution in %s, using the optical model", frame.ota, wcs_file)
    wcs = podi_wcs.ota_wcs_header(canned[frame.ota], ra, dec, frame.binning,
                                  offset=tuple(options.get("wcsoffset", (0.0, 0.0))), simple=simple)
    header.update(wcs)
    header.add_history(f"wcs: {source}{' (plain TAN)' if simple else ''}")


def _model_extensions(layout):
    hdulist = podi_wcs.model_canned_wcs(layout)
    return {int(hdu.name[3:5]): hdu for hdu in hdulist[1:]}


def detector_section(header, ota, binning):
    """``DETSEC`` (1-based, inclusive; the original's lacked the +1) and ``LTV``."""
    size = cell_geometry(binning).ota_size
    x0, y0 = (ota // 10) * size, (ota % 10) * size
    header["DETSEC"] = (f"[{x0 + 1}:{x0 + size},{y0 + 1}:{y0 + size}]", "section in the focal plane")
    header["LTV1"] = -x0
    header["LTV2"] = -y0


def collect_reduce_ota(filename, options, out=None):
    """Reduce one OTA file completely.

    Parameters
    ----------
    filename : str or Path
        Raw OTA file.
    options : dict
        Options of :func:`podi_commandline.parse_commandline` plus ``calibrations``
        (resolved by :func:`podi_calibfiles.resolve_calibrations`).
    out : numpy.ndarray, optional
        float32 array of the OTA's size that receives the image.

    Returns
    -------
    dict
        ``data_products``: ``ota``, ``header`` (the extension header), ``inherited``
        (exposure keywords moved out of it, for the primary), ``image`` (``out`` if
        given), ``sky_samples``, ``sky`` (median, mean, std), ``files_used`` (step ->
        path), ``steps`` (step -> status), ``sources`` (the detections of
        :mod:`podi_findstars` with ``-fixwcs``, else None) and ``pixel_scale``
        (arcsec/pixel at the OTA's centre, with ``-fixwcs``).
    """
    frame = reduce_ota(filename, reduction_settings(options), out=out)
    header = frame.header
    detector_section(header, frame.ota, frame.binning)
    apply_wcs(header, frame, options)
    samples = sky_samples(frame.image, frame.binning, seed=frame.ota)
    median, mean, std = sky_statistics(samples)
    noise = float(np.median(samples["noise"])) if len(samples) else math.nan
    header["SKY_MEDI"] = (_finite(median), "median sky level of the boxes (BUNIT)")
    header["SKY_MEAN"] = (_finite(mean), "mean sky level of the boxes (BUNIT)")
    header["SKY_STD"] = (_finite(std), "std of the box sky levels (BUNIT)")
    header["SKYNOISE"] = (_finite(noise), "pixel noise: median over boxes of 1.4826 MAD")
    header["SKYNBOX"] = (len(samples), "sky boxes used")
    sources, scale = None, None
    if options.get("fixwcs"):
        size = frame.image.shape[0]
        scale = podi_wcs.local_pixel_scale(WCS(header), size / 2, size / 2)
        sources = podi_findstars.find_sources(frame.image, frame.ota, gain=header["GAIN"],
                                              read_noise=header["RDNOISE"],
                                              saturation=header["SATURATE"], binning=frame.binning,
                                              pixel_scale=scale)
    undefined = options.get("indefval", math.nan)
    if not math.isnan(undefined):
        frame.image[~np.isfinite(frame.image)] = np.float32(undefined)
    inherited = {} if options.get("prep4sex") else move_inherited_keywords(header)
    return {"ota": frame.ota, "header": header, "inherited": inherited, "image": frame.image,
            "sky_samples": samples, "sky": (median, mean, std), "files_used": frame.files_used,
            "steps": frame.steps, "sources": sources, "pixel_scale": scale}


def move_inherited_keywords(header):
    """Remove the exposure-level keywords from an OTA header; return them for the primary.

    Returns
    -------
    dict
        Keyword -> (value, comment), in the order of :data:`INHERITED_KEYWORDS`.
    """
    moved = {}
    for key in INHERITED_KEYWORDS:
        if key in header:
            moved[key] = (header[key], header.comments[key])
            header.remove(key, remove_all=True)
    header["INHERIT"] = (True, "inherit the primary header")
    return moved


#: Blank cards kept in each extension header for the keywords of the WCS solution.
WCS_SPARE_CARDS = 72


def finish_buffer(products, image):
    """Put a reduced OTA into FITS byte order; its final header text goes to ``products``.

    Done in the workers, in parallel, so that the master only copies the buffer
    into the output file.
    """
    if sys.byteorder == "little":
        image.byteswap(inplace=True)
    image.flush()
    set_header_text(products, image.view(image.dtype.newbyteorder(">"))
                    if sys.byteorder == "little" else image,
                    spare_cards=WCS_SPARE_CARDS if products["sources"] is not None else 0)


def set_header_text(products, data, spare_cards=0):
    """The extension header with its checksums over ``data`` (big-endian) as FITS text.

    ``spare_cards`` blank cards leave room for keywords added after the OTA is in
    the file (``-fixwcs``): new keywords take the place of blank cards, so the
    header keeps its length and can be rewritten in place.
    """
    hdu = fits.ImageHDU(data=data, header=products["header"])
    for _ in range(spare_cards):
        hdu.header.add_blank()
    hdu.add_checksum()
    products["header"] = hdu.header
    products["header_text"] = hdu.header.tostring()


def _finite(value):
    return round(float(value), 4) if np.isfinite(value) else -1.0


def _inject_fault(ota):
    fault = os.environ.get("PODI_FAULT", "")
    kind, _, target = fault.partition(":")
    if not fault or target != f"{ota:02d}":
        return
    if kind == "crash":
        os._exit(3)
    if kind == "hang":
        while True:
            time.sleep(60)
    if kind == "raise":
        raise RuntimeError("injected fault")


def _worker(filename, ota, options, buffers, results):
    """Worker process: reduce one OTA into its shared buffer, send the products."""
    start = time.monotonic()
    try:
        _inject_fault(ota)
        image = buffers.array(ota)
        products = collect_reduce_ota(filename, options, out=image)
        finish_buffer(products, products.pop("image"))
        del image
        products["seconds"] = time.monotonic() - start
        results.put(("ok", ota, products))
    except Exception as error:  # one OTA's failure must not stop the others
        message = " ".join(str(error).split()) or type(error).__name__
        results.put(("error", ota, f"{type(error).__name__}: {message}"))


# --- The fan-out ----------------------------------------------------------------------

class SharedBuffers:
    """One file-backed float32 OTA array per OTA in shared memory (``/dev/shm``)."""

    def __init__(self, otas, size):
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = Path(tempfile.mkdtemp(prefix="podi_", dir=root))
        self.size = size
        self.paths = {}
        for ota in otas:
            path = self.directory / f"OTA{ota:02d}.f32"
            with open(path, "wb") as handle:
                handle.truncate(size * size * 4)
            self.paths[ota] = path

    def array(self, ota):
        """The buffer of an OTA as a native float32 array."""
        return np.memmap(self.paths[ota], dtype=np.float32, mode="r+", shape=(self.size, self.size))

    def remove(self):
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        self.directory.rmdir()


class Progress:
    """One log line per finished OTA, or a progress bar when stderr is a terminal."""

    def __init__(self, total):
        self.total, self.count = total, 0
        self.started = time.monotonic()
        self.bar = sys.stderr.isatty() and logger.getEffectiveLevel() > logging.DEBUG

    def done(self, ota, products, failure=None):
        self.count += 1
        elapsed = time.monotonic() - self.started
        if products is None:
            if self.bar:
                sys.stderr.write("\n")
            logger.error("OTA %02d failed: %s", ota, failure)
        elif self.bar:
            filled = int(30 * self.count / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {self.count}/{self.total} OTAs "
                             f"{elapsed:.1f} s")
            sys.stderr.flush()
        else:
            logger.info("OTA %02d reduced in %.2f s (%d/%d, %.1f s)", ota, products["seconds"],
                        self.count, self.total, elapsed)

    def close(self):
        if self.bar and self.count:
            sys.stderr.write("\n")


def run_workers(jobs, options, buffers, sink, deadline=None):
    """Reduce every OTA in its own process, at most ``ncpus`` at once.

    Parameters
    ----------
    jobs : dict
        OTA -> raw file.
    sink : callable
        Called as ``sink(ota, products)`` as each OTA finishes (``products`` None
        when it failed).
    deadline : float, optional
        ``time.monotonic()`` limit; when it passes every worker is killed and
        :class:`ReductionError` raised.

    Returns
    -------
    (dict, dict)
        OTA -> data products, and OTA -> error message for the OTAs that failed.
    """
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    results = context.Queue()
    pending = list(jobs.items())
    running, products, failures = {}, {}, {}
    ncpus = max(1, int(options.get("ncpus") or os.cpu_count() or 1))
    progress = Progress(len(jobs))
    try:
        while pending or running:
            while pending and len(running) < ncpus:
                ota, filename = pending.pop(0)
                process = context.Process(target=_worker, daemon=True,
                                          args=(filename, ota, options, buffers, results))
                process.start()
                running[ota] = process
            try:
                status, ota, payload = results.get(timeout=0.2)
            except queue.Empty:
                status = None
            if status is not None:
                running.pop(ota).join()
                if status == "ok":
                    products[ota] = payload
                else:
                    failures[ota] = payload
                progress.done(ota, payload if status == "ok" else None, failure=payload)
                sink(ota, payload if status == "ok" else None)
            for ota, process in list(running.items()):
                # A worker that died without a word (killed, crashed) fails its OTA only.
                if not process.is_alive() and results.empty():
                    process.join()
                    del running[ota]
                    failures[ota] = f"worker process died (exit code {process.exitcode})"
                    progress.done(ota, None, failure=failures[ota])
                    sink(ota, None)
            if deadline is not None and time.monotonic() > deadline:
                raise ReductionError(f"timed out after {options['timeout']:g} s; "
                                     f"{len(running) + len(pending)} OTAs unfinished")
    finally:
        progress.close()
        for process in running.values():
            process.kill()
            process.join()
    return products, failures


def run_serially(jobs, options, buffers, sink):
    """All OTAs in this process (``-profile`` and ``-ncpus=1``)."""
    products, failures = {}, {}
    progress = Progress(len(jobs))
    for ota, filename in jobs.items():
        start = time.monotonic()
        try:
            products[ota] = collect_reduce_ota(filename, options, out=buffers.array(ota))
            finish_buffer(products[ota], products[ota].pop("image"))
            products[ota]["seconds"] = time.monotonic() - start
        except Exception as error:  # one OTA's failure must not stop the others
            failures[ota] = f"{type(error).__name__}: {' '.join(str(error).split())}"
        progress.done(ota, products.get(ota), failure=failures.get(ota))
        sink(ota, products.get(ota))
    progress.close()
    return products, failures


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


def primary_header(first_header, products, failures, options, argv):
    """Primary header: inherited exposure keywords, pipeline and summary keywords."""
    primary = fits.Header()
    if not options.get("prep4sex"):
        for result in products.values():
            for key, card in result["inherited"].items():
                if key not in primary:
                    primary[key] = card
    else:
        for key in ("OBSID", "OBJECT", "FILTER", "EXPTIME", "MJD-OBS", "RA", "DEC"):
            if key in first_header:
                primary[key] = first_header[key]
    primary["PIPELINE"] = (PIPELINE_NAME, "pipeline that made this file")
    primary["PLVERSIO"] = (PIPELINE_VERSION, "pipeline version")
    primary["PLVER"] = f"{PIPELINE_NAME} {PIPELINE_VERSION}"
    headers = [r["header"] for r in products.values()]
    binning = headers[0].get("CCDBIN1", 1)
    primary["BINNING"] = (binning, "binning factor")
    primary["BUNIT"] = (headers[0]["BUNIT"], "unit of the pixel values")
    cells = np.array([h.get("NCELLS", 1) for h in headers], float)
    primary["GAIN"] = (float(np.sum([h["GAIN"] for h in headers] * cells) / cells.sum()),
                       "mean effective gain (e-/BUNIT)")
    primary["RDNOISE"] = (float(np.median([h["RDNOISE"] for h in headers])), "read noise (BUNIT)")
    primary["SATURATE"] = (float(min(h["SATURATE"] for h in headers)), "lowest saturation level (BUNIT)")
    sky, noise = global_sky(products, first_header)
    primary["SKYLEVEL"] = (_finite(sky), "median sky level (BUNIT)")
    primary["SKYBG"] = (_finite(sky), "same as SKYLEVEL")
    primary["SKYNOISE"] = (_finite(noise), "pixel noise of the sky (BUNIT)")
    mjd = float(first_header.get("MJD-OBS", 0.0))
    primary["MJD-MID"] = (mjd + float(first_header.get("EXPTIME", 0.0)) / 2 / 86400,
                          "MJD at the middle of the exposure")
    primary["NOTAS"] = (len(products), "OTAs reduced")
    primary["NFAILED"] = (len(failures), "OTAs that failed and are missing")
    if failures:
        primary["FAILOTAS"] = (",".join(f"{ota:02d}" for ota in sorted(failures)), "failed OTAs")
    for key, value in (options.get("addfitskey") or {}).items():
        primary[key] = (value, "user-added keyword")
    primary.add_history("command: " + " ".join(argv)[:1000])
    primary.add_history("versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
    for ota, message in sorted(failures.items()):
        primary.add_history(f"OTA {ota:02d} failed: {message}")
    return primary


def association_table(products):
    """``ASSOCIATIONS``: every input and calibration file by reduction step."""
    rows = []
    for result in products.values():
        for step, path in result["files_used"].items():
            if (step, path) not in rows:
                rows.append((step, path))
    table = Table(rows=rows or None, names=("correction", "filename_full"), dtype=("U25", "U375"))
    table["filename"] = [Path(path).name[:100] for path in table["filename_full"]]
    hdu = fits.BinTableHDU(table, name="ASSOCIATIONS")
    return hdu


class OrderedSink:
    """Appends finished OTAs to the output file in the inside-out order, as they come.

    Writing overlaps with the reduction of the other OTAs; each shared buffer is
    freed once its OTA is in the file. ``offsets`` keeps where each OTA's header
    went, so that frame-wide steps (``-fixwcs``) can rewrite it in place.
    """

    def __init__(self, stream, order, buffers):
        self.stream, self.buffers = stream, buffers
        self.pending, self.ready, self.offsets = list(order), {}, {}

    def __call__(self, ota, products):
        self.ready[ota] = products
        while self.pending and self.pending[0] in self.ready:
            ota = self.pending.pop(0)
            result = self.ready.pop(ota)
            if result is not None:
                self.offsets[ota] = self.stream.add_image(
                    result["header_text"], self.buffers.paths[ota], self.buffers.size**2 * 4)
            self.buffers.paths[ota].unlink(missing_ok=True)


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


def qa_plots(products, tables, keywords, first_header, size, output, options):
    """Write the QA plots (:mod:`podi_plots`); a plotting problem never fails the frame.

    ``tables`` and ``keywords`` are :func:`podi_framecalib.frame_calibrations`' results.
    """
    start = time.monotonic()
    try:
        import podi_plots  # loaded only for plots: see podi_framecalib.qa_data
        written = podi_plots.make_plots(
            podi_framecalib.qa_data(products, tables, keywords, first_header, size), output, formats=options["plotformat"], otalevel=options["otalevelplots"],
            qasubdirs=options["qasubdirs"], qasubdirname=options["qasubdirname"],
            fitradial=options.get("fitradialZP", False), ncpus=options["ncpus"])
    except Exception as error:  # noqa: BLE001 - the reduced frame is already safe on disk
        logger.warning("QA plots failed: %s", " ".join(str(error).split()))
        return
    logger.info("QA plots: %d files in %.1f s", len(written), time.monotonic() - start)


# --- The whole frame ----------------------------------------------------------------------

def exposure_header(exposure):
    """Primary header and binning of the first readable OTA file of an exposure."""
    problems = []
    for ota in sorted(exposure.ota_files):
        try:
            with open_raw_ota(exposure.ota_files[ota]) as raw:
                return raw.header.copy(), raw.binning
        except RawDataError as error:
            problems.append(error)
    raise ReductionError(f"{exposure.base}: no readable OTA file (first problem: {problems[0]})")


def collectcells(options, argv=()):
    """Reduce the exposure ``options['input']`` into ``options['output']``.

    Returns
    -------
    Path or None
        The output file, or None when ``-noclobber`` skipped an existing one.

    Raises
    ------
    ReductionError, RawDataError, CalibrationNotFound, CalibrationError, OptionError
        Each with a one-line message; nothing is written.
    """
    start = time.monotonic()
    exposure = find_exposure(options["input"])
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
    options = dict(options, calibrations=resolve_calibrations(options, first_header, binning))
    # Read once here; the forked workers inherit it.
    wcs_file = options["calibrations"].get("wcs")
    options["canned_wcs"] = podi_wcs.read_canned_wcs(wcs_file) if wcs_file else {}
    size = cell_geometry(binning).ota_size
    for step in ("bias", "dark", "flat"):
        if options["calibrations"].get(step):
            check_calibration_binning(options["calibrations"][step], size)
    # A missing or unreadable catalog stops the frame before any work (DECISIONS 14).
    refcat = podi_ipprefcat.open_refcat(options.get("refcat")) if options.get("fixwcs") else None
    if not options.get("bgmode"):
        logger.info("%s %s: reducing %s (%d OTAs, binning %d)", PIPELINE_NAME, PIPELINE_VERSION,
                    exposure.base, len(otas), binning)
    output.parent.mkdir(parents=True, exist_ok=True)
    buffers = SharedBuffers(otas, size)
    stream = StreamedMEF(output)
    try:
        jobs = {ota: exposure.ota_files[ota] for ota in otas}
        sink = OrderedSink(stream, otas, buffers)
        deadline = start + options["timeout"] if options.get("timeout") else None
        if options.get("profile"):
            profiler = cProfile.Profile()
            products, failures = profiler.runcall(run_serially, jobs, options, buffers, sink)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        elif options.get("ncpus") == 1:
            products, failures = run_serially(jobs, options, buffers, sink)
        else:
            products, failures = run_workers(jobs, options, buffers, sink, deadline)
        if not products:
            raise ReductionError(f"{exposure.base}: every OTA failed; no output written")
        if deadline is not None and time.monotonic() > deadline:
            raise ReductionError(f"timed out after {options['timeout']:g} s; no output written")
        keywords, tables = {}, []
        if options.get("fixwcs"):
            keywords, tables = podi_framecalib.frame_calibrations(products, refcat, first_header,
                                                                  options, size)
            for ota, offset in sink.offsets.items():
                stream.patch_header(offset, products[ota]["header_text"])
        for table in tables + [association_table(products)]:
            stream.add_table(table)
        primary = primary_header(first_header, products, failures, options, argv)
        for key, card in keywords.items():
            primary[key] = card
        stream.finish(primary)
    except BaseException:
        stream.abort()
        raise
    finally:
        buffers.remove()
    if options.get("fixwcs") and options.get("create_qaplots"):
        qa_plots(products, tables, keywords, first_header, size, output, options)
    print(summary_line(exposure.base, primary, output, time.monotonic() - start))
    return output


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
            podi_ipprefcat.RefcatError, OSError) as error:
        print(f"podi_collectcells: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
