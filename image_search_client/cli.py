"""``image-search``: the command-line tool of the image-search service.

    image-search library create shop_a_tops
    image-search import folder shop_a_tops ./photos --recursive --tag season=summer
    image-search import jsonl shop_a_tops images.jsonl
    image-search search text shop_a_tops "a white T-shirt" --top-k 5
    image-search search image shop_a_tops query.jpg --filter '{"field": "color", "op": "=", "value": "red"}'

``--url`` / ``IMAGE_SEARCH_URL`` and ``--api-key`` / ``IMAGE_SEARCH_API_KEY`` say which service to talk
to. Exit status: 0 on success, 1 when the service answered an error or any image of an import failed,
2 for a usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import requests
from tqdm import tqdm

from image_search_client.client import (
    DEFAULT_URL,
    ImageSearchClient,
    ImageSearchError,
    ImportTask,
    InvalidParameterError,
    RouteNotFoundError,
    SearchResult,
)

#: File extensions ``import folder`` picks up (the formats the service decodes).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
#: Failures listed in an import summary; ``--errors FILE`` writes all of them.
SHOWN_FAILURES = 20
#: Fields of a JSONL import line (the same as the service's import tasks accept).
JSONL_FIELDS = frozenset({"image_id", "image_uri", "image_base64", "tags"})

T = TypeVar("T")


class UsageError(Exception):
    """A bad command line value found after parsing (exit status 2)."""


# -- import bookkeeping ------------------------------------------------------------------------------


@dataclass
class Failure:
    """One image that could not be imported."""

    where: str  # the file, or "line N"
    image_id: str | None
    reason: str


@dataclass
class ImportSummary:
    """Counts and failures of an import done from here."""

    total: int = 0
    succeeded: int = 0
    created: int = 0
    failures: list[Failure] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed image."""
    if isinstance(exc, ImageSearchError):
        return f"{exc.status}: {exc.message}"
    if isinstance(exc, requests.RequestException):
        return f"request failed: {exc}"
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def run_bounded(
    items: Iterable[T], work: Callable[[T], Any], concurrency: int, done: Callable[[T, Future[Any]], None]
) -> None:
    """Run ``work`` over ``items`` on ``concurrency`` threads, at most ``2 * concurrency`` in flight.

    ``items`` is consumed lazily, so a JSONL file of millions of lines is never held in memory at once.
    ``done`` is called on this thread for each finished item.
    """
    pending: dict[Future[Any], T] = {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        try:
            for item in items:
                if len(pending) >= 2 * concurrency:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        done(pending.pop(fut), fut)
                pending[pool.submit(work, item)] = item
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(pending.pop(fut), fut)
        except BaseException:
            # Interrupted: drop what has not started instead of finishing the whole queue.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def print_summary(summary: ImportSummary, errors_file: str | None, out: IO[str]) -> None:
    """The outcome of an import from here: counts, then the first failures as a table."""
    print(
        f"imported {summary.succeeded} of {summary.total} images "
        f"({summary.created} new, {summary.succeeded - summary.created} overwritten); "
        f"{summary.failed} failed",
        file=out,
    )
    print_failures(summary.failures, errors_file, out)


def print_failures(failures: list[Failure], errors_file: str | None, out: IO[str]) -> None:
    """The first failures as a table; all of them to ``errors_file`` (JSON lines) when given."""
    if failures:
        rows = [[f.where, f.image_id or "", f.reason] for f in failures[:SHOWN_FAILURES]]
        print(format_table(["where", "image_id", "reason"], rows, max_width=100), file=out)
        if len(failures) > SHOWN_FAILURES and not errors_file:
            print(f"... and {len(failures) - SHOWN_FAILURES} more (--errors FILE lists them all)", file=out)
    if errors_file:
        with open(errors_file, "w", encoding="utf-8") as f:
            for fail in failures:
                f.write(json.dumps({"where": fail.where, "image_id": fail.image_id, "reason": fail.reason}))
                f.write("\n")
        print(f"{len(failures)} failures written to {errors_file}", file=out)


# -- import folder -----------------------------------------------------------------------------------


def parse_tag_options(options: list[str]) -> dict[str, Any]:
    """``key=value`` (a string) and ``key:=json`` (a JSON value: number, boolean, list) pairs."""
    tags: dict[str, Any] = {}
    for opt in options:
        key, sep, value = opt.partition(":=")
        if sep and "=" not in key:
            try:
                tags[key] = json.loads(value)
            except ValueError as exc:
                raise UsageError(f"--tag {opt!r}: the value after ':=' is not JSON ({exc})") from None
            continue
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {opt!r}: expected key=value (a string) or key:=json")
        tags[key] = value
    return tags


def find_images(folder: Path, recursive: bool) -> list[Path]:
    """Image files under ``folder`` (by extension), sorted, hidden files and folders skipped."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in candidates
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def import_folder(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    """``import folder``: every image file with ``/image/add``, concurrently; returns the exit status."""
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    base_tags = parse_tag_options(args.tag)
    client.get_library(args.library)  # fail fast (404, 401) before reading any file
    files = find_images(folder, args.recursive)
    summary = ImportSummary(total=len(files))
    if not files:
        print(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}", file=out)
        return 1

    def add(path: Path) -> bool:
        rel = path.relative_to(folder).as_posix()
        uri = args.uri_prefix + quote(rel) if args.uri_prefix else path.resolve().as_uri()
        tags = dict(base_tags)
        if args.dir_tag and path.parent != folder:
            tags[args.dir_tag] = path.parent.relative_to(folder).as_posix()
        return client.add_image(
            args.library, rel, uri, image=path, tags=tags, save_image=not args.no_save_image
        ).created

    with tqdm(total=len(files), unit="img", desc="import", disable=args.quiet, file=sys.stderr) as bar:

        def done(path: Path, fut: Future[Any]) -> None:
            exc = fut.exception()
            if exc is None:
                summary.succeeded += 1
                summary.created += bool(fut.result())
            else:
                rel = path.relative_to(folder).as_posix()
                summary.failures.append(Failure(rel, rel, describe_error(exc)))
            bar.update(1)
            bar.set_postfix(failed=summary.failed, refresh=False)

        run_bounded(files, add, args.concurrency, done)
    print_summary(summary, args.errors, out)
    return 1 if summary.failures else 0


# -- import jsonl ------------------------------------------------------------------------------------


def is_url(source: str) -> bool:
    """Whether ``source`` is a URI with a scheme (``http://``, ``s3://`` ...) rather than a local path."""
    scheme = urlsplit(source).scheme
    return len(scheme) > 1  # "C:\\..." on Windows has a one-letter scheme


def local_path(source: str) -> Path | None:
    """The local file ``source`` names (a path or a ``file://`` URI), if it is one that exists."""
    if is_url(source):
        parts = urlsplit(source)
        if parts.scheme != "file":
            return None
        path = Path(unquote(parts.path))
    else:
        path = Path(source)
    return path if path.is_file() else None


def import_jsonl(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    """``import jsonl``: through an import task when the service can, else line by line from here."""
    client.get_library(args.library)  # fail fast (404, 401)
    local = local_path(args.source)
    if not is_url(args.source) and local is None:
        raise UsageError(f"{args.source}: no such file")
    save_image = False if args.no_save_image else None
    if args.via in ("auto", "task"):
        # The service reads the source itself: give it an absolute path for a local file.
        source = str(local.resolve()) if local is not None and not is_url(args.source) else args.source
        try:
            task_id = client.create_import_task(args.library, source, save_image=save_image)
        except RouteNotFoundError:
            if args.via == "task":
                raise
            print("this service has no import tasks: importing line by line from here", file=sys.stderr)
        except InvalidParameterError as exc:
            if args.via == "task" or local is None:
                raise
            print(
                f"the service cannot read {source} itself ({exc.message}): importing line by line from here",
                file=sys.stderr,
            )
        else:
            return follow_task(client, task_id, args, out)
    return import_jsonl_here(client, args, local, out)


def follow_task(client: ImageSearchClient, task_id: str, args: argparse.Namespace, out: IO[str]) -> int:
    """Show a running import task's progress until it finishes, then its summary."""
    print(f"import task {task_id} started", file=sys.stderr)
    with tqdm(unit="img", desc="import", disable=args.quiet, file=sys.stderr) as bar:

        def progress(task: ImportTask) -> None:
            if task.total is not None and bar.total != task.total:
                bar.total = task.total
            bar.n = task.succeeded + task.failed
            bar.set_postfix(state=task.state, failed=task.failed, refresh=False)
            bar.refresh()

        task = client.wait_for_import_task(task_id, poll_interval=args.poll, on_progress=progress)
    total = task.total if task.total is not None else task.succeeded + task.failed
    print(
        f"task {task.task_id}: {task.state}; imported {task.succeeded} of {total} images; "
        f"{task.failed} failed",
        file=out,
    )
    failures = [
        Failure(f"line {e.line}" if e.line is not None else "", e.image_id, e.reason) for e in task.errors
    ]
    print_failures(failures, args.errors, out)
    if task.failed > len(failures):
        print(f"({task.failed - len(failures)} more failures not listed by the service)", file=out)
    return 0 if task.state == "SUCCEEDED" else 1


@dataclass
class Line:
    """One non-blank line of a JSONL file: its record, or why it cannot be imported."""

    number: int
    record: dict[str, Any]
    problem: str | None = None


def read_lines(stream: IO[bytes]) -> Iterator[Line]:
    """The JSONL file's records, numbered from 1; blank lines are skipped, bad ones carry a problem."""
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            yield Line(number, {}, f"not valid JSON ({exc})")
            continue
        if not isinstance(record, dict):
            yield Line(number, {}, "a line must be a JSON object")
            continue
        unknown = sorted(set(record) - JSONL_FIELDS)
        if unknown:
            yield Line(
                number, record, f"unknown field(s) {', '.join(unknown)}; expected {sorted(JSONL_FIELDS)}"
            )
            continue
        missing = [k for k in ("image_id", "image_uri") if not isinstance(record.get(k), str)]
        if missing:
            yield Line(number, record, f"{' and '.join(missing)} missing or not a string")
            continue
        yield Line(number, record)


def open_source(source: str, local: Path | None, timeout: float) -> IO[bytes]:
    """A local file, or an http(s) source downloaded to a temporary file first."""
    if local is not None:
        return open(local, "rb")
    if urlsplit(source).scheme not in ("http", "https"):
        raise UsageError(
            f"{source}: only the service can read this kind of URI; it needs the import-task routes "
            "(use a local file or an http(s):// URL to import from here)"
        )
    tmp = tempfile.TemporaryFile()  # noqa: SIM115 (handed to the caller, who closes it)
    try:
        with requests.get(source, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                tmp.write(chunk)
    except BaseException:
        tmp.close()
        raise
    tmp.seek(0)
    return tmp


def import_jsonl_here(
    client: ImageSearchClient, args: argparse.Namespace, local: Path | None, out: IO[str]
) -> int:
    """Import a JSONL file line by line with ``/image/add`` (the service has no import tasks)."""
    summary = ImportSummary()
    timeout = client.timeout if isinstance(client.timeout, (int, float)) else client.timeout[1]
    with open_source(args.source, local, timeout) as stream:
        total = sum(1 for raw in stream if raw.strip())
        stream.seek(0)
        summary.total = total

        def add(line: Line) -> bool:
            if line.problem is not None:
                raise ValueError(line.problem)
            rec = line.record
            return client.add_image(
                args.library,
                rec["image_id"],
                rec["image_uri"],
                image_base64=rec.get("image_base64"),
                tags=rec.get("tags") or {},
                save_image=not args.no_save_image,
            ).created

        with tqdm(total=total, unit="img", desc="import", disable=args.quiet, file=sys.stderr) as bar:

            def done(line: Line, fut: Future[Any]) -> None:
                exc = fut.exception()
                if exc is None:
                    summary.succeeded += 1
                    summary.created += bool(fut.result())
                else:
                    image_id = line.record.get("image_id")
                    reason = str(exc) if isinstance(exc, ValueError) and line.problem else describe_error(exc)
                    summary.failures.append(
                        Failure(
                            f"line {line.number}", image_id if isinstance(image_id, str) else None, reason
                        )
                    )
                bar.update(1)
                bar.set_postfix(failed=summary.failed, refresh=False)

            run_bounded(read_lines(stream), add, args.concurrency, done)
    summary.failures.sort(key=lambda f: int(f.where.split()[1]))
    print_summary(summary, args.errors, out)
    return 1 if summary.failures else 0


# -- output ------------------------------------------------------------------------------------------


def format_table(header: list[str], rows: list[list[str]], max_width: int = 60) -> str:
    """A plain text table, cells cut to ``max_width`` characters."""

    def cut(cell: str) -> str:
        cell = cell.replace("\n", " ")
        return cell if len(cell) <= max_width else cell[: max_width - 1] + "…"

    cells = [[cut(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_results(results: list[SearchResult], as_json: bool, out: IO[str]) -> None:
    """Search results as a table (rank, score, id, uri, tags), or as JSON without the frames."""
    if as_json:
        dumped = [r.model_dump(exclude={"image_base64"}) for r in results]
        print(json.dumps(dumped, ensure_ascii=False, indent=2), file=out)
        return
    if not results:
        print("no results", file=out)
        return
    rows = [
        [str(i), f"{r.score:.4f}", r.image_id, r.image_uri, json.dumps(r.tags, ensure_ascii=False)]
        for i, r in enumerate(results, start=1)
    ]
    print(format_table(["#", "score", "image_id", "image_uri", "tags"], rows), file=out)


def parse_filter_option(value: str | None) -> Any:
    """``--filter``: JSON text, or ``@path`` of a file holding it."""
    if value is None:
        return None
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--filter is not valid JSON ({exc})") from None


# -- commands ----------------------------------------------------------------------------------------


def _cmd_health(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    print(json.dumps(client.health().model_dump(), indent=2), file=out)
    return 0


def _cmd_library_create(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    lib = client.create_library(
        args.name, args.mode, args.description, index_kind=args.index_kind, shards=args.shards
    )
    shards = f", {lib.shards} shards" if lib.shards > 1 else ""
    print(f"created library {lib.library_name} ({lib.mode}, model {lib.model.name}{shards})", file=out)
    return 0


def _cmd_library_list(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    libs = client.list_libraries()
    if args.json:
        print(json.dumps([lib.model_dump() for lib in libs], indent=2), file=out)
    elif not libs:
        print("no libraries", file=out)
    else:
        rows = [
            [
                lib.library_name,
                lib.mode,
                str(lib.image_count),
                lib.model.name,
                lib.created_at,
                lib.description or "",
            ]
            for lib in libs
        ]
        print(
            format_table(["library", "mode", "images", "model", "created_at", "description"], rows), file=out
        )
    return 0


def _cmd_library_get(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    print(json.dumps(client.get_library(args.name).model_dump(), indent=2), file=out)
    return 0


def _cmd_library_delete(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    if not args.yes:
        lib = client.get_library(args.name)
        if not sys.stdin.isatty():
            raise UsageError(f"deleting library {args.name} needs --yes (no terminal to ask on)")
        answer = input(f"delete library {args.name} and its {lib.image_count} images? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=out)
            return 1
    client.delete_library(args.name)
    print(f"deleted library {args.name}", file=out)
    return 0


def _cmd_task_status(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    print(json.dumps(client.get_import_task(args.task_id).model_dump(), indent=2), file=out)
    return 0


def _cmd_task_cancel(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    print(json.dumps(client.cancel_import_task(args.task_id).model_dump(), indent=2), file=out)
    return 0


def _search_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "top_k": args.top_k,
        "tag_filter": parse_filter_option(args.filter),
        "min_score": args.min_score,
        "return_frame": False,  # the table shows no pictures: keep the answer small
    }


def _cmd_search_text(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    print_results(client.search_by_text(args.library, args.query, **_search_kwargs(args)), args.json, out)
    return 0


def _cmd_search_image(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    print_results(client.search_by_image(args.library, path, **_search_kwargs(args)), args.json, out)
    return 0


def _cmd_search_id(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    results = client.search_by_id(args.library, args.image_id, args.uri, **_search_kwargs(args))
    print_results(results, args.json, out)
    return 0


def _cmd_image_get(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    records = client.get_images(args.library, args.image_id, args.uri)
    print(json.dumps([r.model_dump(exclude={"image_base64"}) for r in records], indent=2), file=out)
    return 0


def _cmd_image_delete(client: ImageSearchClient, args: argparse.Namespace, out: IO[str]) -> int:
    n = client.delete_image(args.library, args.image_id, args.uri)
    print(f"deleted {n} image{'s' if n != 1 else ''}", file=out)
    return 0


# -- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``image-search`` argument parser (each sub-command sets ``func``)."""
    parser = argparse.ArgumentParser(
        prog="image-search", description="Command-line client of the image-search service."
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("IMAGE_SEARCH_URL", DEFAULT_URL),
        help="the service's root URL (env IMAGE_SEARCH_URL; default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IMAGE_SEARCH_API_KEY"),
        help="API key sent as 'Authorization: Bearer' (env IMAGE_SEARCH_API_KEY)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request (default %(default)s)"
    )
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = groups.add_parser("health", help="is the service ready; its model and device")
    p.set_defaults(func=_cmd_health)

    lib = groups.add_parser("library", help="create, list, show, delete libraries").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = lib.add_parser("create", help="create a library")
    p.add_argument("name")
    p.add_argument(
        "--mode", default="general_search", choices=["general_search", "item_search", "adaptive_search"]
    )
    p.add_argument("--description")
    p.add_argument("--index-kind", choices=["auto", "flat", "hnsw", "ivfpq"], help="default: auto (by size)")
    p.add_argument("--shards", type=int, help="split the library by image id over this many shards")
    p.set_defaults(func=_cmd_library_create)
    p = lib.add_parser("list", help="list the libraries")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_library_list)
    p = lib.add_parser("get", help="show one library")
    p.add_argument("name")
    p.set_defaults(func=_cmd_library_get)
    p = lib.add_parser("delete", help="delete a library and everything in it")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=_cmd_library_delete)

    imp = groups.add_parser("import", help="import a folder of images or a JSONL file").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-save-image", action="store_true", help="do not keep the images' bytes")
    common.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight (default 4)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_argument("--errors", metavar="FILE", help="write every failure to FILE (JSON lines)")
    p = imp.add_parser(
        "folder",
        parents=[common],
        help="add every image file of a folder",
        description="Add every image file of FOLDER with /image/add. image_id is the file's path relative to "
        "FOLDER; image_uri is its file:// URI, or --uri-prefix followed by the relative path.",
    )
    p.add_argument("library")
    p.add_argument("folder")
    p.add_argument("--recursive", "-r", action="store_true", help="include sub-folders")
    p.add_argument(
        "--uri-prefix", help="image_uri = PREFIX + relative path (e.g. https://cdn.example.com/img/)"
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tag every image: key=value (a string) or key:=json (number, boolean, list); repeatable",
    )
    p.add_argument("--dir-tag", metavar="KEY", help="tag each image with its sub-folder's relative path")
    p.set_defaults(func=import_folder)
    p = imp.add_parser(
        "jsonl",
        parents=[common],
        help="import a JSONL file (one {image_id, image_uri, image_base64?, tags?} per line)",
        description="Import a JSONL file. --via auto (default) starts a server-side import task and follows "
        "it; when the service has no import tasks, or cannot read a local file, the lines are added one by "
        "one from here. --via task / --via client force one way.",
    )
    p.add_argument("library")
    p.add_argument("source", help="a local file, or a URI the service can read (http(s)://, s3://, ...)")
    p.add_argument("--via", choices=["auto", "task", "client"], default="auto")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between task status polls")
    p.set_defaults(func=import_jsonl)
    p = imp.add_parser("status", help="show an import task")
    p.add_argument("task_id")
    p.set_defaults(func=_cmd_task_status)
    p = imp.add_parser("cancel", help="cancel a pending or running import task")
    p.add_argument("task_id")
    p.set_defaults(func=_cmd_task_cancel)

    search = groups.add_parser("search", help="search a library by text, image file or stored image")
    kinds = search.add_subparsers(dest="action", required=True, metavar="KIND")
    sc = argparse.ArgumentParser(add_help=False)
    sc.add_argument("--top-k", type=_positive_int, default=10)
    sc.add_argument("--filter", metavar="JSON", help="a tag_filter as JSON, or @FILE holding it")
    sc.add_argument("--min-score", type=float)
    sc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = kinds.add_parser("text", parents=[sc], help="search by text (general_search libraries)")
    p.add_argument("library")
    p.add_argument("query")
    p.set_defaults(func=_cmd_search_text)
    p = kinds.add_parser("image", parents=[sc], help="search by an image file")
    p.add_argument("library")
    p.add_argument("file")
    p.set_defaults(func=_cmd_search_image)
    p = kinds.add_parser("id", parents=[sc], help="search with a stored image's vector")
    p.add_argument("library")
    p.add_argument("image_id")
    p.add_argument("--uri", help="which image_uri of the id (default: its first)")
    p.set_defaults(func=_cmd_search_id)

    img = groups.add_parser("image", help="show or delete stored images").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = img.add_parser("get", help="show an image id's records (tags, uris)")
    p.add_argument("library")
    p.add_argument("image_id")
    p.add_argument("--uri")
    p.set_defaults(func=_cmd_image_get)
    p = img.add_parser("delete", help="delete an image id (every uri, or --uri)")
    p.add_argument("library")
    p.add_argument("image_id")
    p.add_argument("--uri")
    p.set_defaults(func=_cmd_image_delete)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None, out: IO[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    client = ImageSearchClient(args.url, args.api_key, timeout=args.timeout)
    try:
        return int(args.func(client, args, out))
    except UsageError as exc:
        print(f"image-search: error: {exc}", file=sys.stderr)
        return 2
    except ImageSearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except requests.ConnectionError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
