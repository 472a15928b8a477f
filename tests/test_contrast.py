"""covidseg.data.contrast: global equalisation and CLAHE, hand-checked values and properties."""

from __future__ import annotations

import time

import numpy as np
import pytest

from covidseg.data.contrast import CLIP_LIMIT, TILES, clahe, equalize, normalise_contrast
from covidseg.params import CONTRAST_METHODS, ParamsError, PreprocessParams, from_dict


def ramp(h: int = 256, w: int = 256, lo: int = 100, hi: int = 140) -> np.ndarray:
    """uint8 (h, w): a low-contrast diagonal ramp from lo to hi."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.round(lo + (hi - lo) * (xx + yy) / (h + w - 2)).astype(np.uint8)


def test_the_params_list_the_methods_the_module_knows():
    assert CONTRAST_METHODS == ("none", "equalize", "clahe")
    assert (TILES, CLIP_LIMIT) == (8, 2.0)


@pytest.mark.parametrize("level", [0, 37, 128, 255])
def test_a_constant_image_stays_constant(level):
    flat = np.full((64, 64), level, np.uint8)
    assert np.all(equalize(flat) == 255)  # cdf is n at its only level
    out = clahe(flat)
    assert out.dtype == np.uint8 and out.shape == flat.shape
    assert np.unique(out).size == 1
    # 8 x 8 pixel tiles: bin limit max(int(2 * 64 / 256), 1) = 1; excess 63 spread as 0 per bin and
    # 1 more to bins 0, 4, ..., 248 (step 256 // 63 = 4): the cdf at the level, * 255 / 64, rounded.
    hist = np.zeros(256, int)
    hist[level] = 1
    hist[0:252:4] += 1
    assert out[0, 0] == int(np.floor(255 * hist[: level + 1].sum() / 64 + 0.5))
    np.testing.assert_array_equal(normalise_contrast(flat, "none"), flat)


def test_equalize_two_and_four_levels_by_hand():
    two = np.array([[50, 50], [200, 200]], np.uint8)  # cdf 2/4, 4/4
    np.testing.assert_array_equal(equalize(two), [[128, 128], [255, 255]])  # 127.5 rounds up
    four = np.array([[0, 85], [170, 255]], np.uint8).repeat(3, 0).repeat(3, 1)  # cdf 1/4 .. 4/4
    np.testing.assert_array_equal(np.unique(equalize(four)), [64, 128, 191, 255])  # 63.75, 127.5, 191.25, 255
    np.testing.assert_array_equal(equalize(four)[0, 0], 64)
    skewed = np.array([[10, 10, 10, 20]], np.uint8)  # cdf 3/4, 4/4
    np.testing.assert_array_equal(equalize(skewed), [[191, 191, 191, 255]])


def test_clahe_keeps_dtype_and_shape_also_for_sides_that_are_not_multiples_of_the_tiles():
    rng = np.random.default_rng(0)
    for shape in [(256, 256), (250, 301), (37, 64)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        out = clahe(img)
        assert out.dtype == np.uint8 and out.shape == shape
    stack = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    out = normalise_contrast(stack, "clahe")
    assert out.shape == stack.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1], clahe(stack[1]))  # each image on its own
    assert normalise_contrast(stack[:0], "clahe").shape == (0, 32, 32)


def test_clahe_is_monotone_where_one_tile_maps_the_pixels():
    # With 32-pixel tiles, the 16 x 16 corner of the image lies beyond the outer tile centres: only
    # the corner tile's lut applies there, so a larger input never gives a smaller output.
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(120, 30, (256, 256)), 0, 255).astype(np.uint8)
    out = clahe(img)
    for rows, cols in [(slice(0, 16), slice(0, 16)), (slice(240, 256), slice(240, 256))]:
        x, y = img[rows, cols].ravel(), out[rows, cols].ravel()
        order = np.argsort(x, kind="stable")
        assert np.all(np.diff(y[order].astype(int)) >= 0)
        assert np.unique(x).size > 20  # the check compares many levels
    # at one position, the output is a fixed blend of non-decreasing luts: monotone in the level
    same_luts = np.tile(img[:32, :32], (8, 8))  # every tile has the same histogram, so the same lut
    out = clahe(same_luts)
    x, y = same_luts.ravel(), out.ravel()
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(y[order].astype(int)) >= 0)


def _tile_std(img: np.ndarray) -> float:
    """Mean standard deviation inside the 8 x 8 tiles of a (256, 256) image: local contrast."""
    return float(img.reshape(8, 32, 8, 32).astype(float).std(axis=(1, 3)).mean())


def test_clahe_raises_the_contrast_of_a_low_contrast_ramp():
    smooth = ramp()  # grey levels 100..140 only
    textured = np.clip(smooth + np.random.default_rng(4).integers(-5, 6, smooth.shape), 0, 255).astype(np.uint8)
    for img in (smooth, textured):
        out = clahe(img)
        assert out.std() > img.std() and _tile_std(out) > 1.4 * _tile_std(img)
        assert equalize(img).std() > 5 * img.std()  # global: the 41 levels spread over 0..255
    # The clip limit caps a lut's slope near 2 x 255/256 + the spread excess, so the global gain is
    # large only where tiles hold texture: 8.8 -> 12.6 here, while the smooth ramp gains 8.20 -> 8.28.
    assert clahe(textured).std() > 1.3 * textured.std()


def test_clahe_with_one_tile_and_no_clipping_is_global_equalisation():
    rng = np.random.default_rng(2)
    img = np.clip(rng.normal(90, 25, (64, 80)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(clahe(img, tiles=1, clip_limit=1e9), equalize(img))
    np.testing.assert_array_equal(clahe(img, tiles=1, clip_limit=0), equalize(img))
    assert not np.array_equal(clahe(img), equalize(img))  # the defaults are local and clipped


def test_clip_limit_spreads_the_excess_as_opencv_does():
    # One tile of 16 x 16 = 256 pixels: the bin limit is 2; 200 pixels at 100 and 56 at 200.
    img = np.array([100] * 200 + [200] * 56, np.uint8).reshape(16, 16)
    # excess (200 - 2) + (56 - 2) = 252 -> 0 per bin and 1 to bins 0..251 (step 256 // 252 = 1)
    hist = np.zeros(256, int)
    hist[100] = hist[200] = 2
    hist[:252] += 1
    cdf = hist.cumsum()
    expected = {v: int(np.floor(255 * cdf[v] / 256 + 0.5)) for v in (100, 200)}
    out = clahe(img, tiles=1)
    assert out[0, 0] == expected[100] and out[-1, -1] == expected[200]
    assert expected == {100: 103, 200: 204}  # 255 * 103 / 256 = 102.6, 255 * 205 / 256 = 204.2


def test_bad_method_or_input_is_refused_by_name():
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="'sharpen'"):
        normalise_contrast(img, "sharpen")
    with pytest.raises(ValueError, match="uint8"):
        normalise_contrast(img.astype(np.float32), "clahe")
    with pytest.raises(ParamsError, match="contrast must be one of"):
        from_dict(PreprocessParams, "preprocess", {"contrast": "CLAHE"})
    assert from_dict(PreprocessParams, "preprocess", {"contrast": "clahe"}).contrast == "clahe"


def test_clahe_of_a_model_sized_image_takes_a_few_milliseconds():
    img = np.random.default_rng(3).integers(0, 256, (256, 256), dtype=np.uint8)
    clahe(img)
    best = min(_timed(clahe, img) for _ in range(5))
    assert best < 0.05, f"{best * 1e3:.1f} ms"  # about 4 ms on one core; loose for shared CI machines


def _timed(fn, arg) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t
