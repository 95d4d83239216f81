"""The client's transport against a scripted server: envelopes, error classes, auth, retries, timeouts."""

from __future__ import annotations

import base64
import time
from types import SimpleNamespace

import pytest
import requests
import urllib3.util.retry

from image_search_client import (
    ERRORS_BY_STATUS,
    ImageSearchClient,
    ImageSearchError,
    ImportTask,
    InvalidParameterError,
    InvalidResponseError,
    LibraryNotFoundError,
    NotFoundError,
    OverloadedError,
    RouteNotFoundError,
    TaskNotFoundError,
)
from image_search_client.client import PREFIX
from tests.client.conftest import LIBRARY, Reply, Script, err, ok

RESULT = {"image_id": "a", "image_uri": "u", "image_base64": None, "score": 0.5, "tags": {"k": 1}}


def test_api_key_prefix_and_body(scripted):
    scripted.replies = [ok({"results": [RESULT]})]
    client = ImageSearchClient(scripted.url + "/", api_key="s3cret")
    hits = client.search_by_text("lib", "a cat", top_k=3, tag_filter=[{"field": "k", "op": "=", "value": 1}])
    assert [(h.image_id, h.score, h.tags) for h in hits] == [("a", 0.5, {"k": 1})]
    [req] = scripted.received
    assert req["method"] == "POST"
    assert req["path"] == PREFIX + "/search/by-text"
    assert req["headers"]["Authorization"] == "Bearer s3cret"
    assert req["json"] == {
        "library_name": "lib",
        "query_text": "a cat",
        "top_k": 3,
        "return_frame": True,
        "tag_filter": [{"field": "k", "op": "=", "value": 1}],
    }


def test_no_key_no_header_and_optional_fields_left_out(scripted):
    scripted.replies = [ok({"deleted": 2})]
    assert ImageSearchClient(scripted.url).delete_image("lib", "a") == 2
    [req] = scripted.received
    assert "Authorization" not in req["headers"]
    assert req["json"] == {"library_name": "lib", "image_id": "a"}  # no "image_uri": null


def test_create_library_sends_index_kind_and_shards_only_when_given(scripted):
    scripted.replies = [ok(LIBRARY | {"shards": 4})]
    client = ImageSearchClient(scripted.url)
    assert client.create_library("lib", shards=4, index_kind="flat").shards == 4
    assert client.create_library("lib").shards == 4
    first, second = scripted.received
    assert first["json"] == {
        "library_name": "lib",
        "mode": "general_search",
        "index_kind": "flat",
        "shards": 4,
    }
    assert second["json"] == {"library_name": "lib", "mode": "general_search"}


def test_images_are_sent_as_base64_from_bytes_or_path(scripted, tmp_path):
    scripted.replies = [ok({"image_id": "a", "image_uri": "u", "created": True})]
    client = ImageSearchClient(scripted.url)
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8jpeg-bytes")
    assert client.add_image("lib", "a", "u", image=path, tags={"c": "red"}).created is True
    assert client.add_image("lib", "a", "u", image=b"raw").created is True
    sent = [r["json"] for r in scripted.received]
    assert base64.b64decode(sent[0]["image_base64"]) == b"\xff\xd8jpeg-bytes"
    assert sent[0]["tags"] == {"c": "red"} and sent[0]["save_image"] is True
    assert base64.b64decode(sent[1]["image_base64"]) == b"raw"
    with pytest.raises(ValueError, match="not both"):
        client.add_image("lib", "a", "u", image=b"x", image_base64="eA==")
    with pytest.raises(ValueError, match="exactly one"):
        client.search_by_image("lib")


@pytest.mark.parametrize("status", sorted(ERRORS_BY_STATUS))
def test_each_status_string_raises_its_class(scripted, status):
    scripted.replies = [err(418, status, f"about {status}")]
    with pytest.raises(ERRORS_BY_STATUS[status]) as info:
        ImageSearchClient(scripted.url, retries=0).get_library("x")
    exc = info.value
    assert (exc.status, exc.message, exc.http_status) == (status, f"about {status}", 418)
    assert isinstance(exc, ImageSearchError)
    assert str(exc) == f"{status} (HTTP 418): about {status}"


def test_error_hierarchy():
    assert issubclass(LibraryNotFoundError, NotFoundError)
    assert issubclass(TaskNotFoundError, NotFoundError)
    assert issubclass(RouteNotFoundError, NotFoundError)


def test_unknown_status_is_the_base_class(scripted):
    scripted.replies = [err(400, "SOMETHING_NEW", "a newer service says no")]
    with pytest.raises(ImageSearchError) as info:
        ImageSearchClient(scripted.url).list_libraries()
    assert type(info.value) is ImageSearchError
    assert info.value.status == "SOMETHING_NEW"


@pytest.mark.parametrize(
    "reply",
    [Reply(502, "<html>Bad gateway</html>"), Reply(200, {"no": "envelope"}), Reply(200, "")],
)
def test_non_envelope_answers(scripted, reply):
    scripted.replies = [reply]
    with pytest.raises(InvalidResponseError) as info:
        ImageSearchClient(scripted.url).list_libraries()
    assert info.value.status == "INVALID_RESPONSE"
    assert info.value.http_status == reply.http
    assert "envelope" in info.value.message


def test_overloaded_is_retried_with_backoff_then_raised(scripted):
    scripted.replies = [err(503, "OVERLOADED", "busy"), err(503, "OVERLOADED", "busy"), ok({"libraries": []})]
    assert ImageSearchClient(scripted.url, retries=2, backoff=0.01).list_libraries() == []
    assert len(scripted.received) == 3

    scripted.received.clear()
    scripted.replies = [err(503, "OVERLOADED", "busy")]
    with pytest.raises(OverloadedError):
        ImageSearchClient(scripted.url, retries=1, backoff=0.01).list_libraries()
    assert len(scripted.received) == 2


def record_retry_sleeps(monkeypatch) -> list[float]:
    """The delays urllib3's Retry sleeps between attempts (recorded instead of slept)."""
    slept: list[float] = []
    monkeypatch.setattr(urllib3.util.retry, "time", SimpleNamespace(sleep=slept.append, time=time.time))
    return slept


def test_429_and_retry_after_are_honoured(scripted, monkeypatch):
    slept = record_retry_sleeps(monkeypatch)
    scripted.replies = [
        Reply(429, "slow down", headers={"Retry-After": "3"}),
        err(503, "OVERLOADED", "busy"),
        ok({"libraries": []}),
    ]
    assert ImageSearchClient(scripted.url, retries=2, backoff=0.25).list_libraries() == []
    assert len(scripted.received) == 3
    # the server's Retry-After first, then the client's own backoff: 0.25 x 2 plus up to 0.25 of jitter
    assert slept[0] == 3 and 0.5 <= slept[1] <= 0.75 and len(slept) == 2


def test_first_retry_waits_backoff_plus_jitter(scripted, monkeypatch):
    slept = record_retry_sleeps(monkeypatch)
    scripted.replies = [err(503, "OVERLOADED", "busy")] * 3 + [ok({"libraries": []})]
    ImageSearchClient(scripted.url, retries=3, backoff=0.5).list_libraries()
    assert [int(s / 0.5) for s in slept] == [1, 2, 4]  # doubling; the jitter adds less than one backoff
    assert all(0.5 * 2**i <= s <= 0.5 * 2**i + 0.5 for i, s in enumerate(slept))


def test_other_errors_are_not_retried(scripted):
    scripted.replies = [err(400, "INVALID_PARAMETER", "top_k: too big")]
    with pytest.raises(InvalidParameterError):
        ImageSearchClient(scripted.url, retries=3, backoff=0.01).search_by_id("lib", "a", top_k=5000)
    assert len(scripted.received) == 1


def test_timeout(scripted):
    scripted.replies = [Reply(200, {"status": "SUCCESS", "message": None, "data": {}}, delay_s=1.0)]
    with pytest.raises(requests.Timeout):
        ImageSearchClient(scripted.url, timeout=0.2, retries=0).health()


def test_connection_refused_is_retried_then_raised():
    with pytest.raises(requests.ConnectionError):
        ImageSearchClient("http://127.0.0.1:9", retries=1, backoff=0.01, timeout=2).health()


def test_import_task_routes_and_waiting(scripted):
    running = {
        "task_id": "t1",
        "library_name": "lib",
        "state": "RUNNING",
        "total": 3,
        "succeeded": 1,
        "failed": 0,
        "errors": [],
        "created_at": "2026-01-01T00:00:00Z",
        "finished_at": None,
    }
    done = {
        **running,
        "state": "PARTIALLY_SUCCEEDED",
        "succeeded": 2,
        "failed": 1,
        "errors": [{"line": 3, "image_id": "c", "image_uri": "u3", "reason": "bad base64"}],
        "finished_at": "2026-01-01T00:00:01Z",
    }
    scripted.replies = [ok({"task_id": "t1"}), ok(running), ok(done)]
    client = ImageSearchClient(scripted.url)
    assert client.create_import_task("lib", "s3://bucket/x.jsonl", save_image=False) == "t1"
    seen: list[ImportTask] = []
    task = client.wait_for_import_task("t1", poll_interval=0.01, on_progress=seen.append)
    assert [t.state for t in seen] == ["RUNNING", "PARTIALLY_SUCCEEDED"]
    assert task.done and not seen[0].done
    assert (task.succeeded, task.failed, task.errors[0].line, task.errors[0].reason) == (
        2,
        1,
        3,
        "bad base64",
    )
    assert scripted.received[0]["json"] == {
        "library_name": "lib",
        "source": "s3://bucket/x.jsonl",
        "save_image": False,
    }
    assert [r["path"] for r in scripted.received[1:]] == [PREFIX + "/image/tasks/results/t1"] * 2


def test_wait_for_import_task_times_out(scripted):
    running = {"task_id": "t1", "library_name": "lib", "state": "PENDING"}
    scripted.replies = [ok(running)]
    with pytest.raises(TimeoutError, match="PENDING"):
        ImageSearchClient(scripted.url).wait_for_import_task("t1", poll_interval=0.01, timeout=0.05)


def test_path_parameters_are_quoted(scripted):
    scripted.replies = [err(404, "TASK_NOT_FOUND", "no")]
    with pytest.raises(TaskNotFoundError):
        ImageSearchClient(scripted.url).get_import_task("a/b?c")
    assert scripted.received[0]["path"] == PREFIX + "/image/tasks/results/a%2Fb%3Fc"


def test_results_keep_fields_a_newer_service_adds(scripted):
    scripted.replies = [ok({"results": [{**RESULT, "image_base64": "aGk=", "rank_reason": "x"}]})]
    [hit] = ImageSearchClient(scripted.url).search_by_id("lib", "a")
    assert hit.image_bytes() == b"hi"
    assert hit.rank_reason == "x"  # type: ignore[attr-defined]


def test_cancel_import_task_posts_the_id_and_returns_the_task(scripted: Script) -> None:
    cancelled = {"task_id": "t1", "library_name": "lib", "state": "CANCELLED", "succeeded": 4}
    scripted.replies = [ok(cancelled), err(404, "TASK_NOT_FOUND", "no")]
    client = ImageSearchClient(scripted.url)
    task = client.cancel_import_task("t1")
    assert (task.state, task.succeeded, task.done) == ("CANCELLED", 4, True)
    assert scripted.received[0]["path"] == PREFIX + "/image/tasks/cancel"
    assert scripted.received[0]["json"] == {"task_id": "t1"}
    with pytest.raises(TaskNotFoundError):
        client.cancel_import_task("t2")
