"""Shared fixtures for the index tests: the tiny random-weight model and a few real photos."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import skimage.data

from index.model.embedder import ClipEmbedder
from index.model.spec import ModelSpec, resolve_model_spec
from index.storage.backends import StorageSettings


@pytest.fixture(scope="session", autouse=True)
def single_faiss_thread():
    """FAISS on one OpenMP thread: the tests build many tiny indexes, and on a loaded 2-core machine
    OpenMP's spin-waiting barriers make a 3,000-vector HNSW build ~15x slower with two threads."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    """The bundled tiny-random model on the CPU (fp32), seed 0."""
    return resolve_model_spec("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_embedder(tiny_spec: ModelSpec) -> ClipEmbedder:
    """One tiny-random embedder for the whole session (loading is deterministic, so sharing is safe)."""
    return ClipEmbedder.load(tiny_spec)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Named RGB uint8 photos of different sizes and aspect ratios (real photos from scikit-image)."""
    coffee = skimage.data.coffee()
    rng = np.random.default_rng(0)
    return {
        "astronaut_square": skimage.data.astronaut(),
        "coffee_wide": coffee,
        "coffee_tall": np.ascontiguousarray(coffee.transpose(1, 0, 2)),
        "chelsea": skimage.data.chelsea(),
        "noise_small": rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8),
        "strip": rng.integers(0, 256, size=(3, 200, 3), dtype=np.uint8),
    }


class Backend:
    """Makes catalogs, library stores and task stores of one storage backend for a test."""

    def __init__(self, name: str, tmp_path, pg_url: str | None) -> None:
        self.name = name
        self.root = tmp_path
        self._db = None
        if pg_url is not None:
            from index.storage.cluster.pg import connect

            self._db = connect(pg_url)

    def catalog(self, *, max_libraries: int = 1000):
        if self._db is None:
            from index.storage.embedded.catalog import Catalog

            return Catalog(self.root, max_libraries=max_libraries)
        from index.storage.cluster.pg import PgCatalog

        return PgCatalog(self._db, max_libraries=max_libraries)

    def store(self, info, *, readonly: bool = False):
        """The record store of library ``info`` (a LibraryInfo)."""
        if self._db is None:
            from index.storage.embedded.store import LibraryStore

            return LibraryStore(self.root / "libraries" / info.name, readonly=readonly)
        from index.storage.cluster.blobs import BlobStore, library_blobs
        from index.storage.cluster.pg import PgLibraryStore

        blobs = library_blobs(BlobStore.open(f"file://{self.root}/blobs"), info.uid)
        return PgLibraryStore(self._db, info.uid, readonly=readonly, frames=blobs)

    def tasks(self, *, max_errors: int = 10_000):
        if self._db is None:
            from index.storage.embedded.tasks import TaskStore

            return TaskStore(self.root, max_errors=max_errors)
        from index.storage.cluster.pg import PgTaskStore

        return PgTaskStore(self._db, max_errors=max_errors)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """Each storage backend in turn: SQLite under ``tmp_path``, PostgreSQL in a schema of its own."""
    pg_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    b = Backend(request.param, tmp_path, pg_url)
    yield b
    b.close()


@pytest.fixture(params=["file", "s3"])
def blob_root(request, tmp_path):
    """An empty ``BlobStore`` on each kind of object store in turn: a ``file://`` directory, and a fresh
    bucket of the session's moto S3 server (under a prefix, as deployments use one)."""
    from index.storage.cluster.blobs import BlobStore

    if request.param == "file":
        return BlobStore.open(f"file://{tmp_path}/store")
    s3 = request.getfixturevalue("s3_server")
    return BlobStore.open(f"s3://{s3.new_bucket()}/service", s3.storage_options)


@pytest.fixture(params=["embedded", "cluster"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> StorageSettings:
    """Storage on both backends: SQLite + files, and PostgreSQL + a file:// object store."""
    if request.param == "embedded":
        return StorageSettings(storage_root=str(tmp_path / "root"))
    return StorageSettings(
        database_url=request.getfixturevalue("pg_url"),
        object_store_url=f"file://{tmp_path}/bucket",
        cache_dir=str(tmp_path / "cache"),
    )


def unit_vectors(n: int, seed: int = 0, dim: int = 16) -> np.ndarray:
    """``n`` random unit vectors of ``dim`` float32s (seeded)."""
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
