"""``image-search-migrate``: copy an embedded store (SQLite and files under a storage root) into cluster
storage (PostgreSQL and an object store), in one command.

Copied: every library with its descriptor unchanged (name, uid, mode, model, created_at, index kind),
and every live record with its vector (bit for bit), tags, URI, vector kind, detection extras, stored
frame and its created_at/updated_at. Not copied: import tasks (finish or cancel them first; their
progress refers to the embedded store) and snapshots (a cluster replica builds the library's index from
its PostgreSQL rows until the cluster Writer writes a snapshot, which it does at the library's first
write after the copy when at least ``snapshot_min_rows`` rows changed).

The copy streams: each library is read through one read transaction of its SQLite store
(``changes_since(0, live_only=True)``, one consistent state), in batches of ``batch_records`` whose
frames are written ``batch_bytes`` at a time, so a library of millions of records never sits in memory.

It is idempotent and resumable. Records are upserts keyed by (image_id, image_uri), and before writing
a batch the copier reads what the target holds for its keys and skips what is already identical; a run
that died midway is finished by running the command again, and running it after a finished copy
writes nothing. A library that exists in the target with the same uid is continued; one of the same
name with another uid (made in the cluster, or copied from another store) is refused before anything
is written, as is a uid the target holds under another name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm

from index.errors import ServiceError
from index.search.changes import Change
from index.storage.backends import ClusterStorage, StorageSettings
from index.storage.cluster.blobs import StorageUnavailable
from index.storage.cluster.pg import DatabaseUnavailable, PgCatalog
from index.storage.cluster.pg.copy import TargetRow, rows_by_key, set_timestamps
from index.storage.embedded.catalog import Catalog, LibraryInfo, shard_dirs
from index.storage.embedded.store import LibraryStore, NewRecord, StoredRecord
from index.storage.schema import SchemaTooNew

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Records read, compared and written together (one upsert transaction, one sequence number).
BATCH_RECORDS = 500
#: The most frame bytes held in memory at once; a batch with more is written in several upserts.
BATCH_BYTES = 64 * MiB

#: Called after each batch is committed, with the library's name and its records handled so far (in the
#: shard being copied, for a sharded library).
BatchCallback = Callable[[str, int], None]


class MigrationRefused(RuntimeError):
    """The target holds libraries that conflict with the source's; nothing was written."""


@dataclass(frozen=True)
class LibraryPlan:
    """What a run does with one library of the source."""

    info: LibraryInfo
    records: int  # live records in the source
    action: str  # "create" (not in the target yet) or "continue" (the same uid is there)


@dataclass
class LibraryResult:
    """What a run did with one library."""

    name: str
    source_records: int
    written: int = 0  # records upserted (new, or different in the target)
    retimed: int = 0  # records whose only difference was created_at/updated_at
    unchanged: int = 0  # records already identical in the target
    missing_frames: int = 0  # records whose frame file is missing in the source (copied without it)
    target_records: int = 0  # live records in the target afterwards


def plan(source: Sequence[LibraryInfo], counts: dict[str, int], target: PgCatalog) -> list[LibraryPlan]:
    """Decide, for each source library, whether it is created or continued in the target.

    Raises:
        MigrationRefused: a name or uid conflicts; the message lists every conflict.
    """
    by_name = {info.name: info for info in target.list()}
    by_uid = {info.uid: info for info in by_name.values()}
    problems, plans = [], []
    for info in source:
        there = by_name.get(info.name)
        if there is None and info.uid in by_uid:
            problems.append(
                f"library {info.name!r} (uid {info.uid}): the target holds that uid as library "
                f"{by_uid[info.uid].name!r}"
            )
        elif there is None:
            plans.append(LibraryPlan(info, counts[info.name], "create"))
        elif there.uid != info.uid:
            problems.append(
                f"library {info.name!r}: the target has a library of that name with uid {there.uid}, not "
                f"the source's {info.uid}, so it was not copied from this store (made in the cluster, or "
                "deleted and created again); delete it there, or leave this library out with --library"
            )
        elif there != info:
            changed = sorted(k for k, v in vars(info).items() if vars(there).get(k) != v)
            problems.append(
                f"library {info.name!r} (uid {info.uid}): the target's descriptor differs in "
                f"{', '.join(changed)}"
            )
        else:
            plans.append(LibraryPlan(info, counts[info.name], "continue"))
    if problems:
        raise MigrationRefused("refused, nothing was written:\n  " + "\n  ".join(problems))
    return plans


def copy_library(
    source: LibraryStore,
    storage: ClusterStorage,
    info: LibraryInfo,
    *,
    batch_records: int = BATCH_RECORDS,
    batch_bytes: int = BATCH_BYTES,
    progress: Callable[[int], object] = lambda n: None,
    on_batch: BatchCallback | None = None,
    shard: int = 0,
    result: LibraryResult | None = None,
) -> LibraryResult:
    """Copy the live records of one shard of a library into the same shard of the target's library of
    the same uid (which exists); a 1-shard library has only shard 0.

    Args:
        source: the shard's SQLite store.
        storage: the target.
        info: the library.
        shard: the shard (records keep their shard: the routing is the same function everywhere).
        result: the library's result so far, added to (a sharded library is copied shard by shard).
        batch_records, batch_bytes: see :data:`BATCH_RECORDS`, :data:`BATCH_BYTES`.
        progress: called with the number of records each batch handled (a tqdm bar's ``update``).
        on_batch: called after each batch is committed (tests use it to interrupt a run).
    """
    if result is None:
        result = LibraryResult(info.name, 0)
    result.source_records += source.count()
    # closing(): an interrupted copy ends the source's read transaction at once, not when collected
    # (changes_since is a generator; its annotation says only Iterator)
    rows = cast(Generator[Change, None, None], source.changes_since(0, live_only=True))
    with closing(storage.library(info, shard).open_store(False)) as target, closing(rows) as changes:
        done = 0
        for batch in _batches(changes, batch_records):
            records = source.fetch([c.row_id for c in batch])
            pairs = [(c, records[c.row_id]) for c in batch if c.row_id in records]
            there = rows_by_key(storage.db, info.uid, [(r.image_id, r.image_uri) for _, r in pairs])
            upserts: list[tuple[Change, StoredRecord]] = []
            stamps: list[tuple[str, str, float, float]] = []
            for change, record in pairs:
                row = there.get((record.image_id, record.image_uri))
                if row is None or not _same_content(row, change, record):
                    upserts.append((change, record))
                elif (row.created_at, row.updated_at) != (record.created_at, record.updated_at):
                    result.retimed += 1
                else:
                    result.unchanged += 1
                    continue
                stamps.append((record.image_id, record.image_uri, record.created_at, record.updated_at))
            for chunk in _frame_chunks(source, upserts, batch_bytes, result):
                target.upsert(chunk)
                result.written += len(chunk)
            set_timestamps(storage.db, info.uid, stamps, shard=shard)
            done += len(batch)
            progress(len(batch))
            if on_batch is not None:
                on_batch(info.name, done)
        result.target_records += target.count()
    return result


def migrate(
    source_root: str | Path,
    settings: StorageSettings,
    *,
    libraries: Sequence[str] = (),
    dry_run: bool = False,
    max_libraries: int = 1000,
    batch_records: int = BATCH_RECORDS,
    batch_bytes: int = BATCH_BYTES,
    show_progress: bool = False,
    on_batch: BatchCallback | None = None,
    out: Callable[[str], object] = print,
) -> list[LibraryResult]:
    """Copy the embedded store at ``source_root`` into the cluster storage ``settings`` describe.

    Args:
        libraries: the names to copy (default: every library of the source).
        dry_run: print the plan and stop (the target's schema is still brought up to date, as any
            deployment opening it would, but no library or record is written).
        max_libraries: the target deployment's ``limits.max_libraries``.
    Returns:
        What was done per library (empty on a dry run).
    Raises:
        FileNotFoundError: ``source_root`` holds no embedded store, or a named library is not in it.
        MigrationRefused: the target holds conflicting libraries; nothing was written.
        DatabaseUnavailable, StorageUnavailable, SchemaTooNew, ValueError: the target cannot be used.
    """
    root = Path(source_root)
    if not (root / "libraries").is_dir():
        raise FileNotFoundError(f"--from {root}: no embedded store there (it has no libraries/ directory)")
    catalog = Catalog(root, max_libraries=max(max_libraries, 1))
    infos = catalog.list()
    if libraries:
        unknown = sorted(set(libraries) - {i.name for i in infos})
        if unknown:
            raise FileNotFoundError(f"--library: not in the source store {root}: {', '.join(unknown)}")
        infos = [i for i in infos if i.name in set(libraries)]
    counts = {}
    for info in infos:
        counts[info.name] = 0
        for shard_dir in shard_dirs(catalog.library_dir(info.name), info.shards):
            with LibraryStore(shard_dir, readonly=True) as store:
                counts[info.name] += store.count()

    storage = ClusterStorage(settings, max_libraries=max_libraries)
    try:
        target = storage.catalog
        assert isinstance(target, PgCatalog)  # ClusterStorage's catalog, always
        plans = plan(infos, counts, target)
        for p in plans:
            in_target = 0
            if p.action == "continue":
                for data in storage.shards(p.info):
                    with closing(data.open_store(True)) as there:
                        in_target += there.count()
            out(_describe_plan(p, in_target))
        if dry_run:
            out(f"dry run: {len(plans)} libraries, {sum(p.records for p in plans)} records; nothing written")
            return []
        results = []
        for p in plans:
            if p.action == "create":
                target.add_existing(p.info)
            result = LibraryResult(p.info.name, 0)
            with tqdm(
                total=p.records, desc=p.info.name, unit="img", disable=not show_progress, file=sys.stderr
            ) as bar:
                for shard, shard_dir in enumerate(
                    shard_dirs(catalog.library_dir(p.info.name), p.info.shards)
                ):
                    with LibraryStore(shard_dir, readonly=True) as source:
                        copy_library(
                            source,
                            storage,
                            p.info,
                            batch_records=batch_records,
                            batch_bytes=batch_bytes,
                            progress=bar.update,
                            on_batch=on_batch,
                            shard=shard,
                            result=result,
                        )
            out(_describe_result(result))
            results.append(result)
        return results
    finally:
        storage.close()


# -- the command ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="image-search-migrate",
        description="Copy an embedded image-search store (SQLite + files under a storage_root) into "
        "cluster storage (PostgreSQL + an object store). Copies every library (same name, uid, mode, "
        "model, created_at, index kind) and every live record with its vector, tags, URI, detection "
        "extras, stored frame and timestamps. Safe to re-run: a run that stopped midway is finished by "
        "running it again, and a finished copy re-run writes nothing.",
        epilog="Not copied: import tasks (finish or cancel them before migrating) and FAISS snapshots (in "
        "cluster mode the Writer writes one to the object store at a library's first write after the "
        "copy; until then index replicas build the index from the library's PostgreSQL rows). Stop the "
        "embedded service first: changes made to it during or after the copy are not carried over "
        "unless the command is run again, and deletes never are. "
        "docs/operations.md: 'Running on a Ray cluster'.",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="STORAGE_ROOT",
        help="the embedded store's storage_root (e.g. ./data)",
    )
    p.add_argument(
        "--database-url",
        required=True,
        help="postgresql://user@host:5432/db (keep the password out of it: see below)",
    )
    pw = p.add_mutually_exclusive_group()
    pw.add_argument("--database-password-file", help="file holding the database password")
    pw.add_argument(
        "--database-password-env", metavar="VAR", help="environment variable holding the database password"
    )
    p.add_argument("--database-connect-timeout-s", type=float, default=10.0, metavar="S")
    p.add_argument(
        "--object-store-url",
        required=True,
        help="fsspec URL of snapshots and frames: s3://bucket/prefix, gs://..., az://...",
    )
    p.add_argument(
        "--object-store-options",
        type=_json_object,
        default={},
        metavar="JSON",
        help='fsspec options as a JSON object, e.g. \'{"endpoint_url": "http://minio:9000"}\'; '
        "credentials come from the environment as fsspec finds them",
    )
    p.add_argument(
        "--library",
        action="append",
        default=[],
        metavar="NAME",
        help="copy only this library (repeatable; default: all)",
    )
    p.add_argument(
        "--max-libraries",
        type=int,
        default=1000,
        help="the cluster deployment's limits.max_libraries (default 1000)",
    )
    p.add_argument("--batch-size", type=int, default=BATCH_RECORDS, help="records per transaction")
    p.add_argument("--dry-run", action="store_true", help="list what would be copied and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 1 refused or failed, 2 bad arguments)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        parser().error("--batch-size must be at least 1")
    try:
        settings = StorageSettings(
            database_url=args.database_url,
            database_password_file=args.database_password_file,
            database_password_env=args.database_password_env,
            database_connect_timeout_s=args.database_connect_timeout_s,
            database_pool_size=2,
            object_store_url=args.object_store_url,
            object_store_options=args.object_store_options,
        )
        migrate(
            args.source,
            settings,
            libraries=args.library,
            dry_run=args.dry_run,
            max_libraries=args.max_libraries,
            batch_records=args.batch_size,
            show_progress=not args.no_progress,
        )
    except (
        MigrationRefused,
        DatabaseUnavailable,
        StorageUnavailable,
        SchemaTooNew,
        ServiceError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"image-search-migrate: {exc}", file=sys.stderr)
        return 1
    return 0


# -- internals -----------------------------------------------------------------------------------


def _batches(changes: Iterable[Change], size: int) -> Iterator[list[Change]]:
    batch: list[Change] = []
    for change in changes:
        batch.append(change)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _same_content(row: TargetRow, change: Change, record: StoredRecord) -> bool:
    """Whether the target's row already holds the source record (timestamps aside)."""
    assert change.vector is not None  # live rows carry their vector
    return (
        not row.deleted
        and row.vector == change.vector.tobytes()
        and row.vector_kind == record.vector_kind
        and row.tags == record.tags
        and row.extra == record.extra
        and row.frame == record.frame
    )


def _frame_chunks(
    source: LibraryStore,
    upserts: Sequence[tuple[Change, StoredRecord]],
    batch_bytes: int,
    result: LibraryResult,
) -> Iterator[list[NewRecord]]:
    """The records to write, with their frames read from the source, in chunks of at most
    ``batch_bytes`` of frames (at least one record each)."""
    chunk: list[NewRecord] = []
    size = 0
    for change, record in upserts:
        frame = source.read_frame(record.frame) if record.frame is not None else None
        if record.frame is not None and frame is None:
            result.missing_frames += 1
            logger.warning(
                "library %s: the frame of image_id %r (uri %r) is missing in the source; copied without it",
                result.name,
                record.image_id,
                record.image_uri,
            )
        if chunk and size + len(frame or b"") > batch_bytes:
            yield chunk
            chunk, size = [], 0
        assert change.vector is not None
        chunk.append(
            NewRecord(
                image_id=record.image_id,
                image_uri=record.image_uri,
                vector=change.vector,
                tags=record.tags,
                vector_kind=record.vector_kind,
                frame=frame,
                extra=record.extra,
            )
        )
        size += len(frame or b"")
    if chunk:
        yield chunk


def _describe_plan(p: LibraryPlan, in_target: int) -> str:
    what = "create" if p.action == "create" else f"continue (the target holds {in_target} of its records)"
    return (
        f"{p.info.name}: {p.records} records, mode {p.info.mode}, model {p.info.model_identity}, "
        f"uid {p.info.uid}: {what}"
    )


def _describe_result(r: LibraryResult) -> str:
    line = (
        f"{r.name}: {r.written} records written, {r.retimed} timestamps restored, {r.unchanged} already "
        f"there; the target holds {r.target_records} live records, the source {r.source_records}"
    )
    if r.missing_frames:
        line += f"; {r.missing_frames} frames were missing in the source (copied without them)"
    if r.target_records != r.source_records:
        line += (
            " (they differ: records were added or deleted in the source during the copy, or in the target "
            "through the cluster service; run again to copy additions, deletes are not carried over)"
        )
    return line


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


if __name__ == "__main__":
    sys.exit(main())
