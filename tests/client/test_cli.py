"""The CLI's plain helpers, and its JSONL import through import tasks against a scripted server."""

from __future__ import annotations

import io
import json
from concurrent.futures import Future

import pytest

from image_search_client import cli
from image_search_client.client import PREFIX
from tests.client.conftest import LIBRARY, Script, err, ok


@pytest.mark.parametrize(
    "options, tags",
    [
        ([], {}),
        (
            ["color=red", "size:=3", "sale:=true", "sizes:=[1, 2]", "note=a=b", "empty="],
            {"color": "red", "size": 3, "sale": True, "sizes": [1, 2], "note": "a=b", "empty": ""},
        ),
        (['quoted:="42"'], {"quoted": "42"}),
    ],
)
def test_tag_options(options, tags):
    assert cli.parse_tag_options(options) == tags


@pytest.mark.parametrize("bad", ["novalue", "=x", "n:=not json"])
def test_bad_tag_options(bad):
    with pytest.raises(cli.UsageError, match="--tag"):
        cli.parse_tag_options([bad])


def test_read_lines_numbers_and_problems():
    text = "\n".join(
        [
            json.dumps({"image_id": "a", "image_uri": "u", "tags": {"c": 1}}),
            "",
            "{not json",
            "[1, 2]",
            json.dumps({"image_id": "b", "image_uri": "u", "tag": {}}),
            json.dumps({"image_id": 5, "image_uri": "u"}),
            json.dumps({"image_id": "c", "image_uri": "u", "image_base64": "eA=="}),
        ]
    )
    lines = list(cli.read_lines(io.BytesIO(text.encode())))
    assert [(ln.number, ln.problem is None) for ln in lines] == [
        (1, True),
        (3, False),
        (4, False),
        (5, False),
        (6, False),
        (7, True),
    ]
    problems = {ln.number: ln.problem for ln in lines}
    assert "not valid JSON" in problems[3]
    assert "JSON object" in problems[4]
    assert "unknown field(s) tag" in problems[5]
    assert "image_id" in problems[6]


def test_find_images(tmp_path):
    for rel in ["a.jpg", "b.PNG", "notes.txt", "sub/c.webp", ".hidden/d.jpg", "sub/.e.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(cli.find_images(tmp_path, recursive=False)) == ["a.jpg", "b.PNG"]
    assert names(cli.find_images(tmp_path, recursive=True)) == ["a.jpg", "b.PNG", "sub/c.webp"]


def test_sources(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("")
    assert cli.local_path(str(f)) == f
    assert cli.local_path(f.as_uri()) == f
    assert cli.local_path(str(tmp_path / "missing.jsonl")) is None
    assert cli.local_path("https://example.com/x.jsonl") is None
    assert cli.is_url("s3://bucket/x.jsonl") and not cli.is_url(str(f))


def test_format_table_cuts_long_cells():
    table = cli.format_table(["a", "bb"], [["1", "x" * 10], ["22", "y"]], max_width=5)
    assert table.splitlines() == ["a   bb", "--  -----", "1   xxxx…", "22  y"]


def test_run_bounded_reads_items_lazily_and_reports_each_one():
    consumed: list[int] = []
    outcomes: dict[int, object] = {}
    ahead: list[int] = []  # items read but not yet reported, each time one is reported

    def items():
        for i in range(40):
            consumed.append(i)
            yield i

    def work(i: int) -> int:
        if i == 3:
            raise ValueError("three")
        return i * 10

    def done(i: int, fut: Future) -> None:
        outcomes[i] = fut.exception() or fut.result()
        ahead.append(len(consumed) - len(outcomes))

    cli.run_bounded(items(), work, 2, done)
    assert sorted(outcomes) == list(range(40))
    assert isinstance(outcomes[3], ValueError)
    assert outcomes[7] == 70
    # at most 2 * concurrency in flight, plus the one just read: a huge file is never read ahead
    assert max(ahead) <= 2 * 2 + 1


def write_jsonl(path, n_lines: int) -> None:
    path.write_text(
        "".join(
            json.dumps({"image_id": f"i{k}", "image_uri": f"u{k}", "image_base64": "eA=="}) + "\n"
            for k in range(n_lines)
        )
    )


def test_jsonl_import_follows_the_task(scripted, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, 3)
    task = {"task_id": "t9", "library_name": "lib", "total": 3}
    scripted.replies = [
        ok(LIBRARY),
        ok({"task_id": "t9"}),
        ok({**task, "state": "RUNNING", "succeeded": 1, "failed": 0}),
        ok(
            {
                **task,
                "state": "PARTIALLY_SUCCEEDED",
                "succeeded": 2,
                "failed": 1,
                "errors": [
                    {"line": 2, "image_id": "i1", "image_uri": "u1", "reason": "image_base64: not an image"}
                ],
            }
        ),
    ]
    errors_file = tmp_path / "errors.jsonl"
    code = cli.main(
        [
            "--url",
            scripted.url,
            "import",
            "jsonl",
            "lib",
            str(src),
            "--poll",
            "0.01",
            "--errors",
            str(errors_file),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1  # a failed line makes the exit status non-zero
    assert scripted.received[1]["path"] == PREFIX + "/image/tasks/create"
    assert scripted.received[1]["json"] == {"library_name": "lib", "source": str(src.resolve())}
    assert "task t9: PARTIALLY_SUCCEEDED; imported 2 of 3 images; 1 failed" in out
    assert "line 2" in out and "not an image" in out
    assert [json.loads(x)["where"] for x in errors_file.read_text().splitlines()] == ["line 2"]


def test_jsonl_import_falls_back_when_the_service_cannot_read_the_file(scripted, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, 2)
    added = {"image_id": "i", "image_uri": "u", "created": True}
    scripted.replies = [
        ok(LIBRARY),
        err(400, "INVALID_PARAMETER", "source: not under an allowed root"),
        ok(added),
    ]
    assert cli.main(["--url", scripted.url, "import", "jsonl", "lib", str(src), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "cannot read" in captured.err and "not under an allowed root" in captured.err
    assert "imported 2 of 2 images" in captured.out
    assert sorted(r["json"]["image_id"] for r in scripted.received[2:]) == ["i0", "i1"]


def test_jsonl_import_via_task_does_not_fall_back(scripted, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, 1)
    scripted.replies = [ok(LIBRARY), err(404, "NOT_FOUND", "Not Found")]
    assert cli.main(["--url", scripted.url, "import", "jsonl", "lib", str(src), "--via", "task"]) == 1
    assert "NOT_FOUND (HTTP 404)" in capsys.readouterr().err
    assert len(scripted.received) == 2


def test_remote_source_without_task_routes_is_a_usage_error(scripted, capsys):
    scripted.replies = [ok(LIBRARY), err(404, "NOT_FOUND", "Not Found")]
    assert cli.main(["--url", scripted.url, "import", "jsonl", "lib", "s3://bucket/x.jsonl"]) == 2
    assert "only the service can read" in capsys.readouterr().err


def test_import_cancel_prints_the_cancelled_task(
    scripted: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.replies = [ok({"task_id": "t9", "library_name": "lib", "state": "CANCELLED", "succeeded": 2})]
    assert cli.main(["--url", scripted.url, "import", "cancel", "t9"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "CANCELLED"
    assert (scripted.received[0]["path"], scripted.received[0]["json"]) == (
        PREFIX + "/image/tasks/cancel",
        {"task_id": "t9"},
    )
