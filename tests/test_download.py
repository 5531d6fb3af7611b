"""qcap download on the embedded world: every planted fault, the accounting, the URL guard, retries.

The world is served by its real loopback server (world.server.WorldServer); downloads
run img2dataset for real, through the real CLI entry point and real worker processes. Time
bounds are short (1 s timeout) so the planted stall costs seconds. Ray on a real local
cluster and kill-and-resume in a subprocess are in test_download_slow.py.
"""

from __future__ import annotations

import collections
import http.server
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from base.cli import run_guarded
from base.shards import (
    Sample,
    ShardError,
    ShardWriter,
    is_complete,
    iter_samples,
    read_sizes,
    read_table,
    read_tables,
)
from curate.download.distribute import run_jobs
from curate.download.fetch import FetchSettings, ShardJob, ShardResult, fetch_into
from curate.download.guard import (
    AddressPolicy,
    DeadlineExceeded,
    GuardedHTTPConnection,
    RefusedURL,
    TooLarge,
    UrlGuard,
    fetch,
    uninstall_guard,
)
from curate.download.merge import commit_shard, merge_shard, patch_dir, recover, staged_dir
from curate.download.plan import iter_job_tables, make_plan
from curate.download.run import main
from curate.download.status import RETRYABLE, STATUSES, classify
from world.config import WorldConfig
from world.generate import generate_world
from world.server import WorldServer

# What each planted fault must end as, with --retries 1 (a transient 500 then succeeds).
EXPECTED = {
    "none": "success",
    "sha_mismatch": "success",  # not verified by default (DataComp does not verify); flagged in sha256_match
    "http_404": "http_404",
    "http_500": "http_5xx",
    "http_500_transient": "success",
    "stall": "timeout",
    "corrupt": "decode_error",
    "truncated": "connection",
    "not_image": "decode_error",
    "bomb": "too_large",
    "bad_scheme": "refused_url",
    "private_ip": "refused_url",  # 0.0.0.0 is refused even with --allow-private-addresses
}
SMALL = [
    "--processes", "2", "--threads", "8", "--samples-per-shard", "25", "--timeout", "1", "--retries", "1",
    "--image-size", "64", "--max-request-seconds", "5", "--no-progress", "--retry-backoff", "0",
]
STALE_WIDTH, STALE_HEIGHT = 7, 5  # the test pool's metadata sizes are off by these (stale metadata)


def make_world(out: Path, num_samples: int = 80) -> Path:
    """A small world with every planted fault at least once."""
    generate_world(
        WorldConfig(out=out, num_samples=num_samples, clean_samples=0, eval_samples=0, chunk_size=40, workers=1, stall_seconds=30.0),
        progress=False,
    )
    return out


def stale_pool(srv: WorldServer, path: Path) -> Path:
    """The world's pool pointed at ``srv``, with original_width/height deliberately off (the
    shards must carry the pool's values, not what was measured), and its 0.0.0.0 URLs aimed at
    ``srv``'s port, so a guard that let them through would visibly reach the server."""
    srv.localize_pool(path)
    table = pq.read_table(path)
    world_port = srv.world_base_url.rsplit(":", 1)[1]
    urls = [u.replace(f"//0.0.0.0:{world_port}/", f"//0.0.0.0:{srv.port}/") for u in table.column("url").to_pylist()]
    table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls, pa.string()))
    for name, delta in (("original_width", STALE_WIDTH), ("original_height", STALE_HEIGHT)):
        index = table.schema.get_field_index(name)
        values = [v + delta for v in table.column(name).to_pylist()]
        table = table.set_column(index, name, pa.array(values, table.schema.field(name).type))
    pq.write_table(table, path)
    return path


def run_cli(argv: list[str]) -> int:
    return run_guarded(main, argv, "qcap download")


def truth_of(world: Path) -> dict[str, dict]:
    return {r["uid"]: r for r in pq.read_table(world / "truth.parquet").to_pylist() if r["split"] == "pool"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("dlworld") / "w")


@pytest.fixture(scope="module")
def served(world):
    with WorldServer(world, stall_seconds=30) as srv:
        yield srv


@pytest.fixture(scope="module")
def mp_run(world, served, tmp_path_factory):
    """One multiprocessing download of the whole world (2 processes, 4 shards)."""
    base = tmp_path_factory.mktemp("dlrun")
    pool = stale_pool(served, base / "pool.parquet")
    out = base / "raw"
    started = time.time()
    code = run_cli(["--pool", str(pool), "--out", str(out), "--allow-private-addresses", *SMALL])
    return {"code": code, "out": out, "pool": pool, "seconds": time.time() - started, "hits": {u: served.hits(u) for u in truth_of(world)}}


# --------------------------------------------------------------------------------------------
# The download on the embedded world


def test_every_planted_fault_gets_its_status_and_counts_reconcile(world, mp_run):
    assert mp_run["code"] == 0
    out = mp_run["out"]
    truth = truth_of(world)
    rows = read_tables(str(out)).to_pylist()
    assert sorted(r["uid"] for r in rows) == sorted(truth), "every pool uid exactly once"
    got = collections.Counter((truth[r["uid"]]["fault"], r["status"]) for r in rows)
    for (fault, status), count in got.items():
        assert status == EXPECTED[fault], f"{count} sample(s) with fault {fault} ended as {status}"
    assert {fault for fault, _ in got} == set(EXPECTED), "the world plants every fault"
    for row in rows:
        assert row["status"] in STATUSES
        assert (row["error_message"] is None) == (row["status"] == "success")

    manifest = json.loads((out / "manifest.json").read_text())
    counts = collections.Counter(r["status"] for r in rows)
    assert manifest["status_counts"] == dict(counts)
    assert manifest["num_samples"] == len(truth) == manifest["pool"]["num_rows"]
    assert manifest["num_success"] + sum(manifest["failures_by_reason"].values()) == len(truth)
    assert manifest["reconciles"] and manifest["complete"] and manifest["shards_complete"] == 4
    assert manifest["success_rate"] == pytest.approx(counts["success"] / len(truth), abs=1e-6)
    assert manifest["retryable_failures"] == sum(n for s, n in counts.items() if s in RETRYABLE)
    assert manifest["sha256"]["success_with_other_sha256"] == sum(1 for t in truth.values() if t["fault"] == "sha_mismatch")
    assert manifest["top_failing_domains"][0]["domain"] == "127.0.0.1"
    assert "[qcap:refused_url]" in " ".join(manifest["error_examples"]["refused_url"])
    assert any("run the same command with --retry-failed" in line for line in manifest["diagnosis"])
    assert json.loads((out / "config.json").read_text())["config"]["allow_private_addresses"] is True

    # sizes.json, stats, tar and Parquet agree; nothing partial or hidden is left
    sizes = read_sizes(str(out))
    for tar in sorted(out.glob("*.tar")):
        keys = [s.key for s in iter_samples([str(tar)])]
        table = read_table(str(tar))
        ok_keys = [k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True) if s == "success"]
        assert keys == ok_keys, f"{tar.name}: tar order must be the Parquet's successes in order"
        assert sizes[tar.name] == len(keys)
        stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
        assert stats["successes"] == len(keys) and stats["count"] == table.num_rows
        assert stats["failed_to_download"] + stats["failed_to_resize"] == table.num_rows - len(keys)
    # only qcap's files: no img2dataset scratch, no temporaries
    names = {p.name for p in out.iterdir()}
    assert names == {f"{s:05d}{suffix}" for s in range(4) for suffix in (".tar", ".parquet", "_stats.json", ".done")} | {
        "sizes.json", "manifest.json", "config.json", ".qcap-download.lock"}


def test_shards_carry_every_pool_column_and_measure_under_their_own_names(world, mp_run):
    truth = truth_of(world)
    pool = {r["uid"]: r for r in pq.read_table(mp_run["pool"]).to_pylist()}
    table = read_tables(str(mp_run["out"]))
    for name in pq.read_schema(mp_run["pool"]).names:
        assert name in table.column_names
    for row in table.to_pylist():
        source = pool[row["uid"]]
        for name, value in source.items():
            assert row[name] == value, f"{row['uid']}: pool column {name} changed"
        assert row["caption"] == source["text"]
        if row["status"] != "success":
            continue
        fact = truth[row["uid"]]
        # measured values live beside the pool's stale ones, never over them
        assert (row["downloaded_width"], row["downloaded_height"]) == (fact["width"], fact["height"])
        assert row["original_width"] == fact["width"] + STALE_WIDTH
        assert row["downloaded_sha256"] == fact["served_sha256"]
        assert row["sha256_match"] == (fact["fault"] != "sha_mismatch")
        assert max(row["width"], row["height"]) <= 64
        assert row["download_attempts"] == 1
        assert isinstance(json.loads(row["exif"]), dict)


def test_tar_members_follow_img2dataset_layout(mp_run):
    samples = list(iter_samples(str(mp_run["out"])))
    assert samples
    for sample in samples[:20]:
        image = Image.open(io.BytesIO(sample.image))
        assert sample.image_ext == "jpg" and image.format == "JPEG"
        assert image.size == (sample.meta["width"], sample.meta["height"])
        assert sample.text == sample.meta["text"] == sample.meta["caption"]
        for name in ("url", "caption", "key", "status", "uid", "sha256", "downloaded_sha256", "width", "height"):
            assert name in sample.meta
        assert sample.meta["key"] == sample.key and sample.meta["status"] == "success"


def test_refused_urls_never_reach_the_server(world, mp_run):
    truth = truth_of(world)
    pool = {r["uid"]: r["url"] for r in pq.read_table(mp_run["pool"]).to_pylist()}
    for uid, fact in truth.items():
        if fact["fault"] == "private_ip":  # http://0.0.0.0:<served port>/...: reachable, refused
            assert pool[uid].startswith("http://0.0.0.0:")
            assert mp_run["hits"][uid] == 0
        elif fact["fault"] != "bad_scheme":
            assert mp_run["hits"][uid] >= 1, f"{fact['fault']} sample {uid} was never requested"


def test_rerun_of_a_finished_download_does_nothing(mp_run, tmp_path):
    out = tmp_path / "raw"
    shutil.copytree(mp_run["out"], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    code = run_cli(["--pool", str(mp_run["pool"]), "--out", str(out), "--allow-private-addresses", *SMALL])
    assert code == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["this_run"]["fetched"] == 0 and manifest["this_run"]["shards_already_complete"] == 4
    # a resumed run must keep the output settings
    code = run_cli(["--pool", str(mp_run["pool"]), "--out", str(out), "--allow-private-addresses", *SMALL, "--image-size", "32"])
    assert code == 2


def test_without_the_flag_the_world_is_refused_and_the_run_says_so_loudly(world, served, mp_run, tmp_path, capsys, caplog):
    """The embedded pool lives on loopback: with the guard on, nothing is fetched, every row is
    counted as refused_url, and the low success rate is announced with what to do."""
    truth = truth_of(world)
    hits = {u: served.hits(u) for u in truth}
    out = tmp_path / "raw"
    assert run_cli(["--pool", str(mp_run["pool"]), "--out", str(out), *SMALL]) == 0
    assert {u: served.hits(u) for u in truth} == hits, "the guard let a loopback URL through"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status_counts"] == {"refused_url": len(truth)} and manifest["reconciles"]
    assert manifest["low_success"] and manifest["success_rate"] == 0.0
    assert any("--allow-private-addresses" in line for line in manifest["diagnosis"])
    printed = capsys.readouterr().out
    assert "LOW SUCCESS RATE" in printed and "refused_url" in printed
    (reason_line,) = [line for line in printed.splitlines() if line.strip().startswith("refused_url ")]
    meaning = reason_line.split("%", 1)[1].strip()  # the status's meaning: whole, or cut at a word with " …"
    assert meaning == STATUSES["refused_url"] or (meaning.endswith(" …") and STATUSES["refused_url"].startswith(meaning[:-2]))
    assert "LOW SUCCESS RATE" in caplog.text  # also logged as a warning when the run ends
    assert sum(read_sizes(str(out)).values()) == 0


def test_verify_hash_fails_a_stale_sha256(world, served, tmp_path):
    truth = truth_of(world)
    stale = next(u for u, f in truth.items() if f["fault"] == "sha_mismatch")
    good = next(u for u, f in truth.items() if f["fault"] == "none")
    pool_path = tmp_path / "pool.parquet"
    served.localize_pool(tmp_path / "all.parquet")
    table = pq.read_table(tmp_path / "all.parquet")
    pq.write_table(table.filter(pc.is_in(table.column("uid"), value_set=pa.array([stale, good]))), pool_path)
    from curate.download.config import DownloadConfig

    cfg = DownloadConfig(pool=pool_path, out=str(tmp_path / "raw"), threads=2, timeout=1, retries=0, image_size=32,
                         samples_per_shard=10, allow_private_addresses=True, verify_hash=True, max_request_seconds=3)
    plan, _ = make_plan(pool_path, cfg.samples_per_shard)
    try:
        [(shard_id, job_table)] = list(iter_job_tables(plan, [0]))
        fetch_into(job_table, cfg.out, shard_id, FetchSettings.from_config(cfg))
    finally:
        uninstall_guard()
    rows = {r["uid"]: r for r in read_table(str(tmp_path / "raw" / "00000.tar")).to_pylist()}
    assert rows[stale]["status"] == "hash_mismatch" and rows[stale]["sha256_match"] is False
    assert rows[stale]["error_message"] == "hash mismatch"  # img2dataset's own message, kept
    assert rows[good]["status"] == "success" and rows[good]["sha256_match"] is True
    assert rows[good]["downloaded_sha256"] == rows[good]["sha256"] == truth[good]["served_sha256"]


# --------------------------------------------------------------------------------------------
# --retry-failed (uses the module's server, and heals one of its URLs: keep these last here)


def test_retry_failed_recovers_a_healed_stall_exactly_once(world, served, mp_run, tmp_path):
    out = tmp_path / "raw"
    shutil.copytree(mp_run["out"], out)
    truth = truth_of(world)
    by_fault = collections.defaultdict(list)
    for uid, fact in truth.items():
        by_fault[fact["fault"]].append(uid)
    stall = by_fault["stall"][0]
    hits = {u: served.hits(u) for u in truth}
    served.heal(stall)

    code = run_cli(["--pool", str(mp_run["pool"]), "--out", str(out), "--allow-private-addresses", *SMALL,
                    "--retry-failed", "--retry-rounds", "1"])
    assert code == 0
    rows = read_tables(str(out)).to_pylist()
    assert sorted(r["uid"] for r in rows) == sorted(truth), "no uid lost or duplicated by the merge"
    row = {r["uid"]: r for r in rows}
    assert row[stall]["status"] == "success" and row[stall]["download_attempts"] == 2
    in_tars = [s.uid for s in iter_samples(str(out))]
    assert in_tars.count(stall) == 1 and len(in_tars) == len(set(in_tars))
    assert sum(r["status"] == "success" for r in rows) == len(in_tars)
    for uid in by_fault["http_500"] + by_fault["truncated"]:  # retryable, still failing
        assert row[uid]["status"] in RETRYABLE and row[uid]["download_attempts"] == 2
        assert served.hits(uid) == hits[uid] + 2  # one round, img2dataset's --retries 1
    for fault in ("http_404", "corrupt", "not_image", "bomb", "none", "sha_mismatch"):  # not retryable or fine
        for uid in by_fault[fault]:
            assert served.hits(uid) == hits[uid], f"{fault} sample re-fetched"
            assert row[uid]["download_attempts"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["retry_rounds"][0]["recovered"] == 1
    assert any("still fail after 1 --retry-failed round" in line for line in manifest["diagnosis"])
    assert not any("run the same command with --retry-failed" in line for line in manifest["diagnosis"])
    assert manifest["reconciles"] and manifest["num_success"] == len(in_tars)
    assert not (out / ".qcap-retry").exists()
    for tar in out.glob("*.tar"):  # the merged tars are whole and agree with their Parquets
        table = read_table(str(tar))
        assert [s.key for s in iter_samples([str(tar)])] == [
            k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True) if s == "success"
        ]


def test_an_interrupted_merge_commit_is_finished_by_the_next_run(world, mp_run, tmp_path):
    """A kill between the commit's renames leaves RAW/S without .done; recover() finishes it."""
    out = tmp_path / "raw"
    shutil.copytree(mp_run["out"], out)
    truth = truth_of(world)
    rows = read_tables(str(out)).to_pylist()
    victim = next(r for r in rows if truth[r["uid"]]["fault"] == "http_500")
    shard_id = int(victim["key"]) // 100  # 25 samples per shard: key = shard * 100 + index
    image = Image.new("RGB", (8, 6), (200, 10, 10))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    healed = {**{k: v for k, v in victim.items() if k not in ("key", "uid", "status", "error_message")}, "download_attempts": 2}
    with ShardWriter(patch_dir(str(out)), shard_id) as writer:  # what a patch fetch would have written
        writer.write(Sample(key=victim["key"], uid=victim["uid"], image=buffer.getvalue(), text=victim["text"], meta=healed))
    merge_shard(str(out), shard_id)
    # the commit dies after removing the marker and renaming the Parquet, before the tar
    name = f"{shard_id:05d}"
    (out / f"{name}.done").unlink()
    (Path(staged_dir(str(out))) / f"{name}.parquet").replace(out / f"{name}.parquet")
    assert not is_complete(out, shard_id)

    assert recover(str(out)) == [shard_id]
    assert is_complete(out, shard_id)
    table = read_table(str(out / f"{name}.tar"))
    merged = {r["uid"]: r for r in table.to_pylist()}
    assert merged[victim["uid"]]["status"] == "success"
    assert sorted(merged) == sorted(r["uid"] for r in rows if int(r["key"]) // 100 == shard_id)
    in_tar = [s.uid for s in iter_samples([str(out / f"{name}.tar")])]
    assert in_tar.count(victim["uid"]) == 1
    assert not list(Path(staged_dir(str(out))).iterdir()) and not list(Path(patch_dir(str(out))).iterdir())
    with pytest.raises(ShardError):  # nothing staged any more
        commit_shard(str(out), shard_id)


# --------------------------------------------------------------------------------------------
# The URL guard


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A loopback server that counts requests and can redirect, dribble or send a large body."""

    protocol_version = "HTTP/1.0"
    paths: list[str] = []

    def log_message(self, *args):
        return

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).paths.append(self.path)
        port = self.server.server_address[1]
        redirects = {
            "/to-file": "file:///etc/passwd",
            "/to-ftp": "ftp://127.0.0.1/x.jpg",
            "/to-zero": f"http://0.0.0.0:{port}/img",
            "/to-img": "/img",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
        elif self.path == "/img":
            self._send(b"\xff\xd8" + b"x" * 100)
        elif self.path == "/announced-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 20))
            self.end_headers()
        elif self.path == "/unannounced-big":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"y" * 10_000)
            except OSError:
                return
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                return
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def recorder():
    handler = type("Handler", (_Recorder,), {"paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.paths
    server.shutdown()
    server.server_close()


STRICT = UrlGuard(AddressPolicy(allow_private=False), max_bytes=1 << 20, max_request_seconds=3)
LOOSE = UrlGuard(AddressPolicy(allow_private=True), max_bytes=1 << 20, max_request_seconds=1.5)


def test_guard_refuses_other_schemes_private_addresses_and_loopback_names(recorder):
    base, paths = recorder
    port = base.rsplit(":", 1)[1]
    refused = [
        "file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "data:image/png;base64,AAAA", "gopher://example.com/",
        "http://10.1.2.3/x.jpg", "http://192.168.1.1/x.jpg", "http://172.16.0.1/x.jpg", "http://169.254.169.254/latest",
        "http://100.64.0.1/x", "http://[::1]/x", "http://[::ffff:10.0.0.1]/x", "http://0.0.0.0/x",
        f"{base}/img", f"http://localhost:{port}/img",
        f"http://127.1:{port}/img", f"http://2130706433:{port}/img",  # spellings that resolve to 127.0.0.1
    ]
    for url in refused:
        with pytest.raises(OSError) as caught:
            fetch(url, STRICT, timeout=2)
        assert classify("failed_to_download", str(caught.value)) == "refused_url", f"{url}: {caught.value}"
    # a host name that resolves to loopback is refused at connect time too, on the very
    # addresses the socket would connect to (the name check above never sees this path)
    connection = GuardedHTTPConnection("localhost", int(port), timeout=2, guard=STRICT)
    with pytest.raises(RefusedURL, match="resolves to a refused address: address 127.0.0.1 is loopback"):
        connection.request("GET", "/img")
    assert paths == [], "a refused URL reached the server"
    # the policy alone, without any network
    assert STRICT.policy.refusal_for_url("https://example.com/a.jpg") is None
    assert "not http(s)" in STRICT.policy.refusal_for_url("ftp://example.com/a.jpg")
    assert LOOSE.policy.refusal_for_url(f"{base}/img") is None
    assert fetch(f"{base}/img", LOOSE, timeout=2).startswith(b"\xff\xd8")


def test_guard_checks_every_redirect_hop(recorder):
    base, paths = recorder
    for path in ("/to-file", "/to-ftp", "/to-zero"):
        with pytest.raises(RefusedURL, match=r"\[qcap:refused_url\] redirect \(302\)"):
            fetch(base + path, LOOSE, timeout=2)
    assert fetch(base + "/to-img", LOOSE, timeout=2).startswith(b"\xff\xd8")  # a safe redirect is followed
    assert "/img" in paths and not any("0.0.0.0" in p for p in paths)


def test_guard_bounds_body_size_and_request_time(recorder):
    base, _ = recorder
    for path in ("/announced-big", "/unannounced-big"):
        with pytest.raises(TooLarge, match=r"\[qcap:too_large\]"):
            fetch(base + path, LOOSE, timeout=2)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:  # 1 byte every 0.2 s never trips a 1 s timeout
        fetch(base + "/drip", LOOSE, timeout=1)
    assert time.monotonic() - started < 4
    assert classify("failed_to_download", str(caught.value)) == "timeout"


def test_download_path_installs_the_guard_when_the_flag_is_off(world, served, tmp_path):
    """A shard fetched by img2dataset in this process, guard on: nothing private is contacted."""
    truth = truth_of(world)
    good = next(u for u, f in truth.items() if f["fault"] == "none")
    port = served.port
    urls = [
        "file:///etc/passwd", f"ftp://127.0.0.1:{port}/x.jpg", "http://10.0.0.1/x.jpg", "http://192.168.0.10/x.jpg",
        served.url(good), served.url(good).replace("127.0.0.1", "localhost"), None,
    ]
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({
        "uid": [f"{i:032x}" for i in range(len(urls))], "url": pa.array(urls, pa.string()), "text": ["a photo"] * len(urls),
    }), pool)
    hits = served.hits(good)
    from curate.download.config import DownloadConfig

    cfg = DownloadConfig(pool=pool, out=str(tmp_path / "raw"), threads=4, timeout=1, retries=0, image_size=32,
                         samples_per_shard=100, max_request_seconds=3)
    plan, _ = make_plan(pool, cfg.samples_per_shard)
    try:
        [(shard_id, table)] = list(iter_job_tables(plan, [0]))
        result = fetch_into(table, cfg.out, shard_id, FetchSettings.from_config(cfg))
    finally:
        uninstall_guard()  # this process's urlopen goes back to normal for other tests
    assert result.status_counts == {"refused_url": len(urls)}
    assert served.hits(good) == hits
    messages = read_table(str(tmp_path / "raw" / "00000.tar")).column("error_message").to_pylist()
    assert all(m.startswith("[qcap:refused_url]") or "unknown url type" in m for m in messages)


# --------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize(
    ("stage", "message", "status"),
    [
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
        ("failed_to_download", "HTTP Error 410: Gone", "http_4xx"),
        ("failed_to_download", "HTTP Error 429: Too Many Requests", "http_429"),
        ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_5xx"),
        ("failed_to_download", "<urlopen error timed out>", "timeout"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection"),
        ("failed_to_download", "Remote end closed connection without response", "connection"),
        ("failed_to_download", "IncompleteRead(100 bytes read, 100 more expected)", "connection"),
        ("failed_to_download", "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>", "tls"),
        ("failed_to_download", "unknown url type: ''", "refused_url"),
        ("failed_to_download", "URL can't contain control characters. '/a b' (found at least ' ')", "bad_url"),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed"),
        ("failed_to_download", "hash mismatch", "hash_mismatch"),
        ("failed_to_download", "[qcap:too_large] body exceeds 10 bytes", "too_large"),
        ("failed_to_download", "something nobody expected", "error"),
        ("failed_to_resize", "Image decoding error", "decode_error"),
        ("failed_to_resize", "image area too large", "too_large"),
        ("failed_to_resize", "OpenCV(4.10) resize.cpp:4152: error: (-215:Assertion failed)", "resize_error"),
    ],
)
def test_img2dataset_messages_map_to_the_status_vocabulary(stage, message, status):
    assert classify(stage, message) == status
    assert status in STATUSES


class _LocalBackend:
    """An in-process backend that runs jobs one poll later, so the scheduling loop is observable."""

    retries_natively = False

    def __init__(self, fail_first: set[int]) -> None:
        self.fail_first = set(fail_first)
        self.queued: list[tuple[int, ShardJob]] = []
        self.max_pending = 0
        self.runs: collections.Counter[int] = collections.Counter()
        self.next_handle = 0

    def submit(self, job):
        self.next_handle += 1
        self.queued.append((self.next_handle, job))
        self.max_pending = max(self.max_pending, len(self.queued))
        return self.next_handle

    def wait(self, handles, timeout):
        handle, job = self.queued.pop(0)
        assert handle in handles
        self.runs[job.shard_id] += 1
        if job.shard_id in self.fail_first:
            self.fail_first.discard(job.shard_id)
            return [(handle, RuntimeError("worker lost"))]
        return [(handle, ShardResult(shard_id=job.shard_id, kind="download", fetched=1, successes=1))]

    def progress_events(self):
        return []

    def close(self, *, abort=False):
        return None


def test_scheduling_loop_bounds_in_flight_jobs_and_retries_failed_shards():
    settings = None
    produced = []

    def jobs():
        for shard_id in range(10):
            produced.append(shard_id)
            yield ShardJob("download", shard_id, None, "unused", settings)

    backend = _LocalBackend(fail_first={3, 7})
    done, failed = [], []
    run_jobs(backend, jobs(), max_in_flight=3, shard_retries=1, on_result=lambda r: done.append(r.shard_id),
             on_failure=lambda job, err: failed.append(job.shard_id), on_progress=lambda e: None)
    assert sorted(done) == list(range(10)) and failed == []
    assert backend.max_pending == 3, "never more than max_in_flight submitted"
    assert backend.runs[3] == backend.runs[7] == 2
    backend = _LocalBackend(fail_first={5})
    done, failed = [], []
    run_jobs(backend, jobs(), max_in_flight=2, shard_retries=0, on_result=lambda r: done.append(r.shard_id),
             on_failure=lambda job, err: failed.append(job.shard_id), on_progress=lambda e: None)
    assert failed == [5] and len(done) == 9


def test_pool_contract_violations_are_clear_errors(tmp_path):
    def write(name, **columns):
        path = tmp_path / name
        pq.write_table(pa.table(columns), path)
        return path

    uid = "0" * 32
    with pytest.raises(ShardError, match="missing.parquet: no such pool file or folder"):
        make_plan(tmp_path / "missing.parquet", 10)
    with pytest.raises(ShardError, match="missing column"):
        make_plan(write("a.parquet", uid=[uid], url=["http://x/a.jpg"]), 10)
    with pytest.raises(ShardError, match="repeated uid"):
        make_plan(write("b.parquet", uid=[uid, uid], url=["http://x/a", "http://x/b"], text=["a", "b"]), 10)
    with pytest.raises(ShardError, match="not 32 lowercase hex"):
        make_plan(write("c.parquet", uid=["XYZ"], url=["http://x/a"], text=["a"]), 10)
    with pytest.raises(ShardError, match="clash"):
        make_plan(write("d.parquet", uid=[uid], url=["http://x/a"], text=["a"], status=["ok"]), 10)
    plan, _ = make_plan(write("e.parquet", uid=[f"{i:032x}" for i in range(25)], url=["http://x/a"] * 25, text=["a"] * 25), 10)
    assert plan.num_shards == 3 and [plan.shard_rows(s) for s in range(3)] == [10, 10, 5]
    tables = dict(iter_job_tables(plan, [2, 0]))
    # img2dataset's keys: shard id, then the in-shard index on ceil(log10(10)) = 1 digit
    assert tables[0].column("key").to_pylist()[:2] == ["000000", "000001"]
    assert tables[2].column("key").to_pylist() == ["000020", "000021", "000022", "000023", "000024"]
    assert tables[2].column("uid").to_pylist() == [f"{i:032x}" for i in range(20, 25)]
    assert tables[2].column("download_attempts").to_pylist() == [1] * 5
