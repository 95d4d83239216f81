"""index.ingest.fetch: the SSRF policy (schemes, addresses after DNS, redirects), limits and file roots.

A loopback HTTP server stands in for the internet; an injected resolver decides what each test host name
"resolves" to, so every address class is exercised without a network.
"""

from __future__ import annotations

import http.server
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from index.ingest.fetch import (
    FetchError,
    FetchPolicy,
    FetchRefused,
    check_uri,
    fetch_bytes,
    non_public_reason,
)
from index.model.imaging import ImageTooLarge

PAYLOAD = b"\x89PNG fake image bytes" * 10
LOOPBACK = ("127.0.0.0/8",)


class _Server:
    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.hits = 0
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                outer.hits += 1
                outer.hosts.append(self.headers.get("Host", ""))
                path, _, query = self.path.partition("?")
                if path == "/photo":
                    self._answer(200, PAYLOAD, {"Content-Length": str(len(PAYLOAD))})
                elif path == "/redirect":
                    self._answer(302, b"", {"Location": query})
                elif path == "/relative":
                    self._answer(301, b"", {"Location": "photo"})
                elif path == "/loop":
                    self._answer(302, b"", {"Location": "/loop"})
                elif path == "/malformed-redirect":  # urljoin raises on it (a bracketed IPv4 host)
                    self._answer(302, b"", {"Location": "http://[127.0.0.1]/x.jpg"})
                elif path == "/nolocation":
                    self._answer(302, b"", {})
                elif path == "/big":
                    self._answer(200, b"x" * 5000, {"Content-Length": "5000"})
                elif path == "/big-undeclared":  # no Content-Length: the body ends when the server closes
                    self._answer(200, b"x" * 5000, {})
                elif path == "/slow":
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(100):
                        if outer.release.wait(0.05):
                            break
                        self.wfile.write(b"x")
                        self.wfile.flush()
                else:
                    self._answer(404, b"no", {"Content-Length": "2"})

            def _answer(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    """A resolver answering from ``table`` (unknown names fail like an NXDOMAIN)."""

    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def fetch(uri: str, policy: FetchPolicy, *, max_bytes: int = 10_000, timeout_s: float = 5.0) -> bytes:
    return fetch_bytes(uri, policy=policy, max_bytes=max_bytes, timeout_s=timeout_s)


# -- the default refuses every non-public address, before connecting ------------------------------------


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::5", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),  # connects to the local host on Linux
        ("::", "unspecified"),
        ("240.0.0.1", "private"),  # reserved (Python files 240/4 under is_private first)
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("2002:a00:1::", "private"),  # 6to4 wrapping 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("fec0::1", "site-local"),  # issue 26: deprecated site-local, "global" to Python 3.11
        ("fefe::1", "site-local"),
    ],
)
def test_default_policy_refuses_non_public_addresses(server, address, reason):
    policy = FetchPolicy(resolver=resolver({"evil.test": [address]}))
    with pytest.raises(FetchRefused) as info:
        fetch(server.url("/photo", "evil.test"), policy)
    assert info.value.reason == reason
    assert info.value.address == str(ipaddress.ip_address(address))
    assert address not in str(info.value)  # the client is not told what an internal name resolves to
    assert server.hits == 0


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "[::1]", "2130706433", "0x7f.1", "0", "localhost", "[::ffff:127.0.0.1]"]
)
def test_default_policy_refuses_loopback_literals_with_the_system_resolver(server, host):
    """IP literals and odd spellings of 127.0.0.1 all go through the same check."""
    with pytest.raises(FetchRefused):
        fetch(f"http://{host}:{server.port}/photo", FetchPolicy())
    assert server.hits == 0


def test_one_bad_address_among_good_ones_is_refused(server):
    policy = FetchPolicy(resolver=resolver({"mixed.test": ["93.184.216.34", "10.0.0.1"]}))
    with pytest.raises(FetchRefused) as info:
        fetch(server.url("/photo", "mixed.test"), policy)
    assert info.value.reason == "private"


def test_public_addresses_pass_the_check():
    policy = FetchPolicy()
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        policy.check_address(address)
    assert non_public_reason(ipaddress.ip_address("1.1.1.1")) is None


# -- allow-lists ----------------------------------------------------------------------------------------


def test_allowed_network_lets_loopback_through_and_the_connection_is_pinned(server):
    calls: list[str] = []
    policy = FetchPolicy(allowed_networks=LOOPBACK, resolver=resolver({"images.test": ["127.0.0.1"]}, calls))
    # "images.test" does not resolve on this machine: success proves the HTTP client connected to the
    # address the policy checked instead of resolving the name again (which DNS rebinding would exploit).
    assert fetch(server.url("/photo", "images.test"), policy) == PAYLOAD
    assert calls == ["images.test"]
    assert server.hosts == [f"images.test:{server.port}"]


def test_allowed_networks_only_cover_what_they_name(server):
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), resolver=resolver({"a.test": ["127.0.0.2"]}))
    with pytest.raises(FetchRefused):
        fetch(server.url("/photo", "a.test"), policy)
    FetchPolicy(allowed_networks=LOOPBACK).check_address("::ffff:127.0.0.1")  # mapped form matches too


def test_allow_private_disables_the_address_check(server):
    assert fetch(server.url("/photo"), FetchPolicy(allow_private=True)) == PAYLOAD


def test_policy_validates_its_settings():
    with pytest.raises(ValueError):
        FetchPolicy(allowed_networks=("10.0.0.0/33",))
    with pytest.raises(ValueError):
        FetchPolicy(max_redirects=-1)
    with pytest.raises(ValueError):
        FetchPolicy(schemes=("ftp",))
    assert FetchPolicy(allowed_networks=("10.0.0.0/8",)).allowed_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
    )


# -- redirects: every hop is checked again -------------------------------------------------------------


def test_redirect_to_a_private_address_is_refused(server):
    policy = FetchPolicy(
        allowed_networks=("127.0.0.1/32",),
        resolver=resolver({"cdn.test": ["127.0.0.1"], "internal.test": ["10.0.0.5"]}),
    )
    with pytest.raises(FetchRefused) as info:
        fetch(server.url("/redirect?http://internal.test/secret", "cdn.test"), policy)
    assert info.value.reason == "private"
    assert server.hits == 1


def test_redirect_to_an_ip_literal_is_checked_too(server):
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), resolver=resolver({"cdn.test": ["127.0.0.1"]}))
    # the first hop (127.0.0.1) is allowed; the redirect's 127.0.0.2 is not (and skips the resolver)
    with pytest.raises(FetchRefused) as info:
        fetch(server.url(f"/redirect?http://127.0.0.2:{server.port}/photo", "cdn.test"), policy)
    assert (info.value.reason, info.value.address) == ("loopback", "127.0.0.2")
    assert server.hits == 1


@pytest.mark.parametrize("target", ["file:///etc/passwd", "gopher://x/", "ftp://example.com/a.jpg"])
def test_redirect_to_another_scheme_is_refused(server, target):
    policy = FetchPolicy(allowed_networks=LOOPBACK, allowed_file_roots=("/",))
    with pytest.raises(FetchRefused) as info:
        fetch(server.url(f"/redirect?{target}"), policy)
    assert info.value.reason == "scheme"


def test_redirects_are_followed_up_to_the_limit(server):
    policy = FetchPolicy(allowed_networks=LOOPBACK)
    assert fetch(server.url("/relative"), policy) == PAYLOAD
    assert fetch(server.url(f"/redirect?{server.url('/relative')}"), policy) == PAYLOAD
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(server.url("/loop"), policy)
    assert server.hits == 2 + 3 + 6
    with pytest.raises(FetchError, match="more than 0 redirects"):
        fetch(server.url("/relative"), FetchPolicy(allowed_networks=LOOPBACK, max_redirects=0))
    with pytest.raises(FetchError, match="without a Location"):
        fetch(server.url("/nolocation"), policy)


def test_https_is_refused_when_only_http_is_allowed(server):
    with pytest.raises(FetchRefused):
        fetch("https://example.com/a.jpg", FetchPolicy(schemes=("http",)))


# -- limits and failures ---------------------------------------------------------------------------------


def test_size_limit_declared_and_streamed(server):
    policy = FetchPolicy(allowed_networks=LOOPBACK)
    with pytest.raises(ImageTooLarge, match="is 5000 bytes"):
        fetch(server.url("/big"), policy, max_bytes=1000)
    with pytest.raises(ImageTooLarge, match="more than 1000"):
        fetch(server.url("/big-undeclared"), policy, max_bytes=1000)
    assert len(fetch(server.url("/big-undeclared"), policy, max_bytes=5000)) == 5000


def test_slow_body_hits_the_overall_deadline(server):
    with pytest.raises(FetchError, match=r"longer than 0\.3 s"):
        fetch(server.url("/slow"), FetchPolicy(allowed_networks=LOOPBACK), timeout_s=0.3)


def test_hanging_dns_hits_the_deadline():
    release = threading.Event()

    def stuck(host: str, port: int) -> list[str]:
        release.wait(10)
        return ["93.184.216.34"]

    try:
        with pytest.raises(FetchError, match="took too long"):
            fetch("http://slow-dns.test/a.jpg", FetchPolicy(resolver=stuck), timeout_s=0.2)
    finally:
        release.set()


def test_http_errors_and_unresolvable_names(server):
    policy = FetchPolicy(allowed_networks=LOOPBACK, resolver=resolver({"ok.test": ["127.0.0.1"]}))
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(server.url("/missing", "ok.test"), policy)
    with pytest.raises(FetchRefused, match="not a public address or does not resolve") as info:
        fetch("http://nowhere.test/a.jpg", policy)
    assert info.value.reason == "unresolvable"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(FetchError, match="cannot connect"):
        fetch(f"http://ok.test:{port}/a.jpg", policy)


@pytest.mark.parametrize(
    "uri, match",
    [
        ("ftp://example.com/x.jpg", "scheme 'ftp'"),
        ("not a uri", "scheme '\\(none\\)'"),
        ("gopher://example.com/", "scheme 'gopher'"),
        ("http://user:pw@example.com/a.jpg", "credentials"),
        ("http:///a.jpg", "no host"),
    ],
)
def test_bad_uris(uri, match):
    with pytest.raises(FetchError, match=match):
        fetch(uri, FetchPolicy(resolver=resolver({})))


@pytest.mark.parametrize(
    "uri, match",
    [
        ("http://example.com:99999/a.jpg", "Port out of range"),
        ("http://example.com:x/a.jpg", "Port could not be cast"),
        # issue 26: urlsplit raises a bare ValueError for these (the ingress answered 500)
        ("http://[127.0.0.1]/x.jpg", "An IPv4 address cannot be in brackets"),
        ("http://[::1/x.jpg", "Invalid IPv6 URL"),
        ("http://ex\uff0fample.com/x.jpg", "NFKC"),
        ("s3://[bucket/x.jpg", "Invalid IPv6 URL"),
    ],
)
def test_malformed_uris_are_fetch_errors_before_any_fetch(uri, match):
    policy = FetchPolicy(resolver=resolver({}), object_store_allowed={"s3": ("bucket",)})
    with pytest.raises(FetchError, match=f"malformed URI: .*{match}"):
        check_uri(uri, policy=policy)  # what the ingress checks first (a 400)
    with pytest.raises(FetchError, match=f"malformed URI: .*{match}"):
        fetch(uri, policy)


def test_an_unknown_name_and_an_internal_one_are_refused_alike(server):
    """Issue 26: "cannot resolve host" against "not a public address" told a client which internal
    names exist."""
    policy = FetchPolicy(resolver=resolver({"intranet.test": ["10.0.0.7"]}))
    messages = set()
    for host in ("intranet.test", "nowhere.test"):
        with pytest.raises(FetchRefused) as info:
            fetch(server.url("/photo", host), policy)
        messages.add(str(info.value))
    assert len(messages) == 1 and "intranet" not in messages.pop()
    assert server.hits == 0


def test_a_redirect_to_a_malformed_uri_is_a_fetch_error(server):
    policy = FetchPolicy(allowed_networks=LOOPBACK)
    with pytest.raises(FetchError, match="malformed URI"):
        fetch(server.url("/malformed-redirect"), policy)


def test_tls_certificate_is_checked_against_the_name(tmp_path):
    """Pinning the address must not weaken TLS: a certificate for another name is refused."""
    cert, key = _self_signed(tmp_path, "other.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        policy = FetchPolicy(allowed_networks=LOOPBACK, resolver=resolver({"images.test": ["127.0.0.1"]}))
        with pytest.raises(FetchError, match="TLS"):
            fetch(f"https://images.test:{httpd.server_address[1]}/a.jpg", policy)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _self_signed(tmp_path: Path, name: str) -> tuple[str, str]:
    crypto = pytest.importorskip("cryptography")
    del crypto
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


# -- file:// ---------------------------------------------------------------------------------------------


def test_file_uris_only_under_allowed_roots(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(PAYLOAD)
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", root / "link.jpg")
    policy = FetchPolicy(allowed_file_roots=(str(root),))
    assert fetch(f"file://{root}/a.jpg", policy) == PAYLOAD
    with pytest.raises(FetchRefused, match="disabled"):
        fetch(f"file://{root}/a.jpg", FetchPolicy())
    escapes = (
        f"file://{root}/../secret",
        f"file://{root}/%2e%2e/secret",  # percent-encoded: decoded before the path is resolved
        f"file://{root}/%2E%2E/secret",
        f"file://{root}/link.jpg",
        "file:///etc/passwd",
        "file:///proc/self/environ",
        f"file://{root}/../../../../proc/self/environ",
    )
    for escape in escapes:
        with pytest.raises(FetchRefused, match="outside the allowed"):
            fetch(escape, policy)
    with pytest.raises(FetchRefused, match="host"):
        fetch(f"file://evil.example{root}/a.jpg", policy)
    with pytest.raises(ImageTooLarge):
        fetch(f"file://{root}/a.jpg", policy, max_bytes=10)
    with pytest.raises(FetchError, match="cannot read"):
        fetch(f"file://{root}/missing.jpg", policy)


def test_proxies_from_the_environment_are_not_used(server, monkeypatch):
    """The review found this sound (issue 26); pinned: a proxy would resolve and connect past the check."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://10.9.9.9:3128")
    policy = FetchPolicy(allowed_networks=LOOPBACK, resolver=resolver({"ok.test": ["127.0.0.1"]}))
    assert fetch(server.url("/photo", "ok.test"), policy) == PAYLOAD
    assert server.hits == 1 and server.hosts == [f"ok.test:{server.port}"]


def test_a_resolver_answer_that_is_not_an_address_is_refused(server):
    policy = FetchPolicy(resolver=resolver({"odd.test": ["not-an-ip"]}))
    with pytest.raises(FetchRefused) as info:
        fetch(server.url("/photo", "odd.test"), policy)
    assert info.value.reason == "invalid"


def test_allowed_ipv6_literal_is_fetched():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")

    class V6Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args: Any) -> None:
            pass

    try:
        httpd = V6Server(("::1", 0), Handler)
    except OSError:
        pytest.skip("cannot bind ::1 on this machine")
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://[::1]:{httpd.server_address[1]}/photo"
        assert fetch(url, FetchPolicy(allowed_networks=("::1/128",))) == PAYLOAD
        with pytest.raises(FetchRefused):
            fetch(url, FetchPolicy(allowed_networks=LOOPBACK))
    finally:
        httpd.shutdown()
        httpd.server_close()
