"""Sharded libraries over HTTP: a 3-shard library answers every search as a 1-shard library holding the
same images; get, update and delete reach the id's shard; a shard that cannot answer is a 503."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.images import image_b64

pytestmark = pytest.mark.ray

EVEN = {"field": "even", "op": "=", "value": True}


def _searches(client, name: str) -> list[dict]:
    """The same three searches (by image, by text, by id), filtered, of library ``name``."""
    common = {"library_name": name, "top_k": 4, "tag_filter": EVEN}
    return [
        client.ok("/search/by-image", {**common, "image_base64": image_b64(3)})["results"],
        client.ok("/search/by-text", {**common, "query_text": "a striped pattern"})["results"],
        client.ok("/search/by-id", {**common, "image_id": "img4"})["results"],
    ]


def test_a_sharded_library_answers_as_an_unsharded_one(client, storage_root):
    for name, shards in (("sharded3", 3), ("unsharded1", 1)):
        data = client.ok(
            "/library/create", {"library_name": name, "mode": "general_search", "shards": shards}
        )
        assert data["shards"] == shards
        for i in range(12):
            client.ok(
                "/image/add",
                {
                    "library_name": name,
                    "image_id": f"img{i}",
                    "image_uri": f"u{i}",
                    "image_base64": image_b64(i),
                    "tags": {"n": i, "even": i % 2 == 0},
                },
            )
    code, env = client.get("/library/sharded3")
    assert env["data"]["shards"] == 3 and env["data"]["image_count"] == 12
    assert sum(s["image_count"] for s in env["data"]["index"]["shards"]) == 12

    expected = _searches(client, "unsharded1")
    assert [len(r) for r in expected] == [4, 4, 4] and all(x["tags"]["even"] for r in expected for x in r)
    assert _searches(client, "sharded3") == expected

    # get, update_tags and delete go to the id's shard
    (image,) = client.ok("/image/get", {"library_name": "sharded3", "image_id": "img2"})["images"]
    assert image["tags"] == {"n": 2, "even": True}
    for name in ("sharded3", "unsharded1"):
        assert client.ok(
            "/image/update_tags", {"library_name": name, "image_id": "img2", "tags": {"n": 2}}
        ) == {"updated": 1}
        assert client.ok("/image/delete", {"library_name": name, "image_id": "img4"}) == {"deleted": 1}
    code, env = client.post("/search/by-id", {"library_name": "sharded3", "image_id": "img4"})
    assert (code, env["status"]) == (404, "IMAGE_NOT_FOUND")
    expected = [
        client.ok(
            "/search/by-image", {"library_name": "unsharded1", "image_base64": image_b64(3), "top_k": 12}
        ),
        client.ok("/search/by-id", {"library_name": "unsharded1", "image_id": "img6", "tag_filter": EVEN}),
    ]
    got = [
        client.ok(
            "/search/by-image", {"library_name": "sharded3", "image_base64": image_b64(3), "top_k": 12}
        ),
        client.ok("/search/by-id", {"library_name": "sharded3", "image_id": "img6", "tag_filter": EVEN}),
    ]
    assert got == expected
    assert {r["image_id"] for r in got[0]["results"]} == {f"img{i}" for i in range(12)} - {"img4"}
    assert "img2" not in {r["image_id"] for r in got[1]["results"]}  # its tags no longer say even
    for name in ("sharded3", "unsharded1"):
        client.ok("/library/delete", {"library_name": name})
    code, env = client.get("/library/sharded3")
    assert code == 404
    assert not (Path(storage_root) / "libraries" / "sharded3").exists()


def test_a_shard_that_cannot_answer_fails_the_search_with_503(client, storage_root):
    client.ok("/library/create", {"library_name": "broken2", "mode": "general_search", "shards": 2})
    client.ok(
        "/image/add",
        {"library_name": "broken2", "image_id": "a", "image_uri": "u", "image_base64": image_b64(1)},
    )
    # Shard 1's store disappears before any replica loaded it: that shard cannot answer.
    (Path(storage_root) / "libraries" / "broken2" / "shards" / "1" / "records.sqlite").unlink()
    code, env = client.post("/search/by-image", {"library_name": "broken2", "image_base64": image_b64(1)})
    assert (code, env["status"], env["data"]) == (503, "UNAVAILABLE", None)
    assert "shard 1 of 2 cannot answer" in env["message"]
    client.ok("/library/delete", {"library_name": "broken2"})


@pytest.mark.parametrize("shards", [0, 65, 17, "2", 1.5, None])
def test_create_rejects_a_bad_shard_count(client, shards):
    code, env = client.post(
        "/library/create", {"library_name": "badshards", "mode": "general_search", "shards": shards}
    )
    assert (code, env["status"]) == (400, "INVALID_PARAMETER")
    assert "shards" in env["message"]
