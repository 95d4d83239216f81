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
