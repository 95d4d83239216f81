"""What each library mode embeds, from a decoded image to the vector that is stored or searched.

=================  ==================================================  ======================================
mode               import                                              query (search by image)
=================  ==================================================  ======================================
general_search     the whole image, ``vector_kind="whole"``            the whole image, searches ``whole``
item_search        the main item's square crop, ``vector_kind="item"``  the item crop, searches ``item``;
                   (``extra.detected=true``); no item found: the whole   no item found: no search, ``[]``
                   image, still ``item``, with ``extra.detected=false``
adaptive_search    a face found: the (aligned) face crop, ``face``;     the same choice; searches only the
                   else the whole image, ``whole``                      query's kind
=================  ==================================================  ======================================

An ``item_search`` image with no detected item is stored as an ``item`` vector of the whole image.
:meth:`ModePipeline.plan` is the CPU part (detect, crop, resize) and returns the crops to encode;
:meth:`ModePipeline.finish` turns their vectors into the result. Why: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from index.detect.boxes import Box, as_rgb_array, square_crop
from index.detect.faces import FaceConfig, HaarFaceDetector, face_crop
from index.detect.regions import ClipRegionConfig, ClipRegionScorer
from index.detect.saliency import SaliencyConfig, SaliencyItemDetector
from index.model.imaging import prepare_for_model
from index.model.spec import PreprocessSpec

ItemDetectorKind = Literal["saliency", "clip-regions"]


class ItemDetectorConfig(SaliencyConfig, ClipRegionConfig):
    """``item_detector``: how ``item_search`` finds the main item, with the settings of both detectors
    (the saliency boxes are also the proposals of ``clip-regions``)."""

    kind: ItemDetectorKind = Field(
        "saliency",
        description="'saliency': classical foreground against the border's colours, no weights; "
        "'clip-regions': the deployment's CLIP model scores candidate regions against prompts "
        "(meaningful only with real CLIP weights)",
    )
    margin: float = Field(0.05, ge=0, le=1, description="crop margin per side, of the item box's longer side")


class DetectionConfig(BaseModel):
    """Detection settings of a deployment (builder args ``item_detector`` and ``face_detector``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_detector: ItemDetectorConfig = Field(default_factory=ItemDetectorConfig)
    face_detector: FaceConfig = Field(default_factory=FaceConfig)


@dataclass(frozen=True)
class EmbedPlan:
    """What to encode for one image, and how to read the vectors back.

    Attributes:
        mode: the library mode.
        vector_kind: the kind of the vector this image will get; None when nothing is to be searched
            (an ``item_search`` query without an item).
        crops: model-sized ``uint8`` arrays to encode (one; several candidates for ``clip-regions``;
            none when ``vector_kind`` is None).
        boxes: the box (image pixels) each crop was cut from; None for the whole image.
        size: the image's ``(width, height)``, for normalised boxes.
        detector: the detector that produced ``boxes`` (None for ``general_search``).
        detected: whether the detector found what it looks for (item or face).
        aligned: for a face crop, whether it was rotated to level the eyes.
        candidates: True when ``crops`` are candidates for :meth:`ModePipeline.finish` to choose from
            with the prompt vectors.
    """

    mode: str
    vector_kind: str | None
    crops: list[np.ndarray]
    boxes: list[Box | None]
    size: tuple[int, int]
    detector: str | None = None
    detected: bool = False
    aligned: bool | None = None
    candidates: bool = False


@dataclass(frozen=True)
class Embedded:
    """The outcome for one image.

    Attributes:
        vector: the unit vector to store or search with; None when there is nothing to search.
        vector_kind: ``whole``, ``item`` or ``face``; None with ``vector``.
        box: the region that was embedded, ``[x0, y0, x1, y1]`` as fractions of the image's width and
            height; None for the whole image.
        extra: the detection facts stored on a record (``NewRecord.extra``); None for ``general_search``.
    """

    vector: np.ndarray | None
    vector_kind: str | None
    box: list[float] | None
    extra: dict[str, Any] | None


class ModePipeline:
    """Detection and cropping per library mode, for one model's preprocessing. Thread-safe.

    Args:
        preprocess: the model's ``ModelSpec.preprocess`` (crops are resized exactly as whole images).
        config: detection settings.
        face_preprocess: the face-embedding model's preprocessing when one is configured (face crops
            are prepared for it); None: faces go to the CLIP model, prepared like everything else.
    """

    def __init__(
        self,
        preprocess: PreprocessSpec,
        config: DetectionConfig | None = None,
        *,
        face_preprocess: PreprocessSpec | None = None,
    ) -> None:
        self.preprocess = preprocess
        self.face_preprocess = face_preprocess or preprocess
        self.config = config or DetectionConfig()
        self.item = self.config.item_detector
        self.face = self.config.face_detector
        self.saliency = SaliencyItemDetector(self.item)
        self.regions = ClipRegionScorer(self.item, self.saliency)
        self.faces = HaarFaceDetector(self.face)

    @property
    def prompts(self) -> tuple[str, ...]:
        """Texts whose vectors :meth:`finish` needs for candidate plans (``clip-regions``); () otherwise."""
        return self.item.prompts if self.item.kind == "clip-regions" else ()

    def describe(self) -> dict[str, Any]:
        """The detection settings in force, for ``/health`` and logs."""
        return {
            "item_detector": self.item.kind,
            "face_detector": f"haar:{self.face.cascade}",
            "face_alignment": self.face.align,
        }

    def decode_side_hint(self, mode: str) -> int:
        """The smallest image side to decode an upload at for ``mode`` (JPEG draft decoding).

        A crop must still have the model's resolution: decode detection modes at three times the model
        size (an item or face a third of the image's side keeps full detail)."""
        side = max(self.preprocess.size)
        return side if mode == "general_search" else 3 * max(side, *self.face_preprocess.size)

    def plan(self, image: Image.Image | np.ndarray, mode: str, *, query: bool) -> EmbedPlan:
        """Detect and crop (CPU work).

        Args:
            image: the decoded RGB image.
            mode: the library's mode.
            query: True for a search query (an ``item_search`` query with no item is not searched),
                False for an import.

        Raises:
            ValueError: unknown mode.
        """
        rgb = as_rgb_array(image)
        size = (rgb.shape[1], rgb.shape[0])
        if mode == "general_search":
            return EmbedPlan(mode, "whole", [self._prepare(rgb)], [None], size)
        if mode == "item_search":
            return self._plan_item(rgb, size, query=query)
        if mode == "adaptive_search":
            found = self.faces.faces(rgb)
            if not found:
                return EmbedPlan(mode, "whole", [self._prepare(rgb)], [None], size, detector="haar")
            face = found[0]  # the largest
            crop = face_crop(rgb, face, self.face.margin)
            return EmbedPlan(
                mode,
                "face",
                [self._prepare(crop, self.face_preprocess)],
                [face.box],
                size,
                detector="haar",
                detected=True,
                aligned=face.eyes is not None,
            )
        raise ValueError(f"unknown library mode {mode!r}")

    def _plan_item(self, rgb: np.ndarray, size: tuple[int, int], *, query: bool) -> EmbedPlan:
        if self.item.kind == "clip-regions":
            boxes = self.regions.propose(rgb)
            # Proposal 0 is the whole image: prepared as a whole image, not squared off.
            crops = [
                self._prepare(rgb if i == 0 else square_crop(rgb, b, self.item.margin))
                for i, b in enumerate(boxes)
            ]
            return EmbedPlan(
                "item_search", "item", crops, list(boxes), size, detector="clip-regions", candidates=True
            )
        boxes = self.saliency.detect(rgb)
        if boxes:
            crop = square_crop(rgb, boxes[0], self.item.margin)
            return EmbedPlan(
                "item_search",
                "item",
                [self._prepare(crop)],
                [boxes[0]],
                size,
                detector="saliency",
                detected=True,
            )
        if query:
            return EmbedPlan("item_search", None, [], [], size, detector="saliency")
        return EmbedPlan("item_search", "item", [self._prepare(rgb)], [None], size, detector="saliency")

    def finish(
        self,
        plan: EmbedPlan,
        vectors: list[np.ndarray],
        prompt_vectors: np.ndarray | None = None,
        *,
        query: bool,
    ) -> Embedded:
        """Combine the plan with the vectors of its crops (same order).

        Args:
            plan: from :meth:`plan`.
            vectors: one unit vector per ``plan.crops``.
            prompt_vectors: for a candidate plan, the unit vectors of :attr:`prompts`, in order.
            query: as given to :meth:`plan`.

        Raises:
            ValueError: the number of vectors does not match the crops, or a candidate plan has no
                prompt vectors.
        """
        if len(vectors) != len(plan.crops):
            raise ValueError(f"{len(plan.crops)} crops but {len(vectors)} vectors")
        if plan.vector_kind is None:
            return Embedded(None, None, None, self._extra(plan, None, None, detected=False))
        index, detected = 0, plan.detected
        box = plan.boxes[0]
        score = box.score if box is not None else None
        if plan.candidates:
            if prompt_vectors is None:
                raise ValueError("a candidate plan needs the prompt vectors")
            best, probs = self.regions.choose(np.stack(vectors), prompt_vectors)
            if best is None:  # no candidate is item-like enough
                if query:
                    return Embedded(None, None, None, self._extra(plan, None, None, detected=False))
                index, detected, box, score = 0, False, None, None  # candidate 0: the whole image
            else:
                index, detected, box, score = best, True, plan.boxes[best], float(probs[best])
        normalized = box.normalized(*plan.size) if box is not None else None
        return Embedded(
            np.asarray(vectors[index]),
            plan.vector_kind,
            normalized,
            self._extra(plan, normalized, score, detected=detected),
        )

    @staticmethod
    def _extra(
        plan: EmbedPlan, box: list[float] | None, score: float | None, *, detected: bool
    ) -> dict[str, Any] | None:
        """The detection facts recorded on a record (``extra``) and returned by ``/image/get``."""
        if plan.detector is None:
            return None
        extra: dict[str, Any] = {"detector": plan.detector, "detected": bool(detected), "box": box}
        if score is not None:
            extra["score"] = round(score, 4)
        if plan.aligned is not None:
            extra["aligned"] = plan.aligned
        return extra

    def _prepare(self, rgb: np.ndarray, preprocess: PreprocessSpec | None = None) -> np.ndarray:
        return prepare_for_model(Image.fromarray(rgb), preprocess or self.preprocess)
