"""Dataset cards: every number equals a recount of the folder's samples; the figures are real
PNGs; preview.html shows every caption, escaped; a folder without per-shard statistics is
recounted; the lineage follows the configs beside the inputs."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
from conftest import make_uid
from dr_data import write_images, write_qcap_captions
from PIL import Image

from base.card import CaptionStats, collect, trace_lineage, write_card
from base.shards import iter_samples, read_tables


def nearest_rank(values: list[float], q: float) -> float:
    return float(np.percentile(values, 100 * q, method="inverted_cdf"))


def recount(folder: Path) -> dict:
    samples = list(iter_samples(str(folder)))
    real = [s.text.strip() for s in samples if s.text and s.text.strip()]
    syn = [c for s in samples for c in (s.syn_text or [])]
    flags = Counter(f for s in samples for c in (s.syn_provenance or {}).get("captions", []) for f in c["flags"])
    scores = [c["score"] for s in samples for c in (s.syn_provenance or {}).get("captions", []) if c["score"] is not None]
    statuses = Counter(read_tables(str(folder)).column("status").to_pylist())
    return {"samples": samples, "real": real, "syn": syn, "flags": flags, "scores": scores, "statuses": statuses}


def check_lengths(described: dict, texts: list[str]) -> None:
    words = [len(t.split()) for t in texts]
    chars = [len(t) for t in texts]
    assert described["words"]["count"] == len(texts)
    assert described["words"]["mean"] == round(sum(words) / len(words), 3)
    assert described["chars"]["mean"] == round(sum(chars) / len(chars), 3)
    for key, q in (("p5", 0.05), ("median", 0.5), ("p95", 0.95)):
        assert described["words"][key] == nearest_rank(words, q), key
        assert described["chars"][key] == nearest_rank(chars, q), key
    assert (described["words"]["min"], described["words"]["max"]) == (min(words), max(words))


def test_card_numbers_equal_a_recount(tmp_path, capsys, caplog):
    from qcap.cli import main

    images = write_images(tmp_path / "curated", [list(range(0, 9)), list(range(9, 16))])
    long_caption = "a very long synthetic caption about <b>a cube</b> & a sphere " * 3
    captions = {
        1: (["a red cube on a table", "cube cube cube cube", long_caption], [[], ["repeated_word"], ["truncated"]],
            [0.31, 0.1, 0.27]),
        2: (["x", "a small blue ball next to a wall"], [["too_short"], []], [0.05, 0.33]),
        3: (["a photo", "two"], [["too_short"], ["too_short"]], [0.2, 0.2]),
    }
    syn = write_qcap_captions(tmp_path / "syn", [list(range(16))[::-1]], captions=captions, failed={7: "decode_error"})
    out = tmp_path / "dr"
    assert main(["build-dr", "--images", str(images), "--captions", str(syn), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    card = json.loads((out / "card" / "card.json").read_text())
    truth = recount(out)
    assert card["num_samples"] == len(truth["samples"]) == 14 and card["num_shards"] == 2
    assert card["status_counts"] == dict(truth["statuses"]) == {"success": 14, "caption_failed": 1, "too_few_captions": 1}
    caps = card["captions"]
    assert caps["real"]["num_captions"] == len(truth["real"]) == 14
    assert caps["synthetic"]["num_captions"] == len(truth["syn"]) == 3 * 12 + 2 + 1
    check_lengths(caps["real"], truth["real"])
    check_lengths(caps["synthetic"], truth["syn"])
    assert caps["synthetic"]["flags"] == dict(truth["flags"]) == {"truncated": 1}
    per_sample = Counter(len(s.syn_text) for s in truth["samples"])
    assert caps["synthetic"]["per_sample"] == {str(k): v for k, v in sorted(per_sample.items())}
    scores = caps["synthetic"]["scores"]
    assert scores["num_scored"] == len(truth["scores"]) == 3
    assert math.isclose(scores["mean"], round(sum(truth["scores"]) / 3, 4))
    assert (scores["min"], scores["max"]) == (min(truth["scores"]), max(truth["scores"]))
    summary = json.loads((out / "summary.json").read_text())
    assert card["dropped_captions"] == summary["synthetic_dropped"] == {"repeated_word": 1, "too_short": 3}
    assert card["summary_counts"]["synthetic captions kept"] == len(truth["syn"])

    readme = (out / "README.md").read_text()
    real_words = caps["real"]["words"]
    assert (f"| real (web) | {len(truth['real'])} | {real_words['mean']:g} | {real_words['min']} | {real_words['p5']} | "
            f"{real_words['median']} | {real_words['p95']} | {real_words['max']} |") in readme
    assert f"| samples (in the tars) | {len(truth['samples'])} |" in readme
    assert "| synthetic captions dropped: too_short | 3 |" in readme
    assert "model=qcap-tiny-coca" in readme and "top_p=0.9" in readme  # captioner and decoding, from the inputs
    assert "too_short" in readme and "drop synthetic captions flagged" in readme
    for name in ("caption_lengths.png", "quality.png", "scores.png", "preview_grid.png"):
        assert f"card/{name}" in readme
        with Image.open(out / "card" / name) as png:
            assert png.format == "PNG" and png.width > 400 and png.height > 200
    page = (out / "preview.html").read_text()
    assert "&lt;b&gt;a cube&lt;/b&gt; &amp; a sphere" in page and "<b>a cube</b>" not in page
    assert page.count("<div class='cell'>") == 12 and page.count("data:image/jpeg;base64,") == 12
    assert "web text of image 0" in page and "truncated" in page

    # a folder whose shards lack caption statistics is recounted from its samples: same numbers
    for stats_path in out.glob("*_stats.json"):
        stats = json.loads(stats_path.read_text())
        del stats["caption_stats"]
        stats_path.write_text(json.dumps(stats))
    recounted = collect(out)
    assert recounted["recounted_shards"] == ["00000.tar", "00001.tar"]
    assert recounted["captions"] == caps and recounted["caption_histograms"] == card["caption_histograms"]
    # a shard whose stats cannot be read is recounted too, and the log says why
    (out / "00001_stats.json").write_text("{cut short")
    with caplog.at_level(logging.WARNING, logger="base.card"):
        again = collect(out)
    assert again["recounted_shards"] == ["00000.tar", "00001.tar"] and again["captions"] == caps
    assert "00001_stats.json: not valid JSON" in caplog.text and "recounting" in caplog.text


def test_caption_stats_merge_equals_one_pass():
    from base.shards import Sample

    samples = [Sample(key=str(i), uid=make_uid(i), text="word " * (i % 7) if i % 5 else "",
                      syn_text=[f"caption {'x ' * j}" for j in range(i % 4)],
                      syn_provenance={"captions": [{"flags": ["truncated"] if j else [], "score": -0.001 * j}
                                                   for j in range(i % 4)]}) for i in range(40)]
    whole = CaptionStats().add_all(samples)
    parts = CaptionStats().add_all(samples[:13]).merge(CaptionStats().add_all(samples[13:]))
    merged, single = parts.as_json(), whole.as_json()
    assert math.isclose(merged.pop("score_sum"), single.pop("score_sum"))  # float sums in another order
    assert merged == single
    again = CaptionStats.from_json(json.loads(json.dumps(whole.as_json())))
    assert again.summary() == whole.summary()
    assert whole.num_without_real == 12 and "-0.00" not in whole.score_bins
    assert whole.summary()["real"]["words"]["count"] == 28  # i % 5 == 0 or i % 7 == 0: no text


def test_card_lineage_follows_the_configs_beside_the_inputs(tmp_path, caplog):
    from base.config import save_config
    from base.shards import save_uids
    from curate.reshard import ReshardConfig
    from qcap.cli import main

    caplog.set_level(logging.WARNING, logger="base.card")
    images = write_images(tmp_path / "curated", [[0, 1, 2]])
    (tmp_path / "raw").mkdir()
    filters = tmp_path / "filters"
    filters.mkdir()
    save_config(ReshardConfig(shards=str(tmp_path / "raw"), subset=filters / "final.npy", out=images),
                images / "config.json")
    (images / "summary.json").write_text(json.dumps({"num_written": 3, "found_success": 3}))
    for name, settings, counts in (("basic", {"min_words": 3}, {"kept": 3, "dropped": {"too_few_words": 2}}),
                                   ("dedup", {"max_distance": 10, "subset": str(filters / "basic.npy")},
                                    {"kept": 3, "dropped": {"near_duplicate": 1}})):
        report_dir = filters / f"{name}.report"
        report_dir.mkdir()
        (report_dir / "config.json").write_text(json.dumps({
            "config": {**settings, "shards": str(tmp_path / "raw")},
            "config_class": f"curate.filters.config.{name.title()}Config", "filter": name}))
        save_uids(filters / f"{name}.npy", [make_uid(n) for n in range(3 + (name == "basic"))])
        (report_dir / "report.json").write_text(json.dumps({"counts": counts}))
    # the final list is the intersection, made by the real command (it records its inputs beside it)
    assert main(["uids", "intersect", str(filters / "basic.npy"), str(filters / "dedup.npy"), "--out",
                 str(filters / "final.npy")]) == 0
    card = write_card(images, title="curated", description="three images", usage=["qcap train --data curated"],
                      lineage=trace_lineage(images))
    steps = [step["step"] for step in card["lineage"]]
    assert steps == ["input", "filter basic", "filter dedup", "uids intersect", "reshard"]
    assert card["lineage"][1]["settings"] == {"min_words": 3, "shards": str(tmp_path / "raw")}
    assert card["lineage"][1]["report.json"] == {"kept": 3, "dropped": {"too_few_words": 2}}
    assert card["lineage"][3]["uids"] == 3
    assert card["lineage"][4]["summary.json"] == {"num_written": 3, "found_success": 3}  # reshard's summary
    assert card["lineage"][3]["inputs (uids)"] == {str(filters / "basic.npy"): 4, str(filters / "dedup.npy"): 3}
    readme = (images / "README.md").read_text()
    assert "### filter basic" in readme and "dropped={too_few_words: 2}" in readme
    assert "### filter dedup" in readme and "### uids intersect" in readme
    assert card["captions"]["synthetic"]["num_captions"] == 0 and "quality.png" not in card["figures"]
    assert "unreadable" not in caplog.text  # missing files (raw/ has no config) are no news

    # a report that is there but unreadable: the lineage goes on without its facts, and the log says so
    (filters / "dedup.report" / "report.json").write_text("{cut short")
    steps = trace_lineage(images)
    assert [step["step"] for step in steps] == ["input", "filter basic", "filter dedup", "uids intersect", "reshard"]
    assert "report.json" not in steps[2] and "dedup.report/report.json: unreadable" in caplog.text
