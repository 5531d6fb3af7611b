"""The model stages over hostile inputs: filter clip-score and caption (on Ray), train, finetune seg
and attention-distance (tiny random open_clip models), with hostile data and unsafe or corrupt
checkpoints. Same contract as ``test_hostile.py``: exit 0 with every row accounted for and the
hostile samples recorded as non-success, or a one-line error; no traceback; and a checkpoint that
would run code when unpickled never does (its marker file never appears).

One local Ray (2 CPUs, no dashboard) serves the module; each Ray stage runs on one folder whose
shards hold one hostile class each, so a few runs cover every class.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hostile import (
    BAD_IMAGES,
    GOOD_IMAGES,
    assert_contract,
    build_case,
    run_cli,
    write_checkpoint_variants,
)

from base.shards import is_uid

pytestmark = pytest.mark.timeout(120)

# per-sample hostility: one shard per class in one folder (a stage decides per sample)
SAMPLE_CASES = ["images-every-mode", "bombs-and-undecodable", "json-json-list", "json-json-truncated",
                "json-json-invalid-utf8", "keys-dot-in-key", "members-json-without-image",
                "members-success-row-not-in-tar", "captions-non-utf8-txt", "captions-nul-in-caption",
                "uids-uid-31-hex", "uids-uid-uppercase", "dups-dup-uid-in-shard", "dups-dup-uid-across-shards"]
# tar-level hostility: whole shards that cannot be read
TAR_CASES = ["tars-cut-mid-member", "tars-not-a-tar", "tars-dotdot-member", "tars-symlink-member"]


def combine(case_ids: list[str], root: Path, out: Path) -> dict[str, object]:
    """One folder: shard 0 good (every case's shard 0 is the same), then shard 1 of each case as
    shard i + 1. Returns {shard tar name: case}."""
    out.mkdir(parents=True)
    by_shard = {}
    for i, case_id in enumerate(case_ids):
        case = build_case(case_id, root)
        if i == 0:
            for suffix in (".tar", ".parquet", "_stats.json", ".done"):
                shutil.copy(case.folder / f"00000{suffix}", out / f"00000{suffix}")
        for suffix in (".tar", ".parquet", "_stats.json", ".done"):
            shutil.copy(case.folder / f"00001{suffix}", out / f"{i + 1:05d}{suffix}")
        by_shard[f"{i + 1:05d}.tar"] = case
    sizes = {p.name.replace("_stats.json", ".tar"): json.loads(p.read_text())["successes"]
             for p in sorted(out.glob("*_stats.json"))}
    (out / "sizes.json").write_text(json.dumps(sizes))
    return by_shard


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-models")
    samples = combine(SAMPLE_CASES, root / "cases", root / "samples")
    tars = combine(TAR_CASES, root / "cases-tars", root / "tars")
    return {"samples": (root / "samples", samples), "tars": (root / "tars", tars)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch

    from base.models import init_coca_decoder, load_model, save_checkpoint_dir

    root = tmp_path_factory.mktemp("hostile-ckpt")
    torch.manual_seed(0)
    clip = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", root / "clip")
    coca_model = load_model("qcap-tiny-coca").model
    init_coca_decoder(coca_model, logit_scale=6.0)
    coca = save_checkpoint_dir(coca_model, "qcap-tiny-coca", root / "coca")
    marker = root / "PWNED"
    bad = write_checkpoint_variants(root / "bad", clip, marker)
    bad_coca = write_checkpoint_variants(root / "bad-coca", coca, marker)
    return {"clip": clip, "coca": coca, "bad": bad, "bad_coca": bad_coca, "marker": marker}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 object_store_memory=200 * 1024 * 1024)
    # Ray Data's progress lines ("execution finished") come from its background threads, sometimes
    # after the test that started them has closed its captured stderr ("--- Logging error ---" in
    # the next test); they carry nothing the contract checks. Its warnings and errors still show.
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield
    if started:
        ray.shutdown()


def _rows(folder: Path) -> list[tuple[str, str]]:
    from hostile import input_rows

    return input_rows(folder)


BAD_CKPT_DIRS = ["pickle-as-safetensors", "truncated-safetensors", "garbage-safetensors", "safetensors-header-huge",
                 "config-list", "config-string", "config-truncated", "config-unknown-model", "weights-missing"]
BAD_CKPT_FILES = ["malicious-pt", "malicious-pickle-bin", "garbage-pt", "truncated-safetensors", "empty-pt"]


def _assert_refused(res, models, what: str) -> None:
    assert_contract(res)
    assert res.code != 0, f"a bad checkpoint ({what}) was accepted"
    assert not models["marker"].exists(), f"unpickling {what} ran its code (the marker file appeared)"


# --------------------------------------------------------------------------------------------
# filter clip-score


@pytest.mark.slow  # ~35 s of Ray; clip-score's per-sample statuses are fast in test_filter_hostile_clip.py
def test_clip_score_per_sample_hostility(folders, models, ray_local, tmp_path, capfd, caplog):
    folder, by_shard = folders["samples"]
    out = tmp_path / "clip.npy"
    res = run_cli(["filter", "clip-score", "--shards", str(folder), "--checkpoint", str(models["clip"]),
                   "--top-fraction", "1.0", "--out", str(out), "--batch-size", "4", "--num-workers", "1",
                   "--no-progress", "--no-histograms", "--no-preview"], capfd, caplog)
    assert_contract(res)
    if res.code != 0:
        return
    report_dir = out.with_name("clip.report")
    decisions = pq.read_table(report_dir / "decisions.parquet").to_pylist()
    assert Counter((d["shard"], d["key"]) for d in decisions) == Counter(_rows(folder))
    counts = json.loads((report_dir / "report.json").read_text())["counts"]
    assert counts["total"] == len(decisions) == counts["kept"] + counts["num_dropped"] + counts["num_failed"]
    by_uid = {}
    for d in decisions:
        by_uid.setdefault(d["uid"], []).append(d)
    for case in by_shard.values():
        for u in case.undecodable:
            assert not any(d["kept"] for d in by_uid.get(u, [])), f"{case.id}: undecodable {u} kept by clip-score"
        for u in case.decodable:
            assert all(d["reason"] != "undecodable_image" for d in by_uid[u]), f"{case.id}: decodable {u} not scored"
    kept = {d["uid"] for d in decisions if d["kept"]}
    assert all(is_uid(u) for u in kept)


@pytest.mark.slow  # a second Ray pipeline; the tar class is covered fast by every other stage
def test_clip_score_unreadable_shards(folders, models, ray_local, tmp_path, capfd, caplog):
    folder, _ = folders["tars"]
    out = tmp_path / "clip.npy"
    res = run_cli(["filter", "clip-score", "--shards", str(folder), "--checkpoint", str(models["clip"]),
                   "--top-fraction", "0.5", "--out", str(out), "--batch-size", "4", "--num-workers", "1",
                   "--no-progress", "--no-histograms", "--no-preview"], capfd, caplog)
    assert_contract(res)
    if res.code == 0:
        decisions = pq.read_table(out.with_name("clip.report") / "decisions.parquet").to_pylist()
        assert Counter((d["shard"], d["key"]) for d in decisions) == Counter(_rows(folder))
        broken = [d for d in decisions if d["shard"] != "00000.tar" and d["kept"]]
        assert not broken, f"samples of unreadable tars kept: {broken}"


@pytest.mark.parametrize("setting", [["--num-cpus", "1", "--num-workers", "2"], ["--batch-size", "0"],
                                     ["--num-workers", "0"], ["--cpus-per-worker", "0"], ["--top-fraction", "0"],
                                     ["--top-fraction", "1.5"], ["--decode-size", "0"]])
def test_clip_score_impossible_settings(setting, folders, models, tmp_path, capfd, caplog):
    """Resources or settings that cannot work are refused before any Ray work, in one line."""
    folder, _ = folders["samples"]
    res = run_cli(["filter", "clip-score", "--shards", str(folder), "--checkpoint", str(models["clip"]),
                   "--top-fraction", "0.5", "--out", str(tmp_path / "c.npy"), "--no-progress", *setting],
                  capfd, caplog)
    assert_contract(res)
    assert res.code != 0, f"clip-score accepted {setting}"
    assert not (tmp_path / "c.npy").exists()


@pytest.mark.parametrize("variant", BAD_CKPT_DIRS + BAD_CKPT_FILES)
def test_clip_score_bad_checkpoints(variant, folders, models, tmp_path, capfd, caplog):
    folder, _ = folders["samples"]
    extra = ["--model", "qcap-tiny-clip"] if variant in BAD_CKPT_FILES else []
    res = run_cli(["filter", "clip-score", "--shards", str(folder), "--checkpoint", str(models["bad"][variant]), *extra,
                   "--top-fraction", "0.5", "--out", str(tmp_path / "c.npy"), "--num-cpus", "2", "--no-progress"],
                  capfd, caplog)
    _assert_refused(res, models, variant)
    assert not (tmp_path / "c.npy").exists()


# --------------------------------------------------------------------------------------------
# caption


def test_caption_every_class(folders, models, ray_local, tmp_path, capfd, caplog):
    """One run over per-sample and tar-level hostility: every input success is an output row of a
    status (success, decode_error, no_image, missing_uid, ...); unreadable shards are listed (exit 1)."""
    sample_folder, sample_cases = folders["samples"]
    tar_folder, tar_cases = folders["tars"]
    folder = tmp_path / "in"
    shutil.copytree(sample_folder, folder)
    n = len(sample_cases) + 1
    for name in tar_cases:  # the tar cases after the sample cases
        for suffix in (".tar", ".parquet", "_stats.json", ".done"):
            shutil.copy(tar_folder / name.replace(".tar", suffix), folder / f"{n:05d}{suffix}")
        n += 1
    broken = {f"{len(sample_cases) + 1 + i:05d}" for i in range(len(tar_cases))}
    out = tmp_path / "syn"
    res = run_cli(["caption", "--shards", str(folder), "--out", str(out), "--checkpoint", str(models["coca"]),
                   "--num-captions", "2", "--seq-len", "8", "--num-workers", "1", "--batch-size", "4",
                   "--device", "cpu", "--no-progress"], capfd, caplog)
    assert_contract(res, allow_exit=(1,))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciled"], summary["problems"]
    if res.code == 1:  # allowed only for shards that could not be read, each listed
        assert set(summary["failed_shards"]) <= broken, summary["failed_shards"]
    for name in sorted(set(f"{i:05d}" for i in range(n)) - set(summary["failed_shards"])):
        rows = pq.read_table(out / f"{name}.parquet").to_pylist()
        want = [r for r in pq.read_table(folder / f"{name}.parquet").to_pylist() if r["status"] == "success"]
        keys = Counter(r.get("source_key") or r["key"] for r in rows)  # a key that cannot name a sample: source_key
        assert all(v == 1 for v in keys.values()), f"{name}: an output row twice: {keys}"
        assert Counter(r["key"] for r in want) <= keys, (
            f"{name}: input successes missing from the caption Parquet: {Counter(r['key'] for r in want) - keys}")
        by_uid = {r["uid"]: r for r in rows}
        case = sample_cases.get(f"{name}.tar")
        if case is not None:
            for u in case.undecodable:
                assert by_uid.get(u, {}).get("status") != "success", f"{case.id}: undecodable {u} captioned"
            for u in case.decodable:
                assert by_uid[u]["status"] == "success", f"{case.id}: decodable {u}: {by_uid[u]}"
            if case.malformed_uids:
                assert not [r for r in rows if r["status"] == "success" and not is_uid(r["uid"])]


@pytest.mark.parametrize("setting", [["--batch-size", "0"], ["--num-workers", "-1"], ["--num-captions", "0"],
                                     ["--seq-len", "1"], ["--cpus-per-worker", "0"]])
def test_caption_impossible_settings(setting, folders, models, tmp_path, capfd, caplog):
    folder, _ = folders["samples"]
    res = run_cli(["caption", "--shards", str(folder), "--out", str(tmp_path / "syn"), "--checkpoint",
                   str(models["coca"]), "--no-progress", *setting], capfd, caplog)
    assert_contract(res)
    assert res.code != 0, f"caption accepted {setting}"
    assert not (tmp_path / "syn" / "00000.done").exists()


@pytest.mark.parametrize("variant", BAD_CKPT_DIRS + BAD_CKPT_FILES)
def test_caption_bad_checkpoints(variant, folders, models, tmp_path, capfd, caplog):
    folder, _ = folders["samples"]
    extra = ["--model", "qcap-tiny-coca"] if variant in BAD_CKPT_FILES else []
    res = run_cli(["caption", "--shards", str(folder), "--out", str(tmp_path / "syn"), "--checkpoint",
                   str(models["bad_coca"][variant]), *extra, "--no-progress"], capfd, caplog)
    _assert_refused(res, models, variant)
    assert not (tmp_path / "syn" / "00000.done").exists()


# --------------------------------------------------------------------------------------------
# train


TRAIN = ["--preset", "tiny", "--batch-size", "4", "--workers", "0", "--warmup", "1", "--log-every", "1",
         "--tracker", "none", "--threads", "1"]


def test_train_on_hostile_samples(folders, tmp_path, capfd, caplog):
    """Hostile samples are skipped and counted (data/skipped_<reason>); drawn = trained + skipped."""
    folder, by_shard = folders["samples"]
    total = sum(len(c.success_rows) for c in by_shard.values()) + 3
    out = tmp_path / "run"
    res = run_cli(["train", *TRAIN, "--data", str(folder), "--out", str(out), "--samples-seen", str(total + 4)],
                  capfd, caplog)
    assert_contract(res)
    if res.code != 0:
        return
    assert (out / "final").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(v for r in rows for k, v in r.items() if k.startswith("data/skipped_"))
    trained = sum(r.get("data/samples", 0) for r in rows)
    assert trained > 0
    assert skipped >= len(BAD_IMAGES), f"hostile samples were not skipped and counted: {rows[-1]}"


def test_train_on_unreadable_shards(folders, tmp_path, capfd, caplog):
    folder, _ = folders["tars"]
    res = run_cli(["train", *TRAIN, "--data", str(folder), "--out", str(tmp_path / "run"), "--samples-seen", "16"],
                  capfd, caplog)
    assert_contract(res)


@pytest.mark.parametrize("data", ["no-shards", "zero-row-shard", "only-failures", "sizes-too-big"])
def test_train_on_empty_or_lying_data(data, tmp_path, capfd, caplog):
    from hostile import build_case

    case_id = {"no-shards": "empty-no-shards", "zero-row-shard": "empty-zero-row-shard",
               "only-failures": "empty-only-failures", "sizes-too-big": "sizes-sizes-json-too-big"}[data]
    case = build_case(case_id, tmp_path)
    res = run_cli(["train", *TRAIN, "--data", str(case.folder), "--out", str(tmp_path / "run")], capfd, caplog)
    assert_contract(res)
    if data != "sizes-too-big":
        assert res.code != 0, f"train on {data} did not fail"


@pytest.mark.parametrize("setting", [["--batch-size", "0"], ["--workers", "-1"], ["--samples-seen", "0"],
                                     ["--lr", "nan"]])
def test_train_impossible_settings(setting, folders, tmp_path, capfd, caplog):
    folder, _ = folders["samples"]
    res = run_cli(["train", *TRAIN, "--data", str(folder), "--out", str(tmp_path / "run"), *setting], capfd, caplog)
    assert_contract(res)
    assert res.code != 0, f"train accepted {setting}"


@pytest.mark.parametrize("variant", ["malicious-pt", "malicious-pickle-bin", "garbage-pt", "truncated-safetensors",
                                     "empty-pt"])
def test_train_bad_pretrained(variant, folders, models, tmp_path, capfd, caplog):
    folder, _ = folders["samples"]
    res = run_cli(["train", *TRAIN, "--data", str(folder), "--out", str(tmp_path / "run"), "--pretrained",
                   str(models["bad"][variant])], capfd, caplog)
    _assert_refused(res, models, variant)
    assert not (tmp_path / "run" / "final").exists()


@pytest.fixture(scope="module")
def one_step_run(folders, tmp_path_factory):
    """A real run folder with one checkpoint (step-000001/), to corrupt."""
    import logging

    from base.cli import run_guarded
    from train.run import main

    folder, _ = folders["samples"]
    out = tmp_path_factory.mktemp("train-resume") / "run"
    code = run_guarded(main, [*TRAIN, "--data", str(folder), "--out", str(out), "--samples-seen", "8",
                              "--checkpoint-every", "1", "--stop-at-step", "1"], "qcap train")
    logging.getLogger().handlers.clear()
    assert code == 0 and list(out.glob("step-*")), "could not make a run to resume"
    return out


@pytest.mark.parametrize("corruption", ["optimizer-malicious-pickle", "optimizer-garbage", "scheduler-truncated",
                                        "rng-malicious", "weights-truncated", "trainer-json-list", "data-json-garbage"])
def test_train_resume_from_corrupt_checkpoint(corruption, one_step_run, folders, models, tmp_path, capfd, caplog):
    import io
    import pickle

    import torch
    from hostile import Malicious

    folder, _ = folders["samples"]
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    step = sorted(run.glob("step-*"))[-1]
    shutil.rmtree(run / "final", ignore_errors=True)
    buffer = io.BytesIO()
    torch.save({"state": Malicious(models["marker"])}, buffer)
    if corruption == "optimizer-malicious-pickle":
        (step / "optimizer.pt").write_bytes(buffer.getvalue())
    elif corruption == "optimizer-garbage":
        (step / "optimizer.pt").write_bytes(b"garbage" * 30)
    elif corruption == "scheduler-truncated":
        (step / "scheduler.pt").write_bytes((step / "scheduler.pt").read_bytes()[:20])
    elif corruption == "rng-malicious":
        (step / "rng-0.pt").write_bytes(pickle.dumps(Malicious(models["marker"])))
    elif corruption == "weights-truncated":
        weights = step / "open_clip_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif corruption == "trainer-json-list":
        (step / "trainer.json").write_text("[1, 2]")
    elif corruption == "data-json-garbage":
        (step / "data-0.json").write_text("{garbage")
    res = run_cli(["train", *TRAIN, "--data", str(folder), "--out", str(run), "--samples-seen", "8",
                   "--checkpoint-every", "1", "--resume"], capfd, caplog)
    _assert_refused(res, models, corruption)


# --------------------------------------------------------------------------------------------
# finetune seg, attention-distance


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("seg")
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(np.full((32, 32), i, np.uint8), mode="L").save(root / "annotations" / split / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    return root


@pytest.mark.parametrize("variant", BAD_CKPT_DIRS + BAD_CKPT_FILES)
def test_finetune_seg_bad_checkpoints(variant, models, seg_data, tmp_path, capfd, caplog):
    extra = ["--model", "qcap-tiny-clip"] if variant in BAD_CKPT_FILES else []
    res = run_cli(["finetune", "seg", "--checkpoint", str(models["bad"][variant]), *extra, "--data", str(seg_data),
                   "--out", str(tmp_path / "ft"), "--preset", "tiny", "--steps", "1", "--workers", "0",
                   "--tracker", "none"], capfd, caplog)
    _assert_refused(res, models, variant)
    assert not (tmp_path / "ft" / "metrics.json").exists()


@pytest.mark.parametrize("variant", BAD_CKPT_DIRS + BAD_CKPT_FILES)
def test_attention_distance_bad_checkpoints(variant, models, tmp_path, capfd, caplog):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(GOOD_IMAGES["rgb-jpeg"][1](0))
    extra = ["--model", "qcap-tiny-clip"] if variant in BAD_CKPT_FILES else []
    res = run_cli(["attention-distance", "--checkpoint", str(models["bad"][variant]), *extra, "--images", str(images),
                   "--out", str(tmp_path / "att")], capfd, caplog)
    _assert_refused(res, models, variant)
    assert not (tmp_path / "att" / "attention_distance.json").exists()


def test_attention_distance_hostile_images(models, tmp_path, capfd, caplog):
    """Every image mode is measured, every undecodable file is listed as failed: none lost."""
    images = tmp_path / "images"
    images.mkdir()
    good, bad = set(), set()
    for i, (name, (ext, make)) in enumerate(GOOD_IMAGES.items()):
        (images / f"{name}.{ext}").write_bytes(make(i))
        good.add(f"{name}.{ext}")
    for i, (name, (ext, make)) in enumerate(BAD_IMAGES.items()):
        (images / f"{name}.{ext}").write_bytes(make(i))
        bad.add(f"{name}.{ext}")
    res = run_cli(["attention-distance", "--checkpoint", str(models["clip"]), "--images", str(images),
                   "--out", str(tmp_path / "att"), "--num-images", "100", "--batch-size", "8"], capfd, caplog)
    assert_contract(res)
    assert res.code == 0, res.err
    result = json.loads((tmp_path / "att" / "attention_distance.json").read_text())["models"][0]
    used = {Path(p).name for p in result["images"]}
    failed = {Path(p).name for p in result["failed"]}
    assert used | failed == good | bad and not used & failed, "an image lost or counted twice"
    assert failed == bad, f"wrongly failed: {failed - bad}; wrongly measured: {bad - failed}"
    assert result["num_images"] == len(good) and result["num_failed"] == len(bad)
