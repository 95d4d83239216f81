"""index.detect: the item detector on product shots and blank images, Haar faces and alignment, crops,
and the CLIP region scorer's arithmetic."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

import index.detect.faces
from index.detect.boxes import Box, as_rgb_array, square_crop
from index.detect.faces import Face, FaceConfig, HaarFaceDetector, cascade_path, face_crop, load_cascade
from index.detect.regions import ClipRegionConfig, ClipRegionScorer
from index.detect.saliency import SaliencyConfig, SaliencyItemDetector
from tests.images import backdrop, product, scene

BACKDROPS = ["plain", "warm", "gradient", "vignette", "two_tone", "stripes", "noisy"]
#: Where the astronaut's face is in skimage.data.astronaut() (checked by eye: forehead to chin).
ASTRONAUT_FACE = Box(178, 69, 270, 161)


def jpeg(arr: np.ndarray, quality: int = 80) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def rotated(arr: np.ndarray, degrees: float) -> np.ndarray:
    h, w = arr.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(arr, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def saliency() -> SaliencyItemDetector:
    return SaliencyItemDetector()


@pytest.fixture(scope="module")
def faces() -> HaarFaceDetector:
    return HaarFaceDetector()


# -- Box ------------------------------------------------------------------------------------------


def test_box_geometry() -> None:
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert (a.width, a.height, a.area, a.center) == (10, 10, 100, (5.0, 5.0))
    assert a.iou(b) == pytest.approx(50 / 150)
    assert a.iou(Box(20, 20, 30, 30)) == 0.0
    assert Box(50, 25, 100, 75).normalized(200, 100) == [0.25, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="empty box"):
        Box(3, 3, 3, 9)


def test_as_rgb_array_accepts_pil_and_arrays_only() -> None:
    arr = np.zeros((4, 5, 3), np.uint8)
    assert as_rgb_array(arr) is arr
    assert as_rgb_array(Image.fromarray(arr).convert("L")).shape == (4, 5, 3)
    for bad in (np.zeros((4, 5), np.uint8), np.zeros((4, 5, 3), np.float32), [[0]]):
        with pytest.raises(ValueError, match="expected a PIL image"):
            as_rgb_array(bad)  # type: ignore[arg-type]


# -- items ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("background", BACKDROPS)
@pytest.mark.parametrize("compressed", [False, True], ids=["png", "jpeg"])
def test_product_on_simple_background_is_found_with_a_close_box(saliency, background, compressed) -> None:
    item = product(0, side=80)
    img = scene(item, background, at=(95, 60), size=(200, 240))
    img = jpeg(img) if compressed else img
    boxes = saliency.detect(img)
    assert boxes, "no item found"
    assert boxes[0].iou(Box(95, 60, 175, 140)) >= 0.85, boxes[0]
    assert boxes[0].score == 1.0  # a single clear item


def test_non_rectangular_real_object_is_boxed(saliency) -> None:
    # the coffee photo's cup region cut as an ellipse: the box must be the ellipse's bounding box
    item = product(0, side=100)
    mask = np.zeros((100, 100), np.uint8)
    cv2.ellipse(mask, (50, 50), (49, 35), 0, 0, 360, 1, -1)
    img = backdrop("plain", (220, 260))
    region = img[50:150, 120:220]
    region[mask.astype(bool)] = item[mask.astype(bool)]
    boxes = saliency.detect(img.astype(np.uint8))
    assert boxes[0].iou(Box(121, 65, 219, 136)) >= 0.85, boxes[0]


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((120, 160, 3), np.uint8),
        np.full((120, 160, 3), 255, np.uint8),
        np.full((300, 200, 3), (30, 120, 200), np.uint8),
        *(backdrop(kind).clip(0, 255).astype(np.uint8) for kind in BACKDROPS),
        jpeg(backdrop("vignette").clip(0, 255).astype(np.uint8), quality=60),
        np.random.default_rng(3).integers(0, 256, (100, 120, 3), dtype=np.uint8),
        np.full((5, 7, 3), 9, np.uint8),
    ],
    ids=["black", "white", "blue", *BACKDROPS, "vignette_jpeg60", "pure_noise", "tiny"],
)
def test_blank_and_uniform_images_have_no_item(saliency, image) -> None:
    assert saliency.detect(image) == []


def test_item_cut_by_the_frame_edge_is_still_found(saliency) -> None:
    item = product(1, side=90)
    img = scene(item[:70], "plain", at=(60, 130))  # rows 130..200: touches the bottom edge
    boxes = saliency.detect(img)
    assert boxes and boxes[0].iou(Box(60, 130, 150, 200)) >= 0.85, boxes


def test_most_prominent_of_several_items_comes_first(saliency) -> None:
    img = backdrop("plain", (240, 320))
    img[40:160, 150:270] = product(2, side=120)
    img[180:220, 20:60] = product(3, side=40)
    boxes = saliency.detect(img.astype(np.uint8))
    assert len(boxes) == 2
    assert boxes[0].iou(Box(150, 40, 270, 160)) >= 0.85
    assert boxes[1].iou(Box(20, 180, 60, 220)) >= 0.7
    assert boxes[0].score > boxes[1].score and boxes[0].score + boxes[1].score == pytest.approx(1.0, abs=1e-3)


def test_parts_of_one_item_are_merged(saliency) -> None:
    # a pair of shoes: two blobs a few pixels apart are one item
    img = backdrop("plain", (200, 260))
    img[60:140, 60:120] = cv2.resize(product(4, 60), (60, 80))
    img[60:140, 124:184] = cv2.resize(product(5, 60), (60, 80))
    boxes = saliency.detect(img.astype(np.uint8))
    assert boxes[0].iou(Box(60, 60, 184, 140)) >= 0.85, boxes


def test_saliency_accepts_pil_images(saliency) -> None:
    img = scene(product(0, 80), "plain", at=(60, 60))
    assert saliency.detect(Image.fromarray(img)) == saliency.detect(img)


def test_saliency_on_packaged_photos_boxes_the_subject(saliency) -> None:
    # full-frame photos are not product shots; the detector still boxes what differs from the border
    rocket = saliency.detect(skimage.data.rocket())
    assert rocket and rocket[0].area < 0.8 * 427 * 640
    assert saliency.detect(skimage.data.hubble_deep_field()) == []  # black sky with specks


# -- faces ----------------------------------------------------------------------------------------


def test_haar_finds_the_astronauts_face(faces) -> None:
    found = faces.faces(skimage.data.astronaut())
    assert len(found) == 1
    assert found[0].box.iou(ASTRONAUT_FACE) >= 0.7, found[0].box
    assert found[0].eyes is not None and abs(found[0].roll_degrees) < 8  # she looks straight ahead
    assert faces.detect(skimage.data.astronaut()) == [found[0].box]


def test_face_box_follows_the_image_scale(faces) -> None:
    big = cv2.resize(skimage.data.astronaut(), (768, 768), interpolation=cv2.INTER_LINEAR)
    found = faces.detect(big)
    truth = Box(267, 103, 405, 242)  # ASTRONAUT_FACE * 1.5
    assert found and found[0].iou(truth) >= 0.7, found


@pytest.mark.parametrize(
    "name", ["coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry"]
)
def test_no_face_in_the_packaged_non_face_photos(faces, name) -> None:
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    assert faces.detect(img) == []


def test_blank_image_has_no_face(faces) -> None:
    assert faces.detect(np.full((300, 300, 3), 128, np.uint8)) == []
    assert faces.detect(np.zeros((10, 10, 3), np.uint8)) == []  # smaller than the smallest face


@pytest.mark.parametrize("degrees", [10, -8])
def test_alignment_levels_a_tilted_face(faces, degrees) -> None:
    upright = skimage.data.astronaut()
    ref_face = faces.faces(upright)[0]
    tilted = rotated(upright, degrees)
    face = faces.faces(tilted)[0]
    assert face.eyes is not None
    # cv2 rotates counter-clockwise for positive angles: the eye line tilts the other way
    assert np.sign(face.roll_degrees - ref_face.roll_degrees) == -np.sign(degrees)

    def small(crop: np.ndarray) -> np.ndarray:
        return cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)

    ref = small(face_crop(upright, ref_face, 0.2))
    aligned = np.abs(small(face_crop(tilted, face, 0.2)) - ref).mean()
    unaligned = np.abs(small(face_crop(tilted, Face(face.box), 0.2)) - ref).mean()
    assert aligned < 0.6 * unaligned, (aligned, unaligned)


def test_faces_from_several_threads_at_once(faces) -> None:
    # the ingress calls one detector from many worker threads; each thread gets its own cascades
    astronaut = skimage.data.astronaut()
    images = [
        astronaut,
        rotated(astronaut, 10),
        skimage.data.coffee(),
        np.ascontiguousarray(astronaut[:, ::-1]),
    ]
    expected = [faces.faces(i) for i in images]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(faces.faces, images * 3))
    assert got == expected * 3


def test_alignment_can_be_switched_off() -> None:
    detector = HaarFaceDetector(FaceConfig(align=False))
    found = detector.faces(skimage.data.astronaut())
    assert found and found[0].eyes is None and found[0].roll_degrees is None


def test_cascades_resolve_by_name_or_path_and_fail_clearly(tmp_path) -> None:
    path = cascade_path("haarcascade_eye.xml")
    assert path.is_file() and not load_cascade(str(path)).empty()
    # the package's own copies, not OpenCV's data folder (OpenCV 5 ships none)
    assert path.parent == Path(index.detect.faces.__file__).parent / "cascades"
    assert cascade_path(FaceConfig().cascade).parent == path.parent
    with pytest.raises(ValueError, match=r"not found.*bundled: .*haarcascade_frontalface_alt2\.xml"):
        cascade_path("haarcascade_nope.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<not a cascade/>")
    with pytest.raises(ValueError, match="could not load"):
        load_cascade(str(bad))


# -- crops ----------------------------------------------------------------------------------------


def test_square_crop_inside_the_image_is_the_exact_region() -> None:
    img = np.arange(100 * 120 * 3, dtype=np.uint32).reshape(100, 120, 3).astype(np.uint8)
    crop = square_crop(img, Box(40, 30, 60, 50), margin=0.25)  # 20 px + 5 px each side
    assert crop.shape == (30, 30, 3)
    assert np.array_equal(crop, img[25:55, 35:65])


def test_square_crop_of_a_wide_box_is_square_and_shifted_inside() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :, 0] = np.arange(200, dtype=np.uint8)[None, :]
    crop = square_crop(img, Box(150, 40, 200, 60), margin=0.0)  # 50 wide: a 50x50 square
    assert crop.shape == (50, 50, 3)
    assert crop[0, 0, 0] == 150 and crop[0, -1, 0] == 199  # shifted to stay inside, not padded


def test_square_crop_larger_than_the_image_repeats_the_edges() -> None:
    img = np.full((40, 100, 3), 7, np.uint8)
    crop = square_crop(img, Box(0, 0, 100, 40), margin=0.1)
    assert crop.shape == (120, 120, 3) and (crop == 7).all()


def test_face_crop_without_eyes_is_the_square_crop() -> None:
    img = skimage.data.astronaut()
    assert np.array_equal(face_crop(img, Face(ASTRONAUT_FACE), 0.2), square_crop(img, ASTRONAUT_FACE, 0.2))


# -- clip regions ---------------------------------------------------------------------------------


def test_region_proposals() -> None:
    scorer = ClipRegionScorer()
    img = scene(product(0, 80), "plain", at=(100, 20), size=(200, 240))
    boxes = scorer.propose(img)
    assert boxes[0] == Box(0, 0, 240, 200, score=0.0)  # the whole image first
    assert 1 < len(boxes) <= scorer.config.max_proposals
    assert any(b.iou(Box(100, 20, 180, 100)) >= 0.85 for b in boxes)  # the saliency box
    assert all(a.iou(b) <= 0.9 for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert len(ClipRegionScorer(ClipRegionConfig(max_proposals=3)).propose(img)) == 3


def test_region_choice_follows_the_prompts() -> None:
    cfg = ClipRegionConfig(item_prompts=("item",), background_prompts=("bg1", "bg2"), min_probability=0.5)
    scorer = ClipRegionScorer(cfg)
    prompts = np.eye(4, dtype=np.float32)[:3]  # item, bg1, bg2 along three axes
    crops = np.array([[0.1, 0.9, 0.1, 0.1], [0.8, 0.2, 0.1, 0.1], [0.3, 0.1, 0.1, 0.9]], np.float32)
    crops /= np.linalg.norm(crops, axis=1, keepdims=True)
    best, probs = scorer.choose(crops, prompts)
    assert best == 1 and probs[1] > 0.99 and probs[0] < 0.01
    logits = 100 * crops.astype(np.float64) @ prompts.T.astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = e[:, 0] / e.sum(axis=1)
    assert np.allclose(probs, expected)
    assert scorer.choose(crops[:1], prompts)[0] is None  # a background-like crop alone: no item


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SaliencyConfig(work_size=8), "work_size"),
        (lambda: SaliencyConfig(border_fraction=0.5), "border_fraction"),
        (lambda: SaliencyConfig(min_area_fraction=0), "min_area_fraction"),
        (lambda: FaceConfig(scale_factor=1.0), "scale_factor"),
        (lambda: FaceConfig(margin=2), "margin"),
        (lambda: ClipRegionConfig(item_prompts=()), "item_prompts"),
        (lambda: ClipRegionConfig(min_probability=1.5), "min_probability"),
    ],
)
def test_configs_reject_bad_values(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()
