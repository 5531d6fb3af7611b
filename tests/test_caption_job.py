"""``qcap caption`` end to end: real Ray, real shards, a tiny CoCa checkpoint, the real CLI.

One local Ray cluster serves the module (the job joins a running Ray, as on a cluster); the
kill-and-resume test runs the job in a subprocess that joins it by address and SIGKILLs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_jpeg, make_uid

from base.shards import (
    Sample,
    ShardWriter,
    decode_image,
    expand_shards,
    finalize_folder,
    iter_samples,
    read_table,
    read_tables,
)
from base.stage import shards_by_id
from captioning import job
from captioning.backends import CaptionerSpec, image_seed, load_captioner
from captioning.params import DecodeParams
from captioning.quality import process_caption

ROOT = Path(__file__).resolve().parents[1]
QCAP = Path(sys.executable).parent / "qcap"
BROKEN_JPEG = b"\xff\xd8\xff\xe0 this is not a JPEG"


@pytest.fixture(scope="module")
def ray_address():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                 log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory) -> Path:
    """A tiny CoCa checkpoint folder; its decoder drawn with peaked next-token distributions
    (logit scale 6), so that captions vary from image to image."""
    from base.models import init_coca_decoder, load_model, save_checkpoint_dir

    torch.manual_seed(0)
    model = load_model("qcap-tiny-coca").model
    init_coca_decoder(model, logit_scale=6.0)
    return save_checkpoint_dir(model, "qcap-tiny-coca", tmp_path_factory.mktemp("models") / "coca")


def write_shards(folder: Path, sizes: list[int], *, broken: set[tuple[int, int]] = frozenset(), start: int = 0):
    """Input shards as the curate stage writes them; ``broken`` (shard, index) get undecodable bytes,
    and shard 1 also lists a failed download (Parquet only)."""
    uid_number = start
    for shard_id, size in enumerate(sizes):
        with ShardWriter(folder, shard_id) as writer:
            for index in range(size):
                image = BROKEN_JPEG if (shard_id, index) in broken else make_jpeg(40, 32, seed=uid_number)
                writer.write(Sample(key=f"{shard_id:05d}{index:04d}", uid=make_uid(uid_number), image=image,
                                    text=f"web text {uid_number}", meta={"sha256": hashlib.sha256(image).hexdigest()}))
                uid_number += 1
            if shard_id == 1:
                writer.write(Sample(key=f"{shard_id:05d}9999", uid=make_uid(10_000 + shard_id), status="http_404",
                                    error_message="HTTP 404"))
    finalize_folder(folder)
    return folder


def expected_captions(coca_dir: Path, shards: Path | str, *, decoding: str, num_captions: int, seed: int = 0) -> dict:
    """uid → syn_text, computed here in one batch with the same captioner and per-uid seeds."""
    captioner = load_captioner(CaptionerSpec(checkpoint=str(coca_dir)))
    preprocess = captioner.preprocess()
    samples = [s for s in iter_samples(str(shards)) if s.image != BROKEN_JPEG]
    pixels = torch.stack([preprocess(decode_image(s.image)) for s in samples])
    params = job.CaptionConfig(shards="x", out=Path("x"), checkpoint="x",
                               decode=DecodeParams(decoding=decoding, num_captions=num_captions)).decode_params()
    raw = captioner.caption(pixels, params, [image_seed(seed, s.uid) for s in samples])
    return {s.uid: [process_caption(r.text, num_tokens=r.num_tokens, truncated=r.truncated).text for r in group]
            for s, group in zip(samples, raw, strict=True)}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from qcap.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_caption_job_writes_datacompdr_captions(tmp_path, ray_address, coca_dir, capsys):
    shards = write_shards(tmp_path / "curated", [4, 3, 2], broken={(0, 1)})
    # a fourth shard cut short on disk: that shard fails, as a shard, and the others go on
    write_shards(tmp_path / "scratch", [3])
    data = (tmp_path / "scratch" / "00000.tar").read_bytes()
    (shards / "00003.tar").write_bytes(data[: len(data) // 2])
    for suffix in (".parquet", "_stats.json"):
        (shards / f"00003{suffix}").write_bytes((tmp_path / "scratch" / f"00000{suffix}").read_bytes())
    out = tmp_path / "syn"
    argv = ["caption", "--shards", str(shards), "--out", str(out), "--checkpoint", str(coca_dir),
            "--num-captions", "3", "--decoding", "top_p", "--top-p", "0.9", "--batch-size", "3",
            "--num-workers", "1", "--ray-address", ray_address, "--no-progress"]
    code, stdout, stderr = run_cli(argv, capsys)
    # the cut shard keeps the samples before the cut; the ones its Parquet lists after it are rows
    # with status missing_from_tar (the cut named), so nothing is lost and the job succeeds
    assert code == 0, stderr
    summary = json.loads((out / job.SUMMARY_FILE).read_text())
    assert summary["failed_shards"] == {}
    cut_rows = {r["key"]: r for r in read_table(str(out / "00003.parquet")).to_pylist()}
    assert len(cut_rows) == 3
    lost = [r for r in cut_rows.values() if r["status"] != "success"]  # the sample at the cut, any after it
    before_cut = 3 - len(lost)
    assert lost and {r["status"] for r in lost} <= {"truncated", "missing_from_tar"}
    assert all("00003.tar" in r["error_message"] for r in lost), [(r["status"], r["error_message"]) for r in lost]
    assert summary["images_in"] == 12 and summary["images_captioned"] == 8 + before_cut
    assert summary["images_failed"] == dict(Counter(["decode_error"] + [r["status"] for r in lost]))
    assert summary["captions"] == 3 * (8 + before_cut) and summary["reconciled"]
    assert "counts reconcile: yes" in stdout

    # Apple's layout plus qcap's provenance, keyed by uid; every input image exactly once
    assert [Path(t).name for t in expand_shards(str(out))] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    tars = expand_shards(f"{out}/{{00000..00002}}.tar")
    written = list(iter_samples(tars))
    inputs = [s for s in iter_samples(expand_shards(f"{shards}/{{00000..00002}}.tar"))]
    assert sorted(s.uid for s in written) == sorted(s.uid for s in inputs if s.image != BROKEN_JPEG)
    table = read_tables(tars)
    rows = dict(zip(table.column("uid").to_pylist(), table.column("status").to_pylist(), strict=True))
    assert rows[inputs[1].uid] == "decode_error" and len(rows) == 9
    expected = expected_captions(coca_dir, f"{shards}/{{00000..00002}}.tar", decoding="top_p", num_captions=3)
    for sample in written:
        assert sample.image is None and sample.text is None
        assert sample.syn_text == expected[sample.uid]
        assert len(set(sample.syn_text)) > 1  # three different samples
        prov = sample.syn_provenance
        assert prov["captioner"]["model"] == "qcap-tiny-coca"
        assert prov["captioner"]["weights_sha256"] == hashlib.sha256(
            (coca_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
        assert prov["decoding"] == {"decoding": "top_p", "top_p": 0.9, "temperature": 1.0, "num_captions": 3,
                                    "seq_len": 30, "min_seq_len": 5, "repetition_penalty": 1.0}
        assert prov["seed"] == 0 and prov["image_seed"] == image_seed(0, sample.uid)
        assert [set(c) for c in prov["captions"]] == [{"raw", "num_tokens", "flags", "score"}] * 3
        assert sample.meta["sha256"] == next(s.meta["sha256"] for s in inputs if s.uid == sample.uid)
    with tarfile.open(tars[0]) as tar:  # caption-only: no image members
        assert {name.split(".", 1)[1] for name in tar.getnames()} == {"json", "syn.json", "qcap.json"}

    # Hugging Face datasets reads the shards as webdataset
    import datasets

    dataset = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert dataset.num_rows == 8
    by_uid = {row["json"]["uid"]: row["syn.json"]["syn_text"] for row in dataset}
    assert by_uid == {s.uid: s.syn_text for s in written}

    config = json.loads((out / job.CONFIG_FILE).read_text())
    assert config["config"]["decode"]["num_captions"] == 3 and config["captioner"]["backend"] == "open_clip"
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 2,
                                                             "00003.tar": before_cut}

    # a re-run over the readable shards finds them done and touches nothing; other settings
    # on this folder are refused
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".tar", ".done")}
    readable = [*argv[:2], f"{shards}/{{00000..00002}}.tar", *argv[3:]]
    code, stdout, _ = run_cli(readable, capsys)
    assert code == 0 and "captioned 8 of 9 images in 3/3 shards" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".tar", ".done")} == stamps
    code, _, stderr = run_cli([*readable[:-1], "--num-captions", "5", "--no-progress"], capsys)
    assert code == 2 and "num_captions: 3 -> 5" in stderr and "Traceback" not in stderr
    # the folder as caption named its records before every stage shared config.json/summary.json
    # (caption_config.json, caption_summary.json): resumed, nothing captioned again or removed; other
    # settings still refused by the old record
    (out / job.CONFIG_FILE).rename(out / "caption_config.json")
    (out / job.SUMMARY_FILE).rename(out / "caption_summary.json")
    code, stdout, _ = run_cli(readable, capsys)
    assert code == 0 and "captioned 8 of 9 images in 3/3 shards" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".tar", ".done")} == stamps
    assert (out / "caption_config.json").is_file() and (out / "caption_summary.json").is_file()
    code, _, stderr = run_cli([*readable[:-1], "--num-captions", "5", "--no-progress"], capsys)
    assert code == 2 and "num_captions: 3 -> 5" in stderr


@pytest.mark.slow
def test_caption_job_resumes_after_sigkill_without_losing_or_duplicating(tmp_path, ray_address, coca_dir, capsys):
    shards = write_shards(tmp_path / "curated", [3] * 10, start=500)
    out = tmp_path / "syn"
    argv = ["caption", "--shards", str(shards), "--out", str(out), "--checkpoint", str(coca_dir),
            "--num-captions", "2", "--batch-size", "1", "--num-workers", "1", "--ray-address", ray_address,
            "--no-progress"]
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(QCAP), *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.done")):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in time: " + log_path.read_text()[-3000:]
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group, started above
        proc.wait()
    done_before = sorted(p.stem for p in out.glob("*.done"))
    assert 1 <= len(done_before) < 10, f"the kill came too late to test resuming: {done_before}"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.stem in done_before and not p.name.startswith(".")}

    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert not list(out.glob(".*tmp-*"))  # no temporaries left from the killed run
    for name, data in before.items():  # shards finished before the kill are untouched
        assert (out / name).read_bytes() == data, name
    written = list(iter_samples(str(out)))
    uids = [s.uid for s in written]
    assert len(uids) == len(set(uids)) == 30  # none lost, none twice
    assert set(uids) == {s.uid for s in iter_samples(str(shards))}
    expected = expected_captions(coca_dir, shards, decoding="top_p", num_captions=2)
    assert {s.uid: s.syn_text for s in written} == expected  # a redone shard gets the same captions
    summary = json.loads((out / job.SUMMARY_FILE).read_text())
    assert summary["images_in"] == summary["images_captioned"] == 30 and summary["reconciled"]


@pytest.mark.slow
def test_provenance_without_a_weights_file_to_hash_is_logged(coca_dir, caplog):
    """A model id whose weights open_clip finds itself (local-dir:, hf-hub:) leaves no file to
    hash: the provenance's weights_sha256 is null, and the log says so."""
    captioner = load_captioner(CaptionerSpec(model=f"local-dir:{coca_dir}"))
    with caplog.at_level(logging.WARNING, logger="captioning.backends"):
        facts = captioner.describe()
    assert facts["source"] == f"local-dir:{coca_dir}" and facts["weights_sha256"] is None
    assert "no file to hash" in caplog.text
    assert load_captioner(CaptionerSpec(checkpoint=str(coca_dir))).describe()["weights_sha256"] == hashlib.sha256(
        (coca_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()


def test_summary_checks_shards_against_the_input_and_logs_what_it_cannot_count(tmp_path, caplog):
    """No Ray: the summary over Parquet-only output shards; a size mismatch is a problem, and an
    input shard with nothing to count it by (no stats, no Parquet) is logged, not passed in silence."""
    from base.shards import write_parquet_shard

    inputs = write_shards(tmp_path / "curated", [2, 3])
    out = tmp_path / "syn"
    for shard_id, size in enumerate([2, 2]):  # shard 1 came back one image short
        rows = [{"key": f"{shard_id:05d}{i:04d}", "uid": make_uid(10 * shard_id + i), "status": "success"}
                for i in range(size)]
        write_parquet_shard(out, shard_id, rows, extra_stats={"num_input": size, "num_captions": 3 * size,
                                                              "num_degenerate": 0, "flag_counts": {}})
    tars = shards_by_id(str(inputs))
    summary = job.summarize(out, tars, "parquet", {})
    assert (summary["images_in"], summary["images_captioned"], summary["captions"]) == (4, 4, 12)
    assert summary["problems"] == ["00001: input holds 3 samples, output 2"] and not summary["reconciled"]
    for suffix in (".parquet", "_stats.json"):
        (inputs / f"00001{suffix}").unlink()
    with caplog.at_level(logging.WARNING, logger="base.stage"):
        summary = job.summarize(out, tars, "parquet", {})
    assert summary["reconciled"] and not summary["problems"]
    assert "1 input shard(s) could not be counted" in caplog.text and "shard 00001" in caplog.text


def test_parquet_side_table_with_scores_and_greedy_decoding(tmp_path, ray_address, coca_dir, capsys):
    from base.models import load_model, save_checkpoint_dir

    clip_dir = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", tmp_path / "clip")
    shards = write_shards(tmp_path / "curated", [3, 2], broken={(1, 0)})
    out = tmp_path / "syn"
    code, stdout, stderr = run_cli(
        ["caption", "--shards", str(shards), "--out", str(out), "--checkpoint", str(coca_dir), "--decoding", "greedy",
         "--num-captions", "1", "--format", "parquet", "--scorer-checkpoint", str(clip_dir), "--num-workers", "1",
         "--ray-address", ray_address, "--no-progress"], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.glob("0000*")) == [
        "00000.done", "00000.parquet", "00000_stats.json", "00001.done", "00001.parquet", "00001_stats.json"]
    table = read_tables([str(out / "00000.parquet"), str(out / "00001.parquet")])
    rows = table.to_pylist()
    assert len(rows) == 5  # every input image; the failed download never had one
    ok = [r for r in rows if r["status"] == "success"]
    assert len(ok) == 4 and {r["status"] for r in rows} == {"success", "decode_error"}
    expected = expected_captions(coca_dir, shards, decoding="greedy", num_captions=1)
    for row in ok:
        assert row["syn_text"] == expected[row["uid"]]
        assert len(row["syn_scores"]) == 1 and -1.0 <= row["syn_scores"][0] <= 1.0
        prov = json.loads(row["qcap"])
        assert prov["scorer"]["model"] == "qcap-tiny-clip" and prov["captions"][0]["score"] == row["syn_scores"][0]
    import datasets

    dataset = datasets.load_dataset("parquet", data_files={"train": sorted(str(p) for p in out.glob("*.parquet"))},
                                    split="train")
    assert dataset.num_rows == 5 and set(dataset.column_names) >= {"uid", "syn_text", "syn_flags", "syn_scores", "qcap"}
    assert read_table(str(out / "00000.parquet")).num_rows == 3


@pytest.mark.slow
def test_caption_job_with_the_hugging_face_backend(tmp_path, ray_address, capsys):
    from test_caption_hf import WORDS, tiny_hf_captioner

    model = tiny_hf_captioner(tmp_path / "blip", "blip")
    shards = write_shards(tmp_path / "curated", [2, 2])
    out = tmp_path / "syn"
    code, stdout, stderr = run_cli(
        ["caption", "--shards", str(shards), "--out", str(out), "--backend", "hf", "--model", str(model),
         "--num-captions", "2", "--seq-len", "12", "--min-seq-len", "2", "--num-workers", "1",
         "--ray-address", ray_address, "--no-progress"], capsys)
    assert code == 0, stderr
    written = list(iter_samples(str(out)))
    assert len(written) == 4
    for sample in written:
        assert len(sample.syn_text) == 2 and all(set(t.split()) <= set(WORDS) for t in sample.syn_text)
        assert sample.syn_provenance["captioner"]["backend"] == "hf"


def test_bad_checkpoints_are_clear_errors_before_any_work(tmp_path, coca_dir, capsys):
    from base.models import WEIGHTS_FILE, load_model, save_checkpoint_dir

    clip_dir = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", tmp_path / "clip")
    shards = write_shards(tmp_path / "curated", [1])
    base = ["caption", "--shards", str(shards), "--out", str(tmp_path / "syn"), "--no-progress"]
    cases = [
        (["--model", "qcap-tiny-coca", "--checkpoint", str(clip_dir)], "is a 'qcap-tiny-clip', not the requested 'qcap-tiny-coca'"),
        (["--checkpoint", str(clip_dir)], "not an open_clip CoCa captioner"),
        (["--model", "qcap-tiny-coca", "--checkpoint", str(clip_dir / WEIGHTS_FILE)], "does not fit model 'qcap-tiny-coca'"),
        (["--checkpoint", str(tmp_path / "nowhere")], "no such checkpoint"),
        (["--checkpoint", str(coca_dir), "--seq-len", "40"], "at most 32 positions"),
    ]
    code, _, stderr = run_cli([*base[:3], "--out", str(shards), "--checkpoint", str(coca_dir)], capsys)
    assert code == 2 and "is the input folder" in stderr
    for extra, message in cases:
        code, _, stderr = run_cli([*base, *extra], capsys)
        assert code == 2 and message in stderr and "Traceback" not in stderr, (extra, stderr)
    for extra, message in (
        (["--checkpoint", str(coca_dir), "--pretrained", "x"], "give --pretrained or --checkpoint, not both"),
        (["--checkpoint", str(coca_dir), "--decoding", "beam"], "num_captions: beam search gives one caption"),
    ):
        with pytest.raises(SystemExit) as exit_info:  # argparse: the field at fault is named
            run_cli([*base, *extra], capsys)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "syn" / "00000.done").exists()
