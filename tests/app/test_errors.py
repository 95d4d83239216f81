"""Status strings of the contract: not found, payload too large, unauthorized, health, schema, 500.

The corpus of malformed requests (400s naming the field, wrong methods, unknown routes) is
``test_malformed.py``.
"""

from __future__ import annotations

import pytest
import requests

from tests.images import b64, encode, image_b64

pytestmark = pytest.mark.ray


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
    assert set(data["deployments"]) == {"Ingress", "Encoder", "LibraryIndex", "Writer", "Importer"}
    assert all(d["running"] >= 1 and d["target"] >= 1 for d in data["deployments"].values()), data
    assert {d["status"] for d in data["deployments"].values()} <= {"HEALTHY", "UPSCALING", "DOWNSCALING"}
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
