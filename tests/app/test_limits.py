"""Every configurable limit, enforced with the envelope, on a second app deployed with small limits; and the
settings that only matter away from the shared test app's: the default fetch policy (no allow-list, so
loopback is refused: SSRF), API keys from a file, and open paths under a route prefix.

Each limit is checked at its bound (accepted) and one past it (refused with a message naming the field).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from ray import serve

from tests.app.conftest import ZERO_CPU, Client, deploy, wait_ready
from tests.images import b64, encode, image_b64, pattern

pytestmark = pytest.mark.ray

NAME = "strict"
KEY = "strict-file-key-1"
LIMITS = {
    "max_body_bytes": 60_000,
    "max_image_bytes": 30_000,
    "max_image_pixels": 64 * 64,
    "image_formats": ["PNG"],
    "max_text_chars": 20,
    "max_top_k": 5,
    "max_libraries": 2,
    "max_filter_depth": 3,
    "max_filter_conditions": 4,
    "max_filter_in_values": 3,
    "max_filter_cost": 20,
    "max_filter_work": 150,
    "max_tags": 2,
    "max_tag_key_length": 5,
    "max_tag_list_length": 2,
    "max_tag_string_length": 6,
}


@pytest.fixture(scope="module")
def strict(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    root = tmp_path_factory.mktemp("strict")
    keys = root / "api_keys"
    keys.write_text(f"# one key per line\n{KEY}\n")
    deploy(
        str(root / "storage"),
        name=NAME,
        route_prefix=f"/{NAME}",
        limits=LIMITS,
        api_keys_file=str(keys),
        fetch_allowed_networks=[],  # the production default: no private address is fetched
        deployment_options={
            "Ingress": ZERO_CPU,
            "Encoder": ZERO_CPU,
            "LibraryIndex": ZERO_CPU,
            "Writer": ZERO_CPU,
            "Importer": ZERO_CPU,
        },
    )
    base = f"http://127.0.0.1:{serve_port}/{NAME}"
    wait_ready(base)  # /health is open under the route prefix too
    c = Client(base, {"Authorization": f"Bearer {KEY}"})
    c.ok("/library/create", {"library_name": "s", "mode": "general_search"})
    yield c
    serve.delete(NAME)


def small_png(seed: int = 1, side: int = 32) -> str:
    return b64(encode(pattern(seed, (side, side)), "PNG"))


def add(c: Client, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"library_name": "s", "image_id": "a", "image_uri": "u", "image_base64": small_png()} | fields
    return c.post("/image/add", body)


def search(c: Client, **fields: Any) -> tuple[int, dict[str, Any]]:
    return c.post("/search/by-text", {"library_name": "s", "query_text": "x"} | fields)


def refused(answer: tuple[int, dict[str, Any]], names: str, http: int = 400) -> None:
    code, env = answer
    expected = {400: "INVALID_PARAMETER", 413: "PAYLOAD_TOO_LARGE"}[http]
    assert (code, env["status"], env["data"]) == (http, expected, None), env
    assert names in env["message"], env["message"]


def accepted(answer: tuple[int, dict[str, Any]]) -> None:
    code, env = answer
    assert (code, env["status"]) == (200, "SUCCESS"), env


def cond(i: int = 1) -> dict[str, Any]:
    return {"field": "a", "op": "=", "value": i}


def test_body_size(strict):
    accepted(search(strict))
    r = strict.raw("POST", "/search/by-text", json={"library_name": "s", "query_text": "x" * 60_000})
    assert r.status_code == 413 and r.json()["status"] == "PAYLOAD_TOO_LARGE"
    assert "60000 bytes" in r.json()["message"]


def test_image_bytes_pixels_and_formats(strict):
    accepted(add(strict, image_base64=small_png(side=64)))  # 64 x 64 = the pixel limit
    refused(add(strict, image_base64=small_png(side=65)), "image_base64: the image is 65x65", 413)
    bmp = encode(pattern(2, (32, 32)), "BMP")  # small enough, but BMP is not a configured format
    refused(
        add(strict, image_base64=b64(bmp)), "image_base64: not a readable image: the data is not PNG", 400
    )
    big = b64(b"\x89PNG" + bytes(31_000))
    refused(add(strict, image_base64=big), "image_base64", 413)  # over max_image_bytes before decoding
    refused(add(strict, image_base64=image_b64(1, "JPEG", (32, 32))), "the data is not PNG", 400)


def test_text_length(strict):
    accepted(search(strict, query_text="t" * 20))
    refused(search(strict, query_text="t" * 21), "query_text: longer than 20")


def test_top_k(strict):
    for i in range(7):
        accepted(add(strict, image_id=f"k{i}", image_base64=small_png(100 + i)))
    assert len(strict.ok("/search/by-text", {"library_name": "s", "query_text": "x"})["results"]) == 5
    accepted(search(strict, top_k=5))
    refused(search(strict, top_k=6), "top_k: must be between 1 and 5")


def test_filter_depth_conditions_and_in_values(strict):
    accepted(search(strict, tag_filter=[[cond()]]))  # depth 3
    refused(search(strict, tag_filter=[[[cond()]]]), "nested too deeply")
    accepted(search(strict, tag_filter=[cond(i) for i in range(4)]))
    refused(search(strict, tag_filter=[cond(i) for i in range(5)]), "too many conditions; expected at most 4")
    accepted(search(strict, tag_filter=[{"field": "a", "op": "in", "value": [1, 2, 3]}]))
    refused(
        search(strict, tag_filter=[{"field": "a", "op": "in", "value": [1, 2, 3, 4]}]), "tag_filter[0].value"
    )
    refused(search(strict, tag_filter=[{"field": "a", "op": "=", "value": "s" * 7}]), "tag_filter[0].value")


def test_filter_cost_budget(strict):
    def contains(n: int) -> list[dict[str, Any]]:
        return [{"field": "a", "op": "contains", "value": "s"} for _ in range(n)]

    accepted(search(strict, tag_filter=contains(2)))  # 1 for the list + 2 x 8
    refused(search(strict, tag_filter=contains(3)), "budget of 20 units (max_filter_cost)")


def test_filter_work_budget_counts_the_library_tags(strict):
    """max_filter_work prices the filter against the library's tags: with 4 distinct 6-character strings
    in "w", one 'contains' on it costs 5 x 24 characters + 16 x 4 strings + 8 x 4 entries + 2 per row,
    over the budget of 150, while an equality (3 per row at most) stays under it for < 50 rows."""
    for i, word in enumerate(["alpha1", "bravo2", "charl3", "delta4"]):
        accepted(add(strict, image_id=f"w{i}", image_base64=small_png(200 + i), tags={"w": word}))
    accepted(search(strict, tag_filter=[{"field": "w", "op": "=", "value": "alpha1"}]))
    accepted(search(strict, tag_filter=[{"field": "absent", "op": "contains", "value": "a"}]))  # no data
    refused(
        search(strict, tag_filter=[{"field": "w", "op": "contains", "value": "a"}]),
        "tag_filter: filter is too expensive to evaluate over this library's tags",
    )
    refused(
        search(strict, tag_filter={"field": "w", "op": ">", "value": "b"}), "budget of 150 (max_filter_work)"
    )


def test_tag_count_and_sizes(strict):
    accepted(add(strict, tags={"k1": ["abcdef", 2], "k2": True}))
    refused(add(strict, tags={"k1": 1, "k2": 2, "k3": 3}), "tags: 3 tags is too many; expected at most 2")
    refused(add(strict, tags={"k" * 6: 1}), "has 6 characters; expected at most 5")
    refused(add(strict, tags={"k": [1, 2, 3]}), "tags.k: list has 3 elements; expected at most 2")
    refused(add(strict, tags={"k": "s" * 7}), "tags.k")
    refused(
        strict.post("/image/update_tags", {"library_name": "s", "image_id": "a", "tags": {"k": "s" * 7}}),
        "tags.k",
    )


def test_library_count(strict):
    accepted(strict.post("/library/create", {"library_name": "s2", "mode": "general_search"}))
    refused(strict.post("/library/create", {"library_name": "s3", "mode": "general_search"}), "max_libraries")
    accepted(strict.post("/library/delete", {"library_name": "s2"}))
    accepted(strict.post("/library/create", {"library_name": "s3", "mode": "general_search"}))


def test_default_fetch_policy_refuses_loopback(strict, image_server):
    """The shared test app allows 127.0.0.0/8 and fetches from this server; the default does not."""
    base, _ = image_server
    code, env = strict.post(
        "/image/add", {"library_name": "s", "image_id": "f", "image_uri": f"{base}/photo.jpg"}
    )
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert env["message"].startswith("image_uri: refused: the host is not a public address"), env["message"]
    assert "127.0.0.1" not in env["message"].split("image_uri:", 1)[1].split(";")[0]


def test_keys_from_the_file(strict):
    base = strict.base + "/api/v1/operators/image-search"
    assert requests.get(base + "/library/list", timeout=30).status_code == 401
    bad_key = {"Authorization": "Bearer strict-file-key-2"}
    assert requests.get(base + "/library/list", headers=bad_key, timeout=30).status_code == 401
    assert strict.get("/library/list")[0] == 200
    assert requests.get(base + "/health", timeout=30).status_code == 200
    assert requests.get(strict.base + "/health", timeout=30).status_code == 200
