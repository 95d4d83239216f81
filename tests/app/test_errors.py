"""Every status string of the contract, and bad input answered 4xx with a message naming the field."""

from __future__ import annotations

import pytest
import requests

from tests.images import b64, encode, image_b64

pytestmark = pytest.mark.ray


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/search/by-image", {"image_base64": "x"}, "library_name"),
        ("/search/by-image", {"library_name": "L"}, "image_base64"),
        ("/search/by-image", {"library_name": "L", "image_base64": "", "top_k": 5}, "image_base64"),
        ("/search/by-image", {"library_name": "L", "image_base64": "@@@@"}, "image_base64"),
        (
            "/search/by-image",
            {"library_name": "L", "image_base64": b64(b"not an image at all")},
            "image_base64",
        ),
        ("/search/by-image", {"library_name": "L", "image_base64": "AAAA", "top_k": 0}, "top_k"),
        ("/search/by-image", {"library_name": "L", "image_base64": "AAAA", "top_k": 1001}, "top_k"),
        ("/search/by-image", {"library_name": "L", "image_base64": "AAAA", "top_k": "5"}, "top_k"),
        ("/search/by-image", {"library_name": "L", "image_base64": "AAAA", "top_k": 2.5}, "top_k"),
        (
            "/search/by-image",
            {"library_name": "L", "image_base64": "AAAA", "return_frame": "yes"},
            "return_frame",
        ),
        ("/search/by-image", {"library_name": "L", "image_base64": "AAAA", "tag_filters": []}, "tag_filters"),
        ("/search/by-image", {"library_name": "L", "image_base64": "AAAA", "min_score": 2}, "min_score"),
        ("/search/by-text", {"library_name": "L", "query_text": ""}, "query_text"),
        ("/search/by-text", {"library_name": "L", "query_text": "   "}, "query_text"),
        ("/search/by-text", {"library_name": "L", "query_text": "x" * 1001}, "query_text"),
        ("/search/by-text", {"library_name": "L", "query_text": 5}, "query_text"),
        ("/search/by-text", {"library_name": "../etc", "query_text": "x"}, "library_name"),
        (
            "/search/by-text",
            {"library_name": "L", "query_text": "x", "tag_filter": {"field": "a", "op": "like", "value": 1}},
            "tag_filter.op",
        ),
        (
            "/search/by-text",
            {"library_name": "L", "query_text": "x", "tag_filter": [{"field": "a", "op": "="}]},
            "tag_filter[0]",
        ),
        (
            "/search/by-text",
            {
                "library_name": "L",
                "query_text": "x",
                "tag_filter": [{"field": "a", "op": "in", "value": "x"}],
            },
            "tag_filter[0].value",
        ),
        (
            "/search/by-text",
            {"library_name": "L", "query_text": "x", "tag_filter": [{"field": "a", "op": "=", "value": [1]}]},
            "tag_filter[0].value",
        ),
        (
            "/search/by-text",
            {
                "library_name": "L",
                "query_text": "x",
                "tag_filter": [{"field": "a", "op": ">", "value": True}],
            },
            "tag_filter[0].value",
        ),
        (
            "/search/by-text",
            {"library_name": "L", "query_text": "x", "tag_filter": [{"and": []}]},
            "tag_filter[0]",
        ),
        (
            "/search/by-text",
            {"library_name": "L", "query_text": "x", "tag_filter": {"or": {}}},
            "tag_filter.or",
        ),
        (
            "/search/by-text",
            {"library_name": "L", "query_text": "x", "tag_filter": "color=red"},
            "tag_filter",
        ),
        (
            "/image/add",
            {"library_name": "L", "image_id": "", "image_uri": "u", "image_base64": "AAAA"},
            "image_id",
        ),
        (
            "/image/add",
            {"library_name": "L", "image_id": "x" * 257, "image_uri": "u", "image_base64": "AAAA"},
            "image_id",
        ),
        (
            "/image/add",
            {"library_name": "L", "image_id": "a", "image_uri": "u" * 2049, "image_base64": "AAAA"},
            "image_uri",
        ),
        ("/image/add", {"library_name": "L", "image_id": "a", "image_base64": "AAAA"}, "image_uri"),
        (
            "/image/add",
            {"library_name": "L", "image_id": "a", "image_uri": "u", "save_image": 1},
            "save_image",
        ),
        ("/image/delete", {"library_name": "L"}, "image_id"),
        ("/image/update_tags", {"library_name": "L", "image_id": "a"}, "tags"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, path, body, field):
    code, env = client.post(path, body)
    assert code == 400, env
    assert env["status"] == "INVALID_PARAMETER"
    assert env["data"] is None
    assert field in env["message"], env["message"]


def test_deep_filter_over_the_limit(client, library):
    flt: object = {"field": "a", "op": "=", "value": 1}
    for _ in range(40):
        flt = [flt]
    code, env = client.post(
        "/search/by-text", {"library_name": library, "query_text": "x", "tag_filter": flt}
    )
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert "nested too deeply" in env["message"]


@pytest.mark.parametrize(
    "raw, content_type",
    [
        ("{not json", "application/json"),
        ("", "application/json"),
        ("[1, 2]", "application/json"),
        ("null", "application/json"),
    ],
)
def test_malformed_bodies(client, raw, content_type):
    r = client.raw("POST", "/search/by-image", data=raw, headers={"Content-Type": content_type})
    assert r.status_code == 400 and r.json()["status"] == "INVALID_PARAMETER", r.text


def test_unknown_route_and_method_use_the_envelope(client):
    r = client.raw("GET", "/no/such/route")
    assert r.status_code == 404 and r.json()["status"] == "NOT_FOUND"
    r = client.raw("GET", "/search/by-image")
    assert r.status_code == 405 and r.json()["status"] == "METHOD_NOT_ALLOWED"


def test_not_found_statuses(client, library):
    code, env = client.post(
        "/search/by-image", {"library_name": "no_such_library", "image_base64": image_b64(1)}
    )
    assert (code, env["status"]) == (404, "LIBRARY_NOT_FOUND")
    assert "no_such_library" in env["message"]
    code, env = client.post("/image/get", {"library_name": library, "image_id": "nope"})
    assert (code, env["status"]) == (404, "IMAGE_NOT_FOUND")


def test_payload_too_large(client, library):
    # body over max_body_bytes (2 MB in the test app): refused before it is parsed
    big = {"library_name": library, "image_base64": "A" * 2_100_000}
    code, env = client.post("/search/by-image", big)
    assert (code, env["status"]) == (413, "PAYLOAD_TOO_LARGE")
    # small file, huge header: 3000 x 3000 = 9 Mpx > max_image_pixels (4 Mpx), never decoded
    import numpy as np

    bomb = encode(np.zeros((3000, 3000), np.uint8).astype(bool), "PNG", optimize=True)
    assert len(bomb) < 100_000
    code, env = client.post("/search/by-image", {"library_name": library, "image_base64": b64(bomb)})
    assert (code, env["status"]) == (413, "PAYLOAD_TOO_LARGE")
    assert "image_base64" in env["message"]


def test_unauthorized_without_key(base_url):
    r = requests.post(base_url + "/api/v1/operators/image-search/library/list", timeout=30)
    assert r.status_code == 401 and r.json()["status"] == "UNAUTHORIZED"
    r = requests.get(
        base_url + "/api/v1/operators/image-search/library/list",
        headers={"Authorization": "Bearer wrong"},
        timeout=30,
    )
    assert r.status_code == 401 and r.json() == {
        "status": "UNAUTHORIZED",
        "message": "a valid API key is required: send 'Authorization: Bearer <key>'",
        "data": None,
    }
    assert requests.get(base_url + "/health", timeout=30).status_code == 200  # health stays open


def test_health_says_random_weights(client):
    code, env = client.get("/health", prefix=False)
    assert code == 200
    data = env["data"]
    assert data["ready"] is True and data["pretrained"] is False
    assert data["model"] == "tiny-random" and data["device"] == "cpu" and data["dim"] == 64
    assert "RANDOM WEIGHTS" in data["warning"]
    assert isinstance(data["libraries"], int)
    assert client.get("/health")[0] == 200


def test_openapi_schema_is_served(base_url):
    schema = requests.get(base_url + "/openapi.json", timeout=30).json()
    assert "/api/v1/operators/image-search/search/by-image" in schema["paths"]
    assert "SearchByImage" in schema["components"]["schemas"]
    assert requests.get(base_url + "/docs", timeout=30).status_code == 200


def test_internal_errors_hide_details():
    from deployments.http import error_response

    resp = error_response(RuntimeError("secret stack detail"))
    assert resp.status_code == 500
    assert b"secret" not in resp.body and b"INTERNAL_ERROR" in resp.body
