"""Similarity scores in [0, 1] from cosine similarities.

Image queries: ``score = clip(cosine, 0, 1)``. CLIP image-image cosines of an exact duplicate are 1.0
(>= 0.99 after JPEG round trips), near duplicates sit above 0.9 and related images in 0.7-0.9 with
real weights, which is the scale the API promises, so no remapping is needed; unrelated images (cosine
<= 0) all score 0.

Text queries: CLIP text-image cosines live in a narrow band (about 0.1-0.4 for real weights), so they
are mapped through a logistic ``1 / (1 + exp(-(cosine - center) / scale))``: strictly monotonic (the
ranking is the cosine ranking) with ``center`` and ``scale`` configurable per deployment
(``text_score_center``, ``text_score_scale``). Defaults (0.25, 0.04) put a strong CLIP match (cosine
0.33) at ~0.88 and a weak one (0.2) at ~0.22.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoreCalibration:
    text_center: float = 0.25
    text_scale: float = 0.04

    def __post_init__(self) -> None:
        if not self.text_scale > 0:
            raise ValueError(f"text_score_scale must be > 0, got {self.text_scale}")

    def image(self, cosines: np.ndarray) -> np.ndarray:
        return np.clip(cosines, 0.0, 1.0).astype(np.float64)

    def text(self, cosines: np.ndarray) -> np.ndarray:
        z = (np.asarray(cosines, dtype=np.float64) - self.text_center) / self.text_scale
        return 1.0 / (1.0 + np.exp(-z))

    def for_query(self, query_kind: str, cosines: np.ndarray) -> np.ndarray:
        """Scores for a query of kind ``"image"`` or ``"text"``."""
        if query_kind == "text":
            return self.text(cosines)
        if query_kind == "image":
            return self.image(cosines)
        raise ValueError(f"query kind {query_kind!r} is not 'image' or 'text'")
