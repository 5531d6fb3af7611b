"""CLIP-score filter end to end through Ray Data with a tiny open_clip model (a saved random init)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_uid
from test_filter_support import assert_datacomp_uids, shared_world

from base.shards import Sample, ShardWriter, array_to_uids, finalize_folder, iter_samples, read_tables, save_uids
from qcap.cli import main as qcap

DECODE = 64  # JPEGs decode at a reduced scale (both sides >= 64 px): the model sees 64 px anyway


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (its start is the slow part); the filter reuses it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def save_random_clip(folder: Path, seed: int) -> Path:
    import torch

    from base.models import load_model, save_checkpoint_dir

    torch.manual_seed(seed)
    return save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", folder)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, ray_local):
    world, raw_world = shared_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("clip")
    raw = root / "raw"
    shutil.copytree(raw_world, raw)
    # one more shard whose 'success' holds bytes that do not decode (a downloader that did not check)
    with ShardWriter(raw, 99) as writer:
        writer.write(Sample(key="bad", uid=make_uid(99), image=b"\xff\xd8\xffgarbage", text="a red circle"))
    finalize_folder(raw)
    checkpoint = save_random_clip(root / "tiny-clip", seed=0)
    out = root / "clip.npy"
    code = qcap(["filter", "clip-score", "--shards", str(raw), "--checkpoint", str(checkpoint), "--top-fraction", "0.3",
                 "--out", str(out), "--batch-size", "16", "--num-workers", "1", "--decode-size", str(DECODE),
                 "--no-progress"])
    assert code == 0
    return raw, checkpoint, out


def direct_scores(raw: Path, checkpoint: Path) -> dict[str, float]:
    """The same model, called directly on every downloaded sample with a caption: image and caption, cosine."""
    import torch

    from base.models import load_model
    from base.shards import decode_image

    loaded = load_model(checkpoint=checkpoint)
    uids, pixels, texts = [], [], []
    for sample in iter_samples(str(raw)):
        if not (sample.text or "").strip():  # no caption: the filter gives it no score (no_caption)
            continue
        try:
            pixels.append(loaded.preprocess_val(decode_image(sample.image, draft=DECODE)))
        except ValueError:
            continue
        uids.append(sample.uid)
        texts.append(sample.text)
    with torch.no_grad():
        image = loaded.model.encode_image(torch.stack(pixels), normalize=True)
        text = loaded.model.encode_text(loaded.tokenizer(texts), normalize=True)
    return dict(zip(uids, (image * text).sum(dim=-1).tolist(), strict=True))


def test_scores_match_a_direct_computation_and_top_fraction_keeps_30_percent(clip_run):
    raw, checkpoint, out = clip_run
    scores = pq.read_table(out.with_name("clip.scores.parquet")).to_pandas().set_index("uid")
    direct = direct_scores(raw, checkpoint)
    assert set(direct) <= set(scores.index) and len(direct) > 100
    got = scores.score[list(direct)].to_numpy()
    np.testing.assert_allclose(got, np.array(list(direct.values()), dtype=np.float32), atol=2e-5)
    assert np.isnan(scores.score[make_uid(99)])  # the undecodable one is recorded, without a score
    assert scores.status[make_uid(99)] == "undecodable_image"
    captionless = scores.index[scores.status == "no_caption"]
    assert len(captionless) >= 1 and scores.score[captionless].isna().all()  # the world's empty alt-texts
    report = json.loads(out.with_name("clip.report").joinpath("report.json").read_text())
    counts = report["counts"]
    n = report["settings"]["num_scored"]
    assert n == len(direct)
    assert abs(counts["kept"] - 0.3 * n) <= 1
    assert counts["dropped"] == {"low_clip_score": n - counts["kept"], "undecodable_image": 1,
                                 "no_caption": len(captionless)}
    assert counts["total"] == read_tables(str(raw)).num_rows
    kept = set(array_to_uids(assert_datacomp_uids(out)))
    cutoff = report["settings"]["threshold"]
    assert kept == set(scores.index[scores.score >= cutoff])
    assert min(scores.score[list(kept)]) > max(scores.score.drop(list(kept)).dropna())
    assert (out.with_name("clip.report") / "hist_clip_score.png").exists()
    assert report["histograms"]["clip_score"]["cutoffs"] == [cutoff]
    page = (out.with_name("clip.report") / "preview.html").read_text()
    assert ">dropped: undecodable_image (1; the first 1)</h2>" in page and page.count("(no decodable image)") == 1
    assert f">kept ({counts['kept']}; the first 8)</h2>" in page and re.search(r"clip_score -?\d+\.\d{3} · score_status ok</div>", page)


def test_second_threshold_and_subset_reuse_the_scores(clip_run, tmp_path):
    raw, checkpoint, out = clip_run
    scores_file = out.with_name("clip.scores.parquet")
    scores = pq.read_table(scores_file).to_pandas().set_index("uid").score.dropna()
    threshold = float(np.median(scores))
    second = tmp_path / "median.npy"
    assert qcap(["filter", "clip-score", "--shards", str(raw), "--checkpoint", str(checkpoint), "--threshold",
                 str(threshold), "--scores", str(scores_file), "--out", str(second), "--no-progress", "--decode-size", str(DECODE),
                 "--no-histograms"]) == 0
    report = json.loads((tmp_path / "median.report" / "report.json").read_text())
    assert report["settings"]["num_computed_now"] == 0  # no model pass
    assert set(array_to_uids(np.load(second))) == set(scores.index[scores >= threshold])
    # chained after another filter: the fraction is of the subset
    half = sorted(scores.index)[: len(scores) // 2]
    save_uids(tmp_path / "half.npy", half)
    chained = tmp_path / "chained.npy"
    assert qcap(["filter", "clip-score", "--shards", str(raw), "--checkpoint", str(checkpoint), "--top-fraction", "0.5",
                 "--subset", str(tmp_path / "half.npy"), "--scores", str(scores_file), "--out", str(chained),
                 "--decode-size", str(DECODE),
                 "--no-progress", "--no-histograms"]) == 0
    report = json.loads((tmp_path / "chained.report" / "report.json").read_text())
    assert report["settings"]["num_computed_now"] == 0 and report["settings"]["num_scored"] == len(half)
    assert abs(report["counts"]["kept"] - 0.5 * len(half)) <= 1
    unscored = int(pq.read_table(scores_file).to_pandas().score.isna().sum())  # the undecodable and captionless ones
    assert report["counts"]["dropped"]["outside_subset"] == len(scores) + unscored - len(half)
    assert set(array_to_uids(np.load(chained))) <= set(half)


def test_scores_of_another_model_are_refused(clip_run, tmp_path, capsys):
    raw, _, out = clip_run
    other = save_random_clip(tmp_path / "other-clip", seed=1)
    code = qcap(["filter", "clip-score", "--shards", str(raw), "--checkpoint", str(other), "--top-fraction", "0.3",
                 "--scores", str(out.with_name("clip.scores.parquet")), "--out", str(tmp_path / "x.npy"), "--no-progress",
                 "--decode-size", str(DECODE)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--rescore" in err and '"weights": ["sha256:' in err


def test_config_needs_weights_and_one_rule(tmp_path, capsys):
    for argv, message in [
        (["--model", "qcap-tiny-clip", "--top-fraction", "0.3"], "trained weights"),
        (["--checkpoint", "x", "--top-fraction", "0.3", "--threshold", "0.2"], "exactly one"),
        (["--checkpoint", "x", "--top-fraction", "1.5"], "top_fraction"),
    ]:
        with pytest.raises(SystemExit) as exc:
            qcap(["filter", "clip-score", "--shards", str(tmp_path), "--out", str(tmp_path / "o.npy"), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_weights_that_cannot_load_are_one_clear_line(tmp_path_factory, tmp_path, capsys):
    """A missing checkpoint, a folder without one, an unknown model or pretrained tag: exit 2 with the
    reason, before any scoring (no Ray is started for these)."""
    _, raw = shared_world(tmp_path_factory)
    (tmp_path / "empty").mkdir()
    for weights, message in [
        (["--checkpoint", str(tmp_path / "nowhere")], "nowhere: no such file or folder"),
        (["--checkpoint", str(tmp_path / "empty")], "not a checkpoint folder"),
        (["--model", "no-such-model", "--pretrained", "x"], "cannot load the scoring model"),
        (["--model", "qcap-tiny-clip", "--pretrained", "no-such-tag"], "not a known tag"),
    ]:
        code = qcap(["filter", "clip-score", "--shards", str(raw), *weights, "--threshold", "0.2",
                     "--out", str(tmp_path / "o.npy"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (weights, err[-500:])
        assert not (tmp_path / "o.npy").exists()
