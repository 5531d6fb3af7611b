"""DR folders train: ``qcap train --caption-source dual`` on a build-dr output (fast), and the
real chain ``qcap caption`` (Ray, a tiny CoCa) → ``qcap build-dr`` → ``qcap subset`` → ``qcap
train`` on both rungs of the ladder (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dr_data import write_images, write_qcap_captions

from base.shards import array_to_uids, iter_samples, load_uids

QCAP = str(Path(sys.executable).parent / "qcap")


def train(data: Path, run: Path, source: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([QCAP, "train", "--preset", "tiny", "--data", str(data), "--out", str(run),
                           "--caption-source", source, "--batch-size", "4", "--samples-seen", "16", "--workers", "0",
                           "--threads", "1", "--tracker", "none", "--log-every", "1", "--record-uids", *extra],
                          capture_output=True, text=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def seen_uids(run: Path) -> set[str]:
    return {line.split("\t")[1] for line in (run / "seen" / "rank-0.tsv").read_text().splitlines()}


def test_dr_folder_trains_with_dual_captions(tmp_path):
    from captioning.dr import BuildDRConfig, build

    images = write_images(tmp_path / "curated", [list(range(0, 6)), list(range(6, 12))])
    captions = write_qcap_captions(tmp_path / "syn", [list(range(11, -1, -1))])
    dr = tmp_path / "dr"
    assert build(BuildDRConfig(images=str(images), captions=str(captions), out=dr, progress=False, card=False))["reconciled"]
    run = tmp_path / "run"
    from qcap.cli import main  # the real entry point, in this process (saves a second torch import)

    assert main(["train", "--preset", "tiny", "--data", str(dr), "--out", str(run), "--caption-source", "dual",
                 "--batch-size", "4", "--samples-seen", "16", "--workers", "0", "--threads", "1", "--tracker", "none",
                 "--log-every", "1", "--record-uids"]) == 0
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows[-1]["step"] == 4 and rows[-1]["data/captions_synthetic"] == rows[-1]["data/captions_real"] == 16
    assert all(r["contrastive_loss_real"] > 0 and r["contrastive_loss_synthetic"] > 0 for r in rows)
    assert seen_uids(run) <= set(array_to_uids(load_uids(dr / "uids.npy")))
    assert (run / "final" / "open_clip_config.json").is_file()


@pytest.mark.slow
def test_caption_build_dr_subset_train_chain(tmp_path):
    """The whole stage chain on real components: Ray captioning with a tiny CoCa checkpoint,
    the uid join, the ladder's two rungs, and training on each."""
    import torch

    from base.models import load_model, save_checkpoint_dir

    torch.manual_seed(0)
    coca = load_model("qcap-tiny-coca").model
    with torch.no_grad():  # open_clip leaves the vocabulary projection empty: draw it so captions vary
        coca.text_decoder.text_projection.normal_(0, 6 / 128**0.5)
    checkpoint = save_checkpoint_dir(coca, "qcap-tiny-coca", tmp_path / "coca")
    images = write_images(tmp_path / "curated", [list(range(0, 5)), list(range(5, 8))])
    syn = tmp_path / "syn"
    proc = subprocess.run([QCAP, "caption", "--shards", str(images), "--out", str(syn), "--checkpoint", str(checkpoint),
                           "--num-captions", "3", "--num-workers", "1", "--batch-size", "4", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dr = tmp_path / "dr"
    proc = subprocess.run([QCAP, "build-dr", "--images", str(images), "--captions", str(syn), "--out", str(dr),
                           "--drop-flags", "none", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 of 8 images with captions" in proc.stdout and "counts reconcile: yes" in proc.stdout
    captioned = {s.uid: s.syn_text for s in iter_samples(str(syn))}
    built = {s.uid: s for s in iter_samples(str(dr))}
    assert {u: s.syn_text for u, s in built.items()} == captioned  # qcap caption's captions, joined by uid
    assert all(s.syn_provenance["captioner"]["model"] == "qcap-tiny-coca" for s in built.values())
    assert "model=qcap-tiny-coca" in (dr / "README.md").read_text()

    for variant in ("keep", "real"):
        proc = subprocess.run([QCAP, "subset", "--shards", str(dr), "--fraction", "0.5", "--seed", "0", "--captions",
                               variant, "--out", str(tmp_path / variant), "--no-progress"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_uids(tmp_path / "keep" / "uids.npy").tolist() == load_uids(tmp_path / "real" / "uids.npy").tolist()

    proc = train(tmp_path / "keep", tmp_path / "run-dr", "dual")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(tmp_path / "run-dr")[-1]["data/captions_synthetic"] == 16
    proc = train(tmp_path / "real", tmp_path / "run-datacomp", "real")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(tmp_path / "run-datacomp")[-1]["data/captions_real"] == 16
    assert seen_uids(tmp_path / "run-dr") == seen_uids(tmp_path / "run-datacomp") == set(
        array_to_uids(load_uids(tmp_path / "real" / "uids.npy")))
    # the DataComp rung cannot be trained on synthetic captions by mistake
    proc = train(tmp_path / "real", tmp_path / "run-wrong", "synthetic")
    assert proc.returncode == 2 and "no synthetic captions" in proc.stderr and "Traceback" not in proc.stderr
