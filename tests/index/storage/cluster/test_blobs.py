"""index.storage.cluster.blobs: one BlobStore API over file:// and S3 (moto), and clear errors when a store is
unusable."""

from __future__ import annotations

import socket
import time

import pytest

from index.storage.cluster.blobs import (
    S3_CONFIG,
    BlobStore,
    StorageUnavailable,
    library_blobs,
    redact_store_url,
)


def test_objects_round_trip(blob_root, tmp_path):
    b = blob_root.child("lib")
    assert b.get_bytes("a/x") is None and not b.exists("a/x")
    b.put_bytes("a/x", b"one")
    b.put_bytes("a/x", b"two")  # replaced whole
    assert b.get_bytes("a/x") == b"two" and b.exists("a/x") and b.exists("a")
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    b.put_file("a/big", src)
    b.get_file("a/big", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        b.get_file("a/none", tmp_path / "none.bin")
    b.put_many({"m/1": b"1", "m/2": b"2"})
    assert [b.get_bytes(f"m/{i}") for i in (1, 2)] == [b"1", b"2"]
    assert blob_root.get_bytes("lib/a/x") == b"two"  # a child is a deeper prefix of the same store


def test_list_gives_immediate_children_relative_to_the_root(blob_root):
    for key in ("a/x", "a/d/z", "ab/y", "top"):
        blob_root.put_bytes(key, b".")
    assert blob_root.list() == ["a", "ab", "top"]
    assert blob_root.list("a") == ["a/d", "a/x"]
    assert blob_root.list("nothing") == []
    assert blob_root.child("a").list() == ["d", "x"]


def test_delete_and_delete_prefix_touch_nothing_else(blob_root):
    for key in ("a/x", "a/d/z", "ab/y", "top"):
        blob_root.put_bytes(key, b".")
    blob_root.delete("missing")  # absent is fine
    blob_root.delete_prefix("missing")
    blob_root.delete("top")
    blob_root.delete_prefix("a")
    assert blob_root.list() == ["ab"] and blob_root.get_bytes("ab/y") == b"."  # "ab" is not under "a"
    lib = library_blobs(blob_root, "uid1")
    lib.put_bytes("frames/f", b"f")
    lib.delete_prefix("")  # a deleted library: everything under its prefix
    assert lib.list() == [] and blob_root.list("libraries") == [] and blob_root.get_bytes("ab/y") == b"."
    blob_root.delete_prefix("")  # even the whole root leaves the bucket (or its parent directory)
    blob_root.check()
    assert blob_root.list() == []


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/"])
def test_keys_must_be_plain_relative_paths(blob_root, key):
    with pytest.raises(ValueError, match="invalid object key"):
        blob_root.get_bytes(key)


def test_check_a_file_root(tmp_path):
    BlobStore.open(f"file://{tmp_path}/new").check()  # the last component is created
    assert (tmp_path / "new").is_dir()
    with pytest.raises(StorageUnavailable, match=f"the directory {tmp_path}/missing does not exist"):
        BlobStore.open(f"file://{tmp_path}/missing/root").check()
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageUnavailable, match="is not a directory"):
        BlobStore.open(f"file://{tmp_path}/file").check()


def test_check_names_a_missing_bucket(s3_server):
    s3_server_store = BlobStore.open(f"s3://{s3_server.bucket}/p", s3_server.storage_options)
    s3_server_store.check()
    missing = BlobStore.open("s3://no-such-bucket/p", s3_server.storage_options)
    with pytest.raises(StorageUnavailable, match="s3://no-such-bucket/p: the bucket 'no-such-bucket' does"):
        missing.check()


def test_check_fails_in_bounded_time_when_nothing_answers(s3_server):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = BlobStore.open(
        "s3://b/p", {**s3_server.storage_options, "endpoint_url": f"http://127.0.0.1:{port}"}
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="s3://b/p: cannot reach the bucket 'b'"):
        refused.check()
    assert time.monotonic() - started < 30
    with socket.socket() as silent:  # accepts connections into its backlog, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        options = {**s3_server.storage_options, "endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="s3://b/p: no answer within 1s"):
            BlobStore.open("s3://b/p", options).check(timeout_s=1)
        assert time.monotonic() - started < 5


def test_s3_gets_bounded_timeouts_unless_the_caller_sets_them(s3_server):
    default = BlobStore.open(f"s3://{s3_server.bucket}", s3_server.storage_options)
    assert default.fs.config_kwargs == S3_CONFIG
    own = {**s3_server.storage_options, "config_kwargs": {"read_timeout": 7}}
    assert BlobStore.open(f"s3://{s3_server.bucket}", own).fs.config_kwargs == {
        **S3_CONFIG,
        "read_timeout": 7,
    }


def test_the_url_shows_no_credentials(s3_server):
    options = {**s3_server.storage_options, "secret": "top-secret-value"}
    store = BlobStore.open(f"s3://{s3_server.bucket}/p", options).child("libraries/u1")
    assert store.url == f"s3://{s3_server.bucket}/p/libraries/u1"
    assert "top-secret" not in repr(store)


def test_an_unknown_protocol_is_named():
    with pytest.raises(ValueError, match="cannot open object store nope://x"):
        BlobStore.open("nope://x")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("file:///srv/blobs", "file:///srv/blobs"),
        ("/srv/blobs", "/srv/blobs"),
        # issue 26: userinfo ends only at '@' (as libpq reads it), not at '#', '?' or '%'
        ("s3://AKIDEXAMPLE:s3cr#t@bucket/p", "s3://***@bucket/p"),
        ("s3://AKIDEXAMPLE:pa?ss@bucket/p", "s3://***@bucket/p"),
        ("s3://AKIDEXAMPLE:50%25@bucket/p", "s3://***@bucket/p"),
        ("gs://t0ken@bucket/p", "gs://***@bucket/p"),
        ("az://container/p?sv=2024&sig=s3cr3t", "az://container/p?sv=***&sig=***"),
        ("s3://bucket/p/user@example", "s3://bucket/p/user@example"),  # an '@' in a key is no credential
    ],
)
def test_store_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    assert redact_store_url(url) == shown


def test_credentials_in_the_store_url_never_reach_its_description_or_errors():
    pytest.importorskip("s3fs")
    store = BlobStore.open("s3://AKIDEXAMPLE:s3cr#t@bucket/blobs")  # nothing is contacted
    assert "s3cr" not in store.url and "AKID" not in store.url and "s3cr" not in repr(store)
    with pytest.raises(ValueError) as caught:
        BlobStore.open("nope://AKIDEXAMPLE:s3cr#t@x/p")
    assert "s3cr" not in str(caught.value) and "AKID" not in str(caught.value)
