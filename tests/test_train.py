"""train: real tiny open_clip models trained on shards made here, with the real loader and CLI.

The two-process ``accelerate launch`` test and the SIGKILL-then-resume test are in
``test_train_slow.py`` (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import make_jpeg, make_uid

from base.shards import Sample, ShardError, ShardWriter, finalize_folder

QCAP = str(Path(sys.executable).parent / "qcap")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_shards(folder: Path, *, num_shards: int = 4, per_shard: int = 8, synthetic: bool = True,
                references: int = 0, bad: tuple[int, ...] = ()) -> list[str]:
    """Shards of distinct small JPEGs; returns the uids in order. ``bad`` indices get broken image bytes."""
    uids = []
    index = 0
    for shard in range(num_shards):
        with ShardWriter(folder, shard) as writer:
            for k in range(per_shard):
                uid = make_uid(index)
                meta = {"captions": [f"reference {j} of image {index}" for j in range(references)]} if references else {}
                writer.write(Sample(
                    key=f"{shard:05d}{k:04d}",
                    uid=uid,
                    image=b"\xff\xd8 not a jpeg" if index in bad else make_jpeg(48, 40, seed=index),
                    text=f"web alt text {index}" if not references else meta["captions"][0],
                    syn_text=[f"synthetic caption {index} number {j}" for j in range(5)] if synthetic else None,
                    meta=meta,
                ))
                uids.append(uid)
                index += 1
    finalize_folder(folder)
    return uids


def make_classification(folder: Path, per_class: int = 3) -> Path:
    from PIL import Image

    for name, color in COLORS.items():
        (folder / "val" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), tuple(min(255, c + 5 * i) for c in color)).save(folder / "val" / name / f"{i}.jpg")
    (folder / "classnames.txt").write_text("\n".join(f"{n} square" for n in sorted(COLORS)) + "\n")
    (folder / "templates.txt").write_text("a photo of a {}.\na {} picture.\n")
    return folder


def run_train(*argv: str) -> subprocess.CompletedProcess:
    # one torch thread: the machine is shared, and oversubscribed OpenMP threads crawl
    return subprocess.run([QCAP, "train", "--threads", "1", *argv], capture_output=True, text=True)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run) if "loss" in row}


def mark_metrics(run: Path) -> None:
    """Tag every metrics.jsonl row written so far (before a resume); a line cut by a kill is kept
    as it is (the resume drops it)."""
    lines = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            lines.append(json.dumps(dict(json.loads(line), before_resume=True)))
        except json.JSONDecodeError:
            lines.append(line)
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def assert_resumed_from(run: Path, step: int) -> None:
    """The rows up to ``step`` are the first run's and every later one is new: the run went on
    from that checkpoint (a restart from scratch would give the same losses, and rewrite them all)."""
    rows = [row for row in read_metrics(run) if "loss" in row]
    assert [row["step"] for row in rows if row.get("before_resume")] == list(range(1, step + 1))
    assert all(not row.get("before_resume") for row in rows if row["step"] > step)


@pytest.fixture(scope="module")
def tiny_clip():
    from base.models import load_model

    return load_model("qcap-tiny-clip")


# --------------------------------------------------------------------------------------------
# Caption sources


def test_caption_sources_draw_what_they_should():
    from train.captions import parse_caption_source

    samples = [Sample(key=str(i), uid=make_uid(i), text=f"real {i}", syn_text=[f"syn {i} {j}" for j in range(5)])
               for i in range(400)]

    def draws(spec):
        kinds, texts = Counter(), []
        source = parse_caption_source(spec)
        for i, sample in enumerate(samples):
            picked_texts, picked_kinds = source.pick(sample, seed=1000 + i)
            kinds.update(picked_kinds)
            texts.append((sample, picked_texts))
        return kinds, texts

    kinds, texts = draws("real")
    assert kinds == {"real": 400} and all(t == [s.text] for s, t in texts)
    kinds, texts = draws("synthetic")
    assert kinds == {"synthetic": 400} and all(t[0] in s.syn_text for s, t in texts)
    assert len({t[0] for s, t in texts if s.key == "0"} | {t[0][-1] for _, t in texts}) > 1
    assert Counter(t[0][-1] for _, t in texts).keys() == set("01234")  # every one of the 5 is drawn
    kinds, texts = draws("mix:0.25")
    assert 0.17 < kinds["synthetic"] / 400 < 0.33 and kinds["real"] + kinds["synthetic"] == 400
    for sample, (text,) in texts:
        assert text == sample.text or text in sample.syn_text
    kinds, texts = draws("dual")
    assert kinds == {"real": 400, "synthetic": 400}
    assert all(t[0] == s.text and t[1] in s.syn_text for s, t in texts)

    # several human references (the clean split): drawn uniformly among them
    refs = Sample(key="r", text="ref 0", meta={"captions": ["ref 0", "ref 1", "ref 2"]})
    real = parse_caption_source("real")
    drawn = Counter(real.pick(refs, seed)[0][0] for seed in range(300))
    assert set(drawn) == {"ref 0", "ref 1", "ref 2"} and min(drawn.values()) > 60

    with pytest.raises(ShardError, match="no synthetic captions.*--caption-source real"):
        parse_caption_source("synthetic").pick(Sample(key="x", text="only real"), seed=0)
    for bad in ("fake", "mix", "mix:1.5", "real:3"):
        with pytest.raises(ValueError, match="caption_source"):
            parse_caption_source(bad)


def test_a_stream_with_nothing_to_train_on_stops_with_a_clear_error(tmp_path, tiny_clip):
    """Every image of one worker's shards broken: an error naming the skips, not an endless loop."""
    from train.captions import parse_caption_source
    from train.loader import ImageTextEncoder, LoaderConfig, ShardStream

    make_shards(tmp_path / "d", num_shards=2, per_shard=4, bad=tuple(range(4)))  # shard 0 all broken
    encoder = ImageTextEncoder(tiny_clip.preprocess_train, tiny_clip.tokenizer, parse_caption_source("real"))
    stream = ShardStream(LoaderConfig(data=str(tmp_path / "d"), batch_size=2, workers=2, chunk_shards=1), encoder)
    with pytest.raises(ShardError, match=r"9 samples in a row could not be trained on \({'undecodable': 9}\)"):
        list(islice(stream, 20))


def test_stream_counts_caption_kinds_and_skips_undecodable(tmp_path, tiny_clip):
    from train.captions import parse_caption_source
    from train.loader import ImageTextEncoder, LoaderConfig, ShardStream

    make_shards(tmp_path / "d", num_shards=2, per_shard=16, bad=(3, 20))
    encoder = ImageTextEncoder(tiny_clip.preprocess_train, tiny_clip.tokenizer, parse_caption_source("mix:0.5"))
    stream = ShardStream(LoaderConfig(data=str(tmp_path / "d"), batch_size=6, workers=0, shuffle_buffer=8), encoder)
    batches = list(islice(stream, 6))
    assert all(b["image"].shape == (6, 3, 64, 64) and b["text"].shape == (6, 32) for b in batches)
    metrics = stream.metrics()
    assert metrics["data/samples"] == 36
    assert metrics["data/captions_real"] + metrics["data/captions_synthetic"] == 36
    assert 0 < metrics["data/captions_synthetic"] < 36
    # 32 samples, 2 broken: the first pass (chunk 0) trains 30 and skips both; every draw is counted
    chunk, drawn = stream.state_dict()["positions"]["0"]
    assert chunk == 1 and metrics["data/skipped_undecodable"] >= 2
    assert metrics["data/samples"] + metrics["data/skipped_undecodable"] == 32 + drawn


# --------------------------------------------------------------------------------------------
# The loader: split across processes and workers, exact resume


def _uids_of(stream, num_batches):
    return list(islice(stream, num_batches))


def test_each_sample_goes_to_exactly_one_rank_and_worker(tmp_path, tiny_clip):
    from train.captions import parse_caption_source
    from train.loader import ImageTextEncoder, LoaderConfig, ShardStream

    uids = make_shards(tmp_path / "d", num_shards=8, per_shard=6)
    encoder = ImageTextEncoder(tiny_clip.preprocess_train, tiny_clip.tokenizer, parse_caption_source("real"))
    per_rank = []
    for rank in range(2):
        cfg = LoaderConfig(data=str(tmp_path / "d"), batch_size=4, workers=2, shuffle_buffer=5, chunk_shards=1)
        stream = ShardStream(cfg, encoder, rank=rank, world_size=2, record_uids=tmp_path / f"rank-{rank}.tsv")
        _uids_of(stream, 6)  # one epoch: 24 samples per rank, 12 per worker = 3 batches each
        per_rank.append([line.split("\t")[1] for line in (tmp_path / f"rank-{rank}.tsv").read_text().splitlines()])
        assert set(stream.state_dict()["epochs"].values()) == {0}  # both workers still in their first pass
    assert len(per_rank[0]) == len(set(per_rank[0])) == 24
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(uids)

    # resampled: a fixed budget drawn with replacement, from all shards
    cfg = LoaderConfig(data=str(tmp_path / "d"), batch_size=8, workers=0, resampled=True, shuffle_buffer=4)
    stream = ShardStream(cfg, encoder)
    _uids_of(stream, 12)
    assert stream.metrics()["data/samples"] == 96


def test_loader_resume_replays_exactly(tmp_path, tiny_clip):
    from train.captions import parse_caption_source
    from train.loader import ImageTextEncoder, LoaderConfig, ShardStream

    make_shards(tmp_path / "d", num_shards=4, per_shard=10)
    encoder = ImageTextEncoder(tiny_clip.preprocess_train, tiny_clip.tokenizer, parse_caption_source("mix:0.5"))
    cfg = LoaderConfig(data=str(tmp_path / "d"), batch_size=3, workers=2, shuffle_buffer=6, chunk_shards=1)
    before = torch.get_rng_state()
    full = _uids_of(ShardStream(cfg, encoder, record_uids=tmp_path / "a.tsv"), 11)
    in_process = _uids_of(ShardStream(LoaderConfig(data=cfg.data, batch_size=3, workers=0), encoder), 2)
    assert len(in_process) == 2 and torch.equal(torch.get_rng_state(), before)  # the model's RNG is left alone
    first = ShardStream(cfg, encoder, record_uids=tmp_path / "b.tsv")
    _uids_of(first, 5)  # stop after an odd number of batches: the workers must be rotated
    state = json.loads(json.dumps(first.state_dict()))
    _uids_of(first, 2)  # trained after the checkpoint, then "killed": dropped by the resume
    resumed = ShardStream(cfg, encoder, record_uids=tmp_path / "b.tsv")
    resumed.load_state_dict(state)
    rest = _uids_of(resumed, 6)
    for want, got in zip(full[5:], rest, strict=True):
        assert torch.equal(want["image"], got["image"]) and torch.equal(want["text"], got["text"])
    assert (tmp_path / "a.tsv").read_text() == (tmp_path / "b.tsv").read_text()
    with pytest.raises(ValueError, match="--workers 2"):
        ShardStream(LoaderConfig(data=str(tmp_path / "d"), batch_size=3, workers=1), encoder).load_state_dict(state)


def test_map_stream_splits_by_rank_and_resumes(tmp_path):
    from train.loop import MapStream

    data = list(range(23))
    streams = [MapStream(data, batch_size=5, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch0 = [[int(x) for b in islice(s, 2) for x in b] for s in streams]
    assert not set(epoch0[0]) & set(epoch0[1]) and len(set(epoch0[0] + epoch0[1])) == 20
    full = [b.tolist() for b in islice(MapStream(data, batch_size=5, seed=3, workers=2), 9)]
    part = MapStream(data, batch_size=5, seed=3, workers=2)
    _ = list(islice(part, 4))
    again = MapStream(data, batch_size=5, seed=3)
    again.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert [b.tolist() for b in islice(again, 5)] == full[4:]


# --------------------------------------------------------------------------------------------
# Training end to end


def test_tiny_clip_trains_evaluates_and_loads_in_open_clip(tmp_path):
    import open_clip

    make_shards(tmp_path / "d", num_shards=4, per_shard=8)
    make_shards(tmp_path / "heldout", num_shards=1, per_shard=6, references=2)
    make_classification(tmp_path / "cls")
    run = tmp_path / "run"
    proc = run_train("--preset", "tiny", "--data", f"{tmp_path}/d/{{00000..00003}}.tar", "--out", str(run),
                     "--batch-size", "8", "--samples-seen", "240", "--lr", "2e-3", "--warmup", "4", "--log-every", "2",
                     "--checkpoint-every", "15", "--eval-data", str(tmp_path / "cls"),
                     "--retrieval-data", str(tmp_path / "heldout"), "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final model" in proc.stdout
    curve = losses(run)
    steps = sorted(curve)
    assert steps[-1] == 30
    early = sum(curve[s] for s in steps[:3]) / 3
    late = sum(curve[s] for s in steps[-3:]) / 3
    assert late < early - 0.3, curve

    results = json.loads((run / "eval.json").read_text())
    assert results["step"] == 30 and results["zeroshot/num_images"] == 9 and results["zeroshot/num_classes"] == 3
    assert results["retrieval/num_images"] == 6 and results["retrieval/num_texts"] == 12
    for key in ("zeroshot/top1", "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@5"):
        assert 0.0 <= results[key] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["batch_size"] == 8 and config["total_steps"] == 30 and config["num_samples"] == 32
    assert any((run / "logs").rglob("events.out.tfevents*")), "tensorboard tracker wrote nothing"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000015", "step-000030"]

    # the final folder and every step folder load in open_clip alone
    images = torch.randn(2, 3, 64, 64)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'final'}")
    model.eval()
    step_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'step-000030'}")
    step_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), step_model.encode_image(images))
    assert not torch.allclose(model.visual.conv1.weight, _random_tiny_clip().visual.conv1.weight)
    from base.models import WEIGHTS_FILE, register_model_configs

    register_model_configs()  # the weights file alone, with the architecture named (open_clip's pretrained=)
    by_file, _, _ = open_clip.create_model_and_transforms("qcap-tiny-clip", pretrained=str(run / "final" / WEIGHTS_FILE))
    by_file.eval()
    with torch.no_grad():
        torch.testing.assert_close(by_file.encode_image(images), step_model.encode_image(images))

    again = run_train("--preset", "tiny", "--data", f"{tmp_path}/d/{{00000..00003}}.tar", "--out", str(run))
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr


def _random_tiny_clip():
    from base.models import load_model

    torch.manual_seed(0)
    return load_model("qcap-tiny-clip").model


def test_tiny_coca_trains_with_its_caption_loss(tmp_path):
    from train.config import PRESETS
    from train.run import train

    make_shards(tmp_path / "clean", num_shards=2, per_shard=8, synthetic=False, references=3)
    run = tmp_path / "coca"
    cfg = PRESETS["tiny-coca"]()(data=str(tmp_path / "clean"), out=run, batch_size=8, samples_seen=160)
    cfg.trainer.lr, cfg.trainer.warmup, cfg.trainer.log_every, cfg.tracker, cfg.workers, cfg.threads = 2e-3, 3, 3, "none", 0, 1
    summary = train(cfg)
    assert summary["finished"] and summary["step"] == 20
    rows = [r for r in read_metrics(run) if "caption_loss" in r]
    assert rows[-1]["caption_loss"] < rows[0]["caption_loss"] - 1.0, rows
    assert rows[0]["contrastive_loss"] > 0
    assert summary["data"]["data/captions_real"] == 160
    from base.models import load_model

    loaded = load_model(checkpoint=run)
    assert type(loaded.model).__name__ == "CoCa"


def test_fresh_coca_decoder_is_initialised_and_trained_weights_are_kept(tmp_path):
    """open_clip leaves a fresh CoCa's vocabulary projection as torch.empty: every model that
    load_model creates without weights (train, caption, filters, finetune) gets it drawn, and a
    model loaded from a checkpoint keeps its weights."""
    import open_clip

    from base.models import init_coca_decoder, load_model, register_model_configs, save_checkpoint_dir

    register_model_configs()
    bare = open_clip.create_model("qcap-tiny-coca")
    with torch.no_grad():
        bare.text_decoder.text_projection.fill_(float("nan"))  # what torch.empty may hold
    init_coca_decoder(bare)
    assert torch.isfinite(bare.text_decoder.text_projection).all()

    model = load_model("qcap-tiny-coca").model
    projection = model.text_decoder.text_projection
    assert torch.isfinite(projection).all()
    assert abs(projection.std().item() - 128**-0.5) < 0.01  # open_clip's std for a width-128 tower
    block = model.text_decoder.resblocks[0]
    assert abs(block.mlp.c_fc.weight.std().item() - 256**-0.5) < 0.01  # fc_std = (2 * width)^-0.5
    init_coca_decoder(model, logit_scale=6.0)
    assert abs(model.text_decoder.text_projection.std().item() - 6 * 128**-0.5) < 0.05

    folder = save_checkpoint_dir(model, "qcap-tiny-coca", tmp_path / "coca")
    again = load_model(checkpoint=folder).model
    assert torch.equal(again.text_decoder.text_projection, model.text_decoder.text_projection)
    clip = load_model("qcap-tiny-clip").model
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    init_coca_decoder(clip)  # no decoder: nothing changes
    assert all(torch.equal(v, before[k]) for k, v in clip.state_dict().items())


def test_resume_gives_the_same_losses(tmp_path):
    from train.config import PRESETS
    from train.run import train

    make_shards(tmp_path / "d", num_shards=4, per_shard=8)

    def config(out, **overrides):
        cfg = PRESETS["tiny"]()(data=str(tmp_path / "d"), out=out, batch_size=8, samples_seen=96)
        cfg.trainer.log_every, cfg.trainer.checkpoint_every = 1, 3
        cfg.workers, cfg.tracker, cfg.caption_source, cfg.threads = 2, "none", "dual", 1
        for key, value in overrides.items():
            setattr(cfg.trainer if key in ("resume", "stop_at_step", "seed", "lr") else cfg, key, value)
        return cfg

    train(config(tmp_path / "a"))
    # checkpoints at 3 (an odd batch count: the loader workers rotate; worker 1 stops mid-chunk)
    # and at 5 (the stop)
    interrupted = train(config(tmp_path / "b", stop_at_step=5))
    assert not interrupted["finished"] and interrupted["final_dir"] is None
    with pytest.raises(Exception, match="already holds step-000005"):
        train(config(tmp_path / "b"))
    import shutil

    shutil.rmtree(tmp_path / "b" / "step-000005")  # as if killed after step 5, before its checkpoint
    assert (tmp_path / "b" / "step-000003").is_dir()
    mark_metrics(tmp_path / "b")
    with pytest.raises(Exception, match="changed batch_size"):
        train(config(tmp_path / "b", resume=True, batch_size=4))
    resumed = train(config(tmp_path / "b", resume=True))
    assert resumed["finished"]
    assert_resumed_from(tmp_path / "b", 3)
    want, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(want) == sorted(got) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, want, got)
    a_rows = [r for r in read_metrics(tmp_path / "a") if "contrastive_loss_synthetic" in r]
    assert a_rows and all(r["data/captions_synthetic"] == r["data/captions_real"] for r in a_rows)


def test_a_cnn_tower_trains_channels_last_and_resumes_to_the_same_losses(tmp_path):
    """--channels-last auto turns NHWC weights on for a CNN tower (off for the ViT); step checkpoints
    save and reload them (a resume gives the uninterrupted run's losses), the final folder holds
    ordinary contiguous weights, and NHWC computes the same losses as NCHW up to kernel rounding."""
    import shutil

    from base.models import load_model, resolve_channels_last
    from train.config import PRESETS
    from train.run import train

    make_shards(tmp_path / "d", num_shards=2, per_shard=8)

    def config(out, **overrides):
        cfg = PRESETS["tiny"]()(data=str(tmp_path / "d"), out=out, batch_size=8, samples_seen=48,
                                 model="qcap-tiny-resnet10t", precision="fp32")
        cfg.trainer.log_every, cfg.trainer.checkpoint_every = 1, 3
        cfg.workers, cfg.tracker, cfg.threads = 0, "none", 1
        for key, value in overrides.items():
            setattr(cfg.trainer if key in ("resume", "stop_at_step") else cfg, key, value)
        return cfg

    assert resolve_channels_last("auto", load_model("qcap-tiny-resnet10t").model)
    assert not resolve_channels_last("auto", load_model("qcap-tiny-clip").model)
    with pytest.raises(ValueError, match="channels_last"):
        resolve_channels_last("yes", None)
    train(config(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["channels_last"] is True and saved["config"]["channels_last"] == "auto"
    train(config(tmp_path / "b", stop_at_step=4))
    shutil.rmtree(tmp_path / "b" / "step-000004")  # killed after step 4, before its checkpoint
    mark_metrics(tmp_path / "b")
    assert train(config(tmp_path / "b", resume=True))["finished"]
    assert_resumed_from(tmp_path / "b", 3)
    want, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(want) == sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, want, got)
    train(config(tmp_path / "c", channels_last="off"))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["channels_last"] is False
    nchw = losses(tmp_path / "c")
    for step in want:
        assert nchw[step] == pytest.approx(want[step], rel=2e-3), (step, want, nchw)
    final = load_model(checkpoint=tmp_path / "a" / "final").model
    assert all(p.is_contiguous() for p in final.parameters())


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    from base.cli import run_guarded
    from train.run import main

    make_shards(tmp_path / "real", num_shards=1, per_shard=4, synthetic=False)
    proc = run_train("--data", str(tmp_path / "real"), "--out", str(tmp_path / "r"), "--caption-source", "synthetic")
    assert proc.returncode == 2 and "no synthetic captions" in proc.stderr and "Traceback" not in proc.stderr
    with ShardWriter(tmp_path / "syn", 0) as writer:  # caption-only shards, as qcap caption writes them
        writer.write(Sample(key="000000000", uid=make_uid(0), syn_text=["a caption"]))
    finalize_folder(tmp_path / "syn")

    def run(*argv):  # the entry point the qcap command dispatches to, in-process
        try:
            code = run_guarded(main, list(argv), "qcap train")
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        return code, capsys.readouterr().err

    code, err = run("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert code == 2 and "nowhere" in err
    code, err = run("--data", str(tmp_path / "syn"), "--out", str(tmp_path / "r"), "--caption-source", "synthetic")
    assert code == 2 and "samples carry no image (a caption-only folder" in err
    code, err = run("--out", str(tmp_path / "r"))
    assert code == 2 and "missing required flag(s): --data" in err
    code, err = run("--data", str(tmp_path / "real"), "--out", str(tmp_path / "r"), "--caption-source", "best")
    assert code == 2 and "unknown source 'best'" in err
    code, err = run("--data", str(tmp_path / "real"), "--out", str(tmp_path / "r"), "--bogus-flag", "1")
    assert code == 2 and "unrecognized arguments: --bogus-flag" in err


# --------------------------------------------------------------------------------------------
# Evaluation pieces


def test_recall_at_k_and_accuracy_on_known_scores():
    from train.evaluate import recall_at_k, topk_accuracy

    # 3 images, 4 texts (image 0 has texts 0 and 1)
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.2, 0.3, 0.1, 0.5], [0.3, 0.2, 0.9, 0.1]])
    owner = torch.tensor([0, 0, 1, 2])
    r = recall_at_k(sim, owner, ks=(1, 2))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)  # image 0 right; 1 picks text 3; 2 picks text 2
    assert r["image_to_text_R@2"] == pytest.approx(1 / 3)  # image 1: texts 3, 1; image 2: texts 2, 0
    assert r["text_to_image_R@1"] == pytest.approx(1 / 4)  # text 0 -> image 0 only
    assert r["text_to_image_R@2"] == pytest.approx(2 / 4)  # text 1 -> images 1, 0 (hit); text 2 -> 2, 0; text 3 -> 1, 2
    hits = topk_accuracy(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]), torch.tensor([1, 2]), ks=(1, 5))
    assert hits == {1: 1, 5: 2}


def test_classification_folders(tmp_path):
    from train.evaluate import load_classification, resolve_eval_data

    world = tmp_path / "W" / "eval"
    make_classification(world / "cls")
    (world / "retrieval").mkdir()
    cls, retrieval = resolve_eval_data(world)
    assert cls == world / "cls" and retrieval == str(world / "retrieval")
    data = load_classification(cls)
    assert data.class_dirs == ["blue", "green", "red"] and data.classnames == ["blue square", "green square", "red square"]
    assert data.templates == ["a photo of a {}.", "a {} picture."] and len(data.files) == 9

    imagenet = tmp_path / "imagenet"  # ImageNet-style: folders only; names from folders, open_clip's templates
    (imagenet / "val" / "golden_retriever").mkdir(parents=True)
    (imagenet / "val" / "golden_retriever" / "a.jpg").write_bytes(make_jpeg())
    data = load_classification(imagenet)
    assert data.classnames == ["golden retriever"] and len(data.templates) > 10

    (cls / "classnames.txt").write_text("only one\n")
    with pytest.raises(ShardError, match="1 class names for 3 class folders"):
        load_classification(cls)


def test_runs_with_different_precisions_share_one_process(tmp_path):
    """Accelerate keeps one process-wide state; qcap's accelerators start clean each run."""
    from train.loop import make_accelerator

    assert make_accelerator(precision="bf16", tracker="none", out_dir=tmp_path).mixed_precision == "bf16"
    assert make_accelerator(precision="fp32", tracker="none", out_dir=tmp_path).mixed_precision == "no"
