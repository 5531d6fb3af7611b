"""finetune.attention_test: the locality/diversity test of attention distance over seeds, on hand-made data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from finetune.attention_test import Pair, claim_test, deep_blocks, read_pair

QCAP = str(Path(sys.executable).parent / "qcap")


def _grid(block_means: list[float], spread: float, heads: int = 4) -> list[list[float]]:
    offsets = [spread * (h - (heads - 1) / 2) for h in range(heads)]
    return [[m + o for o in offsets] for m in block_means]


def test_deep_blocks_are_the_last_half():
    assert deep_blocks(4) == [2, 3] and deep_blocks(5) == [2, 3, 4] and deep_blocks(4, 1) == [1, 2, 3]


def test_more_local_and_as_diverse_is_supported_with_scipys_p_value():
    # real: deep blocks at 20 px; DR: 2-3 px closer, depending on the seed; the same spread across heads
    pairs = [Pair(seed=s, real=_grid([10, 12, 20, 20], 2.0), dr=_grid([10, 12, 20 - d, 20 - d], 2.0 + e))
             for s, (d, e) in enumerate([(2.0, 0.1), (3.0, -0.1), (2.5, 0.05)])]
    result = claim_test(pairs)
    assert result["deep_blocks"] == [2, 3] and result["n_seeds"] == 3
    m_real = [20.0] * 3
    m_dr = [18.0, 17.0, 17.5]
    expected = stats.ttest_rel(m_real, m_dr, alternative="greater")
    assert result["locality"]["p_value"] == pytest.approx(expected.pvalue)
    assert result["locality"]["p_value"] < 0.05 and result["locality"]["mean_difference_px"] == pytest.approx(2.5)
    assert result["diversity"]["p_value"] > 0.05
    assert result["verdict"].startswith("supported")
    assert [s["mean_dr"] for s in result["per_seed"]] == pytest.approx(m_dr)


def test_locality_without_diversity_is_half_supported():
    pairs = [Pair(seed=s, real=_grid([10, 10, 20, 20], 3.0), dr=_grid([10, 10, 17 - d, 17 - d], 0.5 + d / 10))
             for s, d in enumerate([0.0, 0.5, 1.0])]
    result = claim_test(pairs)
    assert result["locality"]["p_value"] < 0.05 and result["diversity"]["p_value"] < 0.05
    assert result["verdict"].startswith("half supported")


def test_less_local_or_noisy_is_not_supported():
    pairs = [Pair(seed=s, real=_grid([10, 10, 20, 20], 2.0), dr=_grid([10, 10, 20 + d, 20 + d], 2.0))
             for s, d in enumerate([1.0, -0.5, 0.8])]
    result = claim_test(pairs)
    assert result["locality"]["p_value"] > 0.05 and result["verdict"].startswith("not supported")


def test_one_seed_or_constant_differences_are_untestable():
    one = [Pair(seed=0, real=_grid([10, 20], 2.0), dr=_grid([10, 15], 2.0))]
    assert claim_test(one)["verdict"].startswith("untestable (1 seed")
    same = [Pair(seed=s, real=_grid([10, 20], 2.0), dr=_grid([10, 15], 2.0)) for s in range(3)]
    result = claim_test(same)
    assert result["verdict"].startswith("untestable") and result["locality"]["p_value"] is None


def test_reads_attention_distance_files_and_rejects_bad_ones(tmp_path):
    good = {"models": [{"label": "DR", "distance_px": _grid([5, 9], 1.0)}, {"label": "real", "distance_px": _grid([5, 12], 1.0)}]}
    paths = []
    for seed in range(3):
        path = tmp_path / f"s{seed}.json"
        data = json.loads(json.dumps(good))
        data["models"][0]["distance_px"][1][0] -= seed  # differences vary by seed
        path.write_text(json.dumps(data))
        paths.append(path)
    pair = read_pair(paths[0], seed=0)
    assert pair.dr == good["models"][0]["distance_px"] and pair.real == good["models"][1]["distance_px"]
    out = tmp_path / "test.json"
    run = subprocess.run([QCAP, "attention-test", *map(str, paths), "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["n_seeds"] == 3 and "supported" in run.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [good["models"][0]]}))
    run = subprocess.run([QCAP, "attention-test", str(bad)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[1])
    assert run.returncode == 2 and "needs two models" in run.stderr and "Traceback" not in run.stderr
