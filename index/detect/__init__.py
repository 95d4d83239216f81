"""Detection: boxes and square crops, the saliency item detector, Haar faces, CLIP region scoring, and
the mode pipeline that decides what each library mode embeds.

    pipe = ModePipeline(spec.preprocess, DetectionConfig())
    plan = pipe.plan(image, "item_search", query=False)   # CPU: detect, crop, resize -> plan.crops
    out = pipe.finish(plan, encoder(plan.crops), None, query=False)   # Embedded(vector, vector_kind, ...)

Every detector offers ``detect(image) -> list[Box]``, best first, ``[]`` when nothing is found.
"""

from index.detect.boxes import Box, Detector, square_crop
from index.detect.faces import Face, FaceConfig, HaarFaceDetector, face_crop
from index.detect.modes import DetectionConfig, Embedded, EmbedPlan, ItemDetectorConfig, ModePipeline
from index.detect.regions import ClipRegionConfig, ClipRegionScorer
from index.detect.saliency import SaliencyConfig, SaliencyItemDetector

__all__ = [
    "Box",
    "ClipRegionConfig",
    "ClipRegionScorer",
    "DetectionConfig",
    "Detector",
    "EmbedPlan",
    "Embedded",
    "Face",
    "FaceConfig",
    "HaarFaceDetector",
    "ItemDetectorConfig",
    "ModePipeline",
    "SaliencyConfig",
    "SaliencyItemDetector",
    "face_crop",
    "square_crop",
]
