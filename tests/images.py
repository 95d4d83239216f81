"""Synthetic test images (no downloads): distinct, deterministic, in several formats and sizes."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def pattern(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A deterministic RGB image: smooth colour blobs so JPEG round trips stay close."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(6):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(8, max(h, w) / 2)
        colour = rng.uniform(0, 255, 3)
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - weight) + colour * weight
    return img.clip(0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_b64(seed: int, fmt: str = "PNG", size: tuple[int, int] = (96, 128)) -> str:
    return b64(encode(pattern(seed, size), fmt))


# -- product shots and backgrounds (detection tests) ----------------------------------------------


def backdrop(kind: str, size: tuple[int, int] = (200, 200)) -> np.ndarray:
    """A float32 RGB background: ``plain``, ``warm`` (another plain colour), ``gradient``, ``vignette``,
    ``two_tone`` (wall and floor), ``stripes`` or ``noisy`` (grey with sensor-like noise)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "plain":
        return np.full((h, w, 3), 245, np.float32)
    if kind == "warm":
        return np.full((h, w, 3), (235, 225, 205), np.float32)
    if kind == "gradient":
        return np.stack([30 + 60 * xx / w, 60 + 80 * yy / h, 150 + 60 * xx / w], -1)
    if kind == "vignette":
        r = np.hypot(xx - w / 2, yy - h / 2) / np.hypot(w / 2, h / 2)
        return np.repeat((230 - 110 * r**2)[..., None], 3, -1)
    if kind == "two_tone":
        img = np.full((h, w, 3), 200, np.float32)
        img[int(h * 0.65) :] = (150, 120, 90)
        return img
    if kind == "stripes":
        img = np.full((h, w, 3), (220, 220, 240), np.float32)
        img[(xx // 16) % 2 == 0] = (180, 190, 230)
        return img
    if kind == "noisy":
        return 128 + np.random.default_rng(7).normal(0, 6, (h, w, 3)).astype(np.float32)
    raise ValueError(f"unknown backdrop {kind!r}")


def product(seed: int, side: int = 90) -> np.ndarray:
    """A square "product photo" (a packaged item seen from the front): a patch of a real photo shipped
    with scikit-image, different for every seed."""
    import cv2
    import skimage.data

    sources = [skimage.data.coffee, skimage.data.chelsea, skimage.data.astronaut, skimage.data.rocket]
    src = sources[seed % len(sources)]()
    rng = np.random.default_rng(seed)
    h, w = src.shape[:2]
    y, x = int(rng.integers(0, h - 150)), int(rng.integers(0, w - 150))
    return cv2.resize(src[y : y + 150, x : x + 150], (side, side), interpolation=cv2.INTER_AREA)


def scene(
    item: np.ndarray, background: str, at: tuple[int, int], size: tuple[int, int] = (200, 200)
) -> np.ndarray:
    """``item`` pasted on a backdrop with its top-left corner at ``at`` = (x, y); uint8 RGB."""
    img = backdrop(background, size)
    x, y = at
    img[y : y + item.shape[0], x : x + item.shape[1]] = item
    return img.clip(0, 255).astype(np.uint8)
