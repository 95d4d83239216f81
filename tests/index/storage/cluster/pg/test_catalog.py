"""index.storage.cluster.pg.catalog: creates racing from two pools (two Writers) keep names unique and the
limit true."""

from __future__ import annotations

import threading

from index.errors import LibraryAlreadyExists, LibraryLimitReached
from index.storage.cluster.pg import PgCatalog, connect


def race(catalogs: list[PgCatalog], names: list[str]) -> list[str]:
    """Create ``names`` at once, alternating between the catalogs; the outcome of each, sorted."""
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(catalog: PgCatalog, name: str) -> None:
        try:
            catalog.create(
                name, "general_search", None, model="m", pretrained="p", model_identity="m/p", dim=4
            )
            result = "created"
        except (LibraryAlreadyExists, LibraryLimitReached) as exc:
            result = type(exc).__name__
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=create, args=(catalogs[i % 2], n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sorted(outcomes)


def test_racing_creates_keep_names_unique_and_the_limit_true(pg_url) -> None:
    with connect(pg_url) as db1, connect(pg_url) as db2:
        catalogs = [PgCatalog(db1, max_libraries=4), PgCatalog(db2, max_libraries=4)]
        assert race(catalogs, ["same"] * 4) == ["LibraryAlreadyExists"] * 3 + ["created"]
        assert race(catalogs, ["a", "b", "c", "d", "e"]) == ["LibraryLimitReached"] * 2 + ["created"] * 3
        assert len(catalogs[1].names()) == 4 and "same" in catalogs[0].names()
