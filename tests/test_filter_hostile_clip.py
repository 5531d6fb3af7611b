"""qcap filter clip-score on hostile folders through the real Ray path (one local Ray of 2 CPUs
for the module, a tiny random qcap-tiny-clip): a score or a reason per row, duplicates per row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_uid
from test_filter_hostile import assert_one_line_error, assert_reconciles, decisions_of, run_cli
from test_filter_hostile_support import hostile_folder, make_image

from base.shards import Sample, ShardError, ShardWriter, array_to_uids, finalize_folder, read_tables


@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    import torch

    from base.models import load_model, save_checkpoint_dir

    torch.manual_seed(0)
    return save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", tmp_path_factory.mktemp("tiny"))


def clip_argv(folder: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["filter", "clip-score", "--shards", str(folder), "--checkpoint", str(checkpoint), "--out", str(out),
            "--batch-size", "16", "--num-workers", "1", "--no-progress", "--no-histograms", *extra]


def test_clip_score_on_hostile_folder(ray_two_cpus, tiny_clip, tmp_path, capsys):
    folder, cases = hostile_folder(tmp_path)
    out = tmp_path / "clip.npy"
    code, stdout, err = run_cli(clip_argv(folder, tiny_clip, out, "--top-fraction", "0.5"), capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    decisions = decisions_of(out)
    report = json.loads((tmp_path / "clip.report" / "report.json").read_text())
    rows = read_tables(str(folder)).num_rows
    assert_reconciles(report["counts"], decisions, rows)
    by_case = decisions.set_index(["shard", "key"])
    expected = {
        "no_txt": "no_caption", "empty_caption": "no_caption", "blank_caption": "no_caption",
        "non_utf8_caption": "bad_caption", "nul_caption": "bad_caption", "bomb": "undecodable_image",
        "undecodable": "undecodable_image", "json_list": "bad_member", "no_image": "no_image",
        "not_in_tar": "no_image", "bad_uid": "bad_uid", "no_uid": "bad_uid",
    }
    for case, reason in expected.items():
        row = by_case.loc[cases[case]]
        assert row.reason == reason and not row.kept and row.error_message, (case, row.reason)
        assert np.isnan(row.clip_score), case  # no score, not a score against the empty string
    assert not np.isnan(by_case.loc[cases["no_json"]].clip_score)  # no KEY.json: scored from KEY.txt
    # the scores file: one row per scored sample (shard, key), a status for the unscored
    scores = pq.read_table(tmp_path / "clip.scores.parquet").to_pandas()
    candidates = rows - 2  # the two bad-uid rows never reach the model
    assert len(scores) == candidates and not scores.duplicated(["shard", "key"]).any()
    statuses = scores.set_index(["shard", "key"]).status
    assert statuses[cases["empty_caption"]] == "no_caption" and statuses[cases["bomb"]] == "undecodable_image"
    # the repeated uid's rows are scored each on their own (same image and caption: the same score)
    dup = by_case.loc[cases["dup_uid_other_shard"]]
    assert dup.uid == make_uid(3) and dup.clip_score == pytest.approx(by_case.loc[("00000.tar", "000000003")].clip_score)
    # the top fraction is of the scored rows: DataComp's int(N * p) + 1 when no ties at the cut
    n = report["settings"]["num_scored"]
    assert n == int((statuses == "ok").sum()) == 17
    assert report["counts"]["kept"] >= int(n * 0.5) + 1 and report["counts"]["kept"] <= n
    assert set(array_to_uids(np.load(out))) == set(decisions.uid[decisions.kept])
    # a GPU that is not there is refused, not waited for (Ray has 2 CPUs and no GPU)
    code, _, err = run_cli(clip_argv(folder, tiny_clip, tmp_path / "gpu.npy", "--top-fraction", "0.5",
                                     "--device", "cuda", "--rescore", "--scores", str(tmp_path / "g.parquet")), capsys)
    assert_one_line_error(code, err, "offers 0 GPU(s)")


def test_top_fraction_over_rows_with_repeated_uids(ray_two_cpus, tiny_clip, tmp_path, capsys):
    """33 rows, 11 uids each three times with different images: --top-fraction 0.5 kept 100% when
    scores were keyed by uid (every row got its uid's last score); now it keeps about half the rows."""
    folder = tmp_path / "raw"
    for shard in range(3):
        with ShardWriter(folder, shard) as writer:
            for i in range(11):
                writer.write(Sample(key=f"{shard:04d}{i:05d}", uid=make_uid(1000 + i), image=make_image(3 * i + shard),
                                    text=f"a photo of thing number {i} on a table"))
    finalize_folder(folder)
    out = tmp_path / "half.npy"
    code, stdout, err = run_cli(clip_argv(folder, tiny_clip, out, "--top-fraction", "0.5"), capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    decisions = decisions_of(out)
    scores = pq.read_table(tmp_path / "half.scores.parquet").to_pandas()
    assert len(decisions) == len(scores) == 33 and scores.score.nunique() == 33  # a score per row
    kept = int(decisions.kept.sum())
    assert kept == int(33 * 0.5) + 1  # 17 of 33 rows, DataComp's rule
    assert "kept 17 of 33" in stdout
    assert decisions.clip_score[decisions.kept].min() > decisions.clip_score[~decisions.kept].max()
    # a second run reuses every row's score: no model pass, the same decisions
    code, stdout, _ = run_cli(clip_argv(folder, tiny_clip, tmp_path / "again.npy", "--top-fraction", "0.5",
                                        "--scores", str(tmp_path / "half.scores.parquet")), capsys)
    report = json.loads((tmp_path / "again.report" / "report.json").read_text())
    assert code == 0 and report["settings"]["num_computed_now"] == 0 and report["counts"]["kept"] == 17


def test_a_failure_inside_ray_is_one_line(ray_two_cpus):
    """Ray Data wraps a task's exception in RayTaskError(UserCodeException) whose text is the remote
    traceback and whose cause is gone; the filter re-raises the original kind and message."""
    import ray.data
    from ray.exceptions import RayError

    from base.cli import UsageError
    from curate.filters.clip_score import reraise_ray_error

    def raise_shard_error(item):  # nested: pickled by value, so the workers need not import this test module
        raise ShardError(f"{item['tar']}: truncated or corrupt tar (unexpected end of data)")

    def raise_value_error(item):
        raise ValueError("a bad value in a read task")

    ray.data.DataContext.get_current().enable_progress_bars = False
    for func, kind, message in [(raise_shard_error, ShardError, "x.tar: truncated or corrupt tar (unexpected end of data)"),
                                (raise_value_error, UsageError, "a bad value in a read task")]:
        with pytest.raises(RayError) as caught:
            list(ray.data.from_items([{"tar": "x.tar"}]).flat_map(func).iter_batches(batch_size=None))
        assert len(str(caught.value).splitlines()) > 1  # what the user saw before
        with pytest.raises(kind) as converted:
            reraise_ray_error(caught.value)
        assert str(converted.value) == message
