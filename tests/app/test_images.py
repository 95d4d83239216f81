"""Image routes over HTTP: add (upsert), get, update_tags, delete, fetch by URI, frames."""

from __future__ import annotations

import base64

import pytest

from tests.images import encode, image_b64, pattern

pytestmark = pytest.mark.ray


def add(client, library, image_id, seed, uri=None, **extra):
    body = {
        "library_name": library,
        "image_id": image_id,
        "image_uri": uri or f"https://example.com/{image_id}.jpg",
    }
    body["image_base64"] = image_b64(seed)
    body.update(extra)
    return client.ok("/image/add", body)


def test_add_is_an_upsert_on_id_and_uri(client, library):
    assert add(client, library, "img001", 1, tags={"color": "white"})["created"] is True
    assert add(client, library, "img001", 2, tags={"color": "blue"})["created"] is False
    assert add(client, library, "img001", 3, uri="https://example.com/img001-back.jpg")["created"] is True
    images = client.ok("/image/get", {"library_name": library, "image_id": "img001"})["images"]
    assert [(i["image_uri"], i["tags"]) for i in images] == [
        ("https://example.com/img001.jpg", {"color": "blue"}),
        ("https://example.com/img001-back.jpg", {}),
    ]
    assert client.get(f"/library/{library}")[1]["data"]["image_count"] == 2
    # the overwrite replaced the vector: the new image is the exact duplicate now
    res = client.ok("/search/by-image", {"library_name": library, "image_base64": image_b64(2), "top_k": 1})
    assert res["results"][0]["image_uri"] == "https://example.com/img001.jpg"
    assert res["results"][0]["score"] >= 0.99


def test_frames_saved_or_not(client, library):
    png = encode(pattern(5))
    client.ok(
        "/image/add",
        {
            "library_name": library,
            "image_id": "a",
            "image_uri": "u",
            "image_base64": base64.b64encode(png).decode(),
        },
    )
    add(client, library, "b", 6, save_image=False)
    got = client.ok("/image/get", {"library_name": library, "image_id": "a", "return_frame": True})["images"][
        0
    ]
    assert base64.b64decode(got["image_base64"]) == png  # the original bytes, not a re-encode
    got = client.ok("/image/get", {"library_name": library, "image_id": "b", "return_frame": True})["images"][
        0
    ]
    assert got["image_base64"] is None
    res = client.ok("/search/by-image", {"library_name": library, "image_base64": image_b64(5)})["results"]
    by_id = {r["image_id"]: r for r in res}
    assert base64.b64decode(by_id["a"]["image_base64"]) == png
    assert by_id["b"]["image_base64"] is None
    res = client.ok(
        "/search/by-image", {"library_name": library, "image_base64": image_b64(5), "return_frame": False}
    )
    assert all(r["image_base64"] is None for r in res["results"])


def test_update_tags_replaces_whole_object(client, library):
    add(client, library, "a", 1, tags={"color": "red", "size": 3})
    assert client.ok(
        "/image/update_tags", {"library_name": library, "image_id": "a", "tags": {"season": "summer"}}
    ) == {"updated": 1}
    [img] = client.ok("/image/get", {"library_name": library, "image_id": "a"})["images"]
    assert img["tags"] == {"season": "summer"}
    flt = [{"field": "color", "op": "=", "value": "red"}]
    assert (
        client.ok(
            "/search/by-image", {"library_name": library, "image_base64": image_b64(1), "tag_filter": flt}
        )["results"]
        == []
    )
    code, env = client.post("/image/update_tags", {"library_name": library, "image_id": "zzz", "tags": {}})
    assert (code, env["status"]) == (404, "IMAGE_NOT_FOUND")


def test_delete_then_search(client, library):
    add(client, library, "a", 1, uri="u1")
    add(client, library, "a", 2, uri="u2")
    add(client, library, "b", 3)
    assert client.ok("/image/delete", {"library_name": library, "image_id": "a", "image_uri": "u1"}) == {
        "deleted": 1
    }
    res = client.ok("/search/by-image", {"library_name": library, "image_base64": image_b64(1)})["results"]
    assert "u1" not in [r["image_uri"] for r in res]
    assert client.ok("/image/delete", {"library_name": library, "image_id": "a"}) == {"deleted": 1}
    assert client.ok("/image/delete", {"library_name": library, "image_id": "a"}) == {"deleted": 0}
    res = client.ok("/search/by-image", {"library_name": library, "image_base64": image_b64(2)})["results"]
    assert [r["image_id"] for r in res] == ["b"]


def test_add_fetches_image_uri_when_no_base64(client, library, image_server):
    base, jpeg = image_server
    assert client.ok(
        "/image/add", {"library_name": library, "image_id": "p", "image_uri": f"{base}/photo.jpg"}
    )["created"]
    res = client.ok(
        "/search/by-image", {"library_name": library, "image_base64": base64.b64encode(jpeg).decode()}
    )
    assert res["results"][0]["image_id"] == "p" and res["results"][0]["score"] >= 0.99
    assert base64.b64decode(res["results"][0]["image_base64"]) == jpeg
    code, env = client.post(
        "/image/add", {"library_name": library, "image_id": "q", "image_uri": f"{base}/missing.jpg"}
    )
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert "image_uri" in env["message"] and "404" in env["message"]


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "ftp://example.com/x.jpg", "not a uri"])
def test_unfetchable_uris_are_400(client, library, uri):
    code, env = client.post("/image/add", {"library_name": library, "image_id": "x", "image_uri": uri})
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert "image_uri" in env["message"]


@pytest.mark.parametrize(
    "tags, path",
    [
        ({"a": {"nested": 1}}, "tags.a"),
        ({"a": None}, "tags.a"),
        ({"": 1}, "tags"),
        ({"a": [1, [2]]}, "tags.a[1]"),
        ([1, 2], "tags"),
        ("red", "tags"),
    ],
)
def test_bad_tags_are_400_naming_the_path(client, library, tags, path):
    code, env = client.post(
        "/image/add",
        {
            "library_name": library,
            "image_id": "x",
            "image_uri": "u",
            "image_base64": image_b64(1),
            "tags": tags,
        },
    )
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert env["message"].startswith(path), env["message"]


def test_nan_tag_is_rejected(client, library):
    # json.dumps cannot write NaN into a body on purpose; Python's json.loads on the server accepts it
    raw = (
        f'{{"library_name": "{library}", "image_id": "x", "image_uri": "u", '
        f'"image_base64": "{image_b64(1)}", "tags": {{"p": NaN}}}}'
    )
    r = client.raw("POST", "/image/add", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["status"] == "INVALID_PARAMETER"
    assert "tags.p" in r.json()["message"]
