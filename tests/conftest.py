"""Shared fixtures: tiny real images and a real loopback HTTP server."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_jpeg(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    """A small real JPEG whose pixels depend on ``seed``."""
    from PIL import Image

    image = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    for x in range(0, width, 4):
        image.putpixel((x, (x + seed) % height), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_uid(i: int) -> str:
    return hashlib.md5(f"uid-{i}".encode()).hexdigest()


@contextlib.contextmanager
def serve_directory(directory: Path):
    """Serve ``directory`` on 127.0.0.1 at a free port; yields the base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            return

    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_dir(tmp_path):
    """A folder served over loopback HTTP: yields (folder, base_url)."""
    folder = tmp_path / "www"
    folder.mkdir()
    with serve_directory(folder) as base_url:
        yield folder, base_url
