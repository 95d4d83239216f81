"""item_search and adaptive_search over HTTP: detection on import and query, the kind a search uses,
what records and responses say about it.

The product fixture is designed for the tiny random-weight model (see tests/index/test_modes.py):
square packshots pasted on a warm plain backdrop or a blue gradient, so that the whole image is mostly
background and the crop is mostly product.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image
from ray import serve

from index.detect.boxes import Box
from index.model.spec import tiny_random_dir
from tests.app.conftest import ZERO_CPU, Client, deploy, wait_ready
from tests.images import b64, encode, product, scene

pytestmark = pytest.mark.ray

#: id -> (product seed, backdrop, top-left corner)
SHOTS = {
    "A_on_warm": (0, "warm", (60, 50)),
    "B_on_gradient": (1, "gradient", (60, 50)),
    "C_on_gradient": (2, "gradient", (30, 80)),
    "D_on_warm": (3, "warm", (20, 30)),
}
QUERY = (0, "gradient", (90, 20))  # product A on the other background, elsewhere in the frame


def shot(seed: int, background: str, at: tuple[int, int]) -> str:
    return b64(encode(scene(product(seed), background, at)))


def jpeg_b64(arr: np.ndarray, quality: int = 90) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return b64(buf.getvalue())


def blank_b64(colour: tuple[int, int, int] = (230, 230, 230)) -> str:
    return b64(encode(np.full((150, 200, 3), colour, np.uint8)))


def fill(client, mode: str) -> str:
    name = f"shop_{mode}_{os.getpid()}"
    client.ok("/library/create", {"library_name": name, "mode": mode})
    for image_id, (seed, background, at) in SHOTS.items():
        client.ok(
            "/image/add",
            {
                "library_name": name,
                "image_id": image_id,
                "image_uri": f"https://example.com/{image_id}.png",
                "image_base64": shot(seed, background, at),
                "tags": {"product": "ABCD"[seed]},
            },
        )
    return name


@pytest.fixture(scope="module")
def item_library(client) -> str:
    return fill(client, "item_search")


@pytest.fixture(scope="module")
def general_library(client) -> str:
    return fill(client, "general_search")


def search(client, library: str, image_base64: str, **extra) -> dict:
    return client.ok(
        "/search/by-image",
        {"library_name": library, "image_base64": image_base64, "return_frame": False, **extra},
    )


# -- item_search ---------------------------------------------------------------------------------


def test_same_product_on_another_background_ranks_first_in_item_search(client, item_library, general_library):
    data = search(client, item_library, shot(*QUERY))
    ids = [r["image_id"] for r in data["results"]]
    assert ids[0] == "A_on_warm", data["results"]
    assert data["query_kind"] == "item"
    x0, y0, x1, y1 = data["query_box"]  # fractions of the 200x200 query
    assert (
        Box(round(x0 * 200), round(y0 * 200), round(x1 * 200), round(y1 * 200)).iou(Box(90, 20, 180, 110))
        >= 0.85
    )

    # the whole-image embedding is misled by the background: a different product on the query's
    # background beats the same product on another background
    general = search(client, general_library, shot(*QUERY))
    ids = [r["image_id"] for r in general["results"]]
    assert ids.index("A_on_warm") > ids.index("B_on_gradient")
    assert set(general) == {"results"}  # the extension fields belong to the detection modes


def test_item_records_carry_the_detection(client, item_library):
    image = client.ok("/image/get", {"library_name": item_library, "image_id": "C_on_gradient"})["images"][0]
    assert image["vector_kind"] == "item"
    detection = image["detection"]
    assert detection["detector"] == "saliency" and detection["detected"] is True and detection["score"] == 1.0
    x0, y0, x1, y1 = detection["box"]
    assert (
        Box(round(x0 * 200), round(y0 * 200), round(x1 * 200), round(y1 * 200)).iou(Box(30, 80, 120, 170))
        >= 0.85
    )


def test_item_import_without_an_item_is_embedded_whole_and_stays_findable(client, item_library):
    body = {
        "library_name": item_library,
        "image_id": "blank",
        "image_uri": "https://example.com/blank.png",
        "image_base64": blank_b64((200, 60, 60)),
    }
    client.ok("/image/add", body)
    image = client.ok("/image/get", {"library_name": item_library, "image_id": "blank"})["images"][0]
    assert image["vector_kind"] == "item"
    assert image["detection"] == {"detector": "saliency", "detected": False, "box": None}
    res = client.ok(
        "/search/by-id", {"library_name": item_library, "image_id": "blank", "return_frame": False}
    )
    assert res["results"][0]["image_id"] == "blank" and res["results"][0]["score"] >= 0.99
    client.ok("/image/delete", {"library_name": item_library, "image_id": "blank"})


@pytest.mark.parametrize("colour", [(230, 230, 230), (0, 0, 0), (30, 120, 200)])
def test_blank_query_returns_an_empty_list(client, item_library, colour):
    data = search(client, item_library, blank_b64(colour))
    assert data == {"results": [], "query_kind": None, "query_box": None}


def test_item_query_with_filter_and_jpeg(client, item_library):
    arr = scene(product(0), "gradient", (90, 20))
    data = search(
        client,
        item_library,
        jpeg_b64(arr),
        tag_filter=[{"field": "product", "op": "in", "value": ["A", "B"]}],
    )
    assert data["results"][0]["image_id"] == "A_on_warm"
    assert {r["tags"]["product"] for r in data["results"]} <= {"A", "B"}


# -- adaptive_search -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people(client) -> str:
    name = f"people_{os.getpid()}"
    client.ok("/library/create", {"library_name": name, "mode": "adaptive_search"})
    astronaut = skimage.data.astronaut()
    shots = {
        "astronaut": astronaut,
        "astronaut_mirrored": np.ascontiguousarray(astronaut[:, ::-1]),
        "rocket": skimage.data.rocket(),
        "coffee": skimage.data.coffee(),
    }
    for image_id, arr in shots.items():
        client.ok(
            "/image/add",
            {
                "library_name": name,
                "image_id": image_id,
                "image_uri": f"https://example.com/{image_id}.jpg",
                "image_base64": jpeg_b64(arr),
            },
        )
    return name


def test_face_image_takes_the_face_path_and_landscape_the_whole_path(client, people):
    kinds = {
        image_id: client.ok("/image/get", {"library_name": people, "image_id": image_id})["images"][0]
        for image_id in ("astronaut", "astronaut_mirrored", "rocket", "coffee")
    }
    assert {k: v["vector_kind"] for k, v in kinds.items()} == {
        "astronaut": "face",
        "astronaut_mirrored": "face",
        "rocket": "whole",
        "coffee": "whole",
    }
    face = kinds["astronaut"]["detection"]
    assert face["detector"] == "haar" and face["detected"] is True and isinstance(face["aligned"], bool)
    assert kinds["rocket"]["detection"] == {"detector": "haar", "detected": False, "box": None}


def test_face_and_whole_vectors_are_never_compared(client, people):
    face_query = search(client, people, jpeg_b64(skimage.data.astronaut(), quality=80), top_k=10)
    assert face_query["query_kind"] == "face"
    ids = [r["image_id"] for r in face_query["results"]]
    assert set(ids) == {"astronaut", "astronaut_mirrored"}  # only face vectors
    assert ids[0] == "astronaut" and face_query["results"][0]["score"] >= 0.99
    x0, y0, x1, y1 = face_query["query_box"]
    assert (
        Box(round(x0 * 512), round(y0 * 512), round(x1 * 512), round(y1 * 512)).iou(Box(178, 69, 270, 161))
        >= 0.7
    )

    landscape = search(client, people, jpeg_b64(skimage.data.rocket(), quality=80), top_k=10)
    assert landscape["query_kind"] == "whole" and landscape["query_box"] is None
    ids = [r["image_id"] for r in landscape["results"]]
    assert set(ids) == {"rocket", "coffee"} and ids[0] == "rocket"


def test_search_by_id_uses_the_records_path(client, people):
    res = client.ok("/search/by-id", {"library_name": people, "image_id": "coffee", "return_frame": False})
    assert {r["image_id"] for r in res["results"]} == {"rocket", "coffee"}
    res = client.ok("/search/by-id", {"library_name": people, "image_id": "astronaut", "return_frame": False})
    assert {r["image_id"] for r in res["results"]} == {"astronaut", "astronaut_mirrored"}


def test_blank_query_in_adaptive_search_uses_the_whole_path(client, people):
    data = search(client, people, blank_b64())
    assert data["query_kind"] == "whole" and data["query_box"] is None
    assert {r["image_id"] for r in data["results"]} == {"rocket", "coffee"}


@pytest.mark.parametrize("library", ["item_library", "people"])
def test_by_text_is_mode_not_supported(client, library, request):
    name = request.getfixturevalue(library)
    code, env = client.post("/search/by-text", {"library_name": name, "query_text": "a red dress"})
    assert (code, env["status"], env["data"]) == (400, "MODE_NOT_SUPPORTED", None)


def test_health_reports_the_detectors(client):
    code, env = client.get("/health", prefix=False)
    assert code == 200
    assert env["data"]["detection"] == {
        "item_detector": "saliency",
        "face_detector": "haar:haarcascade_frontalface_alt2.xml",
        "face_alignment": True,
        "face_model": None,
    }


# -- a learned face-embedding model --------------------------------------------------------------


def test_learned_options_face_model_and_clip_regions(serve_port, tmp_path):
    """A second app with both learned options on (plumbing, not quality: random weights).

    Faces go to their own open_clip model, loaded through the same mechanism as the main one (here a
    local-dir config at 96 px). The main tiny model takes 64 px inputs only, so a face that gets embedded
    at all went to the face model. Items are chosen by CLIP region scoring; with min_probability 0 a
    region is always chosen, and the same query bytes choose the same region again."""
    face_dir = tmp_path / "tiny-face"
    face_dir.mkdir()
    config = json.loads((tiny_random_dir() / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["image_size"] = 96
    (face_dir / "open_clip_config.json").write_text(json.dumps(config))
    name = "learned"
    deploy(
        str(tmp_path / "storage"),
        name=name,
        route_prefix="/learned",
        face_model=f"local-dir:{face_dir}",
        face_pretrained="random",
        item_detector={"kind": "clip-regions", "min_probability": 0.0, "max_proposals": 6},
        deployment_options={
            d: ZERO_CPU for d in ("Ingress", "Encoder", "LibraryIndex", "Writer", "Importer")
        },
    )
    base = f"http://127.0.0.1:{serve_port}/learned"
    try:
        wait_ready(base)
        c = Client(base)
        health = c.get("/health", prefix=False)[1]["data"]
        assert health["detection"]["face_model"] == "local-dir:tiny-face/random-seed-0"
        assert health["detection"]["item_detector"] == "clip-regions"

        lib = c.ok("/library/create", {"library_name": "faces", "mode": "adaptive_search"})
        assert lib["face_model"] == "local-dir:tiny-face/random-seed-0"
        for image_id, arr in (("astronaut", skimage.data.astronaut()), ("rocket", skimage.data.rocket())):
            body = {"library_name": "faces", "image_id": image_id, "image_uri": image_id}
            c.ok("/image/add", body | {"image_base64": jpeg_b64(arr)})
        record = c.ok("/image/get", {"library_name": "faces", "image_id": "astronaut"})["images"][0]
        assert record["vector_kind"] == "face"
        body = {"library_name": "faces", "image_base64": jpeg_b64(skimage.data.astronaut())}
        data = c.ok("/search/by-image", body)
        assert data["query_kind"] == "face"
        assert [r["image_id"] for r in data["results"]] == ["astronaut"]
        assert data["results"][0]["score"] >= 0.99

        c.ok("/library/create", {"library_name": "items", "mode": "item_search"})
        for image_id, (seed, background, at) in SHOTS.items():
            body = {"library_name": "items", "image_id": image_id, "image_uri": image_id}
            c.ok("/image/add", body | {"image_base64": shot(seed, background, at)})
        record = c.ok("/image/get", {"library_name": "items", "image_id": "B_on_gradient"})["images"][0]
        assert record["vector_kind"] == "item"
        assert record["detection"]["detector"] == "clip-regions" and record["detection"]["detected"] is True
        assert 0.0 <= record["detection"]["score"] <= 1.0 and len(record["detection"]["box"]) == 4
        data = c.ok(
            "/search/by-image", {"library_name": "items", "image_base64": shot(*SHOTS["B_on_gradient"])}
        )
        assert data["query_kind"] == "item" and data["query_box"] == record["detection"]["box"]
        assert data["results"][0]["image_id"] == "B_on_gradient" and data["results"][0]["score"] >= 0.99
    finally:
        serve.delete(name)
