"""The QA page and plots through the whole program: which files, their sizes and formats,
what the page shows, what it says when steps fail, and that QA never costs a frame."""

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from matplotlib.image import imread
from PIL import Image

import podi_plots
from conftest import refcat_of, run_collectcells

PER_OTA = ("wcs1", "wcs2", "seeing", "photZP_map")
FULL_FRAME = ("preview", "sky") + PER_OTA + ("photZP", "photZP_radial")
OTAS = (33, 34, 43, 44)
#: Image sizes (pixels) of the 4-OTA binned frames: the standard plots, the figures of
#: all OTAs (2 x 2 panels) and the preview (at least 6 inches wide; 260 x 263 preview
#: pixels plus 1.2 inches of title and legend).
STANDARD_SIZE, PANELS_SIZE, PREVIEW_SIZE = (800, 600), (720, 710), (600, 383)
#: Keyword -> decimals shown on the page.
PAGE_NUMBERS = {"NOTAS": 0, "NFAILED": 0, "WCS_RMS": 3, "WCS_NSRC": 0, "SEEING": 2, "PHOTZP": 4,
                "PHOTZPER": 4, "SKYLEVEL": 1, "SKYMAG": 2, "PHOTDPTH": 2}


class Page(HTMLParser):
    """What a QA page shows: image sources, link targets, the numbers by keyword, the text."""

    def __init__(self, path):
        super().__init__()
        self.images, self.links, self.numbers, self.text = [], [], {}, []
        self._key = None
        self.feed(Path(path).read_text())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        self._key = attrs.get("data-key")

    def handle_data(self, data):
        self.text.append(data)
        if self._key:
            self.numbers[self._key] = data
            self._key = None

    @property
    def all_text(self):
        return " ".join(" ".join(self.text).split())


def expected_size(path):
    if path.stem.endswith("preview"):
        return PREVIEW_SIZE
    return PANELS_SIZE if "_otas." in path.name else STANDARD_SIZE


def png_size(path):
    height, width = imread(path).shape[:2]
    return width, height


def vector_size(path):
    """(width, height) in pixels at 100 dpi of a pdf, svg or eps file."""
    data = path.read_bytes()
    if path.suffix == ".pdf":
        box = re.search(rb"/MediaBox \[ *0 0 ([\d.]+) ([\d.]+) *\]", data)
    elif path.suffix == ".svg":
        box = re.search(rb'width="([\d.]+)pt" height="([\d.]+)pt"', data)
    else:
        box = re.search(rb"%%BoundingBox: 0 0 (\d+) (\d+)", data)
    assert box, path.name
    # Points are 1/72 inch; the figures are saved at 100 dots per inch.
    return round(float(box[1]) * 100 / 72), round(float(box[2]) * 100 / 72)


def assert_page_links_exist(page_path):
    page = Page(page_path)
    for target in page.images + page.links:
        assert (page_path.parent / target).is_file(), target
    return page


# --- A calibrated frame --------------------------------------------------------------------

def test_page_and_plots_of_a_calibrated_frame(calibrated_fields):
    _, output, _ = calibrated_fields[0]
    folder = output.parent
    page_path = folder / "field0.qa.html"
    primary = fits.getheader(output)
    assert primary["QAPAGE"] == "field0.qa.html"
    plots = {folder / f"field0.{plot}.png" for plot in FULL_FRAME}
    plots |= {folder / f"field0.{plot}_otas.png" for plot in PER_OTA}
    assert set(folder.glob("field0.*.png")) == plots
    for path in plots:
        assert png_size(path) == expected_size(path), path.name
    page = assert_page_links_exist(page_path)
    assert sorted(page.images) == sorted(path.name for path in plots)
    assert page.images[0] == "field0.preview.png"
    assert "field0.fits" in page.links
    for key, digits in PAGE_NUMBERS.items():
        assert float(page.numbers[key]) == pytest.approx(primary[key], abs=0.51 * 10.0 ** -digits), key
    assert "Every step succeeded" in page.all_text
    assert f"{primary['OBSID']}" in page.all_text and primary["FILTER"].strip() in page.all_text


def test_quick_look_finds_a_bad_flat_cell(star_fields, tmp_path, monkeypatch):
    """A master-flat cell 10 % too bright leaves its sky 10 % too faint: that cell of the
    sky map, at the place the camera's cell pitch gives (written out here), stands out."""
    exposures, cals = star_fields
    bad_cals = tmp_path / "cals"
    bad_cals.mkdir()
    for path in cals.iterdir():
        if path.is_file():
            (bad_cals / path.name).symlink_to(path)
    flat = next(bad_cals.glob("flat*"))
    with fits.open(flat.resolve()) as hdus:
        # Cell (cx=2, cy=5) of OTA 33 at binning 2: x from 508, y from 505 (cell row 0 is the top).
        hdus["OTA33.SCI"].data[505:752, 508:748] *= 1.1
        flat.unlink()
        hdus.writeto(flat)
    captured = {}
    make_plots = podi_plots.make_plots

    def keep(data, *args, **kwargs):
        captured["data"] = data
        return make_plots(data, *args, **kwargs)

    monkeypatch.setattr(podi_plots, "make_plots", keep)
    assert run_collectcells(exposures[0], tmp_path / "frame.fits", f"-cals={bad_cals}", "-fixwcs",
                            f"-refcat={refcat_of(exposures[0])}") == 0
    sky = captured["data"].quicklook[33].cell_sky
    others = np.delete(sky.ravel(), 2 * 8 + 2)
    assert sky[2, 2] / np.median(others) == pytest.approx(1 / 1.1, abs=0.01)
    assert np.abs(others / np.median(others) - 1).max() < 0.01
    assert png_size(tmp_path / "frame.sky.png") == STANDARD_SIZE


# --- Files of every format and layout ---------------------------------------------------------

def test_every_plot_format_in_a_qa_folder(star_fields, tmp_path):
    exposures, cals = star_fields
    output = tmp_path / "night" / "frame.fits"
    assert run_collectcells(exposures[1], output, f"-cals={cals}", "-photcalib", "-qasubdirs",
                            "-plotformat=png,pdf,svg,eps,jpg", f"-refcat={refcat_of(exposures[1])}") == 0
    qa = output.parent / "QA"
    plots = FULL_FRAME[:-1] + tuple(f"{plot}_otas" for plot in PER_OTA)
    expected = {qa / f"{plot}.{fmt}" for plot in plots for fmt in ("png", "pdf", "svg", "eps", "jpg")}
    assert {path for path in qa.rglob("*") if path.is_file()} == expected | {qa / "index.html"}
    for path in expected:
        if path.suffix == ".png":
            size = png_size(path)
        elif path.suffix == ".jpg":
            with Image.open(path) as image:
                image.verify()
                size = image.size
        else:
            size = vector_size(path)
        assert size == pytest.approx(expected_size(path), abs=1), path.name
    page = assert_page_links_exist(qa / "index.html")
    assert sorted(page.images) == sorted(f"{plot}.png" for plot in plots)
    assert fits.getheader(output)["QAPAGE"] == "QA/index.html"


def test_formats_a_browser_cannot_show_are_linked(star_fields, tmp_path):
    exposures, cals = star_fields
    output = tmp_path / "frame.fits"
    assert run_collectcells(exposures[2], output, f"-cals={cals}", "-fixwcs", "-nootalevelplots",
                            "-plotformat=pdf", f"-refcat={refcat_of(exposures[2])}") == 0
    written = {path.name for path in tmp_path.iterdir()} - {"frame.fits", "frame.qa.html"}
    assert written == {f"frame.{plot}.pdf" for plot in ("preview", "sky", "wcs1", "wcs2", "seeing")}
    page = assert_page_links_exist(tmp_path / "frame.qa.html")
    assert page.images == [] and written <= set(page.links)


def test_otalevelplots_one_file_per_ota_and_the_summary_line_last(star_fields, tmp_path):
    exposures, cals = star_fields
    output = tmp_path / "frame.fits"
    run = subprocess.run([sys.executable, "-m", "podi_collectcells", str(exposures[0]), str(output),
                          f"-cals={cals}", "-fixwcs", "-otalevelplots", f"-refcat={refcat_of(exposures[0])}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True)
    lines = run.stdout.strip().splitlines()
    assert lines[-1].startswith(f"{exposures[0].name}: 4 OTAs reduced") and lines[-1].endswith(str(output))
    assert any(line.startswith(f"QA page {tmp_path / 'frame.qa.html'}: ") for line in lines[:-1])
    per_ota = {tmp_path / f"frame.{plot}_OTA{ota}.png" for plot in ("wcs1", "wcs2", "seeing") for ota in OTAS}
    assert per_ota <= set(tmp_path.iterdir())
    assert not list(tmp_path.glob("*_otas.png"))
    assert all(png_size(path) == STANDARD_SIZE for path in per_ota)
    page = assert_page_links_exist(tmp_path / "frame.qa.html")
    assert {tmp_path / image for image in page.images} >= per_ota


# --- Failures ----------------------------------------------------------------------------------

def test_page_says_what_failed_and_why(star_fields, tmp_path, monkeypatch):
    exposures, cals = star_fields
    elsewhere = Table.read(refcat_of(exposures[0]))
    elsewhere["dec"] += 0.5  # the same stars half a degree north: no match
    refcat = tmp_path / "elsewhere.fits"
    elsewhere.write(refcat)
    monkeypatch.setenv("PODI_FAULT", "raise:34")
    output = tmp_path / "frame.fits"
    assert run_collectcells(exposures[0], output, f"-cals={cals}", "-photcalib", f"-refcat={refcat}") == 0
    primary = fits.getheader(output)
    assert primary["FAILOTAS"] == "34" and primary["WCSCAL"] is False
    page = assert_page_links_exist(tmp_path / "frame.qa.html")
    text = page.all_text
    assert "OTA 34 failed: RuntimeError: injected fault" in text
    assert f"WCS not calibrated: {primary['WCSMSG']}" in text
    assert "No photometric zero point: WCS not calibrated" in text
    assert "OTA 34 failed" in text.split("Warnings")[1]  # the run's error is among the warnings
    # The plots that need no WCS are made.
    assert sorted(page.images) == ["frame.preview.png", "frame.sky.png"]
    assert page.numbers["NFAILED"] == "1"


def test_noqaplots_makes_none_and_a_failing_plot_keeps_the_frame(star_fields, tmp_path, caplog,
                                                                  monkeypatch):
    exposures, cals = star_fields
    refcat = f"-refcat={refcat_of(exposures[2])}"
    assert run_collectcells(exposures[2], tmp_path / "quiet.fits", f"-cals={cals}", "-photcalib",
                            "-noqaplots", refcat) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quiet.fits"]
    assert "QAPAGE" not in fits.getheader(tmp_path / "quiet.fits")

    def broken(*args, **kwargs):
        raise RuntimeError("no display\nat all")

    monkeypatch.setattr(podi_plots, "make_plots", broken)
    assert run_collectcells(exposures[2], tmp_path / "frame.fits", f"-cals={cals}", "-fixwcs",
                            refcat) == 0
    assert "QA plots failed: no display at all" in caplog.text
    assert (tmp_path / "frame.fits").stat().st_size > 0
    page = assert_page_links_exist(tmp_path / "frame.qa.html")
    assert page.images == [] and "No plot could be made" in page.all_text


def test_an_unwritable_qa_folder_keeps_the_frame(star_fields, tmp_path, caplog):
    exposures, cals = star_fields
    (tmp_path / "QA").write_text("a file where the QA folder should be")
    output = tmp_path / "frame.fits"
    assert run_collectcells(exposures[2], output, f"-cals={cals}", "-fixwcs", "-qasubdirs",
                            f"-refcat={refcat_of(exposures[2])}") == 0
    assert fits.getheader(output)["NOTAS"] == 4
    assert "QA page not written" in caplog.text
