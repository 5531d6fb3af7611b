"""Serve a world's pool over loopback HTTP, playing out every planted fault for real.

Each pool URL is ``base_url/images/{chunk:05d}/{uid}.{ext}``; the server resolves a request by
its *path* (the part after the world's base URL), so it answers correctly on any port. What a
URL answers depends on the sample's ``fault`` in ``truth.parquet``:

==================== ========================================================================
fault                answer
==================== ========================================================================
none, sha_mismatch   200 with the image (sha_mismatch: the pool's sha256 is stale)
http_404             404 (no file exists)
http_500             500, every time
http_500_transient   500 for the first ``transient_failures`` requests, then 200 with the image
stall                accepts the request and sends nothing for ``stall_seconds`` (then closes);
                     stopping the server or healing the uid ends the wait at once
corrupt              200 with bytes that start like a JPEG and decode to nothing
truncated            200, Content-Length of the whole image, half the body, connection closed
not_image            200, ``text/html``, an HTML error page
bomb                 200, a ~50 kB PNG of 21000 × 20500 pixels (a decompression bomb)
private_ip           the URL's host is 0.0.0.0 (this machine): a downloader's guard must refuse
                     it; if one does not, it reaches this server and gets the image
bad_scheme           file:// or ftp:// URL: nothing to serve
==================== ========================================================================

The server binds to loopback only (127.0.0.0/8 or ::1) and refuses any other address. It is
threaded (img2dataset opens many connections at once) and changes nothing on disk.

From Python (tests use a free port)::

    with WorldServer("runs/world") as srv:
        srv.base_url                 # http://127.0.0.1:<port>
        srv.url(uid)                 # that sample's URL on this server
        srv.rewrite_url(url)         # a pool URL (written with the world's base URL) → this server
        srv.localize_pool(path)      # a copy of pool.parquet whose URLs point at this server
        srv.heal(uid)                # from now on serve that uid's image normally
        srv.hits(uid)                # requests received for that uid

From the shell: ``qcap serve runs/world [--port 8765]``.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import logging
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from world.config import DEFAULT_BASE_URL, HEALABLE_FAULTS

log = logging.getLogger(__name__)

CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(slots=True)
class Route:
    uid: str
    fault: str
    file: Path


def check_loopback(host: str) -> None:
    """Raise ValueError unless every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve host {host!r}: {err}") from err
    addresses = {info[4][0] for info in infos}
    bad = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if bad:
        raise ValueError(f"refusing to serve on {host!r} ({', '.join(bad)}): the world server binds to loopback only")


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # img2dataset opens many connections at once

    def handle_error(self, request, client_address) -> None:
        # A client that gives up (its timeout on a stall, a dropped connection) is normal here.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class WorldServer:
    """A threaded loopback HTTP server for one world; a context manager (see module doc)."""

    def __init__(
        self,
        world: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        stall_seconds: float | None = None,
        transient_failures: int | None = None,
    ) -> None:
        self.world = Path(world)
        info_path = self.world / "world.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path}: missing; make the world first with `qcap world --out {self.world}`")
        info = json.loads(info_path.read_text())
        check_loopback(host)
        self.host = host
        self.requested_port = int(port)
        self.world_base_url = str(info.get("base_url", DEFAULT_BASE_URL)).rstrip("/")
        self.prefix = urlsplit(self.world_base_url).path.rstrip("/")
        self.stall_seconds = float(stall_seconds if stall_seconds is not None else info.get("stall_seconds", 60.0))
        self.transient_failures = int(transient_failures if transient_failures is not None else info.get("transient_failures", 1))
        self.images_root = (self.world / "images").resolve()
        self.routes = _load_routes(self.world)
        self._by_uid = {route.uid: path for path, route in self.routes.items()}
        self._lock = threading.Lock()
        self._hits: dict[str, int] = {}
        self._healed: set[str] = set()
        self._stop = threading.Event()
        self._wake: dict[str, threading.Event] = {}
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> WorldServer:
        if self._server is not None:
            return self
        handler = _make_handler(self)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_Server", (_HTTPServer,), {"address_family": family})
        self._server = server_cls((self.host, self.requested_port), handler)
        self._stop.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        log.info("serving %s at %s (%d pool URLs)", self.world, self.base_url, len(self.routes))
        return self

    def stop(self) -> None:
        """Stop serving; stalled requests are released at once."""
        if self._server is None:
            return
        self._stop.set()
        with self._lock:
            for event in self._wake.values():
                event.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C, SIGINT) or :meth:`stop`, then stop cleanly."""
        self.start()
        try:
            with contextlib.suppress(KeyboardInterrupt):
                self._stop.wait()
        finally:
            self.stop()

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.prefix}"

    def url(self, uid: str) -> str:
        """This server's URL for a pool uid (KeyError for an unknown uid)."""
        return f"{self.base_url}/{self._by_uid[uid]}"

    def rewrite_url(self, url: str) -> str:
        """A pool URL written with the world's base URL, pointed at this server; others unchanged."""
        if url.startswith(self.world_base_url + "/"):
            return self.base_url + url[len(self.world_base_url):]
        return url

    def localize_pool(self, out_path: str | Path) -> Path:
        """Write a copy of pool.parquet whose http URLs point at this server (row groups streamed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        source = pq.ParquetFile(self.world / "pool.parquet")
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        with pq.ParquetWriter(tmp, source.schema_arrow) as writer:
            for group in range(source.num_row_groups):
                table = source.read_row_group(group)
                urls = [self.rewrite_url(u) for u in table.column("url").to_pylist()]
                index = table.schema.get_field_index("url")
                writer.write_table(table.set_column(index, "url", pa.array(urls, pa.string())))
        tmp.replace(out_path)
        return out_path

    # -- run-time control --------------------------------------------------------------------

    def heal(self, uid: str) -> None:
        """Serve ``uid`` normally from now on (a stalled request for it is released).

        Only faults played out on the wire can heal (config.HEALABLE_FAULTS); for others the
        bytes on disk are the fault, and a ValueError says so.
        """
        path = self._by_uid.get(uid)
        if path is None:
            raise KeyError(f"uid {uid} is not in this world's pool")
        fault = self.routes[path].fault
        if fault not in HEALABLE_FAULTS and fault != "none":
            raise ValueError(f"uid {uid} has fault {fault!r}, which cannot heal (healable: {', '.join(HEALABLE_FAULTS)})")
        with self._lock:
            self._healed.add(uid)
            event = self._wake.get(uid)
        if event is not None:
            event.set()

    def hits(self, uid: str) -> int:
        """Requests received for ``uid`` since start (or the last :meth:`reset`)."""
        with self._lock:
            return self._hits.get(uid, 0)

    def reset(self) -> None:
        """Forget hits and heals: transient failures fail again, healed URLs break again."""
        with self._lock:
            self._hits.clear()
            self._healed.clear()

    # -- request handling (called from handler threads) ---------------------------------------

    def _record(self, uid: str) -> tuple[int, bool]:
        with self._lock:
            count = self._hits.get(uid, 0) + 1
            self._hits[uid] = count
            return count, uid in self._healed

    def _stall(self, uid: str) -> None:
        with self._lock:
            event = self._wake.setdefault(uid, threading.Event())
            if uid in self._healed or self._stop.is_set():
                event.set()
        event.wait(self.stall_seconds)

    def _resolve(self, raw_path: str) -> tuple[Route | None, Path | None]:
        path = unquote(urlsplit(raw_path).path)
        if self.prefix and path.startswith(self.prefix + "/"):
            path = path[len(self.prefix):]
        rel = path.lstrip("/")
        route = self.routes.get(rel)
        if route is not None:
            return route, route.file
        if not rel.startswith("images/"):
            return None, None
        candidate = (self.world / rel).resolve()
        if not candidate.is_relative_to(self.images_root):  # no escaping the images folder
            return None, None
        return None, candidate


def _load_routes(world: Path) -> dict[str, Route]:
    import pyarrow.dataset as ds

    truth = world / "truth.parquet"
    if not truth.exists():
        raise FileNotFoundError(f"{truth}: missing; the world is unfinished (re-run `qcap world` to finish it)")
    table = ds.dataset(str(truth), format="parquet").to_table(
        columns=["uid", "path", "fault"], filter=ds.field("split") == "pool"
    )
    data = table.to_pydict()
    return {
        path: Route(uid=uid, fault=fault, file=world / path)
        for uid, path, fault in zip(data["uid"], data["path"], data["fault"], strict=True)
    }


def _make_handler(server: WorldServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "qcap-world/1"
        protocol_version = "HTTP/1.0"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            log.debug("%s %s", self.address_string(), format % args)

        def do_HEAD(self):
            self._answer(head=True)

        def do_GET(self):
            self._answer(head=False)

        def _answer(self, *, head: bool) -> None:
            route, file = server._resolve(self.path)
            fault = "none"
            if route is not None:
                count, healed = server._record(route.uid)
                if not healed:
                    fault = route.fault
                if fault == "http_500_transient" and count > server.transient_failures:
                    fault = "none"
            if fault == "stall":
                server._stall(route.uid)
                with server._lock:
                    healed = route.uid in server._healed
                if not healed or server._stop.is_set():
                    self.close_connection = True
                    return
                fault = "none"
            if fault in ("http_500", "http_500_transient"):
                self._error(500, "Internal Server Error")
                return
            if file is None or not file.is_file():
                self._error(404, "Not Found")
                return
            data = file.read_bytes()
            ctype = "text/html; charset=utf-8" if fault == "not_image" else CONTENT_TYPES.get(file.suffix[1:].lower(), "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if head:
                return
            if fault == "truncated":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            body = f"<html><body><h1>{code} {message}</h1></body></html>\n".encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def port_of(base_url: str) -> int:
    parts = urlsplit(base_url)
    return parts.port or (443 if parts.scheme == "https" else 80)
