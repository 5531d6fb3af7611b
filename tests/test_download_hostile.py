"""Hostile download inputs: international host names are fetched IDNA-encoded and still guarded; bad pools are one line."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_jpeg

from curate.download.guard import AddressPolicy, RefusedURL, UrlGuard, fetch, idna_url
from curate.download.status import classify

QCAP = str(Path(sys.executable).parent / "qcap")
IDN_HOST = "bücher.example"
PUNYCODE = "xn--bcher-kva.example"


@pytest.fixture
def host_server():
    """A loopback server that records the Host header of every request."""
    image = make_jpeg(seed=3)
    hosts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hosts.append(self.headers.get("Host", ""))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], hosts, image
    server.shutdown()
    server.server_close()


def _resolver(port: int):
    """The guard's resolver: the punycode name resolves to the loopback server, nothing else resolves."""
    def resolve(host, wanted_port, *args):
        if host != PUNYCODE:
            raise socket.gaierror(socket.EAI_NONAME, f"unknown test host {host!r}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(wanted_port)))]
    return resolve


def test_idn_host_is_fetched_idna_encoded_and_still_guarded(host_server):
    port, hosts, image = host_server
    url = f"http://{IDN_HOST}:{port}/bilder/ä.jpg"
    assert idna_url(url) == f"http://{PUNYCODE}:{port}/bilder/%C3%A4.jpg"
    assert idna_url("http://example.com/a.jpg") == "http://example.com/a.jpg"  # ASCII: untouched

    loose = UrlGuard(AddressPolicy(allow_private=True), max_request_seconds=5, resolver=_resolver(port))
    assert fetch(url, loose, timeout=5) == image
    assert hosts == [f"{PUNYCODE}:{port}"]  # the Host header went out IDNA-encoded

    # the guard still refuses the loopback address the encoded name resolves to
    strict = UrlGuard(AddressPolicy(allow_private=False), max_request_seconds=5, resolver=_resolver(port))
    with pytest.raises(OSError) as caught:  # urllib wraps the guard's RefusedURL raised at connect time
        fetch(url, strict, timeout=5)
    assert "127.0.0.1 is loopback" in str(caught.value)
    assert classify("failed_to_download", str(caught.value)) == "refused_url"
    # names whose IDNA form is loopback are refused by name, before any lookup
    for sneaky in (f"http://ｌｏｃａｌｈｏｓｔ:{port}/x.jpg", f"http://１２７.０.０.１:{port}/x.jpg"):
        with pytest.raises(RefusedURL, match="loopback"):
            fetch(sneaky, strict, timeout=5)
    assert len(hosts) == 1, "a refused URL reached the server"
    # a host IDNA cannot encode stays as it is and is a bad URL, not a crash
    too_long = "http://" + "ü" * 70 + ".example/x.jpg"
    assert idna_url(too_long) == too_long
    with pytest.raises(OSError) as caught:
        fetch(too_long, loose, timeout=5)
    assert classify("failed_to_download", str(caught.value)) in ("bad_url", "dns")


def _pool(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": pa.array([f"{i:032x}" for i in range(rows)], pa.string()),
                             "url": pa.array([f"http://127.0.0.1:9/{i}.jpg" for i in range(rows)], pa.string()),
                             "text": pa.array(["a cat"] * rows, pa.string())}), path)


def test_bad_pools_and_outputs_are_one_line_errors(tmp_path):
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "notes.txt").write_text("not a pool")
    _pool(tmp_path / "empty" / "part-0.parquet", 0)
    _pool(tmp_path / "mixed" / "part-0.parquet", 2)
    (tmp_path / "mixed" / "part-1.parquet").write_bytes(b"PAR1 garbage PAR1")
    _pool(tmp_path / "good" / "part-0.parquet", 2)
    (tmp_path / "good" / "embeddings.npz").write_bytes(b"not parquet, not part of the pool")
    (tmp_path / "taken").write_text("a file")
    cases = [
        (tmp_path / "only-text", tmp_path / "o1", "holds no Parquet files"),
        (tmp_path / "empty", tmp_path / "o2", "no rows"),
        (tmp_path / "mixed", tmp_path / "o3", "part-1.parquet"),
        (tmp_path / "good", tmp_path / "taken", "is a file"),
    ]
    for pool, out, message in cases:
        proc = subprocess.run([QCAP, "download", "--pool", str(pool), "--out", str(out), "--processes", "1",
                               "--threads", "2"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (pool, proc.stdout[-500:], proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
        assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1, proc.stderr
    assert (tmp_path / "taken").read_text() == "a file"
    from base.shards import open_pool

    assert open_pool(tmp_path / "good").count_rows() == 2  # the .npz beside the Parquet is not the pool's
