"""make demo at its smallest scale, for real: every stage runs, is interrupted once, resumes, and
the report's numbers are the numbers in the files the stages wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNGS = ("datacomp-10", "datacomp-100", "dr-10", "dr-100", "drr-100")  # drr: DR + distillation (qcap reinforce)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_command(demo: Path, port: int) -> list[str]:
    return ["make", "--no-print-directory", "demo", f"DEMO={demo}", "SCALE=0.01", f"PORT={port}"]


def dig(data: dict, dotted: str):
    for part in dotted.split(".") if "/" not in dotted else [dotted]:
        data = data[part]
    return data


def funnel_images(payload: dict, label: str) -> float:
    return next(step["value"] for step in payload["funnel"] if step["label"] == label)


def read_key(path: Path, key: str) -> float:
    data = json.loads(path.read_text())
    if key.startswith(("metrics.", "by_field.")):
        return float(dig(data, key))
    return float(data[key])  # eval.json keys hold slashes: "zeroshot/top1"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_interrupted_resumes_and_reports_the_files_numbers(tmp_path):
    demo = tmp_path / "demo"
    port = free_port()
    env = dict(os.environ, QCAP_RUN="first")
    # 1. start the demo, interrupt the whole process group once the download has finished (the captioner,
    #    the filters or the CLIP-score pass are running then)
    proc = subprocess.Popen(demo_command(demo, port), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900
    def downloaded() -> bool:  # the download command has ended (its timing row is written after it exits)
        timings = demo / "timings.tsv"
        return timings.exists() and any(line.split("\t")[1] == "download" for line in timings.read_text().splitlines())

    while not downloaded():
        assert proc.poll() is None, f"demo ended before the download did:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "the download did not finish within 15 minutes"
        time.sleep(0.5)
    world_mtime = (demo / "world" / "world.json").stat().st_mtime_ns
    manifest_mtime = (demo / "raw" / "manifest.json").stat().st_mtime_ns
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (demo / "report.md").exists()

    # 2. run it again: it goes on from where it stopped, and finishes
    env["QCAP_RUN"] = "second"
    done = subprocess.run(demo_command(demo, port), cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (demo / "world" / "world.json").stat().st_mtime_ns == world_mtime  # not regenerated
    assert (demo / "raw" / "manifest.json").stat().st_mtime_ns == manifest_mtime  # not downloaded again
    timings = [line.split("\t") for line in (demo / "timings.tsv").read_text().splitlines()]
    assert {row[1] for row in timings if row[0] == "first"} >= {"world", "download"}
    assert "world" not in {row[1] for row in timings if row[0] == "second"}
    second = {row[1] for row in timings if row[0] == "second" and row[4] == "0"}
    assert {"pretrain", "finetune", "report"} <= second and "download" not in second

    # 3. the report: every number it shows is the number in the file it names
    payload = json.loads((demo / "report.json").read_text())
    text = (demo / "report.md").read_text()
    assert payload["missing"] == []
    checked = 0
    for row_key, columns in payload["table"].items():
        for column, cell in columns.items():
            for source in cell["sources"]:
                assert source["value"] == pytest.approx(read_key(demo / source["file"], source["key"])), (row_key, column)
                checked += 1
            if cell["n"]:
                assert cell["mean"] == pytest.approx(sum(cell["values"]) / cell["n"])
    # 6 backbones x (seg, depth) + 5 rungs x (zero-shot, 2 retrieval) + caption scores (4 real, 2 synthetic x 2)
    # + drr-100's caption scores (dr-100's file: real, synthetic x 2)
    assert checked == 12 + 15 + 4 + 4 + 3
    for rung in RUNGS:
        miou = read_key(demo / f"finetune/{rung}-s0/seg/metrics.json", "metrics.mIoU")
        assert f"{miou:.3f}" in text.split("## Result", 1)[1].split("## ", 1)[0]
    # same samples seen on every rung; the DR rungs hold synthetic captions, the real rungs none
    seen = {t["row"]: t["samples_seen"] for t in payload["training"]}
    assert len(set(seen.values())) == 1, seen
    assert payload["table"]["dr-100"]["f1_syn"]["n"] == 1 and payload["table"]["datacomp-100"]["f1_syn"]["n"] == 0
    assert len(payload["claims"]) == 6 and all(c["verdict"] for c in payload["claims"])
    # the reinforced rung: trained with the DR loss on qcap reinforce's output of dr-100, compared with dr-100
    assert {e["comparison"]["b"] for e in payload["reinforced"]} == {"dr-100"} and len(payload["reinforced"]) == 2
    drr = json.loads((demo / "clip" / "drr-100-s0" / "config.json").read_text())
    assert drr["task"] == "clip-dr" and drr["config"]["distill_loss_weights"] == [0.25, 0.75]
    summary = json.loads((demo / "dr-ladder" / "drr-100" / "summary.json").read_text())
    assert summary["reconciled"] and summary["images_reinforced"] == funnel_images(payload, "rung DR 100% (dr-100)")
    assert "DR + distillation 100%" in text.split("## Result", 1)[1].split("## ", 1)[0]
    for name in ("report/data_efficiency.png", "report/caption_samples.png", "attention/attention_distance.png"):
        assert (demo / name).read_bytes()[:4] == b"\x89PNG", name
    # the data funnel reconciles with the pipeline's own summaries
    funnel = {step["label"]: step["value"] for step in payload["funnel"]}
    manifest = json.loads((demo / "raw" / "manifest.json").read_text())
    assert funnel["pool rows"] == manifest["num_samples"] and funnel["downloaded"] == manifest["num_success"]
    assert funnel["captioned images"] == funnel["resharded (CLIP-score ∩ dedup)"]

    # 4. a third run has nothing left to do; a lost result is remade alone, then the report
    again = subprocess.run(demo_command(demo, port), cwd=ROOT, env=dict(env, QCAP_RUN="third"),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "third" not in (demo / "timings.tsv").read_text()
    shutil.rmtree(demo / "finetune" / "dr-10-s0" / "depth")
    again = subprocess.run(demo_command(demo, port), cwd=ROOT, env=dict(env, QCAP_RUN="fourth"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    fourth = [line.split("\t") for line in (demo / "timings.tsv").read_text().splitlines() if line.startswith("fourth")]
    assert [(row[1], row[4]) for row in fourth] == [("finetune", "0"), ("report", "0")], fourth
    assert "finetune/dr-10-s0/depth" in fourth[0][7]
    assert (demo / "finetune" / "dr-10-s0" / "depth" / "metrics.json").is_file()
