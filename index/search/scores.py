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

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ScoreCalibration(BaseModel):
    """How cosines become scores (builder args ``text_score_center`` and ``text_score_scale``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_center: float = Field(
        0.25, description="text queries: the text-image cosine that scores 0.5 (the logistic's midpoint)"
    )
    text_scale: float = Field(
        0.04,
        gt=0,
        description="text queries: the logistic's width; a cosine one width above the midpoint scores 0.73, "
        "two widths 0.88 (docs/API.md, 'Scores')",
    )

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
