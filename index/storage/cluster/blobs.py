"""Blobs on an object store, through fsspec: cluster mode's snapshots and stored frames.

A :class:`BlobStore` is an fsspec filesystem rooted at a URL prefix (``s3://bucket/prefix``, ``gs://``,
``az://``, ``file:///path``); keys are ``/``-separated paths below that root. No process may depend on a
filesystem shared between nodes (DESIGN.md, "Cluster deployment"), so ``file://`` is for one machine and
for tests.

Atomicity: a PUT on an object store replaces an object whole, and ``file://`` writes go to a temporary
name in the same directory, are fsynced and then renamed, so a reader sees either the old object or the
new one, never a part. The layouts built on this (`index.storage.cluster.objsnap`,
`index.storage.cluster.pg.store`) never overwrite a published object except small pointers (a snapshot
directory's ``CURRENT``); everything else is written once under a new name.

Listings are not cached (``use_listings_cache=False`` unless the caller says otherwise): another node's
writes must be visible at once. On S3, bounded timeouts and retries are set unless the caller gives
their own (:data:`S3_CONFIG`), so an unreachable endpoint fails in bounded time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

#: botocore ``Config`` settings used on S3 unless ``object_store_options["config_kwargs"]`` sets them:
#: seconds to connect and between bytes of a response, and at most 2 retries of a request by botocore
#: (s3fs retries timeouts a few more times with backoff on top: still bounded).
S3_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 30,
    "retries": {"max_attempts": 2, "mode": "standard"},
}
#: Seconds ``check()`` waits for the store to answer.
CHECK_TIMEOUT_S = 30.0
_TMP_PREFIX = ".blobtmp-"  # file:// writes in progress (never listed)


def redact_store_url(url: str) -> str:
    """``url`` (an fsspec URL such as ``s3://bucket/prefix``) as logs, messages and /health show it.

    Credentials never belong in it (``object_store_options`` and the environment carry them), but one put
    there is hidden: the userinfo, read as libpq reads a URL's (everything after ``://`` up to the first
    ``@`` that comes before any ``/``, so ``#``, ``?`` and ``%`` are part of it), becomes ``***``, and so
    does every query parameter's value (a signature, a token).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url  # a plain path: nothing in it is a credential
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        rest = "***@" + rest[authority.index("@") + 1 :]
    head, question, query = rest.partition("?")
    if question:
        head += "?" + "&".join(f"{param.partition('=')[0]}=***" for param in query.split("&"))
    return f"{scheme}://{head}"


class StorageUnavailable(RuntimeError):
    """The object store cannot be used: the bucket or root directory does not exist, or it cannot be
    reached in time. The message names the store's URL (never its credentials)."""


class BlobStore:
    """An fsspec filesystem rooted at a URL prefix. Made by :meth:`open` or :meth:`child`; thread-safe
    as far as the fsspec backend is (s3fs, gcsfs, adlfs and the local one are).

    Args:
        fs: the filesystem.
        root: the root path as ``fs`` spells it (``bucket/prefix`` for object stores, an absolute path
            for ``file://``), without a trailing ``/``.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self._local = isinstance(fs, LocalFileSystem)

    @classmethod
    def open(cls, url: str, options: dict[str, Any] | None = None) -> BlobStore:
        """The store rooted at ``url`` (nothing is contacted: see :meth:`check`).

        Args:
            url: ``s3://bucket/prefix``, ``gs://...``, ``az://...`` or ``file:///absolute/path``.
            options: passed to fsspec (e.g. ``endpoint_url``, ``key``, ``secret``, ``config_kwargs`` for
                S3-compatible servers); :data:`S3_CONFIG` fills in what ``config_kwargs`` leaves out.
        Raises:
            ValueError: the URL names no known protocol, or its backend (s3fs, gcsfs, adlfs) is not
                installed; the message names the URL.
        """
        opts = dict(options or {})
        opts.setdefault("use_listings_cache", False)
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            opts["config_kwargs"] = {**S3_CONFIG, **(opts.get("config_kwargs") or {})}
        try:
            fs, root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"cannot open object store {redact_store_url(url)}: {exc}") from None
        if isinstance(fs, LocalFileSystem) and not os.path.isabs(root):
            raise ValueError(f"object store {redact_store_url(url)}: a file:// store needs an absolute path")
        return cls(fs, root)

    def child(self, prefix: str) -> BlobStore:
        """The same filesystem rooted at ``<root>/<prefix>``."""
        return BlobStore(self.fs, self._path(prefix))

    @property
    def url(self) -> str:
        """The root as a URL, for logs and messages (options, hence credentials, are not part of it;
        credentials written into the URL itself are hidden: :func:`redact_store_url`)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return redact_store_url(f"{protocol}://{self.root}")

    def __repr__(self) -> str:
        return f"BlobStore({self.url})"

    # -- checks ----------------------------------------------------------------------------------

    def check(self, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        """Fail fast, with a clear reason, when the store cannot be used.

        On object stores the bucket (the first component of the root) must exist; the prefix need not
        (prefixes exist as soon as an object is written under them). On ``file://`` the root directory
        is created when its parent exists, the same promise: the parent plays the bucket's part.

        Raises:
            StorageUnavailable: the bucket or the root's parent directory does not exist, the store
                refused or failed the request, or it did not answer within ``timeout_s`` seconds.
        """
        if self._local:
            self._check_local()
            return
        bucket = self.root.split("/", 1)[0]
        outcome: list[BaseException | None] = []

        def probe() -> None:
            try:
                self.fs.info(bucket)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        # A thread, so that a store that accepts connections but never answers cannot hold the caller
        # past timeout_s (the thread itself ends when the backend's own timeouts and retries run out).
        thread = threading.Thread(target=probe, name="blobstore-check", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if not outcome:
            raise StorageUnavailable(f"object store {self.url}: no answer within {timeout_s:g}s")
        exc = outcome[0]
        if exc is None:
            return
        if isinstance(exc, FileNotFoundError):
            raise StorageUnavailable(f"object store {self.url}: the bucket {bucket!r} does not exist")
        if isinstance(exc, PermissionError):
            raise StorageUnavailable(f"object store {self.url}: access to the bucket {bucket!r} is denied")
        raise StorageUnavailable(f"object store {self.url}: cannot reach the bucket {bucket!r}: {exc}")

    def _check_local(self) -> None:
        root = Path(self.root)
        if root.is_dir():
            return
        if root.exists():
            raise StorageUnavailable(f"object store {self.url}: {root} is not a directory")
        if not root.parent.is_dir():
            raise StorageUnavailable(
                f"object store {self.url}: the directory {root.parent} does not exist (only the last "
                "component of a file:// root is created)"
            )
        root.mkdir(exist_ok=True)

    # -- objects ---------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write the object ``key`` whole (replacing it)."""
        path = self._path(key)
        if self._local:
            self._replace_local(path, lambda tmp: Path(tmp).write_bytes(data))
        else:
            self.fs.pipe_file(path, data)

    def put_many(self, objects: dict[str, bytes]) -> None:
        """Write several objects (concurrently where the backend is asynchronous, as s3fs is)."""
        if not objects:
            return
        if self._local:
            for key, data in objects.items():
                self.put_bytes(key, data)
        else:
            self.fs.pipe({self._path(key): data for key, data in objects.items()})

    def get_bytes(self, key: str) -> bytes | None:
        """The object ``key``, or None when there is none."""
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return None

    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Upload the local file ``local_path`` as the object ``key`` (replacing it)."""
        path = self._path(key)
        if self._local:
            self._replace_local(path, lambda tmp: shutil.copyfile(local_path, tmp))
        else:
            self.fs.put_file(os.fspath(local_path), path)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Download the object ``key`` to ``local_path`` (a partial file may be left there on failure:
        download into a temporary place).

        Raises:
            FileNotFoundError: there is no object ``key``.
        """
        self.fs.get_file(self._path(key), os.fspath(local_path))

    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object or a prefix with objects under it."""
        return bool(self.fs.exists(self._path(key)))

    def list(self, prefix: str = "") -> list[str]:
        """The immediate children of ``prefix`` (objects and sub-prefixes), as keys relative to the root,
        sorted; empty when nothing is there."""
        path = self._path(prefix) if prefix else self.root
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        cut = len(self.root) + 1
        keys = {str(e).rstrip("/")[cut:] for e in entries}
        return sorted(k for k in keys if k and not k.rsplit("/", 1)[-1].startswith(_TMP_PREFIX))

    def delete(self, key: str) -> None:
        """Delete the object ``key``; nothing happens when it does not exist."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (``""``: everything under this store's root, e.g. a
        library's store when the library is deleted). The bucket itself is never deleted; on ``file://``
        the prefix's directory goes, its (possibly empty) parents stay, as a concurrent write may be
        creating them."""
        path = self._path(prefix) if prefix else self.root
        try:
            files = self.fs.find(path)  # objects only: rm(recursive=True) on a bucket would remove it
        except FileNotFoundError:
            files = []
        if files:
            self.fs.rm(files)
        if self._local:  # directories are not objects: drop the emptied tree
            shutil.rmtree(path, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid object key {key!r}: a relative /-separated path without . or ..")
        return f"{self.root}/{key}"

    def _replace_local(self, path: str, write: Any) -> None:
        """Write ``path`` through a temporary file in its directory, fsynced, then renamed over it."""
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def library_blobs(root: BlobStore, uid: str) -> BlobStore:
    """The blobs of one library under the service's store: ``libraries/<uid>/`` with ``frames/`` and
    ``snapshots/`` in it. Keyed by uid, so a library deleted and created again under its name starts
    empty; deleting a library deletes this prefix (``delete_prefix("")``) after its row is gone."""
    return root.child(f"libraries/{uid}")
