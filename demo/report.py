"""``qcap report``: the caption-quality ablation's report — table, verdicts, figures, timings.

Usage::

    qcap report runs/demo                    # writes runs/demo/report.md, report.json, report/*.png
    qcap report runs/demo --world runs/demo/world --out runs/demo/report.md

It reads what ``make demo`` (or the same commands run by hand) leaves in one folder ``DEMO``,
and never computes a metric itself: every number in the table is read from the file that the
stage wrote, and ``report.json`` names that file and key for every number.

- ``clip/<rung>-s<seed>/eval.json`` — ``qcap train``: ``zeroshot/top1``, ``retrieval/*_R@1``;
  ``config.json`` beside it for the samples seen;
- ``finetune/<backbone>-s<seed>/{seg,depth}/metrics.json`` — ``qcap finetune``: ``metrics.mIoU``,
  ``metrics.rmse`` (``backbone`` = ``random`` or a rung); ``.../det/metrics.json`` (``qcap finetune
  det``: ``metrics.bbox_AP``, ``metrics.segm_AP``) adds the box and mask AP columns when any exists;
- ``scores/<rung>/summary.json`` — ``qcap score-captions``: ``by_field.text|syn_text.score``
  (fact F1 against the world's truth) and ``share_hallucinating``;
- ``attention/attention_distance.json`` and ``.png`` — ``qcap attention-distance --compare``;
- ``timings.tsv`` — one row per timed command (``tools/timed.sh``): run, stage, start, seconds,
  exit status, 1-minute load average before and after, command;
- the pipeline's own summaries for the data funnel (``raw/manifest.json``,
  ``filters/*.report/report.json``, ``curated/summary.json``, ``syn/summary.json``,
  ``dr/summary.json``, and each rung's run record: ``dr-ladder/<rung>/summary.json``; a folder
  written before the stages shared that name: its old summary, e.g. ``subset_summary.json``).

Every path is named once, in :mod:`demo.layout` (``make layout`` lists the Makefile's).

Rungs are ``datacomp-P`` (real captions) and ``dr-P`` (real + synthetic, DataCompDR) at P = 10
and 100 percent, the folder names ``make subsets`` writes. A missing file leaves its cell
empty and is listed under "Missing" (the report is still written).

Rows shown only when the folder holds their runs (``clip/<key>-s*`` or ``finetune/<key>-s*``):
``drr-P`` (DR + distillation: ``qcap reinforce`` over ``dr-P`` with a teacher CLIP, pretrained
with ``--distill-loss-weights``; compared with ``dr-P``), and the MCi image tower
(``mci-random``, ``mci-datacomp-100``, ``mci-dr-100``; ``make science SCI_MCI=1``) and the ViT beside a ladder
trained with another tower (``vit-random``, ``vit-datacomp-100``, ``vit-dr-100``; ``make science``, whose ladder is
``qcap-tiny-resnet10t``), which add the "backbone architecture" comparison: DR against real captions on each tower.
The ladder's own tower (the rows without a prefix) is named from its runs' ``config.json``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from base.cli import UsageError
from base.config import arg, parse_config
from base.shards import atomic_write_bytes, atomic_write_json, iter_samples
from demo import layout

REPORT_FILE = "report.md"
JSON_FILE = "report.json"
FIGURES = "report"  # folder beside report.md
TIMINGS_FILE = layout.TIMINGS
TIMING_COLUMNS = ("run", "stage", "started", "seconds", "exit", "load_start", "load_end", "command")


@dataclass(kw_only=True)
class ReportConfig:
    """Write the ablation's report (table, verdicts, figures, per-stage timings) from a demo folder."""

    demo: Path = arg(help="the demo folder (clip/, finetune/, scores/, attention/, timings.tsv, ...)", positional=True)
    world: Path | None = arg(None, help="the world folder, for the caption grid's true descriptions (default: DEMO/world)")
    out: Path | None = arg(None, help="the report's Markdown file (default: DEMO/report.md); report.json and report/ go beside it")
    grid_samples: int = arg(6, help="images in the real-vs-synthetic caption grid")

    def __post_init__(self) -> None:
        if self.grid_samples < 0:
            raise ValueError(f"grid_samples: must be >= 0, got {self.grid_samples}")


@dataclass(frozen=True)
class Row:
    key: str  # folder name: "random" or a rung of the ladder
    label: str
    captions: str | None  # "real", "dr", "drr" (DR + distillation) or None (no pretraining)
    percent: int | None
    # the image tower: "main" (the ladder's: CLIP_MODEL, qcap-tiny-clip unless make science), "mci" (qcap-tiny-mci,
    # MobileCLIP's FastViT) or "vit" (qcap-tiny-clip beside a ladder of another tower; MAE is a ViT too)
    arch: str = "main"
    data: str | None = None  # the ladder rung whose captions it trained on, when not ``key`` (caption scores)

    @property
    def rung(self) -> str:
        return self.data or self.key


# the demo's rows, always shown (a missing file is an empty cell, listed under Missing)
ROWS = (
    Row("random", "random init", None, None),
    Row("datacomp-10", "real 10%", "real", 10),
    Row("datacomp-100", "real 100%", "real", 100),
    Row("dr-10", "DR 10%", "dr", 10),
    Row("dr-100", "DR 100%", "dr", 100),
)
# rows shown only when the folder holds their runs: the reinforced rungs, the MCi tower (make science)
OPTIONAL_ROWS = (
    Row("drr-10", "DR + distillation 10%", "drr", 10, data="dr-10"),
    Row("drr-100", "DR + distillation 100%", "drr", 100, data="dr-100"),
    Row("mci-random", "MCi random init", None, None, arch="mci"),
    Row("mci-datacomp-100", "MCi real 100%", "real", 100, arch="mci", data="datacomp-100"),
    Row("mci-dr-100", "MCi DR 100%", "dr", 100, arch="mci", data="dr-100"),
    Row("vit-random", "ViT random init", None, None, arch="vit"),
    Row("vit-datacomp-100", "ViT real 100%", "real", 100, arch="vit", data="datacomp-100"),
    Row("vit-dr-100", "ViT DR 100%", "dr", 100, arch="vit", data="dr-100"),
)
ROW_BY_KEY = {row.key: row for row in (*ROWS, *OPTIONAL_ROWS)}
# per architecture: (name, (random init, real 100%, DR 100%)) — the rows the architecture comparison reads; the
# ladder's own tower ("main") is named by tower_label from its runs
ARCHITECTURES = {"main": ("the ladder's tower", ("random", "datacomp-100", "dr-100")),
                 "mci": ("MCi (qcap-tiny-mci)", ("mci-random", "mci-datacomp-100", "mci-dr-100")),
                 "vit": ("ViT (qcap-tiny-clip)", ("vit-random", "vit-datacomp-100", "vit-dr-100"))}
RANDOM_ROWS = tuple(keys[0] for _, keys in ARCHITECTURES.values())


def has_runs(root: Path, key: str) -> bool:
    """Whether ``root`` holds a training or finetuning run of row ``key`` (``clip/`` or ``finetune/<key>-s<seed>``)."""
    for parent in (root / name for name in layout.run_parents()):
        if parent.is_dir() and any(p.is_dir() and (layout.run_folder(p.name) or ("",))[0] == key for p in parent.iterdir()):
            return True
    return False


def rows_for(root: Path, optional: Sequence[Row] = OPTIONAL_ROWS, rows: Sequence[Row] = ROWS) -> tuple[Row, ...]:
    """The report's rows: ``rows``, then each of ``optional`` whose runs the folder holds."""
    return (*rows, *(row for row in optional if has_runs(root, row.key)))


def baseline_of(row: Row, present: Iterable[str] = ()) -> str:
    """The random-init row a pretrained row is checked against: the same image tower (a ViT row, MAE included,
    against ``vit-random`` when ``present`` holds it, else against ``random``: the ladder's tower is the ViT then)."""
    if row.arch == "main":
        return "random"
    own = ARCHITECTURES[row.arch][1][0]
    return own if row.arch == "mci" or own in present else "random"


def tower_label(reader: Reader, seeds: Sequence[int]) -> str:
    """The ladder's tower by the model its DR 100% run trained (``config.model`` of its config.json)."""
    for seed in seeds[:1]:
        data = reader.load(layout.path(layout.CLIP_CONFIG, row="dr-100", seed=seed))
        model = (data or {}).get("config", {}).get("model") if isinstance(data, dict) else None
        if isinstance(model, str) and model:
            return f"ladder tower ({model})"
    return ARCHITECTURES["main"][0]


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    higher_is_better: bool
    locate: Callable[[Row, int], tuple[str, str] | None]  # (file relative to DEMO, dotted key) for a seed
    per_seed: bool = True  # False: one file for every seed (caption scores of the rung)


def _finetune(task: str, metric: str) -> Callable[[Row, int], tuple[str, str]]:
    return lambda row, seed: (layout.path(layout.FINETUNE_METRICS, row=row.key, seed=seed, task=task), f"metrics.{metric}")


def _clip_eval(metric: str) -> Callable[[Row, int], tuple[str, str] | None]:
    return lambda row, seed: None if row.captions is None else (layout.path(layout.CLIP_EVAL, row=row.key, seed=seed), metric)


def _caption_score(field_name: str, metric: str) -> Callable[[Row, int], tuple[str, str] | None]:
    def locate(row: Row, seed: int) -> tuple[str, str] | None:
        if row.captions is None or (field_name == "syn_text" and row.captions not in ("dr", "drr")):
            return None
        return layout.path(layout.SCORE_SUMMARY, rung=row.rung), f"by_field.{field_name}.{metric}"

    return locate


COLUMNS = (
    Column("miou", "seg mIoU ↑", True, _finetune("seg", "mIoU")),
    Column("rmse", "depth RMSE (m) ↓", False, _finetune("depth", "rmse")),
    Column("zeroshot", "zero-shot top-1 ↑", True, _clip_eval("zeroshot/top1")),
    Column("i2t", "retrieval R@1 image→text ↑", True, _clip_eval("retrieval/image_to_text_R@1")),
    Column("t2i", "retrieval R@1 text→image ↑", True, _clip_eval("retrieval/text_to_image_R@1")),
    Column("f1_real", "caption F1, real", True, _caption_score("text", "score"), per_seed=False),
    Column("f1_syn", "caption F1, synthetic", True, _caption_score("syn_text", "score"), per_seed=False),
    Column("halluc_syn", "synthetic captions naming an absent object", False,
           _caption_score("syn_text", "share_hallucinating"), per_seed=False),
)
# detection (box and mask AP, COCOeval): shown only when some finetune/*/det/metrics.json exists
DET_COLUMNS = (
    Column("box_ap", "det box AP ↑", True, _finetune("det", "bbox_AP")),
    Column("mask_ap", "det mask AP ↑", True, _finetune("det", "segm_AP")),
)
COLUMN_BY_KEY = {column.key: column for column in (*COLUMNS, *DET_COLUMNS)}


def columns_for(root: Path) -> tuple[Column, ...]:
    """The report's columns: the detection ones only when the demo finetuned on detection."""
    return (*COLUMNS, *DET_COLUMNS) if has_det(root) else COLUMNS


def has_det(root: Path) -> bool:
    """Whether the demo finetuned some backbone on detection (a det metrics.json exists)."""
    return any(root.glob(layout.path(layout.FINETUNE_METRICS, row="*", seed="*", task="det")))


def table_column_keys(table: dict[str, dict[str, Any]]) -> set[str]:
    return set().union(*(cells.keys() for cells in table.values())) if table else set()


def table_columns(table: dict[str, dict[str, Any]]) -> list[Column]:
    """The columns a collected table holds, in report order."""
    present = table_column_keys(table)
    return [c for c in (*COLUMNS, *DET_COLUMNS) if c.key in present]


# ---------------------------------------------------------------------------- reading


class Reader:
    """Reads JSON files under the demo folder and remembers every value it hands out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.missing: set[str] = set()
        self._cache: dict[str, Any] = {}

    def load(self, rel: str) -> Any | None:
        if rel not in self._cache:
            path = self.root / rel
            if not path.is_file():
                self.missing.add(rel)
                self._cache[rel] = None
            else:
                try:
                    self._cache[rel] = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}: not valid JSON ({err}); re-run the stage that writes it") from err
        return self._cache[rel]

    def value(self, rel: str, key: str) -> float | None:
        """The number at dotted ``key`` of JSON file ``rel`` (None when absent or not a number)."""
        data = self.load(rel)
        if data is None:
            return None
        node: Any = data
        for part in _split_key(key):
            if not isinstance(node, dict) or part not in node:
                self.missing.add(f"{rel}: {key}")
                return None
            node = node[part]
        if isinstance(node, bool) or not isinstance(node, (int, float)) or (isinstance(node, float) and math.isnan(node)):
            self.missing.add(f"{rel}: {key}")
            return None
        return float(node)


def _split_key(key: str) -> list[str]:
    """Dotted key into parts; the metric names of train's eval.json contain '/', never '.'."""
    return key.split(".")


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def sd(self) -> float | None:
        """Sample standard deviation over seeds (None for fewer than two)."""
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    def as_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n, "values": self.values, "sources": self.sources}


def discover_seeds(demo: Path) -> list[int]:
    """Seeds present among the demo's training and finetuning runs (folders named ``*-s<seed>``)."""
    seeds = set()
    for parent in (demo / name for name in layout.run_parents()):
        if parent.is_dir():
            for child in parent.iterdir():
                found = layout.run_folder(child.name)
                if found and child.is_dir():
                    seeds.add(found[1])
    return sorted(seeds)


def collect_table(reader: Reader, seeds: Sequence[int], rows: Sequence[Row] = ROWS,
                  columns: Sequence[Column] | None = None) -> dict[str, dict[str, Cell]]:
    """Every (row, column) cell: its values over the seeds and the file + key of each
    (``columns`` default: the report's, det included when its metrics exist)."""
    columns = columns if columns is not None else columns_for(reader.root)
    table: dict[str, dict[str, Cell]] = {row.key: {column.key: Cell() for column in columns} for row in rows}
    for row, column, seed, rel, key in cell_sources(rows, seeds, columns):
        value = reader.value(rel, key)
        if value is not None:
            cell = table[row.key][column.key]
            cell.values.append(value)
            cell.sources.append({"file": rel, "key": key, "value": value} | ({"seed": seed} if column.per_seed else {}))
    return table


def cell_sources(rows: Sequence[Row], seeds: Sequence[int],
                 columns: Sequence[Column]) -> Iterable[tuple[Row, Column, int, str, str]]:
    """(row, column, seed, file, key) of every value a table of ``rows`` × ``columns`` reads, in table order."""
    for row in rows:
        for column in columns:
            for seed in seeds if column.per_seed else seeds[:1]:
                where = column.locate(row, seed)
                if where is not None:
                    yield (row, column, seed, *where)


# ---------------------------------------------------------------------------- verdicts


@dataclass
class Comparison:
    """``a`` against ``b`` on one column: ``better`` > 0 means ``a`` is better."""

    column: str
    a: str
    b: str
    a_mean: float | None
    b_mean: float | None
    better: float | None  # a − b, signed so that positive favours a
    spread: float | None  # 2 × standard error of the difference (None with one seed)
    n: int
    paired: bool = False  # spread from the per-seed differences (both rows ran the same seeds)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _by_seed(cell: Cell) -> dict[int, float] | None:
    """The cell's values keyed by seed, or None when a value has no seed or a seed repeats."""
    seeds = [src.get("seed") for src in cell.sources]
    if len(seeds) != len(cell.values) or None in seeds or len(set(seeds)) != len(seeds):
        return None
    return dict(zip(seeds, cell.values, strict=True))


def compare(table: dict[str, dict[str, Cell]], column: str, a: str, b: str) -> Comparison:
    """``a`` against ``b`` on ``column``: the difference of the means over seeds and 2 standard errors of it.

    Seed ``s`` of every row shares the pretraining seed (initialisation and data order) and the
    finetune seed (head initialisation and batch order), so when both rows ran the same seeds the
    comparison is paired, a randomised block design with the seed as the block: the standard error
    is that of the mean per-seed difference, sd(a_s − b_s)/√n. That takes out what the seed moves
    in both rows alike (a finetune seed alone moves seg mIoU by 0.01–0.03 here). Otherwise (seeds
    differ, a row lacks one) it is the unpaired √(sd_a²/n_a + sd_b²/n_b)."""
    ca, cb = table[a][column], table[b][column]
    sign = 1.0 if COLUMN_BY_KEY[column].higher_is_better else -1.0
    better = None if ca.mean is None or cb.mean is None else sign * (ca.mean - cb.mean)
    spread, paired = None, False
    sa, sb = _by_seed(ca), _by_seed(cb)
    if sa is not None and sb is not None and len(sa) >= 2 and sa.keys() == sb.keys():
        spread, paired = 2.0 * statistics.stdev([sa[s] - sb[s] for s in sa]) / math.sqrt(len(sa)), True
    elif ca.sd is not None and cb.sd is not None:
        spread = 2.0 * math.sqrt(ca.sd**2 / ca.n + cb.sd**2 / cb.n)
    return Comparison(column, a, b, ca.mean, cb.mean, better, spread, min(ca.n, cb.n), paired)


# One seed has no spread: its difference is a direction, never a verdict.
ONE_SEED_AS_CLAIMED = "direction only (one seed): as claimed"
ONE_SEED_OPPOSITE = "direction only (one seed): the opposite"


def holds(verdict: str) -> bool:
    """Whether a verdict says the claim held (beyond the spread, or as a one-seed direction)."""
    return verdict.startswith(("reproduced", ONE_SEED_AS_CLAIMED))


def beats(c: Comparison) -> str:
    """'reproduced' when ``a`` is better by more than the seed spread; 'not reproduced' when it
    is worse by more than that; 'within seed spread' between; with one seed, a direction only."""
    if c.better is None:
        return "not measured"
    if c.spread is None:
        return ONE_SEED_AS_CLAIMED if c.better > 0 else ONE_SEED_OPPOSITE
    if c.better > c.spread:
        return "reproduced"
    if c.better < -c.spread:
        return "not reproduced (the opposite, beyond the seed spread)"
    return "inconclusive (within the seed spread)"


def matches(c: Comparison) -> str:
    """'reproduced' when ``a`` is at least as good as ``b`` or worse by less than the seed spread."""
    if c.better is None:
        return "not measured"
    if c.spread is None:
        return ONE_SEED_AS_CLAIMED if c.better >= 0 else ONE_SEED_OPPOSITE
    if c.better >= 0:
        return "reproduced"
    if -c.better <= c.spread:
        return "reproduced (worse, but within the seed spread)"
    return "not reproduced"


def verdicts(table: dict[str, dict[str, Cell]]) -> list[dict[str, Any]]:
    out = []
    tasks = (("miou", "segmentation (mIoU)"), ("rmse", "depth (RMSE)"))
    for column, task in tasks:
        for percent in (100, 10):
            c = compare(table, column, f"dr-{percent}", f"datacomp-{percent}")
            out.append({"claim": f"DR beats real captions on {task} at {percent}% of the data",
                        "verdict": beats(c), "comparison": c.as_json()})
    for column, task in tasks:
        c = compare(table, column, "dr-10", "datacomp-100")
        verdict = matches(c)
        # matching a backbone that is no better than random init shows nothing about data efficiency
        baseline = beats(compare(table, column, "datacomp-100", "random"))
        if holds(verdict) and not holds(baseline):
            verdict = f"vacuous (real 100% does not clearly beat random init on {task}: {baseline})"
        out.append({"claim": f"DR at 10% matches real captions at 100% on {task}", "verdict": verdict,
                    "comparison": c.as_json()})
    return out


def sanity(table: dict[str, dict[str, Cell]], rows: Sequence[Row] = ROWS) -> list[dict[str, Any]]:
    """Did pretraining teach the backbones anything? Each pretrained row against random init of its tower."""
    out = []
    for row in rows:
        baseline = baseline_of(row, table)
        if row.captions is None or baseline not in table:
            continue
        for column in ("miou", "rmse"):
            c = compare(table, column, row.key, baseline)
            out.append({"row": row.label, "column": column, "verdict": beats(c), "comparison": c.as_json()})
    return out


def dense_columns(table: dict[str, dict[str, Cell]]) -> list[tuple[str, str]]:
    """(column, task) of the finetuned dense tasks the table holds: seg, depth, and detection when measured."""
    tasks = [("miou", "segmentation (mIoU)"), ("rmse", "depth (RMSE)"), ("box_ap", "detection (box AP)"),
             ("mask_ap", "detection (mask AP)")]
    present = {c.key for c in table_columns(table)}
    return [(column, task) for column, task in tasks if column in present]


def reinforced(table: dict[str, dict[str, Cell]], rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Does distillation add to the synthetic captions? Each drr-P row against dr-P (same images and captions)."""
    out = []
    for row in rows:
        if row.captions != "drr" or row.rung not in table:
            continue
        for column, task in dense_columns(table):
            c = compare(table, column, row.key, row.rung)
            out.append({"claim": f"DR + distillation beats DR (captions only) on {task} at {row.percent}%",
                        "verdict": beats(c), "comparison": c.as_json()})
    return out


def beyond_noise(c: Comparison) -> str:
    """Does ``a`` beat ``b`` beyond 2 SE over seeds? 'inside the noise' when the difference is within it."""
    if c.better is None:
        return "not measured"
    if c.spread is None:
        return f"direction only (one seed): {'better' if c.better > 0 else 'not better'}"
    if c.better > c.spread:
        return "yes, beyond 2 SE"
    if c.better < -c.spread:
        return "no: the opposite, beyond 2 SE"
    return "no: inside the noise"


def architecture(table: dict[str, dict[str, Cell]], main: str = ARCHITECTURES["main"][0]) -> list[dict[str, Any]]:
    """The ladder's tower (named ``main``) against the other towers (MCi, the ViT) on the same DR and real rungs:
    per architecture and dense task, random init, real 100% and DR 100% (mean, sd, n over seeds) and whether DR
    beats real beyond 2 SE. Empty when the table holds no other tower's rows."""
    if not any(key in table for arch, (_, keys) in ARCHITECTURES.items() if arch != "main" for key in keys):
        return []
    out = []
    for arch, (name, keys) in ARCHITECTURES.items():
        name = main if arch == "main" else name
        if not any(key in table for key in keys):
            continue
        random_key, real_key, dr_key = keys
        # a row the folder lacks (e.g. no random-init MCi) is an empty cell, not a missing comparison
        view = {key: table.get(key) or {column: Cell() for column in table_column_keys(table)} for key in keys}
        for column, task in dense_columns(table):
            c = compare(view, column, dr_key, real_key)
            out.append({"claim": f"{name}: DR beats real captions on {task} at 100%",
                        "arch": arch, "architecture": name, "column": column, "task": task,
                        "cells": {role: view[key][column].as_json()
                                  for role, key in (("random", random_key), ("real", real_key), ("dr", dr_key))},
                        "rows": {"random": random_key, "real": real_key, "dr": dr_key},
                        "dr_beats_real": beyond_noise(c), "verdict": beats(c), "comparison": c.as_json()})
    return out


def architecture_markdown(entries: Sequence[dict[str, Any]], digits: int = 3) -> list[str]:
    """The "backbone architecture" section's lines (table + one verdict per architecture and task)."""
    if not entries:
        return []

    def cell(data: dict[str, Any]) -> str:
        if data["mean"] is None:
            return "—"
        return fmt(data["mean"], digits) + ("" if data["sd"] is None else f" ± {fmt(data['sd'], digits)}") + f" (n={data['n']})"

    lines = [markdown_table(["architecture", "task", "random init", "real 100%", "DR 100%", "DR − real", "2 SE",
                             "DR > real beyond 2 SE?"],
                            [[e["architecture"], e["task"], cell(e["cells"]["random"]), cell(e["cells"]["real"]),
                              cell(e["cells"]["dr"]), fmt(e["comparison"]["better"], digits),
                              fmt(e["comparison"]["spread"], digits), e["dr_beats_real"]] for e in entries]), "",
             "Same rungs and recipe for every tower (samples seen: each run's `config.json`; make science trains the ViT "
             "beside its CNN ladder at the MAE baseline's samples seen); DR − real is signed so that positive favours DR "
             "(lower is better for RMSE). Attention distance is the ViT's only: `qcap attention-distance` refuses "
             "convolutional and MCi towers by design.", ""]
    return lines


# ---------------------------------------------------------------------------- timings


def read_timings(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        for number, record in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not record:
                continue
            if len(record) != len(TIMING_COLUMNS):
                raise UsageError(f"{path}:{number}: expected {len(TIMING_COLUMNS)} tab-separated fields "
                                 f"({', '.join(TIMING_COLUMNS)}), got {len(record)}")
            row = dict(zip(TIMING_COLUMNS, record, strict=True))
            try:
                row["seconds"] = float(row["seconds"])
                row["exit"] = int(row["exit"])
                row["load_start"] = float(row["load_start"])
                row["load_end"] = float(row["load_end"])
            except ValueError as err:
                raise UsageError(f"{path}:{number}: {err}") from err
            rows.append(row)
    return rows


def stage_timings(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, in order of first appearance: the successful commands' seconds summed, how many
    commands, how many make runs they came from, and the load averages seen."""
    stages: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["exit"] != 0:
            continue
        stage = stages.setdefault(row["stage"], {"stage": row["stage"], "seconds": 0.0, "commands": 0, "runs": set(),
                                                 "loads": []})
        stage["seconds"] += row["seconds"]
        stage["commands"] += 1
        stage["runs"].add(row["run"])
        stage["loads"] += [row["load_start"], row["load_end"]]
    out = []
    for stage in stages.values():
        loads = stage.pop("loads")
        out.append(stage | {"seconds": round(stage["seconds"], 1), "runs": len(stage["runs"]),
                            "load_min": min(loads), "load_max": max(loads)})
    return out


def run_spans(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per make run (``run`` id): wall clock from its first command's start to its last command's
    end — less than the sum of its commands when they ran side by side (``make -j``)."""
    from datetime import datetime

    spans: dict[str, dict[str, Any]] = {}
    for row in rows:
        try:
            start = datetime.strptime(row["started"], "%Y-%m-%dT%H:%M:%SZ").timestamp()
        except ValueError as err:
            raise UsageError(f"timings: started {row['started']!r} is not YYYY-MM-DDTHH:MM:SSZ") from err
        span = spans.setdefault(row["run"], {"run": row["run"], "start": start, "end": start, "commands": 0,
                                             "failed": 0, "busy_seconds": 0.0})
        span["start"] = min(span["start"], start)
        span["end"] = max(span["end"], start + row["seconds"])
        span["commands"] += 1
        span["failed"] += row["exit"] != 0
        span["busy_seconds"] += row["seconds"]
    return [span | {"wall_seconds": round(span["end"] - span["start"], 1), "busy_seconds": round(span["busy_seconds"], 1)}
            for span in spans.values()]


# ---------------------------------------------------------------------------- formatting


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_cell(cell: Cell, digits: int = 3) -> str:
    if cell.mean is None:
        return "—"
    text = fmt(cell.mean, digits)
    if cell.sd is not None:
        text += f" ± {fmt(cell.sd, digits)}"
    return text


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def describe_comparison(c: dict[str, Any]) -> str:
    a, b = ROW_BY_KEY[c["a"]].label, ROW_BY_KEY[c["b"]].label
    if c["better"] is None:
        return f"{a} vs {b}: not measured"
    spread = ("no seed spread (one seed)" if c["spread"] is None
              else f"seed spread ±{c['spread']:.3f} (2 SE{', paired by seed' if c.get('paired') else ''}, n={c['n']})")
    direction = f"better by {c['better']:.3f}" if c["better"] >= 0 else f"worse by {-c['better']:.3f}"
    return f"{a} {c['a_mean']:.3f} vs {b} {c['b_mean']:.3f}: {a} {direction}; {spread}"


# ---------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a synthetic caption's emoji is drawn as a box, as it should be
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_data_efficiency(table: dict[str, dict[str, Cell]], path: Path) -> bool:
    """mIoU and RMSE against the share of the data, real vs DR captions, random init dashed."""
    if all(table[row.key]["miou"].mean is None and table[row.key]["rmse"].mean is None for row in ROWS):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for ax, column in zip(axes, ("miou", "rmse"), strict=True):
        for captions, colour, label in (("real", "tab:blue", "real captions (DataComp)"),
                                         ("dr", "tab:orange", "real + synthetic (DR)"),
                                         ("drr", "tab:green", "DR + distillation")):
            rows = [ROW_BY_KEY[key] for key in table if ROW_BY_KEY[key].captions == captions and ROW_BY_KEY[key].arch == "main"]
            points = [(row.percent, table[row.key][column]) for row in rows if table[row.key][column].mean is not None]
            if points:
                ax.errorbar([p for p, _ in points], [c.mean for _, c in points],
                            yerr=[c.sd or 0.0 for _, c in points], marker="o", capsize=3, color=colour, label=label)
        random_cell = table["random"][column]
        if random_cell.mean is not None:
            ax.axhline(random_cell.mean, color="grey", ls="--", lw=1, label="random init")
        ax.set_xscale("log")
        ax.set_xticks([10, 100])
        ax.set_xticklabels(["10%", "100%"])
        ax.set_xlabel("share of the curated data (same samples seen)")
        ax.set_title(COLUMN_BY_KEY[column].title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("data efficiency: dense-task transfer of the CLIP backbones (mean ± sd over seeds)", fontsize=9)
    _save(fig, path)
    return True


def _wrap(text: str, width: int = 58, lines: int = 3) -> str:
    import textwrap

    wrapped = textwrap.wrap(text or "(empty)", width) or ["(empty)"]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def caption_grid_samples(shards: Path, scores: Path | None, num: int) -> list[dict[str, Any]]:
    """The first ``num`` samples (in shard order) of a DR folder with their real and synthetic
    captions and, when ``scores`` (a score-captions per_caption.parquet) exists, each caption's F1."""
    by_caption: dict[tuple[str, str, int], float] = {}
    if scores is not None and scores.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(scores, columns=["uid", "field", "caption_index", "score"]).to_pylist()
        by_caption = {(r["uid"], r["field"], r["caption_index"]): r["score"] for r in table}
    out = []
    for sample in iter_samples(str(shards)):
        if len(out) >= num:
            break
        if sample.image is None:
            continue
        out.append({
            "uid": sample.uid, "image": sample.image, "real": sample.text or "",
            "real_score": by_caption.get((sample.uid, "text", 0)),
            "synthetic": list(sample.syn_text or [])[:2],
            "synthetic_scores": [by_caption.get((sample.uid, "syn_text", i)) for i in range(2)],
        })
    return out


def plot_caption_grid(samples: list[dict[str, Any]], truth: dict[str, str], path: Path) -> bool:
    if not samples:
        return False
    import io

    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(len(samples), 2, figsize=(10.5, 1.9 * len(samples)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4.2]})
    for r, sample in enumerate(samples):
        image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
        axes[r][0].imshow(image)
        axes[r][0].axis("off")
        lines = []
        if sample["uid"] in truth:
            lines.append(("truth", _wrap(truth[sample["uid"]], 90, 2), "dimgrey"))
        score = sample["real_score"]
        lines.append((f"real{'' if score is None else f' F1 {score:.2f}'}", _wrap(sample["real"], 90, 2), "tab:blue"))
        for caption, syn_score in zip(sample["synthetic"], sample["synthetic_scores"], strict=True):
            tag = f"synthetic{'' if syn_score is None else f' F1 {syn_score:.2f}'}"
            lines.append((tag, _wrap(caption, 90, 2), "tab:orange"))
        ax = axes[r][1]
        ax.axis("off")
        y = 1.0
        for tag, text, colour in lines:
            ax.text(0.0, y, f"{tag}: {text}", color=colour, fontsize=7.5, va="top", ha="left", transform=ax.transAxes)
            y -= 0.13 * (text.count("\n") + 1) + 0.06
    fig.suptitle("real (web) vs synthetic captions of the DR set; F1 = fact F1 against the world's truth", fontsize=9)
    _save(fig, path)
    return True


def load_truth_descriptions(world: Path, uids: set[str]) -> dict[str, str]:
    path = world / layout.TRUTH
    if not path.is_file() or not uids:
        return {}
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["uid", "description"])
    table = table.filter(pc.is_in(table.column("uid"), value_set=pa.array(sorted(uids))))
    return dict(zip(table.column("uid").to_pylist(), table.column("description").to_pylist(), strict=True))


# ---------------------------------------------------------------------------- data funnel


FUNNEL = (
    ("pool rows", layout.RAW_MANIFEST, "num_samples"),
    ("downloaded", layout.RAW_MANIFEST, "num_success"),
    ("basic filter", layout.path(layout.FILTER_REPORT, filter="basic"), "counts.kept"),
    ("CLIP-score filter (of basic)", layout.path(layout.FILTER_REPORT, filter="clip"), "counts.kept"),
    ("dedup (of basic)", layout.path(layout.FILTER_REPORT, filter="dedup"), "counts.kept"),
    ("resharded (CLIP-score ∩ dedup)", layout.CURATED_SUMMARY, "num_written"),
    ("captioned images", layout.CAPTION_SUMMARY, "images_captioned"),
    ("DR images", layout.DR_SUMMARY, "images_kept"),
    ("DR synthetic captions kept", layout.DR_SUMMARY, "synthetic_kept"),
)


def funnel(reader: Reader, rows: Sequence[Row] = ROWS) -> list[dict[str, Any]]:
    out = []
    for label, rel, key in FUNNEL:
        rel = layout.on_disk(reader.root, rel)  # a folder from before the shared names: its old summary
        if (reader.root / rel).is_file():
            out.append({"label": label, "file": rel, "key": key, "value": reader.value(rel, key)})
    for row in funnel_rungs(rows):
        rel, key = rung_record(row)
        rel = layout.on_disk(reader.root, rel)
        if (reader.root / rel).is_file():
            out.append({"label": f"rung {row.label} ({row.key})", "file": rel, "key": key, "value": reader.value(rel, key)})
    return out


def rung_record(row: Row) -> tuple[str, str]:
    """(run record of the rung ``row`` trained on, its key of the images written): the file the rung's command
    writes last (qcap subset, reinforce or control-rung), so only a finished rung is counted."""
    pattern, key = layout.RUNG_RECORDS[row.captions or "real"]
    return layout.path(pattern, rung=row.key), key


def training_facts(reader: Reader, seeds: Sequence[int], rows: Sequence[Row] = ROWS) -> list[dict[str, Any]]:
    out = []
    for row, rel in training_configs(rows, seeds):
        if (reader.root / rel).is_file():
            data = reader.load(rel)
            config = data.get("config", {})
            out.append({"row": row.label, "file": rel, "samples_seen": data.get("samples_seen"),
                        "steps": data.get("total_steps"), "num_samples": data.get("num_samples"),
                        "caption_source": config.get("caption_source"), "model": config.get("model"),
                        "distill_loss_weights": config.get("distill_loss_weights")})
    return out


def training_configs(rows: Sequence[Row], seeds: Sequence[int]) -> list[tuple[Row, str]]:
    """(row, config.json of its first seed's pretraining run) for every pretrained row."""
    return [(row, layout.path(layout.CLIP_CONFIG, row=row.key, seed=seed))
            for row in rows if row.captions is not None for seed in seeds[:1]]


def funnel_rungs(rows: Sequence[Row]) -> list[Row]:
    """The rows whose rung the funnel counts: the ladder's pretrained rows (the other towers train on their rungs)."""
    return [row for row in rows if row.captions is not None and row.arch == "main"]


def files_read(rows: Sequence[Row], seeds: Sequence[int], *, det: bool = False) -> list[str]:
    """Every file (relative to DEMO) the report reads for ``rows`` and ``seeds`` (``det``: with the detection
    columns): the table's cells, the training facts, the funnel, the attention figure, the caption grid's rung and
    scores, the world's truth, the timings. ``make layout`` must list each of them for the rows it makes."""
    out = [rel for *_, rel, _ in cell_sources(rows, seeds, (*COLUMNS, *DET_COLUMNS) if det else COLUMNS)]
    out += [rel for _, rel in training_configs(rows, seeds)]
    out += [rel for _, rel, _ in FUNNEL] + [rung_record(row)[0] for row in funnel_rungs(rows)]
    grid = Row(layout.GRID_RUNG, "", "dr", 100)
    out += [layout.ATTENTION, layout.ATTENTION_PNG, rung_record(grid)[0],
            layout.path(layout.PER_CAPTION, rung=layout.GRID_RUNG), layout.WORLD_TRUTH, layout.TIMINGS]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------- the report


def build(cfg: ReportConfig) -> dict[str, Any]:
    demo = cfg.demo
    if not demo.is_dir():
        raise UsageError(f"{demo}: not a folder; run `make demo` (or pass the folder it wrote)")
    out = cfg.out or demo / REPORT_FILE
    figures = out.parent / FIGURES
    world = cfg.world or demo / layout.WORLD
    reader = Reader(demo)
    seeds = discover_seeds(demo)
    if not seeds:
        clip, finetune = (f"{parent}/*-s<seed>" for parent in layout.run_parents())
        raise UsageError(f"{demo}: no {clip} or {finetune} runs; nothing to report")
    rows = rows_for(demo)
    table = collect_table(reader, seeds, rows=rows)
    claims = verdicts(table)
    checks = sanity(table, rows)
    timings = read_timings(demo / TIMINGS_FILE)
    stages = stage_timings(timings)

    figures.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if plot_data_efficiency(table, figures / "data_efficiency.png"):
        written["data_efficiency"] = str(figures / "data_efficiency.png")
    attention_png = demo / layout.ATTENTION_PNG
    attention = reader.load(layout.ATTENTION) if (demo / layout.ATTENTION_DIR).is_dir() else None
    grid_rung = demo / layout.path(layout.RUNG, rung=layout.GRID_RUNG)
    if cfg.grid_samples and grid_rung.is_dir():
        samples = caption_grid_samples(grid_rung, demo / layout.path(layout.PER_CAPTION, rung=layout.GRID_RUNG),
                                       cfg.grid_samples)
        truth = load_truth_descriptions(world, {s["uid"] for s in samples})
        if plot_caption_grid(samples, truth, figures / "caption_samples.png"):
            written["caption_samples"] = str(figures / "caption_samples.png")

    payload = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "demo": str(demo),
        "seeds": seeds,
        "rows": [row.__dict__ for row in rows],
        "columns": [{"key": c.key, "title": c.title, "higher_is_better": c.higher_is_better} for c in table_columns(table)],
        "table": {row: {col: cell.as_json() for col, cell in cells.items()} for row, cells in table.items()},
        "claims": claims,
        "pretraining_vs_random": checks,
        "reinforced": reinforced(table, rows),
        "architecture": architecture(table, tower_label(reader, seeds)),
        "funnel": funnel(reader, rows),
        "training": training_facts(reader, seeds, rows),
        "attention": _attention_summary(attention),
        "timings": {"stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages), 1),
                    "commands": sum(s["commands"] for s in stages), "runs": run_spans(timings), "rows": timings},
        "figures": written | ({"attention_distance": str(attention_png)} if attention_png.is_file() else {}),
        "missing": sorted(reader.missing),
    }
    text = render(payload, table, out, rows)
    atomic_write_bytes(out, text.encode("utf-8"))
    atomic_write_json(out.with_name(JSON_FILE), payload)
    return payload


def _relative_to(folder: Path) -> Callable[[str], str]:
    """Paths as the Markdown file beside ``folder`` links them (relative when inside it)."""
    base = folder.resolve()

    def rel(path: str) -> str:
        resolved = Path(path).resolve()
        return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(resolved)

    return rel


def _attention_summary(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        return []
    return [{"label": m.get("label"), "mean_per_layer": m.get("mean_per_layer"),
             "uniform_attention_px": m.get("uniform_attention_px"), "num_images": m.get("num_images")}
            for m in data.get("models", [])]


def render(payload: dict[str, Any], table: dict[str, dict[str, Cell]], out: Path, rows: Sequence[Row] = ROWS) -> str:
    seeds = payload["seeds"]
    lines = [
        "# qcap demo: caption quality and CLIP pretraining, in miniature",
        "",
        f"Generated {payload['generated']} by `qcap report {payload['demo']}` from the files each stage wrote "
        f"(`report.json` names the file and key of every number). Seeds: {', '.join(map(str, seeds))} "
        f"({len(seeds)} seed{'s' if len(seeds) != 1 else ''}; cells show mean ± sample sd over seeds"
        f"{'' if len(seeds) > 1 else ' — one seed gives no spread; `make demo SEEDS=3` repeats training and finetuning'}).",
        "",
        "## Result",
        "",
        markdown_table(["backbone"] + [c.title for c in table_columns(table)],
                       [[row.label] + [fmt_cell(table[row.key][c.key]) for c in table_columns(table)] for row in rows]),
        "",
        "- seg mIoU / depth RMSE: `qcap finetune seg|depth` of each backbone on the world's `eval/seg`, `eval/depth` "
        f"(`{layout.path(layout.FINETUNE_METRICS, row='<backbone>', seed='<seed>', task='<task>')}`).",
        "- zero-shot top-1 and retrieval R@1: `qcap train`'s evaluation at the end of pretraining on the world's "
        f"`eval/cls` and `eval/retrieval` (`{layout.path(layout.CLIP_EVAL, row='<rung>', seed='<seed>')}`); "
        "a random-init CLIP is not evaluated "
        "(chance: 1 / number of classes, 1 / number of captions).",
        "- caption F1: `qcap score-captions` of the captions each backbone was pretrained on against the world's "
        f"truth (fact F1, 1.0 = the true description; `{layout.path(layout.SCORE_SUMMARY, rung='<rung>')}`). "
        "Real rows train on the web "
        "caption; DR rows on the web caption and one of the synthetic captions per sample (`--caption-source dual`).",
        "",
        "## Does this run reproduce the paper?",
        "",
        "The paper (Vasu et al. 2024, arXiv 2405.08911) predicts that CLIP pretrained on better captions (DataCompDR: "
        "the web caption plus synthetic CoCa captions) transfers better to segmentation and depth, and that DR at 10% "
        "of the data matches real captions at 100%. Rule: a difference counts when it exceeds twice its standard "
        "error over seeds; with one seed only its direction is known.",
        "",
    ]
    for claim in payload["claims"]:
        lines.append(f"- **{claim['claim']}: {claim['verdict']}.** {describe_comparison(claim['comparison'])}.")
    lines += ["", "Did pretraining teach the backbones anything? (each pretrained backbone against random init)", ""]
    failing = [c for c in payload["pretraining_vs_random"] if not holds(c["verdict"])]
    for check in payload["pretraining_vs_random"]:
        column = COLUMN_BY_KEY[check["column"]].title
        verdict = ("better than random init" if check["verdict"].startswith("reproduced") else
                   "direction only (one seed): better than random init" if holds(check["verdict"]) else check["verdict"])
        lines.append(f"- {check['row']}, {column}: {verdict}. {describe_comparison(check['comparison'])}.")
    if failing:
        lines += ["", f"**{len(failing)} of {len(payload['pretraining_vs_random'])} pretrained results do not clearly "
                  "beat random init**: at this scale the comparison between caption sources rests on backbones that "
                  "learned little; read the verdicts above with that in mind (a larger `SCALE` trains longer)."]
    f1_real, f1_syn = table["dr-100"]["f1_real"].mean, table["dr-100"]["f1_syn"].mean
    if f1_real is not None and f1_syn is not None:
        premise = "better" if f1_syn > f1_real else "worse"
        lines += ["", f"The premise — synthetic captions describe the images better than the web's — "
                  f"{'holds' if premise == 'better' else 'does not hold'} here: on the DR 100% set the synthetic "
                  f"captions score F1 {f1_syn:.3f} against {f1_real:.3f} for the real ones "
                  f"(`{layout.path(layout.SCORE_SUMMARY, rung='dr-100')}`)."]
    if payload["reinforced"]:
        lines += ["", "## Does distillation add to the synthetic captions?", "",
                  "DR + distillation (`qcap reinforce` over the DR rung with a teacher CLIP trained on the clean split, "
                  "then `qcap train --distill-loss-weights`, MobileCLIP's DR loss) against the same DR rung trained on "
                  "its captions only, at the same samples seen:", ""]
        lines += [f"- **{e['claim']}: {e['verdict']}.** {describe_comparison(e['comparison'])}." for e in payload["reinforced"]]
    if payload["architecture"]:
        lines += ["", "## Backbone architecture: the ladder's tower against the others", ""]
        lines += architecture_markdown(payload["architecture"])
    lines += ["", "## Figures", ""]
    figures = payload["figures"]
    rel = _relative_to(out.parent)
    if "data_efficiency" in figures:
        lines += [f"![data efficiency]({rel(figures['data_efficiency'])})", ""]
    if "attention_distance" in figures:
        lines += [f"![attention distance]({rel(figures['attention_distance'])})", ""]
        for model in payload["attention"]:
            per_layer = ", ".join(f"{v:.1f}" for v in model["mean_per_layer"] or [])
            lines.append(f"- {model['label']}: mean attention distance per block {per_layer} px "
                         f"(uniform attention: {fmt(model['uniform_attention_px'], 1)} px; {model['num_images']} images)")
        lines.append("")
    if "caption_samples" in figures:
        lines += [f"![real vs synthetic captions]({rel(figures['caption_samples'])})", ""]
    lines += ["## Data", ""]
    if payload["funnel"]:
        lines += [markdown_table(["step", "samples", "source"],
                                 [[f["label"], fmt(f["value"], 0), f"`{f['file']}` {f['key']}"] for f in payload["funnel"]]), ""]
    if payload["training"]:
        lines += [markdown_table(["backbone", "model", "caption source", "loss", "images", "samples seen", "steps", "source"],
                                 [[t["row"], str(t["model"]), str(t["caption_source"]),
                                   "CLIP" if not t["distill_loss_weights"] else
                                   "DR loss, weights " + " / ".join(f"{w:g}" for w in t["distill_loss_weights"]),
                                   str(t["num_samples"]), str(t["samples_seen"]),
                                   str(t["steps"]), f"`{t['file']}`"] for t in payload["training"]]), ""]
    lines += ["## Timings", ""]
    stages = payload["timings"]["stages"]
    if stages:
        lines += [markdown_table(
            ["stage", "commands", "seconds", "load (1-min average)", "make runs"],
            [[s["stage"], str(s["commands"]), f"{s['seconds']:.1f}", f"{s['load_min']:.2f}–{s['load_max']:.2f}",
              str(s["runs"])] for s in stages]
            + [["**total**", str(payload["timings"]["commands"]), f"**{payload['timings']['total_seconds']:.1f}**", "", ""]]),
            "",
            f"Seconds are the wall time of the successful commands of each stage (from `{layout.TIMINGS}`; an interrupted "
            "command is not counted, its resumed re-run is); the load is the machine's 1-minute load average when "
            "each command started and ended. Commands that ran side by side (`make -j`) overlap, so the stages add "
            "up to more than the wall clock:", ""]
        lines += [f"- make run `{r['run'] or '(no id)'}`: {r['commands']} commands ({r['failed']} failed or interrupted), "
                  f"wall clock {r['wall_seconds']:.1f} s from the first command's start to the last one's end, "
                  f"{r['busy_seconds']:.1f} s of command time" for r in payload["timings"]["runs"]]
        lines.append("")
    else:
        lines += [f"No `{layout.TIMINGS}` (the commands were not run through `tools/timed.sh`).", ""]
    if payload["missing"]:
        lines += ["## Missing", "", *[f"- `{m}`" for m in payload["missing"]], ""]
    return "\n".join(lines)


def main(argv: list[str], prog: str = "qcap report") -> int:
    cfg = parse_config(ReportConfig, argv, prog=prog)
    payload = build(cfg)
    out = cfg.out or cfg.demo / REPORT_FILE
    print(f"report: {out} ({len(payload['seeds'])} seed(s); {len(payload['figures'])} figures)")
    for claim in payload["claims"]:
        print(f"  {claim['claim']}: {claim['verdict']}")
    if payload["timings"]["stages"]:
        print(f"  timed: {payload['timings']['commands']} commands, {payload['timings']['total_seconds']:.1f} s")
    if payload["missing"]:
        print(f"  missing ({len(payload['missing'])}): " + ", ".join(payload["missing"][:5])
              + (" ..." if len(payload["missing"]) > 5 else ""))
    return 0
