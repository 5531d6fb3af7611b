"""The embedded world: schema, determinism, resume, the truth of every planted fault over HTTP."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from base.cli import UsageError
from base.shards import iter_samples, read_pool
from world.config import FAULTS, WorldConfig
from world.generate import generate_world, jobs_of, run_job
from world.server import WorldServer

QCAP = str(Path(sys.executable).parent / "qcap")


def tiny_config(out: Path, **overrides) -> WorldConfig:
    """A small world with every fault, duplicate and size kind planted at least once."""
    fields = dict(
        out=out, num_samples=160, clean_samples=12, eval_samples=12, chunk_size=64, workers=1,
        eval_image_size=48, clean_image_size=64, stall_seconds=20.0,
    )
    fields.update(overrides)
    return WorldConfig(**fields)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(tiny_config(out), progress=False)
    return out


def _truth(world: Path, split: str | None = "pool") -> list[dict]:
    rows = pq.read_table(world / "truth.parquet").to_pylist()
    return [r for r in rows if split is None or r["split"] == split]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Schema and contents


def test_pool_has_datacomp_schema_and_truth_covers_every_uid(world):
    pool = pq.read_table(world / "pool.parquet")
    assert pool.schema.names == [
        "uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
        "clip_l14_similarity_score", "face_bboxes", "sha256",
    ]
    assert pool.schema.field("face_bboxes").type == pa.list_(pa.list_(pa.float64()))
    assert read_pool(world / "pool.parquet").num_rows == 160  # the shared reader accepts it
    rows = pool.to_pylist()
    assert all(len(r["uid"]) == 32 and int(r["uid"], 16) >= 0 for r in rows)
    assert all(r["clip_b32_similarity_score"] is None and r["clip_l14_similarity_score"] is None for r in rows)
    assert all(len(r["sha256"]) == 64 for r in rows)

    truth = _truth(world, None)
    uids = [r["uid"] for r in truth]
    assert len(uids) == len(set(uids)), "a uid appears twice in truth.parquet"
    info = json.loads((world / "world.json").read_text())
    assert info["counts"]["splits"] == {
        "clean": 12, "eval-cls": 12, "eval-depth": 12, "eval-retrieval": 12, "eval-seg": 12, "pool": 160,
    }
    by_split = {s: [r for r in truth if r["split"] == s] for s in info["counts"]["splits"]}
    assert [r["uid"] for r in by_split["pool"]] == [r["uid"] for r in rows]
    assert info["version"] and info["seed"] == 0 and info["config"]["num_samples"] == 160
    assert set(info["fault_rates"]) == set(FAULTS) and abs(sum(info["text_rates"].values()) - 1) < 1e-5
    for row in truth:
        assert 1 <= row["num_objects"] == len(row["objects"]) <= 4
        assert [o["depth_rank"] for o in row["objects"]] == list(range(row["num_objects"]))
        assert row["description"].endswith(".")


def test_every_planted_kind_is_present_and_flags_match_the_bytes(world):
    pool = {r["uid"]: r for r in pq.read_table(world / "pool.parquet").to_pylist()}
    truth = _truth(world)
    faults = {r["fault"] for r in truth}
    assert set(FAULTS) <= faults
    assert any(r["is_exact_dup"] for r in truth) and any(r["is_near_dup"] for r in truth)
    assert any(r["is_tiny"] for r in truth) and any(r["is_wide"] for r in truth)
    assert any(max(r["width"], r["height"]) >= 1024 for r in truth), "web sizes reach past 1000 px"
    by_uid = {r["uid"]: r for r in truth}
    for row in truth:
        meta = pool[row["uid"]]
        w, h = meta["original_width"], meta["original_height"]
        assert (w, h) == (row["width"], row["height"])
        assert row["is_tiny"] == (min(w, h) < 200) and row["is_wide"] == (max(w, h) > 3 * min(w, h))
        file = world / row["path"]
        if row["fault"] in ("http_404", "bad_scheme"):
            assert not file.exists() and row["served_sha256"] is None
            continue
        data = file.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["served_sha256"]
        assert (meta["sha256"] == row["served_sha256"]) == (row["fault"] != "sha_mismatch")
        if row["fault"] in ("none", "sha_mismatch", "http_500", "http_500_transient", "stall", "truncated", "private_ip"):
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (w, h)
        if row["is_exact_dup"]:
            original = by_uid[row["dup_of"]]
            assert original["fault"] == "none" and not original["is_exact_dup"] and not original["is_near_dup"]
            assert data == (world / original["path"]).read_bytes() and row["uid"] != original["uid"]
            assert row["objects"] == original["objects"]
        if row["is_near_dup"]:
            original = by_uid[row["dup_of"]]
            assert data != (world / original["path"]).read_bytes()
            assert w < original["width"] and h < original["height"]
            assert row["objects"] == original["objects"]
        if row["fault"] == "private_ip":
            assert meta["url"].startswith("http://0.0.0.0:")
        if row["fault"] == "bad_scheme":
            assert meta["url"].split(":", 1)[0] in ("file", "ftp")
    # the alt-text is the pool's text, with its language recorded
    assert all(pool[r["uid"]]["text"] == r["text"] for r in truth)
    assert {r["lang"] for r in truth if r["text_kind"] == "non_english"} <= {"de", "fr", "es", "it", "pt", "nl"}
    assert all(r["text"] == "" for r in truth if r["text_kind"] == "empty")


def test_same_arguments_give_identical_bytes_whatever_the_worker_count(tmp_path):
    a = generate_world(tiny_config(tmp_path / "a", num_samples=64, chunk_size=16), progress=False)
    b = generate_world(tiny_config(tmp_path / "b", num_samples=64, chunk_size=16, workers=2), progress=False)
    assert a == b
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a.keys() == files_b.keys() and len(files_a) > 100
    assert [k for k in files_a if files_a[k] != files_b[k]] == []
    c = generate_world(tiny_config(tmp_path / "c", num_samples=64, chunk_size=16, seed=1), progress=False)
    assert c["counts"] != a["counts"] or _files(tmp_path / "c")["pool.parquet"] != files_a["pool.parquet"]


def test_an_interrupted_world_resumes_to_the_same_bytes(tmp_path):
    reference = tmp_path / "ref"
    generate_world(tiny_config(reference, num_samples=64, chunk_size=16), progress=False)
    cfg = tiny_config(tmp_path / "cut", num_samples=64, chunk_size=16)
    # run every other chunk, as a killed run would leave it, then the real command finishes
    from world.generate import _prepare

    cfg.out.mkdir()
    assert _prepare(cfg, cfg.out) is False
    for job in jobs_of(cfg)[::2]:
        run_job(cfg, cfg.out, job)
    # a chunk that was cut short left a half-written image behind
    victim = next((reference / "images" / "00001").iterdir())
    half = cfg.out / victim.relative_to(reference)
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(victim.read_bytes()[:100])
    generate_world(cfg, progress=False)
    assert _files(cfg.out) == _files(reference)
    # a finished world is reused; other parameters are refused, not mixed in
    assert generate_world(cfg, progress=False)["counts"]["splits"]["pool"] == 64
    with pytest.raises(UsageError, match="other inputs or settings"):
        generate_world(tiny_config(tmp_path / "cut", num_samples=65, chunk_size=16), progress=False)


def test_bad_parameters_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="text_mix"):
        WorldConfig(out=tmp_path, text_mix="nonsense=0.3")
    with pytest.raises(ValueError, match="rate_"):
        WorldConfig(out=tmp_path, rate_http_404=0.7, rate_http_500=0.6)
    with pytest.raises(ValueError, match="plant_each"):
        generate_world(tiny_config(tmp_path / "small", num_samples=10), progress=False)
    proc = subprocess.run([QCAP, "world", "--out", str(tmp_path / "x"), "--num-samples", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "num_samples" in proc.stderr


# --------------------------------------------------------------------------------------------
# Serving: every planted fault, fetched over real HTTP


def _fetch(url: str, timeout: float = 1.0) -> tuple[str, int | None, bytes | None, str | None]:
    """(outcome, status, body, content type) as a downloader sees it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
            return "ok", response.status, body, response.headers.get("Content-Type")
    except urllib.error.HTTPError as err:
        return "http_error", err.code, None, None
    except http.client.IncompleteRead as err:
        return "incomplete", 200, err.partial, None
    except TimeoutError:
        return "timeout", None, None, None
    except (ConnectionError, http.client.HTTPException):
        return "disconnected", None, None, None
    except urllib.error.URLError as err:
        return ("timeout" if isinstance(err.reason, TimeoutError) else "url_error"), None, None, None


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except (OSError, Image.DecompressionBombError, SyntaxError):
        return False


def test_server_really_answers_with_every_planted_fault(world):
    truth = _truth(world)
    with WorldServer(world, stall_seconds=10) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:") and not srv.base_url.endswith(":8765")
        served = [r for r in truth if r["fault"] not in ("bad_scheme", "private_ip")]
        with ThreadPoolExecutor(max_workers=24) as pool:  # concurrent, as img2dataset is
            results = dict(zip([r["uid"] for r in served], pool.map(lambda r: _fetch(srv.url(r["uid"])), served), strict=True))
        for row in served:
            outcome, status, body, ctype = results[row["uid"]]
            fault = row["fault"]
            if fault == "http_404":
                assert (outcome, status) == ("http_error", 404), row["uid"]
            elif fault in ("http_500", "http_500_transient"):
                assert (outcome, status) == ("http_error", 500), row["uid"]
            elif fault == "stall":
                assert outcome == "timeout", row["uid"]
            elif fault == "truncated":
                assert outcome == "incomplete" and 0 < len(body) < len((world / row["path"]).read_bytes())
            elif fault == "not_image":
                assert outcome == "ok" and ctype.startswith("text/html") and body.lstrip().startswith(b"<!DOCTYPE html>")
            elif fault == "corrupt":
                assert outcome == "ok" and body[:3] == b"\xff\xd8\xff" and not _decodes(body)
            elif fault == "bomb":
                assert outcome == "ok" and len(body) < 200_000 and ctype == "image/png"
                with _open_header(body) as image:
                    assert image.size[0] * image.size[1] > 400_000_000
                assert not _decodes(body)  # PIL refuses it as a bomb
            else:  # none, sha_mismatch: the image, byte for byte
                assert outcome == "ok" and body == (world / row["path"]).read_bytes() and _decodes(body)
                assert (hashlib.sha256(body).hexdigest() == _pool_sha(world, row["uid"])) == (fault != "sha_mismatch")
        # the transient one succeeds on the next request; hits are counted per uid
        transient = next(r for r in truth if r["fault"] == "http_500_transient")
        assert _fetch(srv.url(transient["uid"]))[0] == "ok" and srv.hits(transient["uid"]) == 2
        # the private-ip URL names 0.0.0.0 (this machine) on the world's port; path-resolved here
        private = next(r for r in truth if r["fault"] == "private_ip")
        url = _pool_url(world, private["uid"])
        assert url.startswith("http://0.0.0.0:8765/") and srv.rewrite_url(url) == url
        assert _fetch(srv.base_url + "/" + private["path"])[0] == "ok"
        # unknown paths and escapes from the images folder are 404
        assert _fetch(srv.base_url + "/images/../world.json")[1] == 404
        assert _fetch(srv.base_url + "/truth.parquet")[1] == 404


def _open_header(body: bytes):
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only read the header: no pixels are decoded
    try:
        return Image.open(io.BytesIO(body))
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _pool_sha(world: Path, uid: str) -> str:
    return next(r["sha256"] for r in pq.read_table(world / "pool.parquet").to_pylist() if r["uid"] == uid)


def _pool_url(world: Path, uid: str) -> str:
    return next(r["url"] for r in pq.read_table(world / "pool.parquet").to_pylist() if r["uid"] == uid)


def test_heal_releases_a_stall_and_fixes_failures_at_run_time(world):
    truth = _truth(world)
    stall = next(r for r in truth if r["fault"] == "stall")
    broken = next(r for r in truth if r["fault"] == "http_500")
    truncated = next(r for r in truth if r["fault"] == "truncated")
    with WorldServer(world, stall_seconds=30) as srv:
        with ThreadPoolExecutor(max_workers=1) as pool:
            started = time.monotonic()
            pending = pool.submit(_fetch, srv.url(stall["uid"]), 20)
            time.sleep(0.3)
            srv.heal(stall["uid"])  # the hanging request is answered at once
            outcome, status, body, _ = pending.result()
            assert outcome == "ok" and _decodes(body) and time.monotonic() - started < 5
        assert _fetch(srv.url(broken["uid"]))[1] == 500
        srv.heal(broken["uid"])
        srv.heal(truncated["uid"])
        assert _fetch(srv.url(broken["uid"]))[0] == "ok" and _fetch(srv.url(truncated["uid"]))[0] == "ok"
        assert srv.hits(broken["uid"]) == 2
        with pytest.raises(ValueError, match="cannot heal"):
            srv.heal(next(r for r in truth if r["fault"] == "corrupt")["uid"])
        srv.reset()
        assert _fetch(srv.url(broken["uid"]))[1] == 500


def test_stop_is_prompt_even_with_stalled_requests(world):
    stall = next(r for r in _truth(world) if r["fault"] == "stall")
    srv = WorldServer(world, stall_seconds=60).start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(_fetch, srv.url(stall["uid"]), 30) for _ in range(4)]
        time.sleep(0.3)
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 3
        assert [f.result()[0] for f in futures] == ["disconnected"] * 4


def test_server_binds_loopback_only_and_localizes_the_pool(world, tmp_path):
    for host in ("0.0.0.0", "8.8.8.8"):
        with pytest.raises(ValueError, match="loopback"):
            WorldServer(world, host=host)
    with WorldServer(world) as srv:
        local = pq.read_table(srv.localize_pool(tmp_path / "pool.parquet"))
        original = pq.read_table(world / "pool.parquet")
        assert local.schema == original.schema and local.num_rows == original.num_rows
        pairs = zip(original.column("url").to_pylist(), local.column("url").to_pylist(), strict=True)
        for before, after in pairs:
            if before.startswith("http://127.0.0.1:8765/"):
                assert after == srv.base_url + before[len("http://127.0.0.1:8765"):]
            else:
                assert after == before


def test_qcap_world_and_qcap_serve_from_the_shell(tmp_path):
    out = tmp_path / "w"
    args = [QCAP, "world", "--out", str(out), "--num-samples", "40", "--clean-samples", "4", "--eval-samples", "4",
            "--eval-image-size", "32", "--clean-image-size", "48", "--plant-each", "0", "--workers", "1"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pool faults" in proc.stdout and (out / "world.json").exists()
    again = subprocess.run([QCAP, "world", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to generate" in again.stdout
    bad_host = subprocess.run([QCAP, "serve", str(out), "--host", "0.0.0.0"], capture_output=True, text=True)
    assert bad_host.returncode == 2 and "loopback" in bad_host.stderr
    serve = subprocess.Popen([QCAP, "serve", str(out), "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stderr.readline()
        assert "serving" in line, line
        base = line.split(" at ", 1)[1].split(" ", 1)[0]
        row = next(r for r in _truth(out) if r["fault"] == "none")
        assert _fetch(f"{base}/{row['path']}")[0] == "ok"
    finally:
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=10) == 0


# --------------------------------------------------------------------------------------------
# Clean and eval sets


def test_clean_split_is_shards_with_several_captions_disjoint_from_the_pool(world):
    samples = list(iter_samples(str(world / "clean")))
    assert len(samples) == 12
    pool_uids = {r["uid"] for r in _truth(world)}
    truth = {r["uid"]: r for r in _truth(world, "clean")}
    for sample in samples:
        assert sample.uid not in pool_uids and sample.uid in truth
        captions = sample.meta["captions"]
        assert len(captions) == 5 and len(set(captions)) == 5 and sample.text == captions[0]
        with Image.open(io.BytesIO(sample.image)) as image:
            assert max(image.size) == 64
    assert json.loads((world / "clean" / "sizes.json").read_text()) == {"00000.tar": 12}


def test_eval_sets_use_the_standard_layouts(world):
    classes = json.loads((world / "eval/seg/classes.json").read_text())
    assert classes["classes"][0] == "background" and classes["background_index"] == 0
    seg_truth = {Path(r["path"]).stem: r for r in _truth(world, "eval-seg")}
    names = []
    for sub in ("training", "validation"):
        for image_path in sorted((world / "eval/seg/images" / sub).glob("*.jpg")):
            label = np.asarray(Image.open(world / "eval/seg/annotations" / sub / f"{image_path.stem}.png"))
            assert label.dtype == np.uint8 and label.shape == (48, 48)
            present = {classes["classes"][v] for v in np.unique(label) if v != 0}
            assert present == {o["cls"] for o in seg_truth[image_path.stem]["objects"] if o["visible_fraction"] > 0}
            names.append(sub)
    assert names.count("training") == 9 and names.count("validation") == 3
    for sub in ("training", "validation"):
        for depth_path in (world / "eval/depth/depth" / sub).glob("*.png"):
            depth = np.asarray(Image.open(depth_path))
            assert depth.dtype == np.uint16 and depth.shape == (48, 48)
            valid = depth[depth > 0]
            assert 0.75 < (depth > 0).mean() <= 1.0 and valid.min() >= 300 and valid.max() <= 12000
            assert (world / "eval/depth/images" / sub / f"{depth_path.stem}.jpg").exists()
    cls_root = world / "eval/cls"
    classnames = (cls_root / "classnames.txt").read_text().split()
    assert classnames == sorted(p.name for p in (cls_root / "train").iterdir())
    assert all("{}" in line for line in (cls_root / "templates.txt").read_text().splitlines())
    for image_path in (cls_root / "val").rglob("*.jpg"):
        row = next(r for r in _truth(world, "eval-cls") if r["path"].endswith(image_path.name))
        assert [o["cls"] for o in row["objects"]] == [image_path.parent.name]
    retrieval = list(iter_samples(str(world / "eval/retrieval")))
    descriptions = {r["uid"]: r["description"] for r in _truth(world, "eval-retrieval")}
    assert len(retrieval) == 12 and all(s.text == descriptions[s.uid] for s in retrieval)


@pytest.mark.slow
def test_sigkill_mid_generation_then_rerun_gives_the_same_world(tmp_path):
    args = ["--num-samples", "1500", "--clean-samples", "100", "--eval-samples", "40", "--chunk-size", "100",
            "--eval-image-size", "48", "--workers", "2"]
    reference = tmp_path / "ref"
    assert subprocess.run([QCAP, "world", "--out", str(reference), *args], capture_output=True).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([QCAP, "world", "--out", str(cut), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((cut / ".parts").glob("truth-*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, mid-way
    proc.wait()
    assert not (cut / "world.json").exists()
    rerun = subprocess.run([QCAP, "world", "--out", str(cut), *args], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _files(cut) == _files(reference)
