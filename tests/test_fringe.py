"""Fringe vectors, scale and templates (podi_fringe, podi_fringetemplate) against known truth.

The synthetic fringe pattern P is a sum of cosines with 160-280 unbinned pixel
periods (the real vectors, half a period long, have a median length of 118 px)
and a relative amplitude of up to 4 %; data are ``sky + s_true * P + noise`` at
binning 2, so the true scale is ``s_true`` ADU per unit of template. Shorter
periods are checked too (test_short_periods_give_an_unbiased_scale).
"""

import time

import numpy as np
import pytest

from podi_fringe import BOX_SIZE, FringeError, clipped_scale, measure_vectors, read_fringe_vectors
from podi_fringetemplate import (choose_fringe_vectors, combine_fringe_frames, relative_fringes,
                                 write_fringe_vectors)
from podi_stats import bin_image

BINNING = 2
SIZE = 2048  # a binning-2 OTA
SKY = 2000.0  # ADU per binned pixel
NOISE = 40.0  # ADU: Poisson noise of that sky at a gain of 1.3 e-/ADU
HEADER = (
    "# Region file format: DS9 version 4.1\n"
    'global color=green dashlist=8 3 width=1 font="helvetica 10 normal roman" select=1 '
    "highlite=1 dash=0 fixed=0 edit=1 move=1 delete=1 include=1 source=1\n"
    "image\n"
)
#: (period in unbinned pixels, direction in degrees, phase) of the cosines of P.
WAVES = [(160, 20, 0.3), (280, 110, 1.0), (220, 60, 2.0), (190, 150, 0.5)]


def fringe_pattern(size=SIZE, binning=BINNING, amplitude=0.01, waves=WAVES):
    """Relative fringe pattern P: float32 ``(size, size)``, values within +-4 x amplitude."""
    # Unbinned coordinates of the binned pixel centres.
    y, x = (np.mgrid[0:size, 0:size] + 0.5) * binning - 0.5
    pattern = np.zeros((size, size))
    for period, direction, phase in waves:
        theta = np.radians(direction)
        pattern += np.cos(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period + phase)
    return (amplitude * pattern).astype(np.float32)


def add_stars(image, rng, count, fwhm=4.0, peak=(200.0, 20000.0)):
    """Add Gaussian stars (binned pixels) in place; return their (x, y, peak)."""
    size = image.shape[0]
    sigma = fwhm / 2.3548
    half = int(6 * sigma * np.sqrt(np.log10(peak[1]))) + 1  # out to ~1e-4 of the peak
    x, y = rng.uniform(half + 1, size - half - 1, (2, count))
    peaks = rng.uniform(*peak, count)
    for xc, yc, p in zip(x, y, peaks):
        x0, y0 = int(xc) - half, int(yc) - half
        yy, xx = np.mgrid[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1]
        image[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1] += (
            p * np.exp(-((xx - xc) ** 2 + (yy - yc) ** 2) / (2 * sigma**2)))
    return np.column_stack([x, y, peaks])


def star_profile(shape, stars, fwhm=4.0):
    """Sum of the star profiles of :func:`add_stars` over a whole array."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    sigma = fwhm / 2.3548
    total = np.zeros(shape)
    for xc, yc, p in stars:
        total += p * np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2 * sigma**2))
    return total


@pytest.fixture(scope="module")
def pattern():
    return fringe_pattern()


@pytest.fixture(scope="module")
def vectors(pattern):
    return choose_fringe_vectors(pattern, BINNING)


def observed(pattern, scale, seed, nan_regions=True, stars=20):
    """A binning-2 OTA: sky + scale x pattern + noise, NaN regions and stars (ADU)."""
    rng = np.random.default_rng(seed)
    data = SKY + scale * pattern + rng.normal(0, NOISE, pattern.shape)
    add_stars(data, rng, stars)
    if nan_regions:
        data[300:420, 500:900] = np.nan  # a dead region
        data[:, 1000:1004] = np.nan  # a bad column group
    return data.astype(np.float32)


# --- Vector files -------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.uniform(0, 4095, (50, 4))
    path = tmp_path / "fringevectors__odi_z__OTA33.reg"
    write_fringe_vectors(path, vectors)
    text = path.read_text()
    assert text.startswith(HEADER)
    assert text.count("# vector(") == 50 and text.count(") vector=1\n") == 50
    np.testing.assert_allclose(read_fringe_vectors(path), vectors, atol=1e-4)


def test_read_converts_ds9_to_zero_based(tmp_path):
    path = tmp_path / "v.reg"
    path.write_text(HEADER
                    + "# vector(1621,2449,85.603738,322.59464) vector=1\n"
                    + "vector(101,201,100,90) vector=1 color=red\n"  # not commented
                    + "\n# a comment\ncircle(100,100,20)\n"  # ignored
                    + "# vector(11,21,10,180) vector=1 font=\"helvetica 10 normal\"\n")
    vectors = read_fringe_vectors(path)
    theta = np.radians(322.59464)
    expected = [[1620, 2448, 1620 + 85.603738 * np.cos(theta), 2448 + 85.603738 * np.sin(theta)],
                [100, 200, 100, 300],
                [10, 20, 0, 20]]
    np.testing.assert_allclose(vectors, expected, atol=1e-9)


def test_read_empty_file(tmp_path):
    (tmp_path / "header.reg").write_text(HEADER)
    (tmp_path / "empty.reg").write_text("")
    for name in ("header.reg", "empty.reg"):
        vectors = read_fringe_vectors(tmp_path / name)
        assert vectors.shape == (0, 4) and vectors.dtype == float
    write_fringe_vectors(tmp_path / "none.reg", np.empty((0, 4)))
    assert read_fringe_vectors(tmp_path / "none.reg").shape == (0, 4)


@pytest.mark.parametrize("content", [None, b"\x89PNG\r\n\x1a\n\x00\xff\xfe", b"not a region\n",
                                     b"fk5\n# vector(1,2,3,4) vector=1\n",
                                     b"# vector(1,2,x,4) vector=1\n"])
def test_unreadable_file_raises_fringe_error(tmp_path, content):
    path = tmp_path / "fringevectors__odi_i__OTA22.reg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FringeError) as info:
        read_fringe_vectors(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_write_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        write_fringe_vectors(tmp_path / "v.reg", np.zeros((3, 3)))


def test_real_vector_files_read(mastercals):
    folder = mastercals / "fringevectors"
    paths = sorted(folder.glob("*/odi_[iz]/fringevectors__*__OTA*.reg"))
    if not paths:
        pytest.skip(f"no fringe vector files under {folder}")
    for path in paths:
        vectors = read_fringe_vectors(path)
        assert vectors.ndim == 2 and vectors.shape[1] == 4 and len(vectors) > 0, path
        assert np.all((vectors >= 0) & (vectors < 4096)), path


# --- Measurement and scale ---------------------------------------------------------


def test_box_convention_matches_between_binnings():
    """At even unbinned coordinates a box covers the same pixels at binning 1 and 2.

    (Elsewhere binned boxes can be one unbinned pixel off.) On a linear image the
    box median is the value at the box centre.
    """
    unbinned = np.add.outer(np.arange(400) * 3.0, np.arange(400) * 1.0)  # 3 y + x
    binned = unbinned.reshape(200, 2, 200, 2).mean(axis=(1, 3))
    vectors = [[100, 150, 250, 120], [36, 42, 302, 222]]
    one = measure_vectors(unbinned, unbinned, vectors, 1)
    two = measure_vectors(binned, binned, vectors, 2)
    np.testing.assert_allclose(two.d_dark, one.d_dark)
    np.testing.assert_allclose(two.d_bright, one.d_bright)
    # A 20-pixel box at binning 1 centred on pixel (100, 150) spans 90..109, 140..159.
    assert one.d_dark[0] == pytest.approx(3 * 149.5 + 99.5)


def test_outside_and_all_nan_vectors_are_skipped():
    size = 200
    image = np.ones((size, size), np.float32)
    template = np.ones((size, size), np.float32)
    template[:, size // 2:] = 2
    image[:, size // 2:] = 5
    image[40:60, 140:160] = np.nan  # all-NaN box around unbinned (300, 100)
    template[140:150, 140:145] = np.nan  # half of the template box around (290, 290)
    vectors = np.array([
        [100, 100, 300, 300],  # measured
        [100, 300, 290, 290],  # measured: half of the template box is NaN
        [-50, 100, 300, 300],  # dark box outside
        [8, 100, 300, 300],  # dark box reaches outside by one pixel (binned 4-5..)
        [100, 100, 395, 300],  # bright box outside
        [100, 100, 300, 100],  # bright box all NaN in the data
        [1e6, -1e6, 3e6, 0],
    ])
    measured = measure_vectors(image, template, vectors, 2)
    np.testing.assert_array_equal(measured.index, [0, 1])
    assert measured.n_skipped == 5
    np.testing.assert_allclose(measured.ratio, [4.0, 4.0])
    # Nothing to measure is no error either.
    empty = measure_vectors(image, template, np.empty((0, 4)), 2)
    assert empty.n_skipped == 0 and empty.ratio.size == 0
    assert not clipped_scale(empty.ratio).ok


def test_clipped_scale_rejects_outliers():
    rng = np.random.default_rng(5)
    ratios = np.concatenate([rng.normal(1000, 50, 200), [1e8, -3e5, 5e9, np.nan, np.inf, 0]])
    scale, std, n_used, ok = clipped_scale(ratios)
    assert ok and n_used >= 195
    assert scale == pytest.approx(1000, abs=15)
    assert std == pytest.approx(50, rel=0.2)
    # Too few ratios are never ok, even when they agree.
    assert not clipped_scale([1000.0, 1001.0]).ok
    assert clipped_scale([1000.0, 1001.0, 999.0]).ok
    assert clipped_scale([]).n_used == 0


def test_scale_recovered(pattern, vectors):
    """One OTA: the scale within 3 standard errors (about 0.6 % here)."""
    s_true = SKY  # the pattern's relative amplitude on this sky
    data = observed(pattern, s_true, seed=11)
    measured = measure_vectors(data, pattern, vectors, BINNING)
    result = clipped_scale(measured.ratio)
    assert result.ok
    assert result.n_used > 100
    assert result.error < 0.01 * s_true
    assert abs(result.scale - s_true) < 3 * result.error
    # A faint-fringe frame: the same within its (larger relative) error.
    faint = clipped_scale(measure_vectors(observed(pattern, 300.0, seed=12), pattern, vectors,
                                          BINNING).ratio)
    assert faint.ok and abs(faint.scale - 300.0) < 3 * faint.error


def test_scale_of_fringe_free_frame_is_zero(pattern, vectors):
    """Without fringes the scale is consistent with 0 and not ok.

    The original pipeline kept only ratios in (0, 1e9); here that positive half
    would give a spurious scale of several standard errors.
    """
    data = observed(pattern, 0.0, seed=13)
    ratios = measure_vectors(data, pattern, vectors, BINNING).ratio
    result = clipped_scale(ratios)
    assert not result.ok
    assert abs(result.scale) < 3 * result.error
    assert np.median(ratios[ratios > 0]) > 3 * result.error


def test_frame_scale_from_several_otas(pattern, vectors):
    """The frame-wide scale (the OTAs' ratios concatenated) is within 1 %."""
    s_true = SKY
    ratios = [measure_vectors(observed(pattern, s_true, seed), pattern, vectors, BINNING).ratio
              for seed in (21, 22, 23, 24)]
    frame = clipped_scale(np.concatenate(ratios))
    per_ota = [clipped_scale(r) for r in ratios]
    assert frame.ok and frame.n_used > max(r.n_used for r in per_ota)
    assert frame.error < min(r.error for r in per_ota)
    assert abs(frame.scale - s_true) < 0.01 * s_true
    assert abs(frame.scale - s_true) < 3 * frame.error


def test_short_periods_give_an_unbiased_scale():
    """With 75-260 px periods a noiseless template's box medians exceed its box means at
    extrema while noisy data's medians follow the means: box medians on both sides made
    the scale ~1.5 % low. With the template's box means it is unbiased."""
    s_true = SKY
    pattern = fringe_pattern(waves=[(120, 20, 0.3), (260, 110, 1.0), (75, 60, 2.0),
                                    (180, 150, 0.5)])
    vectors = choose_fringe_vectors(pattern, BINNING)
    result = clipped_scale(measure_vectors(observed(pattern, s_true, seed=11), pattern,
                                           vectors, BINNING).ratio)
    assert abs(result.scale - s_true) < 3 * result.error + 0.003 * s_true


def test_measure_speed(capsys):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((4096, 4096), dtype=np.float32)
    template = rng.standard_normal((4096, 4096), dtype=np.float32)
    image[:100] = np.nan
    dark = rng.uniform(0, 4096, (400, 2))
    vectors = np.column_stack([dark, dark + rng.uniform(-300, 300, (400, 2))])
    start = time.perf_counter()
    measured = measure_vectors(image, template, vectors, 1)
    elapsed = time.perf_counter() - start
    assert len(measured.index) + measured.n_skipped == 400
    with capsys.disabled():
        print(f"\nmeasure_vectors: 400 vectors on a 4096x4096 OTA in {elapsed * 1000:.0f} ms")


# --- Choosing vectors --------------------------------------------------------------


def test_chosen_vectors_connect_dark_to_bright(pattern, vectors):
    assert 100 <= len(vectors) <= 200
    length = np.hypot(vectors[:, 2] - vectors[:, 0], vectors[:, 3] - vectors[:, 1])
    assert np.all((length >= 20) & (length <= 300))
    measured = measure_vectors(pattern, pattern, vectors, BINNING)
    assert measured.n_skipped == 0
    contrast = measured.f_bright - measured.f_dark
    # Strongly positive: a good fraction of the pattern's peak-to-peak range.
    assert contrast.min() > 0.2 * (pattern.max() - pattern.min())
    # Ends are local extrema: a box one box width away is brighter than the dark
    # end and darker than the bright end.
    for dx, dy in ((BOX_SIZE, 0), (-BOX_SIZE, 0), (0, BOX_SIZE), (0, -BOX_SIZE)):
        shifted = measure_vectors(pattern, pattern, vectors + [dx, dy, dx, dy], BINNING)
        inner = np.isin(measured.index, shifted.index)
        assert np.all(shifted.f_dark > measured.f_dark[inner])
        assert np.all(shifted.f_bright < measured.f_bright[inner])
    # Strongest first (up to the difference of box mean and median) and spread
    # over the OTA (every quadrant).
    assert np.all(np.diff(contrast) < 0.05 * contrast[0])
    quadrant = (vectors[:, 0] >= 2048).astype(int) + 2 * (vectors[:, 1] >= 2048)
    assert np.bincount(quadrant, minlength=4).min() >= 0.15 * len(vectors)


def test_choose_respects_nan_noise_and_cap(pattern):
    rng = np.random.default_rng(8)
    template = pattern + rng.normal(0, 0.004, pattern.shape).astype(np.float32)
    template[600:900, 600:900] = np.nan
    chosen = choose_fringe_vectors(template, BINNING, max_vectors=60)
    assert 0 < len(chosen) <= 60
    half = BOX_SIZE // BINNING // 2
    for column in ((0, 1), (2, 3)):
        x, y = np.floor((chosen[:, column] + 0.5) / BINNING).T
        # Boxes clear of the NaN square and inside the OTA.
        clear = (x + half <= 600) | (x - half >= 900) | (y + half <= 600) | (y - half >= 900)
        assert np.all(clear)
        assert np.all((x >= half) & (x + half <= SIZE) & (y >= half) & (y + half <= SIZE))
    measured = measure_vectors(pattern, pattern, chosen, BINNING)
    assert measured.n_skipped == 0 and np.all(measured.f_bright > measured.f_dark)
    # A template of pure noise has no significant pairs; a flat one or one without
    # data has none at all.
    noise = rng.normal(0, 0.004, (512, 512)).astype(np.float32)
    assert len(choose_fringe_vectors(noise, BINNING)) <= 2
    for flat in (np.zeros((SIZE, SIZE), np.float32), np.full((512, 512), np.nan, np.float32)):
        assert choose_fringe_vectors(flat, BINNING).shape == (0, 4)


def test_chosen_vectors_round_trip(tmp_path, vectors):
    path = tmp_path / "fringevectors__odi_i__OTA33.reg"
    write_fringe_vectors(path, vectors)
    np.testing.assert_allclose(read_fringe_vectors(path), vectors, atol=1e-4)


# --- Templates ---------------------------------------------------------------------


def test_relative_fringes_masks_stars_keeps_fringes():
    rng = np.random.default_rng(17)
    pattern = fringe_pattern(512)
    image = SKY + SKY * pattern + rng.normal(0, NOISE, pattern.shape)
    stars = add_stars(image, rng, 15)
    relative = relative_fringes(image.astype(np.float32), SKY, binning=BINNING)
    assert relative.dtype == np.float32
    masked = np.isnan(relative)
    # Every pixel a star raises by more than half the pixel noise is masked.
    assert np.all(masked[star_profile(image.shape, stars) > 0.5 * NOISE])
    # Fringes: little masked besides the stars, and not the fringe peaks.
    assert masked.mean() < 0.06
    peaks = np.abs(pattern) > 0.6 * np.abs(pattern).max()
    assert masked[peaks].mean() < 0.05
    residual = relative - pattern
    assert abs(np.nanmean(residual)) < 1e-3
    assert np.nanstd(residual) == pytest.approx(NOISE / SKY, rel=0.05)
    # Without masking, the stars stay.
    assert np.isfinite(relative_fringes(image, SKY, mask_sources=False)).all()


def test_relative_fringes_with_sky_map_and_nan():
    pattern = fringe_pattern(256)
    sky = np.linspace(1500, 2500, 256)[None, :]  # a sky gradient
    image = sky * (1 + pattern)
    image[10:30, 10:30] = np.nan
    relative = relative_fringes(image, sky, binning=BINNING)
    assert np.isnan(relative[10:30, 10:30]).all()
    np.testing.assert_allclose(relative[~np.isnan(relative)], pattern[~np.isnan(relative)],
                               atol=1e-6)


def test_combined_frames_recover_pattern():
    rng = np.random.default_rng(19)
    amplitude = 0.01
    pattern = fringe_pattern(512, amplitude=amplitude)
    nframes = 7
    frames = []
    starlight = np.zeros(pattern.shape)  # relative to the sky, summed over frames
    for i in range(nframes):
        sky = SKY * (0.8 + 0.1 * i)  # the sky changes; the relative pattern does not
        image = sky + sky * pattern + rng.normal(0, NOISE, pattern.shape)
        stars = add_stars(image, rng, 25)  # new positions in every frame (dithers)
        starlight += star_profile(pattern.shape, stars) / sky
        image[:, 100 + 40 * i:110 + 40 * i] = np.nan
        frames.append(relative_fringes(image.astype(np.float32), sky, binning=BINNING))
    template = combine_fringe_frames(frames)
    assert template.dtype == np.float32 and template.shape == pattern.shape
    assert np.isfinite(template).all()
    residual = template - pattern
    # Median of ~7 values: about 1.25 x noise / sqrt(7) of one frame (NOISE / SKY at most).
    assert np.std(residual) < 1.4 * NOISE / SKY / np.sqrt(nframes)
    # No star left: no bias where stars were (unmasked frames leave +0.004 there),
    # and 4x4-pixel means free of outliers (unmasked: 8 sigma).
    assert abs(np.mean(residual[starlight > 0.01])) < 5e-4
    blocks = bin_image(residual, 4)
    assert np.abs(blocks).max() < 5.5 * np.std(blocks)
    # All-NaN pixels stay NaN.
    frames[0][:5] = np.nan
    for frame in frames[1:]:
        frame[:2] = np.nan
    combined = combine_fringe_frames(frames)
    assert np.isnan(combined[:2]).all() and np.isfinite(combined[2:5]).all()
