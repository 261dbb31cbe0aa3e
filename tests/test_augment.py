"""Augmentation: every box follows its digit, determinism, CPU/GPU arrays and bad input."""
import os
from pathlib import Path

import numpy as np
import pytest

from pycnn.data.augment import Augment
from pycnn.data.localization import INK_THRESHOLD, make_canvases
from pycnn.metrics import box_iou
from synthetic_data import synthetic_digits as _synthetic_digits

DATA_DIR = os.environ.get("PYCNN_DATA")
HAVE_DATA = bool(DATA_DIR) and (Path(DATA_DIR) / "t10k-images-idx3-ubyte.gz").is_file()
SIZE = 64
OFF = dict(hflip=0.0, rotate=0.0, translate=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0)


@pytest.fixture(scope="module")
def canvases():
    if HAVE_DATA:
        from pycnn.data import load_mnist

        x, y = load_mnist("test", download=False)
        x, y = x[:1000], y[:1000]
    else:
        x, y = _synthetic_digits()
    return make_canvases(x, y, n=160, canvas_size=SIZE, clutter=False, empty_prob=0.1, seed=21)


def ink_boxes_px(images, threshold=INK_THRESHOLD):
    """(N, 4) pixel-edge ink boxes of (N, 1, H, W) images, NaN rows where there is no ink."""
    out = np.full((images.shape[0], 4), np.nan)
    for i, img in enumerate(images[:, 0]):
        ys, xs = np.nonzero(img > threshold)
        if ys.size:
            out[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return out


def _run(aug, d, seed=0):
    return aug(d["images"], d["boxes"], d["present"], np.random.default_rng(seed))


GEOMETRIC = {
    "hflip": dict(OFF, hflip=1.0),
    "translate": dict(OFF, translate=0.25),
    "zoom_in": dict(OFF, scale=(1.2, 1.5)),
    "zoom_out": dict(OFF, scale=(0.6, 0.8)),
    "scale_and_translate (random crop)": dict(OFF, scale=(0.8, 1.3), translate=0.2),
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_box_follows_digit_exact_transforms(canvases, name):
    images, boxes = _run(Augment(**GEOMETRIC[name]), canvases)
    p = canvases["present"] == 1
    ink = ink_boxes_px(images)
    assert not np.isnan(ink[p]).any(), "a digit left the canvas"
    assert np.isnan(ink[~p]).all(), "an empty canvas gained ink"
    # bilinear resampling moves the threshold crossing by up to about a pixel
    np.testing.assert_allclose(boxes[p] * SIZE, ink[p], atol=1.6)
    assert np.all(boxes[~p] == 0)
    if name != "hflip":
        moved = np.abs(boxes[p] - canvases["boxes"][p]).max(axis=1) * SIZE
        assert (moved > 2).mean() > 0.5  # the transform did something


def test_hflip_is_an_exact_mirror(canvases):
    images, boxes = _run(Augment(**dict(OFF, hflip=1.0)), canvases)
    np.testing.assert_allclose(images, canvases["images"][..., ::-1], atol=1e-6)
    b = canvases["boxes"]
    p = canvases["present"] == 1
    np.testing.assert_allclose(boxes[p], np.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1)[p], atol=1e-6)


@pytest.mark.parametrize("degrees", [8.0, 20.0])
def test_box_follows_digit_under_rotation(canvases, degrees):
    images, boxes = _run(Augment(**dict(OFF, rotate=degrees)), canvases)
    p = canvases["present"] == 1
    ink = ink_boxes_px(images)[p]
    box = boxes[p] * SIZE
    # the box of the rotated box's corners contains the rotated ink (within resampling blur) ...
    assert np.all(ink[:, :2] >= box[:, :2] - 1.6) and np.all(ink[:, 2:] <= box[:, 2:] + 1.6)
    # ... and is no looser than that bound: each side within sin(angle) of the box's size
    orig = canvases["boxes"][p] * SIZE
    extent = (orig[:, 2:] - orig[:, :2]).max(axis=1, keepdims=True)
    slack = np.sin(np.deg2rad(degrees)) * extent + 1.6
    assert np.all(ink[:, :2] - box[:, :2] <= slack) and np.all(box[:, 2:] - ink[:, 2:] <= slack)
    assert box_iou(box, ink).mean() > (0.8 if degrees < 10 else 0.65)


def test_box_follows_digit_under_everything_geometric(canvases):
    aug = Augment(hflip=0.5, rotate=10, translate=0.15, scale=(0.85, 1.2), brightness=0, contrast=0)
    images, boxes = _run(aug, canvases, seed=3)
    p = canvases["present"] == 1
    ink = ink_boxes_px(images)[p]
    box = boxes[p] * SIZE
    assert np.all(ink[:, :2] >= box[:, :2] - 1.6) and np.all(ink[:, 2:] <= box[:, 2:] + 1.6)
    assert box_iou(box, ink).mean() > 0.75
    assert np.all((boxes >= 0) & (boxes <= 1))


def test_keep_inside_keeps_every_digit_whole(canvases):
    images, boxes = _run(Augment(**dict(OFF, translate=0.5, scale=(1.0, 1.3))), canvases, seed=5)
    p = canvases["present"] == 1
    # no clipping happened: the box still matches the whole ink, and both stay on the canvas
    ink = ink_boxes_px(images)[p]
    np.testing.assert_allclose(boxes[p] * SIZE, ink, atol=1.6)
    area_before = np.prod((canvases["boxes"][p, 2:] - canvases["boxes"][p, :2]), axis=1)
    area_after = np.prod((boxes[p, 2:] - boxes[p, :2]), axis=1)
    assert np.all(area_after >= area_before * 0.95)


def test_brightness_contrast_keep_the_ink_in_place(canvases):
    d = canvases
    images, boxes = _run(Augment(**dict(OFF, brightness=0.2, contrast=0.3)), d)
    np.testing.assert_array_equal(boxes[d["present"] == 1], d["boxes"][d["present"] == 1])
    assert not np.allclose(images, d["images"])
    # a non-decreasing intensity map: sorting by the original value leaves the new values sorted,
    # so the digit's pixels stay the brightest and the box still holds the ink
    for before, after in zip(d["images"][:20, 0].reshape(20, -1), images[:20, 0].reshape(20, -1)):
        order = np.lexsort((after, before))
        assert np.all(np.diff(after[order]) >= -1e-6)
    assert images.min() >= 0 and images.max() <= 1


def test_gaussian_noise_keeps_the_box(canvases):
    d = canvases
    images, boxes = _run(Augment(**dict(OFF, gaussian_noise=0.04)), d)
    p = d["present"] == 1
    np.testing.assert_array_equal(boxes[p], d["boxes"][p])
    assert 0.02 < np.std(images - d["images"]) < 0.04  # clipping at 0 halves the background noise
    # at a threshold far above the noise the ink box is where it was (a faint edge may move 1-2 px)
    np.testing.assert_allclose(ink_boxes_px(images, 0.5)[p], ink_boxes_px(d["images"], 0.5)[p], atol=2.01)


def test_salt_and_pepper(canvases):
    d = canvases
    images, boxes = _run(Augment(**dict(OFF, salt_pepper=0.05)), d)
    p = d["present"] == 1
    np.testing.assert_array_equal(boxes[p], d["boxes"][p])
    changed = images != d["images"]
    assert np.all(np.isin(images[changed], [0.0, 1.0]))
    # 5% of pixels are hit; about half of those already held 0 (background) or 1
    assert 0.015 < changed.mean() < 0.05
    assert (images == 1.0).mean() > (d["images"] == 1.0).mean() + 0.02


def test_deterministic_given_rng_and_new_arrays(canvases):
    aug = Augment(hflip=0.5, gaussian_noise=0.02, salt_pepper=0.01)
    a = _run(aug, canvases, seed=9)
    b = _run(aug, canvases, seed=9)
    c = _run(aug, canvases, seed=10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.float32 and a[1].dtype == np.float32
    before = canvases["images"].copy()
    out, _ = Augment(**OFF)(canvases["images"], canvases["boxes"], canvases["present"], 0)
    np.testing.assert_array_equal(out, before)
    assert out is not canvases["images"]
    np.testing.assert_array_equal(canvases["images"], before)  # the input is never modified


def test_present_none_and_float64(canvases):
    p = canvases["present"] == 1
    x = canvases["images"][p][:10].astype(np.float64)
    images, boxes = Augment()(x, canvases["boxes"][p][:10], None, np.random.default_rng(0))
    assert images.dtype == np.float64 and boxes.shape == (10, 4)


def test_bad_input(canvases):
    aug = Augment()
    x = canvases["images"][:4]
    boxes = np.array([[0.1, 0.1, 0.5, 0.5]] * 4, np.float32)
    present = np.ones(4, np.float32)
    outside = boxes.copy()
    outside[2] = [0.5, 0.2, 1.2, 0.6]
    with pytest.raises(ValueError, match=r"box 2 = \[0.5, 0.2.*\] lies outside the canvas"):
        aug(x, outside, present, 0)
    inverted = boxes.copy()
    inverted[1] = [0.6, 0.1, 0.4, 0.5]
    with pytest.raises(ValueError, match="box 1 .* lies outside the canvas"):
        aug(x, inverted, present, 0)
    # the same box on an empty canvas is ignored (absent rows carry no box)
    _, out = aug(x, outside, np.array([1, 1, 0, 1], np.float32), 0)
    assert np.all(out[2] == 0)
    with pytest.raises(ValueError, match="empty batch"):
        aug(x[:0], boxes[:0], present[:0], 0)
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\)"):
        aug(x[:, 0], boxes, present, 0)
    with pytest.raises(ValueError, match=r"boxes must have shape \(4, 4\)"):
        aug(x, boxes[:3], present, 0)
    with pytest.raises(ValueError, match=r"present must have shape \(4,\)"):
        aug(x, boxes, present[:2], 0)
    with pytest.raises(TypeError, match="float32 or float64, got dtype uint8"):
        aug((x * 255).astype(np.uint8), boxes, present, 0)
    with pytest.raises(ValueError, match="hflip is a probability"):
        Augment(hflip=2)
    with pytest.raises(ValueError, match="rotate must be a finite number >= 0"):
        Augment(rotate=-5)
    with pytest.raises(ValueError, match=r"scale must satisfy 0 < min <= max, got \(1.2, 0.8\)"):
        Augment(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="salt_pepper is a fraction"):
        Augment(salt_pepper=1.5)
    with pytest.raises(ValueError, match="contrast must be <= 1"):
        Augment(contrast=1.5)


def _cuda_status():
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        return count > 0, f"{count} CUDA devices"
    except Exception as exc:  # noqa: BLE001 - no CuPy, no driver or no device: all mean "no GPU"
        return False, f"{type(exc).__name__}: {exc}"


@pytest.mark.gpu
def test_cupy_arrays_match_numpy(canvases):
    # Same gate as tests/gpu/conftest.py: skip without a GPU, fail under PYCNN_REQUIRE_GPU=1.
    ok, reason = _cuda_status()
    if not ok:
        if os.environ.get("PYCNN_REQUIRE_GPU", "") == "1":
            pytest.fail(f"PYCNN_REQUIRE_GPU=1 but CuPy cannot use a GPU here: {reason}", pytrace=False)
        pytest.skip(f"needs CuPy and a CUDA device: {reason}")
    import cupy

    aug = Augment(hflip=0.5, rotate=10, translate=0.15, scale=(0.85, 1.2), brightness=0.1, contrast=0.1)
    d = canvases
    ref_images, ref_boxes = _run(aug, d, seed=4)
    images, boxes = aug(cupy.asarray(d["images"]), cupy.asarray(d["boxes"]), cupy.asarray(d["present"]),
                        np.random.default_rng(4))
    assert isinstance(images, cupy.ndarray) and isinstance(boxes, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(images), ref_images, atol=1e-4)
    np.testing.assert_allclose(cupy.asnumpy(boxes), ref_boxes, atol=1e-6)
    noisy, _ = Augment(gaussian_noise=0.05, salt_pepper=0.02)(cupy.asarray(d["images"]), cupy.asarray(d["boxes"]),
                                                              cupy.asarray(d["present"]), np.random.default_rng(0))
    assert isinstance(noisy, cupy.ndarray) and float(noisy.min()) >= 0 and float(noisy.max()) <= 1
