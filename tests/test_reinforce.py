"""``qcap reinforce``: stored augmentations re-applied bit for bit, Apple's npz/pth.gz layout
written by real tiny open_clip teachers on real Ray actors, the image identity recorded, a
teacher that cannot load stopping the job before any work, and kill-and-resume (slow)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_jpeg, make_uid
from test_caption_job import ray_address  # noqa: F401 - the module-scoped local Ray fixture

from base.shards import Sample, ShardWriter, finalize_folder, iter_samples

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def write_dr(folder: Path, layout: list[list[int]], *, broken: set[int] = frozenset(), syn: int = 2) -> Path:
    """DR-like image shards: image, real caption, ``syn`` synthetic captions; ``broken`` numbers
    get undecodable image bytes."""
    for shard, numbers in enumerate(layout):
        with ShardWriter(folder, shard) as writer:
            for index, number in enumerate(numbers):
                image = b"\xff\xd8\xff\xe0 not a jpeg" if number in broken else make_jpeg(40, 30, seed=number)
                writer.write(Sample(key=f"{shard:05d}{index:04d}", uid=make_uid(number), image=image,
                                    text=f"a photo of thing {number}",
                                    syn_text=[f"synthetic {j} of thing {number}" for j in range(syn)],
                                    meta={"sha256": hashlib.sha256(image).hexdigest()}))
    finalize_folder(folder)
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    """Two tiny CLIP teachers (different random weights) as checkpoint folders."""
    from base.models import load_model, save_checkpoint_dir

    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(str(save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", folder / f"t{seed}")))
    return paths


def test_a_stored_augmentation_reapplied_gives_the_identical_tensor():
    """The parameters drawn, stored in Apple's paug.json layout and read back, re-applied to the
    image decoded again from its bytes, give exactly torchvision's online pipeline's tensor."""
    from base.augment import (
        AugmentConfig,
        apply_params,
        augmentation_seed,
        decode_paug,
        draw_many,
        encode_paug,
        online_transform,
    )
    from base.shards import decode_image

    data = make_jpeg(56, 40, seed=3)
    cfg = AugmentConfig(size=32)
    params = draw_many(decode_image(data), cfg, 12, seed=5, uid=make_uid(3))
    stored = encode_paug(params)
    outer = json.loads(stored)
    assert list(outer) == ["param_aug"] and isinstance(outer["param_aug"], str)  # Apple: a JSON string inside
    read = decode_paug(stored)
    assert [len(p[0]) for p in read] == [4] * 12 and all(len(op) == 2 for p in read for op in p[1])
    assert any(op[0] != 0 for p in read for op in p[1])  # RandAugment ops were drawn, not only Identity
    for index, p in enumerate(read):
        torch.manual_seed(augmentation_seed(5, make_uid(3), index))
        online = online_transform(cfg)(decode_image(data))
        again = apply_params(decode_image(data), p, cfg)
        assert again.dtype == torch.float32 and tuple(again.shape) == (3, 32, 32)
        assert torch.equal(online, again), index
    # Apple's default recipe: 224 px, bicubic, RandAugment p 1.0, OpenAI mean/std
    apple = AugmentConfig().as_json()
    assert apple["random_resized_crop"]["size"] == 224 and apple["random_resized_crop"]["interpolation"] == "bicubic"
    assert apple["rand_augment"]["p"] == 1.0 and apple["normalize"]["mean"][0] == pytest.approx(0.48145466)


def test_reinforce_writes_apples_npz_layout_on_ray(tmp_path, teachers, ray_address, capsys):  # noqa: F811 - pytest fixture
    from base.augment import AugmentConfig, apply_pil, decode_paug, to_tensor
    from base.models import weights_sha256
    from base.shards import decode_image, read_table
    from captioning.reinforce import main
    from captioning.teachers import TeacherEnsemble, parse_teachers

    shards = write_dr(tmp_path / "dr", [[0, 1, 2], [3, 4]], broken={4})
    out = tmp_path / "reinforced"
    code = main(["--shards", str(shards), "--out", str(out), "--teachers", ",".join(teachers),
                 "--num-augmentations", "3", "--size", "32", "--num-workers", "2", "--ray-address", ray_address,
                 "--no-progress", "--batch-size", "8"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "reinforced 4 of 5 images in 2/2 shards" in stdout and "decode_error 1" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciled"] and summary["augmentations"] == 12 and summary["texts_embedded"] == 12
    config = json.loads((out / "config.json").read_text())
    assert [t["weights_sha256"] for t in config["teachers"]] == [
        weights_sha256(Path(t) / "open_clip_model.safetensors") for t in teachers]
    assert config["teacher_dims"] == [128, 128]
    assert config["teacher_logit_scales"] == pytest.approx([1 / 0.07, 1 / 0.07], rel=1e-4)  # open_clip's init
    assert config["augmentation"]["random_resized_crop"]["size"] == 32
    assert read_table(str(out / "00001.tar")).column("status").to_pylist() == ["success", "decode_error"]

    ensemble = TeacherEnsemble(parse_teachers(",".join(teachers)))
    cfg = AugmentConfig.from_json(config["augmentation"])
    originals = {s.uid: s for s in iter_samples(str(shards))}
    written = list(iter_samples(str(out)))
    assert len(written) == 4
    for sample in written:
        source = originals[sample.uid]
        assert sample.image == source.image and sample.text == source.text and sample.syn_text == source.syn_text
        assert {"paug.json", "npz", "reinforce.json"} <= set(sample.extras)
        with np.load(io.BytesIO(sample.extras["npz"]), allow_pickle=False) as npz:
            assert sorted(npz.files) == ["image_emb", "text_emb"]
            image_emb, text_emb = npz["image_emb"], npz["text_emb"]
        assert image_emb.dtype == text_emb.dtype == np.float32
        assert image_emb.shape == (3, 256) and text_emb.shape == (1 + 2, 256)
        # row order: text row 0 the real caption, 1 + i synthetic caption i; image row a = augmentation a
        expected_text = ensemble.encode_texts([sample.text, *sample.syn_text]).numpy()
        np.testing.assert_allclose(text_emb, expected_text, atol=1e-5)
        params = decode_paug(sample.extras["paug.json"])
        image = decode_image(sample.image)
        expected_image = ensemble.encode_images(torch.stack([to_tensor(apply_pil(image, p, cfg), cfg, normalize=False)
                                                             for p in params])).numpy()
        np.testing.assert_allclose(image_emb, expected_image, atol=1e-5)
        assert np.allclose(np.linalg.norm(image_emb[:, :128], axis=1), 1, atol=1e-5)  # each teacher's slice unit norm
        record = json.loads(sample.extras["reinforce.json"])
        assert record["image_sha256"] == hashlib.sha256(sample.image).hexdigest()
        assert record["image_bytes"] == len(sample.image) and record["image_size"] == [40, 30]
        assert record["text_rows"] == {"real": 0, "syn_text": [1, 3]}

    # a second run finds every shard done; other settings are refused with one line
    assert main(["--shards", str(shards), "--out", str(out), "--teachers", ",".join(teachers),
                 "--num-augmentations", "3", "--size", "32", "--num-workers", "1", "--ray-address", ray_address,
                 "--no-progress", "--batch-size", "8"]) == 0
    from base.cli import run_guarded

    assert run_guarded(main, ["--shards", str(shards), "--out", str(out), "--teachers", ",".join(teachers),
                              "--num-augmentations", "4", "--size", "32", "--ray-address", ray_address,
                              "--no-progress"], "qcap reinforce") == 2
    assert "num_augmentations: 3 -> 4" in capsys.readouterr().err


def test_pth_gz_holds_bf16_tensors_in_apples_layout(tmp_path, teachers):
    """``--embeddings pth.gz``: DataCompDR-12M-bf16's member, the same rows in bf16 (run on one
    shard in this process, the function each actor calls)."""
    from base.augment import decode_embeddings
    from captioning.reinforce import ReinforceConfig, ReinforceContext, reinforce_one_shard, resolve_teachers
    from captioning.teachers import TeacherEnsemble

    shards = write_dr(tmp_path / "dr", [[7, 8]], syn=5)
    cfg = ReinforceConfig(shards=str(shards), out=tmp_path / "o", teachers=",".join(teachers), num_augmentations=2,
                          size=32, embeddings="pth.gz")
    parts = resolve_teachers(cfg)
    context = ReinforceContext(specs=parts["specs"], logit_scales=None, augment=cfg.augment_config(),
                               num_augmentations=2, seed=0, embeddings="pth.gz", device="cpu", autocast=None, threads=1,
                               batch_size=3, max_pixels=10**7, teachers_fingerprint=parts["fingerprint"])
    counts = reinforce_one_shard(TeacherEnsemble(list(parts["specs"])), context, 0, str(shards / "00000.tar"),
                                 str(tmp_path / "o"))
    assert counts == {"shard_id": 0, "num_input": 2, "num_augmentations": 4, "num_texts": 12}
    for sample in iter_samples(str(tmp_path / "o")):
        assert "npz" not in sample.extras
        state = torch.load(io.BytesIO(gzip.decompress(sample.extras["pth.gz"])), weights_only=True)
        assert sorted(state) == ["image_emb", "text_emb"]
        assert state["image_emb"].dtype == state["text_emb"].dtype == torch.bfloat16
        assert tuple(state["image_emb"].shape) == (2, 256) and tuple(state["text_emb"].shape) == (6, 256)
        image_emb, text_emb = decode_embeddings(sample.extras)
        assert image_emb.dtype == torch.float32 and torch.equal(text_emb, state["text_emb"].float())


def test_a_teacher_that_fails_to_load_stops_the_job_before_any_work(tmp_path, teachers, capsys):
    from base.cli import run_guarded
    from captioning.reinforce import main

    shards = write_dr(tmp_path / "dr", [[0]])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8}, "model_name": "qcap-tiny-clip"}))
    (broken / "open_clip_model.safetensors").write_bytes(b"garbage, not safetensors")
    out = tmp_path / "out"
    code = run_guarded(main, ["--shards", str(shards), "--out", str(out), "--teachers", f"{teachers[0]},{broken}",
                              "--num-augmentations", "2", "--no-progress"], "qcap reinforce")
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and f"teacher {broken}" in lines[0] and "Traceback" not in err, err
    assert not out.exists()  # no work: no folder, no config, no Ray


def _reinforce_argv(shards: Path, out: Path, teachers: list[str]) -> list[str]:
    return ["--shards", str(shards), "--out", str(out), "--teachers", ",".join(teachers), "--num-augmentations", "2",
            "--size", "32", "--num-workers", "1", "--cpus-per-worker", "1", "--batch-size", "2", "--no-progress"]


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_output(tmp_path, teachers):
    """SIGKILL the job after its first shard; the re-run's folder is byte for byte the folder of
    a run that was never interrupted."""
    shards = write_dr(tmp_path / "dr", [[i, i + 100, i + 200] for i in range(8)])
    script = ("import sys; from base.cli import run_guarded; from captioning.reinforce import main; "
              "sys.exit(run_guarded(main, sys.argv[1:], 'qcap reinforce'))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(out: Path, log: Path) -> subprocess.Popen:
        with open(log, "wb") as handle:
            return subprocess.Popen([sys.executable, "-c", script, *_reinforce_argv(shards, out, teachers)], cwd=ROOT,
                                    env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    killed = tmp_path / "killed"
    proc = start(killed, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while not list(killed.glob("*.done")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group, started above
        proc.wait()
    done = sorted(p.stem for p in killed.glob("*.done"))
    assert 1 <= len(done) < 8, done
    assert start(killed, tmp_path / "resumed.log").wait() == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    clean = tmp_path / "clean"
    assert start(clean, tmp_path / "clean.log").wait() == 0, (tmp_path / "clean.log").read_text()[-3000:]
    assert not list(killed.glob(".*tmp-*"))
    names = sorted(p.name for p in clean.iterdir() if p.suffix in (".tar", ".parquet") or p.name.endswith("_stats.json"))
    assert len(names) == 24
    for name in names:
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["images_in"] == summary["images_reinforced"] == 24 and summary["reconciled"]
