"""What copying libraries into PostgreSQL (``index.storage.migrate``) needs beyond the record store's
interface.

A copy must be resumable and a finished copy re-run must write nothing, so before writing a batch the
copier reads what the target already holds for the batch's keys, all at once (:func:`rows_by_key`;
``PgLibraryStore.get`` would cost one round trip per record). And a copied record keeps the times it
was created and last changed in its first store: ``PgLibraryStore.upsert`` stamps "now", so the copier
sets the original times afterwards (:func:`set_timestamps`). The times are not part of the change feed
(``index.search.changes.Change``), so setting them takes no sequence number and readers have nothing
to replay.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from index.errors import LibraryNotFound
from index.storage.cluster.pg.db import Database

#: (image_id, image_uri): what identifies a record in its library.
Key = tuple[str, str]


@dataclass(frozen=True)
class TargetRow:
    """A record as the target holds it, in the terms a copy compares (vector as float32 bytes)."""

    tags: dict[str, Any]
    vector: bytes | None
    vector_kind: str
    frame: str | None
    extra: dict[str, Any] | None
    created_at: float
    updated_at: float
    deleted: bool


def rows_by_key(db: Database, uid: str, keys: Sequence[Key]) -> dict[Key, TargetRow]:
    """The rows (tombstones included) of library ``uid`` that have one of ``keys``; absent keys are
    absent from the result."""
    if not keys:
        return {}
    with db.transaction() as conn:
        rows = conn.execute(
            "SELECT image_id, image_uri, tags::text, vector, vector_kind, frame, extra::text, created_at,"
            " updated_at, deleted FROM records WHERE library_uid = %s"
            " AND (image_id, image_uri) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            (uid, [k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
    return {
        (r[0], r[1]): TargetRow(
            tags=json.loads(r[2]),
            vector=None if r[3] is None else bytes(r[3]),
            vector_kind=r[4],
            frame=r[5],
            extra=None if r[6] is None else json.loads(r[6]),
            created_at=float(r[7]),
            updated_at=float(r[8]),
            deleted=bool(r[9]),
        )
        for r in rows
    }


def set_timestamps(
    db: Database, uid: str, stamps: Sequence[tuple[str, str, float, float]], *, shard: int = 0
) -> int:
    """Set ``created_at`` and ``updated_at`` of live records of one shard, given as ``(image_id,
    image_uri, created_at, updated_at)``. Holds the shard's row lock, as every write to it does, so it
    cannot interleave with an upsert of the same records.

    Returns:
        How many records were changed.
    Raises:
        LibraryNotFound: the library was deleted.
    """
    if not stamps:
        return 0
    with db.transaction() as conn:
        lock = (
            conn.execute("SELECT 1 FROM libraries WHERE uid = %s FOR UPDATE", (uid,))
            if shard == 0
            else conn.execute(
                "SELECT 1 FROM library_shards WHERE library_uid = %s AND shard = %s FOR UPDATE", (uid, shard)
            )
        )
        if lock.fetchone() is None:
            raise LibraryNotFound(f"uid {uid}")
        cur = conn.execute(
            "UPDATE records AS r SET created_at = s.created_at, updated_at = s.updated_at"
            " FROM unnest(%s::text[], %s::text[], %s::float8[], %s::float8[])"
            " AS s(image_id, image_uri, created_at, updated_at)"
            " WHERE r.library_uid = %s AND r.shard = %s AND r.image_id = s.image_id"
            " AND r.image_uri = s.image_uri AND NOT r.deleted",
            (
                [s[0] for s in stamps],
                [s[1] for s in stamps],
                [float(s[2]) for s in stamps],
                [float(s[3]) for s in stamps],
                uid,
                shard,
            ),
        )
        return cur.rowcount
