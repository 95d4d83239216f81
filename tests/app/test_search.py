"""Search routes over HTTP: the seed's examples verbatim, filters before ranking, scores, by-id."""

from __future__ import annotations

import pytest

from tests.images import image_b64

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shop(client):
    """The seed's shop_a_tops library, with tags from the seed's examples."""
    name = "shop_a_tops"
    client.ok("/library/create", {"library_name": name, "mode": "general_search"})
    colors = ["red", "blue", "white", "beige"]
    seasons = ["summer", "winter"]
    for i in range(24):
        client.ok(
            "/image/add",
            {
                "library_name": name,
                "image_id": f"img{i:03d}",
                "image_uri": f"https://example.com/tops/img{i:03d}.jpg",
                "image_base64": image_b64(i),
                "tags": {
                    "color": colors[i % 4],
                    "season": seasons[i % 2],
                    "category": ["T-shirt", "pants"][i % 3 == 0],
                    "price": 25 * (i % 10),
                },
            },
        )
    return name


def test_seed_search_by_image_example(client, shop):
    # the seed's request verbatim, with a real image instead of the elided base64
    body = {
        "library_name": "shop_a_tops",
        "image_base64": image_b64(4),
        "top_k": 5,
        "tag_filter": [
            {"field": "color", "op": "in", "value": ["red", "blue"]},
            {"field": "season", "op": "=", "value": "summer"},
        ],
    }
    res = client.ok("/search/by-image", body)["results"]
    assert 0 < len(res) <= 5
    for r in res:
        assert set(r) == {"image_id", "image_uri", "image_base64", "score", "tags"}
        assert r["tags"]["color"] in ("red", "blue") and r["tags"]["season"] == "summer"
        assert isinstance(r["image_base64"], str)  # return_frame defaults to true
        assert 0.0 <= r["score"] <= 1.0
    assert res[0]["image_id"] == "img004" and res[0]["score"] >= 0.99  # the exact duplicate
    assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)


def test_seed_search_by_text_example(client):
    name = "general_clothing"
    client.ok("/library/create", {"library_name": name, "mode": "general_search"})
    for i, (season, category) in enumerate([("summer", "T-shirt"), ("summer", "pants"), ("winter", "coat")]):
        client.ok(
            "/image/add",
            {
                "library_name": name,
                "image_id": f"img{i:03d}",
                "image_uri": f"https://example.com/{i}.jpg",
                "image_base64": image_b64(100 + i),
                "tags": {"season": season, "category": category},
            },
        )
    body = {
        "library_name": "general_clothing",
        "query_text": "a white short-sleeve T-shirt",
        "top_k": 10,
        "tag_filter": [
            {"field": "season", "op": "=", "value": "summer"},
            {"field": "category", "op": "!=", "value": "pants"},
        ],
    }
    res = client.ok("/search/by-text", body)["results"]
    assert [r["image_id"] for r in res] == ["img000"]
    assert 0.0 <= res[0]["score"] <= 1.0


def test_seed_filter_examples(client, shop):
    def ids(flt):
        body = {
            "library_name": shop,
            "image_base64": image_b64(0),
            "top_k": 100,
            "tag_filter": flt,
            "return_frame": False,
        }
        return {r["image_id"] for r in client.ok("/search/by-image", body)["results"]}

    tags = {f"img{i:03d}": i for i in range(24)}
    color = {k: ["red", "blue", "white", "beige"][i % 4] for k, i in tags.items()}
    season = {k: ["summer", "winter"][i % 2] for k, i in tags.items()}
    category = {k: ["T-shirt", "pants"][i % 3 == 0] for k, i in tags.items()}
    price = {k: 25 * (i % 10) for k, i in tags.items()}
    assert ids(
        [{"field": "color", "op": "=", "value": "red"}, {"field": "season", "op": "=", "value": "summer"}]
    ) == {k for k in tags if color[k] == "red" and season[k] == "summer"}
    assert ids(
        {
            "or": [
                {"field": "color", "op": "=", "value": "red"},
                {"field": "season", "op": "=", "value": "summer"},
            ]
        }
    ) == {k for k in tags if color[k] == "red" or season[k] == "summer"}
    assert ids(
        [
            {"field": "category", "op": "!=", "value": "pants"},
            {
                "or": [
                    {"field": "color", "op": "=", "value": "red"},
                    {"field": "season", "op": "=", "value": "summer"},
                ]
            },
        ]
    ) == {k for k in tags if category[k] != "pants" and (color[k] == "red" or season[k] == "summer")}
    assert ids(
        [
            {"field": "category", "op": "=", "value": "T-shirt"},
            {"field": "color", "op": "in", "value": ["white", "beige"]},
            {"field": "price", "op": ">=", "value": 50},
            {"field": "price", "op": "<=", "value": 200},
        ]
    ) == {
        k
        for k in tags
        if category[k] == "T-shirt" and color[k] in ("white", "beige") and 50 <= price[k] <= 200
    }
    assert ids({"field": "price", "op": "=", "value": "50"}) == set()  # no coercion of "50" to 50
    assert ids({"field": "missing", "op": "!=", "value": 1}) == set(tags)
    assert ids({"or": []}) == set()
    assert ids([]) == set(tags)


def test_filter_is_applied_before_ranking(client, shop):
    everything = client.ok(
        "/search/by-image",
        {"library_name": shop, "image_base64": image_b64(1), "top_k": 1000, "return_frame": False},
    )["results"]
    assert len(everything) == 24
    rare = [r["image_id"] for r in everything if r["tags"]["price"] == 225]  # 2 of 24 rows pass
    assert len(rare) == 2
    res = client.ok(
        "/search/by-image",
        {
            "library_name": shop,
            "image_base64": image_b64(1),
            "top_k": 5,
            "return_frame": False,
            "tag_filter": [{"field": "price", "op": "=", "value": 225}],
        },
    )["results"]
    assert [r["image_id"] for r in res] == rare  # fewer than top_k only because fewer pass


def test_min_score_and_top_k(client, shop):
    res = client.ok(
        "/search/by-image",
        {"library_name": shop, "image_base64": image_b64(3), "top_k": 3, "return_frame": False},
    )["results"]
    assert len(res) == 3
    res = client.ok(
        "/search/by-image",
        {"library_name": shop, "image_base64": image_b64(3), "min_score": 0.999, "return_frame": False},
    )["results"]
    assert [r["image_id"] for r in res] == ["img003"]


def test_recall_target_is_accepted_by_every_search(client, shop):
    """Our extension: a per-request recall target reaches the planner (a small library is exact
    whatever the target, so the answers agree)."""
    body = {"library_name": shop, "top_k": 3, "return_frame": False}
    default = client.ok("/search/by-id", {**body, "image_id": "img007"})["results"]
    for target in (0.5, 0.99, 1.0):
        res = client.ok("/search/by-id", {**body, "image_id": "img007", "recall_target": target})["results"]
        assert res == default
        client.ok("/search/by-image", {**body, "image_base64": image_b64(3), "recall_target": target})


def test_search_by_id(client, shop):
    res = client.ok(
        "/search/by-id", {"library_name": shop, "image_id": "img007", "top_k": 2, "return_frame": False}
    )["results"]
    assert res[0]["image_id"] == "img007" and res[0]["score"] >= 0.99
    code, env = client.post("/search/by-id", {"library_name": shop, "image_id": "nope"})
    assert (code, env["status"]) == (404, "IMAGE_NOT_FOUND")


def test_data_uri_prefix_and_jpeg_queries(client, shop):
    res = client.ok(
        "/search/by-image",
        {"library_name": shop, "image_base64": "data:image/png;base64," + image_b64(9), "top_k": 1},
    )
    assert res["results"][0]["image_id"] == "img009"
    res = client.ok(
        "/search/by-image", {"library_name": shop, "image_base64": image_b64(9, "JPEG"), "top_k": 1}
    )
    assert res["results"][0]["image_id"] == "img009"  # a JPEG re-encode still finds the original


def test_empty_library_returns_empty_list(client, library):
    assert client.ok("/search/by-text", {"library_name": library, "query_text": "anything"}) == {
        "results": []
    }


@pytest.mark.parametrize("mode", ["item_search", "adaptive_search"])
def test_by_text_on_other_modes_is_mode_not_supported(client, mode):
    name = f"text_{mode}"
    client.ok("/library/create", {"library_name": name, "mode": mode})
    code, env = client.post("/search/by-text", {"library_name": name, "query_text": "a red dress"})
    assert (code, env["status"], env["data"]) == (400, "MODE_NOT_SUPPORTED", None)
    assert name in env["message"] and mode in env["message"]
    data = client.ok("/search/by-image", {"library_name": name, "image_base64": image_b64(1)})
    assert data["results"] == []
