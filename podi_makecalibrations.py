"""Master calibrations from raw bias, dark and flat exposures (``podi_makecalibrations``).

Usage::

    podi_makecalibrations input [input ...] calibdir [-crosstalk=FILE|none]
        [-nonlinearity=FILE] [-gain] [-combine=median|mean] [-binning=N] [-ncpus=N]
        [-bpm=DIR] [-fringe] [-pupilghost[=DIR]]

Each ``input`` is an exposure directory, one OTA file of an exposure, or a text
file listing such paths in its first column (``#`` comments allowed). Exposures are
sorted by ``OBSTYPE`` (``BIAS``, ``DARK``, ``DFLAT``/``TFLAT``), binning and filter;
anything else is skipped with a message. For each binning ``b`` the tool writes

* ``bias_bin<b>.fits``: overscan-subtracted biases, sigma-clipped median;
* ``dark_yes_bin<b>.fits``: bias-subtracted darks scaled to one exposure time
  (primary ``EXPTIME``), combined;
* ``flat_<FILTER>_bin<b>.fits``: bias- and dark-subtracted flats, each scaled to
  the mean level of the stack, combined, then normalised to 1.0 over the OTAs that
  the filter illuminates fully (pixels below 0.1 become NaN).

With ``-fringe``, the object exposures among the inputs (reduced with these
masters: sky-dominated, dithered frames of one filter) also give

* ``fringe__<FILTER>.fits``: per OTA the NaN-median of ``(image - sky) / sky`` with
  sources masked (:mod:`podi_fringe`), the template ``podi_collectcells -fringe``
  subtracts;
* ``fringevectors__<FILTER>__OTA<xy>.reg``: pairs of close dark and bright points of
  that template (ds9 vectors), chosen automatically.

With ``-pupilghost``, the flats of the OTAs the pupil ghost falls on get the ghost
divided out (:mod:`podi_pupilghosttemplate`; extension keywords ``PGAFCTD = T``,
``PGEFCTVX/Y``, ``PGSCALNG``), so that the flat holds the pixels' response alone;
the bare flag fits the ghost and also writes its template
``pupilghost_template___level_<L>__bin<b>.fits`` (L: the filter arm level of the
``FLTARM`` keywords), ``-pupilghost=DIR`` fits the scale of the template in DIR
instead. ``podi_collectcells -pupilghost`` subtracts the ghost from science frames
reduced with such a flat.

Each input goes through the same per-OTA stages as ``podi_collectcells`` (crosstalk,
overscan, nonlinearity, gain), so masters and science frames must be made with the
same ``-gain`` setting. Outputs are in the pipeline's own format (``podi_mef``).
Memory stays bounded: one OTA of all frames at a time, one OTA per worker process.
"""

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from astropy.io import fits

import podi_fringetemplate
import podi_pupilghost
import podi_pupilghosttemplate
from podi_badpixels import derive_bpm_files
from podi_calibfiles import fringe_vectors_name, master_name, pupilghost_template_name
from podi_crosstalk import crosstalk_file_for_mjd
from podi_definitions import (PIPELINE_NAME, cell_geometry, cell_to_ota, filter_level,
                              fppos_for_ota, is_guide_ota, layout_for_mjd, ota_extname,
                              otas_to_normalize_flat)
from podi_imcombine import COMBINE_METHODS, clipped_combine
from podi_mef import CalibrationError, write_atomic
from podi_nonlinearity import nonlinearity_file_for_mjd
from podi_rawdata import RawDataError, find_exposure, read_exposure_header
from podi_reduceota import ReductionSettings, cell_gains, reduce_ota
from podi_stats import bin_image, robust_statistics
from podi_workers import process_exists

logger = logging.getLogger(__name__)

FLAT_TYPES = ("DFLAT", "TFLAT", "FLAT", "SFLAT")


@dataclass
class RawExposure:
    """One input exposure as sorted by the tool."""

    name: str
    obstype: str
    binning: int
    filter: str
    exptime: float
    mjd: float
    ota_files: dict
    level: int = 0          # filter arm level (FLTARM keywords)
    rotator: float = 0.0    # ROTSTART (degrees)


def read_inputs(paths):
    """Expand the command-line inputs into a list of exposure paths."""
    expanded = []
    for path in map(Path, paths):
        if path.is_file() and not path.name.endswith((".fits", ".fits.fz")):
            for line in path.read_text().splitlines():
                line = line.split("#")[0].strip()
                if line:
                    expanded.append(Path(line.split()[0]))
        else:
            expanded.append(path)
    return expanded


def classify(path):
    """Describe one exposure from the primary header of its first OTA file."""
    exposure = find_exposure(path)
    first = exposure.ota_files[min(exposure.ota_files)]
    header, binning = read_exposure_header(first)
    return RawExposure(exposure.base, str(header.get("OBSTYPE", "")).strip().upper(), binning,
                       str(header.get("FILTER", "unknown")).strip(), float(header.get("EXPTIME", 0.0)),
                       float(header.get("MJD-OBS", 0.0)), exposure.ota_files, filter_level(header),
                       podi_pupilghost.rotator_angle(header))


def flat_normalisation_level(binned):
    """Level 1.0 of a master flat: clipped median of the pooled, 8x8-binned OTAs.

    Parameters
    ----------
    binned : list of numpy.ndarray
        8x8-binned OTA arrays (NaN = no data) of the OTAs that define the level.

    Returns
    -------
    float
        Iterate three times: median m and standard deviation s of the pooled
        8x8-binned pixels within [m - 2 s, m + 3 s] of the previous pass.
    """
    pooled = np.concatenate([image.ravel() for image in binned])
    pooled = pooled[np.isfinite(pooled)]
    selection = pooled
    for _ in range(3):
        median, sigma = np.median(selection), np.std(selection)
        keep = (pooled > median - 2 * sigma) & (pooled < median + 3 * sigma)
        if not keep.any():
            break
        selection = pooled[keep]
    return float(np.median(selection))


def work_folder(outdir):
    """A temporary folder ``.makecal.<pid>.<random>`` in ``outdir`` for the OTAs of one
    master (a context manager); those of killed runs (process gone) are removed first."""
    for folder in Path(outdir).glob(".makecal.*.*"):
        pid = folder.name.split(".")[2]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return tempfile.TemporaryDirectory(dir=outdir, prefix=f".makecal.{os.getpid()}.")


def combine_ota(kind, ota, binning, files, settings, combine, exptimes, tmpdir):
    """Reduce one OTA of every input frame, combine, and write it to a temporary file.

    Returns
    -------
    dict
        ``ota``, ``path`` of the temporary single-HDU file, ``nframes``, ``binned``
        (8x8-binned image for the flat normalisation) and the ``gain``.
    """
    size = cell_geometry(binning).ota_size
    cube = np.empty((len(files), size, size), np.float32)
    reference_time = float(np.median(exptimes)) if exptimes else 0.0
    nframes = 0
    for filename, exptime in zip(files, exptimes):
        try:
            frame = reduce_ota(filename, settings, out=cube[nframes])
        except RawDataError as error:
            logger.warning("skipped %s", error)
            continue
        if kind == "dark" and exptime > 0:
            cube[nframes] *= np.float32(reference_time / exptime)
        nframes += 1
    if not nframes:
        return {"ota": ota, "path": None, "nframes": 0}
    cube = cube[:nframes]
    if kind == "flat":
        # Each frame's lamp level is brought to the stack's mean: the same factor
        # for all OTAs of a frame when the lamp varies globally.
        levels = np.array([robust_statistics(image, step=7)[0] for image in cube])
        cube *= (levels.mean() / levels)[:, None, None].astype(np.float32)
    combined, _ = clipped_combine(cube, combine)
    del cube
    gain = 1.0 if settings.gain else effective_gain(frame, combined if kind == "flat" else None)
    path = Path(tmpdir) / f"OTA{ota:02d}.fits"
    fits.PrimaryHDU(combined, fits.Header({"NCOMBINE": nframes, "GAIN": gain})).writeto(path)
    return {"ota": ota, "path": path, "nframes": nframes, "gain": gain,
            "binned": bin_image(combined, 8) if kind == "flat" else None}


def effective_gain(frame, flat=None):
    """Electrons per ADU of an OTA (e-/ADU).

    Without a flat, the mean gain of the used cells. A flat in ADU carries each
    cell's gain; dividing by it leaves data in units of median(flat x gain) /
    median(flat) electrons per ADU, which is returned.
    """
    gains = cell_gains(frame)
    used = frame.used_cells
    if flat is None:
        return float(np.mean([gains[cy, cx] for cx, cy in used]))
    gain_map = np.full(flat.shape, np.nan, np.float32)
    for cx, cy in used:
        gain_map[cell_to_ota(cx, cy, frame.binning)] = gains[cy, cx]
    return robust_statistics(flat * gain_map, step=7)[0] / robust_statistics(flat, step=7)[0]


def master_primary(kind, binning, exptime, mjd, gain, filter_name=None):
    """Primary header of a master calibration.

    Parameters
    ----------
    kind : {'bias', 'dark', 'flat'}
    exptime : float
        Seconds; a master dark holds the dark signal of this exposure time.
    gain : float
        Effective gain (e-/ADU) of data divided by this master (flats).
    """
    header = fits.Header()
    header["PIPELINE"] = PIPELINE_NAME
    header["OBSTYPE"] = {"bias": "BIAS", "dark": "DARK", "flat": "FLAT"}[kind]
    header["BINNING"] = binning
    header["MJD-OBS"] = mjd
    header["EXPTIME"] = (exptime, "s; darks are scaled to this")
    header["GAIN"] = (gain, "effective gain (e-/ADU)")
    if filter_name is not None and kind == "flat":
        header["FILTER"] = filter_name
    return header


def fringe_primary(binning, mjd, filter_name):
    """Primary header of a fringe template (``fringe__<FILTER>.fits``)."""
    header = fits.Header()
    header["PIPELINE"] = PIPELINE_NAME
    header["OBSTYPE"] = ("FRINGE", "relative fringe amplitude (image - sky) / sky")
    header["FILTER"] = filter_name
    header["BINNING"] = binning
    header["MJD-OBS"] = mjd
    return header


def master_extension(ota, data, **keywords):
    """Image extension ``OTA<xy>.SCI`` of one OTA in a master (float32, ``FPPOS`` set)."""
    header = fits.Header()
    header["FPPOS"] = fppos_for_ota(ota)
    header["OTA"] = ota
    for key, value in keywords.items():
        header[key] = value
    return fits.ImageHDU(np.asarray(data, dtype=np.float32), header, name=ota_extname(ota))


def make_master(kind, exposures, outdir, settings, combine="median", ncpus=None, pupilghost=None):
    """Build one master calibration file from exposures of one kind and binning.

    Parameters
    ----------
    kind : {'bias', 'dark', 'flat'}
    exposures : list of RawExposure
    outdir : Path
    settings : ReductionSettings
        Stages applied to each input (bias/dark masters to subtract included).
    pupilghost : True, str or None
        Flats only: divide the pupil ghost out (:func:`remove_pupil_ghost`); True fits
        it freely and writes its template next to the flat, a string names a folder
        or file with the template to use.

    Returns
    -------
    Path
        The master file.
    """
    binning = exposures[0].binning
    filter_name = exposures[0].filter
    filename = Path(outdir) / master_name(kind, binning, filter_name)
    mjd = exposures[0].mjd
    if settings.nonlinearity and Path(settings.nonlinearity).is_dir():
        settings = replace(settings, nonlinearity=str(nonlinearity_file_for_mjd(settings.nonlinearity, mjd)))
    if settings.crosstalk not in (None, "default") and Path(settings.crosstalk).is_dir():
        settings = replace(settings, crosstalk=str(crosstalk_file_for_mjd(settings.crosstalk, mjd)))
    otas = sorted({ota for exposure in exposures for ota in exposure.ota_files})
    layout = layout_for_mjd(exposures[0].mjd)
    logger.info("%s: %d exposures, %d OTAs", filename.name, len(exposures), len(otas))
    with work_folder(outdir) as tmpdir:
        jobs = []
        for ota in otas:
            members = [e for e in exposures if ota in e.ota_files]
            jobs.append((kind, ota, binning, [e.ota_files[ota] for e in members], settings, combine,
                         [e.exptime for e in members], tmpdir))
        results = [r for r in map_otas(combine_ota, jobs, ncpus) if r["path"] is not None]
        if not results:
            raise CalibrationError(f"{filename}: no usable input for any OTA")
        level = 1.0
        gain = float(np.mean([r["gain"] for r in results]))
        exptime = float(np.median([e.exptime for e in exposures])) if kind != "bias" else 0.0
        primary = master_primary(kind, binning, exptime, float(np.mean([e.mjd for e in exposures])),
                                 gain, filter_name)
        primary["NCOMBINE"] = (len(exposures), "exposures given")
        primary["COMBINE"] = (combine, "sigma-clipped statistic")
        ghost_keywords = {}
        if kind == "flat" and pupilghost:
            ghost_keywords = remove_pupil_ghost(results, exposures, outdir, pupilghost, primary)
        if kind == "flat":
            chosen = [r for r in results if r["ota"] in otas_to_normalize_flat(filter_name, layout)] \
                or results
            level = flat_normalisation_level([r["binned"] for r in chosen])
            primary["FF_NORM"] = (level, "level divided out (ADU)")
            primary["FF_OTAS"] = (",".join(f"{r['ota']:02d}" for r in chosen)[:68], "OTAs defining 1.0")
        for exposure in exposures:
            primary.add_history(f"input: {exposure.name}")
        by_ota = {r["ota"]: r for r in results}
        hdus = [fits.PrimaryHDU(header=primary)]
        for ota in [o for o in layout.output_order if o in by_ota]:
            with fits.open(by_ota[ota]["path"]) as single:
                data, header = single[0].data, single[0].header
                if kind == "flat":
                    data /= np.float32(level)
                    with np.errstate(invalid="ignore"):
                        data[data < 0.1] = np.nan
                extension = master_extension(ota, data, NCOMBINE=header["NCOMBINE"], GAIN=header["GAIN"])
                extension.header.update(ghost_keywords.get(ota, {}))
                hdus.append(extension)
        write_atomic(fits.HDUList(hdus), filename)
    return filename


def remove_pupil_ghost(results, exposures, outdir, pupilghost, primary):
    """Divide the pupil ghost out of the combined flat OTAs (their temporary files).

    The ghost is fitted in the OTAs it falls on (:mod:`podi_pupilghosttemplate`):
    freely, then written as the template ``pupilghost_template___level_<L>__bin<b>.fits``
    in ``outdir`` (``pupilghost`` True), or as the scale of the template found in
    ``pupilghost`` (a folder or file). Each corrected OTA's ``binned`` image is
    renewed for the flat's normalisation.

    Returns
    -------
    dict
        OTA -> keywords of its extension (``PGAFCTD``, ``PGEFCTVX/Y``, ...).
    """
    binning, first = exposures[0].binning, exposures[0]
    rotator = float(np.median([e.rotator for e in exposures]))
    by_ota = {r["ota"]: r for r in results if r["ota"] in podi_pupilghost.GHOST_OTAS}
    if not by_ota:
        logger.warning("-pupilghost: the flats have none of the OTAs %s; no ghost removed",
                       podi_pupilghost.GHOST_OTAS)
        return {}
    template = None
    if pupilghost is not True:
        path = Path(pupilghost)
        if path.is_dir():
            path = path / pupilghost_template_name(first.level, binning)
        if not path.is_file():
            raise CalibrationError(f"-pupilghost={pupilghost}: no template {path.name}")
        template = podi_pupilghost.read_template(path, min(by_ota))
        primary.add_history(f"pupil ghost: template {path}")
    flats = {ota: fits.getdata(r["path"]).astype(np.float32) for ota, r in by_ota.items()}
    ghost = podi_pupilghosttemplate.fit_flat_ghost(flats, binning, rotator, template)
    keywords = podi_pupilghosttemplate.remove_flat_ghost(flats, ghost, binning)
    for ota, image in flats.items():
        with fits.open(by_ota[ota]["path"], mode="update") as single:
            single[0].data = image
        by_ota[ota]["binned"] = bin_image(image, 8)
    if template is None:
        name = Path(outdir) / pupilghost_template_name(first.level, binning)
        podi_pupilghost.write_template(name, ghost.template, sorted(flats), {
            "FILTER": first.filter, "FLTLEVEL": (first.level, "filter arm level"),
            "BINNING": binning, "MJD-OBS": float(np.mean([e.mjd for e in exposures])),
            "NCOMBINE": (len(exposures), "flats the ghost was fitted in")})
        logger.info("%s: pupil ghost centred at (%.1f, %.1f), inner edge %.0f px", name,
                    *ghost.centre, ghost.template.radius)
    primary["PGAFCTD"] = (True, "pupil ghost divided out of the OTAs it falls on")
    primary["PGCNTR_X"] = (round(ghost.centre[0], 2), "ghost centre x (focal plane px)")
    primary["PGCNTR_Y"] = (round(ghost.centre[1], 2), "ghost centre y (focal plane px)")
    primary["PGFOUND"] = (ghost.found, "ghost centre found in the flat")
    if not ghost.found:
        logger.warning("-pupilghost: the ghost's centre did not converge in the flats; "
                       "(%.1f, %.1f) used", *ghost.centre)
    return keywords


def map_otas(function, jobs, ncpus=None):
    """``function(*job)`` for every job, one OTA per worker process; results in order."""
    workers = max(1, min(ncpus or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        return [function(*job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(function, *zip(*jobs)))


def fringe_ota(ota, binning, files, settings, tmpdir):
    """Fringe template and vectors of one OTA from reduced object frames.

    Each frame is reduced with ``settings`` (bias, dark, flat), its sky taken as
    the robust median of the OTA, and ``(image - sky) / sky`` with sources masked
    (:func:`podi_fringetemplate.relative_fringes`); the frames are median-combined and the
    vectors chosen on the result (:func:`podi_fringetemplate.choose_fringe_vectors`).

    Returns
    -------
    dict
        ``ota``, ``path`` of the temporary single-HDU template (None without usable
        frames), ``nframes`` and ``vectors`` ((N, 4) unbinned 0-based pixels).
    """
    relative = []
    for filename in files:
        try:
            frame = reduce_ota(filename, settings)
        except RawDataError as error:
            logger.warning("skipped %s", error)
            continue
        if is_guide_ota(str(frame.primary.get("CELLMODE", ""))):
            return {"ota": ota, "path": None, "nframes": 0}
        sky = robust_statistics(frame.image, step=7)[0]
        if not sky > 0:
            logger.warning("skipped %s: sky level %.3g is not positive", filename, sky)
            continue
        relative.append(podi_fringetemplate.relative_fringes(frame.image, sky, binning=frame.binning))
        del frame
    if not relative:
        return {"ota": ota, "path": None, "nframes": 0}
    template, nframes = podi_fringetemplate.combine_fringe_frames(relative), len(relative)
    del relative
    vectors = podi_fringetemplate.choose_fringe_vectors(template, binning)
    path = Path(tmpdir) / f"fringe{ota:02d}.fits"
    fits.PrimaryHDU(template).writeto(path)
    return {"ota": ota, "path": path, "nframes": nframes, "vectors": vectors}


def make_fringe_template(exposures, outdir, settings, ncpus=None):
    """``fringe__<FILTER>.fits`` and its vector files from object exposures of one filter.

    Returns
    -------
    Path
        The template file; the vector files are written next to it.
    """
    filter_name, binning = exposures[0].filter, exposures[0].binning
    filename = Path(outdir) / master_name("fringe", binning, filter_name)
    if len(exposures) < 3:
        logger.warning("%s: only %d object exposures; stars are masked well only in a median "
                       "of at least 3 dithered frames", filename.name, len(exposures))
    otas = sorted({ota for exposure in exposures for ota in exposure.ota_files})
    layout = layout_for_mjd(exposures[0].mjd)
    logger.info("%s: %d exposures, %d OTAs", filename.name, len(exposures), len(otas))
    with work_folder(outdir) as tmpdir:
        jobs = [(ota, binning, [e.ota_files[ota] for e in exposures if ota in e.ota_files], settings,
                 tmpdir)
                for ota in otas]
        results = {r["ota"]: r for r in map_otas(fringe_ota, jobs, ncpus) if r["path"] is not None}
        if not results:
            raise CalibrationError(f"{filename}: no usable object frame for any OTA")
        primary = fringe_primary(binning, float(np.mean([e.mjd for e in exposures])), filter_name)
        primary["NCOMBINE"] = (len(exposures), "exposures given")
        for exposure in exposures:
            primary.add_history(f"input: {exposure.name}")
        hdus = [fits.PrimaryHDU(header=primary)]
        for ota in [o for o in layout.output_order if o in results]:
            hdus.append(master_extension(ota, fits.getdata(results[ota]["path"]),
                                         NCOMBINE=results[ota]["nframes"],
                                         NVECTORS=len(results[ota]["vectors"])))
            podi_fringetemplate.write_fringe_vectors(Path(outdir) / fringe_vectors_name(filter_name, ota),
                                             results[ota]["vectors"])
        write_atomic(fits.HDUList(hdus), filename)
    return filename


def make_calibrations(paths, outdir, settings=None, combine="median", binning=None, ncpus=None,
                      bpm_dir=None, fringe=False, pupilghost=None):
    """Sort the exposures and build every master they allow; return the files written.

    With ``bpm_dir``, bad-pixel region files are also derived from the master dark
    and the first master flat of each binning (:mod:`podi_badpixels`). With
    ``fringe``, object exposures give fringe templates and vectors per filter
    (:func:`make_fringe_template`), reduced with the masters made here. With
    ``pupilghost`` the flats have the pupil ghost divided out (see :func:`make_master`).
    """
    settings = settings or ReductionSettings(crosstalk="default")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for path in read_inputs(paths):
        try:
            exposure = classify(path)
        except RawDataError as error:
            logger.warning("skipped: %s", error)
            continue
        if binning is not None and exposure.binning != binning:
            logger.warning("skipped %s: binning %d, not %d", exposure.name, exposure.binning, binning)
            continue
        if exposure.obstype == "BIAS":
            groups[("bias", exposure.binning, None)].append(exposure)
        elif exposure.obstype == "DARK":
            groups[("dark", exposure.binning, None)].append(exposure)
        elif exposure.obstype in FLAT_TYPES:
            groups[("flat", exposure.binning, exposure.filter)].append(exposure)
        elif exposure.obstype == "OBJECT" and fringe:
            groups[("fringe", exposure.binning, exposure.filter)].append(exposure)
        else:
            logger.warning("skipped %s: OBSTYPE %r is not a calibration", exposure.name,
                           exposure.obstype)
    written = []
    for kind in ("bias", "dark", "flat", "fringe"):
        for (group_kind, b, filter_name), exposures in sorted(groups.items(), key=str):
            if group_kind != kind:
                continue
            stage_settings = replace(settings)
            if kind in ("dark", "flat", "fringe"):
                stage_settings.bias = _existing(outdir / master_name("bias", b), kind)
            if kind in ("flat", "fringe"):
                stage_settings.dark = _existing(outdir / master_name("dark", b), kind)
            if kind == "fringe":
                stage_settings.flat = _existing(outdir / master_name("flat", b, filter_name), kind)
                if stage_settings.flat is None:
                    logger.warning("no fringe template for %s without its flat field", filter_name)
                    continue
                written.append(make_fringe_template(exposures, outdir, stage_settings, ncpus))
            else:
                written.append(make_master(kind, exposures, outdir, stage_settings, combine, ncpus,
                                           pupilghost if kind == "flat" else None))
    if bpm_dir is not None:
        derive_region_files(written, bpm_dir)
    return written


def derive_region_files(masters, bpm_dir):
    """Bad-pixel region files from the master dark and the first flat of each binning."""
    names = {path.name: path for path in masters}
    for b in (1, 2):
        dark = names.get(master_name("dark", b))
        flats = sorted(path for name, path in names.items()
                       if name.startswith("flat_") and name.endswith(f"_bin{b}.fits"))
        if dark and flats:
            files = derive_bpm_files(dark, flats[0], bpm_dir)
            logger.info("%d bad-pixel region files from %s and %s", len(files), dark.name, flats[0].name)
        elif dark or flats:
            logger.warning("binning %d: bad-pixel regions need both a master dark and a flat", b)


def _existing(path, kind):
    if path.is_file():
        return str(path)
    logger.warning("no %s found for the %s master: not subtracted", path.name, kind)
    return None


def build_parser():
    parser = argparse.ArgumentParser(prog="podi_makecalibrations",
                                     description="Build master bias, dark and flat fields.")
    parser.add_argument("paths", nargs="+", help="inputs (exposures, OTA files, lists), then calibdir")
    parser.add_argument("-crosstalk", default="default",
                        help="crosstalk matrix file, or 'none' (default: built-in coefficient)")
    parser.add_argument("-nonlinearity", default=None, help="nonlinearity coefficient table")
    parser.add_argument("-gain", action="store_true", help="work in electrons (as -gain in collectcells)")
    parser.add_argument("-combine", default="median", choices=COMBINE_METHODS)
    parser.add_argument("-binning", type=int, default=None, help="only use frames of this binning")
    parser.add_argument("-bpm", default=None, metavar="DIR",
                        help="also derive bad-pixel region files from the master dark and flat")
    parser.add_argument("-fringe", action="store_true",
                        help="also build fringe templates and vectors from the object exposures")
    parser.add_argument("-pupilghost", nargs="?", const=True, default=None, metavar="DIR",
                        help="divide the pupil ghost out of the flats; bare: fit it and write "
                             "its template pupilghost_template___level_<L>__bin<b>.fits; "
                             "=DIR: use the template found there")
    parser.add_argument("-ncpus", type=int, default=None)
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if len(args.paths) < 2:
        print("podi_makecalibrations: error: give at least one input and the output directory",
              file=sys.stderr)
        return 2
    *inputs, outdir = args.paths
    settings = ReductionSettings(crosstalk=None if args.crosstalk == "none" else args.crosstalk,
                                 nonlinearity=args.nonlinearity, gain=args.gain)
    try:
        written = make_calibrations(inputs, outdir, settings, args.combine, args.binning, args.ncpus,
                                    args.bpm, args.fringe, args.pupilghost)
    except (CalibrationError, RawDataError, OSError, ValueError) as error:
        print(f"podi_makecalibrations: error: {error}", file=sys.stderr)
        return 1
    if not written:
        print("podi_makecalibrations: error: no bias, dark or flat exposures among the inputs",
              file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
