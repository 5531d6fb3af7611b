"""The URL guard: which URLs may be fetched, and bounds on what one fetch may cost.

img2dataset fetches with ``urllib.request.urlopen``, which takes ``file://``, ``ftp://`` and
``data:`` URLs, follows redirects anywhere, connects to whatever a host name resolves to, reads
a body of any size and, for a server that dribbles one byte at a time, waits forever (its
``timeout`` bounds each socket operation, not the request). qcap leaves img2dataset's fetching
code alone and installs, in each worker process, a urllib opener (the documented extension
point, :func:`urllib.request.install_opener`) that enforces:

- **schemes**: only ``http`` and ``https`` (every redirect hop too);
- **addresses**: a host that is, or resolves to, a loopback, private, link-local, shared
  (CGNAT), reserved, unspecified or multicast address is refused (``refused_url``), unless
  ``allow_private`` — which still refuses unspecified (``0.0.0.0``, ``::``) and multicast
  addresses, never a legitimate destination (``0.0.0.0`` reaches this machine on Linux);
- **DNS rebinding**: the address check happens at connect time, on the very addresses the
  socket then connects to (resolved once, checked, connected; no second lookup that could
  answer differently), and again at every redirect hop. A rebinding server can only ever make
  us connect to an address that passed the check;
- **size**: a body over ``max_bytes`` is refused (from ``Content-Length`` before reading, or
  while reading when the length is unknown); the pixel bound lives in the resizer wrapper (``fetch.make_resizer``);
- **time**: a request (connect to last byte) that runs past ``max_request_seconds`` is cut:
  a per-process watchdog shuts its socket down and the fetch fails as ``timeout``.

Proxies from the environment are not used while the guard is installed: through a proxy the
guard could not see the address it connects to.

Usage (tests and the worker side of ``qcap download``)::

    guard = UrlGuard(AddressPolicy(allow_private=False), max_bytes=64 << 20, max_request_seconds=60)
    guard.policy.refusal_for_url("file:///etc/passwd")   # "scheme 'file' is not http(s)"
    install_guard(guard)                                  # this process's urlopen is now guarded
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import http.client
import ipaddress
import itertools
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from curate.download.status import qcap_tag

ALLOWED_SCHEMES = ("http", "https")


class RefusedURL(OSError):
    """A URL or address the policy refuses; the message starts with ``[qcap:refused_url]``."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{qcap_tag('refused_url')} {reason} ({url[:200]})")


class TooLarge(OSError):
    """A body over the byte bound; the message starts with ``[qcap:too_large]``."""


class DeadlineExceeded(TimeoutError):
    """A request past its wall-clock deadline; the message starts with ``[qcap:timeout]``."""


# --------------------------------------------------------------------------------------------
# International host names


def idna_url(url: str) -> str:
    """``url`` with a non-ASCII host IDNA-encoded (``bücher.example`` → ``xn--bcher-kva.example``,
    what browsers send) and non-ASCII bytes of the path and query percent-encoded as UTF-8.

    Runs before the guard's checks, so the policy judges the name that is really resolved
    (IDNA's mapping turns full-width ``ｌｏｃａｌｈｏｓｔ`` into ``localhost``, refused as loopback).
    A URL that is all ASCII, or whose host IDNA cannot encode, is returned unchanged (urllib then
    refuses it: ``bad_url``)."""
    if not url or url.isascii():
        return url
    from urllib.parse import quote, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return url
    netloc = parts.netloc
    if host and not host.isascii():
        try:
            encoded = host.encode("idna").decode("ascii")
        except UnicodeError:
            return url
        userinfo = netloc.rpartition("@")[0]
        netloc = (f"{userinfo}@" if userinfo else "") + encoded + (f":{port}" if port is not None else "")
    safe = "".join(chr(c) for c in range(33, 127))
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=safe), quote(parts.query, safe=safe),
                       quote(parts.fragment, safe=safe)))


# --------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which URLs and addresses may be fetched."""

    allow_private: bool = False  # allow loopback/private/link-local/reserved (never 0.0.0.0 or multicast)

    def refusal_for_url(self, url: str | None) -> str | None:
        """Why ``url`` is refused before any network traffic, or None. Cheap: no DNS."""
        if not url:
            return "empty URL"
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError as err:
            return f"malformed URL: {err}"
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            return f"scheme {scheme or '(none)'!r} is not http(s)"
        if not host:
            return "URL has no host"
        try:
            literal = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            literal = None
        if literal is not None:
            return self.refusal_for_address(str(literal))
        if not self.allow_private and (host == "localhost" or host.endswith(".localhost")):
            return f"host {host!r} is loopback (RFC 6761)"
        return None

    def refusal_for_address(self, address: str) -> str | None:
        """Why a resolved address is refused, or None."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        embedded = []
        if ip.version == 6:  # an IPv4 address wrapped in IPv6 is judged as the IPv4 address first
            embedded = [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
        embedded.append(ip)
        for candidate in embedded:
            kind = _never_kind(candidate)
            if kind is None and not self.allow_private:
                kind = _private_kind(candidate)
            if kind is not None:
                return f"address {candidate} is {kind}"
        return None


def _never_kind(ip) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    return None


def _private_kind(ip) -> str | None:
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    ):
        if flag:
            return kind
    return None


@dataclass(frozen=True, slots=True)
class UrlGuard:
    """The whole guard: address policy plus the per-request bounds."""

    policy: AddressPolicy
    max_bytes: int = 64 << 20  # largest body accepted, in bytes
    max_request_seconds: float = 60.0  # wall-clock bound on one request, connect to last byte
    resolver: Callable[..., list] | None = None  # getaddrinfo's signature; None: socket.getaddrinfo

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError("max_bytes: must be > 0")
        if self.max_request_seconds <= 0:
            raise ValueError("max_request_seconds: must be > 0")


# --------------------------------------------------------------------------------------------
# Per-request deadlines: one watchdog thread per process


class _Watch:
    __slots__ = ("sock", "deadline", "expired", "cancelled")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock: socket.socket | None = sock
        self.deadline = deadline
        self.expired = False
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.sock = None


class _Watchdog:
    """Shuts down the socket of any request still running at its deadline.

    Shutting a socket down wakes a thread blocked reading it; the reader then sees the
    watch expired and raises :class:`DeadlineExceeded`.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Watch]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, seconds: float) -> _Watch:
        entry = _Watch(sock, time.monotonic() + seconds)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="qcap-request-deadlines", daemon=True)
                self._thread.start()
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (entry.deadline, next(self._seq), entry))
            if earliest is None or entry.deadline < earliest:
                self._cond.notify()
        return entry

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, entry = self._heap[0]
                if entry.cancelled:
                    heapq.heappop(self._heap)
                    continue
                now = time.monotonic()
                if deadline > now:
                    self._cond.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                sock, entry.expired = entry.sock, True
                if sock is not None:
                    with contextlib.suppress(OSError):  # already closed by its owner: nothing to cut
                        sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()


# --------------------------------------------------------------------------------------------
# http.client connections that check the address they connect to


class _GuardedConnectionMixin:
    _guard: UrlGuard
    _watch: _Watch | None

    def _init_guard(self, guard: UrlGuard) -> None:
        self._guard = guard
        self._watch = None
        self._create_connection = self._guarded_create_connection

    def _guarded_create_connection(self, address, timeout=None, source_address=None, **_kwargs) -> socket.socket:
        """socket.create_connection, but every address is checked before any is tried."""
        host, port = address
        infos = (self._guard.resolver or socket.getaddrinfo)(host, port, 0, socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            reason = self._guard.policy.refusal_for_address(sockaddr[0])
            if reason is not None:
                raise RefusedURL(f"{host}:{port}", f"host {host!r} resolves to a refused address: {reason}")
        last_error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                self._watch = _WATCHDOG.watch(sock, self._guard.max_request_seconds)
                sock.connect(sockaddr)  # the checked address itself: no second lookup
                return sock
            except OSError as err:
                last_error = err
                if self._watch is not None:
                    self._watch.cancel()
                    if self._watch.expired:
                        last_error = _deadline_error(self._guard)
                sock.close()
        raise last_error if last_error is not None else OSError(f"getaddrinfo returned nothing for {host!r}")

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        if self._watch is not None:  # HTTPS: watch the TLS socket that replaced the plain one
            self._watch.sock = self.sock  # type: ignore[attr-defined]

    def getresponse(self):
        try:
            response = super().getresponse()  # type: ignore[misc]
        except (OSError, http.client.HTTPException) as err:
            if self._watch is not None and self._watch.expired:
                raise _deadline_error(self._guard) from err
            raise
        response._qcap_watch = self._watch
        return response


class GuardedHTTPConnection(_GuardedConnectionMixin, http.client.HTTPConnection):
    def __init__(self, *args, guard: UrlGuard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard(guard)


class GuardedHTTPSConnection(_GuardedConnectionMixin, http.client.HTTPSConnection):
    def __init__(self, *args, guard: UrlGuard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard(guard)


def _deadline_error(guard: UrlGuard) -> DeadlineExceeded:
    return DeadlineExceeded(f"{qcap_tag('timeout')} request ran past its {guard.max_request_seconds:g} s deadline")


# --------------------------------------------------------------------------------------------
# Body reader with a byte bound and the deadline


class _CappedReader:
    """Wraps an HTTPResponse's file: counts bytes, refuses past the bound, honours the deadline."""

    def __init__(self, raw, guard: UrlGuard, watch: _Watch | None) -> None:
        self._raw = raw
        self._guard = guard
        self._watch = watch
        self._seen = 0

    def _account(self, data: bytes, wanted: int | None) -> bytes:
        self._seen += len(data)
        if self._seen > self._guard.max_bytes:
            raise TooLarge(f"{qcap_tag('too_large')} body exceeds {self._guard.max_bytes} bytes")
        if (wanted is None or len(data) < wanted) and self._watch is not None and self._watch.expired:
            raise _deadline_error(self._guard)
        return data

    def _call(self, method, *args):
        try:
            return method(*args)
        except OSError as err:
            if self._watch is not None and self._watch.expired:
                raise _deadline_error(self._guard) from err
            raise

    def read(self, amt: int | None = -1) -> bytes:
        if amt is None or amt < 0:
            chunks = []
            while True:
                chunk = self._account(self._call(self._raw.read, 1 << 16), None)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self._account(self._call(self._raw.read, amt), amt)

    def read1(self, amt: int = -1) -> bytes:
        return self._account(self._call(self._raw.read1, amt), None)

    def readinto(self, buffer) -> int:
        count = self._call(self._raw.readinto, buffer)
        self._seen += count
        if self._seen > self._guard.max_bytes:
            raise TooLarge(f"{qcap_tag('too_large')} body exceeds {self._guard.max_bytes} bytes")
        if count < len(buffer) and self._watch is not None and self._watch.expired:
            raise _deadline_error(self._guard)
        return count

    def readline(self, limit: int = -1) -> bytes:
        return self._account(self._call(self._raw.readline, limit), None)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._raw.close()

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


# --------------------------------------------------------------------------------------------
# urllib handlers


class _GuardHandler(urllib.request.BaseHandler):
    """Checks every URL before it is opened (redirect hops too) and bounds every body."""

    handler_order = 100  # before the protocol handlers

    def __init__(self, guard: UrlGuard) -> None:
        self.guard = guard

    def http_request(self, req: urllib.request.Request):
        """Before urllib sets the Host header: an international host goes out IDNA-encoded."""
        encoded = idna_url(req.full_url)
        if encoded != req.full_url:
            req.full_url = encoded
        return req

    https_request = http_request

    def default_open(self, req: urllib.request.Request):
        self.http_request(req)  # judged as it will be resolved
        reason = self.guard.policy.refusal_for_url(req.full_url)
        if reason is not None:
            raise RefusedURL(req.full_url, reason)
        return None  # let the http(s) handler open it

    def http_response(self, req, response):
        length = response.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.guard.max_bytes:
            response.close()
            raise TooLarge(f"{qcap_tag('too_large')} Content-Length {int(length)} exceeds {self.guard.max_bytes} bytes")
        response.fp = _CappedReader(response.fp, self.guard, getattr(response, "_qcap_watch", None))
        return response

    https_response = http_response


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, with the target checked (and named) before urllib looks at it."""

    def __init__(self, guard: UrlGuard) -> None:
        self.guard = guard

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urljoin(req.full_url, location)
            reason = self.guard.policy.refusal_for_url(target)
            if reason is not None:
                fp.close()
                raise RefusedURL(target, f"redirect ({code}) from {req.full_url[:200]} to a refused URL: {reason}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: UrlGuard) -> None:
        super().__init__()
        self._connection = functools.partial(GuardedHTTPConnection, guard=guard)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: UrlGuard) -> None:
        super().__init__()
        self._connection = functools.partial(GuardedHTTPSConnection, guard=guard)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


def build_opener(guard: UrlGuard) -> urllib.request.OpenerDirector:
    """An opener with only guarded http(s): no file/ftp/data handlers, no proxies."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardHandler(guard),
        urllib.request.UnknownHandler(),
        _GuardedHTTPHandler(guard),
        _GuardedHTTPSHandler(guard),
        urllib.request.HTTPDefaultErrorHandler(),
        _GuardedRedirectHandler(guard),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


_INSTALLED: UrlGuard | None = None
_INSTALL_LOCK = threading.Lock()


def install_guard(guard: UrlGuard) -> None:
    """Make this process's ``urllib.request.urlopen`` (img2dataset's fetcher) use the guard."""
    global _INSTALLED
    with _INSTALL_LOCK:
        if guard != _INSTALLED:
            urllib.request.install_opener(build_opener(guard))
            _INSTALLED = guard


def uninstall_guard() -> None:
    """Give this process's ``urlopen`` back its default opener (tests that share a process)."""
    global _INSTALLED
    with _INSTALL_LOCK:
        urllib.request.install_opener(None)
        _INSTALLED = None


def fetch(url: str, guard: UrlGuard, timeout: float = 10.0) -> bytes:
    """One guarded GET (for tools and tests; downloads go through img2dataset)."""
    with build_opener(guard).open(urllib.request.Request(url), timeout=timeout) as response:
        return response.read()

