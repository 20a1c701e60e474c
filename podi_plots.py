"""QA plots of one reduced frame: the focal plane, astrometry, seeing, zero point.

The caller collects what the plots show into a small picklable :class:`QAData`.
:func:`make_plots` asks :func:`plots_to_make` which plots exist for it, names their
files with :func:`qa_paths` and renders them (:func:`render`) in worker processes. A
plot that fails is logged and skipped: QA plots never cost a reduced frame.

Plot kinds: ``preview`` (the focal plane, binned, zscale), ``sky`` (sky level of
every cell), and the original's ``wcs1`` (WCS scatter), ``wcs2`` (WCS shift map),
``seeing`` (PSF FWHM map), ``photZP`` (zero point against reference magnitude),
``photZP_map`` (zero-point map) and ``photZP_radial`` (zero point against distance
from a centre). Each kind draws the whole focal plane (``draw(figure, data, ota)``
with ``ota=None``); ``wcs1``, ``wcs2``, ``seeing`` and ``photZP_map`` also draw one
OTA: on a panel of a figure of all OTAs (*small multiples*, variant :data:`PANELS`,
the default) or on a figure of its own (``-otalevelplots``).

Figures are bare :class:`matplotlib.figure.Figure` objects saved through the Agg (or
the format's own) canvas: no pyplot state, so nothing leaks between plots.

Units: positions and distances in degrees, astrometric offsets in arcsec (RA offsets
times cos Dec), magnitudes and zero points in mag, pixel values in the frame's BUNIT.
Orientation: sky maps have east left and north up; the focal-plane figures
(``preview``, ``sky`` and the panels) are drawn the same way round, mirrored where
the frame's WCS says so (:func:`east_left`).
"""

import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse, Polygon, Rectangle
from matplotlib.ticker import MaxNLocator

from podi_ipprefcat import filled
from podi_mef import replaced_atomically
from podi_preview import focal_plane_mosaic
from podi_sphere import angular_distance, wrap_180

logger = logging.getLogger("podi_plots")

#: Figure size (inches) and resolution (dots per inch): 800 x 600 pixels in png, as the
#: original's.
PLOT_SIZE = (8, 6)
DPI = 100
#: Options of savefig per file type: the fastest PNG compression takes a third of the
#: time of the default and, for these figures, makes files of about the same size.
SAVE_OPTIONS = {".png": {"pil_kwargs": {"compress_level": 1}}}
#: The variant of a per-OTA plot kind that shows every OTA on a panel of one figure.
PANELS = "otas"
#: Small multiples: side of a panel (inches) at most, the figure's width at most,
#: and the margins (inches) for the title (top) and the colour bar (right).
PANEL_SIDE = 3.0
PANELS_WIDTH = 10.0
PANELS_TOP, PANELS_RIGHT = 0.7, 1.0
#: Preview: margins (inches) around the focal plane: left/right, bottom, top (title);
#: the figure is at least as wide as its title and legend.
PREVIEW_MARGINS = (0.3, 0.6, 0.6)
PREVIEW_MIN_WIDTH = 6.0
#: Preview colours (RGB 0-1) of saturated and undefined pixels, and of a failed OTA.
SATURATED_COLOUR = (1.0, 0.1, 0.1)
UNDEFINED_COLOUR = (0.25, 0.45, 1.0)
FAILED_COLOUR = "darkorange"
#: Sky map of the cells: colours span the median +- the larger distance to these
#: percentiles of all cells, so that one bad cell is off the scale and stands out, but
#: at least +- this fraction of the median, so that noise does not look like structure.
SKY_PERCENTILES = (2, 98)
SKY_MIN_RANGE = 0.005
SKY_COLOURS = "RdBu_r"

#: The WCS plots need more matched pairs than this (as in the original).
MIN_WCS_MATCHES = 3
#: The WCS scatter plot spans +- this many times the overall rms offset (rounded up
#: to 1, 2 or 5 x 10^k arcsec), and its histogram has this many bins per axis.
WCS_RMS_RANGE = 4.0
WCS_BINS = 60
#: Offset profiles: kernel bandwidth factor, fewest points that get one, height as a
#: fraction of the axis.
PROFILE_BANDWIDTH = 0.1
MIN_PROFILE_POINTS = 6
PROFILE_HEIGHT = 0.15
#: Margin (deg) of the sky maps around the stars and OTA outlines.
SKY_MARGIN = 0.02
#: WCS shift map: the key arrow, about twice the rms offset (rounded to 1, 2 or 5 x 10^k
#: arcsec), is drawn this fraction of the smaller sky extent long.
ARROW_FRACTION = 0.1
ARROW_RMS = 2.0
#: Colour range of the seeing map: these percentiles of all clean sources' FWHM.
FWHM_PERCENTILES = (5, 95)
#: Half ranges (mag) of the zero-point plot's y axis and of the zero-point map's colours.
ZP_RANGE = 0.5
ZP_MAP_RANGE = 0.2
#: Reference magnitudes (mag) the zero-point plot shows at least.
MAG_RANGE = (11.0, 21.0)
#: Zero-point histogram: bin width (mag) is this fraction of the scatter, at least the
#: minimum; its peak reaches this fraction of the x axis.
ZP_BIN_SIGMA = 0.2
ZP_MIN_BIN = 0.05
ZP_HISTOGRAM_WIDTH = 0.25
#: Radial zero-point plot: half range (mag) of the y axes, distances (deg) shown.
RADIAL_ZP_RANGE = 0.3
RADIAL_DISTANCES = (-0.02, 0.6)

#: Marker size (points) of point plots: small, since a frame has thousands of sources.
MARKER = 2
#: Colour maps: marker area (points^2) is this divided by the number of points, within
#: the limits, so that a few calibration stars show as well as thousands of sources.
MAP_MARKER_AREA = 3000.0
MAP_MARKER_LIMITS = (4.0, 25.0)
POINT_DENSITY_COLOURS = LinearSegmentedColormap.from_list("white_blue", ["white", "blue"])
#: Colours of the seeing and zero-point maps (matplotlib's successor of 'spectral').
MAP_COLOURS = "Spectral_r"
TEXT_BOX = {"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"}


#: The columns of the catalogs the plots use (``photcalib`` also ``REF_MAG_<B>``).
MATCH_COLUMNS = ("ODI_RA", "ODI_DEC", "REF_RA", "REF_DEC", "OTA")
SOURCE_COLUMNS = ("RA", "DEC", "FWHM_WORLD", "FLAGS", "OTA")
PHOTCALIB_COLUMNS = ("ODI_RA", "ODI_DEC", "OTA", "ZP", "ZP_ERR", "ZP_USED", "ODI_ERR_30")


@dataclass
class QAData:
    """What the QA plots of one frame show, collected by the caller.

    Picklable and small: it is handed to the worker processes. Catalogs are astropy
    tables or numpy structured arrays (faster to slice).

    Attributes
    ----------
    obsid, object_name, filter_name : str
        Header ``OBSID``, ``OBJECT`` and ``FILTER``.
    exptime : float
        ``EXPTIME`` (s).
    matches : astropy.table.Table or numpy.ndarray or None
        ``WCSCAL.CAT``: ``ODI_RA ODI_DEC REF_RA REF_DEC`` (deg), ``OTA``; None without
        ``-fixwcs``.
    sources : astropy.table.Table or numpy.ndarray or None
        ``CAT.ODI``: ``RA DEC`` (deg), ``FWHM_WORLD`` (deg), ``FLAGS``, ``OTA``.
    outlines : dict
        OTA number -> (4, 2) array of the OTA's corners (RA, Dec in deg) in order around it.
    photcalib : astropy.table.Table or numpy.ndarray or None
        ``CAT.PHOTCALIB``: ``ODI_RA ODI_DEC`` (deg), ``OTA``, ``ZP ZP_ERR`` (mag),
        ``ZP_USED``, ``REF_MAG_<B>`` (mag, B the band upper case), ``ODI_ERR_30`` (mag);
        None unless the zero point was determined.
    band : str or None
        Reference band letter, e.g. ``"r"``.
    zeropoint, zeropoint_sd : float or None
        ``PHOTZP`` and ``PHOTZPSD`` (mag).
    radial : dict or None
        The radial zero-point fit: ``{"centre": (ra, dec) deg, "p0": mag, "p1": mag/deg}``.
    quicklook : dict
        OTA number -> :class:`podi_preview.QuickLook` of every reduced OTA.
    failed : dict
        OTA number -> why it failed (one line), for the OTAs that were not reduced.
    binning : int
        Binning of the data.
    bunit : str
        Unit of the pixel values.
    """

    obsid: str
    object_name: str
    filter_name: str
    exptime: float
    matches: object = None
    sources: object = None
    outlines: dict = field(default_factory=dict)
    photcalib: object = None
    band: str | None = None
    zeropoint: float | None = None
    zeropoint_sd: float | None = None
    radial: dict | None = None
    quicklook: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    binning: int = 1
    bunit: str = "ADU"

    @property
    def otas(self):
        """Every OTA the frame was asked for: reduced or failed."""
        return sorted(set(self.outlines) | set(self.quicklook) | set(self.failed))


# --- File names ----------------------------------------------------------------------------

def frame_stem(output):
    """The output file name without ``.fits`` or ``.fits.fz`` (any other name unchanged)."""
    name = Path(output).name
    for suffix in (".fits.fz", ".fits"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def qa_paths(output, plot, formats, qasubdirs=False, qasubdirname="QA", ota=None):
    """Files of one QA plot, one per format (the original's names and folders).

    Parameters
    ----------
    output : str or pathlib.Path
        The reduced frame's file name.
    plot : str
        Plot name, e.g. ``"wcs1"``.
    formats : sequence of str
        File formats (extensions), e.g. ``("png", "pdf")``.
    qasubdirs : bool
        Write into ``<dir of output>/<qasubdirname>/`` instead of next to the frame.
    qasubdirname : str
        Name of that folder.
    ota : int or str, optional
        OTA number (xy) of a per-OTA variant, or :data:`PANELS` for the figure of all OTAs.

    Returns
    -------
    list of pathlib.Path
        ``<frame>.<plot>.<fmt>`` or ``<frame>.<plot>_OTAxy.<fmt>`` next to the frame;
        with ``qasubdirs`` ``<dir>/<qasubdirname>/<plot>.<fmt>`` or
        ``<dir>/<qasubdirname>/<plot>/OTAxy.<fmt>``. The figure of all OTAs is the
        plot ``<plot>_otas``.
    """
    output = Path(output)
    if ota == PANELS:
        plot, ota = f"{plot}_{PANELS}", None
    if qasubdirs:
        folder = output.parent / qasubdirname
        stem = folder / plot if ota is None else folder / plot / f"OTA{ota:02d}"
    else:
        name = plot if ota is None else f"{plot}_OTA{ota:02d}"
        stem = output.parent / f"{frame_stem(output)}.{name}"
    return [stem.parent / f"{stem.name}.{fmt}" for fmt in formats]


# --- Selections --------------------------------------------------------------------------------

def ota_mask(table, ota):
    """Boolean mask of a table's rows on one OTA (all rows for ``ota=None``)."""
    if ota is None:
        return np.ones(len(table), bool)
    return np.asarray(table["OTA"]) == ota


def reduced_otas(data):
    """The reduced OTAs (an ``OTA`` column) for the focal-plane figures; None without
    their quick-look measurements."""
    if not data.quicklook:
        return None
    return np.array([(ota,) for ota in sorted(data.quicklook)], dtype=[("OTA", "i4")])


def wcs_pairs(data):
    """The matched pairs the WCS plots show; None with too few for them."""
    matches = data.matches
    return matches if matches is not None and len(matches) > MIN_WCS_MATCHES else None


def clean_sources(data):
    """Unflagged sources of the seeing map; None where the WCS plots are not made."""
    if wcs_pairs(data) is None or data.sources is None:
        return None
    return data.sources[np.asarray(data.sources["FLAGS"]) == 0]


def calibration_stars(data):
    """Stars kept by the zero-point clipping (``ZP_USED``); None without a zero point.

    Raises
    ------
    ValueError
        If none of them has a finite zero point: every zero-point plot would be empty.
    """
    table = data.photcalib
    if table is None:
        return None
    stars = table[np.asarray(table["ZP_USED"], bool)]
    if len(stars) and not np.isfinite(filled(stars["ZP"])).any():
        raise ValueError("no finite zero point among the used stars")
    return stars


def radial_stars(data):
    """Calibration stars of the radial zero-point plot; None without a radial fit."""
    return calibration_stars(data) if data.radial is not None else None


# --- Astrometric offsets -----------------------------------------------------------------------

@dataclass(frozen=True)
class OffsetStatistics:
    """ODI - reference offsets of matched pairs, in arcsec (RA offsets times cos Dec).

    ``rms_ra``/``rms_dec`` are root mean squares about zero, as the header keywords
    ``WCS_RMSA``/``WCS_RMSD`` of :mod:`podi_fixwcs`, so the plots and the header agree.
    """

    n: int
    median_ra: float
    median_dec: float
    rms_ra: float
    rms_dec: float

    @property
    def rms(self):
        """Root mean square of the offset distances (arcsec), ``WCS_RMS``."""
        return math.hypot(self.rms_ra, self.rms_dec)


def sky_offsets(matches):
    """Offsets ODI - reference of matched pairs (arcsec): (dRA cos Dec, dDec).

    The RA difference is wrapped into +-180 deg (pairs across RA 0) and scaled by the
    cosine of the pair's mean Dec, as the original's WCS plots did.
    """
    odi_dec, ref_dec = filled(matches["ODI_DEC"]), filled(matches["REF_DEC"])
    d_ra = wrap_180(filled(matches["ODI_RA"]) - filled(matches["REF_RA"]))
    cos_dec = np.cos(np.radians(0.5 * (odi_dec + ref_dec)))
    return d_ra * cos_dec * 3600.0, (odi_dec - ref_dec) * 3600.0


def offset_statistics(matches, ota=None):
    """Median and rms offsets of matched pairs (arcsec), of all or of one OTA's pairs.

    Parameters
    ----------
    matches : astropy.table.Table
        ``WCSCAL.CAT`` (positions in deg).
    ota : int, optional
        Only this OTA's pairs.

    Returns
    -------
    OffsetStatistics
    """
    d_ra, d_dec = sky_offsets(matches[ota_mask(matches, ota)])
    return OffsetStatistics(n=len(d_ra), median_ra=float(np.median(d_ra)),
                            median_dec=float(np.median(d_dec)),
                            rms_ra=float(np.sqrt(np.mean(d_ra**2))),
                            rms_dec=float(np.sqrt(np.mean(d_dec**2))))


# --- Shared pieces of the plots -------------------------------------------------------------

def plot_title(data, what, ota):
    """Two-line title: what, OBSID and where (focal plane or OTA); object, filter, exposure time."""
    where = "(focal-plane)" if ota is None else f"- OTA {ota:02d}"
    return (f"{what} - {data.obsid} {where}\n"
            f"{data.object_name} - {data.filter_name} - {data.exptime:g}sec")


def unwrap_ra(ra, reference):
    """RA (deg) made continuous around a reference RA (deg): a frame across RA 0 stays whole."""
    return reference + wrap_180(np.asarray(ra, float) - reference)


def sky_map(ax, data, ota, ra, dec):
    """Set up axes as a sky map of points and the selected OTAs' outlines (grey).

    RA (deg) increases to the left (east left, as on the sky), Dec (deg) up; the limits
    cover the points and outlines with :data:`SKY_MARGIN`, and a degree of RA is drawn
    cos(Dec) times as long as one of Dec, so that the map is not stretched.

    Returns
    -------
    ndarray
        The points' RA (deg) unwrapped as drawn.
    """
    outlines = [corners for number, corners in sorted(data.outlines.items())
                if ota is None or number == ota]
    ra, dec = filled(ra), filled(dec)
    reference = outlines[0][0, 0] if outlines else float(np.nanmedian(ra))
    x, y = [unwrap_ra(ra, reference)], [dec]
    for corners in outlines:
        x.append(unwrap_ra(corners[:, 0], reference))
        y.append(np.asarray(corners[:, 1], float))
        ax.add_patch(Polygon(np.column_stack([x[-1], y[-1]]), closed=True, fill=False,
                             edgecolor="grey", linewidth=1))
    x, y = np.concatenate(x), np.concatenate(y)
    ax.set_xlim(np.nanmax(x) + SKY_MARGIN, np.nanmin(x) - SKY_MARGIN)
    ax.set_ylim(np.nanmin(y) - SKY_MARGIN, np.nanmax(y) + SKY_MARGIN)
    ax.set_aspect(1.0 / math.cos(math.radians(np.mean(ax.get_ylim()))))
    return x[:len(ra)]


def label_sky_axes(ax, data, ota, what):
    """Axis labels, few RA ticks and the title of a full-size sky map."""
    # Few RA ticks: labels such as 150.075 are wide and would run into each other.
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set(xlabel="RA [deg]", ylabel="Dec [deg]", title=plot_title(data, what, ota))


def colour_points(ax, data, ota, ra, dec, values, value_range):
    """Points (deg) on a sky map coloured by a value within value_range; returns them."""
    x = sky_map(ax, data, ota, ra, dec)
    area = np.clip(MAP_MARKER_AREA / max(len(x), 1), *MAP_MARKER_LIMITS)
    # A thin dark edge: the middle of the colour map is pale yellow, invisible on white.
    return ax.scatter(x, filled(dec), c=filled(values), s=area, cmap=MAP_COLOURS,
                      vmin=value_range[0], vmax=value_range[1], linewidths=0.2,
                      edgecolors="0.3", rasterized=True)


def draw_colour_map(figure, draw_points, data, ota, label, what):
    """A full-size colour map: ``draw_points(ax, data, ota)`` on one axes, its colour
    bar (``label``), axis labels and title."""
    ax = figure.add_subplot()
    figure.colorbar(draw_points(ax, data, ota), ax=ax, label=label)
    label_sky_axes(ax, data, ota, what)


# --- wcs1: WCS scatter -----------------------------------------------------------------------------

def density_profile(values, grid):
    """Gaussian kernel density estimate of values on a grid, scaled to a peak of 1.

    The kernel's width is :data:`PROFILE_BANDWIDTH` times the values' standard
    deviation (scipy's ``gaussian_kde(bw_method=0.1)``; scipy.stats itself would cost
    half a second of loading).
    """
    values = np.asarray(values, float)
    width = PROFILE_BANDWIDTH * values.std(ddof=1)
    if not width > 0:
        return np.zeros_like(grid)
    density = np.exp(-0.5 * ((grid[:, None] - values[None, :]) / width) ** 2).sum(axis=1)
    return density / density.max() if density.max() > 0 else density


def nice_ceiling(value):
    """The smallest of 1, 2 or 5 x 10^k at least ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value * (1 - 1e-9))


def wcs_half_range(stats):
    """Half width (arcsec) of the WCS scatter plot: :data:`WCS_RMS_RANGE` x the rms offset,
    rounded up; at least 0.01"."""
    return nice_ceiling(max(WCS_RMS_RANGE * stats.rms, 0.01))


def draw_offset_profiles(ax, d_ra, d_dec, half_range):
    """Density profiles (arcsec) of the RA offsets hanging from the top edge and of the
    Dec offsets standing on the left edge of the scatter plot."""
    grid = np.linspace(-half_range, half_range, 241)
    height = PROFILE_HEIGHT * 2 * half_range
    ax.plot(grid, half_range - height * density_profile(d_ra, grid), color="navy", lw=1)
    ax.plot(-half_range + height * density_profile(d_dec, grid), grid, color="navy", lw=1)


def draw_offset_ellipse(ax, stats, colour):
    """Ellipse at the median offset, 2 rms wide and high (arcsec)."""
    ax.add_patch(Ellipse((stats.median_ra, stats.median_dec), 2 * stats.rms_ra,
                         2 * stats.rms_dec, fill=False, edgecolor=colour, linewidth=1.5))


def draw_offset_summary(ax, stats, label, colour, side):
    """The statistics (arcsec) in a text box in the lower corner on ``side`` ("left"
    or "right")."""
    text = (f"{label} (N={stats.n})\n"
            f"median offset: {stats.median_ra:+.3f}\" / {stats.median_dec:+.3f}\"\n"
            f"RMS RA/Dec: {stats.rms_ra:.3f}\" / {stats.rms_dec:.3f}\"\n"
            f"RMS: {stats.rms:.3f}\"")
    ax.text(0.03 if side == "left" else 0.97, 0.03, text, transform=ax.transAxes, ha=side,
            va="bottom", fontsize=8, color=colour, bbox=TEXT_BOX)


def wcs_scatter_axes(ax, data, ota):
    """Offsets of matched pairs (arcsec) over their 2-D histogram, with profiles and the
    ellipses of the overall (red) and the OTA's (blue) median offsets and rms; the
    range is the same for every OTA (:func:`wcs_half_range`). Returns the histogram."""
    d_ra, d_dec = sky_offsets(data.matches[ota_mask(data.matches, ota)])
    half_range = wcs_half_range(offset_statistics(data.matches))
    extent = (-half_range, half_range)
    counts, _, _ = np.histogram2d(d_ra, d_dec, bins=WCS_BINS, range=[extent, extent])
    image = ax.imshow(counts.T, origin="lower", extent=extent + extent,
                      cmap=POINT_DENSITY_COLOURS, interpolation="nearest")
    ax.plot(d_ra, d_dec, "b.", markersize=MARKER, rasterized=True)
    if len(d_ra) >= MIN_PROFILE_POINTS:
        draw_offset_profiles(ax, d_ra, d_dec, half_range)
    draw_offset_ellipse(ax, offset_statistics(data.matches), "red")
    if ota is not None and len(d_ra):
        draw_offset_ellipse(ax, offset_statistics(data.matches, ota), "blue")
    ax.set(xlim=extent, ylim=extent, aspect="equal")
    return image


def draw_wcs_scatter(figure, data, ota):
    """``wcs1``: :func:`wcs_scatter_axes` with its colour bar, the statistics, the
    range and the labels."""
    ax = figure.add_subplot()
    figure.colorbar(wcs_scatter_axes(ax, data, ota), ax=ax, label="point density")
    draw_offset_summary(ax, offset_statistics(data.matches), "Overall WCS", "red", "right")
    if ota is not None:
        draw_offset_summary(ax, offset_statistics(data.matches, ota), "This OTA", "blue", "left")
    half_range = wcs_half_range(offset_statistics(data.matches))
    ax.set(xlabel="error RA * cos(Dec) [arcsec]", ylabel="error Dec [arcsec]",
           title=plot_title(data, "WCS Scatter", ota))
    ax.text(0.03, 0.97, f'range +-{half_range:g}" ({WCS_RMS_RANGE:g} x rms)', transform=ax.transAxes,
            ha="left", va="top", fontsize=8, bbox=TEXT_BOX)
    ax.grid(True)


# --- wcs2: WCS shift map ----------------------------------------------------------------------

def wcs_arrow_key(data):
    """Offset (arcsec) of the key arrow: :data:`ARROW_RMS` x the rms offset, rounded up."""
    return nice_ceiling(max(ARROW_RMS * offset_statistics(data.matches).rms, 0.001))


def arrow_length(ax, data):
    """Degrees of a sky map (along Dec) per arcsec of offset: the key arrow is
    :data:`ARROW_FRACTION` of the map's smaller extent."""
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    extent = min(abs(xlim[1] - xlim[0]) / ax.get_aspect(), ylim[1] - ylim[0])
    return ARROW_FRACTION * extent / wcs_arrow_key(data)


def wcs_errors_axes(ax, data, ota):
    """Matched stars on a sky map (red) with their offset vectors (black arrows): an
    arrow of :func:`wcs_arrow_key` is :data:`ARROW_FRACTION` of the map's smaller
    extent. Returns the arrows."""
    pairs = data.matches[ota_mask(data.matches, ota)]
    d_ra, d_dec = sky_offsets(pairs)
    x = sky_map(ax, data, ota, pairs["ODI_RA"], pairs["ODI_DEC"])
    dec = filled(pairs["ODI_DEC"])
    ax.plot(x, dec, "r.", markersize=MARKER, rasterized=True)
    # sky_map set the aspect to 1/cos(Dec): RA steps stretched by it have their sky length.
    stretch, length = ax.get_aspect(), arrow_length(ax, data)
    return ax.quiver(x, dec, d_ra * length * stretch, d_dec * length, angles="xy",
                     scale_units="xy", scale=1, width=0.002, color="black")


def draw_wcs_errors(figure, data, ota):
    """``wcs2``: :func:`wcs_errors_axes` with its key arrow and labels."""
    ax = figure.add_subplot()
    arrows = wcs_errors_axes(ax, data, ota)
    key = wcs_arrow_key(data)
    ax.quiverkey(arrows, 0.12, 0.94, key * arrow_length(ax, data) * ax.get_aspect(), f'{key:g}"',
                 labelpos="E", coordinates="axes")
    label_sky_axes(ax, data, ota, "WCS Errors")


# --- seeing: PSF FWHM map ----------------------------------------------------------------------

def seeing_axes(ax, data, ota):
    """Unflagged sources on a sky map coloured by FWHM (arcsec); the colour range comes
    from all sources, so that every OTA uses the same colours. Returns the points."""
    sources = clean_sources(data)
    fwhm = filled(sources["FWHM_WORLD"]) * 3600.0
    mine = ota_mask(sources, ota)
    return colour_points(ax, data, ota, sources["RA"][mine], sources["DEC"][mine], fwhm[mine],
                         np.nanpercentile(fwhm, FWHM_PERCENTILES))


def draw_seeing(figure, data, ota):
    """``seeing``: PSF FWHM map (:func:`seeing_axes`)."""
    draw_colour_map(figure, seeing_axes, data, ota, "FWHM [arcsec]", "Seeing")


# --- photZP: zero point against reference magnitude --------------------------------------------

def magnitude_range(magnitudes):
    """x range (mag) of the zero-point plot: :data:`MAG_RANGE`, widened to whole
    magnitudes covering the data."""
    finite = magnitudes[np.isfinite(magnitudes)]
    return (min(MAG_RANGE[0], math.floor(finite.min())),
            max(MAG_RANGE[1], math.ceil(finite.max())))


def draw_zeropoint_histogram(ax, zeropoints, centre, sigma, left, width):
    """Horizontal histogram of zero points (mag) growing from x = left, its peak ``width``
    long, and the Gaussian (centre, sigma in mag) of the same area on the same scale."""
    bin_width = max(ZP_BIN_SIGMA * sigma, ZP_MIN_BIN)
    half = math.ceil(ZP_RANGE / bin_width)
    # Bins centred on the zero point, so that the Gaussian peaks in the middle of one.
    edges = centre + bin_width * np.arange(-half - 0.5, half + 1)
    counts, _ = np.histogram(zeropoints, edges)
    scale = width / max(counts.max(), 1)
    ax.barh(edges[:-1], counts * scale, height=bin_width, left=left, align="edge",
            color="green", alpha=0.4)
    y = np.linspace(edges[0], edges[-1], 200)
    expected = (np.isfinite(zeropoints).sum() * bin_width / (math.sqrt(2 * math.pi) * sigma)
                * np.exp(-0.5 * ((y - centre) / sigma) ** 2))
    ax.plot(left + scale * expected, y, color="green", lw=1)


def draw_zeropoint(figure, data, ota):
    """``photZP``: each star's zero point against its reference magnitude (mag), kept stars
    blue with error bars, clipped ones red; the zero point +- its scatter as a grey band
    and the kept stars' histogram. Full frame only (``ota`` is not used)."""
    table = data.photcalib
    used = np.asarray(table["ZP_USED"], bool)
    magnitude = filled(table[f"REF_MAG_{data.band.upper()}"])
    zeropoint = filled(table["ZP"])
    centre, sigma = data.zeropoint, data.zeropoint_sd
    ax = figure.add_subplot()
    ax.axhspan(centre - sigma, centre + sigma, color="grey", alpha=0.3, linewidth=0)
    ax.errorbar(magnitude[used], zeropoint[used], xerr=filled(table["ODI_ERR_30"])[used],
                yerr=filled(table["ZP_ERR"])[used], fmt="b+", markersize=5, elinewidth=0.5,
                capsize=0)
    ax.plot(magnitude[~used], zeropoint[~used], "r+", markersize=5)
    xlim = magnitude_range(magnitude)
    draw_zeropoint_histogram(ax, zeropoint[used], centre, sigma, xlim[0],
                             ZP_HISTOGRAM_WIDTH * (xlim[1] - xlim[0]))
    ax.text(0.97, 0.95, f"ZP = {centre:.3f} \u00b1 {sigma:.3f} mag", transform=ax.transAxes,
            ha="right", va="top", bbox=TEXT_BOX)
    ax.set(xlim=xlim, ylim=(centre - ZP_RANGE, centre + ZP_RANGE),
           xlabel=f"reference magnitude in {data.band}",
           ylabel=f"zero point (ref [{data.band}] - odi [{data.filter_name}])",
           title=plot_title(data, "Photometric zero point", None))


# --- photZP_map: zero-point map ----------------------------------------------------------------

def zeropoint_map_axes(ax, data, ota):
    """Kept calibration stars on a sky map coloured by zero point, within the frame's
    zero point +- :data:`ZP_MAP_RANGE` (mag). Returns the points."""
    stars = calibration_stars(data)
    mine = stars[ota_mask(stars, ota)]
    return colour_points(ax, data, ota, mine["ODI_RA"], mine["ODI_DEC"], mine["ZP"],
                         (data.zeropoint - ZP_MAP_RANGE, data.zeropoint + ZP_MAP_RANGE))


def draw_zeropoint_map(figure, data, ota):
    """``photZP_map``: zero-point map (:func:`zeropoint_map_axes`)."""
    draw_colour_map(figure, zeropoint_map_axes, data, ota, "phot. zero point [mag]",
                    "Photometric zero point map")


# --- photZP_radial: zero point against distance from a centre ---------------------------------

def draw_radial_panel(ax, distance, zeropoint, style, label):
    """Zero points (mag) against distance (deg) in one panel, y range around their median."""
    middle = float(np.nanmedian(zeropoint))
    ax.plot(distance, zeropoint, style, markersize=4)
    ax.set(xlim=RADIAL_DISTANCES, ylim=(middle - RADIAL_ZP_RANGE, middle + RADIAL_ZP_RANGE),
           ylabel=label)
    ax.grid(True)


def draw_radial_zeropoint(figure, data, ota):
    """``photZP_radial``: kept stars' zero points against their distance from the radial
    fit's centre, before (top, red) and after (bottom, blue) subtracting p0 + p1 r.
    Full frame only (``ota`` is not used)."""
    stars = calibration_stars(data)
    distance = angular_distance(filled(stars["ODI_RA"]), filled(stars["ODI_DEC"]),
                                *data.radial["centre"])
    zeropoint = filled(stars["ZP"])
    before, after = figure.subplots(2, 1, sharex=True)
    draw_radial_panel(before, distance, zeropoint, "r+", "zero point [mag]")
    draw_radial_panel(after, distance,
                      zeropoint - (data.radial["p0"] + data.radial["p1"] * distance), "b.",
                      "zero point - radial fit [mag]")
    before.set_title(plot_title(data, "Radial zero point", None))
    after.set_xlabel("distance from centre [deg]")


# --- Focal-plane figures: preview, sky, panels of all OTAs -------------------------------

def sky_orientation(data):
    """Whether the focal-plane figures are mirrored in x and in y to show east left and
    north up: x where RA grows with the OTAs' pixel x, y where Dec falls with pixel y
    (judged from the OTA outlines: pixel (0, 0), (n, 0) and (0, n) are corners 0, 1, 3).
    """
    corners = list(data.outlines.values())
    if not corners:
        return False, False
    ra_step = np.median([wrap_180(c[1, 0] - c[0, 0]) for c in corners])
    dec_step = np.median([c[3, 1] - c[0, 1] for c in corners])
    return bool(ra_step > 0), bool(dec_step < 0)


def orient(ax, width, height, data, margin=0.0):
    """Limits (0..width, 0..height, widened by margin) of a focal-plane figure, mirrored
    as :func:`sky_orientation` says."""
    flip_x, flip_y = sky_orientation(data)
    x, y = (-margin, width + margin), (-margin, height + margin)
    ax.set_xlim(x[::-1] if flip_x else x)
    ax.set_ylim(y[::-1] if flip_y else y)


def focal_plane_title(data, what):
    """Two-line title of a focal-plane figure."""
    return (f"{what} - {data.obsid}\n{data.object_name} - {data.filter_name} - "
            f"{data.exptime:g}sec (N up, E left)")


def mark_failed(ax, box, ota, data, fontsize=9):
    """Hatch a failed OTA's box (mosaic pixels) and say so."""
    x0, y0, size = box
    ax.add_patch(Rectangle((x0, y0), size, size, fill=False, hatch="//", edgecolor=FAILED_COLOUR,
                           linewidth=1.5))
    ax.text(x0 + size / 2, y0 + size / 2, f"OTA {ota:02d}\nfailed", ha="center", va="center",
            fontsize=fontsize, color=FAILED_COLOUR, weight="bold", bbox=TEXT_BOX)


def preview_colours(mosaic, inside):
    """RGB image (0-1) of a mosaic: zscale grey, saturated and undefined pixels coloured,
    white outside the reduced OTAs; and the zscale limits (BUNIT)."""
    from astropy.visualization import ZScaleInterval
    image = mosaic.image
    finite = image[np.isfinite(image)]
    low, high = ZScaleInterval().get_limits(finite) if finite.size else (0.0, 1.0)
    grey = np.clip((image - low) / max(high - low, 1e-30), 0.0, 1.0)
    rgb = np.repeat(np.nan_to_num(grey, nan=1.0)[..., None], 3, axis=2)
    rgb[inside & np.isnan(image)] = UNDEFINED_COLOUR
    rgb[mosaic.saturated] = SATURATED_COLOUR
    return rgb, (float(low), float(high))


def draw_preview(figure, data, ota):
    """``preview``: the reduced OTAs in their places in the focal plane, one pixel per
    pixel of the binned previews (:mod:`podi_preview`), zscale grey; saturated pixels
    red, undefined ones blue, failed OTAs hatched. Full frame only."""
    block = next(iter(data.quicklook.values())).block
    mosaic = focal_plane_mosaic(data.quicklook, data.otas, data.binning, block)
    height, width = mosaic.image.shape
    inside = np.zeros(mosaic.image.shape, bool)
    for number in data.quicklook:
        x0, y0, size = mosaic.boxes[number]
        inside[y0:y0 + size, x0:x0 + size] = True
    rgb, (low, high) = preview_colours(mosaic, inside)
    side, bottom, top = PREVIEW_MARGINS
    size = (max(width / DPI + 2 * side, PREVIEW_MIN_WIDTH), height / DPI + bottom + top)
    figure.set_size_inches(*size)
    left = (size[0] - width / DPI) / 2
    ax = figure.add_axes([left / size[0], bottom / size[1], width / DPI / size[0], height / DPI / size[1]])
    ax.imshow(rgb, origin="lower", interpolation="nearest", extent=(0, width, 0, height))
    orient(ax, width, height, data)
    ax.set_axis_off()
    for number, (x0, y0, box) in mosaic.boxes.items():
        if number in data.failed:
            mark_failed(ax, (x0, y0, box), number, data)
        ax.text(x0 + 0.03 * box, y0 + 0.97 * box, f"{number:02d}", ha="right" if ax.xaxis_inverted() else "left",
                va="top", fontsize=8, bbox=TEXT_BOX)
    figure.text(0.5, 1 - 0.08 / size[1], focal_plane_title(data, "Preview"), ha="center", va="top")
    figure.text(0.5, 0.08 / size[1],
                f"zscale {low:.4g} .. {high:.4g} {data.bunit}; a pixel is the mean of "
                f"{block * data.binning}x{block * data.binning} unbinned px\n"
                "red: saturated;  blue: undefined;  hatched: failed OTA",
                ha="center", va="bottom", fontsize=9)


def draw_sky(figure, data, ota):
    """``sky``: the sky level of every cell (:class:`podi_preview.QuickLook` ``cell_sky``)
    in its place in the focal plane, colours centred on the median; OTA outlines,
    failed OTAs hatched. Full frame only."""
    block = next(iter(data.quicklook.values())).block
    boxes = focal_plane_mosaic({}, data.otas, data.binning, block).boxes
    levels = np.concatenate([look.cell_sky.ravel() for look in data.quicklook.values()])
    levels = levels[np.isfinite(levels)]
    median = float(np.median(levels)) if levels.size else 0.0
    low, high = np.percentile(levels, SKY_PERCENTILES) if levels.size else (median, median)
    half = max(median - low, high - median, SKY_MIN_RANGE * abs(median), 1e-30)
    ax = figure.add_subplot()
    image = None
    for number, (x0, y0, size) in boxes.items():
        if number in data.quicklook:
            image = ax.imshow(data.quicklook[number].cell_sky, origin="lower", interpolation="nearest",
                              extent=(x0, x0 + size, y0, y0 + size), cmap=SKY_COLOURS,
                              vmin=median - half, vmax=median + half)
            ax.add_patch(Rectangle((x0, y0), size, size, fill=False, edgecolor="black", linewidth=1))
            ax.text(x0 + size / 2, y0 + size / 2, f"{number:02d}", ha="center", va="center",
                    fontsize=8, alpha=0.7)
        elif number in data.failed:
            mark_failed(ax, (x0, y0, size), number, data, fontsize=7)
    width = max(x + size for x, _, size in boxes.values())
    height = max(y + size for _, y, size in boxes.values())
    # A margin: outlines on the limits would be cut in half.
    orient(ax, width, height, data, margin=0.01 * max(width, height))
    ax.set_aspect("equal")
    ax.set_axis_off()
    if image is not None:
        figure.colorbar(image, ax=ax, label=f"sky level [{data.bunit}]")
    ax.set_title(focal_plane_title(data, "Sky level per cell"))
    ax.text(0.5, -0.02, f"median {median:.4g} {data.bunit}; colours +-{half:.3g} "
            f"({100 * half / abs(median) if median else 0:.2g} %)", transform=ax.transAxes,
            ha="center", va="top", fontsize=9)


# --- Small multiples: one panel per OTA -------------------------------------------------------
#
# All panels share one axes whose unit is a panel: OTA ``ota`` fills the square
# (column, row) .. (column + 1, row + 1) of :func:`panel_grid` less a margin. One
# axes draws thirteen panels at the cost of one plot; axes of their own, with their
# ticks, would cost ten times as much.

#: Margin of a panel's content inside its square, and the height of the line of text
#: above it (both in panels).
PANEL_MARGIN = 0.04
PANEL_TEXT = 0.12
#: A panel's key arrow is this fraction of the panel (a tenth would be a few pixels).
PANEL_ARROW_FRACTION = 0.25


@dataclass(frozen=True)
class PanelBox:
    """Where one OTA's panel is: the lower left corner (column, row) of its square and
    the side (in panels) of the square its content may fill, centred below the text."""

    column: float
    row: float

    @property
    def side(self):
        return 1.0 - 2 * PANEL_MARGIN - PANEL_TEXT

    @property
    def centre(self):
        return self.column + 0.5, self.row + PANEL_MARGIN + self.side / 2


def panel_grid(data):
    """Where each OTA's panel goes: a grid that follows the focal plane, mirrored as
    :func:`sky_orientation` says.

    Returns
    -------
    (dict, int, int)
        OTA -> :class:`PanelBox`, and the numbers of columns and rows.
    """
    otas = data.otas
    columns = [ota // 10 for ota in otas]
    rows = [ota % 10 for ota in otas]
    n_columns, n_rows = max(columns) - min(columns) + 1, max(rows) - min(rows) + 1
    flip_x, flip_y = sky_orientation(data)
    grid = {}
    for ota, column, row in zip(otas, columns, rows):
        column, row = column - min(columns), row - min(rows)
        grid[ota] = PanelBox(n_columns - 1 - column if flip_x else column,
                             n_rows - 1 - row if flip_y else row)
    return grid, n_columns, n_rows


def sky_to_panel(data, ota, box):
    """Map of sky positions (deg) into an OTA's panel: east left, north up, the OTA's
    outline filling the panel; returns ``to_panel(ra, dec) -> (u, v)`` and the panel
    units per degree."""
    corners = data.outlines[ota]
    reference = float(corners[0, 0])
    x = unwrap_ra(corners[:, 0], reference)
    y = np.asarray(corners[:, 1], float)
    cos_dec = math.cos(math.radians(np.mean(y)))
    centre_x, centre_y = np.mean(x), np.mean(y)
    scale = box.side / max(np.ptp(x) * cos_dec, np.ptp(y))
    u0, v0 = box.centre

    def to_panel(ra, dec):
        ra = unwrap_ra(filled(ra), reference)
        return (u0 - (ra - centre_x) * cos_dec * scale,
                v0 + (filled(dec) - centre_y) * scale)
    return to_panel, scale


def outline_panel(ax, data, ota, to_panel):
    """The OTA's outline (grey) in its panel."""
    u, v = to_panel(data.outlines[ota][:, 0], data.outlines[ota][:, 1])
    ax.add_patch(Polygon(np.column_stack([u, v]), closed=True, fill=False, edgecolor="grey", linewidth=0.8))


def wcs_scatter_panel(ax, data, ota, box):
    """``wcs1`` of one OTA: its pairs' offsets (blue) within the frame-wide range of
    :func:`wcs_half_range`, the ellipses of all (red) and its own (blue) offsets."""
    overall = offset_statistics(data.matches)
    scale = box.side / (2 * wcs_half_range(overall))
    u0, v0 = box.centre
    d_ra, d_dec = sky_offsets(data.matches[ota_mask(data.matches, ota)])
    ax.plot(u0 + d_ra * scale, v0 + d_dec * scale, "b.", markersize=MARKER, rasterized=True)
    for stats, colour in ((overall, "red"), (offset_statistics(data.matches, ota), "blue")):
        ax.add_patch(Ellipse((u0 + stats.median_ra * scale, v0 + stats.median_dec * scale),
                             2 * stats.rms_ra * scale, 2 * stats.rms_dec * scale, fill=False,
                             edgecolor=colour, linewidth=1))
    ax.plot([u0 - box.side / 2, u0 + box.side / 2], [v0, v0], color="0.8", linewidth=0.5)
    ax.plot([u0, u0], [v0 - box.side / 2, v0 + box.side / 2], color="0.8", linewidth=0.5)


def wcs_errors_panel(ax, data, ota, box):
    """``wcs2`` of one OTA: its matched stars (red) with their offsets (arrows); an arrow
    of :func:`wcs_arrow_key` is :data:`PANEL_ARROW_FRACTION` of the panel."""
    to_panel, _ = sky_to_panel(data, ota, box)
    outline_panel(ax, data, ota, to_panel)
    pairs = data.matches[ota_mask(data.matches, ota)]
    u, v = to_panel(pairs["ODI_RA"], pairs["ODI_DEC"])
    d_ra, d_dec = sky_offsets(pairs)
    ax.plot(u, v, "r.", markersize=MARKER, rasterized=True)
    length = PANEL_ARROW_FRACTION * box.side / wcs_arrow_key(data)
    # East is left: a positive RA offset points to smaller u.
    ax.quiver(u, v, -d_ra * length, d_dec * length, angles="xy", scale_units="xy", scale=1,
              width=0.0015, color="black")


def colour_panel(ax, data, ota, box, ra, dec, values, value_range):
    """Points of one OTA in its panel coloured by values within value_range; returns them."""
    to_panel, _ = sky_to_panel(data, ota, box)
    outline_panel(ax, data, ota, to_panel)
    u, v = to_panel(ra, dec)
    return ax.scatter(u, v, c=filled(values), s=np.clip(MAP_MARKER_AREA / 4 / max(len(u), 1), 2, 12),
                      cmap=MAP_COLOURS, vmin=value_range[0], vmax=value_range[1], linewidths=0.2,
                      edgecolors="0.3", rasterized=True)


def seeing_panel(ax, data, ota, box):
    """``seeing`` of one OTA: unflagged sources coloured by FWHM (arcsec), the frame's range."""
    sources = clean_sources(data)
    fwhm = filled(sources["FWHM_WORLD"]) * 3600.0
    mine = ota_mask(sources, ota)
    return colour_panel(ax, data, ota, box, sources["RA"][mine], sources["DEC"][mine], fwhm[mine],
                        np.nanpercentile(fwhm, FWHM_PERCENTILES))


def zeropoint_map_panel(ax, data, ota, box):
    """``photZP_map`` of one OTA: kept calibration stars coloured by zero point (mag)."""
    stars = calibration_stars(data)
    mine = stars[ota_mask(stars, ota)]
    return colour_panel(ax, data, ota, box, mine["ODI_RA"], mine["ODI_DEC"], mine["ZP"],
                        (data.zeropoint - ZP_MAP_RANGE, data.zeropoint + ZP_MAP_RANGE))


def draw_panels(figure, data, plot):
    """Small multiples: one panel per OTA (``kind.panel``) in the focal-plane arrangement
    of :func:`panel_grid`, each framed with its OTA number and ``kind.panel_label``
    above it; one colour bar for colour maps and ``kind.note`` at the bottom."""
    kind = PLOTS[plot]
    grid, n_columns, n_rows = panel_grid(data)
    side = min(PANEL_SIDE, PANELS_WIDTH / n_columns)
    width, height = n_columns * side + PANELS_RIGHT + 0.2, n_rows * side + PANELS_TOP + 0.4
    figure.set_size_inches(width, height)
    ax = figure.add_axes([0.1 / width, 0.3 / height, n_columns * side / width, n_rows * side / height])
    ax.set_axis_off()
    ax.set(xlim=(0, n_columns), ylim=(0, n_rows), aspect="equal")
    shown = set(np.asarray(kind.rows(data)["OTA"]).tolist())
    mappable = None
    for ota, box in grid.items():
        u0, v0 = box.centre
        ax.add_patch(Rectangle((u0 - box.side / 2, v0 - box.side / 2), box.side, box.side, fill=False,
                               linewidth=0.8))
        if ota in shown:
            mappable = kind.panel(ax, data, ota, box) or mappable
            label = f"{ota:02d}: {kind.panel_label(data, ota)}"
        else:
            label = f"{ota:02d}: {'failed' if ota in data.failed else 'no data'}"
        ax.text(u0, v0 + box.side / 2 + 0.02, label, ha="center", va="bottom", fontsize=7,
                color=FAILED_COLOUR if ota in data.failed else "black")
    figure.text(0.5, 1 - 0.1 / height, focal_plane_title(data, f"{kind.title} per OTA"), ha="center",
                va="top")
    if kind.colour_label and mappable is not None:
        bar = figure.add_axes([(width - PANELS_RIGHT + 0.15) / width, 0.3 / height, 0.15 / width,
                               n_rows * side / height])
        figure.colorbar(mappable, cax=bar, label=kind.colour_label)
    if kind.note:
        figure.text(0.5, 0.08 / height, kind.note(data), ha="center", va="bottom", fontsize=9)


def wcs_panel_label(data, ota):
    stats = offset_statistics(data.matches, ota)
    return f'{stats.n} pairs, rms {stats.rms:.3f}"'


def wcs_scatter_note(data):
    return (f'each panel +-{wcs_half_range(offset_statistics(data.matches)):g}" in RA cos(Dec) '
            "and Dec; red: all OTAs, blue: this OTA (median +- rms)")


def wcs_errors_note(data):
    return f'arrows: {wcs_arrow_key(data):g}" is a quarter of a panel'


def seeing_panel_label(data, ota):
    sources = clean_sources(data)
    return f'median FWHM {np.nanmedian(filled(sources["FWHM_WORLD"][ota_mask(sources, ota)])) * 3600:.2f}"'


def zeropoint_panel_label(data, ota):
    stars = calibration_stars(data)
    return f'median ZP {np.nanmedian(filled(stars["ZP"][ota_mask(stars, ota)])):.3f}'


# --- Which plots, rendering ------------------------------------------------------------------

@dataclass(frozen=True)
class PlotKind:
    """One kind of QA plot.

    Attributes
    ----------
    draw : callable
        ``draw(figure, data, ota)`` draws it (``ota=None``: the whole focal plane).
    rows : callable
        ``rows(data)``: the table rows it shows (with an ``OTA`` column); None or none
        at all: the plot is not made.
    title : str
        What it shows, for titles and the QA page.
    panel : callable or None
        ``panel(ax, data, ota, box)`` draws one OTA into its :class:`PanelBox` of the
        shared axes of :func:`draw_panels` (returns a colour mappable or None); None:
        the kind has no per-OTA variants.
    panel_label : callable or None
        ``panel_label(data, ota)``: one short line of the OTA's numbers on its panel.
    colour_label : str or None
        Label of the panels' shared colour bar (colour maps).
    note : callable or None
        ``note(data)``: a line under the panels saying their scale.
    """

    draw: Callable
    rows: Callable
    title: str
    panel: Callable = None
    panel_label: Callable = None
    colour_label: str = None
    note: Callable = None

    @property
    def per_ota(self):
        return self.panel is not None


#: Every kind, in the order of the QA page.
PLOTS = {
    "preview": PlotKind(draw_preview, reduced_otas, "Preview"),
    "sky": PlotKind(draw_sky, reduced_otas, "Sky level per cell"),
    "wcs1": PlotKind(draw_wcs_scatter, wcs_pairs, "WCS Scatter", wcs_scatter_panel, wcs_panel_label,
                     note=wcs_scatter_note),
    "wcs2": PlotKind(draw_wcs_errors, wcs_pairs, "WCS Errors", wcs_errors_panel, wcs_panel_label,
                     note=wcs_errors_note),
    "seeing": PlotKind(draw_seeing, clean_sources, "Seeing", seeing_panel, seeing_panel_label,
                       colour_label="FWHM [arcsec]"),
    "photZP": PlotKind(draw_zeropoint, calibration_stars, "Photometric zero point"),
    "photZP_map": PlotKind(draw_zeropoint_map, calibration_stars, "Photometric zero point map",
                           zeropoint_map_panel, zeropoint_panel_label,
                           colour_label="phot. zero point [mag]"),
    "photZP_radial": PlotKind(draw_radial_zeropoint, radial_stars, "Radial zero point"),
}


def plot_label(plot, ota):
    """Name of a plot in messages, e.g. ``wcs1``, ``wcs1 OTA33`` or ``wcs1 otas``."""
    if ota is None:
        return plot
    return f"{plot} {ota}" if ota == PANELS else f"{plot} OTA{ota:02d}"


def one_line(error):
    """An exception as one line: its type and message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def plot_variants(data, plot, otalevel):
    """(plot, ota) pairs of one plot kind: the full frame and, for a per-OTA kind, the
    figure of all OTAs (``otalevel="panels"``) or one per OTA with rows to show
    (``"files"``); none if the plot has nothing to show."""
    kind = PLOTS[plot]
    rows = kind.rows(data)
    if rows is None or len(rows) == 0:
        return []
    if not kind.per_ota or otalevel == "none":
        return [(plot, None)]
    if otalevel == "panels":
        return [(plot, None), (plot, PANELS)]
    shown = set(np.asarray(rows["OTA"]).tolist())
    return [(plot, None)] + [(plot, ota) for ota in data.otas if ota in shown]


def plots_to_make(data, otalevel="panels", fitradial=False):
    """The QA plots that exist for a frame's data (each needs its step's results).

    Parameters
    ----------
    data : QAData
    otalevel : str
        The per-OTA variants of ``wcs1``, ``wcs2``, ``seeing`` and ``photZP_map``:
        ``"panels"`` (one figure of all OTAs, :data:`PANELS`), ``"files"`` (one per
        OTA) or ``"none"``.
    fitradial : bool
        ``-fitradialZP``: the radial zero-point plot (if ``data.radial`` holds a fit).

    Returns
    -------
    list of (str, int or str or None)
        (plot, ota) pairs in the order of :data:`PLOTS`; ota None for the full frame.
        A plot whose data cannot even be inspected is logged and left out.
    """
    pairs = []
    for plot in PLOTS:
        if plot == "photZP_radial" and not fitradial:
            continue
        try:
            pairs += plot_variants(data, plot, otalevel)
        except Exception as error:  # noqa: BLE001 - bad data costs this plot only
            logger.warning("QA plot %s skipped: %s", plot, one_line(error))
    return pairs


def render(data, plot, ota, paths):
    """Draw one plot and save it to every path.

    Parameters
    ----------
    data : QAData
    plot : str
        A key of :data:`PLOTS`.
    ota : int or str or None
        None: the full frame; an OTA number (xy): that OTA's plot; :data:`PANELS`: the
        figure of all OTAs.
    paths : sequence of str or pathlib.Path
        Files to write (format from the extension); missing folders are made.
    """
    figure = Figure(figsize=PLOT_SIZE, dpi=DPI)
    if ota == PANELS:
        draw_panels(figure, data, plot)
    else:
        PLOTS[plot].draw(figure, data, ota)
    for path in paths:
        save_figure(figure, path, DPI)


def save_figure(figure, path, dpi):
    """``figure.savefig`` under a temporary name, then a rename: a run killed while it
    saves leaves no partial plot (and the next save removes what such a run left)."""
    path = Path(path)
    with replaced_atomically(path) as temporary:
        figure.savefig(temporary, format=path.suffix[1:].lower(), dpi=dpi,
                       **SAVE_OPTIONS.get(path.suffix.lower(), {}))


def render_reporting(data, job):
    """Render one (plot, ota, paths) job; returns None, or the error as one line."""
    plot, ota, paths = job
    try:
        render(data, plot, ota, paths)
    except Exception as error:  # noqa: BLE001 - one bad plot must not cost the others
        return one_line(error)
    return None


#: The frame's data in a worker process, set once by the pool's initializer: forked
#: workers inherit it instead of unpickling the catalogs for every plot.
_worker_data = None


def _adopt(data):
    """Pool initializer: keep the frame's :class:`QAData` in this worker."""
    global _worker_data
    _worker_data = data


#: Relative cost of rendering a plot, for sharing the jobs out between processes.
COST = {PANELS: 2.0, "preview": 2.0}


def share_out(jobs, n):
    """Split job indices into n lists of about equal cost (:data:`COST`), costliest first."""
    shares, costs = [[] for _ in range(n)], [0.0] * n
    weight = [COST.get(ota, COST.get(plot, 1.0)) for plot, ota, _ in jobs]
    for i in sorted(range(len(jobs)), key=lambda i: -weight[i]):
        cheapest = costs.index(min(costs))
        shares[cheapest].append(i)
        costs[cheapest] += weight[i]
    return shares


def _render_share(share):
    """Render the jobs of one share in a worker process; their errors (or None)."""
    return [render_reporting(_worker_data, job) for job in share]


def render_all(data, jobs, ncpus):
    """Render (plot, ota, paths) jobs in this process and up to ncpus - 1 forked ones.

    This process, idle otherwise, takes a share too: one process fewer to start, and
    matplotlib is loaded already.

    Returns
    -------
    list of str or None
        Per job: None, or its error as one line.
    """
    shares = [share for share in share_out(jobs, max(1, min(ncpus, len(jobs)))) if share]
    if len(shares) <= 1:
        return [render_reporting(data, job) for job in jobs]
    errors = {}
    with ProcessPoolExecutor(len(shares) - 1, mp_context=multiprocessing.get_context("fork"),
                             initializer=_adopt, initargs=(data,)) as pool:
        others = [pool.submit(_render_share, [jobs[i] for i in share]) for share in shares[1:]]
        for i in shares[0]:
            errors[i] = render_reporting(data, jobs[i])
        for share, future in zip(shares[1:], others):
            errors.update(zip(share, future.result()))
    return [errors[i] for i in range(len(jobs))]


@dataclass(frozen=True)
class PlotFiles:
    """The files of one written plot: kind, variant (None, an OTA or :data:`PANELS`), paths."""

    plot: str
    ota: object
    paths: tuple


def make_plots(data, output, formats=("png",), otalevel="panels", qasubdirs=False,
               qasubdirname="QA", fitradial=False, ncpus=2):
    """Write all QA plots of a frame (:func:`plots_to_make`), rendered in parallel.

    Parameters
    ----------
    data : QAData
    output : str or pathlib.Path
        The reduced frame's file name; the plots are named after it (:func:`qa_paths`).
    formats : sequence of str
        File formats, e.g. ``("png", "pdf")``.
    otalevel, fitradial
        See :func:`plots_to_make`.
    qasubdirs : bool
        Write into ``<dir of output>/<qasubdirname>/``.
    qasubdirname : str
        Name of that folder.
    ncpus : int
        Worker processes (fork); 1 renders in this process.

    Returns
    -------
    list of PlotFiles
        The plots written, in the order of :func:`plots_to_make`. A plot that fails
        is logged (one warning naming the plot and the error) and skipped; bad data
        never raise.
    """
    jobs = [(plot, ota, qa_paths(output, plot, formats, qasubdirs, qasubdirname, ota))
            for plot, ota in plots_to_make(data, otalevel, fitradial)]
    written = []
    for (plot, ota, paths), error in zip(jobs, render_all(data, jobs, ncpus)):
        if error is None:
            written.append(PlotFiles(plot, ota, tuple(paths)))
        else:
            logger.warning("QA plot %s skipped: %s", plot_label(plot, ota), error)
    return written
