"""index.detect.modes: what each library mode embeds, run end to end with the tiny random-weight model.

Nothing here assumes that the random model's vectors mean anything; the ranking test relies only on
the crop being (almost) the same pixels whatever the background, which is the point of cropping.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from index.detect.boxes import Box
from index.detect.modes import DetectionConfig, Embedded, ItemDetectorConfig, ModePipeline
from index.detect.regions import ClipRegionConfig
from index.model.embedder import ClipEmbedder
from index.model.imaging import prepare_for_model
from tests.images import product, scene

CLIP_REGIONS = DetectionConfig(item_detector=ItemDetectorConfig(kind="clip-regions"))


@pytest.fixture(scope="module")
def pipeline(tiny_embedder: ClipEmbedder) -> ModePipeline:
    return ModePipeline(tiny_embedder.spec.preprocess)


def run(
    pipeline: ModePipeline, embedder: ClipEmbedder, image: np.ndarray, mode: str, *, query: bool
) -> Embedded:
    """What the ingress does, synchronously: plan, encode the crops (and prompts), finish."""
    plan = pipeline.plan(image, mode, query=query)
    vectors = list(embedder.encode_images(np.stack(plan.crops))) if plan.crops else []
    prompts = embedder.encode_texts(list(pipeline.prompts)) if plan.candidates else None
    return pipeline.finish(plan, vectors, prompts, query=query)


def whole_vector(embedder: ClipEmbedder, image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return embedder.encode_images(prepare_for_model(Image.fromarray(image), embedder.spec.preprocess)[None])[
        0
    ]


def test_general_search_embeds_the_whole_image(pipeline, tiny_embedder) -> None:
    img = scene(product(0), "plain", at=(60, 50))
    out = run(pipeline, tiny_embedder, img, "general_search", query=False)
    assert out.vector_kind == "whole" and out.box is None and out.extra is None
    assert np.allclose(out.vector, whole_vector(tiny_embedder, img), atol=1e-6)


def test_item_import_embeds_the_crop_and_records_the_box(pipeline, tiny_embedder) -> None:
    img = scene(product(0, side=80), "gradient", at=(100, 40), size=(200, 240))
    out = run(pipeline, tiny_embedder, img, "item_search", query=False)
    assert out.vector_kind == "item"
    assert out.extra is not None and out.extra["detected"] is True and out.extra["detector"] == "saliency"
    assert out.extra["box"] == out.box and out.extra["score"] == 1.0
    x0, y0, x1, y1 = out.box
    assert (
        Box(round(x0 * 240), round(y0 * 200), round(x1 * 240), round(y1 * 200)).iou(Box(100, 40, 180, 120))
        >= 0.85
    )
    assert not np.allclose(out.vector, whole_vector(tiny_embedder, img), atol=1e-3)


def test_item_import_without_an_item_is_embedded_whole_and_says_so(pipeline, tiny_embedder) -> None:
    blank = np.full((120, 160, 3), 200, np.uint8)
    out = run(pipeline, tiny_embedder, blank, "item_search", query=False)
    assert out.vector_kind == "item"  # stays searchable by item queries
    assert out.extra == {"detector": "saliency", "detected": False, "box": None}
    assert np.allclose(out.vector, whole_vector(tiny_embedder, blank), atol=1e-6)


def test_item_query_without_an_item_searches_nothing(pipeline, tiny_embedder) -> None:
    blank = np.full((120, 160, 3), 200, np.uint8)
    plan = pipeline.plan(blank, "item_search", query=True)
    assert plan.crops == [] and plan.vector_kind is None
    out = pipeline.finish(plan, [], query=True)
    assert out.vector is None and out.vector_kind is None and out.box is None


def test_adaptive_takes_the_face_path_for_a_face_and_whole_otherwise(pipeline, tiny_embedder) -> None:
    astronaut = skimage.data.astronaut()
    face = run(pipeline, tiny_embedder, astronaut, "adaptive_search", query=False)
    assert face.vector_kind == "face"
    assert face.extra is not None and face.extra["detected"] is True and face.extra["aligned"] is True
    x0, y0, x1, y1 = face.box
    assert (
        Box(round(x0 * 512), round(y0 * 512), round(x1 * 512), round(y1 * 512)).iou(Box(178, 69, 270, 161))
        >= 0.7
    )
    landscape = skimage.data.rocket()
    whole = run(pipeline, tiny_embedder, landscape, "adaptive_search", query=True)
    assert whole.vector_kind == "whole" and whole.box is None
    assert whole.extra == {"detector": "haar", "detected": False, "box": None}
    assert np.allclose(whole.vector, whole_vector(tiny_embedder, landscape), atol=1e-6)


def test_same_product_on_another_background_ranks_first_only_when_cropped(pipeline, tiny_embedder) -> None:
    """The fixture of the app test, checked without Ray. Products are square packshots so that the crop
    is mostly product: with random weights an embedding follows the pixels' colours, so the background
    decides the whole-image ranking and the product decides the crop's."""
    library = {
        "A_on_warm": scene(product(0), "warm", at=(60, 50)),
        "B_on_gradient": scene(product(1), "gradient", at=(60, 50)),
        "C_on_gradient": scene(product(2), "gradient", at=(30, 80)),
        "D_on_warm": scene(product(3), "warm", at=(20, 30)),
    }
    query = scene(product(0), "gradient", at=(90, 20))

    def ranking(mode: str) -> list[str]:
        q = run(pipeline, tiny_embedder, query, mode, query=True).vector
        scores = {
            k: float(q @ run(pipeline, tiny_embedder, v, mode, query=False).vector)
            for k, v in library.items()
        }
        return sorted(scores, key=scores.__getitem__, reverse=True)

    assert ranking("item_search")[0] == "A_on_warm"
    general = ranking("general_search")
    assert general.index("A_on_warm") > general.index("B_on_gradient")  # misled by the background


def test_clip_regions_chooses_among_candidates_with_the_prompts(tiny_embedder) -> None:
    """Plumbing only: with random weights the choice is arbitrary, so the test checks that the chosen
    crop is the one the prompt arithmetic ranks first and that its vector is that crop's vector."""
    config = DetectionConfig(item_detector=ItemDetectorConfig(kind="clip-regions", min_probability=0.0))
    pipeline = ModePipeline(tiny_embedder.spec.preprocess, config)
    img = scene(product(2, side=80), "plain", at=(100, 40), size=(200, 240))
    plan = pipeline.plan(img, "item_search", query=True)
    assert plan.candidates and len(plan.crops) == len(plan.boxes) > 1
    vectors = tiny_embedder.encode_images(np.stack(plan.crops))
    prompts = tiny_embedder.encode_texts(list(pipeline.prompts))
    out = pipeline.finish(plan, list(vectors), prompts, query=True)
    best, probs = pipeline.regions.choose(vectors, prompts)
    assert best is not None
    assert np.array_equal(out.vector, vectors[best])
    assert out.box == plan.boxes[best].normalized(240, 200)
    assert out.extra == {
        "detector": "clip-regions",
        "detected": True,
        "box": out.box,
        "score": round(float(probs[best]), 4),
    }


def test_clip_regions_with_no_item_like_region(tiny_embedder) -> None:
    config = DetectionConfig(item_detector=ItemDetectorConfig(kind="clip-regions", min_probability=1.0))
    pipeline = ModePipeline(tiny_embedder.spec.preprocess, config)
    img = scene(product(2, side=80), "plain", at=(100, 40), size=(200, 240))
    plan = pipeline.plan(img, "item_search", query=False)
    vectors = list(tiny_embedder.encode_images(np.stack(plan.crops)))
    prompts = tiny_embedder.encode_texts(list(pipeline.prompts))
    assert pipeline.regions.choose(np.stack(vectors), prompts)[0] is None  # no probability reaches 1.0
    imported = pipeline.finish(plan, vectors, prompts, query=False)
    assert imported.vector_kind == "item" and imported.box is None
    assert np.array_equal(imported.vector, vectors[0])  # candidate 0: the whole image
    assert imported.extra == {"detector": "clip-regions", "detected": False, "box": None}
    queried = pipeline.finish(pipeline.plan(img, "item_search", query=True), vectors, prompts, query=True)
    assert queried.vector is None


def test_finish_checks_its_inputs(pipeline, tiny_embedder) -> None:
    img = scene(product(0), "plain", at=(60, 50))
    plan = pipeline.plan(img, "item_search", query=False)
    with pytest.raises(ValueError, match="1 crops but 0 vectors"):
        pipeline.finish(plan, [], query=False)
    regions = ModePipeline(tiny_embedder.spec.preprocess, CLIP_REGIONS)
    candidates = regions.plan(img, "item_search", query=False)
    vectors = list(np.zeros((len(candidates.crops), tiny_embedder.dim), np.float32))
    with pytest.raises(ValueError, match="prompt vectors"):
        regions.finish(candidates, vectors, None, query=False)
    with pytest.raises(ValueError, match="unknown library mode"):
        pipeline.plan(img, "fuzzy_search", query=False)


def test_prompts_and_decode_hint(pipeline, tiny_embedder) -> None:
    assert pipeline.prompts == ()
    regions = ModePipeline(tiny_embedder.spec.preprocess, CLIP_REGIONS)
    defaults = ClipRegionConfig()
    assert regions.prompts == (*defaults.item_prompts, *defaults.background_prompts)
    side = max(tiny_embedder.spec.preprocess.size)
    assert pipeline.decode_side_hint("general_search") == side
    assert (
        pipeline.decode_side_hint("item_search") == pipeline.decode_side_hint("adaptive_search") == 3 * side
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [({"kind": "yolo"}, "kind"), ({"margin": -0.1}, "margin"), ({"work_size": 8}, "work_size")],
)
def test_item_detector_config_rejects_bad_values(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ItemDetectorConfig(**kwargs)


def test_face_crops_are_prepared_for_the_face_model(tiny_embedder) -> None:
    from dataclasses import replace

    face_pre = replace(tiny_embedder.spec.preprocess, size=(96, 96))
    pipeline = ModePipeline(tiny_embedder.spec.preprocess, face_preprocess=face_pre)
    face = pipeline.plan(skimage.data.astronaut(), "adaptive_search", query=True)
    assert face.vector_kind == "face" and face.crops[0].shape == (96, 96, 3)
    whole = pipeline.plan(skimage.data.rocket(), "adaptive_search", query=True)
    assert whole.vector_kind == "whole" and whole.crops[0].shape == (64, 64, 3)
    assert pipeline.decode_side_hint("adaptive_search") == 3 * 96
