"""Memory over a night: a process that reduces frame after frame (the night batch will)
does not grow."""

from pathlib import Path

from conftest import refcat_of, run_collectcells

FRAMES = 20
#: Frames reduced before the baseline: caches (masters, tables, fonts) fill up first.
WARM_UP = 5
#: Growth allowed over the remaining frames (MB): allocator noise, not a leak of a
#: frame's images (8 MB per binned OTA) or catalogs.
TOLERANCE_MB = 25.0


def resident_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_no_growth_over_twenty_frames(object_exposure, true_cals, tmp_path):
    output = tmp_path / "frame.fits"
    sizes = []
    for frame in range(FRAMES):
        assert run_collectcells(object_exposure, output, f"-cals={true_cals}", "-photcalib",
                                f"-refcat={refcat_of(object_exposure)}") == 0
        sizes.append(resident_mb())
    growth = sizes[-1] - sizes[WARM_UP - 1]
    assert growth < TOLERANCE_MB, [round(size) for size in sizes]
