"""Making a rename or a new file survive a crash: fsync of the directory that holds it.

``os.replace`` and file creation change the directory, not the file; until the directory itself is
fsynced, a power loss can bring back the old entry (or none) even though the file's data was synced.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s entries (names created, replaced or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
