"""The records of one library in PostgreSQL: the same interface as
``index.storage.embedded.store.LibraryStore``.

Sequence numbers are per shard (``index.search.sharding``; a 1-shard library has only shard 0). Every mutation
runs in one transaction that first locks the shard's row (shard 0: the library's row in ``libraries``, as
before shards existed; shard k >= 1: its row in ``library_shards``) with ``SELECT ... FOR UPDATE``,
stamps every row it touches with ``last_seq + 1`` and stores that as the new ``last_seq``. The lock is
held until the commit, so two writers (say, an old Writer still alive during a failover and its
replacement) queue on it: seqs follow commit order, and a transaction
that rolls back takes its number with it, so none is skipped. The database is the fence; nothing
outside it is needed.

Readers catch up over the connection: ``last_seq()`` then ``changes_since(applied)``, in a
``REPEATABLE READ`` transaction streamed through a server-side cursor. Because ``last_seq`` and the rows
it stamps commit together, a reader that saw ``last_seq = n`` finds every row up to ``n``.

Deletes leave tombstones (``deleted = true``, no vector, a new seq), as in SQLite.

Frames (stored original images) are objects ``frames/<sha256>`` of the shard's
:class:`~index.storage.cluster.blobs.BlobStore` (content-addressed, per shard: ``libraries/<uid>/`` for a
1-shard library, ``libraries/<uid>/shards/<k>/`` otherwise, so that only one shard's records can name a frame
object and the shard's row lock alone orders them with the records):

- an upsert uploads its frames *inside* its transaction, after taking the lock and before the records
  that name them are written; a crash or rollback before the commit leaves only unreferenced objects;
- frames that a commit left unnamed (overwritten or deleted records) are deleted *after* that commit, in
  a second transaction that takes the lock again and deletes only those that no live record names then.
  Deleting inside the first transaction would lose a frame still named if its commit then failed;
  deleting after the commit without the lock would race an upsert that names the frame again. A crash
  between the two leaves unreferenced objects, never a record without its frame.

Deleting a library deletes its row (and records) in PostgreSQL; its blobs are the caller's to delete
afterwards (``library_blobs(root, uid).delete_prefix("")``, `index.storage.cluster.blobs`).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg

from index.errors import LibraryNotFound
from index.search.changes import Change
from index.storage.cluster.blobs import BlobStore
from index.storage.cluster.pg.db import Database
from index.storage.embedded.store import (
    CHANGE_COLS,
    NewRecord,
    StoredRecord,
    dump_json,
    stored_record,
    vector_blobs,
    vector_from_blob,
)
from index.storage.embedded.store import change_from_row as _change

FRAMES_PREFIX = "frames"
_FRAME_NAME = re.compile(r"^[0-9a-f]{64}$")
_RECORD_COLS = (
    "row_id, image_id, image_uri, tags::text, vector_kind, frame, extra::text, created_at, updated_at"
)


class PgLibraryStore:
    """PostgreSQL access to one shard of one library, through the shared pool (thread-safe: each call
    borrows a connection).

    Args:
        db: the pool; the store does not own it.
        uid: the library's uid (``LibraryInfo.uid``): a library deleted and created again is another one.
        shard: the shard (0 for a 1-shard library).
        readonly: refuse every write (what readers open).
        frames: the shard's blobs (``index.storage.backends.ClusterStorage.library``); frames are
            ``frames/<sha256>`` in it.

    Raises:
        LibraryNotFound: no library has that uid (it was deleted).
    """

    def __init__(
        self, db: Database, uid: str, shard: int = 0, *, readonly: bool = False, frames: BlobStore
    ) -> None:
        self.db = db
        self.uid = uid
        self.shard = shard
        self.readonly = readonly
        self.frames = frames
        # Shard 0's seq and lock are the library's row (as before shards existed); shard k >= 1 has
        # its row in library_shards. Both are "the shard's row" below.
        if shard == 0:
            self._seq_table, self._seq_where = "libraries", "uid = %s"
            self._seq_args: tuple[Any, ...] = (uid,)
        else:
            self._seq_table, self._seq_where = "library_shards", "library_uid = %s AND shard = %s"
            self._seq_args = (uid, shard)
        self._seq_row = f"{self._seq_table} WHERE {self._seq_where}"
        with db.transaction() as conn:
            row = conn.execute("SELECT dim, name FROM libraries WHERE uid = %s", (uid,)).fetchone()
            shard_row = conn.execute(f"SELECT 1 FROM {self._seq_row}", self._seq_args).fetchone()
        if row is not None and shard_row is None:
            raise LibraryNotFound(f"uid {uid} shard {shard}")
        if row is None:
            raise LibraryNotFound(f"uid {uid}")
        self.dim, self.name = int(row[0]), str(row[1])

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Nothing to release: the pool belongs to whoever connected."""

    def __enter__(self) -> PgLibraryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------------------------

    def upsert(self, records: Sequence[NewRecord]) -> list[bool]:
        """Insert or overwrite records keyed by (image_id, image_uri), all under one new seq.

        Returns:
            For each record, True when it was created, False when it overwrote a live record.
        Raises:
            ValueError: a vector of the wrong shape or a vector kind that is not known.
        """
        if not records:
            return []
        blobs = vector_blobs(records, self.dim)
        frames = [hashlib.sha256(r.frame).hexdigest() if r.frame is not None else None for r in records]
        uploads = {
            f: r.frame for f, r in zip(frames, records, strict=True) if f is not None and r.frame is not None
        }
        now = time.time()
        with self._write() as (conn, seq):
            self._put_frames(conn, uploads)
            # What each key held before (the shard's lock keeps it so until the commit).
            live: dict[tuple[str, str], tuple[bool, str | None]] = {
                (r[0], r[1]): (not r[2], r[3])
                for r in conn.execute(
                    "SELECT image_id, image_uri, deleted, frame FROM records WHERE library_uid = %s"
                    " AND shard = %s"
                    " AND (image_id, image_uri) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                    (self.uid, self.shard, [r.image_id for r in records], [r.image_uri for r in records]),
                )
            }
            created, old_frames = [], []
            for r, frame in zip(records, frames, strict=True):
                was_live, old_frame = live.get((r.image_id, r.image_uri), (False, None))
                created.append(not was_live)
                if old_frame is not None and old_frame != frame:
                    old_frames.append(old_frame)
                live[(r.image_id, r.image_uri)] = (True, frame)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO records AS r (library_uid, image_id, image_uri, tags, vector, vector_kind,"
                    " frame, extra, seq, deleted, created_at, updated_at, shard)"
                    " VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s::jsonb, %s, false, %s, %s, %s)"
                    " ON CONFLICT (library_uid, image_id, image_uri) DO UPDATE SET tags = excluded.tags,"
                    " vector = excluded.vector, vector_kind = excluded.vector_kind, frame = excluded.frame,"
                    " extra = excluded.extra, seq = excluded.seq, deleted = false,"
                    " updated_at = excluded.updated_at,"
                    " created_at = CASE WHEN r.deleted THEN excluded.created_at ELSE r.created_at END",
                    [
                        (
                            self.uid,
                            r.image_id,
                            r.image_uri,
                            dump_json(r.tags),
                            blob,
                            r.vector_kind,
                            frame,
                            dump_json(r.extra) if r.extra is not None else None,
                            seq,
                            now,
                            now,
                            self.shard,
                        )
                        for r, blob, frame in zip(records, blobs, frames, strict=True)
                    ],
                )
        self._collect_frames(old_frames)
        return created

    def update_tags(self, image_id: str, image_uri: str | None, tags: dict[str, Any]) -> int:
        """Replace the whole tag object of the matching live records; returns how many changed."""
        where, args = _match(image_id, image_uri)
        with self._write() as (conn, seq):
            cur = conn.execute(
                "UPDATE records SET tags = %s::jsonb, seq = %s, updated_at = %s"
                f" WHERE library_uid = %s AND shard = %s AND NOT deleted AND {where}",
                (dump_json(tags), seq, time.time(), self.uid, self.shard, *args),
            )
            return cur.rowcount

    def delete(self, image_id: str, image_uri: str | None) -> int:
        """Delete the matching live records (every uri of the id when image_uri is None)."""
        where, args = _match(image_id, image_uri)
        with self._write() as (conn, seq):
            frames = [
                r[0]
                for r in conn.execute(
                    "SELECT frame FROM records WHERE library_uid = %s AND shard = %s AND NOT deleted"
                    f" AND frame IS NOT NULL AND {where}",
                    (self.uid, self.shard, *args),
                )
            ]
            cur = conn.execute(
                "UPDATE records SET deleted = true, vector = NULL, frame = NULL, tags = '{}'::jsonb,"
                " extra = NULL, seq = %s, updated_at = %s"
                f" WHERE library_uid = %s AND shard = %s AND NOT deleted AND {where}",
                (seq, time.time(), self.uid, self.shard, *args),
            )
            deleted = cur.rowcount
        self._collect_frames(frames)
        return deleted

    # -- reads -----------------------------------------------------------------------------------

    def last_seq(self) -> int:
        return int(self._one(f"SELECT last_seq FROM {self._seq_row}", self._seq_args, missing=True))

    def count(self) -> int:
        """Number of live records."""
        return int(
            self._one(
                "SELECT COUNT(*) FROM records WHERE library_uid = %s AND shard = %s AND NOT deleted",
                (self.uid, self.shard),
            )
        )

    def count_changed_since(self, seq: int) -> int:
        return int(
            self._one(
                "SELECT COUNT(*) FROM records WHERE library_uid = %s AND shard = %s AND seq > %s",
                (self.uid, self.shard, seq),
            )
        )

    def get(self, image_id: str, image_uri: str | None = None) -> list[StoredRecord]:
        """Live records of an image id (one uri, or all of them), in insertion order."""
        where, args = _match(image_id, image_uri)
        with self.db.transaction() as conn:
            rows = conn.execute(
                f"SELECT {_RECORD_COLS} FROM records WHERE library_uid = %s AND shard = %s AND NOT deleted"
                f" AND {where} ORDER BY row_id",
                (self.uid, self.shard, *args),
            ).fetchall()
        return [stored_record(r) for r in rows]

    def fetch(self, row_ids: Sequence[int]) -> dict[int, StoredRecord]:
        """Live records by row id (rows deleted meanwhile are simply absent)."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                f"SELECT {_RECORD_COLS} FROM records WHERE library_uid = %s AND shard = %s AND NOT deleted"
                " AND row_id = ANY(%s)",
                (self.uid, self.shard, [int(i) for i in row_ids]),
            ).fetchall()
        return {rec.row_id: rec for rec in map(stored_record, rows)}

    def vector_of(self, row_id: int) -> np.ndarray | None:
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT vector FROM records WHERE library_uid = %s AND shard = %s AND row_id = %s"
                " AND NOT deleted",
                (self.uid, self.shard, row_id),
            ).fetchone()
        return None if row is None else vector_from_blob(row[0])

    def changes_since(self, seq: int, *, live_only: bool = False, batch: int = 5000) -> Iterator[Change]:
        """Rows with ``seq > seq`` in seq order (tombstones included unless ``live_only``).

        One ``REPEATABLE READ`` transaction (one consistent state of the library), streamed ``batch``
        rows at a time through a server-side cursor; the pooled connection is held until the iterator
        is exhausted or closed.
        """
        sql = (
            f"SELECT {CHANGE_COLS.replace('tags', 'tags::text')} FROM records"
            " WHERE library_uid = %s AND shard = %s AND seq > %s"
            + (" AND NOT deleted" if live_only else "")
            + " ORDER BY seq, row_id"
        )
        with self.db.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            with conn.cursor(name="changes_since") as cur:
                cur.itersize = batch
                cur.execute(sql, (self.uid, self.shard, seq))
                for row in cur:
                    yield _change(row)

    def read_frame(self, frame: str) -> bytes | None:
        """The bytes of a stored frame (a record's ``frame``), or None when there is none."""
        if not _FRAME_NAME.match(frame):  # not a SHA-256: it names no frame (and no other object)
            return None
        return self.frames.get_bytes(f"{FRAMES_PREFIX}/{frame}")

    # -- internals -------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[tuple[psycopg.Connection[Any], int]]:
        """One write transaction holding the shard's row lock, with the seq it stamps."""
        if self.readonly:
            raise PermissionError("this store was opened read-only")
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT last_seq FROM {self._seq_row} FOR UPDATE", self._seq_args).fetchone()
            if row is None:
                raise LibraryNotFound(self.name)
            seq = int(row[0]) + 1
            conn.execute(
                f"UPDATE {self._seq_table} SET last_seq = %s WHERE {self._seq_where}", (seq, *self._seq_args)
            )
            yield conn, seq

    def _put_frames(self, conn: psycopg.Connection[Any], frames: dict[str, bytes]) -> None:
        """Upload the frames that no live record names yet (inside the write transaction, after the
        lock: those that one does name exist already, and none can be collected before the commit)."""
        if not frames:
            return
        named = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT frame FROM records WHERE library_uid = %s AND shard = %s"
                " AND frame = ANY(%s) AND NOT deleted",
                (self.uid, self.shard, sorted(frames)),
            )
        }
        self.frames.put_many({f"{FRAMES_PREFIX}/{f}": data for f, data in frames.items() if f not in named})

    def _collect_frames(self, frames: Sequence[str]) -> None:
        """Delete the objects of ``frames`` that no live record names, under the shard's lock (after
        the commit that unnamed them: see the module's docstring)."""
        if not frames:
            return
        with self.db.transaction() as conn:
            if conn.execute(f"SELECT 1 FROM {self._seq_row} FOR UPDATE", self._seq_args).fetchone() is None:
                return  # the library was deleted meanwhile: its blobs go with it
            named = {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT frame FROM records WHERE library_uid = %s AND shard = %s"
                    " AND frame = ANY(%s) AND NOT deleted",
                    (self.uid, self.shard, sorted(set(frames))),
                )
            }
            for frame in sorted(set(frames) - named):
                self.frames.delete(f"{FRAMES_PREFIX}/{frame}")

    def _one(self, sql: str, args: tuple[Any, ...], *, missing: bool = False) -> Any:
        with self.db.transaction() as conn:
            row = conn.execute(sql, args).fetchone()
        if row is None:
            if missing:
                raise LibraryNotFound(self.name)
            raise RuntimeError(f"no row from {sql!r}")
        return row[0]


def _match(image_id: str, image_uri: str | None) -> tuple[str, tuple[str, ...]]:
    if image_uri is None:
        return "image_id = %s", (image_id,)
    return "image_id = %s AND image_uri = %s", (image_id, image_uri)
