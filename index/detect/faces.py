"""Face detection (``adaptive_search``) with OpenCV's Haar cascades, and the aligned face crop.

Frontal and near-frontal faces, tilted in the image plane by at most about 15 degrees; faces smaller
than ``min_face_fraction`` of the short side are ignored. With ``align`` the two eyes are found and the
crop levels them (:func:`face_crop`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from index.detect.boxes import Box, as_rgb_array, shrink, square_crop, to_image_coords

#: The Haar cascades shipped with this package (OpenCV's files, Intel's BSD-style licence in each
#: file's header), so that no OpenCV build needs to carry them; a relative cascade name resolves here.
HAAR_DIR = Path(__file__).resolve().parent / "cascades"


class FaceConfig(BaseModel):
    """Settings of :class:`HaarFaceDetector` and the face crop (builder args ``face_detector.*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cascade: str = Field(
        "haarcascade_frontalface_alt2.xml",
        description="OpenCV Haar face cascade: a file name in index/detect/cascades/ (shipped), or a path",
    )
    eye_cascade: str = Field("haarcascade_eye.xml", description="eye cascade used for alignment (same rules)")
    work_size: int = Field(400, ge=64, le=4096, description="long side the image is shrunk to, pixels")
    min_face_fraction: float = Field(0.06, gt=0, le=1, description="smallest face side, of the short side")
    scale_factor: float = Field(
        1.1, gt=1.0, le=2.0, description="Haar pyramid step (smaller: slower, more sizes)"
    )
    min_neighbors: int = Field(5, ge=0, le=50, description="overlapping detections needed to accept a face")
    align: bool = Field(True, description="find both eyes and level them in the crop")
    margin: float = Field(0.2, ge=0, le=1, description="crop margin per side, as a fraction of the face side")


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
    """The file of a Haar cascade given by file name (in :data:`HAAR_DIR`) or path.

    Raises:
        ValueError: the file does not exist (the message lists the bundled cascades).
    """
    path = Path(name) if ("/" in name or "\\" in name) else HAAR_DIR / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in HAAR_DIR.glob("*.xml")))
        raise ValueError(f"Haar cascade {name!r} not found (looked at {str(path)!r}); bundled: {available}")
    return path


def load_cascade(name: str) -> cv2.CascadeClassifier:
    """Load a Haar cascade by file name (from :data:`HAAR_DIR`) or path.

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
        small, scale = shrink(rgb, cfg.work_size)
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
            box = Box(*to_image_coords(x, y, x + fw, y + fh, scale, w, h), score=score)
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
