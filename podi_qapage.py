"""Quick-look pages: one static HTML page per reduced frame, and one over a night.

Both open from disk in any browser, with no server and no network: plain HTML with
its style inline, images referenced by relative paths, and a few lines of script
that only mark images that did not load.

**Frame page** (:func:`write_frame_page`, written by ``podi_collectcells`` after the
QA plots): ``<output minus .fits>.qa.html`` next to the frame, or ``index.html`` in
the QA folder with ``-qasubdirs``. At the top what failed and why, the key numbers
of the primary header (OTAs, WCS, seeing, zero point, sky, depth, seconds), every
warning of the run; then the plots of :mod:`podi_plots`, the preview first.

**Night page** (:func:`write_night_page`, command ``podi_qapage FRAME.fits... [-output=FILE]``):
a table with a row per frame read from its primary header (time, object, filter,
airmass, seeing, sky, zero point, depth, WCS rms, status) linking to each frame's
page (header keyword ``QAPAGE``), and a figure of seeing, sky brightness and zero
point through the night.

Units as in the header: seeing and WCS rms in arcsec, zero point and depth in mag,
sky brightness in mag/arcsec^2, sky level in BUNIT, times UT.
"""

import html
import logging
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from podi_mef import replaced_atomically

logger = logging.getLogger("podi_qapage")

#: File types a browser shows as an image; other plot formats are linked.
BROWSER_IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
#: Default name of the night page, in the frames' common folder.
NIGHT_PAGE = "night.qa.html"
#: Night figure: size (inches) and resolution.
NIGHT_FIGURE_SIZE = (10, 8)
NIGHT_DPI = 100

STYLE = """
body { font-family: sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.5em; border-bottom: 1px solid #ccc; }
.sub { color: #555; margin-top: 0; }
.status { padding: 0.5em 1em; border-radius: 4px; margin: 1em 0; }
.status.ok { background: #e3f4e1; border: 1px solid #7bb874; }
.status.bad { background: #fdecea; border: 1px solid #e0837a; }
.status ul { margin: 0.3em 0; }
table { border-collapse: collapse; }
td, th { padding: 0.25em 0.8em; text-align: left; border-bottom: 1px solid #e4e4e4; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fdecea; }
.warnings li { font-family: monospace; white-space: pre-wrap; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
.otas { display: flex; flex-wrap: wrap; gap: 0.5em; width: 100%; }
.otas figure { margin: 0; width: 24em; }
img.broken { outline: 3px solid red; }
"""

#: Marks images that did not load (red outline) and counts them in ``<body data-images>``.
SCRIPT = """
window.addEventListener("load", function () {
  var broken = 0;
  Array.prototype.forEach.call(document.images, function (img) {
    if (!img.complete || img.naturalWidth === 0) { broken += 1; img.classList.add("broken"); }
  });
  document.body.setAttribute("data-images", document.images.length + " images, " + broken + " broken");
});
"""


# --- Paths -----------------------------------------------------------------------------

def frame_page_path(output, qasubdirs=False, qasubdirname="QA"):
    """The QA page of a frame: ``<output minus .fits>.qa.html`` next to it, or
    ``<dir>/<qasubdirname>/index.html`` with ``-qasubdirs``."""
    output = Path(output)
    if qasubdirs:
        return output.parent / qasubdirname / "index.html"
    from podi_plots import frame_stem
    return output.parent / f"{frame_stem(output)}.qa.html"


def relative_link(target, page):
    """URL of ``target`` relative to the folder of ``page`` (both paths)."""
    relative = os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)
    return "/".join(html.escape(part, quote=True) for part in Path(relative).parts)


def png_size(path):
    """(width, height) of a PNG file from its header, or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError:
        return None
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def write_atomically(path, text):
    """Write text to path through a temporary file and a rename: a reader never sees
    half a page."""
    with replaced_atomically(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


# --- Numbers of a primary header -----------------------------------------------------------

def number(header, key, digits, unit=""):
    """A header value formatted with ``digits`` decimals and a unit, or None if absent
    or not a finite number."""
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return f"{value:.{digits}f}{unit}"


def text(value):
    return html.escape(str(value).strip())


def frame_numbers(header):
    """(label, HTML of the value) rows of a frame's key numbers from its primary header.

    Each value names its keyword in a ``data-key`` attribute."""
    def cell(key, digits, unit=""):
        shown = number(header, key, digits)
        return f'<span data-key="{key}">{shown}</span>{text(unit)}' if shown is not None else "?"

    rows = []
    failed = f", failed: OTA {text(header['FAILOTAS'])}" if header.get("FAILOTAS") else ""
    rows.append(("OTAs", f'{cell("NOTAS", 0)} reduced, {cell("NFAILED", 0)} failed{failed}'))
    if header.get("WCSCAL"):
        rows.append(("WCS", f'rms {cell("WCS_RMS", 3, chr(34))} from {cell("WCS_NSRC", 0)} matched '
                            f'stars (RA {cell("WCS_RMSA", 3, chr(34))}, Dec {cell("WCS_RMSD", 3, chr(34))})'))
    elif "WCSCAL" in header:
        rows.append(("WCS", f"not calibrated ({text(header.get('WCSMSG', ''))}): the canned WCS is kept"))
    if number(header, "SEEING", 2) is not None and header["SEEING"] > 0:
        rows.append(("Seeing", f'{cell("SEEING", 2, chr(34))} FWHM ({cell("SEEING_N", 0)} stars)'))
    if header.get("PHOTCAL"):
        rows.append(("Zero point", f'{cell("PHOTZP", 4)} &plusmn; {cell("PHOTZPER", 4)} mag '
                                   f'(scatter {cell("PHOTZPSD", 3)} mag, {cell("PHOTZP_N", 0)} stars, '
                                   f'{text(header.get("PHOTBAND", ""))} band)'))
    elif "PHOTCAL" in header:
        rows.append(("Zero point", f"not determined ({text(header.get('PHOTMSG', ''))})"))
    sky = f'{cell("SKYLEVEL", 1)} {text(header.get("BUNIT", ""))}'
    if "SKYMAG" in header:
        sky += f', {cell("SKYMAG", 2)} mag/arcsec&sup2;'
    rows.append(("Sky", sky))
    if "PHOTDPTH" in header:
        rows.append(("Depth", f'{cell("PHOTDPTH", 2)} mag (5 &sigma; point source)'))
    return rows


# --- Frame page ----------------------------------------------------------------------------

class WarningCollector(logging.Handler):
    """While attached (``with``), keeps every warning and error logged, one line each."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(" ".join(record.getMessage().split()))

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


@dataclass
class RunReport:
    """What a run tells the page beyond the header.

    Attributes
    ----------
    failures : dict
        OTA -> why it failed (one line).
    warnings : list of str
        Every warning and error logged during the run, in order.
    seconds : float
        Wall time of the reduction until the frame was written (s).
    qa_seconds : float
        Wall time of the QA plots (s).
    """

    failures: dict
    warnings: list
    seconds: float
    qa_seconds: float = 0.0


def problems(header, report):
    """What failed, each with why (``WCSMSG``, ``PHOTMSG``, the OTAs' errors, the plots'
    warnings), as lines of HTML."""
    lines = [f"OTA {ota:02d} failed: {text(why)}" for ota, why in sorted(report.failures.items())]
    for key, what, why in (("WCSCAL", "WCS not calibrated", "WCSMSG"),
                           ("PHOTCAL", "No photometric zero point", "PHOTMSG")):
        if key in header and not header[key]:
            lines.append(f"{what}: {text(header.get(why, 'see the warnings'))}")
    lines += [text(w) for w in report.warnings if w.startswith("QA plot")]
    return lines


def figure_html(plot_files, page, title):
    """One plot: its image (if a browser shows its format) and links to every file."""
    shown = next((path for path in plot_files.paths if path.suffix.lower() in BROWSER_IMAGES), None)
    links = " ".join(f'<a href="{relative_link(path, page)}">{text(path.suffix[1:])}</a>'
                     for path in plot_files.paths)
    image = ""
    if shown is not None:
        size = png_size(shown)
        dimensions = f' width="{size[0]}" height="{size[1]}"' if size else ""
        image = (f'<a href="{relative_link(shown, page)}"><img src="{relative_link(shown, page)}"'
                 f' alt="{text(title)}"{dimensions}></a>')
    return f'<figure id="{text(plot_files.plot)}-{text(plot_files.ota)}">{image}' \
           f'<figcaption>{text(title)} &middot; {links}</figcaption></figure>'


def plots_html(plots, page):
    """The plots in the order written; one OTA's plots of a kind side by side."""
    from podi_plots import PANELS, PLOTS
    parts, per_ota = [], {}
    for files in plots:
        title = PLOTS[files.plot].title
        if files.ota is None:
            parts.append(figure_html(files, page, title))
        elif files.ota == PANELS:
            parts.append(figure_html(files, page, f"{title} per OTA"))
        else:
            if files.plot not in per_ota:
                per_ota[files.plot] = []
                parts.append(per_ota[files.plot])
            per_ota[files.plot].append(figure_html(files, page, f"{title} OTA {files.ota:02d}"))
    return "\n".join(part if isinstance(part, str) else f'<div class="otas">{"".join(part)}</div>'
                     for part in parts)


def frame_page(header, report, plots, page, output):
    """The HTML of a frame's QA page.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The frame's primary header as written.
    report : RunReport
    plots : list of podi_plots.PlotFiles
        The plots written.
    page : pathlib.Path
        Where the page goes (links are relative to its folder).
    output : pathlib.Path
        The frame.
    """
    title = f"{header.get('OBSID', '')} {header.get('OBJECT', '')}".strip()
    failed = problems(header, report)
    status = ('<div class="status bad"><strong>Problems</strong><ul>'
              + "".join(f"<li>{line}</li>" for line in failed) + "</ul></div>") if failed else \
        '<div class="status ok">Every step succeeded.</div>'
    rows = frame_numbers(header) + [
        ("Time", f"reduction {report.seconds:.1f} s, QA plots {report.qa_seconds:.1f} s")]
    numbers = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    warnings = "".join(f"<li>{text(w)}</li>" for w in report.warnings) or "<li>none</li>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>QA {text(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{text(title)} &middot; {text(header.get('FILTER', ''))} &middot; {number(header, 'EXPTIME', 0, ' s') or ''}</h1>
<p class="sub">{text(header.get('DATE-OBS', ''))} UT &middot; airmass {number(header, 'AIRMASS', 2) or '?'}
&middot; binning {text(header.get('BINNING', '?'))} &middot; {text(header.get('PLVER', ''))}
&middot; <a href="{relative_link(output, page)}">{text(Path(output).name)}</a></p>
{status}
<table class="numbers">{numbers}</table>
<h2>Warnings ({len(report.warnings)})</h2>
<ul class="warnings">{warnings}</ul>
<h2>Plots</h2>
<div class="plots">{plots_html(plots, page) or '<p>No plot could be made.</p>'}</div>
<script>{SCRIPT}</script>
</body>
</html>
"""


def write_frame_page(page, header, report, plots, output):
    """Write a frame's QA page (:func:`frame_page`) atomically; returns its path."""
    write_atomically(page, frame_page(header, report, plots, Path(page), Path(output)))
    return Path(page)


# --- Night page -------------------------------------------------------------------------------

@dataclass
class NightRow:
    """One frame of the night: its file, primary header (None if unreadable), problem."""

    path: Path
    header: object
    error: str = ""

    @property
    def mjd(self):
        value = self.header.get("MJD-OBS") if self.header is not None else None
        return float(value) if isinstance(value, (int, float)) else math.inf

    def status(self):
        """"ok", or what went wrong, in a few words."""
        if self.header is None:
            return f"unreadable: {self.error}"
        issues = []
        if self.header.get("NFAILED"):
            issues.append(f"{self.header['NFAILED']} OTA(s) failed")
        if "WCSCAL" in self.header and not self.header["WCSCAL"]:
            issues.append("no WCS")
        if "PHOTCAL" in self.header and not self.header["PHOTCAL"]:
            issues.append("no ZP")
        return ", ".join(issues) or "ok"


def read_night(frames):
    """:class:`NightRow` of every frame (files, or folders whose ``*.fits`` are taken),
    in time order; an unreadable file is a row with its error."""
    from astropy.io import fits
    paths = []
    for frame in map(Path, frames):
        paths += sorted(frame.glob("*.fits")) if frame.is_dir() else [frame]
    rows = []
    for path in paths:
        try:
            rows.append(NightRow(path, fits.getheader(path)))
        except (OSError, ValueError, IndexError) as error:
            rows.append(NightRow(path, None, " ".join(str(error).split()) or type(error).__name__))
    return sorted(rows, key=lambda row: (row.mjd, str(row.path)))


#: Night table: heading, header keyword, decimals (None: text).
NIGHT_COLUMNS = (("time (UT)", "DATE-OBS", None), ("object", "OBJECT", None), ("filter", "FILTER", None),
                 ("exp. [s]", "EXPTIME", 0), ("airmass", "AIRMASS", 2), ("seeing [\"]", "SEEING", 2),
                 ("sky [mag/arcsec\u00b2]", "SKYMAG", 2), ("zero point [mag]", "PHOTZP", 3),
                 ("depth [mag]", "PHOTDPTH", 2), ("WCS rms [\"]", "WCS_RMS", 3))


def night_row_html(row, page):
    """One table row: the frame (linking to its QA page where there is one) and its numbers."""
    header = row.header
    link = None
    if header is not None and header.get("QAPAGE"):
        target = row.path.parent / str(header["QAPAGE"])
        if target.exists():
            link = relative_link(target, page)
    name = text(header.get("OBSID", row.path.name) if header is not None else row.path.name)
    cells = [f'<td><a href="{link}">{name}</a></td>' if link else f"<td>{name}</td>"]
    for _, key, digits in NIGHT_COLUMNS:
        if header is None:
            cells.append("<td></td>")
        elif digits is None:
            cells.append(f"<td>{text(header.get(key, ''))}</td>")
        else:
            cells.append(f'<td class="num" data-key="{key}">{number(header, key, digits) or ""}</td>')
    status = row.status()
    cells.append(f"<td>{text(status)}</td>")
    return f'<tr{"" if status == "ok" else " class=failed"}>{"".join(cells)}</tr>'


def night_figure(rows, path):
    """Seeing, sky brightness and zero point against time (UT hours since the night's
    first midnight), one colour per filter; written to path (png). False if no frame
    has a time."""
    from matplotlib.figure import Figure
    timed = [row for row in rows if row.header is not None and math.isfinite(row.mjd)]
    if not timed:
        return False
    midnight = math.floor(min(row.mjd for row in timed))
    figure = Figure(figsize=NIGHT_FIGURE_SIZE, dpi=NIGHT_DPI)
    axes = figure.subplots(3, 1, sharex=True)
    filters = sorted({str(row.header.get("FILTER", "?")).strip() for row in timed})
    for (label, key, invert), ax in zip((("seeing [arcsec]", "SEEING", False),
                                         ("sky [mag/arcsec$^2$]", "SKYMAG", True),
                                         ("zero point [mag]", "PHOTZP", False)), axes):
        for name in filters:
            points = [((row.mjd - midnight) * 24, row.header[key]) for row in timed
                      if str(row.header.get("FILTER", "?")).strip() == name
                      and number(row.header, key, 3) is not None and not (key == "SEEING" and row.header[key] <= 0)]
            if points:
                hours, values = zip(*points)
                ax.plot(hours, values, "o", markersize=5, label=name)
        if invert:
            ax.invert_yaxis()  # brighter sky up
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.4)
    if axes[0].get_legend_handles_labels()[0]:  # frames without seeing plot nothing here
        axes[0].legend(loc="best", fontsize=8, title="filter")
    axes[0].set_title(f"The night of MJD {midnight} ({len(timed)} frames)")
    axes[-1].set_xlabel(f"UT hours since MJD {midnight}")
    figure.tight_layout()
    from podi_plots import save_figure
    save_figure(figure, path, NIGHT_DPI)
    return True


def write_night_page(frames, page=None):
    """Write the night page over reduced frames and its figure ``<page stem>.png``.

    Parameters
    ----------
    frames : iterable of str or pathlib.Path
        Reduced frames, or folders of them.
    page : str or pathlib.Path, optional
        Default: :data:`NIGHT_PAGE` in the frames' common folder.

    Returns
    -------
    pathlib.Path
        The page.
    """
    rows = read_night(frames)
    if not rows:
        raise ValueError("no reduced frame given")
    if page is None:
        page = Path(os.path.commonpath([str(row.path.resolve().parent) for row in rows])) / NIGHT_PAGE
    page = Path(page)
    figure = page.with_suffix(".png")
    plotted = night_figure(rows, figure)
    head = "".join(f"<th>{text(heading)}</th>" for heading in ("frame",) + tuple(c[0] for c in NIGHT_COLUMNS)
                   + ("status",))
    body = "\n".join(night_row_html(row, page) for row in rows)
    good = sum(row.status() == "ok" for row in rows)
    image = (f'<figure><img src="{relative_link(figure, page)}" alt="seeing, sky and zero point through '
             f'the night"></figure>') if plotted else "<p>No frame has a time to plot.</p>"
    write_atomically(page, f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>QA of the night: {len(rows)} frames</title><style>{STYLE}</style></head>
<body>
<h1>{len(rows)} frames, {good} without problems</h1>
{image}
<table><tr>{head}</tr>
{body}
</table>
<script>{SCRIPT}</script>
</body>
</html>
""")
    return page


# --- Command line -----------------------------------------------------------------------------

USAGE = """Usage: podi_qapage FRAME.fits... [-output=FILE]

Writes one page over reduced frames (files, or folders of them): a table with a row per
frame linking to its QA page, and seeing, sky brightness and zero point through the night.

  -output=FILE    the page (default: night.qa.html in the frames' common folder)
  -help           print this text"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(arg in ("-help", "--help", "-h") for arg in argv):
        print(USAGE)
        return 0
    page = None
    frames = []
    for arg in argv:
        if arg.startswith("-output="):
            page = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            print(f"podi_qapage: error: unknown flag {arg}", file=sys.stderr)
            return 1
        else:
            frames.append(arg)
    missing = [frame for frame in frames if not Path(frame).exists()]
    if missing or not frames:
        print(f"podi_qapage: error: {missing[0] if missing else 'no frame'}: no such file or folder",
              file=sys.stderr)
        return 1
    try:
        written = write_night_page(frames, page)
    except (OSError, ValueError) as error:
        print(f"podi_qapage: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"night page: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
