"""The import runner without Ray: the tiny model, a real LibraryWriter, a loopback image server."""

from __future__ import annotations

import asyncio
import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest

from filters import TagLimits
from index.errors import InvalidParameter, LibraryNotFound, Overloaded, TaskNotFound
from index.ingest.fetch import FetchPolicy
from index.ingest.importer import ImportRunner, ImportSettings, Run
from index.ingest.lines import ByteBudget, LineReader, parse_line
from index.model.imaging import ImageLimits
from index.storage.embedded.catalog import Catalog
from index.storage.embedded.store import LibraryStore
from index.storage.embedded.tasks import TaskStore
from index.writer import LibraryWriter
from tests.images import image_b64
from tests.loopback import closed_port_url, loopback_server

# -- LineReader and parse_line ---------------------------------------------------------------------


def test_line_reader_numbers_physical_lines_and_skips_blanks():
    data = b'{"a":1}\n\n  \r\n{"b":2}\r\n' + b"x" * 50 + b'\n{"c":3}'
    r = LineReader(io.BytesIO(data), max_line_bytes=20)
    assert r.read_chunk(2) == [(1, b'{"a":1}'), (4, b'{"b":2}')]
    assert r.read_chunk(5) == [(5, None), (6, b'{"c":3}')]  # None: over the length limit
    assert r.eof and r.records == 4 and r.line_no == 6


def test_line_reader_skip_resumes_exactly():
    data = b"".join(b'{"i":%d}\n' % i if i % 3 else b"\n" for i in range(1, 20))
    full = LineReader(io.BytesIO(data), max_line_bytes=100)
    first = full.read_chunk(4)
    rest = full.read_chunk(100)
    resumed = LineReader(io.BytesIO(data), max_line_bytes=100)
    resumed.skip(first[-1][0])
    assert resumed.read_chunk(100) == rest
    assert resumed.records == full.records


def test_line_reader_drains_an_over_long_line_without_holding_it():
    data = b"y" * 3_000_000 + b"\n{}\n"
    r = LineReader(io.BytesIO(data), max_line_bytes=10)
    assert r.read_chunk(5) == [(1, None), (2, b"{}")]


LIMITS = {"tag_limits": TagLimits(), "max_image_bytes": 10**6}


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"image_uri": "u"}', "image_id: Field required"),
        (b'{"image_id": "", "image_uri": "u"}', "image_id: String should have at least 1 character"),
        (b'{"image_id": 5, "image_uri": "u"}', "image_id: Input should be a valid string"),
        (b'{"image_id": "a", "image_uri": "u", "tag": {}}', "tag: unknown field"),
        (b'{"image_id": "a", "image_uri": "u", "tags": {"c": {"x": 1}}}', "tags.c"),
        (b'{"image_id": "a", "image_uri": "u", "tags": {"p": NaN}}', "tags.p"),
        (b'{"image_id": "a", "image_uri": "u", "image_base64": "@@@"}', "image_base64: not valid base64"),
    ],
)
def test_bad_lines_name_the_problem(raw, reason):
    err = parse_line(raw, 7, **LIMITS)
    assert err.line == 7 and err.reason.startswith(reason), err.reason


def test_bad_line_keeps_the_ids_it_has():
    err = parse_line(b'{"image_id": "a", "image_uri": "u", "tags": []}', 3, **LIMITS)
    assert (err.image_id, err.image_uri) == ("a", "u")


def test_good_line_parses():
    ok = parse_line(
        json.dumps(
            {"image_id": "a", "image_uri": "u", "image_base64": image_b64(1), "tags": {"n": 1}}
        ).encode(),
        1,
        **LIMITS,
    )
    assert ok.image_id == "a" and ok.tags == {"n": 1} and ok.data.startswith(b"\x89PNG")


# -- the runner ------------------------------------------------------------------------------------


class Env:
    """A storage root with one library, its writer, and runners built on demand."""

    def __init__(self, tmp_path: Path, embedder: Any) -> None:
        self.root = tmp_path / "root"
        self.inbox = tmp_path / "inbox"
        self.inbox.mkdir()
        self.embedder = embedder
        self.writer = LibraryWriter(self.root)
        self.tasks = TaskStore(self.root)
        self.uid = self.create("lib")
        self.write_calls = 0

    def create(self, name: str) -> str:
        self.writer.create_library(name, "general_search", None, self.embedder.info)
        return Catalog(self.root).get(name).uid

    async def write(self, name, uid, records):
        self.write_calls += 1
        return await asyncio.to_thread(self.writer.add_images, name, uid, records)

    def runner(
        self, write=None, policy: FetchPolicy | None = None, image_bytes: int = 1_000_000, **settings: Any
    ) -> ImportRunner:
        base = {"chunk_lines": 3, "encode_batch_size": 2, "chunks_in_flight": 2, "fetch_retries": 0}
        return ImportRunner(
            tasks=self.tasks,
            catalog=Catalog(self.root),
            encode=functools.partial(asyncio.to_thread, self.embedder.encode_images),
            write=write or self.write,
            preprocess=self.embedder.spec.preprocess,
            settings=ImportSettings(**(base | settings)),
            image_limits=ImageLimits(max_bytes=image_bytes),
            tag_limits=TagLimits(),
            # the loopback image server is allowed explicitly: the default policy refuses non-public addresses
            policy=policy
            or FetchPolicy(
                import_roots=(str(self.inbox),),
                object_store_allowed={"memory": ("imports",)},
                allowed_networks=("127.0.0.0/8",),
            ),
        )

    def jsonl(self, lines: list[Any], name: str = "src.jsonl") -> str:
        text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
        (self.inbox / name).write_text(text)
        return str(self.inbox / name)

    def records(self, name: str = "lib") -> list[tuple[str, str, dict]]:
        with LibraryStore(Catalog(self.root).library_dir(name), readonly=True) as s:
            rows = s._conn.execute("SELECT image_id, image_uri, tags, frame FROM records WHERE deleted=0")
            return sorted((r[0], r[1], json.loads(r[2]), r[3] is not None) for r in rows)


@pytest.fixture
def env(tmp_path, tiny_embedder):
    e = Env(tmp_path, tiny_embedder)
    yield e
    e.writer.close()
    e.tasks.close()


async def run_task(runner: ImportRunner, source: str, *, uid: str, library: str = "lib", save_image=True):
    await runner.start()
    try:
        task = await runner.create(library, uid, source, save_image)
        return await wait_done(runner, task.task_id)
    finally:
        await runner.close()


async def wait_done(runner: ImportRunner, task_id: str, timeout_s: float = 60) -> dict:
    async with asyncio.timeout(timeout_s):
        while True:
            d = await runner.describe(task_id)
            if d["state"] not in ("PENDING", "RUNNING"):
                return d
            await asyncio.sleep(0.02)


def good(i: int, **extra) -> dict:
    return {
        "image_id": f"id{i}",
        "image_uri": f"https://example.com/{i}.png",
        "image_base64": image_b64(i),
    } | extra


def test_image_uris_in_a_source_follow_the_ssrf_rules(env):
    """An image_uri on a private address is a line error under the default policy, and is not fetched."""
    with loopback_server() as srv:
        source = env.jsonl([good(1), {"image_id": "internal", "image_uri": srv.img(2)}])
        policy = FetchPolicy(import_roots=(str(env.inbox),))
        d = asyncio.run(run_task(env.runner(policy=policy), source, uid=env.uid))
        assert srv.hits["/img/2.png"] == 0
    assert (d["state"], d["succeeded"], d["failed"]) == ("PARTIALLY_SUCCEEDED", 1, 1), d
    (err,) = d["errors"]
    assert err["line"] == 2
    assert err["reason"].startswith("image_uri: refused: the host is not a public address")


def test_an_imports_image_fetches_reuse_connections(env):
    """Twelve image URIs on one host, two fetch threads: at most two connections, not twelve."""
    with loopback_server(keep_alive=True) as srv:
        source = env.jsonl([{"image_id": f"u{i}", "image_uri": srv.img(i)} for i in range(12)])
        d = asyncio.run(run_task(env.runner(fetch_threads=2), source, uid=env.uid))
        connections = len(srv.clients)
    assert (d["state"], d["succeeded"]) == ("SUCCEEDED", 12), d
    assert 1 <= connections <= 2


def test_good_and_bad_lines_give_partial_success_with_exact_line_numbers(env):
    with loopback_server() as srv:
        unreachable = closed_port_url()
        source = env.jsonl(
            [
                good(1, tags={"color": "red"}),  # line 1
                '{"image_id": "b", "image_uri": "u", "image_base64": "%%%"}',  # 2: bad base64
                "",  # 3: blank, skipped
                {"image_uri": "u"},  # 4: missing image_id
                good(5, tags={"c": {"nested": 1}}),  # 5: bad tags
                {"image_id": "net", "image_uri": unreachable},  # 6: unreachable
                {"image_id": "web", "image_uri": srv.img(6)},  # 7: fetched
                "{oops",  # 8: not JSON
                good(9),  # 9
                {"image_id": "nf", "image_uri": f"{srv.base}/img/missing.gif"},  # 10: 404
                {"image_id": "txt", "image_uri": "u", "image_base64": "aGVsbG8="},  # 11: not an image
            ]
        )
        d = asyncio.run(run_task(env.runner(), source, uid=env.uid))
    assert d["state"] == "PARTIALLY_SUCCEEDED", d
    assert (d["total"], d["succeeded"], d["failed"]) == (10, 3, 7)
    errors = {e["line"]: e for e in d["errors"]}
    assert sorted(errors) == [2, 4, 5, 6, 8, 10, 11]
    assert errors[2]["reason"].startswith("image_base64: not valid base64")
    assert (errors[2]["image_id"], errors[2]["image_uri"]) == ("b", "u")
    assert errors[4]["reason"] == "image_id: Field required" and errors[4]["image_id"] is None
    assert errors[5]["reason"].startswith("tags.c")
    assert errors[6]["reason"].startswith("image_uri: fetch failed: cannot connect to host")
    assert errors[6]["image_uri"] == unreachable
    assert errors[8]["reason"].startswith("not valid JSON")
    assert "HTTP 404" in errors[10]["reason"]
    assert errors[11]["reason"].startswith("image_base64: not a readable image")
    assert env.records() == [
        ("id1", "https://example.com/1.png", {"color": "red"}, True),
        ("id9", "https://example.com/9.png", {}, True),
        ("web", srv.img(6), {}, True),
    ]
    assert d["finished_at"] is not None and d["error"] is None


def test_all_good_lines_succeed_and_vectors_are_the_models(env):
    source = env.jsonl([good(i) for i in range(7)])
    d = asyncio.run(run_task(env.runner(), source, uid=env.uid, save_image=False))
    assert (d["state"], d["total"], d["succeeded"], d["failed"], d["errors"]) == ("SUCCEEDED", 7, 7, 0, [])
    assert [r[3] for r in env.records()] == [False] * 7  # save_image: false keeps no frames
    # the stored vector is the model's embedding of the decoded image
    from index.model.imaging import decode_base64, decode_image, prepare_for_model

    spec = env.embedder.spec
    pixels = prepare_for_model(
        decode_image(decode_base64(image_b64(3), max_bytes=10**6), ImageLimits()), spec.preprocess
    )
    want = env.embedder.encode_images(pixels[None])[0]
    with LibraryStore(Catalog(env.root).library_dir("lib"), readonly=True) as s:
        [rec] = s.get("id3")
        assert np.allclose(s.vector_of(rec.row_id), want, atol=1e-5)


def test_a_later_duplicate_key_wins_as_in_a_sequential_import(env):
    lines = [good(1, tags={"v": 1})] + [good(i) for i in range(2, 8)] + [good(1, tags={"v": 2})]
    d = asyncio.run(run_task(env.runner(), env.jsonl(lines), uid=env.uid))
    assert d["state"] == "SUCCEEDED" and d["succeeded"] == 8
    assert next(r for r in env.records() if r[0] == "id1")[2] == {"v": 2}
    assert len(env.records()) == 7


def test_resume_after_a_crash_replays_the_uncommitted_chunk_without_duplicates(env):
    lines = [good(i, tags={"i": i}) for i in range(1, 12)] + ['{"bad'] + [good(i) for i in range(12, 15)]
    source = env.jsonl(lines)
    blocked = asyncio.Event()

    async def first_life():
        calls = 0

        async def write_then_hang(name, uid, records):
            nonlocal calls
            calls += 1
            out = await env.write(name, uid, records)
            if calls == 3:  # the third chunk reaches the library but its progress is never committed
                blocked.set()
                await asyncio.Event().wait()
            return out

        runner = env.runner(write=write_then_hang, chunks_in_flight=1)
        await runner.start()
        task = await runner.create("lib", env.uid, source, True)
        await blocked.wait()
        await runner.close()  # the "crash": tasks stop where they are
        return task.task_id

    task_id = asyncio.run(first_life())
    mid = env.tasks.get(task_id)
    assert (mid.state, mid.lines_done, mid.succeeded) == ("RUNNING", 6, 6)
    assert len(env.records()) == 9  # chunk 3 is in the library although the task does not know it

    async def second_life():
        runner = env.runner()
        await runner.start()  # resumes unfinished tasks by itself
        try:
            return await wait_done(runner, task_id)
        finally:
            await runner.close()

    d = asyncio.run(second_life())
    assert (d["state"], d["total"], d["succeeded"], d["failed"]) == ("PARTIALLY_SUCCEEDED", 15, 14, 1)
    assert [e["line"] for e in d["errors"]] == [12]
    records = env.records()
    assert len(records) == 14 and len({(r[0], r[1]) for r in records}) == 14


def test_deleting_the_library_fails_the_task_with_a_clear_reason(env):
    source = env.jsonl([good(i) for i in range(1, 13)])

    async def scenario():
        calls = 0

        async def write_then_delete(name, uid, records):
            nonlocal calls
            calls += 1
            if calls == 2:
                await asyncio.to_thread(env.writer.delete_library, "lib")
            return await env.write(name, uid, records)

        return await run_task(env.runner(write=write_then_delete, chunks_in_flight=1), source, uid=env.uid)

    d = asyncio.run(scenario())
    assert d["state"] == "FAILED" and d["error"] == "library 'lib' was deleted while the import ran"
    assert d["succeeded"] == 3


def test_a_recreated_library_of_the_same_name_is_not_written_to(env):
    source = env.jsonl([good(1)])
    env.writer.delete_library("lib")
    new_uid = env.create("lib")
    d = asyncio.run(run_task(env.runner(), source, uid=env.uid))  # the uid the task was created for
    assert d["state"] == "FAILED" and "deleted" in d["error"]
    assert new_uid != env.uid and env.records() == []


def test_writer_failures_are_retried_then_fail_the_task(env):
    source = env.jsonl([good(1), good(2)])
    attempts = 0

    async def flaky(name, uid, records):
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("writer restarting")
        return await env.write(name, uid, records)

    d = asyncio.run(run_task(env.runner(write=flaky, step_retries=2), source, uid=env.uid))
    assert d["state"] == "SUCCEEDED" and attempts == 3

    async def broken(name, uid, records):
        raise ConnectionError("writer gone")

    d = asyncio.run(
        run_task(env.runner(write=broken, step_retries=1), env.jsonl([good(3)], "b.jsonl"), uid=env.uid)
    )
    assert d["state"] == "FAILED" and "writing to the library failed 2 times" in d["error"]
    assert "writer gone" in d["error"]


def test_deleted_library_error_from_the_writer_is_not_retried(env):
    async def gone(name, uid, records):
        raise LibraryNotFound(name)

    d = asyncio.run(run_task(env.runner(write=gone, step_retries=5), env.jsonl([good(1)]), uid=env.uid))
    assert d["state"] == "FAILED" and "deleted" in d["error"]


@pytest.mark.parametrize(
    "content, error",
    [
        ("", "the source holds no records"),
        ("\n\n", "the source holds no records"),
        ('{"x": 1}\n', "no line could be imported"),
    ],
)
def test_tasks_that_import_nothing_fail(env, content, error):
    (env.inbox / "e.jsonl").write_text(content)
    d = asyncio.run(run_task(env.runner(), str(env.inbox / "e.jsonl"), uid=env.uid))
    assert d["state"] == "FAILED" and d["error"].startswith(error)


def test_too_many_lines_fail_before_importing_anything(env):
    d = asyncio.run(
        run_task(env.runner(max_task_lines=4), env.jsonl([good(i) for i in range(5)]), uid=env.uid)
    )
    assert d["state"] == "FAILED" and "more than 4 records" in d["error"]
    assert d["total"] is None and env.records() == []


def test_over_long_line_is_a_line_error(env):
    limit = len(json.dumps(good(1))) + 5
    source = env.jsonl([good(1), {"image_id": "x", "image_uri": "u", "image_base64": "A" * limit}])
    d = asyncio.run(run_task(env.runner(max_line_bytes=limit), source, uid=env.uid))
    assert d["state"] == "PARTIALLY_SUCCEEDED"
    assert d["errors"][0]["line"] == 2 and "longer than" in d["errors"][0]["reason"]


def test_remote_sources_learn_their_total_at_the_end(env):
    lines = "\n".join(json.dumps(good(i)) for i in range(4)).encode()
    with loopback_server() as srv:
        srv.files["s.jsonl"] = lines
        d = asyncio.run(run_task(env.runner(), f"{srv.base}/files/s.jsonl", uid=env.uid))
    assert (d["state"], d["total"], d["succeeded"]) == ("SUCCEEDED", 4, 4), d


def test_object_store_source(env):
    import uuid

    import fsspec

    path = f"/imports/{uuid.uuid4().hex}/s.jsonl"
    fsspec.filesystem("memory").pipe(path, "\n".join(json.dumps(good(i)) for i in range(3)).encode())
    d = asyncio.run(run_task(env.runner(), f"memory://{path}", uid=env.uid))
    assert (d["state"], d["succeeded"]) == ("SUCCEEDED", 3)


def test_unreadable_source_at_run_time_fails_the_task(env):
    source = env.jsonl([good(1)])

    async def scenario():
        runner = env.runner()
        task = await runner.create("lib", env.uid, source, True)  # created before start: stays PENDING
        Path(source).unlink()
        await runner.start()
        try:
            return await wait_done(runner, task.task_id)
        finally:
            await runner.close()

    d = asyncio.run(scenario())
    assert d["state"] == "FAILED" and d["error"].startswith("source:")


def test_create_refuses_bad_sources_and_too_many_tasks(env):
    async def scenario():
        runner = env.runner(max_unfinished_tasks=1)
        with pytest.raises(InvalidParameter, match=r"source: .*outside the allowed"):
            await runner.create("lib", env.uid, "/etc/passwd", True)
        with pytest.raises(InvalidParameter, match="not accepted"):
            await runner.create("lib", env.uid, "ftp://x/y.jsonl", True)
        await runner.create("lib", env.uid, env.jsonl([good(1)]), True)  # not started: stays PENDING
        with pytest.raises(Overloaded):
            await runner.create("lib", env.uid, env.jsonl([good(1)]), True)

    asyncio.run(scenario())


def test_running_tasks_are_bounded_and_pending_ones_wait_their_turn(env):
    async def scenario():
        runner = env.runner(max_running_tasks=1)
        await runner.start()
        try:
            ids = [
                (
                    await runner.create(
                        "lib", env.uid, env.jsonl([good(i + 10 * k) for i in range(6)], f"{k}.jsonl"), True
                    )
                ).task_id
                for k in range(3)
            ]
            seen_running = set()
            while True:
                states = [(await runner.describe(t))["state"] for t in ids]
                assert states.count("RUNNING") <= 1
                seen_running |= {t for t, s in zip(ids, states, strict=True) if s == "RUNNING"}
                if all(s == "SUCCEEDED" for s in states):
                    return
                await asyncio.sleep(0.005)
        finally:
            await runner.close()

    asyncio.run(scenario())
    assert len(env.records()) == 18


def test_finished_tasks_past_their_retention_are_deleted_when_the_runner_starts(env):
    old = env.tasks.create(library_name="lib", library_uid=env.uid, source="/x", save_image=True, owner="x")
    env.tasks.finish(old.task_id, None, "SUCCEEDED")
    env.tasks._conn.execute(  # it finished 31 days ago
        "UPDATE tasks SET finished_at = finished_at - 31 * 86400 WHERE task_id = ?", (old.task_id,)
    )
    recent = env.tasks.create(
        library_name="lib", library_uid=env.uid, source="/y", save_image=True, owner="x"
    )
    env.tasks.finish(recent.task_id, None, "FAILED", error="nothing")

    async def scenario():
        runner = env.runner(finished_task_retention_days=30)
        await runner.start()
        try:
            with pytest.raises(TaskNotFound):
                await runner.describe(old.task_id)
            assert (await runner.describe(recent.task_id))["state"] == "FAILED"
        finally:
            await runner.close()

    asyncio.run(scenario())


def test_retention_must_be_positive():
    with pytest.raises(pydantic.ValidationError, match="finished_task_retention_days"):
        ImportSettings(finished_task_retention_days=0)


# -- hardening: bounded bytes, stalls, cancel, one log line per task --------------------------------


def watch_peak(monkeypatch: pytest.MonkeyPatch, runner: ImportRunner) -> list[int]:
    """``[the most bytes the runner's budget held]``, looked at after every take."""
    peak = [0]
    take = ByteBudget.try_take

    def watched(self: ByteBudget, n: int) -> bool:
        ok = take(self, n)
        peak[0] = max(peak[0], runner._budget.used)
        return ok

    monkeypatch.setattr(ByteBudget, "try_take", watched)
    return peak


def test_a_gzip_bomb_of_long_lines_never_holds_more_than_the_budget(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's bomb: 3 chunks of 256 lines of up to max_line_bytes each were held at once (a 66 KB
    gzip held 64 MiB in one chunk). Now lines wait for room in the task's budget."""
    import gzip

    limit = 1024 * 1024
    line = b'{"image_id": "b", "image_uri": "u", "image_base64": "' + b"A" * (limit - 60) + b'"}\n'
    path = env.inbox / "bomb.jsonl.gz"
    with gzip.open(path, "wb") as f:
        for _ in range(40):
            f.write(line)
    runner = env.runner(
        max_line_bytes=limit,
        max_task_bytes_in_flight=4 * limit,
        max_bytes_in_flight=4 * limit,
        chunk_lines=256,
        chunks_in_flight=3,
        max_gzip_ratio=100_000,  # the ratio limit alone would stop this bomb: see test_sources.py
    )
    peak = watch_peak(monkeypatch, runner)
    d = asyncio.run(run_task(runner, str(path), uid=env.uid))
    assert (d["state"], d["failed"]) == ("FAILED", 40), d
    assert "image_base64" in d["errors"][0]["reason"]
    assert 2 * limit < peak[0] <= 4 * limit
    assert runner._budget.used == 0  # everything given back


def test_two_tasks_share_the_runners_budget_without_deadlock(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 256 * 1024
    line = b'{"image_id": "b", "image_uri": "u", "image_base64": "' + b"A" * (limit - 60) + b'"}\n'
    sources = []
    for k in range(2):
        path = env.inbox / f"bomb{k}.jsonl"
        path.write_bytes(line * 30)
        sources.append(str(path))
    runner = env.runner(
        max_line_bytes=limit,
        max_task_bytes_in_flight=4 * limit,
        max_bytes_in_flight=6 * limit,  # less than two tasks' budgets: they wait on each other
        max_running_tasks=2,
        chunk_lines=256,
        image_bytes=limit,  # a line and its image reservation fit a task's budget
    )
    peak = watch_peak(monkeypatch, runner)

    async def scenario():
        await runner.start()
        try:
            ids = [(await runner.create("lib", env.uid, src, True)).task_id for src in sources]
            return [await wait_done(runner, t, timeout_s=60) for t in ids]
        finally:
            await runner.close()

    for d in asyncio.run(scenario()):
        assert (d["state"], d["failed"]) == ("FAILED", 30), d
    assert 4 * limit < peak[0] <= 6 * limit and runner._budget.used == 0


def test_a_gzip_of_newlines_fails_fast_on_the_blank_line_limit(env: Env) -> None:
    import gzip
    import time

    path = env.inbox / "nl.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" * (4 * 1024 * 1024)))  # 4 KB of gzip
    start = time.process_time()
    d = asyncio.run(run_task(env.runner(), str(path), uid=env.uid))
    assert d["state"] == "FAILED" and "more than 1000000 blank lines (imports.max_blank_lines)" in d["error"]
    assert time.process_time() - start < 2.0


def test_a_source_over_its_gzip_ratio_fails_the_task_with_the_limit_named(env: Env) -> None:
    import gzip

    path = env.inbox / "r.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(good(1)).encode() + b"\n")
        for _ in range(40):
            f.write(b" " * 1024 * 1024)
    d = asyncio.run(run_task(env.runner(max_gzip_ratio=50), str(path), uid=env.uid))
    assert d["state"] == "FAILED" and "imports.max_gzip_ratio" in d["error"], d


def test_a_dripping_http_source_fails_the_task(env: Env) -> None:
    """A server that sends a byte at a time, each within the read timeout, is cut off (scaled down)."""
    from tests.index.ingest.test_sources import drip_server

    with drip_server(0.1) as url:
        runner = env.runner(min_source_bytes_per_s=100, source_rate_window_s=1.0)
        d = asyncio.run(run_task(runner, url, uid=env.uid))
    assert d["state"] == "FAILED" and "imports.min_source_bytes_per_s" in d["error"], d


def test_cancel_stops_a_running_task_frees_its_slot_and_is_idempotent(env: Env) -> None:
    with loopback_server() as srv:
        gated = [{"image_id": f"g{i}", "image_uri": srv.img(i, gated=True)} for i in range(6)]
        slow = env.jsonl([good(1), good(2), good(3), *gated], "slow.jsonl")
        after = env.jsonl([good(10), good(11)], "after.jsonl")

        async def scenario():
            runner = env.runner(max_running_tasks=1)
            await runner.start()
            try:
                first = await runner.create("lib", env.uid, slow, True)
                second = await runner.create("lib", env.uid, after, True)
                pending = await runner.create("lib", env.uid, after, True)
                async with asyncio.timeout(30):
                    while (await runner.describe(first.task_id))["succeeded"] < 3:
                        await asyncio.sleep(0.02)
                assert (await runner.describe(second.task_id))["state"] == "PENDING"
                cancelled_pending = await runner.cancel(pending.task_id)
                d = await runner.cancel(first.task_id)  # its gated fetches never answer
                assert first.task_id not in runner._running
                done = await wait_done(runner, second.task_id, timeout_s=30)  # the slot is free
                again = await runner.cancel(first.task_id)
                finished = await runner.cancel(second.task_id)
                return cancelled_pending, d, done, again, finished
            finally:
                await runner.close()

        cancelled_pending, d, done, again, finished = asyncio.run(scenario())
    assert cancelled_pending["state"] == "CANCELLED" and cancelled_pending["started_at"] is None
    assert (d["state"], d["succeeded"], d["failed"], d["error"]) == ("CANCELLED", 3, 0, None)
    assert d["finished_at"] is not None
    assert done["state"] == "SUCCEEDED"
    assert again == d and finished == done  # idempotent: a finished task is answered unchanged
    assert {r[0] for r in env.records()} == {"id1", "id2", "id3", "id10", "id11"}


def test_cancel_lets_a_commit_in_progress_finish_so_every_written_record_is_counted(env: Env) -> None:
    async def scenario():
        writing, release = asyncio.Event(), asyncio.Event()

        async def slow_write(name, uid, records):
            writing.set()
            await release.wait()
            return await env.write(name, uid, records)

        runner = env.runner(write=slow_write)
        await runner.start()
        try:
            task = await runner.create("lib", env.uid, env.jsonl([good(i) for i in range(9)]), True)
            await asyncio.wait_for(writing.wait(), 30)
            cancel = asyncio.create_task(runner.cancel(task.task_id))
            await asyncio.sleep(0.3)
            assert not cancel.done()  # it waits for the write of the first chunk
            assert (await runner.describe(task.task_id))["state"] == "RUNNING"
            release.set()
            return await asyncio.wait_for(cancel, 30)
        finally:
            await runner.close()

    d = asyncio.run(scenario())
    assert (d["state"], d["succeeded"], d["failed"]) == ("CANCELLED", 3, 0), d
    assert len(env.records()) == 3 and env.write_calls == 1  # no chunk started after the cancel


def test_cancel_of_an_unknown_task_is_task_not_found(env: Env) -> None:
    async def scenario():
        runner = env.runner()
        with pytest.raises(TaskNotFound):
            await runner.cancel("0" * 32)

    asyncio.run(scenario())


def test_line_errors_are_logged_once_per_task_as_a_count(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Malformed URIs and deeply nested JSON lines each logged a traceback at ERROR; now one INFO line
    per task counts the line errors."""
    import logging

    lines = [good(1)] + [{"image_id": f"m{i}", "image_uri": "http://[127.0.0.1]/x.jpg"} for i in range(5)]
    lines += ["[" * 5000 + "]" * 5000] * 3
    with caplog.at_level(logging.INFO, logger="index.ingest.importer"):
        d = asyncio.run(run_task(env.runner(), env.jsonl(lines), uid=env.uid))
    assert (d["state"], d["succeeded"], d["failed"]) == ("PARTIALLY_SUCCEEDED", 1, 8), d
    reasons = [e["reason"] for e in d["errors"]]
    assert all(r.startswith("image_uri:") for r in reasons[:5]), reasons
    assert reasons[5:] == ["not valid JSON: nested too deeply"] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    (summary,) = [r.getMessage() for r in caplog.records if "line errors" in r.getMessage()]
    assert "8 line errors" in summary and "image_uri: 5" in summary and "not valid JSON: 3" in summary


def test_an_internal_error_is_logged_in_full_once_per_task(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    def broken(data):
        raise RuntimeError("bug")

    runner = env.runner()
    monkeypatch.setattr(runner, "_pixels", broken)
    with caplog.at_level(logging.INFO, logger="index.ingest.importer"):
        d = asyncio.run(run_task(runner, env.jsonl([good(i) for i in range(4)]), uid=env.uid))
    assert d["failed"] == 4 and all("internal error (incident" in e["reason"] for e in d["errors"])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_byte_budgets_must_fit_a_line() -> None:
    with pytest.raises(pydantic.ValidationError, match="more than max_line_bytes"):
        ImportSettings(max_line_bytes=64 * 1024 * 1024, max_task_bytes_in_flight=32 * 1024 * 1024)
    with pytest.raises(pydantic.ValidationError, match="at least max_task_bytes_in_flight"):
        ImportSettings(max_task_bytes_in_flight=512 * 1024 * 1024, max_bytes_in_flight=256 * 1024 * 1024)


# -- fetched images inside the byte budget --------------------------------------------------------


def big_png(seed: int, side: int = 500) -> bytes:
    """A noise PNG stored uncompressed: about ``3 * side**2`` bytes (750 KB at 500), and it decodes."""
    import io as _io

    from PIL import Image

    noise = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


class Held:
    """Image bytes really held by an import: fetched and not yet committed (as frames) or dropped, the
    fetches in flight, and their peaks. Counted beside the budget, so a budget that forgets bytes
    shows."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, env: Env, *, save_image: bool) -> None:
        import threading

        self.lock = threading.Lock()
        self.live = self.peak = self.fetching = self.peak_fetching = 0
        fetch = FetchPolicy.fetch_image

        def counted_fetch(policy: FetchPolicy, uri: str, **kw: Any) -> bytes:
            with self.lock:
                self.fetching += 1
                self.peak_fetching = max(self.peak_fetching, self.fetching)
            try:
                data = fetch(policy, uri, **kw)
            finally:
                with self.lock:
                    self.fetching -= 1
            with self.lock:
                self.live += len(data)
                self.peak = max(self.peak, self.live)
            return data

        monkeypatch.setattr(FetchPolicy, "fetch_image", counted_fetch)
        if save_image:  # kept until the write of its chunk
            write = env.write

            async def counted_write(name, uid, records):
                out = await write(name, uid, records)
                with self.lock:
                    self.live -= sum(len(r.frame or b"") for r in records)
                return out

            env.write = counted_write  # type: ignore[method-assign]
        else:  # dropped once decoded
            pixels = ImportRunner._pixels

            def counted_pixels(runner: ImportRunner, data: bytes) -> np.ndarray:
                try:
                    return pixels(runner, data)
                finally:
                    with self.lock:
                        self.live -= len(data)

            monkeypatch.setattr(ImportRunner, "_pixels", counted_pixels)


def fetch_lines(srv: Any, n: int, images: int = 4) -> list[dict]:
    for k in range(images):
        srv.files[f"big{k}.png"] = big_png(k)
    return [{"image_id": f"u{i}", "image_uri": f"{srv.base}/files/big{i % images}.png"} for i in range(n)]


@pytest.mark.parametrize("save_image", [True, False])
def test_fetched_images_stay_inside_the_task_budget(
    env: Env, monkeypatch: pytest.MonkeyPatch, save_image: bool
) -> None:
    """24 lines of ~150 bytes naming 750 KB images, a 4 MiB budget: before, all 24 were read into one
    chunk and fetched at once (18 MB held, the budget counting the images only as they arrived).
    Now each line reserves an image's limit before it joins a chunk."""
    budget = 4 * 1024 * 1024
    held = Held(monkeypatch, env, save_image=save_image)
    with loopback_server() as srv:
        source = env.jsonl(fetch_lines(srv, 24))
        runner = env.runner(
            max_line_bytes=4096,
            max_task_bytes_in_flight=budget,
            max_bytes_in_flight=budget,
            chunk_lines=256,
            chunks_in_flight=3,
            encode_batch_size=8,
        )
        peak = watch_peak(monkeypatch, runner)
        d = asyncio.run(run_task(runner, source, uid=env.uid, save_image=save_image))
    assert (d["state"], d["succeeded"]) == ("SUCCEEDED", 24), d
    assert len(srv.files["big0.png"]) > 750_000
    assert 3 * 750_000 < held.peak <= peak[0] <= budget, (held.peak, peak[0])
    # 4 reservations of 1 MB (with the 4 KB one of a line being read) fit 4 MiB: up to 4 fetches at once
    assert held.peak_fetching <= 4
    assert held.live == 0 and runner._budget.used == 0
    assert len(env.records()) == 24 and all(r[3] == save_image for r in env.records())


def test_two_tasks_fetching_share_the_runners_budget_without_deadlock(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks of 4 MiB each under a runner budget of 6 MiB: a task whose line cannot be covered
    waits for the other's commits (or its own chunks' fetches), and both finish."""
    task_budget, total = 4 * 1024 * 1024, 6 * 1024 * 1024
    held = Held(monkeypatch, env, save_image=True)
    with loopback_server() as srv:
        sources = [env.jsonl(fetch_lines(srv, 16), name=f"src{k}.jsonl") for k in range(2)]
        runner = env.runner(
            max_line_bytes=4096,
            max_task_bytes_in_flight=task_budget,
            max_bytes_in_flight=total,
            max_running_tasks=2,
            chunk_lines=256,
            chunks_in_flight=3,
        )
        peak = watch_peak(monkeypatch, runner)

        async def scenario() -> list[dict]:
            await runner.start()
            try:
                ids = [(await runner.create("lib", env.uid, src, True)).task_id for src in sources]
                return [await wait_done(runner, t, timeout_s=60) for t in ids]
            finally:
                await runner.close()

        results = asyncio.run(scenario())
    for d in results:
        assert (d["state"], d["succeeded"]) == ("SUCCEEDED", 16), d
    assert held.peak <= peak[0] <= total and runner._budget.used == 0


def test_a_line_that_will_not_fetch_gives_its_image_reservation_back_when_read(env: Env) -> None:
    """The reader parses each line as it reads it: only a line that fetches keeps the reservation."""
    runner = env.runner(max_line_bytes=65536, max_task_bytes_in_flight=4 * 1024 * 1024)
    fetching = json.dumps({"image_id": "a", "image_uri": "https://example.com/a.png"}).encode()
    inline = json.dumps(good(1)).encode()
    data = b"\n".join([fetching, inline, b"{not json", b"x" * 70_000, fetching]) + b"\n"
    budget = ByteBudget(4 * 1024 * 1024)
    reader = runner._reader(io.BytesIO(data), budget)
    run = Run("t", budget)
    items, held = runner._read_lines(reader, 10, run)
    kinds = [type(x).__name__ for x in items]
    assert kinds == ["ParsedLine", "ParsedLine", "LineError", "LineError", "ParsedLine"]
    assert items[1].data is not None and items[3].reason.startswith("line is longer than 65536 bytes")
    expected = 2 * (len(fetching) + 1_000_000) + len(inline) + len(b"{not json")
    assert held == budget.used == expected


def test_a_budget_that_cannot_hold_a_line_and_its_image_is_refused(env: Env) -> None:
    with pytest.raises(ValueError, match=r"max_task_bytes_in_flight .* plus limits.max_image_bytes"):
        env.runner(max_line_bytes=4096, max_task_bytes_in_flight=1_000_000 + 4096, image_bytes=1_000_000)
    env.runner(max_line_bytes=4096, max_task_bytes_in_flight=1_000_000 + 4096 + 3, image_bytes=1_000_000)


def test_fetches_in_flight_fill_the_budgets_room_and_no_more(env: Env) -> None:
    """4 MiB, a 1 MB image limit and 4 KB lines: 4 fetches at once (not 1, not the 8 fetch threads)."""
    with loopback_server() as srv:
        source = env.jsonl([{"image_id": f"g{i}", "image_uri": srv.img(i, gated=True)} for i in range(12)])
        runner = env.runner(
            max_line_bytes=4096,
            max_task_bytes_in_flight=4 * 1024 * 1024,
            max_bytes_in_flight=4 * 1024 * 1024,
            chunk_lines=256,
            fetch_threads=8,
        )

        async def scenario() -> tuple[int, dict]:
            await runner.start()
            try:
                task = await runner.create("lib", env.uid, source, True)
                async with asyncio.timeout(30):
                    while sum(srv.hits.values()) < 4:
                        await asyncio.sleep(0.02)
                await asyncio.sleep(0.5)  # a fifth fetch would have started by now
                waiting = sum(srv.hits.values())
                srv.gate.set()
                return waiting, await wait_done(runner, task.task_id)
            finally:
                await runner.close()

        waiting, d = asyncio.run(scenario())
    assert waiting == 4, waiting
    assert (d["state"], d["succeeded"]) == ("SUCCEEDED", 12), d
    assert runner._budget.used == 0


class HeldSource(io.BytesIO):
    """A source that answers its first ``lines`` lines, then holds the next read until ``go`` is set
    (a slow remote source, or a long chunk still being read)."""

    def __init__(self, data: bytes, lines: int) -> None:
        import threading

        super().__init__(data)
        self.lines = lines
        self.held = threading.Event()  # a read is waiting
        self.go = threading.Event()

    def readline(self, size: int | None = -1, /) -> bytes:
        if self.lines == 0:
            self.held.set()
            assert self.go.wait(timeout=60), "the test never released the source"
        self.lines -= 1
        return super().readline(size)

    def close(self) -> None:
        """Kept readable: a read under way when the runner closes the stream may still return lines
        (a network stream's buffered data)."""


def hold_source(monkeypatch: pytest.MonkeyPatch, runner: ImportRunner, lines: int) -> list[HeldSource]:
    """Make the runner's import read (not the count of a local source before it) a HeldSource."""
    held: list[HeldSource] = []
    opens: list[str] = []
    opened = runner._open

    def open_held(source: str, stop: Any = None) -> Any:
        stream = opened(source, stop)
        opens.append(source)
        if len(opens) == 1:  # the count of a local source's records, before the import reads it
            return stream
        held.append(HeldSource(stream.read(), lines=lines))
        stream.close()
        return held[-1]

    monkeypatch.setattr(runner, "_open", open_held)
    return held


async def until_held_and_fetching(held: list[HeldSource], srv: Any, fetches: int) -> None:
    """Wait (30 s at most) until the source is held and ``fetches`` fetches have reached ``srv``."""
    async with asyncio.timeout(30):
        while not held or not held[0].held.is_set() or sum(srv.hits.values()) < fetches:
            await asyncio.sleep(0.02)


def test_lines_are_fetched_while_their_chunk_is_still_being_read(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetches start as lines are read, not when their chunk is handed on (they ran in waves then):
    the source holds its 7th line, and the first 6 lines' fetches are all at the server meanwhile."""
    with loopback_server() as srv:
        source = env.jsonl([{"image_id": f"w{i}", "image_uri": srv.img(i, gated=True)} for i in range(12)])
        runner = env.runner(chunk_lines=256, fetch_threads=8)
        held = hold_source(monkeypatch, runner, lines=6)

        async def scenario() -> tuple[int, dict]:
            await runner.start()
            try:
                task = await runner.create("lib", env.uid, source, True)
                await until_held_and_fetching(held, srv, 6)
                await asyncio.sleep(0.3)  # no seventh fetch while the seventh line is unread
                fetching = sum(srv.hits.values())
                held[0].go.set()
                srv.gate.set()
                return fetching, await wait_done(runner, task.task_id)
            finally:
                for h in held:
                    h.go.set()
                await runner.close()

        fetching, d = asyncio.run(scenario())
    assert fetching == 6, fetching
    assert (d["state"], d["succeeded"]) == ("SUCCEEDED", 12), d
    assert runner._budget.used == 0 and len(env.records()) == 12


def test_cancel_while_a_chunk_fills_stops_its_fetches_and_starts_no_more(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task cancelled while its first chunk is still being read (6 lines fetching, the 7th held):
    it ends CANCELLED with nothing committed and its bytes given back, and the lines its reader's
    thread reads after the cancel (once the source answers again) start no fetch."""
    with loopback_server() as srv:
        source = env.jsonl([{"image_id": f"c{i}", "image_uri": srv.img(i, gated=True)} for i in range(12)])
        runner = env.runner(chunk_lines=256, fetch_threads=8)
        held = hold_source(monkeypatch, runner, lines=6)

        async def scenario() -> tuple[dict, int]:
            await runner.start()
            try:
                task = await runner.create("lib", env.uid, source, True)
                await until_held_and_fetching(held, srv, 6)
                d = await runner.cancel(task.task_id)
                held[0].go.set()  # the reader's thread reads the other 6 lines now
                srv.gate.set()
                await asyncio.sleep(0.5)  # their fetches would have reached the server by now
                return d, sum(srv.hits.values())
            finally:
                for h in held:
                    h.go.set()
                await runner.close()

        d, fetched = asyncio.run(scenario())
    assert (d["state"], d["succeeded"], d["failed"]) == ("CANCELLED", 0, 0), d
    assert fetched == 6, fetched
    assert runner._budget.used == 0 and env.records() == []
