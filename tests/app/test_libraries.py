"""Library routes over HTTP: create, list, get, delete."""

from __future__ import annotations

import pytest

from tests.images import image_b64

pytestmark = pytest.mark.ray


def test_create_get_list_delete(client):
    data = client.ok(
        "/library/create", {"library_name": "crud_lib", "mode": "general_search", "description": "tops"}
    )
    assert data["library_name"] == "crud_lib"
    assert data["mode"] == "general_search"
    assert data["description"] == "tops"
    assert data["image_count"] == 0
    assert data["model"] == {"name": "tiny-random", "pretrained": "random", "dim": 64}
    assert data["index"]["kind"] == "flat"

    code, env = client.get("/library/crud_lib")
    assert code == 200 and env["data"]["library_name"] == "crud_lib"
    code, env = client.get("/library/list")
    assert "crud_lib" in [lib["library_name"] for lib in env["data"]["libraries"]]

    code, env = client.post("/library/create", {"library_name": "crud_lib", "mode": "general_search"})
    assert (code, env["status"]) == (409, "LIBRARY_ALREADY_EXISTS")

    assert client.ok("/library/delete", {"library_name": "crud_lib"}) == {"library_name": "crud_lib"}
    code, env = client.get("/library/crud_lib")
    assert (code, env["status"]) == (404, "LIBRARY_NOT_FOUND")
    code, env = client.post("/library/delete", {"library_name": "crud_lib"})
    assert (code, env["status"]) == (404, "LIBRARY_NOT_FOUND")


def test_delete_removes_everything_and_recreate_starts_empty(client):
    name = "recreated_lib"
    client.ok("/library/create", {"library_name": name, "mode": "general_search"})
    client.ok(
        "/image/add", {"library_name": name, "image_id": "a", "image_uri": "u", "image_base64": image_b64(1)}
    )
    client.ok("/search/by-image", {"library_name": name, "image_base64": image_b64(1)})  # a replica caches it
    client.ok("/library/delete", {"library_name": name})
    client.ok("/library/create", {"library_name": name, "mode": "general_search"})
    code, env = client.get(f"/library/{name}")
    assert env["data"]["image_count"] == 0
    assert client.ok("/search/by-image", {"library_name": name, "image_base64": image_b64(1)}) == {
        "results": []
    }
    code, env = client.post("/image/get", {"library_name": name, "image_id": "a"})
    assert (code, env["status"]) == (404, "IMAGE_NOT_FOUND")


def test_index_kind_can_be_configured_per_library(client):
    data = client.ok(
        "/library/create", {"library_name": "kinds", "mode": "general_search", "index_kind": "hnsw"}
    )
    # No snapshot yet: replicas search every row exactly until the writer's first snapshot builds HNSW.
    assert data["index"] == {"kind": "flat", "configured": "hnsw"}
    code, env = client.get("/library/kinds")
    assert (code, env["data"]["index"]["configured"]) == (200, "hnsw")
    client.ok("/library/delete", {"library_name": "kinds"})


@pytest.mark.parametrize(
    "mode, embedding",
    [("item_search", "item_crop"), ("adaptive_search", "face_crop_or_whole_image")],
)
def test_other_modes_are_created_and_say_what_they_embed(client, mode, embedding):
    name = f"m_{mode}"
    data = client.ok("/library/create", {"library_name": name, "mode": mode})
    assert data["mode"] == mode
    assert data["embedding"] == embedding
    code, env = client.get(f"/library/{name}")
    assert code == 200 and env["data"]["embedding"] == embedding


@pytest.mark.parametrize(
    "body, field",
    [
        ({"library_name": "../x", "mode": "general_search"}, "library_name"),
        ({"library_name": "", "mode": "general_search"}, "library_name"),
        ({"library_name": "x" * 65, "mode": "general_search"}, "library_name"),
        ({"library_name": "_x", "mode": "general_search"}, "library_name"),
        ({"library_name": "a b", "mode": "general_search"}, "library_name"),
        ({"library_name": 5, "mode": "general_search"}, "library_name"),
        ({"library_name": "ok", "mode": "fuzzy_search"}, "mode"),
        ({"library_name": "ok"}, "mode"),
        ({"library_name": "ok", "mode": "general_search", "colour": 1}, "colour"),
        ({"library_name": "ok", "mode": "general_search", "description": "x" * 2000}, "description"),
        ({"library_name": "list", "mode": "general_search"}, "library_name"),
        ({"library_name": "ok", "mode": "general_search", "index_kind": "annoy"}, "index_kind"),
        ({"library_name": "ok", "mode": "general_search", "index_kind": None}, "index_kind"),
    ],
)
def test_create_rejects_bad_input(client, body, field):
    code, env = client.post("/library/create", body)
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert field in env["message"]
    assert env["data"] is None


def test_get_with_bad_name_is_400(client):
    code, env = client.get("/library/bad.name")
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert "library_name" in env["message"]
