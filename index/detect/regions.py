"""The learned item detector (``item_detector.kind: clip-regions``): CLIP scores candidate regions.

:class:`ClipRegionScorer` proposes regions (whole image, the saliency boxes, a grid of windows) and
picks the crop whose CLIP vector is most like the item prompts; ``index.detect.modes`` embeds the crops
once and reuses the chosen one. Its quality is the weights' quality: with the tiny random-weight model
it runs end to end but its choices mean nothing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from index.detect.boxes import Box, as_rgb_array
from index.detect.saliency import SaliencyItemDetector


class ClipRegionConfig(BaseModel):
    """Settings of :class:`ClipRegionScorer` (``item_detector.*`` with ``kind: clip-regions``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_prompts: tuple[str, ...] = Field(
        ("a product photo of a single item", "a photo of an object"),
        min_length=1,
        description="texts describing an item; a crop's item probability is their softmax mass",
    )
    background_prompts: tuple[str, ...] = Field(
        ("an empty background", "a blank wall", "a plain studio backdrop"),
        min_length=1,
        description="texts describing no item",
    )
    min_probability: float = Field(0.5, ge=0, le=1, description="the best crop must reach this, else no item")
    temperature: float = Field(
        100.0, gt=0, description="logit scale of the cosines (CLIP's trained value: 100)"
    )
    max_proposals: int = Field(
        16, ge=1, le=64, description="candidate regions scored per image (one encoding each)"
    )

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
