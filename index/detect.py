"""Finding the main item or a face in an image, and cutting the crop that gets embedded.

Detectors share one small interface (:class:`Detector`): ``detect(image) -> list[Box]``, best first, an
empty list when there is nothing to find. ``image`` is a decoded RGB ``PIL.Image`` or an ``(H, W, 3)``
``uint8`` array; boxes are in that image's pixel coordinates.

* :class:`SaliencyItemDetector` (the default for ``item_search``): classical foreground extraction for
  product shots. It models the background from the image border, marks as background every pixel whose
  colour is close to a background colour or that is joined to the border by a smooth (gradient-free)
  path, and takes the most prominent remaining blob as the item. It needs no weights, is reliable on
  plain, two-tone, gradient and vignetted backgrounds, and finds nothing on blank or uniform images. It
  is not an object recogniser: on a busy full-frame photo it returns whatever differs most from the
  border, and an item that covers most of the border on two or more sides is taken for background.
* :class:`HaarFaceDetector` (``adaptive_search``): OpenCV's Haar cascades, which ship inside the
  ``opencv-python-headless`` wheel (``cv2.data.haarcascades``; no download). Frontal and near-frontal
  faces only, tilted in the image plane by at most about 15 degrees; faces smaller than
  ``min_face_fraction`` of the short side are ignored. With ``align`` it also looks for the two eyes and
  levels them (:func:`face_crop`).
* :class:`ClipRegionScorer`: the learned item detector (``item_detector.kind: clip-regions``). It
  proposes candidate regions (whole image, the saliency boxes, a grid of windows) and lets the CLIP
  model of the deployment score each crop against item and background prompts; see ``index/modes.py``
  for how its crops are embedded once and reused. Its quality is the CLIP weights' quality: with the
  tiny random-weight test model it runs end to end but its choices mean nothing.

Crops are square (:func:`square_crop`) so that the model's centre crop never cuts the item off.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

#: Where ``opencv-python-headless`` keeps its bundled cascades (a relative cascade name resolves here).
HAAR_DIR = Path(cv2.data.haarcascades)  # type: ignore[attr-defined]  # not in OpenCV's stubs


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


def _shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the long side is at most ``max_side``; returns the array and the scale applied."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return rgb, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


def _to_image_coords(
    x0: float, y0: float, x1: float, y1: float, scale: float, w: int, h: int
) -> tuple[int, int, int, int]:
    """Map a box from a downscaled working image back to the original's pixels (outward rounding)."""
    return (
        max(0, math.floor(x0 / scale)),
        max(0, math.floor(y0 / scale)),
        min(w, math.ceil(x1 / scale)),
        min(h, math.ceil(y1 / scale)),
    )


# -- items: classical foreground -----------------------------------------------------------------


@dataclass(frozen=True)
class SaliencyConfig:
    """Settings of :class:`SaliencyItemDetector` (builder args ``item_detector.*``).

    Attributes:
        work_size: the long side, in pixels, the image is shrunk to before analysis.
        border_fraction: width of the border band that models the background, as a fraction of the
            short side.
        min_area_fraction: blobs smaller than this fraction of the image are ignored (specks, noise).
        min_delta_e: the smallest colour difference (CIE76 delta E; 2.3 is a just-noticeable
            difference) that separates an item from a background colour.
        noise_factor: a pixel is foreground only when it is further from every background colour than
            this many times that colour's own spread along the border (95th percentile).
        smooth_delta_e: neighbouring pixels closer than this (delta E, after a light blur) are "smooth";
            smooth regions joined to the border are background (gradients, vignettes).
    """

    work_size: int = 256
    border_fraction: float = 0.04
    min_area_fraction: float = 0.004
    min_delta_e: float = 10.0
    noise_factor: float = 2.5
    smooth_delta_e: float = 1.5

    def __post_init__(self) -> None:
        _check(self.work_size >= 32, f"work_size must be >= 32; got {self.work_size}")
        _check(
            0 < self.border_fraction <= 0.2,
            f"border_fraction must be in (0, 0.2]; got {self.border_fraction}",
        )
        _check(
            0 < self.min_area_fraction < 1,
            f"min_area_fraction must be in (0, 1); got {self.min_area_fraction}",
        )
        _check(self.min_delta_e > 0, f"min_delta_e must be > 0; got {self.min_delta_e}")
        _check(self.noise_factor > 0, f"noise_factor must be > 0; got {self.noise_factor}")
        _check(self.smooth_delta_e >= 0, f"smooth_delta_e must be >= 0; got {self.smooth_delta_e}")


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
        small, scale = _shrink(as_rgb_array(image), cfg.work_size)
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
        out = [Box(*_to_image_coords(*main, scale, w, h), score=round(item_area / total, 4))]
        for i in blobs:
            if i not in merged:
                share = stats[i, cv2.CC_STAT_AREA] / total
                out.append(Box(*_to_image_coords(*rects[i], scale, w, h), score=round(float(share), 4)))
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


# -- faces ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceConfig:
    """Settings of :class:`HaarFaceDetector` (builder args ``face_detector.*``).

    Attributes:
        cascade: a cascade file name in ``cv2.data.haarcascades`` or a path to one.
        eye_cascade: the eye cascade used for alignment (same rules).
        work_size: the long side, in pixels, the image is shrunk to before detection.
        min_face_fraction: the smallest face side, as a fraction of the image's short side.
        scale_factor: Haar pyramid step (smaller: slower, finds more sizes).
        min_neighbors: overlapping detections needed to accept a face (higher: fewer false faces).
        align: look for both eyes and rotate the crop so that they are level.
        margin: added around the face box on each side, as a fraction of its side, before cropping.
    """

    cascade: str = "haarcascade_frontalface_alt2.xml"
    eye_cascade: str = "haarcascade_eye.xml"
    work_size: int = 400
    min_face_fraction: float = 0.06
    scale_factor: float = 1.1
    min_neighbors: int = 5
    align: bool = True
    margin: float = 0.2

    def __post_init__(self) -> None:
        _check(self.work_size >= 64, f"work_size must be >= 64; got {self.work_size}")
        _check(
            0 < self.min_face_fraction <= 1,
            f"min_face_fraction must be in (0, 1]; got {self.min_face_fraction}",
        )
        _check(self.scale_factor > 1.0, f"scale_factor must be > 1; got {self.scale_factor}")
        _check(self.min_neighbors >= 0, f"min_neighbors must be >= 0; got {self.min_neighbors}")
        _check(0 <= self.margin <= 1, f"margin must be in [0, 1]; got {self.margin}")


@dataclass(frozen=True)
class Face:
    """A detected face: its box and, when both eyes were found, their centres (image pixels)."""

    box: Box
    eyes: tuple[tuple[float, float], tuple[float, float]] | None = None

    @property
    def roll_degrees(self) -> float | None:
        """The angle of the line from the left eye to the right eye (image left/right), or None."""
        if self.eyes is None:
            return None
        (lx, ly), (rx, ry) = self.eyes
        return math.degrees(math.atan2(ry - ly, rx - lx))


def cascade_path(name: str) -> Path:
    """The file of a Haar cascade given by file name (in ``cv2.data.haarcascades``) or path.

    Raises:
        ValueError: the file does not exist (the message lists the bundled cascades).
    """
    path = Path(name) if ("/" in name or "\\" in name) else HAAR_DIR / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in HAAR_DIR.glob("*.xml")))
        raise ValueError(f"Haar cascade {name!r} not found (looked at {str(path)!r}); bundled: {available}")
    return path


def load_cascade(name: str) -> cv2.CascadeClassifier:
    """Load a Haar cascade by file name (from ``cv2.data.haarcascades``) or path.

    Raises:
        ValueError: the file does not exist or OpenCV cannot read it.
    """
    path = cascade_path(name)
    try:
        cascade = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError) as exc:  # a malformed file makes OpenCV's parser throw
        raise ValueError(f"OpenCV could not load the Haar cascade {str(path)!r}: {exc}") from None
    if cascade.empty():
        raise ValueError(f"OpenCV could not load the Haar cascade {str(path)!r}")
    return cascade


class HaarFaceDetector:
    """Frontal faces with OpenCV's bundled Haar cascades; largest face first.

    ``Box.score`` is ``n / (n + min_neighbors)`` where ``n`` is the number of overlapping raw detections
    that support the face: a relative confidence, not a probability.

    OpenCV does not promise that one ``CascadeClassifier`` may run in several threads at once, so every
    thread that calls the detector (the ingress's worker threads) loads its own pair of cascades on first
    use: detections run in parallel without a lock. The constructor loads them once for the calling
    thread, so a bad cascade fails at start-up.
    """

    name = "haar"

    def __init__(self, config: FaceConfig | None = None) -> None:
        self.config = config or FaceConfig()
        self._local = threading.local()
        self._cascades()

    def _cascades(self) -> tuple[cv2.CascadeClassifier, cv2.CascadeClassifier | None]:
        """This thread's (face, eye) cascades; the eye cascade is None when ``align`` is off."""
        pair = getattr(self._local, "pair", None)
        if pair is None:
            eyes = load_cascade(self.config.eye_cascade) if self.config.align else None
            pair = self._local.pair = (load_cascade(self.config.cascade), eyes)
        return pair

    def detect(self, image: Image.Image | np.ndarray) -> list[Box]:
        """Face boxes, largest first; ``[]`` when there is no frontal face."""
        return [f.box for f in self.faces(image, with_eyes=False)]

    def faces(self, image: Image.Image | np.ndarray, *, with_eyes: bool = True) -> list[Face]:
        """Faces, largest first, with eye centres for the first one when ``align`` is on."""
        cfg = self.config
        rgb = as_rgb_array(image)
        h, w = rgb.shape[:2]
        small, scale = _shrink(rgb, cfg.work_size)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        side = max(20, int(cfg.min_face_fraction * min(gray.shape)))
        if side > min(gray.shape):
            return []
        face_cascade, eye_cascade = self._cascades()
        rects, counts = face_cascade.detectMultiScale2(
            gray, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors, minSize=(side, side)
        )
        if len(rects) == 0:
            return []
        order = sorted(range(len(rects)), key=lambda i: int(rects[i][2]) * int(rects[i][3]), reverse=True)
        out: list[Face] = []
        for rank, i in enumerate(order):
            x, y, fw, fh = (int(v) for v in rects[i])
            n = int(counts[i]) if len(counts) else cfg.min_neighbors
            score = round(n / (n + max(1, cfg.min_neighbors)), 4)
            box = Box(*_to_image_coords(x, y, x + fw, y + fh, scale, w, h), score=score)
            eyes = None
            if with_eyes and rank == 0 and eye_cascade is not None:
                found = _eye_pair(eye_cascade, gray, x, y, fw, fh)
                if found is not None:
                    eyes = tuple((ex / scale, ey / scale) for ex, ey in found)
            out.append(Face(box, eyes))  # type: ignore[arg-type]
        return out


def _eye_pair(
    cascade: cv2.CascadeClassifier, gray: np.ndarray, x: int, y: int, fw: int, fh: int
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The two eyes (image-left first) in the upper part of a face, or None when not both are seen."""
    roi = gray[y : y + int(0.6 * fh), x : x + fw]
    lo, hi = max(6, fw // 8), max(7, fw // 2)
    eyes = cascade.detectMultiScale(roi, scaleFactor=1.1, minNeighbors=3, minSize=(lo, lo), maxSize=(hi, hi))
    centres = [(x + ex + ew / 2.0, y + ey + eh / 2.0) for ex, ey, ew, eh in eyes]
    left = [c for c in centres if c[0] < x + fw / 2.0]
    right = [c for c in centres if c[0] >= x + fw / 2.0]
    if not left or not right:
        return None
    best: tuple[float, tuple[tuple[float, float], tuple[float, float]]] | None = None
    for a in left:
        for b in right:
            dist = math.hypot(b[0] - a[0], b[1] - a[1])
            angle = abs(math.degrees(math.atan2(b[1] - a[1], b[0] - a[0])))
            # Eyes sit 0.25-0.7 of the face width apart and roughly level; anything else is a
            # nostril, an eyebrow or a glasses frame.
            if 0.25 * fw <= dist <= 0.7 * fw and angle <= 30:
                cost = angle + abs(dist - 0.42 * fw) / fw * 100
                if best is None or cost < best[0]:
                    best = (cost, (a, b))
    return None if best is None else best[1]


# -- crops ---------------------------------------------------------------------------------------


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


def face_crop(image: Image.Image | np.ndarray, face: Face, margin: float) -> np.ndarray:
    """The square face crop; when both eyes are known, rotated about the face centre so they are level.

    The rotation and the crop are one affine warp (edges repeated where the square leaves the image).

    Returns:
        A ``(S, S, 3)`` ``uint8`` array.
    """
    roll = face.roll_degrees
    if roll is None:
        return square_crop(image, face.box, margin)
    rgb = as_rgb_array(image)
    side = max(1, round(max(face.box.width, face.box.height) * (1.0 + 2.0 * margin)))
    cx, cy = face.box.center
    if face.eyes is not None:  # the eyes' midpoint is a steadier centre than the cascade's box
        (_, ly), (_, ry) = face.eyes
        cy = cy + ((ly + ry) / 2.0 - (face.box.y0 + 0.38 * face.box.height)) * 0.5
    rot = cv2.getRotationMatrix2D((cx, cy), roll, 1.0)
    rot[0, 2] += side / 2.0 - cx
    rot[1, 2] += side / 2.0 - cy
    return cv2.warpAffine(rgb, rot, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# -- items: CLIP scoring of candidate regions ----------------------------------------------------


@dataclass(frozen=True)
class ClipRegionConfig:
    """Settings of :class:`ClipRegionScorer` (builder args ``item_detector.*`` with ``kind: clip-regions``).

    Attributes:
        item_prompts: texts describing "an item"; a crop's item probability is the softmax mass of these
            against ``background_prompts``.
        background_prompts: texts describing "no item".
        min_probability: the best crop must reach this item probability, else no item is found.
        temperature: the logit scale applied to cosines before the softmax (CLIP's trained value: 100).
        max_proposals: the most candidate regions scored per image (each costs one forward pass).
    """

    item_prompts: tuple[str, ...] = (
        "a product photo of a single item",
        "a photo of an object",
    )
    background_prompts: tuple[str, ...] = (
        "an empty background",
        "a blank wall",
        "a plain studio backdrop",
    )
    min_probability: float = 0.5
    temperature: float = 100.0
    max_proposals: int = 16

    def __post_init__(self) -> None:
        _check(bool(self.item_prompts), "item_prompts must not be empty")
        _check(bool(self.background_prompts), "background_prompts must not be empty")
        _check(
            0 <= self.min_probability <= 1, f"min_probability must be in [0, 1]; got {self.min_probability}"
        )
        _check(self.temperature > 0, f"temperature must be > 0; got {self.temperature}")
        _check(self.max_proposals >= 1, f"max_proposals must be >= 1; got {self.max_proposals}")

    @property
    def prompts(self) -> tuple[str, ...]:
        """Item prompts then background prompts: the order :meth:`ClipRegionScorer.choose` expects."""
        return (*self.item_prompts, *self.background_prompts)


class ClipRegionScorer:
    """Learned item detection by CLIP: propose regions, embed each crop, keep the most item-like one.

    Split in two so that the model stays where it runs (the Encoder deployment): :meth:`propose` is CPU
    work on the image; :meth:`choose` is arithmetic on the crops' unit vectors and the prompts' unit
    vectors. The chosen crop's vector is then the item's embedding: detection costs ``len(proposals)``
    image encodings and no extra one.
    """

    name = "clip-regions"

    def __init__(self, config: ClipRegionConfig | None = None, saliency: SaliencyItemDetector | None = None):
        self.config = config or ClipRegionConfig()
        self.saliency = saliency or SaliencyItemDetector()

    def propose(self, image: Image.Image | np.ndarray) -> list[Box]:
        """Candidate regions: the whole image, the saliency boxes, then windows of half and three
        quarters of the image on 3x3 and 2x2 grids; near-duplicates (IoU > 0.9) dropped; at most
        ``max_proposals``. The whole image is always first."""
        rgb = as_rgb_array(image)
        h, w = rgb.shape[:2]
        boxes = [Box(0, 0, w, h, score=0.0)]
        boxes += [Box(b.x0, b.y0, b.x1, b.y1, score=0.0) for b in self.saliency.detect(rgb)[:3]]
        for frac, steps in ((0.5, 3), (0.75, 2)):
            bw, bh = max(1, int(w * frac)), max(1, int(h * frac))
            for j in range(steps):
                for i in range(steps):
                    x0 = round(i * (w - bw) / (steps - 1))
                    y0 = round(j * (h - bh) / (steps - 1))
                    boxes.append(Box(x0, y0, x0 + bw, y0 + bh, score=0.0))
        kept: list[Box] = []
        for b in boxes:
            if all(b.iou(k) <= 0.9 for k in kept):
                kept.append(b)
            if len(kept) == self.config.max_proposals:
                break
        return kept

    def item_probabilities(self, crop_vectors: np.ndarray, prompt_vectors: np.ndarray) -> np.ndarray:
        """Per crop, the softmax mass of the item prompts (``prompt_vectors`` in ``config.prompts`` order)."""
        cfg = self.config
        logits = cfg.temperature * (
            np.asarray(crop_vectors, np.float64) @ np.asarray(prompt_vectors, np.float64).T
        )
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p[:, : len(cfg.item_prompts)].sum(axis=1)

    def choose(self, crop_vectors: np.ndarray, prompt_vectors: np.ndarray) -> tuple[int | None, np.ndarray]:
        """The index of the most item-like crop (None when none reaches ``min_probability``) and every
        crop's item probability."""
        probs = self.item_probabilities(crop_vectors, prompt_vectors)
        best = int(np.argmax(probs))
        return (best if probs[best] >= self.config.min_probability else None), probs


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
