"""The classical item detector (the default for ``item_search``).

:class:`SaliencyItemDetector` models the background from the image border, marks as background every
pixel whose colour is close to a background colour or that is joined to the border by a smooth
(gradient-free) path, and takes the most prominent remaining blob as the item. No weights; reliable on
plain, two-tone, gradient and vignetted backgrounds; nothing on blank or uniform images. Not an object
recogniser: on a busy full-frame photo it returns whatever differs most from the border.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from index.detect.boxes import Box, as_rgb_array, shrink, to_image_coords


class SaliencyConfig(BaseModel):
    """Settings of :class:`SaliencyItemDetector` (builder args ``item_detector.*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    work_size: int = Field(256, ge=32, le=4096, description="long side the image is shrunk to, pixels")
    border_fraction: float = Field(
        0.04,
        gt=0,
        le=0.2,
        description="width of the border band that models the background (of the short side)",
    )
    min_area_fraction: float = Field(
        0.004, gt=0, lt=1, description="blobs smaller than this fraction of the image are ignored"
    )
    min_delta_e: float = Field(
        10.0, gt=0, description="smallest colour difference (CIE76 delta E) between item and background"
    )
    noise_factor: float = Field(
        2.5,
        gt=0,
        description="foreground: further from each border colour than this many times its spread",
    )
    smooth_delta_e: float = Field(
        1.5,
        ge=0,
        description="neighbours closer than this are smooth (border-joined smooth = background)",
    )


class SaliencyItemDetector:
    """Foreground extraction against a background modelled from the image border.

    Steps (on the image shrunk to ``work_size``, lightly blurred, in CIELAB):

    1. The border band's colours are clustered (deterministic k-means, up to 6 clusters). A cluster is a
       *background colour* when it holds at least 3% of the band and shows on at least two of the four
       sides; an item crossing one edge therefore does not turn into background. (When no cluster
       qualifies, every cluster with 3% of the band is used.)
    2. A pixel is background when it is within ``max(min_delta_e, noise_factor * spread)`` of a
       background colour, or when it lies in a smooth region (neighbour steps below
       ``smooth_delta_e``) that touches the border mostly through background-coloured pixels.
    3. The rest is cleaned (morphological open, then close) and split into connected blobs. The most
       prominent blob (area, discounted up to 50% for distance from the centre) is the item; blobs
       touching its box (within 3% of the image side) are merged into it. Other blobs follow as
       further boxes.

    ``Box.score`` of the first box is the share of all foreground pixels that the item's box took in
    (1.0: a single clear item); of the others, their own share.
    """

    name = "saliency"

    def __init__(self, config: SaliencyConfig | None = None) -> None:
        self.config = config or SaliencyConfig()

    def foreground(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, float]:
        """The cleaned foreground mask of the working-size image, and the scale from the input to it."""
        cfg = self.config
        small, scale = shrink(as_rgb_array(image), cfg.work_size)
        h, w = small.shape[:2]
        if min(h, w) < 8:  # too few pixels to tell a border from an inside
            return np.zeros((h, w), dtype=bool), scale
        blurred = cv2.GaussianBlur(small, (3, 3), 0)
        lab = cv2.cvtColor(blurred.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
        fg = ~self._background(lab)
        side = min(h, w)
        open_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        close_size = max(3, round(0.02 * side) | 1)
        close_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_size, close_size))
        mask = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, open_k)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, close_k)
        return mask.astype(bool), scale

    def _background(self, lab: np.ndarray) -> np.ndarray:
        cfg = self.config
        h, w = lab.shape[:2]
        step = _step_map(cv2.GaussianBlur(lab, (5, 5), 0))
        b = max(2, round(cfg.border_fraction * min(h, w)))
        bands = [
            (slice(0, b), slice(None)),
            (slice(h - b, h), slice(None)),
            (slice(None), slice(0, b)),
            (slice(None), slice(w - b, w)),
        ]
        pixels = np.concatenate([lab[band].reshape(-1, 3) for band in bands])
        steps = np.concatenate([step[band].reshape(-1) for band in bands])
        sides = np.concatenate(
            [np.full(lab[band].shape[0] * lab[band].shape[1], i) for i, band in enumerate(bands)]
        )
        centers, assign = _kmeans(pixels, k=6)
        side_sizes = np.bincount(sides, minlength=4)
        keep: list[int] = []
        loose: list[int] = []
        for c in range(len(centers)):
            members = assign == c
            if members.mean() < 0.03:
                continue
            loose.append(c)
            per_side = np.bincount(sides[members], minlength=4) / side_sizes
            if int((per_side >= 0.05).sum()) >= 2:
                keep.append(c)
        near = np.zeros((h, w), dtype=bool)
        for c in keep or loose:
            members = assign == c
            # The colour tolerance follows the background's fine-grained noise (texture, sensor and JPEG
            # noise: twice the median step between neighbours), capped by the cluster's own spread. Slow
            # variation (gradients, vignettes) must not widen it: the smooth-region rule covers those.
            spread = float(np.percentile(np.linalg.norm(pixels[members] - centers[c], axis=1), 95))
            noise = 2.0 * float(np.median(steps[members]))
            limit = max(cfg.min_delta_e, cfg.noise_factor * min(spread, noise))
            near |= np.linalg.norm(lab - centers[c], axis=2) <= limit
        background = _touching_frame(near | self._smooth_from_border(step, near))
        # Half the item/background tolerance: the rim is background-coloured, an item's edge is not.
        return _grow(lab, background, 0.5 * cfg.min_delta_e, iterations=3)

    def _smooth_from_border(self, step: np.ndarray, near: np.ndarray) -> np.ndarray:
        """Smooth regions that are background: they reach the border on two or more sides, or mostly
        through background-coloured pixels. (An item cut by the frame's edge reaches one side, with its
        own colours.)"""
        cfg = self.config
        h, w = step.shape
        smooth = (step < cfg.smooth_delta_e).astype(np.uint8)
        n, labels = cv2.connectedComponents(smooth, connectivity=4)
        if n <= 1:
            return np.zeros((h, w), dtype=bool)
        rims = [labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]]
        rim_near = [near[0, :], near[-1, :], near[:, 0], near[:, -1]]
        touching = np.zeros(n)
        touching_bg = np.zeros(n)
        sides_touched = np.zeros(n, dtype=np.int64)
        for rim, rim_bg in zip(rims, rim_near, strict=True):
            per_side = np.bincount(rim, minlength=n)
            touching += per_side
            touching_bg += np.bincount(rim, weights=rim_bg.astype(np.float64), minlength=n)
            sides_touched += per_side >= 0.05 * len(rim)
        background = (touching > 0) & ((touching_bg >= 0.5 * touching) | (sides_touched >= 2))
        background[0] = False  # label 0: the pixels that are not smooth
        return background[labels]

    def detect(self, image: Image.Image | np.ndarray) -> list[Box]:
        """The main item first, then other separate blobs; ``[]`` on a blank or uniform image."""
        rgb = as_rgb_array(image)
        h, w = rgb.shape[:2]
        mask, scale = self.foreground(rgb)
        mh, mw = mask.shape
        n, _, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        min_area = self.config.min_area_fraction * mh * mw
        blobs = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
        if not blobs:
            return []
        half_diag = math.hypot(mw, mh) / 2.0

        def prominence(i: int) -> float:
            cx, cy = centroids[i]
            off = min(1.0, math.hypot(cx - mw / 2.0, cy - mh / 2.0) / half_diag)
            return float(stats[i, cv2.CC_STAT_AREA]) * (1.0 - 0.5 * off)

        blobs.sort(key=prominence, reverse=True)
        total = float(sum(stats[i, cv2.CC_STAT_AREA] for i in blobs))
        rects = {i: _rect(stats[i]) for i in blobs}
        gap = 0.03 * max(mh, mw)
        main = rects[blobs[0]]
        merged = {blobs[0]}
        changed = True
        while changed:  # grow the item's box by every blob that touches it (item parts, not neighbours)
            changed = False
            for i in blobs:
                if i not in merged and _near(main, rects[i], gap):
                    main = _union(main, rects[i])
                    merged.add(i)
                    changed = True
        item_area = sum(stats[i, cv2.CC_STAT_AREA] for i in merged)
        out = [Box(*to_image_coords(*main, scale, w, h), score=round(item_area / total, 4))]
        for i in blobs:
            if i not in merged:
                share = stats[i, cv2.CC_STAT_AREA] / total
                out.append(Box(*to_image_coords(*rects[i], scale, w, h), score=round(float(share), 4)))
        return out


def _touching_frame(mask: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` connected to the frame's edge. Background-coloured pixels enclosed by an item
    (a hole, a pale patch) belong to the item: only the item's outline matters for its box."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    if n <= 1:
        return mask.copy()
    on_edge = np.zeros(n, dtype=bool)
    on_edge[np.concatenate([labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]])] = True
    on_edge[0] = False  # label 0: pixels outside the mask
    return on_edge[labels]


def _grow(lab: np.ndarray, background: np.ndarray, limit: float, iterations: int) -> np.ndarray:
    """Grow the background into neighbouring pixels of about the same colour as the background next to
    them. This takes back the thin rim that blurring leaves around an item on a gradient, which is
    neither smooth nor close to any border colour."""
    bg = background.copy()
    kernel = np.ones((3, 3), np.float32)
    for _ in range(iterations):
        weight = cv2.filter2D(bg.astype(np.float32), -1, kernel, borderType=cv2.BORDER_CONSTANT)
        rim = (~bg) & (weight > 0)
        if not rim.any():
            break
        summed = cv2.filter2D(lab * bg[..., None], -1, kernel, borderType=cv2.BORDER_CONSTANT)
        local = summed / np.maximum(weight, 1.0)[..., None]
        close = np.linalg.norm(lab - local, axis=2) <= limit
        grown = rim & close
        if not grown.any():
            break
        bg |= grown
    return bg


def _step_map(lab: np.ndarray) -> np.ndarray:
    """Per pixel, the largest colour step (delta E) to a 4-neighbour."""
    h, w = lab.shape[:2]
    step = np.zeros((h, w), dtype=np.float32)
    dx = np.linalg.norm(lab[:, 1:] - lab[:, :-1], axis=2)
    dy = np.linalg.norm(lab[1:, :] - lab[:-1, :], axis=2)
    step[:, :-1] = np.maximum(step[:, :-1], dx)
    step[:, 1:] = np.maximum(step[:, 1:], dx)
    step[:-1, :] = np.maximum(step[:-1, :], dy)
    step[1:, :] = np.maximum(step[1:, :], dy)
    return step


def _rect(stat: np.ndarray) -> tuple[int, int, int, int]:
    x, y, bw, bh = (int(v) for v in stat[:4])
    return (x, y, x + bw, y + bh)


def _near(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: float) -> bool:
    return not (b[0] > a[2] + gap or b[2] < a[0] - gap or b[1] > a[3] + gap or b[3] < a[1] - gap)


def _union(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _kmeans(x: np.ndarray, k: int, iterations: int = 8, sample: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means (farthest-point seeding from the median): the same image always gets the
    same background model, in every replica. Stops adding seeds when the colours are within 1 delta E.
    Fitted on an evenly strided sample of at most ``sample`` points; every point is then assigned.
    """
    fit = x[:: max(1, len(x) // sample)].astype(np.float32)
    centers = [np.median(fit, axis=0)]
    dist = np.linalg.norm(fit - centers[0], axis=1)
    while len(centers) < k:
        i = int(np.argmax(dist))
        if dist[i] < 1.0:
            break
        centers.append(fit[i].copy())
        dist = np.minimum(dist, np.linalg.norm(fit - fit[i], axis=1))
    c = np.stack(centers)
    for _ in range(iterations):
        assign = _nearest(fit, c)
        for j in range(len(c)):
            members = fit[assign == j]
            if len(members):
                c[j] = members.mean(axis=0)
    return c, _nearest(x.astype(np.float32), c)


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for every row of ``x`` (squared distances, no square roots)."""
    d = (x * x).sum(axis=1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(axis=1)[None, :]
    return np.argmin(d, axis=1)
