"""QA plots of one reduced frame: astrometry, seeing and photometric zero point.

The caller collects what the plots show into a small picklable :class:`QAData`.
:func:`make_plots` asks :func:`plots_to_make` which plots exist for it, names their
files with :func:`qa_paths` and renders them (:func:`render`) in worker processes. A
plot that fails is logged and skipped: QA plots never cost a reduced frame.

Plot kinds (the original's names and contents): ``wcs1`` (WCS scatter), ``wcs2``
(WCS shift map), ``seeing`` (PSF FWHM map), ``photZP`` (zero point against reference
magnitude), ``photZP_map`` (zero-point map) and ``photZP_radial`` (zero point against
distance from a centre).
Each kind is one function ``draw(figure, data, ota)``: ``ota=None`` draws the whole
focal plane, an OTA number (xy, e.g. 33) only that OTA's stars.

Figures are bare :class:`matplotlib.figure.Figure` objects saved through the Agg (or
the format's own) canvas: no pyplot state, so nothing leaks between plots.

Units: positions and distances in degrees, astrometric offsets in arcsec (RA offsets
times cos Dec), magnitudes and zero points in mag.
"""

import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.table import Table
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse, Polygon
from matplotlib.ticker import MaxNLocator
from scipy.stats import gaussian_kde

from podi_ipprefcat import filled
from podi_sphere import angular_distance, wrap_180

logger = logging.getLogger("podi_plots")

#: Figure size (inches) and resolution (dots per inch): 800 x 600 pixels in png, as the
#: original's.
PLOT_SIZE = (8, 6)
DPI = 100

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


@dataclass
class QAData:
    """What the QA plots of one frame show, collected by the caller.

    Picklable and small: it is handed to the worker processes.

    Attributes
    ----------
    obsid, object_name, filter_name : str
        Header ``OBSID``, ``OBJECT`` and ``FILTER``.
    exptime : float
        ``EXPTIME`` (s).
    matches : astropy.table.Table or None
        ``WCSCAL.CAT``: ``ODI_RA ODI_DEC REF_RA REF_DEC`` (deg), ``OTA``; None without
        ``-fixwcs``.
    sources : astropy.table.Table or None
        ``CAT.ODI``: ``RA DEC`` (deg), ``FWHM_WORLD`` (deg), ``FLAGS``, ``OTA``.
    outlines : dict
        OTA number -> (4, 2) array of the OTA's corners (RA, Dec in deg) in order around it.
    photcalib : astropy.table.Table or None
        ``CAT.PHOTCALIB``: ``ODI_RA ODI_DEC`` (deg), ``OTA``, ``ZP ZP_ERR`` (mag),
        ``ZP_USED``, ``REF_MAG_<B>`` (mag, B the band upper case), ``ODI_ERR_30`` (mag);
        None unless the zero point was determined.
    band : str or None
        Reference band letter, e.g. ``"r"``.
    zeropoint, zeropoint_sd : float or None
        ``PHOTZP`` and ``PHOTZPSD`` (mag).
    radial : dict or None
        The radial zero-point fit: ``{"centre": (ra, dec) deg, "p0": mag, "p1": mag/deg}``.
    """

    obsid: str
    object_name: str
    filter_name: str
    exptime: float
    matches: Table | None = None
    sources: Table | None = None
    outlines: dict = field(default_factory=dict)
    photcalib: Table | None = None
    band: str | None = None
    zeropoint: float | None = None
    zeropoint_sd: float | None = None
    radial: dict | None = None


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
    ota : int, optional
        OTA number (xy) of a per-OTA variant.

    Returns
    -------
    list of pathlib.Path
        ``<frame>.<plot>.<fmt>`` or ``<frame>.<plot>_OTAxy.<fmt>`` next to the frame;
        with ``qasubdirs`` ``<dir>/<qasubdirname>/<plot>.<fmt>`` or
        ``<dir>/<qasubdirname>/<plot>/OTAxy.<fmt>``.
    """
    output = Path(output)
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


def sky_axes(figure, data, ota, ra, dec, what):
    """Axes of a sky map showing points and the selected OTAs' outlines (grey).

    RA (deg) increases to the left (east left, as on the sky), Dec (deg) up; the limits
    cover the points and outlines with :data:`SKY_MARGIN`, and a degree of RA is drawn
    cos(Dec) times as long as one of Dec, so that the map is not stretched.

    Returns
    -------
    (matplotlib.axes.Axes, ndarray)
        The axes and the points' RA (deg) unwrapped as drawn.
    """
    ax = figure.add_subplot()
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
    # Few RA ticks: labels such as 150.075 are wide and would run into each other.
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set(xlabel="RA [deg]", ylabel="Dec [deg]", title=plot_title(data, what, ota))
    return ax, x[:len(ra)]


def draw_colour_map(figure, data, ota, ra, dec, values, value_range, label, what):
    """Sky map of points (deg) coloured by a value within value_range, with a colorbar."""
    ax, x = sky_axes(figure, data, ota, ra, dec, what)
    area = np.clip(MAP_MARKER_AREA / max(len(x), 1), *MAP_MARKER_LIMITS)
    # A thin dark edge: the middle of the colour map is pale yellow, invisible on white.
    points = ax.scatter(x, filled(dec), c=filled(values), s=area, cmap=MAP_COLOURS,
                        vmin=value_range[0], vmax=value_range[1], linewidths=0.2,
                        edgecolors="0.3", rasterized=True)
    figure.colorbar(points, ax=ax, label=label)


# --- wcs1: WCS scatter -----------------------------------------------------------------------------

def density_profile(values, grid):
    """Kernel density estimate of values on a grid, scaled to a peak of 1."""
    density = gaussian_kde(values, bw_method=PROFILE_BANDWIDTH)(grid)
    return density / density.max()


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


def draw_offset_summary(ax, stats, label, colour, side):
    """Ellipse at the median offset, 2 rms wide and high, and the statistics (arcsec)
    in a text box in the lower corner on ``side`` ("left" or "right")."""
    ax.add_patch(Ellipse((stats.median_ra, stats.median_dec), 2 * stats.rms_ra,
                         2 * stats.rms_dec, fill=False, edgecolor=colour, linewidth=1.5))
    text = (f"{label} (N={stats.n})\n"
            f"median offset: {stats.median_ra:+.3f}\" / {stats.median_dec:+.3f}\"\n"
            f"RMS RA/Dec: {stats.rms_ra:.3f}\" / {stats.rms_dec:.3f}\"\n"
            f"RMS: {stats.rms:.3f}\"")
    ax.text(0.03 if side == "left" else 0.97, 0.03, text, transform=ax.transAxes, ha=side,
            va="bottom", fontsize=8, color=colour, bbox=TEXT_BOX)


def draw_wcs_scatter(figure, data, ota):
    """``wcs1``: offsets of matched pairs (arcsec) over their 2-D histogram, with profiles
    and the overall (red) and the OTA's (blue) median offsets and rms."""
    ax = figure.add_subplot()
    d_ra, d_dec = sky_offsets(data.matches[ota_mask(data.matches, ota)])
    overall = offset_statistics(data.matches)
    half_range = wcs_half_range(overall)
    extent = (-half_range, half_range)
    counts, _, _ = np.histogram2d(d_ra, d_dec, bins=WCS_BINS, range=[extent, extent])
    image = ax.imshow(counts.T, origin="lower", extent=extent + extent,
                      cmap=POINT_DENSITY_COLOURS, interpolation="nearest")
    figure.colorbar(image, ax=ax, label="point density")
    ax.plot(d_ra, d_dec, "b.", markersize=MARKER, rasterized=True)
    if len(d_ra) >= MIN_PROFILE_POINTS:
        draw_offset_profiles(ax, d_ra, d_dec, half_range)
    draw_offset_summary(ax, overall, "Overall WCS", "red", "right")
    if ota is not None:
        draw_offset_summary(ax, offset_statistics(data.matches, ota), "This OTA", "blue", "left")
    ax.set(xlim=extent, ylim=extent, aspect="equal", xlabel="error RA * cos(Dec) [arcsec]",
           ylabel="error Dec [arcsec]", title=plot_title(data, "WCS Scatter", ota))
    ax.text(0.03, 0.97, f'range +-{half_range:g}" ({WCS_RMS_RANGE:g} x rms)', transform=ax.transAxes,
            ha="left", va="top", fontsize=8, bbox=TEXT_BOX)
    ax.grid(True)


# --- wcs2: WCS shift map ----------------------------------------------------------------------

def draw_wcs_errors(figure, data, ota):
    """``wcs2``: matched stars on the sky (red) with their offset vectors (black arrows); the
    key arrow (:data:`ARROW_RMS` x the rms offset, rounded) is :data:`ARROW_FRACTION` of the
    map's smaller extent."""
    pairs = data.matches[ota_mask(data.matches, ota)]
    d_ra, d_dec = sky_offsets(pairs)
    ax, x = sky_axes(figure, data, ota, pairs["ODI_RA"], pairs["ODI_DEC"], "WCS Errors")
    dec = filled(pairs["ODI_DEC"])
    ax.plot(x, dec, "r.", markersize=MARKER, rasterized=True)
    # sky_axes set the aspect to 1/cos(Dec): RA steps stretched by it have their sky length.
    stretch = ax.get_aspect()
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    key = nice_ceiling(max(ARROW_RMS * offset_statistics(data.matches).rms, 0.001))
    # Degrees of the map per arcsec of offset.
    length = ARROW_FRACTION * min(abs(xlim[1] - xlim[0]) / stretch, ylim[1] - ylim[0]) / key
    arrows = ax.quiver(x, dec, d_ra * length * stretch, d_dec * length, angles="xy",
                       scale_units="xy", scale=1, width=0.002, color="black")
    ax.quiverkey(arrows, 0.12, 0.94, key * length * stretch, f'{key:g}"', labelpos="E",
                 coordinates="axes")


# --- seeing: PSF FWHM map ----------------------------------------------------------------------

def draw_seeing(figure, data, ota):
    """``seeing``: unflagged sources on the sky coloured by FWHM (arcsec); the colour range
    comes from all sources, so that every OTA's plot uses the same colours."""
    sources = clean_sources(data)
    fwhm = filled(sources["FWHM_WORLD"]) * 3600.0
    mine = ota_mask(sources, ota)
    draw_colour_map(figure, data, ota, sources["RA"][mine], sources["DEC"][mine], fwhm[mine],
                    np.nanpercentile(fwhm, FWHM_PERCENTILES), "FWHM [arcsec]", "Seeing")


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

def draw_zeropoint_map(figure, data, ota):
    """``photZP_map``: kept calibration stars on the sky coloured by zero point, within
    the frame's zero point +- :data:`ZP_MAP_RANGE` (mag)."""
    stars = calibration_stars(data)
    mine = stars[ota_mask(stars, ota)]
    draw_colour_map(figure, data, ota, mine["ODI_RA"], mine["ODI_DEC"], mine["ZP"],
                    (data.zeropoint - ZP_MAP_RANGE, data.zeropoint + ZP_MAP_RANGE),
                    "phot. zero point [mag]", "Photometric zero point map")


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
    per_ota : bool
        It also has per-OTA variants.
    """

    draw: Callable
    rows: Callable
    per_ota: bool


PLOTS = {
    "wcs1": PlotKind(draw_wcs_scatter, wcs_pairs, True),
    "wcs2": PlotKind(draw_wcs_errors, wcs_pairs, True),
    "seeing": PlotKind(draw_seeing, clean_sources, True),
    "photZP": PlotKind(draw_zeropoint, calibration_stars, False),
    "photZP_map": PlotKind(draw_zeropoint_map, calibration_stars, True),
    "photZP_radial": PlotKind(draw_radial_zeropoint, radial_stars, False),
}


def plot_label(plot, ota):
    """Name of a plot in messages, e.g. ``wcs1`` or ``wcs1 OTA33``."""
    return plot if ota is None else f"{plot} OTA{ota:02d}"


def one_line(error):
    """An exception as one line: its type and message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def plot_variants(data, plot, otalevel):
    """(plot, ota) pairs of one plot kind: the full frame and, with ``otalevel``, every
    OTA of ``data.outlines`` with rows to show; none if the plot has nothing to show."""
    kind = PLOTS[plot]
    rows = kind.rows(data)
    if rows is None or len(rows) == 0:
        return []
    shown = set(np.asarray(rows["OTA"]).tolist()) if otalevel and kind.per_ota else set()
    return [(plot, None)] + [(plot, ota) for ota in sorted(data.outlines) if ota in shown]


def plots_to_make(data, otalevel=True, fitradial=False):
    """The QA plots that exist for a frame's data (each needs its step's results).

    Parameters
    ----------
    data : QAData
    otalevel : bool
        Also the per-OTA variants of ``wcs1``, ``wcs2``, ``seeing`` and ``photZP_map``.
    fitradial : bool
        ``-fitradialZP``: the radial zero-point plot (if ``data.radial`` holds a fit).

    Returns
    -------
    list of (str, int or None)
        (plot, ota) pairs in a fixed order; ota None for the full frame. A plot whose
        data cannot even be inspected is logged and left out.
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
    """Draw one plot (``ota=None``: full frame) and save it to every path.

    Parameters
    ----------
    data : QAData
    plot : str
        A key of :data:`PLOTS`.
    ota : int or None
        OTA number (xy) of a per-OTA variant.
    paths : sequence of str or pathlib.Path
        Files to write (format from the extension); missing folders are made.
    """
    figure = Figure(figsize=PLOT_SIZE, dpi=DPI)
    PLOTS[plot].draw(figure, data, ota)
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=DPI)


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


def _render_in_worker(job):
    """:func:`render_reporting` of one job with the worker's data."""
    return render_reporting(_worker_data, job)


def render_all(data, jobs, ncpus):
    """Render (plot, ota, paths) jobs with up to ncpus forked workers (1: in this process).

    Returns
    -------
    list of str or None
        Per job: None, or its error as one line.
    """
    workers = min(ncpus, len(jobs))
    if workers <= 1:
        return [render_reporting(data, job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=_adopt, initargs=(data,)) as pool:
        return list(pool.map(_render_in_worker, jobs))


def make_plots(data, output, formats=("png",), otalevel=True, qasubdirs=False,
               qasubdirname="QA", fitradial=False, ncpus=2):
    """Write all QA plots of a frame (:func:`plots_to_make`), rendered in parallel.

    Parameters
    ----------
    data : QAData
    output : str or pathlib.Path
        The reduced frame's file name; the plots are named after it (:func:`qa_paths`).
    formats : sequence of str
        File formats, e.g. ``("png", "pdf")``.
    otalevel, fitradial : bool
        See :func:`plots_to_make`.
    qasubdirs : bool
        Write into ``<dir of output>/<qasubdirname>/``.
    qasubdirname : str
        Name of that folder.
    ncpus : int
        Worker processes (fork); 1 renders in this process.

    Returns
    -------
    list of pathlib.Path
        The files written. A plot that fails is logged (one warning naming the plot and
        the error) and skipped; bad data never raise.
    """
    jobs = [(plot, ota, qa_paths(output, plot, formats, qasubdirs, qasubdirname, ota))
            for plot, ota in plots_to_make(data, otalevel, fitradial)]
    written = []
    for (plot, ota, paths), error in zip(jobs, render_all(data, jobs, ncpus)):
        if error is None:
            written += paths
        else:
            logger.warning("QA plot %s skipped: %s", plot_label(plot, ota), error)
    return written
