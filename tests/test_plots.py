"""QA plots (podi_plots) of a synthetic frame: names, which plots, files, failures, content.

The frame is made here: matched pairs with injected offsets, sources, calibration
stars, and quick-look previews and cell sky levels with a known hot cell, saturated
pixels and undefined pixels.
"""

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.patches import Ellipse

import podi_plots
from podi_plots import PANELS, QAData, make_plots, offset_statistics, plots_to_make, qa_paths
from podi_preview import QuickLook

OTAS = (33, 34, 43, 44)
#: Injected offsets (arcsec): every pair dRA cos(Dec) +0.1, dDec 0 except OTA 44 (+0.3),
#: each with a scatter of 0.05.
D_RA, D_DEC, D_DEC_44, SCATTER = 0.1, 0.0, 0.3, 0.05
ZEROPOINT, ZP_SD = 26.0, 0.03
OTA_SIDE = 0.07  # deg
PER_OTA = ("wcs1", "wcs2", "seeing", "photZP_map")
FOCAL_PLANE = ("preview", "sky")
FULL_FRAME = FOCAL_PLANE + PER_OTA + ("photZP", "photZP_radial")
#: Quick looks: binning 2, blocks of 16 px (128 x 128 previews); the sky is SKY except
#: HOT_CELL of OTA 34 (row, column from the lower left); preview pixel SATURATED of
#: OTA 33 is saturated, the UNDEFINED rows of OTA 43 have no data.
BINNING, BLOCK, SKY = 2, 16, 1000.0
HOT_CELL, HOT_LEVEL = (2, 5), 1200.0
SATURATED, UNDEFINED = (40, 70), slice(0, 10)
#: Expected image sizes (pixels) of the 4-OTA frame: the standard plots; the figures of
#: all OTAs (2 x 2 panels of 3 inches, 1.2 inches of colour bar and margin, 1.1 of
#: title and note); the preview (6 inches at least; 132 + 128 preview px of OTAs 33
#: and 43 side by side, 135 + 128 of 33 and 34, and 1.2 inches of title and legend).
STANDARD_SIZE = (800, 600)
PANELS_SIZE = (720, 710)
PREVIEW_SIZE = (600, 263 + 120)


def ota_centre(ota):
    """Centre (RA, Dec in deg) of an OTA near (150, 30); x grows to the east."""
    dec = 30.0 + 0.08 * (ota % 10 - 3.5)
    return 150.0 + 0.08 * (ota // 10 - 3.5) / math.cos(math.radians(dec)), dec


def outline(ota):
    ra, dec = ota_centre(ota)
    half_ra = OTA_SIDE / 2 / math.cos(math.radians(dec))
    return np.array([[ra - half_ra, dec - OTA_SIDE / 2], [ra + half_ra, dec - OTA_SIDE / 2],
                     [ra + half_ra, dec + OTA_SIDE / 2], [ra - half_ra, dec + OTA_SIDE / 2]])


def positions(rng, n):
    """n random positions (deg) spread evenly over the four OTAs, and their OTA."""
    ota = np.resize(np.array(OTAS), n)
    centres = np.array([ota_centre(o) for o in ota])
    offsets = rng.uniform(-0.03, 0.03, (n, 2))
    return centres[:, 0] + offsets[:, 0] / np.cos(np.radians(centres[:, 1])), \
        centres[:, 1] + offsets[:, 1], ota


def quick_looks(rng):
    looks = {}
    for ota in OTAS:
        preview = rng.normal(SKY, 5.0, (128, 128)).astype(np.float32)
        saturated = np.zeros((128, 128), bool)
        cell_sky = SKY + rng.normal(0, 1.0, (8, 8))
        if ota == 33:
            saturated[SATURATED] = True
        if ota == 43:
            preview[UNDEFINED] = np.nan
        if ota == 34:
            cell_sky[HOT_CELL] = HOT_LEVEL
        looks[ota] = QuickLook(preview=preview, saturated=saturated, cell_sky=cell_sky, block=BLOCK)
    return looks


def synthetic_frame(seed=3):
    rng = np.random.default_rng(seed)
    ref_ra, ref_dec, ota = positions(rng, 300)
    d_dec = np.where(ota == 44, D_DEC_44, D_DEC) + rng.normal(0, SCATTER, 300)
    d_ra = D_RA + rng.normal(0, SCATTER, 300)
    odi_dec = ref_dec + d_dec / 3600
    mean_dec = np.radians(0.5 * (ref_dec + odi_dec))
    matches = Table({"ODI_RA": ref_ra + d_ra / 3600 / np.cos(mean_dec), "ODI_DEC": odi_dec,
                     "REF_RA": ref_ra, "REF_DEC": ref_dec, "OTA": ota.astype(np.int16)})

    ra, dec, ota = positions(rng, 400)
    flags = np.where(np.arange(400) % 40 == 0, 4, 0)
    sources = Table({"RA": ra, "DEC": dec, "FWHM_WORLD": rng.normal(1.0, 0.08, 400) / 3600,
                     "FLAGS": flags, "OTA": ota.astype(np.int16)})

    ra, dec, ota = positions(rng, 100)
    zp = ZEROPOINT + rng.normal(0, ZP_SD, 100)
    used = np.ones(100, bool)
    used[:5] = False
    zp[:5] += np.array([-0.4, -0.3, 0.3, 0.35, 0.45])
    photcalib = Table({"ODI_RA": ra, "ODI_DEC": dec, "OTA": ota.astype(np.int16), "ZP": zp,
                       "ZP_ERR": np.full(100, 0.02), "ZP_USED": used,
                       "REF_MAG_R": rng.uniform(14, 20, 100), "ODI_ERR_30": np.full(100, 0.01)})
    return QAData(obsid="o20131119T012345.0", object_name="M 81 field", filter_name="odi_r",
                  exptime=300.0, matches=matches, sources=sources,
                  outlines={ota: outline(ota) for ota in OTAS}, photcalib=photcalib, band="r",
                  zeropoint=ZEROPOINT, zeropoint_sd=ZP_SD,
                  radial={"centre": ota_centre(33), "p0": 0.01, "p1": -0.02},
                  quicklook=quick_looks(rng), binning=BINNING, bunit="electron")


@pytest.fixture(scope="module")
def frame():
    return synthetic_frame()


def expected_names(plots=FULL_FRAME, panels=PER_OTA, per_ota=(), formats=("png",)):
    """File names of the full-frame plots, the figures of all OTAs of the kinds in
    ``panels`` and the one-OTA plots of the kinds in ``per_ota``."""
    names = {f"frame.{plot}.{fmt}" for plot in plots for fmt in formats}
    names |= {f"frame.{plot}_otas.{fmt}" for plot in panels for fmt in formats}
    return names | {f"frame.{plot}_OTA{ota}.{fmt}" for plot in per_ota for ota in OTAS
                    for fmt in formats}


def image_size(path):
    """(width, height) in pixels of a png."""
    height, width = imread(path).shape[:2]
    return width, height


def expected_size(name):
    if ".preview." in name:
        return PREVIEW_SIZE
    return PANELS_SIZE if "_otas." in name else STANDARD_SIZE


def files_below(folder):
    return {path for path in Path(folder).rglob("*") if path.is_file()}


# --- File names ----------------------------------------------------------------------------

def test_names_next_to_the_frame():
    assert qa_paths("/night/frame.fits", "wcs1", ["png", "pdf"]) == [
        Path("/night/frame.wcs1.png"), Path("/night/frame.wcs1.pdf")]
    assert qa_paths("/night/frame.fits.fz", "seeing", ["png"], ota=0) == [
        Path("/night/frame.seeing_OTA00.png")]
    assert qa_paths("frame.fits", "photZP_map", ["png"], ota=33) == [
        Path("frame.photZP_map_OTA33.png")]
    assert qa_paths("frame.fits", "wcs2", ["png"], ota=PANELS) == [Path("frame.wcs2_otas.png")]
    assert qa_paths("/night/frame.fit", "wcs2", ["svg"]) == [Path("/night/frame.fit.wcs2.svg")]


def test_names_in_a_qa_folder():
    assert qa_paths("/night/frame.fits", "wcs1", ["png", "pdf"], qasubdirs=True) == [
        Path("/night/QA/wcs1.png"), Path("/night/QA/wcs1.pdf")]
    assert qa_paths("/night/frame.fits.fz", "wcs1", ["png"], qasubdirs=True, ota=2) == [
        Path("/night/QA/wcs1/OTA02.png")]
    assert qa_paths("/night/frame.fits", "seeing", ["png"], qasubdirs=True,
                    qasubdirname="diag", ota=44) == [Path("/night/diag/seeing/OTA44.png")]
    assert qa_paths("/night/frame.fits", "seeing", ["png"], qasubdirs=True, ota=PANELS) == [
        Path("/night/QA/seeing_otas.png")]


# --- Which plots -----------------------------------------------------------------------------

def test_every_plot_with_a_figure_of_all_otas(frame):
    pairs = plots_to_make(frame, fitradial=True)
    assert pairs[:4] == [("preview", None), ("sky", None), ("wcs1", None), ("wcs1", PANELS)]
    assert set(pairs) == ({(plot, None) for plot in FULL_FRAME} | {(plot, PANELS) for plot in PER_OTA})


def test_one_file_per_ota_or_none(frame):
    full = {(plot, None) for plot in FULL_FRAME}
    assert set(plots_to_make(frame, otalevel="files", fitradial=True)) == full | {
        (plot, ota) for plot in PER_OTA for ota in OTAS}
    assert set(plots_to_make(frame, otalevel="none", fitradial=True)) == full


def test_plots_follow_the_data(frame):
    full = {(plot, None) for plot in FULL_FRAME}
    assert set(plots_to_make(frame, otalevel="none")) == full - {("photZP_radial", None)}
    assert set(plots_to_make(replace(frame, radial=None), otalevel="none", fitradial=True)) == \
        full - {("photZP_radial", None)}
    no_zp = {(plot, None) for plot in FOCAL_PLANE + ("wcs1", "wcs2", "seeing")}
    assert set(plots_to_make(replace(frame, photcalib=None), otalevel="none",
                             fitradial=True)) == no_zp
    without_wcs = full - {(plot, None) for plot in ("wcs1", "wcs2", "seeing")}
    assert set(plots_to_make(replace(frame, matches=None), otalevel="none",
                             fitradial=True)) == without_wcs
    assert set(plots_to_make(replace(frame, matches=frame.matches[:3]), otalevel="none",
                             fitradial=True)) == without_wcs
    assert ("wcs1", None) in plots_to_make(replace(frame, matches=frame.matches[:4]))
    assert ("seeing", None) not in plots_to_make(replace(frame, sources=None))
    assert ("preview", None) not in plots_to_make(replace(frame, quicklook={}))


def test_one_file_per_ota_only_for_otas_with_data(frame):
    photcalib = frame.photcalib[frame.photcalib["OTA"] != 43]
    pairs = plots_to_make(replace(frame, photcalib=photcalib), otalevel="files")
    assert ("photZP_map", 43) not in pairs and ("wcs1", 43) in pairs


# --- Files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ncpus", [2, 1])
def test_writes_every_plot_at_its_size(frame, tmp_path, ncpus):
    written = make_plots(frame, tmp_path / "frame.fits", fitradial=True, ncpus=ncpus)
    paths = [path for files in written for path in files.paths]
    assert sorted(paths) == sorted(files_below(tmp_path))
    assert {path.name for path in paths} == expected_names()
    for path in paths:
        assert image_size(path) == expected_size(path.name), path.name


def test_formats_and_qa_folder_with_one_file_per_ota(frame, tmp_path):
    written = make_plots(frame, tmp_path / "night" / "frame.fits.fz", formats=("png", "pdf"),
                         otalevel="files", qasubdirs=True, ncpus=2)
    qa = tmp_path / "night" / "QA"
    expected = {qa / f"{plot}.{fmt}" for plot in FULL_FRAME[:-1] for fmt in ("png", "pdf")}
    expected |= {qa / plot / f"OTA{ota}.{fmt}" for plot in PER_OTA for ota in OTAS
                 for fmt in ("png", "pdf")}
    paths = {path for files in written for path in files.paths}
    assert paths == expected == files_below(tmp_path)
    assert all(path.stat().st_size > 5000 for path in paths)
    assert (qa / "wcs1.pdf").read_bytes().startswith(b"%PDF")
    assert all(image_size(qa / plot / "OTA44.png") == STANDARD_SIZE for plot in PER_OTA)


def file_image_size(path):
    """(width, height) in pixels (at the figures' 100 dpi) of a plot file of any format."""
    import gzip
    import re

    from PIL import Image
    data = path.read_bytes()
    if path.suffix in (".raw", ".rgba"):
        return len(data) // 4  # RGBA bytes: the caller knows the aspect
    if path.suffix == ".svgz":
        data = gzip.decompress(data)
    if path.suffix in (".svg", ".svgz"):
        box = re.search(rb'width="([\d.]+)pt" height="([\d.]+)pt"', data)
        return round(float(box[1]) * 100 / 72), round(float(box[2]) * 100 / 72)
    if path.suffix == ".pdf":
        box = re.search(rb"/MediaBox \[ *0 0 ([\d.]+) ([\d.]+) *\]", data)
        return round(float(box[1]) * 100 / 72), round(float(box[2]) * 100 / 72)
    if path.suffix in (".eps", ".ps"):
        x0, y0, x1, y1 = map(float, re.search(rb"%%BoundingBox: (\d+) (\d+) (\d+) (\d+)", data).groups())
        return round((x1 - x0) * 100 / 72), round((y1 - y0) * 100 / 72)
    with Image.open(path) as image:
        image.load()
        return image.size


#: Every format matplotlib writes here; pgf needs LaTeX (refused by -plotformat without it).
FORMATS = sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})


@pytest.mark.parametrize("plot, ota, size", [("preview", None, PREVIEW_SIZE), ("seeing", PANELS, PANELS_SIZE),
                                             ("photZP", None, STANDARD_SIZE)])
def test_every_format_is_a_valid_file_of_the_figure_size(frame, tmp_path, plot, ota, size):
    paths = [tmp_path / f"{plot}.{fmt}" for fmt in FORMATS]
    podi_plots.render(frame, plot, ota, paths)
    for path in paths:
        found = file_image_size(path)
        if isinstance(found, int):
            assert found == size[0] * size[1], path.name
        else:
            # Points round to whole numbers in PostScript bounding boxes.
            assert found == pytest.approx(size, abs=2), path.name


def test_renders_are_deterministic(frame, tmp_path):
    for ota in (44, PANELS):
        first, second = tmp_path / "a.png", tmp_path / "b.png"
        podi_plots.render(frame, "wcs1", ota, [first])
        podi_plots.render(frame, "wcs1", ota, [second])
        assert first.read_bytes() == second.read_bytes()


# --- Failures ------------------------------------------------------------------------------

def test_a_broken_plot_is_logged_and_skipped(frame, tmp_path, caplog):
    photcalib = frame.photcalib.copy()
    photcalib.remove_column("REF_MAG_R")
    with caplog.at_level(logging.WARNING, logger="podi_plots"):
        written = make_plots(replace(frame, photcalib=photcalib), tmp_path / "frame.fits",
                             otalevel="none", ncpus=2)
    assert {path.name for files in written for path in files.paths} == expected_names(
        FULL_FRAME[:-1], ()) - {"frame.photZP.png"}
    assert [record.getMessage() for record in caplog.records] == [
        "QA plot photZP skipped: KeyError: 'REF_MAG_R'"]


def test_zero_points_all_nan_cost_only_the_photometric_plots(frame, tmp_path, caplog):
    photcalib = frame.photcalib.copy()
    photcalib["ZP"] = np.nan
    with caplog.at_level(logging.WARNING, logger="podi_plots"):
        written = make_plots(replace(frame, photcalib=photcalib), tmp_path / "frame.fits",
                             otalevel="none", fitradial=True, ncpus=1)
    assert {path.name for files in written for path in files.paths} == expected_names(
        FOCAL_PLANE + PER_OTA[:3], ())
    assert len(caplog.records) == 3
    assert all("no finite zero point" in record.getMessage() for record in caplog.records)


def test_a_plot_that_raises_while_drawing_spares_the_others(frame, tmp_path, caplog, monkeypatch):
    def broken(*args):
        raise RuntimeError("cannot\ndraw")

    monkeypatch.setitem(podi_plots.PLOTS, "wcs2",
                        replace(podi_plots.PLOTS["wcs2"], draw=broken, panel=broken))
    with caplog.at_level(logging.WARNING, logger="podi_plots"):
        written = make_plots(frame, tmp_path / "frame.fits", ncpus=2)
    assert not any("wcs2" in files.plot for files in written)
    assert len(written) == len(expected_names(FULL_FRAME[:-1])) - 2
    assert "QA plot wcs2 otas skipped: RuntimeError: cannot draw" in caplog.text


# --- Content -----------------------------------------------------------------------------------

def test_offset_statistics_recover_the_injected_offsets(frame):
    overall = offset_statistics(frame.matches)
    assert overall.n == 300
    assert overall.median_ra == pytest.approx(D_RA, abs=0.01)
    assert overall.rms_ra == pytest.approx(math.hypot(D_RA, SCATTER), abs=0.01)
    # A quarter of the pairs (OTA 44) are 0.3" off in Dec.
    assert overall.rms_dec == pytest.approx(math.sqrt(SCATTER**2 + D_DEC_44**2 / 4), abs=0.01)
    assert overall.rms == pytest.approx(math.hypot(overall.rms_ra, overall.rms_dec))
    ota44, ota33 = offset_statistics(frame.matches, 44), offset_statistics(frame.matches, 33)
    assert ota44.n == ota33.n == 75
    assert ota44.median_dec == pytest.approx(D_DEC_44, abs=0.02)
    assert ota33.median_dec == pytest.approx(D_DEC, abs=0.02)
    assert ota33.rms_dec == pytest.approx(SCATTER, abs=0.01)


def test_offsets_across_ra_zero():
    matches = Table({"ODI_RA": [0.0001], "ODI_DEC": [60.0], "REF_RA": [359.9999],
                     "REF_DEC": [60.0], "OTA": [33]})
    d_ra, d_dec = podi_plots.sky_offsets(matches)
    assert d_ra[0] == pytest.approx(0.0002 * 3600 * 0.5) and d_dec[0] == 0


def test_scatter_ellipses_show_the_statistics(frame):
    figure = Figure()
    podi_plots.draw_wcs_scatter(figure, frame, 44)
    ellipses = [p for p in figure.axes[0].patches if isinstance(p, Ellipse)]
    for ellipse, stats in zip(ellipses, (offset_statistics(frame.matches),
                                         offset_statistics(frame.matches, 44))):
        assert ellipse.center == pytest.approx((stats.median_ra, stats.median_dec))
        assert (ellipse.width, ellipse.height) == pytest.approx((2 * stats.rms_ra,
                                                                 2 * stats.rms_dec))
    assert len(ellipses) == 2


@pytest.mark.parametrize("value, expected", [(0.024, 0.05), (0.05, 0.05), (0.8, 1.0), (1.1, 2.0),
                                             (3.0, 5.0), (0.0062, 0.01)])
def test_nice_ceiling(value, expected):
    assert podi_plots.nice_ceiling(value) == pytest.approx(expected)


def test_wcs_range_follows_the_rms():
    """A 0.006" solution gets a +-0.05" scatter plot, not the original's fixed +-3"."""
    stats = podi_plots.OffsetStatistics(n=100, median_ra=0.0, median_dec=0.0, rms_ra=0.005, rms_dec=0.0035)
    assert podi_plots.wcs_half_range(stats) == pytest.approx(0.05)
    assert podi_plots.wcs_half_range(replace(stats, rms_ra=0.2, rms_dec=0.2)) == pytest.approx(2.0)


# --- The focal-plane figures and the panels ---------------------------------------------------

def test_figures_show_east_left_and_north_up(frame):
    # The synthetic OTAs grow in RA with the first digit and in Dec with the second.
    assert podi_plots.sky_orientation(frame) == (True, False)
    grid, columns, rows = podi_plots.panel_grid(frame)
    assert (columns, rows) == (2, 2)
    assert {ota: (box.column, box.row) for ota, box in grid.items()} == {
        43: (0, 0), 33: (1, 0), 44: (0, 1), 34: (1, 1)}


def test_preview_colours_saturated_and_undefined_pixels_and_marks_failed_otas(frame):
    failed = replace(frame, quicklook={ota: look for ota, look in frame.quicklook.items() if ota != 44},
                     failed={44: "RuntimeError: injected"})
    figure = Figure()
    podi_plots.draw_preview(figure, failed, None)
    ax = figure.axes[0]
    rgb = np.asarray(ax.images[0].get_array())
    boxes = podi_plots.focal_plane_mosaic(failed.quicklook, failed.otas, BINNING, BLOCK).boxes
    x33, y33, _ = boxes[33]
    assert np.allclose(rgb[y33 + SATURATED[0], x33 + SATURATED[1]], podi_plots.SATURATED_COLOUR)
    x43, y43, _ = boxes[43]
    assert np.allclose(rgb[y43 + UNDEFINED.start:y43 + UNDEFINED.stop, x43:x43 + 128],
                       podi_plots.UNDEFINED_COLOUR)
    # Grey within the zscale range elsewhere; white in the gaps and where OTA 44 failed.
    assert 0.2 < np.median(rgb[y33:y33 + 128, x33:x33 + 128]) < 0.8
    x44, y44, _ = boxes[44]
    assert (rgb[y44:y44 + 128, x44:x44 + 128] == 1.0).all()
    hatched = [patch for patch in ax.patches if patch.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_xy() == (x44, y44)
    assert any("OTA 44\nfailed" == text.get_text() for text in ax.texts)


def test_sky_map_shows_the_hot_cell_of_its_ota(frame):
    figure = Figure()
    podi_plots.draw_sky(figure, frame, None)
    ax = figure.axes[0]
    boxes = podi_plots.focal_plane_mosaic({}, frame.otas, BINNING, BLOCK).boxes
    hot = [image for image in ax.images if np.nanmax(image.get_array()) == HOT_LEVEL]
    assert len(hot) == 1
    x0, y0, size = boxes[34]
    assert hot[0].get_extent() == [x0, x0 + size, y0, y0 + size]
    assert np.argwhere(hot[0].get_array() == HOT_LEVEL).tolist() == [list(HOT_CELL)]
    # The colours centre on the median sky; the hot cell is off the scale.
    low, high = hot[0].get_clim()
    assert (low + high) / 2 == pytest.approx(SKY, abs=0.5) and high < HOT_LEVEL


def test_wcs_panels_place_each_otas_offsets(frame):
    figure = Figure()
    podi_plots.draw_panels(figure, frame, "wcs1")
    ax = figure.axes[0]
    grid, _, _ = podi_plots.panel_grid(frame)
    scale = grid[44].side / (2 * podi_plots.wcs_half_range(offset_statistics(frame.matches)))
    assert sum(isinstance(patch, Ellipse) for patch in ax.patches) == 2 * len(OTAS)
    u0, v0 = grid[44].centre
    mine = [e for e in ax.patches if isinstance(e, Ellipse) and e.get_edgecolor()[:3] == (0, 0, 1)
            and abs(e.center[0] - u0) < 0.5 and abs(e.center[1] - v0) < 0.5]
    assert len(mine) == 1
    # OTA 44 was shifted by 0.3" in Dec, the others not.
    assert (mine[0].center[1] - v0) / scale == pytest.approx(D_DEC_44, abs=0.02)
    assert (mine[0].center[0] - u0) / scale == pytest.approx(D_RA, abs=0.02)
    labels = [text.get_text() for text in ax.texts]
    assert '44: 75 pairs, rms' in " ".join(labels)


def test_a_plot_interrupted_while_saving_leaves_no_file(frame, tmp_path, monkeypatch):
    """savefig dies half-way (as a killed run would): neither the plot nor its temporary
    file is there; a later save also removes what a dead process left."""
    path = tmp_path / "frame.wcs1.png"
    stale = tmp_path / ".frame.wcs1.png.999999999.tmp"
    stale.write_bytes(b"\x89PNG half")

    def half(figure, target, **options):
        Path(target).write_bytes(b"\x89PNG\r\n\x1a\n half of it")
        raise OSError("killed")

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(OSError):
        podi_plots.render(frame, "wcs1", None, [path])
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    podi_plots.render(frame, "wcs1", None, [path])
    assert imread(path).shape[:2] == (podi_plots.PLOT_SIZE[1] * podi_plots.DPI,
                                      podi_plots.PLOT_SIZE[0] * podi_plots.DPI)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
