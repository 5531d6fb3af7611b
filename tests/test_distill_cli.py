"""DataCompDR end to end through the real ``qcap`` command: ``qcap reinforce`` (Ray) with two
tiny random teachers, then ``qcap train --distill-loss-weights 0.25 0.75`` on its output — the
loss falls, a re-encoded image is skipped and counted, a stopped run resumes to the uninterrupted
run's losses — and ``qcap train`` on Apple's DataCompDR layout joined by ``qcap build-dr``. Also
``--dr-augmentation sequential`` through the loader: epoch e trains stored augmentation e % n."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_jpeg, make_uid
from dr_data import write_images

from base.shards import Sample, ShardWriter, finalize_folder, iter_samples

torch.set_num_threads(1)
QCAP = str(Path(sys.executable).parent / "qcap")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DISABLE_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}


def qcap(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([QCAP, *argv], capture_output=True, text=True, env=ENV, timeout=600)


def write_teachers(folder: Path) -> list[str]:
    from base.models import load_model, save_checkpoint_dir

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(str(save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", folder / f"t{seed}")))
    return paths


def write_dr_images(folder: Path, num_shards: int, per_shard: int) -> Path:
    for shard in range(num_shards):
        with ShardWriter(folder, shard) as writer:
            for index in range(per_shard):
                number = shard * per_shard + index
                image = make_jpeg(72, 64, seed=number)
                writer.write(Sample(key=f"{shard:05d}{index:04d}", uid=make_uid(number), image=image,
                                    text=f"a photo of thing {number}",
                                    syn_text=[f"synthetic {j} of thing {number}" for j in range(2)],
                                    meta={"sha256": hashlib.sha256(image).hexdigest()}))
    finalize_folder(folder)
    return folder


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run) if "loss" in row}


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--distill-loss-weights", "0.25", "0.75",
            "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--log-every", "1", "--tracker", "none",
            "--workers", "1", "--threads", "1", "--precision", "fp32", "--seed", "0", *extra]


@pytest.mark.slow
def test_reinforce_then_train_with_the_dr_loss_through_the_cli(tmp_path):
    teachers = write_teachers(tmp_path / "teachers")
    images = write_dr_images(tmp_path / "dr", num_shards=2, per_shard=8)
    reinforced = tmp_path / "reinforced"
    done = qcap("reinforce", "--shards", str(images), "--out", str(reinforced), "--teachers", ",".join(teachers),
                "--teacher-logit-scales", "100,50", "--num-augmentations", "2", "--size", "64", "--num-workers", "1",
                "--cpus-per-worker", "1", "--batch-size", "16", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reinforced 16 of 16 images in 2/2 shards" in done.stdout and "counts reconcile: yes" in done.stdout

    # two images re-encoded after reinforcement (a re-download, a resize): skipped and counted
    changed = tmp_path / "changed"
    from PIL import Image

    for shard in range(2):
        with ShardWriter(changed, shard) as writer:
            for index, sample in enumerate(iter_samples(str(reinforced / f"{shard:05d}.tar"))):
                if shard == 1 and index < 2:
                    picture = Image.open(io.BytesIO(sample.image)).convert("RGB")
                    buffer = io.BytesIO()
                    (picture if index == 0 else picture.resize((60, 50))).save(buffer, format="JPEG", quality=70)
                    sample.image = buffer.getvalue()
                writer.write(sample)
    finalize_folder(changed)
    (changed / "config.json").write_bytes((reinforced / "config.json").read_bytes())

    full = tmp_path / "full"
    result = qcap(*train_argv(changed, full, "--samples-seen", "160", "--checkpoint-every", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 20/20" in result.stdout
    config = json.loads((full / "config.json").read_text())
    assert config["task"] == "clip-dr" and config["config"]["distill_loss_weights"] == [0.25, 0.75]
    assert config["dr_teachers"] == {"dims": [128, 128], "logit_scales": [100.0, 50.0]}  # the reinforce record's
    rows = [row for row in read_metrics(full) if "loss" in row]
    assert all(row["contrastive_loss_real"] > 0 and row["distill_loss_synthetic"] > 0 for row in rows)
    values = [row["loss"] for row in rows]
    assert np.mean(values[-4:]) < np.mean(values[:4]) - 0.05, values
    last = rows[-1]
    skipped = int(last["data/skipped_image_changed"])
    assert skipped >= 2  # each pass over the data meets both changed images
    assert not any(k.startswith("data/skipped_") and k != "data/skipped_image_changed" for k in last)
    assert f"skipped {{'image_changed': {skipped}}}" in result.stdout
    assert int(last["data/samples"]) == 160 and int(last["data/captions_synthetic"]) == 160

    # a reinforced run stops with a checkpoint and --resume continues it to the same losses
    part = tmp_path / "part"
    stopped = qcap(*train_argv(changed, part, "--samples-seen", "160", "--checkpoint-every", "4",
                               "--stop-at-step", "9"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "continue with --resume" in stopped.stdout
    shutil.rmtree(part / "step-000009")  # as if killed after step 9, before its checkpoint: resume from 8
    refused = qcap(*train_argv(changed, part, "--samples-seen", "160", "--checkpoint-every", "4", "--resume",
                               "--dr-mode", "mix:0.5"))
    assert refused.returncode == 2 and "dr_mode" in refused.stderr and "Traceback" not in refused.stderr
    resumed = qcap(*train_argv(changed, part, "--samples-seen", "160", "--checkpoint-every", "4", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(full), losses(part)
    assert sorted(want) == sorted(got) == list(range(1, 21))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    assert (part / "final" / "open_clip_model.safetensors").is_file()

    # plain shards (no paug.json) under the DR loss: one line naming the fix
    plain = qcap(*train_argv(images, tmp_path / "plain"))
    assert plain.returncode == 2 and "KEY.paug.json" in plain.stderr and "Traceback" not in plain.stderr
    coca = qcap(*train_argv(changed, tmp_path / "coca", "--model", "qcap-tiny-coca"))
    assert coca.returncode == 2 and "CoCa" in coca.stderr and "Traceback" not in coca.stderr


@pytest.mark.slow
def test_qcap_train_on_apples_datacompdr_layout_joined_by_build_dr(tmp_path):
    from test_distill import write_apple_reinforced

    images = write_images(tmp_path / "curated", [list(range(0, 6)), list(range(6, 12))])
    apple = write_apple_reinforced(tmp_path / "apple", list(range(11, -1, -1)), dim=16, num_aug=3, size=32)
    dr = tmp_path / "dr"
    built = qcap("build-dr", "--images", str(images), "--apple-syn", str(apple), "--out", str(dr), "--no-progress",
                 "--no-card", "--drop-flags", "none")
    assert built.returncode == 0, built.stderr[-3000:]
    run = tmp_path / "run"
    result = qcap("train", "--data", str(dr), "--out", str(run), "--distill-loss-weights", "0.25", "0.75",
                  "--dr-augment-size", "32", "--dr-augmentation", "sequential", "--batch-size", "4",
                  "--samples-seen", "12", "--log-every", "1", "--tracker", "none", "--workers", "1", "--threads", "1",
                  "--precision", "fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["dr_teachers"] == {"dims": [8, 8], "logit_scales": [100.0, 100.0]}  # Apple's two teachers
    rows = [row for row in read_metrics(run) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in rows)
    assert all(row["distill_loss_real"] > 0 for row in rows)
    assert int(rows[-1]["data/samples"]) == 12 and not any(k.startswith("data/skipped") for k in rows[-1])
    assert "samples drawn 12 = trained 12 + skipped {}" in result.stdout


def test_sequential_augmentation_trains_stored_augmentation_epoch_mod_n(tmp_path):
    """Through the real loader (ShardStream): with 3 stored augmentations, the batch of epoch e
    holds augmentation e % 3 of every image, and the teacher image row of that augmentation."""
    from base.augment import AugmentConfig, apply_params, decode_embeddings, decode_paug
    from base.models import load_model
    from base.shards import atomic_write_json, decode_image
    from captioning.reinforce import ReinforceConfig, ReinforceContext, reinforce_one_shard, resolve_teachers
    from captioning.teachers import TeacherEnsemble
    from train.distill import DRSettings, reinforced_stream
    from train.loader import LoaderConfig

    teachers = write_teachers(tmp_path / "teachers")
    images = write_dr_images(tmp_path / "dr", num_shards=1, per_shard=4)
    out = tmp_path / "out"
    cfg = ReinforceConfig(shards=str(images), out=out, teachers=",".join(teachers), num_augmentations=3, size=64)
    parts = resolve_teachers(cfg)
    context = ReinforceContext(specs=parts["specs"], logit_scales=None, augment=cfg.augment_config(),
                               num_augmentations=3, seed=0, embeddings="npz", device="cpu", autocast=None, threads=1,
                               batch_size=12, max_pixels=10**7, teachers_fingerprint=parts["fingerprint"])
    reinforce_one_shard(TeacherEnsemble(list(parts["specs"])), context, 0, str(images / "00000.tar"), str(out))
    finalize_folder(out)
    atomic_write_json(out / "config.json", {"stage": "reinforce", "augmentation": context.augment.as_json(),
                                                      "teacher_dims": parts["dims"],
                                                      "teacher_logit_scales": parts["logit_scales"]})
    samples = {s.uid: s for s in iter_samples(str(out))}
    augment = AugmentConfig.from_json(context.augment.as_json())
    loaded = load_model("qcap-tiny-clip")
    loader_cfg = LoaderConfig(data=str(out), batch_size=4, workers=0, shuffle_buffer=4, chunk_shards=1)
    for augmentation, expect_index in (("sequential", lambda e: e % 3), ("uniform", None)):
        settings = DRSettings(weights=(0.0, 1.0), mode="mix:0", augmentation=augmentation)
        stream, _, _ = reinforced_stream(loader_cfg, loaded, settings)
        picked = []
        for epoch, batch in zip(range(5), stream, strict=False):
            assert stream.epochs[0] == epoch  # one shard of 4 = one batch per epoch
            for row in range(4):
                match = [(uid, a) for uid, s in samples.items() for a, p in enumerate(decode_paug(s.extras["paug.json"]))
                         if torch.equal(batch["image"][row], apply_params(decode_image(s.image), p, augment))]
                assert len(match) == 1, (epoch, row)
                uid, index = match[0]
                picked.append(index)
                image_emb, _ = decode_embeddings(samples[uid].extras)
                assert torch.equal(batch["teacher_image"][row], image_emb[index])
                if expect_index is not None:
                    assert index == expect_index(epoch), (epoch, row, index)
        if augmentation == "uniform":
            assert len(set(picked)) > 1  # uniform draws differ across samples and epochs
        else:
            assert picked == [e % 3 for e in range(5) for _ in range(4)]
