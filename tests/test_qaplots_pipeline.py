"""QA plots through the whole program: which files, where, and that they never cost a frame."""

import podi_plots
from conftest import refcat_of, run_collectcells

PER_OTA = ("wcs1", "wcs2", "seeing", "photZP_map")
FULL_FRAME = PER_OTA + ("photZP", "photZP_radial")


def test_plots_in_a_qa_folder_with_per_ota_variants(star_fields, tmp_path):
    exposures, cals = star_fields
    output = tmp_path / "night" / "frame.fits"
    assert run_collectcells(exposures[0], output, f"-cals={cals}", "-fitradialZP", "-qasubdirs",
                            f"-refcat={refcat_of(exposures[0])}") == 0
    qa = output.parent / "QA"
    expected = {qa / f"{plot}.png" for plot in FULL_FRAME}
    expected |= {qa / plot / f"OTA{ota}.png" for plot in PER_OTA for ota in (33, 34, 43, 44)}
    assert {path for path in qa.rglob("*") if path.is_file()} == expected
    assert all(path.stat().st_size > 10_000 for path in expected)


def test_plot_formats_without_per_ota_plots(star_fields, tmp_path):
    exposures, cals = star_fields
    output = tmp_path / "frame.fits"
    assert run_collectcells(exposures[1], output, f"-cals={cals}", "-photcalib", "-nootalevelplots",
                            "-plotformat=png,pdf", f"-refcat={refcat_of(exposures[1])}") == 0
    written = {path.name for path in tmp_path.iterdir()} - {"frame.fits"}
    assert written == {f"frame.{plot}.{fmt}" for plot in FULL_FRAME[:-1] for fmt in ("png", "pdf")}


def test_noqaplots_makes_none_and_a_failing_plot_keeps_the_frame(star_fields, tmp_path, caplog,
                                                                  monkeypatch):
    exposures, cals = star_fields
    refcat = f"-refcat={refcat_of(exposures[2])}"
    assert run_collectcells(exposures[2], tmp_path / "quiet.fits", f"-cals={cals}", "-photcalib",
                            "-noqaplots", refcat) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quiet.fits"]

    def broken(*args, **kwargs):
        raise RuntimeError("no display\nat all")

    monkeypatch.setattr(podi_plots, "make_plots", broken)
    assert run_collectcells(exposures[2], tmp_path / "frame.fits", f"-cals={cals}", "-fixwcs",
                            refcat) == 0
    assert "QA plots failed: no display" in caplog.text
    assert (tmp_path / "frame.fits").stat().st_size > 0
