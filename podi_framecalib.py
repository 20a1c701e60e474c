"""Frame-wide calibrations after the OTAs are collected: PSF, WCS, zero point, catalogs.

``podi_collectcells`` calls :func:`frame_calibrations` with ``-fixwcs`` once every OTA
is reduced and its sources are detected (:mod:`podi_findstars`, in the workers):

1. :func:`frame_psf`: a Moffat profile fitted to the bright stars' curves of growth;
   every FWHM is scaled to it.
2. :func:`astrometric_calibration`: every OTA's WCS fitted to the reference catalog
   (:mod:`podi_fixwcs`), the seeing keywords.
3. :func:`source_catalog`: ``CAT.ODI`` through the final WCS.
4. With ``-photcalib``, :func:`photometric_calibration`: zero point, aperture
   correction, sky brightness and depth (:mod:`podi_photcalib`); the catalog's
   magnitudes are calibrated.

:func:`qa_data` then collects what the QA plots show (:mod:`podi_plots`).
"""

import logging

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

import podi_findstars
import podi_fixwcs
import podi_photcalib
import podi_wcs
from podi_definitions import cell_geometry, normalised_filter_name
from podi_mef import add_keywords, header_text_with_checksum, text_keyword
from podi_otaphases import WCS_SPARE_CARDS
from podi_sky import global_sky

logger = logging.getLogger("podi_collectcells")


#: Source flags that keep a detection out of the WCS fit.
_WCS_BAD_FLAGS = (podi_findstars.FLAG_SATURATED | podi_findstars.FLAG_NEAR_UNDEFINED
                  | podi_findstars.FLAG_TRUNCATED)

#: Radius (degrees) of the reference-catalog query around the pointing: the focal
#: plane's extent plus the largest pointing error searched for.
_REFCAT_RADIUS = 1.0


def reference_stars(refcat, first_header):
    """Reference stars around the pointing, at the epoch of the exposure."""
    ra, dec = podi_wcs.parse_pointing(first_header)
    mjd = float(first_header.get("MJD-OBS", 51544.5))
    return refcat.query(ra, dec, _REFCAT_RADIUS, epoch=2000.0 + (mjd - 51544.5) / 365.25)


def astrometric_calibration(results, reference, settings, size):
    """``-fixwcs``: fit every OTA's WCS to the reference catalog (:mod:`podi_fixwcs`).

    Updates the OTA headers of ``results`` (and their header text) in place; the
    keywords of the fit take the place of the :data:`WCS_SPARE_CARDS` blank cards.

    Returns
    -------
    (bool, dict, list)
        Whether the WCS was calibrated, primary keywords, and the tables ``CAT.WCSREF``
        and ``WCSCAL.CAT``.
    """
    sources, headers = {}, {}
    for ota, result in results.items():
        table = result.sources
        good = table[(table["FLAGS"] & _WCS_BAD_FLAGS) == 0]
        sources[ota] = (np.asarray(good["XWIN"]) - 1, np.asarray(good["YWIN"]) - 1)
        headers[ota] = result.header
    solution = podi_fixwcs.solve_wcs(sources, headers, reference, ota_size=size)
    if not solution.success:
        logger.warning("-fixwcs: %s; the canned WCS is kept (WCSCAL = F)", solution.message)
    for ota, header in solution.headers.items():
        result = results[ota]
        added = [key for key in solution.ota_keywords.get(ota, {}) if key not in result.header]
        if len(added) > WCS_SPARE_CARDS:
            raise ValueError(f"-fixwcs: OTA {ota:02d} needs {len(added)} new header keywords, "
                             f"more than the {WCS_SPARE_CARDS} spare cards kept for them")
        for key in ("CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
            result.header[key] = header[key]
        for key, card in solution.ota_keywords.get(ota, {}).items():
            result.header[key] = card
        result.header_text = header_text_with_checksum(result.header)
    keywords = dict(solution.keywords)
    add_keywords(keywords, seeing_keywords(results))
    keywords["ASTRMCAT"] = text_keyword(settings.refcat_name,
                                                      "astrometric reference catalog", keep_end=True)
    tables = [fits.BinTableHDU(solution.reference, name="CAT.WCSREF"),
              fits.BinTableHDU(solution.matches, name="WCSCAL.CAT")]
    return solution.success, keywords, tables


def seeing_keywords(results):
    """Seeing from the detected stars: ``FWHM_WORLD`` (through each OTA's local pixel scale).

    ``SEEING`` is the 3-sigma-clipped median of the unflagged sources (cosmic rays
    and hot pixels are already rejected by :mod:`podi_findstars`).
    """
    every = np.concatenate([np.asarray(r.sources["FWHM_WORLD"], float) for r in results.values()])
    flags = np.concatenate([np.asarray(r.sources["FLAGS"]) for r in results.values()])
    clean = every[(flags == 0) & np.isfinite(every)]
    seeing, n_stars = podi_findstars.clipped_seeing(clean)
    if not n_stars:
        return {"SEEING": (-1.0, "no unflagged source")}
    return {"SEEING": (round(seeing, 4), "FWHM of stars, clipped median (arcsec)"),
            "SEEING_N": (n_stars, "stars in SEEING"),
            "FWHM_ALL": (round(float(np.nanmedian(every)) * 3600, 4), "median FWHM of all sources (arcsec)"),
            "FWHM_FLT": (round(float(np.median(clean)) * 3600, 4), "median FWHM, unflagged sources (arcsec)"),
            "FWHMNFLT": (int(clean.size), "unflagged sources")}


def source_catalog(results):
    """``CAT.ODI``: every detected source with RA/Dec through its OTA's final WCS."""
    tables = []
    for ota, result in results.items():
        table = result.sources
        ra, dec = podi_fixwcs.pixel_to_sky(result.header, np.asarray(table["XWIN"]) - 1,
                                           np.asarray(table["YWIN"]) - 1)
        table = Table(table, meta={})
        table.add_column(ra, name="RA", index=0)
        table.add_column(dec, name="DEC", index=1)
        table["RA"].unit = table["DEC"].unit = "deg"
        for name in ("FLUX", "FLUX_ERR", "FLUX_MAX", "BACKGROUND"):
            table[name].unit = fits_unit(result.header["BUNIT"])
        tables.append(table)
    return vstack(tables) if tables else Table()


def fits_unit(text):
    """``text`` if the FITS standard knows it as a unit (``adu``), else None.

    The standard has no electron: such columns are left without a unit rather than
    with one that FITS readers cannot parse (BUNIT says what the pixels are).
    """
    try:
        u.Unit(text).to_string("fits")
    except ValueError:
        return None
    return text


#: Primary keywords copied into the CAT.PHOTCALIB header, as the original's table had them.
PHOTCALIB_HEADER_KEYWORDS = ("AIRMASS", "FILTER", "FILTERID", "MJD-OBS", "OBSID", "EXPTIME",
                             "EXPMEAS", "TELFOCUS", "ROTSTART", "ROTEND", "ADCMODE")


def photometric_calibration(catalog, reference, results, first_header, settings, seeing, psf):
    """``-photcalib``: zero point, aperture correction, sky brightness and depth.

    Calibrates the ``MAG_Dnn`` columns of ``catalog`` (``CAT.ODI``) in place where a
    zero point exists: instrumental + ``PHOTZP_X`` + ``APCORR`` (docs/conventions.md), i.e.
    the calibrated magnitude of the light inside each aperture.

    ``seeing`` (arcsec) and ``psf`` (:func:`frame_psf`, may be None) give the aperture
    correction.

    Returns
    -------
    (dict, list)
        Primary keywords (:mod:`podi_photcalib`) and the table ``CAT.PHOTCALIB``.
    """
    name = settings.refcat_name
    exptime = float(first_header.get("EXPTIME", 0.0))
    if not exptime > 0:
        message = f"EXPTIME is {exptime:g} s"
        logger.warning("-photcalib: %s; no zero point", message)
        return {"PHOTCAL": (False, "photometric calibration done"),
                "PHOTMSG": (message, "why there is no zero point")}, []
    first = next(iter(results.values())).header
    centre = (podi_photcalib.radial_zeropoint_centre(first["CRVAL1"], first["CRVAL2"])
              if settings.fit_radial_zp else None)
    airmass = first_header.get("AIRMASS")
    result = podi_photcalib.calibrate(catalog, reference, normalised_filter_name(first_header),
                                      exptime, airmass=float(airmass) if airmass is not None else None,
                                      catalog_name=name, radial_centre=centre,
                                      colour_terms=podi_photcalib.ORIGINAL_COLOUR_TERMS
                                      if settings.colour_terms else None)
    table = fits.BinTableHDU(result.table, name="CAT.PHOTCALIB")
    for key in PHOTCALIB_HEADER_KEYWORDS:
        if key in first_header:
            table.header[key] = first_header[key]
    keywords = dict(result.keywords)
    if not result.success:
        logger.warning("-photcalib: %s; no zero point (PHOTCAL = F)", result.message)
        return keywords, [table]
    add_keywords(keywords, podi_photcalib.aperture_correction(psf, seeing))
    zeropoint = keywords["PHOTZP_X"][0] + keywords["APCORR"][0]
    sky, noise = global_sky(results, first_header)
    scale = float(np.median([r.pixel_scale for r in results.values()]))
    beta = psf.beta if psf is not None else podi_findstars.DEFAULT_MOFFAT_BETA
    add_keywords(keywords, podi_photcalib.sky_and_depth(zeropoint, sky, noise, scale, seeing, beta))
    for tag in podi_photcalib.APERTURES:
        catalog[f"MAG_D{tag}"] += np.float32(zeropoint)
    catalog.meta["MAGZP"] = zeropoint
    return keywords, [table]


def catalog_hdu(catalog):
    """``CAT.ODI`` as a table HDU; its header says whether the magnitudes are calibrated."""
    zeropoint = catalog.meta.pop("MAGZP", None)
    hdu = fits.BinTableHDU(catalog, name="CAT.ODI")
    hdu.header["MAGCALIB"] = (zeropoint is not None, "MAG_Dnn calibrated (else instrumental)")
    if zeropoint is not None:
        hdu.header["MAGZP"] = (round(float(zeropoint), 5), "added to -2.5log10(ADU): PHOTZP_X+APCORR")
    return hdu


def frame_psf(results):
    """The frame's Moffat PSF from the bright stars' curves of growth.

    :func:`podi_findstars.fit_moffat_growth` over the stars of all OTAs. Each
    source's FWHM, from its half-light radius under an assumed beta, is then scaled
    so that the median over the fitted stars equals the fitted FWHM: ``FWHM_IMAGE``,
    ``FWHM_WORLD`` and ``SEEING`` become unbiased for the frame's actual profile.

    Returns
    -------
    (podi_findstars.MoffatFit or None, dict)
        The fit (FWHM in arcsec) and the keywords ``PSFFWHM``, ``PSFBETA``, ``PSF_N``.
    """
    sources = [result.sources for result in results.values()]
    growth = np.concatenate([table.meta["GROWTH"] for table in sources])
    outer = np.concatenate([np.full(len(table.meta["GROWTH"]), table.meta["GROWTH_R"])
                            for table in sources])
    radii = np.array(list(podi_findstars.APERTURE_DIAMETERS.values())) / 2
    psf = podi_findstars.fit_moffat_growth(growth, radii, outer)
    if psf is None:
        logger.warning("-fixwcs: %d bright isolated stars, too few for a PSF fit; FWHMs "
                       "assume a Moffat beta of %g", len(growth), podi_findstars.DEFAULT_MOFFAT_BETA)
        return None, {"PSF_N": (len(growth), "bright isolated stars: too few for a PSF fit")}
    scale = psf.fwhm / float(np.median(np.concatenate([t.meta["GROWTH_FWHM"] for t in sources])))
    for table in sources:
        for column in ("FWHM_IMAGE", "FWHM_WORLD"):
            table[column] *= np.float32(scale)
    return psf, {"PSFFWHM": (round(psf.fwhm, 4), "[arcsec] FWHM of the Moffat PSF fit"),
                 "PSFBETA": (round(psf.beta, 3), "beta of the Moffat PSF fit"),
                 "PSF_N": (psf.n_stars, "bright isolated stars in the PSF fit")}


def frame_calibrations(results, refcat, first_header, settings, size):
    """``-fixwcs`` and ``-photcalib`` on the collected OTAs.

    Updates the OTA headers (and header texts) of ``results``; the caller writes them.

    Returns
    -------
    (dict, list)
        Primary keywords, and the tables ``CAT.WCSREF``, ``WCSCAL.CAT``, ``CAT.ODI`` and
        (with ``-photcalib``) ``CAT.PHOTCALIB`` in output order.
    """
    psf, psf_keywords = frame_psf(results)
    reference = reference_stars(refcat, first_header)
    calibrated, keywords, tables = astrometric_calibration(results, reference, settings, size)
    add_keywords(keywords, psf_keywords)
    catalog = source_catalog(results)
    photcalib_tables = []
    if settings.photcalib and not calibrated:
        logger.warning("-photcalib: no zero point without a calibrated WCS (PHOTCAL = F)")
        add_keywords(keywords, {"PHOTCAL": (False, "photometric calibration done"),
                                "PHOTMSG": ("WCS not calibrated", "why there is no zero point")})
    elif settings.photcalib:
        photometry, photcalib_tables = photometric_calibration(
            catalog, reference, results, first_header, settings, keywords["SEEING"][0], psf)
        add_keywords(keywords, photometry)
    # Made after the photometry, which calibrates the catalog's magnitudes.
    return keywords, tables + [catalog_hdu(catalog)] + photcalib_tables


def _columns(table, names):
    """A plain array of only these columns of a table (slicing an astropy table costs a
    millisecond per column, and the plots slice per OTA); None without the table or a column."""
    if table is None or not set(names) <= set(table.colnames):
        return None
    return table[list(names)].as_array()


def qa_data(results, failures, tables, keywords, first_header, binning):
    """What the QA page and plots of a calibrated frame show (:class:`podi_plots.QAData`).

    ``results`` and ``failures`` are the reduced OTAs (:class:`podi_otaphases.OTAResult`)
    and the failed ones (OTA -> message); ``tables`` and ``keywords`` are
    :func:`frame_calibrations`' results. The outlines are the corners of each OTA.
    """
    # matplotlib adds 0.6 s to every start-up: it is loaded only when plots are made.
    import podi_plots
    by_name = {table.name: Table(table.data) for table in tables}
    outlines = {}
    n = cell_geometry(binning).ota_size - 1
    for ota, result in results.items():
        ra, dec = podi_fixwcs.pixel_to_sky(result.header, [0, n, n, 0], [0, 0, n, n])
        outlines[ota] = np.column_stack([ra, dec])
    radial = None
    if keywords.get("RADZPFIT", (False,))[0]:
        first = next(iter(results.values())).header
        radial = {"centre": podi_photcalib.radial_zeropoint_centre(first["CRVAL1"], first["CRVAL2"]),
                  "p0": keywords["RADZP_P0"][0], "p1": keywords["RADZP_P1"][0]}
    calibrated = keywords.get("PHOTCAL", (False,))[0]
    band = keywords["PHOTBAND"][0] if calibrated else None
    photcalib = None
    if calibrated:
        # Plain arrays of only the columns the plots use: slicing an astropy table costs
    # a millisecond per column, and the plots slice them per OTA.
        photcalib = by_name["CAT.PHOTCALIB"][list(podi_plots.PHOTCALIB_COLUMNS)
                                             + [f"REF_MAG_{band.upper()}"]].as_array()
    return podi_plots.QAData(
        obsid=str(first_header.get("OBSID", "")), object_name=str(first_header.get("OBJECT", "")),
        filter_name=normalised_filter_name(first_header), exptime=float(first_header.get("EXPTIME", 0.0)),
        matches=_columns(by_name.get("WCSCAL.CAT"), podi_plots.MATCH_COLUMNS),
        sources=_columns(by_name.get("CAT.ODI"), podi_plots.SOURCE_COLUMNS), outlines=outlines,
        photcalib=photcalib, band=band,
        zeropoint=keywords["PHOTZP"][0] if calibrated else None,
        zeropoint_sd=keywords["PHOTZPSD"][0] if calibrated else None, radial=radial,
        quicklook={ota: result.quicklook for ota, result in results.items() if result.quicklook is not None},
        failed=dict(failures), binning=binning,
        bunit=str(next(iter(results.values())).header.get("BUNIT", "ADU")))
