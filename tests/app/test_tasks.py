"""Bulk import over HTTP: /image/tasks/create and /image/tasks/results/{task_id} on the shared app."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ray import serve

from tests.app.conftest import API_KEY, APP, Client, deploy, import_dir, wait_ready
from tests.images import image_b64
from tests.loopback import Loopback, closed_port_url, loopback_server

pytestmark = pytest.mark.ray

FINAL = ("SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED")


@pytest.fixture
def srv() -> Iterator[Loopback]:
    with loopback_server() as s:
        yield s


def write_source(storage_root: str, lines: list[Any]) -> str:
    path = import_dir(storage_root) / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def good(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "image_id": f"id{i}",
        "image_uri": f"https://example.com/{i}.png",
        "image_base64": image_b64(i),
    } | extra


def start(client: Client, library: str, source: str, **extra: Any) -> str:
    data = client.ok("/image/tasks/create", {"library_name": library, "source": source, **extra})
    assert set(data) == {"task_id"}
    return data["task_id"]


def results(client: Client, task_id: str) -> dict[str, Any]:
    code, env = client.get(f"/image/tasks/results/{task_id}")
    assert code == 200 and env["status"] == "SUCCESS", (code, env)
    return env["data"]


def wait_for(
    client: Client, task_id: str, until: Callable[[dict[str, Any]], bool], deadline_s: float = 120
) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while True:
        d = results(client, task_id)
        if until(d):
            return d
        assert d["state"] not in FINAL, f"finished before the awaited condition: {d}"
        assert time.monotonic() < end, f"task did not get there in {deadline_s}s: {d}"
        time.sleep(0.1)


def finished(d: dict[str, Any]) -> bool:
    return d["state"] in FINAL


def test_good_and_bad_lines_give_partial_success_with_exact_line_numbers(client, library, storage_root, srv):
    source = write_source(
        storage_root,
        [
            good(1, tags={"color": "red", "price": 10}),  # 1
            {"image_id": "b64", "image_uri": "u", "image_base64": "not base64!"},  # 2
            {"image_uri": "u", "image_base64": image_b64(3)},  # 3: no image_id
            good(4, tags={"color": ["red", {"x": 1}]}),  # 4: bad tags
            "",  # 5: blank, skipped
            {"image_id": "net", "image_uri": closed_port_url()},  # 6: unreachable
            {"image_id": "web", "image_uri": srv.img(7), "tags": {"color": "blue"}},  # 7: fetched
            good(8),  # 8
            "[1, 2]",  # 9: not an object
        ],
    )
    task_id = start(client, library, source)
    d = wait_for(client, task_id, finished)
    assert d["state"] == "PARTIALLY_SUCCEEDED", d
    assert (d["task_id"], d["library_name"]) == (task_id, library)
    assert (d["total"], d["succeeded"], d["failed"]) == (8, 3, 5)
    errors = {e["line"]: e for e in d["errors"]}
    assert sorted(errors) == [2, 3, 4, 6, 9]
    assert errors[2]["reason"].startswith("image_base64: not valid base64") and errors[2]["image_id"] == "b64"
    assert errors[3]["reason"] == "image_id: Field required" and errors[3]["image_uri"] == "u"
    assert errors[4]["reason"].startswith("tags.color[1]")
    assert errors[6]["reason"].startswith("image_uri: fetch failed")
    assert errors[9]["reason"] == "expected a JSON object, got list"
    assert d["created_at"] and d["finished_at"] and d["error"] is None
    # the imported records are searchable, with their tags and stored frames
    assert client.get(f"/library/{library}")[1]["data"]["image_count"] == 3
    hit = client.ok(
        "/search/by-image",
        {
            "library_name": library,
            "image_base64": image_b64(7),
            "top_k": 1,
            "tag_filter": [{"field": "color", "op": "=", "value": "blue"}],
        },
    )["results"][0]
    assert (hit["image_id"], hit["image_uri"]) == ("web", srv.img(7)) and hit["score"] >= 0.99
    assert hit["image_base64"] is not None


def test_all_good_from_an_http_source_succeeds(client, library, srv):
    srv.files["all.jsonl"] = "\n".join(json.dumps(good(i, tags={"i": i})) for i in range(10)).encode()
    task_id = start(client, library, f"{srv.base}/files/all.jsonl", save_image=False)
    d = wait_for(client, task_id, finished)
    assert (d["state"], d["total"], d["succeeded"], d["failed"], d["errors"]) == ("SUCCEEDED", 10, 10, 0, [])
    [img] = client.ok("/image/get", {"library_name": library, "image_id": "id4", "return_frame": True})[
        "images"
    ]
    assert img["tags"] == {"i": 4} and img["image_base64"] is None  # save_image: false


def test_progress_is_visible_while_the_task_runs(client, library, storage_root, srv):
    lines = [good(i) for i in range(8)] + [
        {"image_id": f"g{i}", "image_uri": srv.img(i, gated=True)} for i in range(4)
    ]
    task_id = start(client, library, write_source(storage_root, lines))
    # chunks of 4 lines: the first two commit, the third waits on the gated server
    d = wait_for(client, task_id, lambda d: d["succeeded"] >= 8)
    assert (d["state"], d["total"], d["succeeded"], d["failed"]) == ("RUNNING", 12, 8, 0)
    assert d["finished_at"] is None
    srv.gate.set()
    d = wait_for(client, task_id, finished)
    assert (d["state"], d["succeeded"]) == ("SUCCEEDED", 12)


def test_deleting_the_library_fails_its_running_task(client, library, storage_root, srv):
    lines = [good(i) for i in range(4)] + [
        {"image_id": f"g{i}", "image_uri": srv.img(i, gated=True)} for i in range(4)
    ]
    task_id = start(client, library, write_source(storage_root, lines))
    wait_for(client, task_id, lambda d: d["succeeded"] >= 4)
    client.ok("/library/delete", {"library_name": library})
    srv.gate.set()
    d = wait_for(client, task_id, finished)
    assert d["state"] == "FAILED" and d["error"] == f"library {library!r} was deleted while the import ran"
    assert d["succeeded"] == 4


def test_cancel_ends_a_running_task_with_its_counters_and_is_idempotent(
    client: Client, library: str, storage_root: str, srv: Loopback
) -> None:
    lines = [good(i) for i in range(4)] + [
        {"image_id": f"g{i}", "image_uri": srv.img(i, gated=True)} for i in range(4)
    ]
    task_id = start(client, library, write_source(storage_root, lines))
    wait_for(client, task_id, lambda d: d["succeeded"] >= 4)
    d = client.ok("/image/tasks/cancel", {"task_id": task_id})
    assert (d["task_id"], d["state"], d["succeeded"], d["failed"]) == (task_id, "CANCELLED", 4, 0)
    assert d["finished_at"] is not None and d["error"] is None
    srv.gate.set()  # the gated fetches may answer now: nothing more is committed
    time.sleep(1.0)
    assert results(client, task_id) == d
    assert client.ok("/image/tasks/cancel", {"task_id": task_id}) == d  # cancelling again changes nothing
    # a finished task is answered unchanged too
    done = start(client, library, write_source(storage_root, [good(9)]))
    final = wait_for(client, done, finished)
    assert client.ok("/image/tasks/cancel", {"task_id": done}) == final
    assert client.get(f"/library/{library}")[1]["data"]["image_count"] == 5


@pytest.mark.parametrize("task_id", ["0" * 32, "not-a-task", "A" * 32])
def test_cancel_of_an_unknown_task_is_404(client: Client, task_id: str) -> None:
    code, env = client.post("/image/tasks/cancel", {"task_id": task_id})
    assert (code, env["status"], env["data"]) == (404, "TASK_NOT_FOUND", None)
    code, env = client.post("/image/tasks/cancel", {"task": task_id})
    assert (code, env["status"]) == (400, "INVALID_PARAMETER") and "task" in env["message"]


@pytest.mark.parametrize("task_id", ["0" * 32, "not-a-task", "A" * 32])
def test_unknown_task_is_404(client, task_id):
    code, env = client.get(f"/image/tasks/results/{task_id}")
    assert (code, env["status"], env["data"]) == (404, "TASK_NOT_FOUND", None)
    assert "does not exist" in env["message"]


def test_create_is_validated_before_anything_runs(client, library, storage_root):
    ok_source = write_source(storage_root, [good(1)])
    cases = [
        ({"library_name": library}, 400, "INVALID_PARAMETER", "source"),
        ({"library_name": library, "source": ok_source, "extra": 1}, 400, "INVALID_PARAMETER", "extra"),
        ({"library_name": library, "source": "/etc/passwd"}, 400, "INVALID_PARAMETER", "source: "),
        ({"library_name": library, "source": "ftp://h/x.jsonl"}, 400, "INVALID_PARAMETER", "source: "),
        ({"library_name": library, "source": ok_source + ".missing"}, 400, "INVALID_PARAMETER", "source: "),
        (
            {"library_name": library, "source": ok_source, "save_image": "yes"},
            400,
            "INVALID_PARAMETER",
            "save_image",
        ),
        ({"library_name": "no_such_lib", "source": ok_source}, 404, "LIBRARY_NOT_FOUND", "no_such_lib"),
        ({"library_name": "no_such_lib", "source": "/etc/passwd"}, 400, "INVALID_PARAMETER", "source: "),
    ]
    for body, http, status, needle in cases:
        code, env = client.post("/image/tasks/create", body)
        assert (code, env["status"]) == (http, status), (body, env)
        assert needle in env["message"], (body, env)


def test_a_restart_mid_task_resumes_and_finishes_without_duplicates(client, base_url, storage_root, srv):
    name = "import_survives_restart"
    client.ok("/library/create", {"library_name": name, "mode": "general_search"})
    lines = [good(i, tags={"i": i}) for i in range(8)]
    lines += [{"image_id": f"g{i}", "image_uri": srv.img(100 + i, gated=True)} for i in range(4)]
    lines += [good(i) for i in range(20, 26)]
    task_id = start(client, name, write_source(storage_root, lines))
    d = wait_for(client, task_id, lambda d: d["succeeded"] >= 8)
    assert d["state"] == "RUNNING"

    serve.delete(APP)
    deploy(storage_root, api_keys=[API_KEY])
    wait_ready(base_url)
    assert results(client, task_id)["state"] == "RUNNING"  # durable: the new replica resumed it
    srv.gate.set()

    d = wait_for(client, task_id, finished)
    assert (d["state"], d["total"], d["succeeded"], d["failed"]) == ("SUCCEEDED", 18, 18, 0), d
    assert client.get(f"/library/{name}")[1]["data"]["image_count"] == 18
    for line in lines:
        got = client.ok("/image/get", {"library_name": name, "image_id": line["image_id"]})["images"]
        assert [g["image_uri"] for g in got] == [line["image_uri"]]
