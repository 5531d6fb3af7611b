"""Training with the DR loss: the KD term against NumPy on hand-made embeddings, the loss
weights, a changed image skipped and counted, a tiny CLIP whose DR loss falls on qcap
reinforce's output, and training on Apple's DataCompDR layout joined with images by build-dr."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_jpeg, make_uid
from dr_data import write_images

from base.shards import Sample, ShardWriter, finalize_folder, iter_samples

torch.set_num_threads(1)


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_kd(si, st, s, ti, tt, dims, scales):
    """Apple's KD written out in NumPy: teachers' softmax averaged after the softmax, soft CE both ways."""
    def softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    edges = np.cumsum([0, *dims])
    p_i2t = np.mean([softmax(c * ti[:, a:b] @ tt[:, a:b].T) for a, b, c in zip(edges[:-1], edges[1:], scales, strict=True)], axis=0)
    p_t2i = np.mean([softmax(c * tt[:, a:b] @ ti[:, a:b].T) for a, b, c in zip(edges[:-1], edges[1:], scales, strict=True)], axis=0)
    logits = s * si @ st.T
    return (-(p_i2t * log_softmax(logits)).sum(1).mean() - (p_t2i * log_softmax(logits.T)).sum(1).mean()) / 2


def test_the_kd_term_equals_a_direct_numpy_computation():
    from train.distill import DRLoss, kd_loss

    rng = np.random.default_rng(0)
    n, dims, scales = 5, [3, 4], [100.0, 70.0]
    si, st = unit(rng, n, 6), unit(rng, n, 6)
    ti = np.concatenate([unit(rng, n, 3), unit(rng, n, 4)], axis=1)
    tt = np.concatenate([unit(rng, n, 3), unit(rng, n, 4)], axis=1)
    expected = numpy_kd(si, st, 20.0, ti, tt, dims, scales)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = kd_loss(t(si), t(st), torch.tensor(20.0, dtype=torch.float64), t(ti), t(tt), dims, scales)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # averaging after the softmax is not averaging the logits
    wrong = numpy_kd(si, st, 20.0, ti, tt, [7], [85.0])
    assert abs(wrong - expected) > 1e-3

    from open_clip import ClipLoss

    clip = float(ClipLoss()(t(si), t(st), torch.tensor(20.0, dtype=torch.float64)))
    loss = DRLoss(weights=(0.25, 0.75), dims=dims, scales=scales)
    parts = loss(t(si), t(st), torch.tensor(20.0, dtype=torch.float64), t(ti), t(tt))
    assert float(parts["contrastive_loss"]) == pytest.approx(clip, rel=1e-9)
    assert float(parts["distill_loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(0.25 * clip + 0.75 * expected, rel=1e-6)
    kd_only = DRLoss(weights=(0.0, 1.0), dims=dims, scales=scales)(t(si), t(st), 20.0, t(ti), t(tt))
    assert float(kd_only["loss"]) == pytest.approx(expected, rel=1e-6) and float(kd_only["contrastive_loss"]) == 0


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory) -> Path:
    """DR shards reinforced by the real job's shard function with two tiny random teachers
    (written by qcap reinforce's own writer; Ray is exercised in test_reinforce)."""
    from base.models import load_model, save_checkpoint_dir
    from base.shards import atomic_write_json
    from captioning.reinforce import ReinforceConfig, ReinforceContext, reinforce_one_shard, resolve_teachers
    from captioning.teachers import TeacherEnsemble

    root = tmp_path_factory.mktemp("reinforced")
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(str(save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", root / f"t{seed}")))
    images = root / "dr"
    for shard in range(2):
        with ShardWriter(images, shard) as writer:
            for index in range(8):
                number = shard * 8 + index
                image = make_jpeg(72, 64, seed=number)
                writer.write(Sample(key=f"{shard:05d}{index:04d}", uid=make_uid(number), image=image,
                                    text=f"a photo of thing {number}",
                                    syn_text=[f"synthetic {j} of thing {number}" for j in range(2)],
                                    meta={"sha256": hashlib.sha256(image).hexdigest()}))
    finalize_folder(images)
    out = root / "out"
    cfg = ReinforceConfig(shards=str(images), out=out, teachers=",".join(teachers), num_augmentations=2, size=64,
                          teacher_logit_scales="100,50")
    parts = resolve_teachers(cfg)
    context = ReinforceContext(specs=parts["specs"], logit_scales=(100.0, 50.0), augment=cfg.augment_config(),
                               num_augmentations=2, seed=0, embeddings="npz", device="cpu", autocast=None, threads=1,
                               batch_size=32, max_pixels=10**7, teachers_fingerprint=parts["fingerprint"])
    ensemble = TeacherEnsemble(list(parts["specs"]), logit_scales=[100.0, 50.0])
    for shard in range(2):
        reinforce_one_shard(ensemble, context, shard, str(images / f"{shard:05d}.tar"), str(out))
    finalize_folder(out)
    atomic_write_json(out / "config.json", {"stage": "reinforce", "augmentation": context.augment.as_json(),
                                                      "teacher_dims": parts["dims"], "teacher_logit_scales": [100.0, 50.0]})
    return out


def make_trainer(data: Path, out: Path, settings, *, steps: int, batch_size: int = 8, lr: float = 1e-3):
    from base.models import load_model
    from train.distill import DistillTask, reinforced_stream
    from train.evaluate import EvalConfig
    from train.loader import LoaderConfig
    from train.loop import Trainer, TrainerConfig, make_accelerator, seed_everything

    seed_everything(0)
    loaded = load_model("qcap-tiny-clip")
    loader_cfg = LoaderConfig(data=str(data), batch_size=batch_size, workers=0, shuffle_buffer=16, chunk_shards=2)
    stream, dims, scales = reinforced_stream(loader_cfg, loaded, settings)
    task = DistillTask(settings=settings, dims=dims, scales=scales, model=loaded.model, model_name=loaded.name,
                       tokenizer=loaded.tokenizer, preprocess_val=loaded.preprocess_val,
                       evaluation=EvalConfig(classification=None, retrieval=None))
    accelerator = make_accelerator(precision="fp32", tracker="none", out_dir=out)
    trainer = Trainer(task, stream, TrainerConfig(lr=lr, warmup=2, log_every=1, seed=0,
                                                  weight_decay=0.2, beta2=0.95, grad_clip_norm=1.0),
                      total_steps=steps, out_dir=out, accelerator=accelerator)
    return trainer, stream, (dims, scales)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_training_with_the_dr_loss_runs_and_its_loss_falls(reinforced, tmp_path):
    from train.distill import DRSettings

    run = tmp_path / "run"
    trainer, stream, (dims, scales) = make_trainer(reinforced, run, DRSettings(weights=(0.0, 1.0)), steps=24)
    assert dims == [128, 128] and scales == [100.0, 50.0]  # from the folder's reinforce record
    result = trainer.train()
    assert result.finished and result.step == 24
    rows = [r for r in metrics(run) if "loss" in r]
    losses = [r["loss"] for r in rows]
    assert all(r["distill_loss_real"] > 0 and r["distill_loss_synthetic"] > 0 for r in rows)
    assert all(r["contrastive_loss_real"] == 0 for r in rows)  # KD only: weights 0, 1
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses
    assert rows[-1]["data/samples"] == 24 * 8 and rows[-1]["data/captions_synthetic"] == 24 * 8


def test_mix_mode_and_the_stored_augmentation_in_the_batch(reinforced, tmp_path):
    """mix:1 trains one synthetic caption per image; the batch's image is the stored
    augmentation re-applied (equal to re-applying it by hand) and its teacher rows match."""
    from base.augment import AugmentConfig, apply_params, decode_paug
    from base.shards import decode_image
    from train.distill import DRSettings, ReinforcedEncoder

    config = json.loads((reinforced / "config.json").read_text())
    augment = AugmentConfig.from_json(config["augmentation"])
    from base.models import load_model

    loaded = load_model("qcap-tiny-clip")
    encoder = ReinforcedEncoder(loaded.tokenizer, DRSettings(mode="mix:1", augmentation="sequential"), augment,
                                size=64, mean=augment.mean, std=augment.std)
    sample = next(iter(iter_samples(str(reinforced))))
    with np.load(io.BytesIO(sample.extras["npz"])) as npz:
        image_emb, text_emb = npz["image_emb"], npz["text_emb"]
    for epoch in (0, 1, 2):
        pixels, texts, kinds, uid, t_image, t_texts = encoder.encode(sample, seed=11, epoch=epoch)
        expected = apply_params(decode_image(sample.image), decode_paug(sample.extras["paug.json"])[epoch % 2], augment)
        assert torch.equal(pixels, expected)
        assert np.array_equal(t_image.numpy(), image_emb[epoch % 2])
        assert kinds == ["synthetic"] and texts[0] in sample.syn_text
        assert np.array_equal(t_texts[0].numpy(), text_emb[1 + sample.syn_text.index(texts[0])])
    run = tmp_path / "run"
    trainer, _, _ = make_trainer(reinforced, run, DRSettings(weights=(0.25, 0.75), mode="mix:1"), steps=3)
    trainer.train()
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows[-1]["data/captions_synthetic"] == 24 and "data/captions_real" not in rows[-1]
    assert all(r["contrastive_loss"] > 0 and r["distill_loss"] > 0 for r in rows)


def test_an_image_whose_bytes_changed_after_reinforcement_is_skipped_and_counted(reinforced, tmp_path):
    """Re-encode two images (as a re-download or a resize would): their stored parameters refer
    to other pixels, so the loader skips them with a counted status instead of training on a
    misaligned crop."""
    from PIL import Image

    from train.distill import DRSettings

    changed = tmp_path / "changed"
    altered = set()
    for shard in range(2):
        with ShardWriter(changed, shard) as writer:
            for index, sample in enumerate(iter_samples(str(reinforced / f"{shard:05d}.tar"))):
                if index in (0, 1) and shard == 0:
                    buffer = io.BytesIO()
                    picture = Image.open(io.BytesIO(sample.image)).convert("RGB")
                    (picture if index == 0 else picture.resize((50, 40))).save(buffer, format="JPEG", quality=70)
                    sample.image = buffer.getvalue()
                    altered.add(sample.uid)
                writer.write(sample)
    finalize_folder(changed)
    (changed / "config.json").write_bytes((reinforced / "config.json").read_bytes())
    run = tmp_path / "run"
    trainer, stream, _ = make_trainer(changed, run, DRSettings(), steps=2, batch_size=7)
    trainer.train()
    counts = stream.metrics()
    assert counts["data/skipped_image_changed"] == 2
    assert counts["data/samples"] == 14  # drawn = 16 = trained 14 + skipped 2


def write_apple_reinforced(folder: Path, numbers: list[int], dim: int, num_aug: int, size: int) -> Path:
    """A folder laid out like Apple's DataCompDR-12M (no images, no Parquet): url.txt, syn.json,
    paug.json (parameters drawn on the images the test's image shards hold), npz [num_aug, dim] and
    [1 + 5, dim] (two hand-made unit-norm teachers of dim/2), json {uid, sha256}. Written with
    tarfile: a producer that is not qcap."""
    from base.augment import AugmentConfig, draw_many, encode_paug
    from base.shards import decode_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    half = dim // 2

    def emb(n: int) -> np.ndarray:
        return np.concatenate([unit(rng, n, half), unit(rng, n, half)], axis=1).astype(np.float32)

    with tarfile.open(folder / "00000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for index, number in enumerate(numbers):
            image = make_jpeg(32, 24, seed=number)  # what dr_data.image_sample holds for this number
            params = draw_many(decode_image(image), AugmentConfig(size=size), num_aug, seed=9, uid=make_uid(number))
            sink = io.BytesIO()
            np.savez(sink, image_emb=emb(num_aug), text_emb=emb(6))
            members = {
                "url.txt": f"http://example.com/{number}.jpg".encode(),
                "syn.json": json.dumps({"syn_text": [f"apple caption {j} of {number}" for j in range(5)]}).encode(),
                "paug.json": encode_paug(params),
                "npz": sink.getvalue(),
                "json": json.dumps({"uid": make_uid(number), "sha256": hashlib.sha256(image).hexdigest()}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{index:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def test_trains_on_apples_datacompdr_layout_joined_with_images_by_uid(tmp_path):
    from captioning.dr import BuildDRConfig, build
    from train.distill import DRSettings

    images = write_images(tmp_path / "curated", [list(range(0, 6)), list(range(6, 12))])
    apple = write_apple_reinforced(tmp_path / "apple", list(range(11, -1, -1)), dim=16, num_aug=3, size=32)
    dr = tmp_path / "dr"
    summary = build(BuildDRConfig(images=str(images), apple_syn=str(apple), out=dr, progress=False, card=False,
                                  drop_flags=["none"]))
    assert summary["reconciled"]
    first = next(iter(iter_samples(str(dr))))
    assert {"paug.json", "npz"} <= set(first.extras) and first.image is not None and len(first.syn_text) == 5
    run = tmp_path / "run"
    trainer, stream, (dims, scales) = make_trainer(dr, run, DRSettings(weights=(0.25, 0.75), augment_size=32),
                                                   steps=3, batch_size=4)
    assert dims == [8, 8] and scales == [100.0, 100.0]  # Apple's two teachers, logit scale 100 each
    result = trainer.train()
    assert result.finished
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows[-1]["data/samples"] == 12 and all(np.isfinite(r["loss"]) for r in rows)
    assert not any(k.startswith("data/skipped") for k in rows[-1])
