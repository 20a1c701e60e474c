"""podi_imcombine against stacks whose answer is known: every stack size, both methods,
outliers and missing values."""

import numpy as np
import pytest

from podi_imcombine import clipped_combine

SHAPE = (40, 50)


def known_stack(nframes, rng, outlier=True, missing=False):
    """Each pixel's values: 10, 11, ... in a random frame order, one of them replaced by
    an outlier (1e6) or by NaN; returns the stack and the kept values' median and mean."""
    base = 10.0 + np.arange(nframes, dtype=np.float32)
    stack = np.empty((nframes,) + SHAPE, np.float32)
    for index in np.ndindex(SHAPE):
        stack[(slice(None),) + index] = rng.permutation(base)
    kept = base
    if outlier or missing:
        # The largest value of every pixel is the one replaced.
        largest = stack == base[-1]
        stack[largest] = np.nan if missing else 1e6
        kept = base[:-1]
    return stack, float(np.median(kept)), float(np.mean(kept))


@pytest.mark.parametrize("nframes", [3, 4, 6, 7, 9, 12])
@pytest.mark.parametrize("method", ["median", "mean"])
def test_outlier_rejected_for_every_stack_size(nframes, method):
    stack, median, mean = known_stack(nframes, np.random.default_rng(nframes))
    combined, used = clipped_combine(stack, method=method)
    assert combined.dtype == np.float32 and combined.shape == SHAPE
    np.testing.assert_allclose(combined, median if method == "median" else mean, rtol=1e-6)
    assert (used == nframes - 1).all()


@pytest.mark.parametrize("nframes", [2, 3, 5, 8])
@pytest.mark.parametrize("method", ["median", "mean"])
def test_missing_values_are_left_out(nframes, method):
    stack, median, mean = known_stack(nframes, np.random.default_rng(100 + nframes), outlier=False,
                                      missing=True)
    combined, used = clipped_combine(stack, method=method)
    np.testing.assert_allclose(combined, median if method == "median" else mean, rtol=1e-6)
    assert (used == nframes - 1).all()


def test_noise_stack_mean_and_median_without_clipping_good_values():
    rng = np.random.default_rng(5)
    stack = rng.normal(1000.0, 10.0, (7,) + SHAPE).astype(np.float32)
    mean, used = clipped_combine(stack, method="mean")
    # A Gaussian stack of 7 loses a value at 3 robust sigma in a few % of the pixels;
    # where it loses none, the mean is the plain mean.
    assert (used == 7).mean() > 0.9 and (used >= 5).all()
    np.testing.assert_allclose(mean[used == 7], stack.mean(axis=0)[used == 7], rtol=1e-6)
    median, _ = clipped_combine(stack, method="median")
    assert abs(float(np.mean(median)) - 1000.0) < 1.0


def test_pixel_without_values_is_undefined():
    stack = np.full((4,) + SHAPE, np.nan, np.float32)
    stack[:, :10] = 5.0
    combined, used = clipped_combine(stack, method="mean")
    assert np.isnan(combined[10:]).all() and (used[10:] == 0).all()
    assert (combined[:10] == 5.0).all()


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown combine method 'mode'"):
        clipped_combine(np.zeros((3,) + SHAPE, np.float32), method="mode")
