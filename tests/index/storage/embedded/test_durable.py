"""index.storage.embedded.durable: the directory fsync that makes renames and new files durable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from index.storage.embedded.durable import fsync_dir


def test_fsync_dir_flushes_the_directory_and_closes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    closed: list[int] = []
    real_fsync, real_close = os.fsync, os.close
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd))[1])
    fsync_dir(tmp_path)
    assert synced and synced == closed  # the descriptor it synced is the one it closed


def test_fsync_dir_closes_the_descriptor_when_fsync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[int] = []
    real_close = os.close

    def failing_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd))[1])
    with pytest.raises(OSError, match="disk gone"):
        fsync_dir(tmp_path)
    assert len(closed) == 1


def test_fsync_dir_of_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
