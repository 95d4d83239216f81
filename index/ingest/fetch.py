"""Fetching an image (or any other input) from a URI the client gave, without becoming an SSRF proxy.

Every fetch the service makes on a client's behalf goes through :func:`fetch_bytes` with a
:class:`FetchPolicy` (built from the builder args by ``AppArgs.fetch_policy()``). The policy is:

* ``http://`` and ``https://`` only (``file://`` only inside the configured allowed roots, resolved, so
  ``..`` and symlinks cannot escape). Any other scheme is refused, at the start and after a redirect.
* Object-store URIs (``s3://bucket/key``, read through fsspec with the service's own credentials) only
  under the buckets and prefixes ``object_store_allowed`` lists per protocol, written ``<protocol>://``;
  none by default. fsspec's ``::`` chains (``simplecache::``, ``zip::``, ``http::``) are never accepted.
* A URI that cannot be parsed is a :class:`FetchError` (a 400), never a bare ``ValueError``.
* The host is resolved once per hop and every address it resolves to must be public: private,
  loopback, link-local, site-local, multicast, reserved, unspecified, shared (CGNAT) and other
  non-global addresses are refused unless ``allow_private`` is set or the address lies in one of
  ``allowed_networks``. IPv4 addresses embedded in IPv6 ones (IPv4-mapped, 6to4, Teredo) are checked as
  IPv4. A host that does not resolve is refused with the same message as a non-public one, so that a
  client cannot tell internal names from unknown ones.
* The connection goes to the address that was checked (the name is not resolved a second time by the
  HTTP library), with the original name in ``Host`` and, for https, in SNI and certificate checks. So a
  DNS answer that changes between the check and the connection (DNS rebinding) cannot redirect the
  fetch to an internal address.
* Redirects are followed by hand, at most ``max_redirects`` of them, each hop checked like the first.
* A connect/read timeout and an overall deadline (``timeout_s``, DNS included), and a size cap.

Not covered: environment proxies (``HTTP_PROXY``) are not used, the connection is always direct; a
public address that itself forwards to internal services (an open proxy on the internet) is outside
what an address check can see.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import certifi
import urllib3
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator
from urllib3.exceptions import HTTPError as Urllib3Error

from index.errors import ImageTooLarge

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Answers an import retries (with backoff) before giving up on an image.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Protocols that ``object_store_allowed`` may not list: http(s) and local files have their own checks
#: (address checks, allowed roots), and fsspec's wrapper filesystems open other filesystems or archives.
RESERVED_PROTOCOLS = frozenset(
    {
        "",
        "http",
        "https",
        "file",
        "local",
        "simplecache",
        "filecache",
        "blockcache",
        "cached",
        "zip",
        "tar",
        "libarchive",
        "reference",
        "dir",
        "data",
    }
)
_PROTOCOL = re.compile(r"[a-z][a-z0-9+.-]*")
#: The message for a host that does not resolve and for one that resolves to a non-public address: the
#: same, so that a client cannot probe which internal names exist.
NOT_PUBLIC = (
    "refused: the host is not a public address or does not resolve (private, loopback, link-local and "
    "reserved addresses are not fetched unless the deployment allows them)"
)
USER_AGENT = "image-search-fetch/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolver(host, port)`` -> the IP addresses (as text) a connection to ``host`` may use.
Resolver = Callable[[str, int], Sequence[str]]


class FetchError(ValueError):
    """The URI could not be fetched; the message says why (and is safe to show the client).

    Attributes:
        retriable: a transient failure (connection error, timeout, HTTP 429/5xx) worth trying again.
    """

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class FetchRefused(FetchError):
    """The policy forbids fetching this URI (scheme, file root, or a non-public address).

    Attributes:
        reason: a short category, e.g. ``"loopback"``, ``"private"``, ``"scheme"`` (for logs and tests;
            the message shown to the client does not reveal what an internal name resolves to).
        address: the refused address, when the refusal is about one.
    """

    def __init__(self, message: str, *, reason: str, address: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.address = address


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system's resolver gives for ``host`` (A and AAAA, in its order)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for *_, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in out:
            out.append(addr)
    return out


class FetchPolicy(BaseModel):
    """Where a fetch may go. The defaults are the safe ones: public http(s) addresses only."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    allowed_file_roots: tuple[str, ...] = Field((), description="directories file:// URIs may point into")
    allow_private: bool = Field(False, description="skip the address check (trusted internal deployments)")
    allowed_networks: tuple[IPvAnyNetwork, ...] = Field(
        (), description="networks allowed although not public, e.g. an internal image store's 10.1.2.0/24"
    )
    max_redirects: int = Field(
        5, ge=0, le=20, description="redirects followed when fetching image_uri, each hop checked again"
    )
    schemes: tuple[Literal["http", "https"], ...] = Field(("http", "https"), min_length=1)
    resolver: Resolver = Field(system_resolver, exclude=True, description="name -> addresses (tests inject)")
    import_roots: tuple[str, ...] = Field((), description="directories local import sources may lie in")
    object_store_allowed: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="fsspec protocol -> the 'bucket' or 'bucket/prefix' entries under which clients may name "
        "objects (image URIs, import sources, the image URIs in them); an unlisted protocol is refused",
    )
    timeout_s: float = Field(10.0, gt=0, description="connect/read timeout and deadline of one image fetch")
    source_timeout_s: float = Field(
        30.0, gt=0, description="connect/read timeout of an http(s) import source (no overall deadline)"
    )

    @field_validator("object_store_allowed")
    @classmethod
    def _allowed_prefixes(cls, allowed: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for protocol, prefixes in allowed.items():
            if protocol in RESERVED_PROTOCOLS or not _PROTOCOL.fullmatch(protocol):
                raise ValueError(
                    f"{protocol!r} is not an object-store protocol this list may name (lower-case fsspec "
                    "protocols such as s3, gs, az; http(s) and file:// have their own settings)"
                )
            if not prefixes:
                raise ValueError(f"{protocol}: list at least one 'bucket' or 'bucket/prefix'")
            for prefix in prefixes:
                problem = _object_path_problem(prefix.strip("/"))
                if problem is not None:
                    raise ValueError(
                        f"{protocol}: {prefix!r} is not a 'bucket' or 'bucket/prefix': {problem}"
                    )
        return allowed

    def fetch_image(
        self, uri: str, *, max_bytes: int, retries: int = 0, pools: ConnectionPools | None = None
    ) -> bytes:
        """:func:`fetch_bytes` under this policy, with ``timeout_s``; transient failures (connection
        errors, timeouts, HTTP 429/5xx) are tried again up to ``retries`` times, backing off
        exponentially from 0.2 s. Refusals and other errors are never retried."""
        for attempt in range(retries + 1):
            try:
                return fetch_bytes(
                    uri, policy=self, max_bytes=max_bytes, timeout_s=self.timeout_s, pools=pools
                )
            except FetchRefused:
                raise
            except FetchError as exc:
                if not exc.retriable or attempt == retries:
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    def check_address(self, address: str) -> None:
        """Raise :class:`FetchRefused` unless a connection to ``address`` is allowed."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
        except ValueError:
            raise FetchRefused("refused: the host resolved to an invalid address", reason="invalid") from None
        forms = (ip, ip.ipv4_mapped) if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else (ip,)
        if self.allow_private or any(f in net for f in forms for net in self.allowed_networks):
            return
        reason = non_public_reason(ip)
        if reason is not None:
            raise FetchRefused(NOT_PUBLIC, reason=reason, address=str(ip))


def non_public_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (``None`` when it is one)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return non_public_reason(embedded)
        if ip in _NAT64:  # 64:ff9b::a.b.c.d reaches a.b.c.d through a NAT64 gateway
            return non_public_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        # fec0::/10, deprecated (RFC 3879) but still routed inside some sites; Python 3.11 calls it global
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for reason, hit in checks:
        if hit:
            return reason
    # Catches what the flags above miss, e.g. shared address space 100.64.0.0/10 (carrier-grade NAT).
    return None if ip.is_global else "not globally routable"


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def fetch_bytes(
    uri: str, *, policy: FetchPolicy, max_bytes: int, timeout_s: float, pools: ConnectionPools | None = None
) -> bytes:
    """Return the bytes ``uri`` points to, within ``policy``.

    Args:
        uri: an ``http(s)://`` or ``file://`` URI.
        policy: where fetches may go (see :class:`FetchPolicy`).
        max_bytes: the most bytes accepted.
        timeout_s: connect and read timeout, and the overall deadline of the whole fetch.
        pools: keep-alive connections to reuse (see :class:`ConnectionPools`); None: a fresh connection,
            closed after the fetch.

    Raises:
        FetchRefused: the policy forbids the URI or an address it (or a redirect) resolves to.
        FetchError: bad URI, DNS or network error, non-2xx answer, too many redirects, deadline passed.
        ImageTooLarge: more than ``max_bytes``.
    """
    check_uri(uri, policy=policy)
    parts = split_uri(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _read_file(unquote(parts.path), max_bytes=max_bytes, allowed_roots=policy.allowed_file_roots)
    if scheme in policy.schemes:
        return _fetch_http(uri, policy=policy, max_bytes=max_bytes, timeout_s=timeout_s, pools=pools)
    return _read_object(uri, max_bytes=max_bytes)  # check_uri let it through: an allowed object


def split_uri(uri: str) -> SplitResult:
    """``urlsplit(uri)``, with its host and port checked too.

    Raises:
        FetchError: the URI is malformed (``urlsplit`` raises a bare ``ValueError`` for e.g.
            ``http://[127.0.0.1]/``, an unclosed ``[``, or a host that changes under NFKC normalisation).
    """
    try:
        parts = urlsplit(uri)
        parts.hostname  # noqa: B018 - raises for a malformed bracketed host
        parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError as exc:
        raise FetchError(f"malformed URI: {exc}") from None
    return parts


def check_uri(uri: str, *, policy: FetchPolicy) -> None:
    """Refuse what can be refused without connecting, with the message a fetch would give: a scheme the
    policy does not accept, a ``file://`` URI naming a host, an http(s) URI whose host is a literal IP
    address the policy refuses, an object-store URI outside ``object_store_allowed``
    (:func:`check_object_uri`), an fsspec chain. Host names are checked when they are resolved (each
    redirect too).

    Raises:
        FetchRefused: as :func:`fetch_bytes` would for the same URI.
        FetchError: the URI is malformed (:func:`split_uri`).
    """
    refuse_chain(uri)
    parts = split_uri(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchRefused("file:// URIs must not name a host", reason="file host")
        return
    if scheme in policy.schemes:
        _check_literal_host(parts, policy)
        return
    allowed = " or ".join(f"{s}://" for s in (*policy.schemes, *policy.object_store_allowed))
    check_object_uri(
        uri,
        scheme,
        policy,
        refusal=f"cannot fetch a URI with scheme {scheme or '(none)'!r}: use {allowed} "
        "(or file:// under an allowed root), or send the image itself",
    )


def check_object_uri(uri: str, scheme: str, policy: FetchPolicy, *, refusal: str) -> None:
    """Refuse an object-store URI unless it lies under one of ``policy.object_store_allowed``'s entries
    for its protocol (whole path components: ``bucket/photos`` allows ``bucket/photos/a.jpg``, not
    ``bucket/photos2/a.jpg``), is written ``<protocol>://`` and is no fsspec ``::`` chain.

    Args:
        scheme: the URI's scheme, lower-cased.
        refusal: the message for a protocol that is not listed at all.
    Raises:
        FetchRefused: ``reason`` is ``"chain"``, ``"scheme"``, ``"object form"`` or ``"object prefix"``.
    """
    refuse_chain(uri)
    prefixes = policy.object_store_allowed.get(scheme)
    if not scheme or prefixes is None:
        raise FetchRefused(refusal, reason="scheme")
    rest = uri[len(scheme) :]
    if not rest.startswith("://"):
        raise FetchRefused(f"an object-store URI is written {scheme}://bucket/key", reason="object form")
    path = rest[3:].lstrip("/")
    problem = _object_path_problem(path)
    if problem is not None:
        raise FetchRefused(f"not a usable object-store URI: {problem}", reason="object form")
    components = path.split("/")
    for prefix in prefixes:
        wanted = prefix.strip("/").split("/")
        if components[: len(wanted)] == wanted:
            return
    raise FetchRefused(
        f"{scheme}:// objects are accepted only under the buckets and prefixes this deployment allows "
        "(object_store_allowed)",
        reason="object prefix",
    )


def refuse_chain(uri: str) -> None:
    """Refuse an fsspec chain (``simplecache::s3://...``, ``zip://a::s3://b.zip``, ``http::...``): it
    would let fsspec open other filesystems, archives or http hosts past every check here. ``::`` in an
    http(s) URI (an IPv6 literal) or a local path means nothing to fsspec and is left alone.

    Raises:
        FetchRefused: ``reason`` ``"chain"``.
    """
    if "::" in uri and not uri.lower().startswith(("http://", "https://", "file://", "/")):
        raise FetchRefused("chained fsspec URLs ('::') are not accepted", reason="chain")


def _object_path_problem(path: str) -> str | None:
    """What makes ``bucket[/key]`` unusable for an allow-list check, or None."""
    if not path or path.startswith("/"):
        return "it names no bucket"
    if any(c in path for c in "?#\\") or "::" in path or not path.isprintable():
        return "'?', '#', '\\', '::' and control characters are not accepted"
    if any(unquote(c) in (".", "..") for c in path.split("/")):
        return "'.' and '..' path components are not accepted"
    return None


def _check_literal_host(parts: SplitResult, policy: FetchPolicy) -> None:
    """`FetchPolicy.check_address` for a host written as an IP address (a name is left to the resolver)."""
    host = parts.hostname  # split_uri checked that it parses
    if host is None:
        return
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return
    policy.check_address(host)


def _fetch_http(
    uri: str, *, policy: FetchPolicy, max_bytes: int, timeout_s: float, pools: ConnectionPools | None
) -> bytes:
    deadline = time.monotonic() + timeout_s
    resp, pool = _open_http(uri, policy=policy, timeout_s=timeout_s, deadline=deadline, pools=pools)
    done = False
    try:
        body = _read_body(resp, max_bytes, deadline, timeout_s)
        done = True
        return body
    finally:
        _finish(resp, pool, pools, reusable=done)


def _finish(
    resp: urllib3.BaseHTTPResponse,
    pool: urllib3.HTTPConnectionPool,
    pools: ConnectionPools | None,
    *,
    reusable: bool,
) -> None:
    """Hand the connection back to its shared pool when it can carry another request, else close it."""
    if pools is not None and reusable:
        resp.release_conn()  # the body was read to its end: the connection can carry the next request
        return
    resp.close()  # an unread or partly read body (a redirect, an error, too large): not reusable
    resp.release_conn()
    if pools is None:
        pool.close()


def _open_http(
    uri: str,
    *,
    policy: FetchPolicy,
    timeout_s: float,
    deadline: float | None,
    pools: ConnectionPools | None = None,
) -> tuple[urllib3.BaseHTTPResponse, urllib3.HTTPConnectionPool]:
    """Follow ``uri`` (each hop checked) to a 2xx answer whose body is not read yet; the caller
    finishes the response (:func:`_finish`). ``deadline=None``: only per-connect/read timeouts."""
    url = uri
    for hop in range(policy.max_redirects + 1):
        target = _Target.parse(url, policy)
        addresses = _resolve(target.host, target.port, policy.resolver, _left(deadline, timeout_s))
        for address in addresses:
            policy.check_address(address)
        resp, pool = _connect_and_get(target, addresses, deadline, timeout_s, pools)
        ok = False
        try:
            if resp.status in REDIRECT_STATUSES:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchError(f"answered HTTP {resp.status} without a Location")
                try:
                    url = urljoin(url, location)
                except ValueError:
                    raise FetchError("answered a redirect to a malformed URI") from None
                logger.debug("fetch redirect %d: %s -> %s", hop + 1, target.host, split_uri(url).hostname)
                continue
            if not 200 <= resp.status < 300:
                raise FetchError(f"answered HTTP {resp.status}", retriable=resp.status in RETRY_STATUSES)
            ok = True
            return resp, pool
        finally:
            if not ok:
                _finish(resp, pool, pools, reusable=False)
    raise FetchError(f"more than {policy.max_redirects} redirects")


def _left(deadline: float | None, timeout_s: float) -> float:
    return timeout_s if deadline is None else min(timeout_s, _remaining(deadline, timeout_s))


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # the name (IDNA-encoded) or IP literal, without brackets
    port: int
    host_header: str
    path: str

    @classmethod
    def parse(cls, url: str, policy: FetchPolicy) -> _Target:
        parts = split_uri(url)
        scheme = parts.scheme.lower()
        if scheme not in policy.schemes:
            # Also reached by a redirect: a server must not bounce us to file:// or gopher://.
            raise FetchRefused(f"refused to follow a URI with scheme {scheme or '(none)'!r}", reason="scheme")
        if parts.username is not None or parts.password is not None:
            raise FetchError("credentials in the URI are not supported")
        if not parts.hostname:
            raise FetchError("the URI has no host")
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchError("the URI's host is not a valid domain name") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, host, port, parts.netloc.rpartition("@")[2], path)


def _remaining(deadline: float, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"took longer than {timeout_s:g} s")
    return left


def _resolve(host: str, port: int, resolver: Resolver, wait_s: float) -> list[str]:
    """Resolve in a helper thread so that a hanging DNS server cannot outlast the deadline."""
    try:
        return [str(ipaddress.ip_address(host))]  # an IP literal needs no lookup
    except ValueError:
        pass
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-dns")
    try:
        future = pool.submit(resolver, host, port)
        addresses = list(future.result(timeout=wait_s))
    except concurrent.futures.TimeoutError:
        raise FetchError(f"resolving host {host!r} took too long") from None
    except (OSError, UnicodeError):
        raise FetchRefused(NOT_PUBLIC, reason="unresolvable") from None
    finally:
        pool.shutdown(wait=False)  # a stuck lookup finishes (or not) on its own; nobody waits for it
    if not addresses:
        raise FetchRefused(NOT_PUBLIC, reason="unresolvable")
    return addresses


def _connect_and_get(
    target: _Target,
    addresses: list[str],
    deadline: float | None,
    timeout_s: float,
    pools: ConnectionPools | None = None,
) -> tuple[urllib3.BaseHTTPResponse, urllib3.HTTPConnectionPool]:
    """GET ``target`` from the first of the checked ``addresses`` that accepts a connection."""
    last: Exception | None = None
    for address in addresses:
        left = _left(deadline, timeout_s)
        timeout = urllib3.Timeout(connect=left, read=left)
        pool = pools.pool(target, address) if pools is not None else _new_pool(target, address, 1)
        try:
            resp = pool.urlopen(
                "GET",
                target.path,
                headers={"Host": target.host_header, "User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                redirect=False,
                retries=False,
                timeout=timeout,
                preload_content=False,
                decode_content=False,
                assert_same_host=False,
            )
            return resp, pool
        except urllib3.exceptions.NewConnectionError as exc:  # try the host's next address
            if pools is None:
                pool.close()
            last = exc
        except (Urllib3Error, OSError) as exc:
            if pools is None:
                pool.close()
            raise FetchError(f"fetch failed: {_describe(exc)}", retriable=True) from exc
    raise FetchError(
        f"fetch failed: cannot connect to host {target.host!r} (ConnectionError)", retriable=True
    ) from last


def _new_pool(target: _Target, address: str, maxsize: int) -> urllib3.HTTPConnectionPool:
    """A connection pool pinned to the checked ``address``; TLS verifies (and SNI names) the host."""
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            address,
            target.port,
            maxsize=maxsize,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            assert_hostname=target.host,
            server_hostname=target.host,
        )
    return urllib3.HTTPConnectionPool(address, target.port, maxsize=maxsize, retries=False)


class ConnectionPools:
    """Keep-alive connections shared by many fetches (an import's images, an ingress's requests).

    A pool is keyed by (scheme, host, port, address): a fetch still resolves the host and checks every
    address before it takes the pool of the address it checked, so reuse changes no SSRF rule, and a
    connection is only ever reused for the host name (TLS verification, SNI) it was opened for. At most
    ``max_hosts`` pools, the least recently used closed first, each with up to ``per_host`` idle
    connections. Thread-safe.
    """

    def __init__(self, *, max_hosts: int = 32, per_host: int = 8) -> None:
        self.max_hosts = max_hosts
        self.per_host = per_host
        self._pools: collections.OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def pool(self, target: _Target, address: str) -> urllib3.HTTPConnectionPool:
        key = (target.scheme, target.host, target.port, address)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = _new_pool(target, address, self.per_host)
                while len(self._pools) > self.max_hosts:
                    self._pools.popitem(last=False)[1].close()
            self._pools.move_to_end(key)
            return pool

    def __len__(self) -> int:
        return len(self._pools)

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), collections.OrderedDict()
        for pool in pools:
            pool.close()


def _read_body(resp: urllib3.BaseHTTPResponse, max_bytes: int, deadline: float, timeout_s: float) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"the content is {declared} bytes; the limit is {max_bytes}")
    buf = bytearray()
    try:
        while True:
            # read1: whatever one recv gives (a blocking read(n) would wait for n bytes, so a server
            # dripping a byte at a time would outlast the deadline)
            chunk = resp.read1(CHUNK, decode_content=False)
            if not chunk:
                break
            buf += chunk
            if len(buf) > max_bytes:
                raise ImageTooLarge(f"the content is more than {max_bytes} bytes")
            _remaining(deadline, timeout_s)  # a slow drip must not hold a worker forever
    except (Urllib3Error, OSError) as exc:
        raise FetchError(f"fetch failed: {_describe(exc)}", retriable=True) from exc
    return bytes(buf)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib3.exceptions.TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "TLS error (certificate not valid for the host?)"
    return type(exc).__name__


def _read_file(path: str, *, max_bytes: int, allowed_roots: Sequence[str]) -> bytes:
    if not allowed_roots:
        raise FetchRefused("file:// URIs are disabled (no allowed_file_roots configured)", reason="file")
    real = Path(path).resolve()
    if not any(real.is_relative_to(Path(root).resolve()) for root in allowed_roots):
        raise FetchRefused("the path is outside the allowed file roots", reason="file root")
    try:
        size = real.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(f"the file is {size} bytes; the limit is {max_bytes}")
        return real.read_bytes()
    except OSError as exc:
        raise FetchError(f"cannot read the file: {exc.strerror}") from exc


def _read_object(uri: str, *, max_bytes: int) -> bytes:
    import fsspec  # imported on use: most deployments never read from an object store

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(max_bytes + 1)
    except ImportError as exc:  # fsspec's "Install s3fs to access S3"
        raise FetchError(f"cannot read the object: {exc}") from exc
    except FileNotFoundError as exc:
        raise FetchError("cannot read the object: no such object") from exc
    except Exception as exc:  # each fsspec backend raises its own types (botocore, aiohttp, ...)
        raise FetchError(f"cannot read the object: {type(exc).__name__}: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the object is more than {max_bytes} bytes")
    return data


# -- import sources ------------------------------------------------------------------------------


def check_source(source: str, *, policy: FetchPolicy) -> str:
    """Check that an import ``source`` is one the service may read; return its canonical form.

    A local file is given as an absolute path or a ``file://`` URI and must lie inside
    ``policy.import_roots`` (it is returned as the resolved absolute path, and must exist); ``http(s)://``
    URIs are returned as given (their addresses are checked when opened, each redirect too);
    object-store URIs must lie under ``policy.object_store_allowed`` (:func:`check_object_uri`).

    Raises:
        FetchError: the message says what is wrong with ``source``.
    """
    refuse_chain(source)
    parts = split_uri(source)
    scheme = parts.scheme.lower()
    if scheme in policy.schemes:
        if not parts.netloc:
            raise FetchError(f"source {source[:200]!r} has no host")
        _check_literal_host(parts, policy)  # refused now rather than when the task opens it
        return source
    if scheme in ("", "file"):
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise FetchRefused("file:// URIs must not name a host", reason="file host")
        path = unquote(parts.path) if scheme == "file" else source
        if not path.startswith("/"):
            raise FetchError(
                "source must be an absolute path, a file:// URI, an http(s):// URI or an object-store URI"
            )
        if not policy.import_roots:
            raise FetchRefused(
                "local import sources are disabled (no import_roots configured)", reason="file"
            )
        real = Path(path).resolve()
        if not any(real.is_relative_to(Path(root).resolve()) for root in policy.import_roots):
            raise FetchRefused("source points outside the allowed import roots", reason="file root")
        if not real.is_file():
            raise FetchError(f"source {path!r} is not a readable file")
        return str(real)
    allowed = [f"{s}://" for s in policy.schemes] + ["a path under import_roots"]
    allowed += [p + "://" for p in policy.object_store_allowed]
    check_object_uri(
        source,
        scheme,
        policy,
        refusal=f"source scheme {parts.scheme!r} is not accepted; use {', '.join(allowed)}",
    )
    return source


def is_local_source(source: str) -> bool:
    """Whether a source returned by :func:`check_source` is a local file (cheap to read twice)."""
    return source.startswith("/")
