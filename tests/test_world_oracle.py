"""The caption-quality oracle and the preview: exact on the truth, near zero on other images."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from base.shards import iter_samples
from world.config import WorldConfig
from world.generate import generate_world
from world.oracle import parse_caption, score_caption, score_file

QCAP = str(Path(sys.executable).parent / "qcap")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oracle") / "w"
    generate_world(
        WorldConfig(out=out, num_samples=240, clean_samples=40, eval_samples=8, chunk_size=120, workers=1,
                    eval_image_size=40, clean_image_size=64),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def truth(world) -> list[dict]:
    return pq.read_table(world / "truth.parquet").to_pylist()


def _row(*objects, background="grass", relations=()):
    keys = ("cls", "colour", "size", "texture", "position")
    rows = [dict(zip(keys, o, strict=True), depth_rank=k) for k, o in enumerate(objects)]
    return {"objects": rows, "relations": [{"front": a, "back": b} for a, b in relations], "background": background}


def test_the_true_description_scores_exactly_one_for_every_sample(truth):
    scores = [score_caption(row, row["description"]) for row in truth]
    assert all(s["score"] == 1.0 and s["belongs"] and s["num_hallucinated"] == 0 for s in scores)
    assert all(s["colour_coverage"] == 1.0 and s["position_coverage"] == 1.0 for s in scores)


def test_a_caption_of_another_image_scores_near_zero(truth):
    pool = [r for r in truth if r["split"] == "pool"]
    scores = []
    for k, row in enumerate(pool):
        other = pool[(k * 7 + 13) % len(pool)]
        if {(o["cls"], o["colour"]) for o in other["objects"]} & {(o["cls"], o["colour"]) for o in row["objects"]}:
            continue  # the rare pair that shares an object is not "another image" in content
        scores.append(score_caption(row, other["description"]))
    assert len(scores) > 150
    assert statistics.mean(s["score"] for s in scores) < 0.12
    assert sum(s["belongs"] for s in scores) / len(scores) < 0.2


def test_clean_captions_are_never_wrong_and_web_text_is_poor(world, truth):
    by_uid = {r["uid"]: r for r in truth}
    clean = [score_caption(by_uid[s.uid], c) for s in iter_samples(str(world / "clean"), with_image=False)
             for c in s.meta["captions"]]
    assert len(clean) == 200
    assert all(s["fact_precision"] == 1.0 and s["belongs"] for s in clean)
    assert statistics.mean(s["score"] for s in clean) > 0.75
    by_kind: dict[str, list[float]] = {}
    for row in truth:
        if row["split"] == "pool":
            by_kind.setdefault(row["text_kind"], []).append(score_caption(row, row["text"])["score"])
    mean = {k: statistics.mean(v) for k, v in by_kind.items()}
    web = statistics.mean(x for v in by_kind.values() for x in v)
    assert web < 0.35
    assert mean["empty"] == 0.0 and mean["non_english"] < 0.1
    assert mean["faithful"] > mean["wrong_attr"] > mean["partial"] > mean["mismatch"]


def test_hand_written_cases():
    row = _row(("star", "red", "large", "striped", "left"), ("circle", "blue", "small", "solid", "top right"),
               relations=[(0, 1)])
    full = "A large red striped star on the left and a small blue circle at the top right, on a grass background. " \
           "The red star is in front of the blue circle."
    assert score_caption(row, full)["score"] == 1.0
    s = score_caption(row, "a big red star shape at the upper left and a purple heart")
    assert s["hallucinated"] == ["heart"] and s["object_precision"] == 0.5 and s["object_recall"] == 0.5
    assert s["size_accuracy"] == 1.0 and s["colour_accuracy"] == 1.0 and s["position_accuracy"] == 0.0
    wrong = score_caption(row, "two green stars and a yellow disc")
    assert wrong["colour_accuracy"] == 0.0 and wrong["count_accuracy"] == 0.5 and not wrong["belongs"]
    behind = score_caption(row, "the blue circle is behind the red star")
    assert behind["relation_accuracy"] == 1.0 and behind["relation_coverage"] == 1.0
    swapped = score_caption(row, "the blue circle is in front of the red star")
    assert swapped["relation_accuracy"] == 0.0
    for nothing in ("", "IMG_2034.JPG", "Ein Bild mit Stern in Rot", "Royalty-free stock image 4411"):
        s = score_caption(row, nothing)
        assert s["score"] == 0.0 and not s["belongs"] and s["num_objects_mentioned"] == 0
    parsed = parse_caption("On the left there is a small blue circle; two red stars sit at the top and in the centre.")
    assert [(m.cls, m.colour, m.count, sorted(map(sorted, m.positions))) for m in parsed.mentions] == [
        ("circle", "blue", 1, [["left"]]), ("star", "red", 2, [["centre"], ["top"]]),
    ]


def test_score_captions_command_on_the_pool_and_on_clean_shards(world, tmp_path):
    pool = subprocess.run([QCAP, "score-captions", "--world", str(world), "--captions", str(world / "pool.parquet"),
                           "--out", str(tmp_path / "pool")], capture_output=True, text=True)
    assert pool.returncode == 0, pool.stderr
    assert "verdict: poor" in pool.stdout and "non_english" in pool.stdout
    clean = subprocess.run([QCAP, "score-captions", "--world", str(world), "--captions", str(world / "clean"),
                            "--field", "captions", "--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    assert "verdict: good" in clean.stdout
    config = json.loads((tmp_path / "clean" / "config.json").read_text())["config"]
    assert (config["captions"], config["field"], config["out"]) == (str(world / "clean"), "captions", str(tmp_path / "clean"))
    web = json.loads((tmp_path / "pool" / "summary.json").read_text())["overall"]
    good = json.loads((tmp_path / "clean" / "summary.json").read_text())["overall"]
    assert web["num_captions"] == 240 and good["num_captions"] == 200
    assert good["score"] > web["score"] + 0.4 and good["belongs_rate"] == 1.0 > web["belongs_rate"]
    per_caption = pq.read_table(tmp_path / "pool" / "per_caption.parquet")
    assert per_caption.num_rows == 240 and {"uid", "caption", "score", "belongs", "text_kind"} <= set(per_caption.schema.names)
    # a caption table of another shape: list column, and an unknown uid recorded, not fatal
    table = pa.table({"uid": ["f" * 32, per_caption.column("uid")[0].as_py()],
                      "syn_text": [["a red star"], ["a circle", "two squares"]]})
    pq.write_table(table, tmp_path / "syn.parquet")
    summary = score_file(world, tmp_path / "syn.parquet", progress=False)
    assert summary["num_unknown_uids"] == 1 and summary["overall"]["num_captions"] == 2
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "nouid.parquet")
    bad = subprocess.run([QCAP, "score-captions", "--world", str(world), "--captions", str(tmp_path / "nouid.parquet")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "uid" in bad.stderr and "Traceback" not in bad.stderr


def test_score_captions_keeps_off_another_stages_run_records(world, tmp_path):
    """Every stage names its records config.json and summary.json: scoring into a folder that holds another
    stage's (the caption folder itself) is refused before anything is written; its own folder is scored again."""
    syn = tmp_path / "syn"
    syn.mkdir()
    records = {"config.json": json.dumps({"stage": "caption", "config": {"seed": 0}}), "summary.json": "{}"}
    for name, text in records.items():
        (syn / name).write_text(text)
    argv = [QCAP, "score-captions", "--world", str(world), "--captions", str(world / "pool.parquet"), "--limit", "5"]
    refused = subprocess.run([*argv, "--out", str(syn)], capture_output=True, text=True)
    assert refused.returncode == 2 and "holds the run records of qcap caption" in refused.stderr
    assert {p.name: p.read_text() for p in syn.iterdir()} == records
    for _ in range(2):  # a scoring folder's own records are its to replace
        again = subprocess.run([*argv, "--out", str(tmp_path / "scores")], capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "scores" / "config.json").read_text())["stage"] == "score-captions"


def test_preview_png_shows_alt_text_against_truth(world):
    proc = subprocess.run([QCAP, "world", "--out", str(world), "--preview"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    path = world / "preview.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 600
        assert len(np.unique(np.asarray(image.convert("RGB").resize((64, 64))).reshape(-1, 3), axis=0)) > 50  # pictures, not a blank page


def test_noise_presets_and_overrides_change_the_pool_text(tmp_path):
    def pool_scores(**kwargs):
        out = tmp_path / "-".join(f"{k}{v}" for k, v in kwargs.items())
        generate_world(WorldConfig(out=out, num_samples=48, clean_samples=0, eval_samples=0, plant_each=0, workers=1,
                                   **kwargs), progress=False)
        rows = [r for r in pq.read_table(out / "truth.parquet").to_pylist() if r["split"] == "pool"]
        return rows, statistics.mean(score_caption(r, r["text"])["score"] for r in rows)

    clean_rows, clean_score = pool_scores(noise="clean")
    assert {r["text_kind"] for r in clean_rows} == {"clean"} and clean_score > 0.7
    harsh_rows, harsh_score = pool_scores(noise="harsh")
    assert harsh_score < 0.3 < clean_score
    empty_rows, empty_score = pool_scores(text_mix="empty=0.5,filename=0.5")
    assert {r["text_kind"] for r in empty_rows} == {"empty", "filename"} and empty_score < 0.05
