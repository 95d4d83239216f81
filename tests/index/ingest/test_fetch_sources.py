"""Fetch policy: import sources (local roots, http, object stores via fsspec, gzip) and image fetches."""

from __future__ import annotations

import gzip
import uuid

import fsspec
import pytest

from index.ingest.fetch import (
    FetchError,
    FetchPolicy,
    FetchRefused,
    check_source,
    check_uri,
    fetch_bytes,
)
from index.ingest.sources import open_source
from index.model.imaging import ImageTooLarge
from tests.loopback import closed_port_url, loopback_server


@pytest.fixture
def roots(tmp_path):
    inside = tmp_path / "in"
    inside.mkdir()
    (inside / "a.jsonl").write_bytes(b'{"x": 1}\n')
    (tmp_path / "outside.jsonl").write_bytes(b"{}\n")
    return inside


def test_local_sources_only_inside_import_roots(roots):
    ok = str(roots / "a.jsonl")
    assert check_source(ok, policy=FetchPolicy(import_roots=(str(roots),))) == ok
    assert check_source("file://" + ok, policy=FetchPolicy(import_roots=(str(roots),))) == ok
    with pytest.raises(FetchError, match="outside the allowed"):
        check_source(str(roots / ".." / "outside.jsonl"), policy=FetchPolicy(import_roots=(str(roots),)))
    with pytest.raises(FetchError, match="no import_roots"):
        check_source(ok, policy=FetchPolicy())
    with pytest.raises(FetchError, match="not a readable file"):
        check_source(str(roots / "missing.jsonl"), policy=FetchPolicy(import_roots=(str(roots),)))
    with pytest.raises(FetchError, match="absolute path"):
        check_source("a.jsonl", policy=FetchPolicy(import_roots=(str(roots),)))


@pytest.mark.parametrize(
    "escape",
    [
        "{root}/%2e%2e/outside.jsonl",
        "{root}/../outside.jsonl",
        "/proc/self/environ",
        "{root}/../../../proc/self/environ",
    ],
)
def test_file_sources_cannot_leave_the_import_roots(roots, escape):
    """The review found this sound (issue 26); pinned for file:// and plain paths."""
    policy = FetchPolicy(import_roots=(str(roots),))
    path = escape.format(root=roots)
    with pytest.raises(FetchRefused, match="outside the allowed"):
        check_source("file://" + path, policy=policy)
    if "%" not in path:  # a plain path is not percent-decoded: "%2e%2e" is a name there
        with pytest.raises(FetchRefused, match="outside the allowed"):
            check_source(path, policy=policy)


def test_symlink_out_of_the_root_is_refused(roots, tmp_path):
    (roots / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    with pytest.raises(FetchError, match="outside the allowed"):
        check_source(str(roots / "link.jsonl"), policy=FetchPolicy(import_roots=(str(roots),)))


@pytest.mark.parametrize("source", ["ftp://h/x.jsonl", "s3://bucket/x.jsonl", "memory://x.jsonl"])
def test_unlisted_schemes_are_refused(roots, source):
    with pytest.raises(FetchError, match="not accepted"):
        policy = FetchPolicy(import_roots=(str(roots),), object_store_allowed={"gs": ("b",)})
        check_source(source, policy=policy)


def test_object_store_source_through_fsspec():
    path = f"/t/{uuid.uuid4().hex}/x.jsonl"
    fsspec.filesystem("memory").pipe(path, b'{"a": 1}\n{"b": 2}\n')
    policy = FetchPolicy(object_store_allowed={"memory": ("t",)})
    with open_source(f"memory://{path}", policy=policy) as f:
        assert f.readline(100) == b'{"a": 1}\n'
        assert f.readline(4) == b'{"b"'  # readline(limit) works on fsspec files too


def test_missing_object_store_package_is_a_clear_error(monkeypatch):
    """Without s3fs installed (simulated: the import fails and fsspec has not registered it yet)."""
    import sys

    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ImportError
    monkeypatch.delitem(_registry, "s3", raising=False)
    policy = FetchPolicy(object_store_allowed={"s3": ("bucket",)})
    with pytest.raises(FetchError, match="s3fs"):
        open_source("s3://bucket/x.jsonl", policy=policy)
    with pytest.raises(FetchError, match="s3fs"):
        policy.fetch_image("s3://bucket/x.png", max_bytes=100)


def test_s3_source_and_image_are_read_through_fsspec(s3_server, monkeypatch):
    """An S3-compatible server (moto, loopback): credentials and endpoint come from the environment,
    as they do on a deployment's nodes."""
    import s3fs

    bucket = s3_server.new_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="in/x.jsonl", Body=b'{"a": 1}\n')
    client.put_object(Bucket=bucket, Key="in/x.png", Body=b"\x89PNG-bytes")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem made before the environment was set
    policy = FetchPolicy(object_store_allowed={"s3": (f"{bucket}/in",)})
    with open_source(f"s3://{bucket}/in/x.jsonl", policy=policy) as f:
        assert f.read() == b'{"a": 1}\n'
    assert policy.fetch_image(f"s3://{bucket}/in/x.png", max_bytes=100) == b"\x89PNG-bytes"
    with pytest.raises(FetchError):
        open_source(f"s3://{bucket}/in/missing.jsonl", policy=policy)
    # issue 26: the service's credentials read any bucket; only the allowed prefix may be named
    client.put_object(Bucket=bucket, Key="private/x.png", Body=b"\x89PNG-private")
    for refused in (FetchPolicy(), policy):
        with pytest.raises(FetchRefused):
            refused.fetch_image(f"s3://{bucket}/private/x.png", max_bytes=100)
        with pytest.raises(FetchRefused):
            open_source(f"s3://{bucket}/private/x.png", policy=refused)
    s3fs.S3FileSystem.clear_instance_cache()


def test_gzip_source_is_decompressed(roots):
    (roots / "b.jsonl.gz").write_bytes(gzip.compress(b'{"x": 1}\n{"y": 2}\n'))
    policy = FetchPolicy(import_roots=(str(roots),))
    with open_source(str(roots / "b.jsonl.gz"), policy=policy) as f:
        assert f.read() == b'{"x": 1}\n{"y": 2}\n'


def test_http_source_streams_and_reports_http_errors():
    # the loopback server is a private address: allowed here explicitly, refused by default (below)
    with loopback_server() as srv:
        srv.files["s.jsonl"] = b'{"a": 1}\n'
        policy = FetchPolicy(allowed_networks=("127.0.0.0/8",))
        with open_source(f"{srv.base}/files/s.jsonl", policy=policy) as f:
            assert f.read() == b'{"a": 1}\n'
        with pytest.raises(FetchError, match="HTTP 404"):
            open_source(f"{srv.base}/files/none.jsonl", policy=policy)
    with pytest.raises(FetchError, match="ConnectionError"):
        open_source(closed_port_url(), policy=FetchPolicy(allow_private=True))


def test_http_source_on_a_private_address_is_refused_by_default():
    with loopback_server() as srv:
        srv.files["s.jsonl"] = b'{"a": 1}\n'
        with pytest.raises(FetchRefused) as err:
            open_source(f"{srv.base}/files/s.jsonl", policy=FetchPolicy())
        assert err.value.reason == "loopback"
        assert srv.hits["/files/s.jsonl"] == 0


def test_image_fetch_with_retries():
    policy = FetchPolicy(allow_private=True, timeout_s=5)
    with loopback_server() as srv:
        data = policy.fetch_image(srv.img(3), max_bytes=10**6, retries=1)
        assert data.startswith(b"\x89PNG")
        with pytest.raises(ImageTooLarge):
            policy.fetch_image(srv.img(3), max_bytes=10, retries=1)
        with pytest.raises(FetchError, match="HTTP 404"):
            policy.fetch_image(f"{srv.base}/img/x.gif", max_bytes=10**6, retries=1)
        assert srv.hits["/img/x.gif"] == 1  # a 404 is not retried
    with pytest.raises(FetchError, match="ConnectionError") as err:
        policy.fetch_image(closed_port_url(), max_bytes=10**6, retries=0)
    assert err.value.retriable


def test_image_fetch_retries_do_not_retry_refusals():
    with pytest.raises(FetchRefused):
        FetchPolicy().fetch_image("http://127.0.0.1:9/x.png", max_bytes=100, retries=3)


def test_object_store_image_is_size_capped():
    path = f"/t/{uuid.uuid4().hex}/i.bin"
    fsspec.filesystem("memory").pipe(path, b"x" * 100)
    memory = FetchPolicy(object_store_allowed={"memory": ("t",)})
    assert fetch_bytes(f"memory://{path}", policy=memory, max_bytes=100, timeout_s=1)
    with pytest.raises(ImageTooLarge):
        fetch_bytes(f"memory://{path}", policy=memory, max_bytes=99, timeout_s=1)
    with pytest.raises(FetchError, match="scheme 'memory'"):
        fetch_bytes(f"memory://{path}", policy=FetchPolicy(), max_bytes=100, timeout_s=1)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://127.0.0.1:9/x.jsonl", "loopback"),
        ("http://10.1.2.3/x.jsonl", "private"),
        ("https://[::1]/x.jsonl", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::ffff:192.168.0.1]/x", "private"),
        ("http://0.0.0.0/x", "unspecified"),
    ],
)
def test_literal_non_public_hosts_are_refused_before_any_connection(uri, reason):
    """A source or image URI whose host is a literal non-public address is refused when checked, with
    the message and reason the fetch itself gives."""
    policy = FetchPolicy()
    with pytest.raises(FetchRefused) as at_check:
        check_source(uri, policy=policy)
    with pytest.raises(FetchRefused) as at_uri_check:
        check_uri(uri, policy=policy)
    with pytest.raises(FetchRefused) as at_fetch:
        fetch_bytes(uri, policy=policy, max_bytes=100, timeout_s=1)
    assert at_check.value.reason == at_uri_check.value.reason == at_fetch.value.reason == reason
    assert str(at_check.value) == str(at_uri_check.value) == str(at_fetch.value)


def test_literal_checks_follow_the_policy_and_leave_names_to_the_resolver():
    allowed = FetchPolicy(allowed_networks=("127.0.0.0/8",))
    assert check_source("http://127.0.0.1:9/x.jsonl", policy=allowed) == "http://127.0.0.1:9/x.jsonl"
    check_uri("http://127.0.0.1:9/x.jpg", policy=allowed)
    check_uri("http://10.0.0.1/x.jpg", policy=FetchPolicy(allow_private=True))
    # Names are checked when resolved (each redirect too), not here.
    assert check_source("http://localhost:9/x.jsonl", policy=FetchPolicy()) == "http://localhost:9/x.jsonl"
    check_uri("https://images.example.com/a.jpg", policy=FetchPolicy())


@pytest.mark.parametrize("uri", ["gopher://example.com/x", "ftp://example.com/x.jpg", "file://host/x.jpg"])
def test_check_uri_refuses_schemes_as_the_fetch_does(uri):
    with pytest.raises(FetchRefused) as at_check:
        check_uri(uri, policy=FetchPolicy())
    with pytest.raises(FetchRefused) as at_fetch:
        fetch_bytes(uri, policy=FetchPolicy(), max_bytes=100, timeout_s=1)
    assert str(at_check.value) == str(at_fetch.value)


# -- object stores: only what object_store_allowed lists (issue 26) ------------------------------------

ALLOWED = FetchPolicy(object_store_allowed={"s3": ("photos", "shared/public/"), "memory": ("t",)})


@pytest.mark.parametrize(
    "uri",
    [
        "s3://photos/a.jpg",
        "s3://photos/deep/er/a.jpg",
        "s3://shared/public/a.jpg",
        "s3://shared/public/sub/a.jpg",
        "memory:///t/x.jsonl",
        "memory://t/x.jsonl",
    ],
)
def test_object_uris_under_an_allowed_prefix_pass(uri):
    check_uri(uri, policy=ALLOWED)
    assert check_source(uri, policy=ALLOWED) == uri


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("s3://other-bucket/a.jpg", "object prefix"),
        ("s3://photos2/a.jpg", "object prefix"),  # whole components: "photos" is not a prefix of "photos2"
        ("s3://shared/a.jpg", "object prefix"),
        ("s3://shared/public2/a.jpg", "object prefix"),
        ("s3://shared/private/../public/a.jpg", "object form"),
        ("s3://shared/public/../private/a.jpg", "object form"),
        ("s3://shared/public/%2e%2e/private/a.jpg", "object form"),
        ("s3://photos/./a.jpg", "object form"),
        ("s3://photos/a.jpg?versionId=1", "object form"),
        ("s3://photos/a.jpg#x", "object form"),
        ("s3://photos\\..\\secret/a.jpg", "object form"),
        ("s3://photos/a\tb.jpg", "object form"),
        ("s3://", "object form"),
        ("s3:///", "object form"),
        ("s3:/photos/a.jpg", "object form"),  # one slash: fsspec reads it relative to the working directory
        ("s3:photos/a.jpg", "object form"),
        ("simplecache::s3://photos/a.jpg", "chain"),
        ("zip://a.jpg::s3://photos/x.zip", "chain"),
        ("s3://photos/a.jpg::http://169.254.169.254/", "chain"),
        ("http::s3://photos/a.jpg", "chain"),
        ("gs://photos/a.jpg", "scheme"),  # the protocol is not listed at all
        ("local:///etc/passwd", "scheme"),
    ],
)
def test_object_uris_outside_the_allow_list_are_refused(uri, reason):
    with pytest.raises(FetchRefused) as at_uri:
        check_uri(uri, policy=ALLOWED)
    with pytest.raises(FetchRefused) as at_source:
        check_source(uri, policy=ALLOWED)
    with pytest.raises(FetchRefused) as at_fetch:
        fetch_bytes(uri, policy=ALLOWED, max_bytes=100, timeout_s=1)
    assert at_uri.value.reason == at_source.value.reason == at_fetch.value.reason == reason


def test_no_object_uri_is_accepted_by_default():
    """Issue 26: any client could name s3://any-bucket/... and have the service read it with its own
    credentials."""
    path = f"/t/{uuid.uuid4().hex}/i.bin"
    fsspec.filesystem("memory").pipe(path, b"\x89PNG")
    for uri in ("s3://any-bucket/secret.png", "gs://b/x.png", "az://c/x.png", f"memory://{path}"):
        with pytest.raises(FetchRefused, match="scheme") as err:
            FetchPolicy().fetch_image(uri, max_bytes=100)
        assert err.value.reason == "scheme"
        with pytest.raises(FetchRefused, match="not accepted"):
            check_source(uri, policy=FetchPolicy())


@pytest.mark.parametrize(
    ("allowed", "problem"),
    [
        ({"http": ("x",)}, "not an object-store protocol"),
        ({"file": ("x",)}, "not an object-store protocol"),
        ({"simplecache": ("x",)}, "not an object-store protocol"),
        ({"S3": ("x",)}, "not an object-store protocol"),
        ({"s3": ()}, "at least one"),
        ({"s3": ("/",)}, "names no bucket"),
        ({"s3": ("b/../c",)}, "'..'"),
        ({"s3": ("b?x",)}, "'?'"),
    ],
)
def test_the_allow_list_is_checked_when_the_policy_is_made(allowed, problem):
    with pytest.raises(ValueError, match=problem):
        FetchPolicy(object_store_allowed=allowed)


@pytest.mark.parametrize("source", ["http://[127.0.0.1]/x.jsonl", "http://[::1/x.jsonl", "https://h:99999/x"])
def test_a_malformed_source_is_a_fetch_error(source):
    with pytest.raises(FetchError, match="malformed URI"):
        check_source(source, policy=FetchPolicy())
