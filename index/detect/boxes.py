"""Boxes, the detector interface and square crops: what every detector and the mode pipeline share.

A detector (:class:`Detector`) offers ``detect(image) -> list[Box]``, best first, ``[]`` when there is
nothing to find; ``image`` is an RGB ``PIL.Image`` or an ``(H, W, 3)`` ``uint8`` array and boxes are in
its pixel coordinates. Crops are square (:func:`square_crop`) so that the model's centre crop never cuts
the item off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels: ``[x0, x1) x [y0, y1)``, with a detector-specific score.

    Attributes:
        x0, y0: top-left corner (inclusive).
        x1, y1: bottom-right corner (exclusive); ``x1 > x0`` and ``y1 > y0``.
        score: the detector's confidence in [0, 1] (what it means is documented per detector).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 1.0

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"empty box: ({self.x0}, {self.y0}, {self.x1}, {self.y1})")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    def iou(self, other: Box) -> float:
        """Intersection over union with ``other`` (0 when disjoint)."""
        ix = max(0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        return inter / float(self.area + other.area - inter)

    def normalized(self, width: int, height: int) -> list[float]:
        """``[x0, y0, x1, y1]`` as fractions of the image's width and height (4 decimals): what the API
        returns, independent of the resolution the image was decoded at."""
        return [
            round(self.x0 / width, 4),
            round(self.y0 / height, 4),
            round(self.x1 / width, 4),
            round(self.y1 / height, 4),
        ]


class Detector(Protocol):
    """What every detector offers."""

    name: str

    def detect(self, image: Image.Image | np.ndarray) -> list[Box]:
        """Boxes in ``image``'s pixel coordinates, most prominent first; ``[]`` when nothing is found."""
        ...


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A C-contiguous ``(H, W, 3)`` ``uint8`` RGB array of ``image`` (no copy when it already is one).

    Raises:
        ValueError: for anything else than a PIL image or an ``(H, W, 3)`` ``uint8`` array.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    shape = getattr(image, "shape", None)
    raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array; got {type(image).__name__} {shape}")


def shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the long side is at most ``max_side``; returns the array and the scale applied."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return rgb, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


def to_image_coords(
    x0: float, y0: float, x1: float, y1: float, scale: float, w: int, h: int
) -> tuple[int, int, int, int]:
    """Map a box from a downscaled working image back to the original's pixels (outward rounding)."""
    return (
        max(0, math.floor(x0 / scale)),
        max(0, math.floor(y0 / scale)),
        min(w, math.ceil(x1 / scale)),
        min(h, math.ceil(y1 / scale)),
    )


def square_crop(image: Image.Image | np.ndarray, box: Box, margin: float) -> np.ndarray:
    """The square around ``box`` grown by ``margin`` (a fraction of its longer side, each side).

    The square is centred on the box and shifted to stay inside the image; where the image is too small
    for it, edge pixels are repeated. A square keeps the model's centre crop from cutting the item.

    Returns:
        A ``(S, S, 3)`` ``uint8`` array.
    """
    rgb = as_rgb_array(image)
    h, w = rgb.shape[:2]
    side = max(1, round(max(box.width, box.height) * (1.0 + 2.0 * margin)))
    cx, cy = box.center
    x0 = _fit(round(cx - side / 2.0), side, w)
    y0 = _fit(round(cy - side / 2.0), side, h)
    crop = rgb[max(0, y0) : min(h, y0 + side), max(0, x0) : min(w, x0 + side)]
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = side - top - crop.shape[0], side - left - crop.shape[1]
    if top or left or bottom or right:
        crop = cv2.copyMakeBorder(crop, top, bottom, left, right, cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(crop)


def _fit(start: int, side: int, limit: int) -> int:
    """Shift a span of ``side`` starting at ``start`` into ``[0, limit)``; centred when it cannot fit."""
    if side >= limit:
        return (limit - side) // 2
    return min(max(0, start), limit - side)
