"""The library catalog: one directory per library under the storage root.

Layout::

    <root>/catalog.json                      the layout's schema version (see index/storage/schema.py)
    <root>/libraries/<name>/library.json     immutable after create (written before the rename)
    <root>/libraries/<name>/records.sqlite   source of truth (see store.py here)
    <root>/libraries/<name>/frames/          stored original image bytes, content-addressed
    <root>/libraries/<name>/snapshots/       rebuildable FAISS/tag cache (see snapshot.py here)
    <root>/libraries/<name>/shards/<k>/      a sharded library (shards > 1): records.sqlite, frames/
                                             and snapshots/ of shard k, instead of the three above

Create and delete are atomic renames, so a crash never leaves a half-made library visible: a library
is built in ``<root>/staging/`` and renamed into place; a deleted one is renamed into ``<root>/trash/``
before its files are removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from index.clock import iso_time
from index.errors import (
    InvalidParameter,
    LibraryAlreadyExists,
    LibraryLimitReached,
    LibraryNotFound,
    ModelMismatch,
)
from index.search.ann import CONFIGURED_KINDS
from index.search.sharding import MAX_SHARDS
from index.storage.embedded.durable import fsync_dir
from index.storage.embedded.store import LibraryStore
from index.storage.schema import SERVICE_VERSION, check_not_newer

logger = logging.getLogger(__name__)

#: 1-64 characters of [A-Za-z0-9_-], starting with a letter or digit: never a path on disk.
LIBRARY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MODES = ("general_search", "item_search", "adaptive_search")
#: What a library of each mode embeds (``embedding`` of the library object; see ``index/detect/modes.py``).
EMBEDDING_OF_MODE = {
    "general_search": "whole_image",
    "item_search": "item_crop",
    "adaptive_search": "face_crop_or_whole_image",
}
MAX_DESCRIPTION_LENGTH = 1024
CATALOG_FILE = "catalog.json"
#: Under a sharded library's directory: one directory per shard (``shard_dirs``).
SHARDS_DIR = "shards"
#: The version of the layout above. 0: the same layout from before it carried a version (no
#: ``catalog.json``); opening one stamps it.
LAYOUT_VERSION = 1


def check_library_name(name: object) -> str:
    """Return ``name`` if it is a valid library name.

    Raises:
        InvalidParameter: (a ValueError) naming the rule that was broken.
    """
    if not isinstance(name, str):
        raise InvalidParameter("library_name must be a string")
    if not LIBRARY_NAME_RE.fullmatch(name):
        raise InvalidParameter(
            f"library_name {name[:80]!r} is invalid: use 1-64 characters of A-Z, a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class LibraryInfo:
    """What ``library.json`` holds. ``uid`` changes when a library is deleted and created again.

    ``face_model_identity`` (``adaptive_search`` only) names the learned face-embedding model that embeds
    its faces; None when the CLIP model's image encoder does (the default, and what libraries created
    before the field existed used).
    """

    name: str
    mode: str
    description: str | None
    created_at: float
    model: str
    pretrained: str
    model_identity: str
    dim: int
    uid: str
    index_kind: str = "auto"
    face_model_identity: str | None = None
    #: Fixed at creation (``index.search.sharding``); descriptors written before shards existed load as 1.
    shards: int = 1

    @property
    def key(self) -> str:
        """The multiplexing key: a re-created library never reuses a replica's cached reader."""
        return f"{self.name}:{self.uid}"

    def shard_key(self, shard: int) -> str:
        """The multiplexing key of one shard: ``name:uid`` for a 1-shard library (as before shards
        existed), ``name:uid:shard`` otherwise."""
        return self.key if self.shards == 1 else f"{self.key}:{shard}"


class CatalogBase:
    """What both catalogs share: checking and describing a new library. A backend adds
    ``_add`` (store a new library atomically) and the reads."""

    max_libraries: int

    def create(
        self,
        name: str,
        mode: str,
        description: str | None,
        *,
        model: str,
        pretrained: str,
        model_identity: str,
        dim: int,
        index_kind: str = "auto",
        face_model_identity: str | None = None,
        shards: int = 1,
    ) -> LibraryInfo:
        """Create an empty library of ``shards`` shards (``index.search.sharding``).

        Raises:
            InvalidParameter: (a ValueError) bad name, mode, index kind or shard count.
            LibraryAlreadyExists: a library of that name exists.
            LibraryLimitReached: the deployment already holds ``max_libraries`` libraries.
        """
        check_library_name(name)
        if mode not in MODES:
            raise InvalidParameter(f"mode {mode!r} is invalid; expected one of {', '.join(MODES)}")
        if index_kind not in CONFIGURED_KINDS:
            raise InvalidParameter(
                f"index_kind {index_kind!r} is invalid; expected one of {', '.join(CONFIGURED_KINDS)}"
            )
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise InvalidParameter(
                f"shards {shards!r} is invalid; expected an integer from 1 to {MAX_SHARDS}"
            )
        info = LibraryInfo(
            name=name,
            mode=mode,
            description=description,
            created_at=time.time(),
            model=model,
            pretrained=pretrained,
            model_identity=model_identity,
            dim=dim,
            uid=uuid.uuid4().hex[:12],
            index_kind=index_kind,
            face_model_identity=face_model_identity if mode == "adaptive_search" else None,
            shards=shards,
        )
        self._add(info)
        logger.info(
            "created library %s (mode=%s, model=%s, dim=%d, shards=%d)",
            name,
            mode,
            model_identity,
            dim,
            shards,
        )
        return info

    def _add(self, info: LibraryInfo) -> None:
        """Store a new library, all or nothing. Raises LibraryAlreadyExists, LibraryLimitReached."""
        raise NotImplementedError

    def get(self, name: str) -> LibraryInfo:
        raise NotImplementedError


class Catalog(CatalogBase):
    """Creates, lists, describes and deletes libraries under one storage root.

    Only the writer deployment calls ``create`` and ``delete``; any process may read.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_libraries: int = 1000,
    ) -> None:
        self.root = Path(root)
        self.max_libraries = max_libraries
        self._libraries = self.root / "libraries"
        self._staging = self.root / "staging"
        self._trash = self.root / "trash"
        self.root.mkdir(parents=True, exist_ok=True)
        _open_layout(self.root)
        for d in (self._libraries, self._staging, self._trash):
            d.mkdir(parents=True, exist_ok=True)

    def library_dir(self, name: str) -> Path:
        return self._libraries / check_library_name(name)

    def _add(self, info: LibraryInfo) -> None:
        name = info.name
        final = self._libraries / name
        if final.exists():
            raise LibraryAlreadyExists(name)
        if len(self.names()) >= self.max_libraries:
            raise LibraryLimitReached(self.max_libraries)
        staging = self._staging / f"{name}-{info.uid}"
        staging.mkdir()
        _write_json_durably(staging / "library.json", descriptor(info))
        for shard_dir in shard_dirs(staging, info.shards):
            shard_dir.mkdir(parents=True, exist_ok=True)
            LibraryStore.initialise(shard_dir, dim=info.dim)
        try:
            os.rename(staging, final)  # atomic; fails if a concurrent create won
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if final.exists():
                raise LibraryAlreadyExists(name) from exc
            raise
        fsync_dir(self._libraries)

    def get(self, name: str) -> LibraryInfo:
        """Read a library's descriptor. Raises LibraryNotFound."""
        path = self.library_dir(name) / "library.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LibraryNotFound(name) from None
        return LibraryInfo(**raw)

    def names(self) -> list[str]:
        return sorted(p.name for p in self._libraries.iterdir() if (p / "library.json").exists())

    def list(self) -> list[LibraryInfo]:
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except LibraryNotFound:  # deleted between listing and reading
                continue
        return out

    def delete(self, name: str) -> None:
        """Delete a library with every record, vector, frame and snapshot. Raises LibraryNotFound."""
        src = self.library_dir(name)
        info = self.get(name)
        dst = self._trash / f"{name}-{info.uid}-{uuid.uuid4().hex[:6]}"
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            raise LibraryNotFound(name) from None
        fsync_dir(self._libraries)
        shutil.rmtree(dst, ignore_errors=True)
        logger.info("deleted library %s", name)

    def empty_trash(self) -> None:
        """Finish deletes and creates interrupted by a crash (called when the writer starts)."""
        for d in (self._trash, self._staging):
            for p in d.iterdir():
                shutil.rmtree(p, ignore_errors=True)


def descriptor(info: LibraryInfo) -> dict[str, Any]:
    """What ``library.json`` (or the catalog row) stores: ``shards`` only when above 1, so a 1-shard
    library's descriptor is byte for byte what a service from before shards wrote and reads."""
    raw = asdict(info)
    if info.shards == 1:
        del raw["shards"]
    return raw


def shard_dirs(library_dir: Path, shards: int) -> list[Path]:
    """The directory of each shard's store, frames and snapshots: the library's own directory for a
    1-shard library (the layout from before shards existed), ``shards/<k>/`` under it otherwise."""
    if shards == 1:
        return [library_dir]
    return [library_dir / SHARDS_DIR / str(k) for k in range(shards)]


def check_served_model(info: LibraryInfo, served: dict[str, Any]) -> None:
    """Refuse to use a library with a model other than the one it was built with.

    Args:
        info: the library.
        served: the Encoder's ``info()``: ``identity`` and ``face_identity`` (None: no face model).

    Raises:
        ModelMismatch: the CLIP model differs, or (``adaptive_search``) the face-embedding model does.
    """
    if info.model_identity != served["identity"]:
        raise ModelMismatch(info.name, info.model_identity, served["identity"])
    if info.mode == "adaptive_search" and info.face_model_identity != served.get("face_identity"):
        raise ModelMismatch(
            info.name,
            _face_model_name(info.face_model_identity),
            _face_model_name(served.get("face_identity")),
        )


def _face_model_name(identity: str | None) -> str:
    return f"face model {identity}" if identity else "no face model (CLIP embeds faces)"


def library_object(
    info: LibraryInfo, image_count: int, index_kind: str, search_calibration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The API's library object; ``index_kind`` is the kind in use now, ``search_calibration`` what its
    index measured (`Calibration.describe`; None, and the key absent: exact search, or not measured)."""
    index: dict[str, Any] = {"kind": index_kind, "configured": info.index_kind}
    if search_calibration is not None:
        index["search_calibration"] = search_calibration
    return {
        "library_name": info.name,
        "mode": info.mode,
        "description": info.description,
        "image_count": image_count,
        "created_at": iso_time(info.created_at),
        "model": {"name": info.model, "pretrained": info.pretrained, "dim": info.dim},
        "index": index,
        "embedding": EMBEDDING_OF_MODE[info.mode],
        "shards": info.shards,
    } | ({"face_model": info.face_model_identity} if info.mode == "adaptive_search" else {})


def _open_layout(root: Path) -> None:
    """Stamp an older layout with :data:`LAYOUT_VERSION`; refuse a newer one (``SchemaTooNew``)."""
    path = root / CATALOG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raw = {"schema_version": 0}
    found = int(raw["schema_version"])
    check_not_newer(f"catalog at {root}", found, LAYOUT_VERSION, raw.get("written_by"))
    if found < LAYOUT_VERSION:
        _write_json_durably(path, {"schema_version": LAYOUT_VERSION, "written_by": SERVICE_VERSION})
        fsync_dir(root)


def _write_json_durably(path: Path, obj: Any) -> None:
    # A name of its own: several processes may stamp catalog.json at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
