"""Batch augmentation for localization canvases; every box is transformed with its image.

Geometric transforms (horizontal flip, rotation, scale, translation) are composed into one
affine map per sample and applied in a single vectorized bilinear warp (zero fill outside).
Rotation and scale act about the box's centre (the image centre for empty canvases), so the
digit stays where it was and translation alone moves it; the flip mirrors the whole image. A
zoom (scale > 1) followed by a translation is a random crop resized back to the canvas size.
The new box of a sample is the bounding box of its four transformed corners, clipped to the
canvas: exact for flips, scales and translations, and an upper bound of the ink's box under a
rotation (by up to ~sin(angle) of the box's size per side).

Photometric transforms (contrast, brightness, Gaussian noise, salt-and-pepper) do not move
anything, so they leave the boxes unchanged.

Works on NumPy and on CuPy arrays (``xp`` is CuPy's ``get_array_module`` of the images; CuPy
is imported only when a non-NumPy array is passed). Per-sample parameters are drawn on the host
from the given ``np.random.Generator``; the per-pixel noise comes from ``xp.random`` seeded from
it, so a seed reproduces a batch exactly on one kind of device.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Augment", "get_array_module"]

_MIN_SCALE = 1e-3  # smallest zoom factor taken
_BOX_TOLERANCE = 1e-5  # normalized; boxes computed in float32 may overshoot [0, 1] by rounding


def get_array_module(x):
    """``numpy`` for NumPy arrays, else ``cupy.get_array_module(x)`` (CuPy imported lazily)."""
    if isinstance(x, np.ndarray):
        return np
    try:
        import cupy
    except ImportError:
        return np
    return cupy.get_array_module(x)


def _to_host(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # CuPy array
        return a.get()
    return np.asarray(a)


def _uniform(rng, lo, hi, n):
    return rng.uniform(lo, hi, size=n) if hi > lo else np.full(n, float(lo))


class Augment:
    """Random augmentation of a batch of canvases and their boxes.

    Args:
        hflip: probability of a horizontal flip (0 by default: a mirrored digit is not a digit).
        rotate: maximum rotation in degrees; the angle is uniform in [-rotate, rotate].
        translate: maximum shift as a fraction of the canvas width/height.
        scale: ``(min, max)`` zoom factor range (finite, >= 0.001); > 1 enlarges.
        gaussian_noise: standard deviation of additive Gaussian pixel noise.
        salt_pepper: fraction of pixels set to the range's min or max (half each).
        brightness: maximum additive brightness change, uniform in [-brightness, brightness].
        contrast: maximum relative contrast change: pixels move away from / towards the
            image mean by a factor uniform in [1 - contrast, 1 + contrast].
        keep_inside: choose the translation so that the transformed box stays inside the canvas
            (when it fits); boxes are clipped to the canvas in any case.
        value_range: the pixel range; results are clipped to it.

    Raises:
        ValueError: a negative magnitude, a probability outside [0, 1], an invalid scale range.
    """

    def __init__(self, hflip: float = 0.0, rotate: float = 10.0, translate: float = 0.1,
                 scale=(0.9, 1.1), gaussian_noise: float = 0.0, salt_pepper: float = 0.0,
                 brightness: float = 0.1, contrast: float = 0.1, keep_inside: bool = True,
                 value_range=(0.0, 1.0)):
        hflip = float(hflip)
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"Augment: hflip is a probability in [0, 1], got {hflip}")
        for name, value in (("rotate", rotate), ("translate", translate), ("gaussian_noise", gaussian_noise),
                            ("brightness", brightness), ("contrast", contrast)):
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"Augment: {name} must be a finite number >= 0, got {value}")
        if not 0.0 <= salt_pepper <= 1.0:
            raise ValueError(f"Augment: salt_pepper is a fraction in [0, 1], got {salt_pepper}")
        if contrast > 1.0:
            raise ValueError(f"Augment: contrast must be <= 1 (a factor 1 - contrast < 0 would invert the image), got {contrast}")
        try:
            smin, smax = (float(v) for v in scale)
        except (TypeError, ValueError):
            raise ValueError(f"Augment: scale must be a (min, max) pair, got {scale!r}") from None
        if not 0.0 < smin <= smax:
            raise ValueError(f"Augment: scale must satisfy 0 < min <= max, got {tuple(scale)}")
        # (an infinite zoom, or one so small that its inverse overflows, stopped in the warp with
        # "high - low range exceeds valid bounds" or an IndexError of a NaN pixel index)
        if not (np.isfinite(smax) and smin >= _MIN_SCALE):
            raise ValueError(f"Augment: scale must be finite and >= {_MIN_SCALE} (a digit shrunk {1 / _MIN_SCALE:g} "
                             f"times is gone), got {tuple(scale)}")
        lo, hi = (float(v) for v in value_range)
        if not lo < hi:
            raise ValueError(f"Augment: value_range must satisfy min < max, got {tuple(value_range)}")
        self.hflip = hflip
        self.rotate = float(rotate)
        self.translate = float(translate)
        self.scale = (smin, smax)
        self.gaussian_noise = float(gaussian_noise)
        self.salt_pepper = float(salt_pepper)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.keep_inside = bool(keep_inside)
        self.value_range = (lo, hi)

    def __repr__(self) -> str:
        return (f"Augment(hflip={self.hflip}, rotate={self.rotate}, translate={self.translate}, "
                f"scale={self.scale}, gaussian_noise={self.gaussian_noise}, salt_pepper={self.salt_pepper}, "
                f"brightness={self.brightness}, contrast={self.contrast}, keep_inside={self.keep_inside})")

    @property
    def _geometric(self) -> bool:
        return self.hflip > 0 or self.rotate > 0 or self.translate > 0 or self.scale != (1.0, 1.0)

    def _check(self, images, boxes, present):
        if images.ndim != 4:
            raise ValueError(f"Augment: images must have shape (N, C, H, W), got {tuple(images.shape)}")
        n = images.shape[0]
        if n == 0:
            raise ValueError("Augment: empty batch (images has 0 samples)")
        if images.dtype not in (np.float32, np.float64):
            raise TypeError(f"Augment: images must be float32 or float64, got dtype {images.dtype}")
        b = _to_host(boxes).astype(np.float64)
        if b.shape != (n, 4):
            raise ValueError(f"Augment: boxes must have shape ({n}, 4) to match images {tuple(images.shape)}, "
                             f"got {tuple(b.shape)}")
        if present is None:
            p = np.ones(n, dtype=bool)
        else:
            p = _to_host(present)
            if p.shape != (n,):
                raise ValueError(f"Augment: present must have shape ({n},), got {tuple(p.shape)}")
            p = p > 0.5
        tol = _BOX_TOLERANCE
        bad = p & ~(np.all(np.isfinite(b), axis=1)
                    & (b[:, 0] >= -tol) & (b[:, 1] >= -tol) & (b[:, 2] <= 1 + tol) & (b[:, 3] <= 1 + tol)
                    & (b[:, 0] <= b[:, 2]) & (b[:, 1] <= b[:, 3]))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"Augment: box {i} = {b[i].tolist()} lies outside the canvas: expected normalized "
                             "(x0, y0, x1, y1) with 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1")
        return b, p

    def __call__(self, images, boxes, present=None, rng=None):
        """Augment a batch.

        Args:
            images: (N, C, H, W) float array (NumPy or CuPy), values in ``value_range``.
            boxes: (N, 4) normalized (x0, y0, x1, y1) boxes (NumPy or CuPy).
            present: (N,) 0/1 presence (None: all present); boxes of absent rows are ignored
                and returned as zeros.
            rng: an ``np.random.Generator`` (or a seed for ``np.random.default_rng``).

        Returns:
            ``(images, boxes)``: new arrays of the input's kind; images of the input dtype,
            boxes float32 (N, 4).

        Raises:
            ValueError: wrong shapes, an empty batch, a present box outside the canvas.
            TypeError: images not float32/float64.
        """
        xp = get_array_module(images)
        b, p = self._check(images, boxes, present)
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        out = images
        new_boxes = np.where(p[:, None], b, 0.0)
        if self._geometric:
            out, new_boxes = self._warp(xp, images, b, p, rng)
        out = self._photometric(xp, out, rng)
        if out is images:  # nothing enabled: still hand back a new array, as documented
            out = images.copy()
        box_xp = get_array_module(boxes)
        return out, box_xp.asarray(new_boxes.astype(np.float32))

    def _warp(self, xp, images, b, p, rng):
        n, c, h, w = images.shape
        # Per-sample parameters, always all drawn (fixed order, so a seed means one result).
        flip = rng.random(n) < self.hflip
        angle = np.deg2rad(_uniform(rng, -self.rotate, self.rotate, n))
        zoom = _uniform(rng, self.scale[0], self.scale[1], n)
        shift_u = rng.random((n, 2))

        # Pixel-edge coordinates: pixel j spans [j, j + 1); a normalized box maps to x * W.
        px = b * np.array([w, h, w, h], dtype=np.float64)
        center = np.where(p[:, None], (px[:, :2] + px[:, 2:]) / 2, np.array([w / 2, h / 2]))

        # Linear part: zoom * rotation about `center`, then the optional mirror x -> W - x.
        cos, sin = np.cos(angle), np.sin(angle)
        a = np.empty((n, 2, 2))
        a[:, 0, 0], a[:, 0, 1] = zoom * cos, -zoom * sin
        a[:, 1, 0], a[:, 1, 1] = zoom * sin, zoom * cos
        offset = center - np.einsum("nij,nj->ni", a, center)
        mirror = np.where(flip, -1.0, 1.0)
        a[:, 0, :] *= mirror[:, None]
        offset[:, 0] = offset[:, 0] * mirror + np.where(flip, w, 0.0)

        # Box after rotation/zoom/flip: bounding box of the four transformed corners.
        corners = np.stack([px[:, [0, 1]], px[:, [2, 1]], px[:, [0, 3]], px[:, [2, 3]]], axis=1)  # (n,4,2)
        moved = np.einsum("nij,nkj->nki", a, corners) + offset[:, None, :]
        lo_xy, hi_xy = moved.min(axis=1), moved.max(axis=1)

        # Translation, limited (keep_inside) so that the box stays on the canvas when it fits.
        size = np.array([w, h], dtype=np.float64)
        tmax = self.translate * size
        t_lo = np.broadcast_to(-tmax, (n, 2)).copy()
        t_hi = np.broadcast_to(tmax, (n, 2)).copy()
        if self.keep_inside:
            keep = p[:, None]
            t_lo = np.where(keep, np.maximum(t_lo, -lo_xy), t_lo)
            t_hi = np.where(keep, np.minimum(t_hi, size - hi_xy), t_hi)
        fits = t_lo <= t_hi
        shift = np.where(fits, t_lo + shift_u * (t_hi - t_lo), (t_lo + t_hi) / 2)
        offset += shift

        new_px = np.concatenate([lo_xy + shift, hi_xy + shift], axis=1)
        new_px = np.clip(new_px, 0.0, np.array([w, h, w, h], dtype=np.float64))
        new_boxes = np.where(p[:, None], new_px / np.array([w, h, w, h]), 0.0)

        # Inverse map for sampling: source = A^-1 (q - offset), q at output pixel centres.
        inv = np.linalg.inv(a)
        inv_off = -np.einsum("nij,nj->ni", inv, offset)
        dtype = images.dtype
        inv_d = xp.asarray(inv.astype(dtype))
        inv_off_d = xp.asarray(inv_off.astype(dtype))
        qy = (xp.arange(h, dtype=dtype) + 0.5)[None, :, None]
        qx = (xp.arange(w, dtype=dtype) + 0.5)[None, None, :]
        # Source coordinates in index units (pixel centres at integers): subtract 0.5.
        sx = inv_d[:, 0, 0, None, None] * qx + inv_d[:, 0, 1, None, None] * qy + inv_off_d[:, 0, None, None] - 0.5
        sy = inv_d[:, 1, 0, None, None] * qx + inv_d[:, 1, 1, None, None] * qy + inv_off_d[:, 1, None, None] - 0.5
        return _bilinear(xp, images, sx, sy), new_boxes

    def _photometric(self, xp, images, rng):
        n = images.shape[0]
        lo, hi = self.value_range
        contrast = _uniform(rng, 1.0 - self.contrast, 1.0 + self.contrast, n)
        bright = _uniform(rng, -self.brightness, self.brightness, n)
        noise_seed = int(rng.integers(0, 2**31 - 1))
        out = images
        if self.contrast > 0 or self.brightness > 0:
            cf = xp.asarray(contrast.astype(images.dtype))[:, None, None, None]
            bf = xp.asarray(bright.astype(images.dtype))[:, None, None, None]
            mean = images.mean(axis=(1, 2, 3), keepdims=True)
            out = (images - mean) * cf + mean + bf
        if self.gaussian_noise > 0 or self.salt_pepper > 0:
            gen = _PixelRandom(xp, noise_seed)
            if self.gaussian_noise > 0:
                noise = gen.normal(images.shape, images.dtype)
                noise *= images.dtype.type(self.gaussian_noise)
                out = out + noise
            if self.salt_pepper > 0:
                u = gen.uniform(images.shape, images.dtype)
                out = xp.where(u < self.salt_pepper / 2, images.dtype.type(lo), out)
                out = xp.where(u > 1.0 - self.salt_pepper / 2, images.dtype.type(hi), out)
        if out is images:
            return images
        return xp.clip(out, lo, hi).astype(images.dtype, copy=False)


class _PixelRandom:
    """Per-pixel random numbers on the array's device, in the image dtype.

    NumPy: a ``Generator`` (its ziggurat normals in float32 are several times faster than
    ``RandomState``'s float64 ones). CuPy: ``cupy.random.RandomState``, generated on the GPU.
    """

    def __init__(self, xp, seed: int):
        self.xp = xp
        self.gen = np.random.default_rng(seed) if xp is np else xp.random.RandomState(seed)

    def normal(self, shape, dtype):
        return self.gen.standard_normal(size=shape, dtype=dtype)

    def uniform(self, shape, dtype):
        if self.xp is np:
            return self.gen.random(size=shape, dtype=dtype)
        return self.gen.random_sample(size=shape, dtype=dtype)


def _bilinear(xp, images, sx, sy):
    """Sample ``images`` (N, C, H, W) at index coordinates (sx, sy) of shape (N, Ho, Wo); zeros outside.

    The images get a one-pixel zero border and the coordinates are clipped into it, so every
    tap is a valid index and taps outside the image read zeros: no validity masks, and four
    1-D gathers (``take`` on the flat array) instead of multi-dimensional fancy indexing.
    """
    n, c, h, w = images.shape
    ho, wo = sx.shape[1:]
    hp, wp = h + 2, w + 2
    padded = xp.zeros((n, c, hp, wp), dtype=images.dtype)
    padded[:, :, 1:-1, 1:-1] = images
    # +1: index coordinates of the padded image; clipped to its zero border
    sx = xp.clip(sx, -1.0, float(w)) + 1.0
    sy = xp.clip(sy, -1.0, float(h)) + 1.0
    x0 = xp.minimum(xp.floor(sx), float(wp - 2))
    y0 = xp.minimum(xp.floor(sy), float(hp - 2))
    fx = (sx - x0).reshape(n, 1, ho * wo)
    fy = (sy - y0).reshape(n, 1, ho * wo)
    corner = (y0.astype(np.int64) * wp + x0.astype(np.int64)).reshape(n, 1, ho * wo)
    plane = (xp.arange(n * c, dtype=np.int64) * (hp * wp)).reshape(n, c, 1)
    idx = plane + corner  # (n, c, ho*wo) flat index of each top-left tap
    flat = padded.reshape(-1)
    top = xp.take(flat, idx) * (1 - fx) + xp.take(flat, idx + 1) * fx
    bottom = xp.take(flat, idx + wp) * (1 - fx) + xp.take(flat, idx + wp + 1) * fx
    return (top * (1 - fy) + bottom * fy).reshape(n, c, ho, wo)
