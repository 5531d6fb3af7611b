"""A stated test of the paper's §3.4 claim: "DR heads are more local in the deeper layers while
keeping diversity", over seeds.

Input: one ``attention_distance.json`` per seed (``qcap attention-distance --checkpoint DR
--compare REAL``), whose ``models[0]`` is the DR backbone and ``models[1]`` the real-caption
backbone of the same seed, ``distance_px`` = [block][head] mean attention distance in pixels.

The statistics (the seed is the unit: heads and blocks of one model are not independent):

- deep blocks: the last ``ceil(L / 2)`` blocks (``deep_from`` overrides the first one, 0-based);
- locality: per seed, the mean distance over the deep blocks' heads, ``m_dr`` and ``m_real``;
  a one-sided paired t-test over seeds (``scipy.stats.ttest_rel(m_real, m_dr,
  alternative="greater")``), H0: DR's deep heads are not more local;
- diversity: per seed, the spread across heads (sample sd over heads, averaged over the deep
  blocks), ``s_dr`` and ``s_real``; a one-sided paired t-test for a *loss* of diversity
  (``ttest_rel(s_dr, s_real, alternative="less")``). Diversity counts as kept when that test
  does not reject at ``alpha`` — the absence of evidence of a loss, not a proof of equality,
  and the verdict says so;
- the claim is "supported" when locality rejects at ``alpha`` and diversity loss does not.
  With fewer than two seeds there is no test ("untestable").

Run alone: ``qcap attention-test FILE... [--out test.json] [--alpha 0.05]`` (one file per seed).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from base.cli import UsageError
from base.config import arg, parse_config

DEFAULT_ALPHA = 0.05
TEST_NAME = "one-sided paired t-test over seeds (scipy.stats.ttest_rel)"


@dataclass(frozen=True)
class Pair:
    """One seed: DR's and real captions' [block][head] distances."""

    seed: int | None
    dr: list[list[float]]
    real: list[list[float]]
    source: str = ""


def read_pair(path: Path, seed: int | None = None) -> Pair:
    """The DR (``models[0]``) and real (``models[1]``) distances of one attention_distance.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a readable attention_distance.json ({err}); re-run qcap attention-distance") from err
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or len(models) != 2:
        raise UsageError(f"{path}: needs two models (qcap attention-distance --checkpoint DR --compare REAL), "
                         f"found {len(models) if isinstance(models, list) else 'none'}")
    grids = []
    for model in models:
        grid = model.get("distance_px") if isinstance(model, dict) else None
        if (not isinstance(grid, list) or not grid or not all(isinstance(r, list) and r for r in grid)
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for r in grid for v in r)):
            raise UsageError(f"{path}: model {model.get('label') if isinstance(model, dict) else '?'!r} has no "
                             "[block][head] distance_px of finite numbers")
        grids.append([[float(v) for v in r] for r in grid])
    if [len(r) for r in grids[0]] != [len(r) for r in grids[1]]:
        raise UsageError(f"{path}: the two models have different blocks/heads; compare the same architecture")
    return Pair(seed=seed, dr=grids[0], real=grids[1], source=str(path))


def deep_blocks(num_blocks: int, deep_from: int | None = None) -> list[int]:
    start = num_blocks - math.ceil(num_blocks / 2) if deep_from is None else deep_from
    if not 0 <= start < num_blocks:
        raise UsageError(f"deep_from: must lie in 0..{num_blocks - 1}, got {start}")
    return list(range(start, num_blocks))


def _deep_mean(grid: list[list[float]], blocks: list[int]) -> float:
    return statistics.fmean(v for b in blocks for v in grid[b])


def _deep_spread(grid: list[list[float]], blocks: list[int]) -> float:
    return statistics.fmean(statistics.stdev(grid[b]) if len(grid[b]) > 1 else 0.0 for b in blocks)


def _ttest(a: list[float], b: list[float], alternative: str) -> dict[str, Any]:
    """Paired t-test of a against b (scipy); None statistics when it cannot be computed."""
    if len(a) < 2:
        return {"statistic": None, "p_value": None, "df": None, "n": len(a)}
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if all(d == diffs[0] for d in diffs):  # no spread of the differences: t is undefined (or infinite)
        return {"statistic": None, "p_value": None, "df": len(a) - 1, "n": len(a),
                "note": "the paired differences have no spread over seeds; t is undefined"}
    result = stats.ttest_rel(a, b, alternative=alternative)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue), "df": len(a) - 1, "n": len(a)}


def claim_test(pairs: Sequence[Pair], *, alpha: float = DEFAULT_ALPHA, deep_from: int | None = None) -> dict[str, Any]:
    """The locality and diversity tests and the verdict; every per-seed number is in the result."""
    if not pairs:
        raise UsageError("no attention_distance.json given; run qcap attention-distance per seed")
    shape = [len(r) for r in pairs[0].dr]
    for pair in pairs:
        if [len(r) for r in pair.dr] != shape:
            raise UsageError(f"{pair.source}: blocks/heads {[len(r) for r in pair.dr]} differ from the first seed's {shape}")
    blocks = deep_blocks(len(shape), deep_from)
    per_seed = [{"seed": p.seed, "source": p.source,
                 "mean_dr": _deep_mean(p.dr, blocks), "mean_real": _deep_mean(p.real, blocks),
                 "spread_dr": _deep_spread(p.dr, blocks), "spread_real": _deep_spread(p.real, blocks),
                 "mean_per_block_dr": [statistics.fmean(r) for r in p.dr],
                 "mean_per_block_real": [statistics.fmean(r) for r in p.real],
                 "spread_per_block_dr": [statistics.stdev(r) if len(r) > 1 else 0.0 for r in p.dr],
                 "spread_per_block_real": [statistics.stdev(r) if len(r) > 1 else 0.0 for r in p.real]}
                for p in pairs]
    m_dr, m_real = [s["mean_dr"] for s in per_seed], [s["mean_real"] for s in per_seed]
    s_dr, s_real = [s["spread_dr"] for s in per_seed], [s["spread_real"] for s in per_seed]
    locality = _ttest(m_real, m_dr, "greater") | {
        "hypothesis": "H1: real − DR mean distance of the deep blocks > 0 (DR more local)",
        "mean_difference_px": statistics.fmean(r - d for r, d in zip(m_real, m_dr, strict=True))}
    diversity = _ttest(s_dr, s_real, "less") | {
        "hypothesis": "H1: DR − real spread across heads of the deep blocks < 0 (DR lost diversity)",
        "mean_difference_px": statistics.fmean(d - r for d, r in zip(s_dr, s_real, strict=True))}
    untestable = (f"untestable ({len(pairs)} seed{'s' if len(pairs) != 1 else ''}; the test needs at least two "
                  "seeds with varying differences)")
    if locality["p_value"] is None:
        verdict = untestable
    elif locality["p_value"] >= alpha:
        verdict = f"not supported: DR's deep heads are not shown more local (p = {locality['p_value']:.3g} ≥ {alpha})"
    elif diversity["p_value"] is None:
        verdict = (f"locality supported (p = {locality['p_value']:.3g} < {alpha}); diversity {untestable}: "
                   f"DR − real spread {diversity['mean_difference_px']:+.3g} px in every seed")
    elif diversity["p_value"] < alpha:
        verdict = (f"half supported: DR's deep heads are more local (p = {locality['p_value']:.3g}) but lose "
                   f"diversity across heads (p = {diversity['p_value']:.3g})")
    else:
        verdict = (f"supported: DR's deep heads are more local (p = {locality['p_value']:.3g} < {alpha}) and show no "
                   f"significant loss of diversity (p = {diversity['p_value']:.3g}; absence of evidence of a loss)")
    return {"claim": "DR heads are more local in the deeper layers while keeping diversity", "test": TEST_NAME,
            "alpha": alpha, "deep_blocks": blocks, "num_blocks": len(shape), "heads": shape, "n_seeds": len(pairs),
            "locality": locality, "diversity": diversity, "verdict": verdict, "per_seed": per_seed}


@dataclass(kw_only=True)
class AttentionTestConfig:
    """Test 'DR heads are more local in the deeper layers while keeping diversity' over seeds."""

    files: list[Path] = arg(help="one attention_distance.json per seed (models[0] = DR, models[1] = real)",
                            positional=True)
    alpha: float = arg(DEFAULT_ALPHA, help="significance level of both one-sided tests")
    deep_from: int | None = arg(None, help="first deep block, 0-based (default: the last half of the blocks)")
    out: Path | None = arg(None, help="write the result as JSON here")

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha: must lie in (0, 1), got {self.alpha}")


def main(argv: list[str], prog: str = "qcap attention-test") -> int:
    cfg = parse_config(AttentionTestConfig, argv, prog=prog)
    result = claim_test([read_pair(path, seed) for seed, path in enumerate(cfg.files)], alpha=cfg.alpha,
                        deep_from=cfg.deep_from)
    if cfg.out is not None:
        from base.shards import atomic_write_json

        atomic_write_json(cfg.out, result)
    print(f"{result['claim']}: {result['verdict']}")
    return 0


if __name__ == "__main__":
    from base.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m finetune.attention_test"))
