"""QA pages in a real browser (headless Chromium) and the night page over several frames."""

import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from matplotlib.image import imread

import podi_qapage
from test_qaplots_pipeline import Page, assert_page_links_exist

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Flags for a headless Chromium on a machine without network or display (each start
#: gets a fresh profile folder).
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")


def chromium(page, tmp_path, *flags):
    """Open a page from disk in headless Chromium; returns (stdout, stderr)."""
    run = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}", *flags,
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, run.stderr


@needs_chromium
@pytest.mark.parametrize("which", ["frame", "night"])
def test_pages_render_in_a_browser_with_every_image(calibrated_fields, tmp_path, which):
    outputs = [output for _, output, _ in calibrated_fields]
    if which == "frame":
        page = outputs[0].parent / "field0.qa.html"
    else:
        page = podi_qapage.write_night_page(outputs, tmp_path / "night.qa.html")
    images = len(Page(page).images)
    dom, log = chromium(page, tmp_path, "--dump-dom")
    # The page's script counts the images that did not load; any console message
    # (a script error, a refused resource) is a fault.
    assert f'data-images="{images} images, 0 broken"' in dom
    assert images == (12 if which == "frame" else 1)
    assert "CONSOLE" not in log, [line for line in log.splitlines() if "CONSOLE" in line]
    screenshot = tmp_path / "page.png"
    chromium(page, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,3000")
    pixels = imread(screenshot)
    assert pixels.shape[:2] == (3000, 1280)
    # Not a blank page: text, tables and plots make many distinct colours.
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2])[::97], axis=0)) > 50


def test_night_page_has_a_row_per_frame_and_links_to_their_pages(calibrated_fields, tmp_path, capsys):
    outputs = [output for _, output, _ in calibrated_fields]
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  =  not a FITS file")
    page = tmp_path / "night.qa.html"
    assert podi_qapage.main([str(outputs[2]), str(outputs[0]), str(outputs[1]), str(broken),
                             f"-output={page}"]) == 0
    assert capsys.readouterr().out.strip() == f"night page: {page}"
    parsed = assert_page_links_exist(page)
    assert parsed.images == ["night.qa.png"]
    height, width = imread(tmp_path / "night.qa.png").shape[:2]
    assert (width, height) == (1000, 800)
    # Rows in time order, each linking to its frame's page.
    headers = sorted((fits.getheader(output) for output in outputs), key=lambda h: h["MJD-OBS"])
    frame_links = [link for link in parsed.links if link.endswith(".qa.html")]
    assert [link.split("/")[-1] for link in frame_links] == [h["QAPAGE"] for h in headers]
    text = parsed.all_text
    for header in headers:
        assert header["OBSID"] in text
        for key, digits in (("SEEING", 2), ("PHOTZP", 3), ("SKYMAG", 2), ("PHOTDPTH", 2),
                            ("WCS_RMS", 3), ("AIRMASS", 2)):
            assert f"{header[key]:.{digits}f}" in text, key
    assert "broken.fits" in text and "unreadable" in text
    assert text.count(" ok ") + text.endswith(" ok") == 3


def test_night_page_of_a_folder_and_errors(calibrated_fields, tmp_path, capsys):
    folder = calibrated_fields[0][1].parent
    page = podi_qapage.write_night_page([folder])
    assert page == folder / podi_qapage.NIGHT_PAGE
    assert len([link for link in Page(page).links if link.endswith(".qa.html")]) == 3
    assert podi_qapage.main([str(tmp_path / "missing.fits")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"podi_qapage: error: {tmp_path / 'missing.fits'}: no such file or folder")
    assert podi_qapage.main(["-colour=red", str(folder)]) == 1
    assert podi_qapage.main([]) == 0 and "Usage: podi_qapage" in capsys.readouterr().out
