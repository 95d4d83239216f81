"""A corpus of malformed requests across every route: each is answered 4xx with the envelope and a message
naming the problem, and the service answers normally afterwards.

Table-driven: one row per request (method, path, body or raw bytes, expected HTTP code, status string, and a
piece of text the message must contain: the offending field, or the thing that was wrong).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest

from tests.app.conftest import Client
from tests.images import b64, encode, image_b64, pattern

pytestmark = pytest.mark.ray

LIB = "malformed_general"  # a general_search library holding the image "known" (module fixture)
ITEM = "malformed_item"  # an item_search library
MISSING = "no_such_library"
IMG = image_b64(7)
JSON = {"Content-Type": "application/json"}

POST_ROUTES = (
    "/library/create",
    "/library/delete",
    "/image/add",
    "/image/get",
    "/image/update_tags",
    "/image/delete",
    "/search/by-image",
    "/search/by-text",
    "/search/by-id",
)

#: A request that is valid for each POST route (so that a single change makes it malformed).
VALID: dict[str, dict[str, Any]] = {
    "/library/create": {"library_name": "malformed_new", "mode": "general_search"},
    "/library/delete": {"library_name": MISSING},
    "/image/add": {"library_name": LIB, "image_id": "a", "image_uri": "u", "image_base64": IMG},
    "/image/get": {"library_name": LIB, "image_id": "known"},
    "/image/update_tags": {"library_name": LIB, "image_id": "known", "tags": {}},
    "/image/delete": {"library_name": LIB, "image_id": "nothing"},
    "/search/by-image": {"library_name": LIB, "image_base64": IMG},
    "/search/by-text": {"library_name": LIB, "query_text": "x"},
    "/search/by-id": {"library_name": LIB, "image_id": "known"},
    # only sent with a change that makes it malformed (a valid one would start an import)
    "/image/tasks/create": {"library_name": LIB, "source": "https://images.example.com/x.jsonl"},
    "/image/tasks/cancel": {"task_id": "0" * 32},
}


class Case(NamedTuple):
    method: str
    path: str
    body: Any  # JSON-encoded unless raw is set
    raw: bytes | None
    headers: dict[str, str] | None
    http: int
    status: str
    names: str  # the message must contain this


def bad(path: str, http: int = 400, status: str = "INVALID_PARAMETER", *, names: str, **changes: Any) -> Case:
    """A valid request for ``path`` with ``changes`` applied (a value of DROP removes the field)."""
    body = {k: v for k, v in {**VALID[path], **changes}.items() if v is not DROP}
    return Case("POST", path, body, None, None, http, status, names)


def raw(
    method: str, path: str, data: bytes | None, http: int, status: str, names: str, **headers: str
) -> Case:
    return Case(method, path, None, data, headers or dict(JSON), http, status, names)


DROP = object()
#: URIs ``urlsplit`` raises a bare ValueError for (issue 26: they were answered 500).
MALFORMED_URIS = (
    "http://[127.0.0.1]/x.jpg",
    "http://[::1/x.jpg",
    "https://example.com:99999/x",
    "http://a\uff03b/x",
)


def nested_filter(depth: int) -> Any:
    node: Any = {"field": "a", "op": "=", "value": 1}
    for _ in range(depth):
        node = [node]
    return node


PNG = encode(pattern(3, (32, 32)), "PNG")
ICO = encode(pattern(3, (32, 32)), "ICO")  # Pillow reads it; the service does not accept it
BOMB = encode(np.zeros((3000, 3000), np.uint8).astype(bool), "PNG", optimize=True)  # 9 Mpx, tiny file


def generic_cases() -> Iterator[Case]:
    """The same six mistakes on every POST route."""
    for path in POST_ROUTES:
        yield raw("POST", path, b"", 400, "INVALID_PARAMETER", "request body is missing")
        yield raw("POST", path, b"{not json", 400, "INVALID_PARAMETER", "not valid JSON")
        yield raw("POST", path, b"[1, 2]", 400, "INVALID_PARAMETER", "request body")
        yield bad(path, names="library_nam: unknown field", library_nam="x")
        yield bad(path, names="library_name", library_name=5)
        yield bad(path, names="library_name", library_name="../etc/passwd")


SPECIFIC: list[Case] = [
    # -- libraries
    bad("/library/create", names="mode", mode=DROP),
    bad("/library/create", names="mode", mode="fast_search"),
    bad("/library/create", names="mode", mode=None),
    bad("/library/create", names="description", description="d" * 1025),
    bad("/library/create", names="description", description=5),
    bad("/library/create", names="library_name", library_name="list"),  # reserved
    bad("/library/create", names="library_name", library_name=""),
    bad("/library/create", names="library_name", library_name="a" * 65),
    bad("/library/create", names="library_name", library_name="-starts-with-dash"),
    bad("/library/create", names="library_name", library_name="bibliothèque"),
    bad("/library/create", names="library_name", library_name=DROP),
    bad("/library/create", 409, "LIBRARY_ALREADY_EXISTS", names=LIB, library_name=LIB),
    raw("GET", f"/library/{MISSING}", None, 404, "LIBRARY_NOT_FOUND", MISSING),
    raw("GET", "/library/bad%20name", None, 400, "INVALID_PARAMETER", "library_name"),
    raw("GET", "/library/-dash", None, 400, "INVALID_PARAMETER", "library_name"),
    raw("GET", "/library/" + "a" * 65, None, 400, "INVALID_PARAMETER", "library_name"),
    raw("GET", "/library/%2e%2e", None, 400, "INVALID_PARAMETER", "library_name"),
    raw("POST", "/library/list", b"{}", 405, "METHOD_NOT_ALLOWED", "Method Not Allowed"),
    bad("/library/delete", names="library_name", library_name=DROP),
    bad("/library/delete", 404, "LIBRARY_NOT_FOUND", names=MISSING),
    # -- image/add
    bad("/image/add", names="image_id", image_id=""),
    bad("/image/add", names="image_id", image_id="x" * 257),
    bad("/image/add", names="image_id", image_id=5),
    bad("/image/add", names="image_id", image_id=DROP),
    bad("/image/add", names="image_uri", image_uri=""),
    bad("/image/add", names="image_uri", image_uri="u" * 2049),
    bad("/image/add", names="image_uri", image_uri=DROP),
    bad("/image/add", names="image_base64", image_base64=""),
    bad("/image/add", names="image_base64", image_base64=5),
    bad("/image/add", names="image_base64", image_base64="@@@@"),
    bad("/image/add", names="URL-safe base64", image_base64=IMG.replace("+", "-").replace("/", "_") + "-_"),
    bad("/image/add", names="image_base64", image_base64="data:text/plain;base64,AAAA"),
    bad("/image/add", names="image_base64", image_base64=b64(b"not an image at all")),
    bad("/image/add", names="image_base64", image_base64=b64(PNG[: len(PNG) // 2])),  # truncated
    bad("/image/add", names="the data is not JPEG, PNG", image_base64=b64(ICO)),
    bad("/image/add", 413, "PAYLOAD_TOO_LARGE", names="image_base64", image_base64=b64(BOMB)),
    bad("/image/add", names="save_image", save_image="true"),
    bad("/image/add", names="save_image", save_image=1),
    bad("/image/add", names="tag: unknown field", tag={}),
    bad("/image/add", names="tags", tags={f"k{i}": i for i in range(65)}),
    bad("/image/add", names="tags", tags={"k" * 129: 1}),
    bad("/image/add", names="tags.s", tags={"s": "v" * 1025}),
    bad("/image/add", names="tags.l", tags={"l": list(range(257))}),
    bad("/image/add", names="tags.n", tags={"n": {"nested": 1}}),
    bad("/image/add", names="tags.z", tags={"z": None}),
    bad("/image/add", names="tags", tags="red"),
    bad("/image/add", names="image_uri", image_base64=DROP, image_uri="ftp://example.com/a.jpg"),
    bad("/image/add", names="image_uri", image_base64=DROP, image_uri="file:///etc/passwd"),
    # SSRF: the shared test app allows 127.0.0.0/8 only; everything else non-public is refused
    bad("/image/add", names="not a public address", image_base64=DROP, image_uri="http://169.254.169.254/x"),
    bad("/image/add", names="not a public address", image_base64=DROP, image_uri="http://10.0.0.1/a.jpg"),
    bad("/image/add", names="not a public address", image_base64=DROP, image_uri="http://[::1]:9/a.jpg"),
    bad("/image/add", names="not a public address", image_base64=DROP, image_uri="http://0.0.0.0:9/a.jpg"),
    # issue 26: URIs urlsplit cannot parse answered 500; unresolvable names had a message of their own
    *(
        bad("/image/add", names="image_uri: malformed URI", image_base64=DROP, image_uri=uri)
        for uri in MALFORMED_URIS
    ),
    bad("/image/add", names="not a public address", image_base64=DROP, image_uri="http://[fec0::1]/a.jpg"),
    bad("/image/add", names="not a public address", image_base64=DROP, image_uri="http://nowhere.invalid/a"),
    # issue 26: no client-named object-store URI unless object_store_allowed lists it (it is empty here)
    bad(
        "/image/add",
        names="image_uri: cannot fetch a URI with scheme 's3'",
        image_base64=DROP,
        image_uri="s3://b/x",
    ),
    bad(
        "/image/add", names="image_uri: chained fsspec", image_base64=DROP, image_uri="simplecache::s3://b/x"
    ),
    bad("/image/add", 404, "LIBRARY_NOT_FOUND", names=MISSING, library_name=MISSING),
    # -- image/tasks/create: the source is checked before the library is looked up
    *(bad("/image/tasks/create", names="source: malformed URI", source=uri) for uri in MALFORMED_URIS),
    bad("/image/tasks/create", names="source: source scheme 's3' is not accepted", source="s3://b/x.jsonl"),
    bad("/image/tasks/create", names="source: source scheme 'gs' is not accepted", source="gs://b/x.jsonl"),
    bad("/image/tasks/create", names="source: chained fsspec", source="zip://x.jsonl::s3://b/a.zip"),
    bad("/image/tasks/create", names="source: refused: the host is not", source="http://10.0.0.1/x.jsonl"),
    bad("/image/tasks/create", names="source", source=""),
    # -- image/get, update_tags, delete
    bad("/image/get", names="image_id", image_id=DROP),
    bad("/image/get", names="image_uri", image_uri=""),
    bad("/image/get", names="return_frame", return_frame="no"),
    bad("/image/get", 404, "IMAGE_NOT_FOUND", names="'ghost'", image_id="ghost"),
    bad("/image/get", 404, "LIBRARY_NOT_FOUND", names=MISSING, library_name=MISSING),
    bad("/image/update_tags", names="tags", tags=DROP),
    bad("/image/update_tags", names="tags", tags=None),
    bad("/image/update_tags", names="tags.a[1]", tags={"a": [1, [2]]}),
    bad("/image/update_tags", names="tags", tags=[1, 2]),
    bad("/image/update_tags", 404, "IMAGE_NOT_FOUND", names="'ghost'", image_id="ghost"),
    bad("/image/delete", names="image_id", image_id=DROP),
    bad("/image/delete", names="image_id", image_id=""),
    bad("/image/delete", names="image_uri", image_uri=5),
    bad("/image/delete", 404, "LIBRARY_NOT_FOUND", names=MISSING, library_name=MISSING),
    # -- search/by-image
    bad("/search/by-image", names="library_name", library_name=DROP),
    bad("/search/by-image", names="image_base64", image_base64=DROP),
    bad("/search/by-image", names="image_base64", image_base64=""),
    bad("/search/by-image", names="image_base64", image_base64="@@@@"),
    bad("/search/by-image", names="image_base64", image_base64=b64(b"not an image at all")),
    bad("/search/by-image", names="top_k", top_k=0),
    bad("/search/by-image", names="top_k", top_k=1001),
    bad("/search/by-image", names="top_k", top_k="5"),
    bad("/search/by-image", names="top_k", top_k=2.5),
    bad("/search/by-image", names="top_k", top_k=True),
    bad("/search/by-image", names="return_frame", return_frame="yes"),
    bad("/search/by-image", names="tag_filters: unknown field", tag_filters=[]),
    bad("/search/by-image", names="min_score", min_score=2),
    bad("/search/by-image", names="min_score", min_score=-0.1),
    bad("/search/by-image", names="min_score", min_score="0.5"),
    bad("/search/by-image", names="recall_target", recall_target=0.3),
    bad("/search/by-image", names="recall_target", recall_target=1.01),
    bad("/search/by-image", names="recall_target", recall_target="0.9"),
    bad("/search/by-image", 413, "PAYLOAD_TOO_LARGE", names="image_base64", image_base64=b64(BOMB)),
    bad("/search/by-image", 404, "LIBRARY_NOT_FOUND", names=MISSING, library_name=MISSING),
    # -- search/by-text
    bad("/search/by-text", names="query_text", query_text=""),
    bad("/search/by-text", names="query_text", query_text="   "),
    bad("/search/by-text", names="query_text", query_text="x" * 1001),
    bad("/search/by-text", names="query_text", query_text=5),
    bad("/search/by-text", names="query_text", query_text=DROP),
    bad("/search/by-text", names="image_base64: unknown field", image_base64=IMG),
    bad("/search/by-text", names="tag_filter.op", tag_filter={"field": "a", "op": "like", "value": 1}),
    bad("/search/by-text", names="tag_filter[0]", tag_filter=[{"field": "a", "op": "="}]),
    bad(
        "/search/by-text", names="tag_filter[0].value", tag_filter=[{"field": "a", "op": "in", "value": "x"}]
    ),
    bad("/search/by-text", names="tag_filter[0].value", tag_filter=[{"field": "a", "op": "=", "value": [1]}]),
    bad(
        "/search/by-text", names="tag_filter[0].value", tag_filter=[{"field": "a", "op": ">", "value": True}]
    ),
    bad("/search/by-text", names="tag_filter[0]", tag_filter=[{"and": []}]),
    bad("/search/by-text", names="tag_filter.or", tag_filter={"or": {}}),
    bad("/search/by-text", names="tag_filter", tag_filter="color=red"),
    bad("/search/by-text", names="tag_filter[0].field", tag_filter=[{"field": "", "op": "=", "value": 1}]),
    bad("/search/by-text", names="tag_filter[0]", tag_filter=[{"field": "a", "op": "=", "value": 1, "x": 2}]),
    bad("/search/by-text", names="nested too deeply", tag_filter=nested_filter(40)),
    bad(
        "/search/by-text",
        names="tag_filter",
        tag_filter=[{"field": "a", "op": "=", "value": i} for i in range(1001)],
    ),
    bad(
        "/search/by-text",
        names="tag_filter[0].value",
        tag_filter=[{"field": "a", "op": "in", "value": list(range(1001))}],
    ),
    bad(
        "/search/by-text",
        names="tag_filter[0].value",
        tag_filter=[{"field": "a", "op": "=", "value": "v" * 1025}],
    ),
    bad("/search/by-text", 400, "MODE_NOT_SUPPORTED", names="text-to-image", library_name=ITEM),
    bad("/search/by-text", 404, "LIBRARY_NOT_FOUND", names=MISSING, library_name=MISSING),
    # -- search/by-id
    bad("/search/by-id", names="image_id", image_id=DROP),
    bad("/search/by-id", names="image_id", image_id=""),
    bad("/search/by-id", names="top_k", top_k=0),
    bad("/search/by-id", names="min_score", min_score=1.5),
    bad("/search/by-id", names="tag_filter[0].op", tag_filter=[{"field": "a", "op": "~", "value": 1}]),
    bad("/search/by-id", 404, "IMAGE_NOT_FOUND", names="'ghost'", image_id="ghost"),
    # image_uri is a key here, never fetched: one urlsplit cannot parse is just not found (no 500)
    bad("/search/by-id", 404, "IMAGE_NOT_FOUND", names="'known'", image_uri=MALFORMED_URIS[0]),
    bad("/search/by-id", 404, "LIBRARY_NOT_FOUND", names=MISSING, library_name=MISSING),
    # -- image/tasks/cancel (no library_name: not in POST_ROUTES' generic cases)
    bad("/image/tasks/cancel", names="task_id", task_id=DROP),
    bad("/image/tasks/cancel", names="task_id", task_id=5),
    bad("/image/tasks/cancel", names="task_id", task_id="a" * 257),
    bad("/image/tasks/cancel", names="library_name: unknown field", library_name=LIB),
    bad("/image/tasks/cancel", 404, "TASK_NOT_FOUND", names="does not exist"),
    bad("/image/tasks/cancel", 404, "TASK_NOT_FOUND", names="does not exist", task_id="../x"),
    raw("GET", "/image/tasks/cancel", None, 405, "METHOD_NOT_ALLOWED", "Method Not Allowed"),
    # -- methods, routes, content types and sizes
    raw("GET", "/image/add", None, 405, "METHOD_NOT_ALLOWED", "Method Not Allowed"),
    raw("DELETE", "/library/create", None, 405, "METHOD_NOT_ALLOWED", "Method Not Allowed"),
    raw("PUT", "/search/by-text", b"{}", 405, "METHOD_NOT_ALLOWED", "Method Not Allowed"),
    raw("POST", "/health", b"{}", 405, "METHOD_NOT_ALLOWED", "Method Not Allowed"),
    raw("GET", "/no/such/route", None, 404, "NOT_FOUND", "Not Found"),
    raw("POST", "/search/by-everything", b"{}", 404, "NOT_FOUND", "Not Found"),
    raw("POST", "/search/by-text", b"null", 400, "INVALID_PARAMETER", "request body"),
    raw("POST", "/search/by-text", b'"a string"', 400, "INVALID_PARAMETER", "request body"),
    raw("POST", "/search/by-text", b"\xff\xfe\x00garbage", 400, "INVALID_PARAMETER", "not valid JSON"),
    raw("POST", "/search/by-text", b"!\x995\x17\xb4\x90y\x82", 400, "INVALID_PARAMETER", "must be UTF-8"),
    raw(
        "POST",
        "/search/by-text",
        json.dumps(VALID["/search/by-text"]).encode(),
        400,
        "INVALID_PARAMETER",
        "request body",
        **{"Content-Type": "text/plain"},
    ),
    raw(
        "POST",
        "/image/add",
        b'{"library_name": "x", "image_base64": "' + b"A" * 2_100_000 + b'"}',
        413,
        "PAYLOAD_TOO_LARGE",
        "request body exceeds",
    ),
]

CORPUS = [*generic_cases(), *SPECIFIC]


def case_id(case: Case) -> str:
    detail = case.names[:30].replace(" ", "_")
    return f"{case.method}{case.path}:{case.http}:{detail}"


@pytest.fixture(scope="module")
def libraries(client: Client) -> Iterator[None]:
    client.ok("/library/create", {"library_name": LIB, "mode": "general_search"})
    client.ok("/library/create", {"library_name": ITEM, "mode": "item_search"})
    client.ok("/image/add", {"library_name": LIB, "image_id": "known", "image_uri": "u", "image_base64": IMG})
    yield
    for name in (LIB, ITEM):
        client.post("/library/delete", {"library_name": name})


def test_the_corpus_is_large_and_covers_every_route():
    assert len(CORPUS) >= 100
    covered = {c.path for c in CORPUS}
    assert set(POST_ROUTES) <= covered
    assert {"/library/list", "/health"} <= covered and any(p.startswith("/library/") for p in covered)


@pytest.mark.parametrize("case", CORPUS, ids=[case_id(c) for c in CORPUS])
def test_malformed_request_is_4xx_with_the_envelope_naming_the_problem(client, libraries, case):
    if case.raw is not None or case.body is None:
        r = client.raw(case.method, case.path, data=case.raw, headers=case.headers)
    else:
        r = client.raw(case.method, case.path, json=case.body)
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    env = r.json()
    assert set(env) == {"status", "message", "data"}, env
    assert (r.status_code, env["status"]) == (case.http, case.status), env
    assert env["data"] is None
    assert isinstance(env["message"], str) and case.names in env["message"], env["message"]
    assert "Traceback" not in env["message"]


def test_service_answers_normally_afterwards(client, libraries):
    """After the whole corpus: every route still works."""
    assert client.get("/health", prefix=False)[0] == 200
    assert client.ok("/image/add", {**VALID["/image/add"], "image_id": "after", "tags": {"ok": True}})[
        "created"
    ]
    hits = client.ok("/search/by-image", {"library_name": LIB, "image_base64": IMG, "top_k": 5})["results"]
    assert {h["image_id"] for h in hits} == {"known", "after"}
    assert hits[0]["score"] >= 0.99
    assert client.ok("/search/by-text", {"library_name": LIB, "query_text": "a photo", "top_k": 2})["results"]
    flt = [{"field": "ok", "op": "=", "value": True}]
    by_id = client.ok("/search/by-id", {"library_name": LIB, "image_id": "known", "tag_filter": flt})
    assert [h["image_id"] for h in by_id["results"]] == ["after"]
    assert client.ok("/image/update_tags", {**VALID["/image/update_tags"], "tags": {"x": 1}}) == {
        "updated": 1
    }
    assert client.ok("/image/get", VALID["/image/get"])["images"][0]["tags"] == {"x": 1}
    assert client.ok("/image/delete", {"library_name": LIB, "image_id": "after"}) == {"deleted": 1}
    assert client.get(f"/library/{LIB}")[1]["data"]["image_count"] == 1
    assert LIB in [lib["library_name"] for lib in client.get("/library/list")[1]["data"]["libraries"]]
    [image] = client.ok("/image/get", {**VALID["/image/get"], "return_frame": True})["images"]
    assert base64.b64decode(image["image_base64"]) == base64.b64decode(IMG)
