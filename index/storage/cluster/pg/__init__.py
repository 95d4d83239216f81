"""The PostgreSQL backend: the catalog, library records and import tasks in one database.

The same interfaces as the SQLite classes (``index.storage.interfaces``), for cluster mode, where no process
may depend on a filesystem shared between nodes (DESIGN.md, "Cluster deployment"). Needs the ``cluster``
extra (psycopg 3 and psycopg_pool); ``index.storage.backends.ClusterStorage`` selects it when ``database_url``
is set.
"""

from index.storage.cluster.pg.catalog import PgCatalog
from index.storage.cluster.pg.db import Database, DatabaseUnavailable, connect, read_password, redact_url
from index.storage.cluster.pg.store import PgLibraryStore
from index.storage.cluster.pg.tasks import PgTaskStore

__all__ = [
    "Database",
    "DatabaseUnavailable",
    "PgCatalog",
    "PgLibraryStore",
    "PgTaskStore",
    "connect",
    "read_password",
    "redact_url",
]
