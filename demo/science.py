"""The science report of ``make science``: positive controls first, then the paper's verdicts.

Usage::

    qcap science-report runs/science [--seeds 3 4 5] [--dev-seeds 0 1 2] [--fractions 100 30 10]

Reads the same folder layout as ``qcap report`` (``finetune/<backbone>-s<seed>/{seg,depth}/metrics.json``,
``clip/<rung>-s<seed>/eval.json``, ``scores/<rung>/summary.json``) with more rows, and
``attention/s<seed>/attention_distance.json`` (DR first, real second). It computes no metric:
every number comes from a file, and ``science.json`` names the file and key of each. Each rung's size is read
from its run record (``dr-ladder/<rung>/summary.json``, qcap subset's, reinforce's or control-rung's).
Every path is named once, in :mod:`demo.layout`.

Rows (backbones): ``random`` (no pretraining), ``mae`` (``python -m train.mae`` on the real
rung's images), and per fraction P of the ladder ``datacomp-P`` (web captions), ``dr-P`` (web +
synthetic, DataCompDR), ``oracle-P`` (the same images with the world's true descriptions:
the perfect captioner), ``shapes-P`` (the same images with captions naming only their shapes: a
caption-content control that does not decide the guard) and ``clean-P`` (the clean split's human
captions, as many images).
Shown when the folder holds their runs: ``drr-P`` (DR + distillation: ``dr-P`` reinforced by
``qcap reinforce`` with a teacher CLIP, trained with the DR loss; checked against ``dr-P``) and
the other image towers beside the ladder's: the MCi (``mci-random``, ``mci-datacomp-100``,
``mci-dr-100``) and the ViT when the ladder trains another tower (``vit-random``,
``vit-datacomp-100``, ``vit-dr-100``: make science's ladder is the CNN ``qcap-tiny-resnet10t``),
each checked against its own random init and compared with the ladder's tower on the same rungs
(section 6: per dense task, det included, DR vs real beyond 2 SE on each architecture). MAE is a
ViT: it is checked against ``vit-random`` and compared with ``vit-dr-100`` when those exist (the
paper's comparison: the same ViT, the same images and compute), else with the ladder's.

The order of the argument, which the report keeps:

1. pretraining vs random init: every pretrained backbone must beat random init on seg mIoU and
   depth RMSE by more than 2 standard errors over seeds, else the dense tasks measure nothing;
2. the positive control: the oracle rung must beat the real-caption rung (same images) on both
   dense tasks by more than 2 SE. If it does not, **the world at this scale cannot show a
   caption-quality effect at all**, and every DR verdict below is marked uninformative;
3. the premise: the DR set's synthetic captions must score a higher fact F1 against the truth
   than its web alt-text;
4. the paper's directions, over the ladder: DR > real on segmentation and on depth at each
   fraction; DR at the smallest fraction ≥ real at 100% (vacuous when real 100% does not beat
   random init); CLIP on DR vs MAE on both tasks;
5. attention distance (§3.4): :mod:`finetune.attention_test`'s paired test over seeds.

Verdicts use ``demo.report``'s rule (a difference counts beyond 2 SE over seeds; paired by seed
when both rows ran the same seeds, as every row of the graph does). Seeds
used to tune the miniature (``--dev-seeds``) are left out of the verdicts; with one seed the
report lists the verdicts one seed cannot give.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from base.cli import UsageError
from base.config import arg, parse_config
from base.shards import atomic_write_bytes, atomic_write_json
from demo import layout
from demo.report import (
    ARCHITECTURES,
    COLUMN_BY_KEY,
    COLUMNS,
    DET_COLUMNS,
    OPTIONAL_ROWS,
    RANDOM_ROWS,
    Cell,
    Reader,
    Row,
    architecture,
    architecture_markdown,
    baseline_of,
    beats,
    cell_sources,
    collect_table,
    compare,
    discover_seeds,
    fmt,
    fmt_cell,
    has_det,
    has_runs,
    markdown_table,
    matches,
    read_timings,
    reinforced,
    run_spans,
    rung_record,
    stage_timings,
    tower_label,
)

SCIENCE_MD = "science.md"
SCIENCE_JSON = "science.json"
DENSE = (("miou", "segmentation (mIoU)"), ("rmse", "depth (RMSE)"))
CONTROL_FAILED = "uninformative: the oracle control failed"
CONTROL_UNKNOWN = "uninformative: the oracle control is not established (one seed)"
CONTROL_MISSING = "uninformative: no oracle control was measured"


@dataclass(kw_only=True)
class ScienceConfig:
    """Write science.md/science.json: controls (pretrained vs random, oracle vs real, caption premise),
    then the paper's verdicts (DR vs real, data efficiency, vs MAE) and the attention-distance test."""

    demo: Path = arg(help="the run folder of make science (clip/, finetune/, scores/, attention/)", positional=True)
    seeds: list[int] | None = arg(None, help="seeds the verdicts use (default: every seed found, minus --dev-seeds)")
    dev_seeds: list[int] = arg(factory=list, help="seeds used to tune the miniature: reported, never used for a verdict")
    fractions: list[int] = arg(factory=lambda: [100, 10], help="ladder fractions in percent (rung folder suffixes), largest first")
    alpha: float = arg(0.05, help="significance level of the attention-distance test")
    out: Path | None = arg(None, help="the Markdown file (default: DEMO/science.md); science.json beside it")

    def __post_init__(self) -> None:
        if not self.fractions or any(f <= 0 or f > 100 for f in self.fractions):
            raise ValueError(f"fractions: percentages in 1..100, got {self.fractions}")
        if 100 not in self.fractions:
            raise ValueError("fractions: the ladder must include 100 (the full real-caption rung)")
        self.fractions = sorted(set(self.fractions), reverse=True)


def science_rows(fractions: Sequence[int], demo: Path | None = None) -> list[Row]:
    """The rows, in report order; with ``demo``, the optional ones (DR + distillation, the shapes control, the other
    towers) only where it holds their runs."""
    rows = [Row("random", "random init", None, None), Row("mae", "MAE (real rung's images)", None, 100, arch="vit")]
    for p in fractions:
        rows += [Row(f"datacomp-{p}", f"real {p}%", "real", p), Row(f"dr-{p}", f"DR {p}%", "dr", p),
                 Row(f"drr-{p}", f"DR + distillation {p}%", "drr", p, data=f"dr-{p}"),
                 Row(f"oracle-{p}", f"oracle {p}%", "oracle", p), Row(f"shapes-{p}", f"shape captions {p}%", "shapes", p),
                 Row(f"clean-{p}", f"clean {p}%", "clean", p)]
    rows += [row for row in OPTIONAL_ROWS if row.arch != "main"]
    if demo is not None:
        optional = {r.key for r in rows if r.captions in ("drr", "shapes") or (r.arch != "main" and r.key != "mae")}
        rows = [r for r in rows if r.key not in optional or has_runs(demo, r.key)]
    return rows


def architecture_rows(rows: Sequence[Row], det: bool) -> tuple[list[Row], list]:
    """Every tower's rows among ``rows`` and the dense-task columns they are compared on (``det``: detection too)."""
    keys = {key for _, keys in ARCHITECTURES.values() for key in keys}
    return [r for r in rows if r.key in keys], [COLUMN_BY_KEY["miou"], COLUMN_BY_KEY["rmse"], *(DET_COLUMNS if det else ())]


def architecture_table(reader: Reader, rows: Sequence[Row], seeds: Sequence[int]) -> dict[str, dict[str, Cell]]:
    """Every tower's rows the folder holds, on every finetuned dense task (detection included when measured)."""
    present, columns = architecture_rows(rows, has_det(reader.root))
    return collect_table(reader, seeds, rows=present, columns=columns)


def rung_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows trained on a rung of their own (every captioned row of the ladder's tower): their rung sizes are reported."""
    return [r for r in rows if r.captions is not None and r.arch == "main"]


def rungs(reader: Reader, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Each finished rung's images written, from its run record (a control rung made with --allow-fewer can be
    smaller than the real rung it stands beside)."""
    out = []
    for row in rung_rows(rows):
        rel, key = rung_record(row)
        rel = layout.on_disk(reader.root, rel)  # a rung from before the shared names: its old summary
        if (reader.root / rel).is_file():
            out.append({"row": row.key, "label": row.label, "file": rel, "key": key, "value": reader.value(rel, key)})
    return out


def files_read(rows: Sequence[Row], seeds: Sequence[int], *, det: bool = False) -> list[str]:
    """Every file (relative to DEMO) the science report reads for ``rows`` and ``seeds`` (``det``: the architecture
    comparison includes detection): the table's cells, the rungs' run records, the attention files per seed, the
    timings. ``make layout SCIENCE=1`` must list each of them for the rows it makes."""
    present, columns = architecture_rows(rows, det)
    out = [rel for *_, rel, _ in cell_sources(rows, seeds, COLUMNS)]
    out += [rel for *_, rel, _ in cell_sources(present, seeds, columns)]
    out += [rung_record(row)[0] for row in rung_rows(rows)]
    out += [layout.path(layout.ATTENTION_SEED, seed=s) for s in seeds] + [layout.TIMINGS, layout.DEPTH_FLOOR]
    return list(dict.fromkeys(out))


# the rows whose depth RMSE the headroom line places between the floor and the position-only prediction
HEADROOM_ROWS = ("random", "mae", "datacomp-100", "dr-100", "drr-100", "oracle-100", "shapes-100", "clean-100")


def depth_headroom(reader: Reader, table: dict[str, dict[str, Cell]]) -> dict[str, Any] | None:
    """Where the backbones' depth RMSE stands between the world's floor (no model can go below it) and the
    position-only prediction (a per-pixel training mean, no image read): the share of that headroom each row closes,
    from ``depth-floor/depth_floor.json`` (``qcap depth-floor``). None when the file is absent."""
    rel = layout.DEPTH_FLOOR
    if reader.load(rel) is None:
        return None
    sources = {name: {"file": rel, "key": f"predictions.{name}.rmse", "value": reader.value(rel, f"predictions.{name}.rmse")}
               for name in ("floor", "position", "constant")}
    if any(source["value"] is None for source in sources.values()):  # the reader lists what is missing
        return None
    floor, position = sources["floor"]["value"], sources["position"]["value"]
    rows = []
    for key in HEADROOM_ROWS:
        cell = table.get(key, {}).get("rmse")
        if cell is None or cell.mean is None:
            continue
        closed = (position - cell.mean) / (position - floor) if position > floor else None
        rows.append({"key": key, "rmse_mean": cell.mean, "above_floor_m": cell.mean - floor, "headroom_closed": closed})
    return {"floor_m": floor, "position_m": position, "constant_m": sources["constant"]["value"],
            "headroom_m": position - floor, "sources": sources, "rows": rows}


def collect(reader: Reader, rows: Sequence[Row], seeds: Sequence[int]) -> dict[str, dict[str, Cell]]:
    return collect_table(reader, seeds, rows=rows, columns=COLUMNS)


def _present(table: dict[str, dict[str, Cell]], key: str) -> bool:
    return key in table and any(table[key][c].n for c, _ in DENSE)


def _entry(claim: str, verdict: str, c) -> dict[str, Any]:
    return {"claim": claim, "verdict": verdict, "comparison": c.as_json()}


def analyse(table: dict[str, dict[str, Cell]], rows: Sequence[Row], fractions: Sequence[int]) -> dict[str, Any]:
    """Every check and verdict, in the report's order; pure function of the table."""
    labels = {r.key: r.label for r in rows}
    # every pretrained backbone against random init of its own image tower (MCi against mci-random, ViT rows and
    # MAE against vit-random when the ladder's tower is not the ViT)
    present_keys = {key for key in table if _present(table, key)}
    sanity = []
    for r in rows:
        baseline = baseline_of(r, present_keys)
        if r.key in RANDOM_ROWS or r.key not in present_keys or baseline not in table:
            continue
        for col, task in DENSE:
            c = compare(table, col, r.key, baseline)
            sanity.append(_entry(f"{labels[r.key]} beats {labels.get(baseline, 'random init')} on {task}", beats(c), c))
    controls = []
    for p in fractions:
        if not _present(table, f"oracle-{p}"):
            continue
        for col, task in DENSE:
            c = compare(table, col, f"oracle-{p}", f"datacomp-{p}")
            controls.append(_entry(f"oracle captions beat real captions on {task} at {p}% (same images)", beats(c), c))
    oracle_100 = [e for e in controls if "at 100%" in e["claim"]]
    # a caption-content control beside the perfect captioner (not part of the guard): the same images captioned
    # with their shapes only, the segmentation classes -- does this world show any caption effect at this compute?
    shapes = [_entry(f"shape-only captions beat real captions on {task} at 100% (same images)", beats(c), c)
              for col, task in DENSE if _present(table, "shapes-100")
              for c in [compare(table, col, "shapes-100", "datacomp-100")]]
    if not oracle_100:
        world = {"can_show_effect": None, "why": "not measured: no oracle-100 rung (make science builds it)",
                 "prefix": CONTROL_MISSING}
    elif any(e["comparison"]["spread"] is None for e in oracle_100):
        directions = "; ".join(f"{e['claim']}: {e['verdict']}" for e in oracle_100)
        world = {"can_show_effect": None, "why": f"one seed: the control needs a spread over seeds ({directions})"}
    elif all(e["verdict"] == "reproduced" for e in oracle_100):
        world = {"can_show_effect": True, "why": "the oracle rung beats real captions on both dense tasks beyond 2 SE"}
    else:
        failed = "; ".join(f"{e['claim']}: {e['verdict']}" for e in oracle_100 if e["verdict"] != "reproduced")
        world = {"can_show_effect": False, "why": f"the perfect captioner does not clearly help here ({failed})"}
    f1_real, f1_syn = table["dr-100"]["f1_real"].mean, table["dr-100"]["f1_syn"].mean
    premise = {"f1_real": f1_real, "f1_syn": f1_syn,
               "holds": None if f1_real is None or f1_syn is None else f1_syn > f1_real,
               "sources": table["dr-100"]["f1_real"].sources + table["dr-100"]["f1_syn"].sources}

    def guarded(verdict: str) -> str:
        if world["can_show_effect"]:
            return verdict
        prefix = world.get("prefix") or (CONTROL_UNKNOWN if world["can_show_effect"] is None else CONTROL_FAILED)
        return f"{prefix} (measured: {verdict})"

    claims = []
    for col, task in DENSE:
        for p in fractions:
            c = compare(table, col, f"dr-{p}", f"datacomp-{p}")
            claims.append(_entry(f"DR beats real captions on {task} at {p}%", guarded(beats(c)), c))
    smallest = fractions[-1]
    if smallest < 100:
        for col, task in DENSE:
            c = compare(table, col, f"dr-{smallest}", "datacomp-100")
            verdict = matches(c)
            baseline = beats(compare(table, col, "datacomp-100", "random"))
            if verdict.startswith("reproduced") and baseline != "reproduced":
                verdict = f"vacuous (real 100% does not beat random init on {task} beyond 2 SE: {baseline})"
            claims.append(_entry(f"DR at {smallest}% matches real captions at 100% on {task}", guarded(verdict), c))
    mae = []
    if _present(table, "mae"):
        # the paper's comparison is the same ViT: the ViT's DR row when the ladder trains another tower
        dr_row = "vit-dr-100" if "vit-dr-100" in present_keys else "dr-100"
        for col, task in DENSE:
            c = compare(table, col, dr_row, "mae")
            mae.append(_entry(f"CLIP on {labels.get(dr_row, dr_row)} beats MAE on {task}", beats(c), c))
    present = [r for r in rows if _present(table, r.key)]
    return {"pretraining_vs_random": sanity, "controls": controls, "shapes_control": shapes, "world": world,
            "premise": premise,
            "claims": claims, "mae": mae, "reinforced": reinforced(table, present)}


def attention(demo: Path, seeds: Sequence[int], alpha: float) -> dict[str, Any] | None:
    from finetune.attention_test import claim_test, read_pair

    files = [(s, demo / layout.path(layout.ATTENTION_SEED, seed=s)) for s in seeds]
    # sources relative to the run folder, as every other number's file in science.json
    pairs = [replace(read_pair(path, seed), source=path.relative_to(demo).as_posix()) for seed, path in files if path.is_file()]
    if not pairs:
        return None
    return claim_test(pairs, alpha=alpha)


def one_seed_cannot(analysis: dict[str, Any]) -> list[str]:
    """Claims whose verdict needs a spread over seeds (every 'beyond 2 SE' one)."""
    out = []
    for group in ("pretraining_vs_random", "controls", "shapes_control", "claims", "mae", "reinforced", "architecture"):
        out += [e["claim"] for e in analysis.get(group, [])
                if e["comparison"]["spread"] is None and e["comparison"]["better"] is not None]
    return out


def describe(c: dict[str, Any], labels: dict[str, str]) -> str:
    a, b = labels.get(c["a"], c["a"]), labels.get(c["b"], c["b"])
    if c["better"] is None:
        return f"{a} vs {b}: not measured"
    spread = ("no seed spread (one seed)" if c["spread"] is None
              else f"2 SE = {c['spread']:.4f} ({'paired by seed, ' if c.get('paired') else ''}n={c['n']})")
    inside = "" if c["spread"] is None else (" — inside the noise" if abs(c["better"]) <= c["spread"] else " — beyond the noise")
    direction = f"better by {c['better']:.4f}" if c["better"] >= 0 else f"worse by {-c['better']:.4f}"
    return f"{a} {c['a_mean']:.4f} vs {b} {c['b_mean']:.4f}: {a} {direction}; {spread}{inside}"


def build(cfg: ScienceConfig) -> dict[str, Any]:
    demo = cfg.demo
    if not demo.is_dir():
        raise UsageError(f"{demo}: not a folder; run `make science` (or pass the folder it wrote)")
    found = discover_seeds(demo)
    seeds = sorted(s for s in (cfg.seeds if cfg.seeds is not None else found) if s not in set(cfg.dev_seeds))
    if not seeds:
        raise UsageError(f"{demo}: no seed left for the verdicts (found {found}, development seeds {cfg.dev_seeds})")
    rows = science_rows(cfg.fractions, demo)
    reader = Reader(demo)
    table = collect(reader, rows, seeds)
    analysis = analyse(table, rows, cfg.fractions)
    analysis["architecture"] = architecture(architecture_table(reader, rows, seeds), tower_label(reader, seeds))
    timings = read_timings(demo / layout.TIMINGS)
    stages = stage_timings(timings)
    payload = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"), "demo": str(demo), "seeds": seeds,
        "dev_seeds": sorted(cfg.dev_seeds), "seeds_found": found, "fractions": cfg.fractions,
        "rows": [r.__dict__ for r in rows if any(table[r.key][c.key].n for c in COLUMNS)],
        "table": {k: {c: cell.as_json() for c, cell in cells.items()} for k, cells in table.items()},
        **analysis, "attention_test": attention(demo, seeds, cfg.alpha), "rungs": rungs(reader, rows),
        "depth_headroom": depth_headroom(reader, table),
        "one_seed_cannot_give": one_seed_cannot(analysis) if len(seeds) < 2 else [],
        "timings": {"stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages), 1),
                    "runs": run_spans(timings)},
        "missing": sorted(reader.missing),
    }
    out = cfg.out or demo / SCIENCE_MD
    atomic_write_bytes(out, render(payload, table, rows).encode("utf-8"))
    atomic_write_json(out.with_name(SCIENCE_JSON), payload)
    return payload


def render(payload: dict[str, Any], table: dict[str, dict[str, Cell]], rows: Sequence[Row]) -> str:
    labels = {r.key: r.label for r in rows}
    shown = [r for r in rows if any(table[r.key][c.key].n for c in COLUMNS)]
    columns = [c for c in COLUMNS if any(table[r.key][c.key].n for r in rows)]  # measured columns only
    seeds = payload["seeds"]
    lines = ["# qcap science: can the miniature show the caption-quality effect?", "",
             f"Generated {payload['generated']} from `{payload['demo']}`. Verdict seeds: {', '.join(map(str, seeds))}"
             + (f"; development (tuning) seeds left out: {', '.join(map(str, payload['dev_seeds']))}" if payload["dev_seeds"] else "")
             + ". Cells: mean ± sample sd over the verdict seeds; a difference counts beyond 2 standard errors of the mean"
             " per-seed difference (rows that ran the same seeds are paired by seed: seed s shares its pretraining and"
             " finetune seeds), else of the difference of the means.", "",
             markdown_table(["backbone"] + [c.title for c in columns],
                            [[r.label] + [fmt_cell(table[r.key][c.key], 4) for c in columns] for r in shown]), ""]
    if payload["one_seed_cannot_give"]:
        lines += ["**One seed: no verdict at 2 SE can be given.** Directions only, for: "
                  + "; ".join(payload["one_seed_cannot_give"]) + ".", ""]
    lines += ["## 1. Did pretraining teach the backbones anything?", ""]
    lines += [f"- {e['claim']}: **{e['verdict']}**. {describe(e['comparison'], labels)}." for e in payload["pretraining_vs_random"]]
    lines += ["", *headroom_markdown(payload["depth_headroom"], labels)]
    lines += ["", "## 2. Positive control: can this world show a caption-quality effect?", ""]
    lines += [f"- {e['claim']}: **{e['verdict']}**. {describe(e['comparison'], labels)}." for e in payload["controls"]]
    world = payload["world"]
    answer = {True: "**Yes**: ", False: "**No — the DR verdicts below are uninformative**: ",
              None: "**Not established — the DR verdicts below are uninformative**: "}[world["can_show_effect"]]
    lines += ["", answer + world["why"] + ".", ""]
    if payload["shapes_control"]:
        lines += ["Beside the perfect captioner, a caption-content control that does not decide the guard: the same "
                  "images captioned with their shapes only (the segmentation classes; `qcap control-rung --kind "
                  "shapes`). It shows whether this world can show any caption effect at this compute:", ""]
        lines += [f"- {e['claim']}: **{e['verdict']}**. {describe(e['comparison'], labels)}."
                  for e in payload["shapes_control"]]
        lines.append("")
    premise = payload["premise"]
    lines += ["## 3. Premise: do the synthetic captions describe the images better than the web's?", ""]
    if premise["holds"] is None:
        lines += [f"Not measured (no `{layout.path(layout.SCORE_SUMMARY, rung='dr-100')}`).", ""]
    else:
        lines += [f"{'Yes' if premise['holds'] else 'No'}: on the DR 100% set the synthetic captions score fact F1 "
                  f"{premise['f1_syn']:.4f} against {premise['f1_real']:.4f} for the web alt-text "
                  f"(`{layout.path(layout.SCORE_SUMMARY, rung='dr-100')}`).", ""]
    lines += ["## 4. The paper's directions", ""]
    lines += [f"- {e['claim']}: **{e['verdict']}**. {describe(e['comparison'], labels)}." for e in payload["claims"]]
    if payload["mae"]:
        lines += ["", "Against the MAE baseline (same ViT, same images, same samples seen):", ""]
        lines += [f"- {e['claim']}: **{e['verdict']}**. {describe(e['comparison'], labels)}." for e in payload["mae"]]
    if payload["reinforced"]:
        lines += ["", "DR + distillation (`qcap reinforce` with a teacher CLIP trained on the clean split, the DR loss) "
                  "against the same DR rung trained on its captions only:", ""]
        lines += [f"- {e['claim']}: **{e['verdict']}**. {describe(e['comparison'], labels)}." for e in payload["reinforced"]]
    lines += ["", "## 5. Attention distance (paper §3.4)", ""]
    test = payload["attention_test"]
    if test is None:
        lines += [f"Not measured (no `{layout.path(layout.ATTENTION_SEED, seed='<seed>')}`).", ""]
    else:
        loc, div = test["locality"], test["diversity"]
        lines += [f"Claim: {test['claim']}. Test: {test['test']}, α = {test['alpha']}, deep blocks "
                  f"{test['deep_blocks']} of {test['num_blocks']}, {test['n_seeds']} seeds.", "",
                  f"- locality: real − DR deep-block mean distance {loc['mean_difference_px']:+.3f} px, "
                  f"t = {fmt(loc['statistic'])}, p = {fmt(loc['p_value'], 4)}",
                  f"- diversity: DR − real spread across heads {div['mean_difference_px']:+.3f} px, "
                  f"t = {fmt(div['statistic'])}, p = {fmt(div['p_value'], 4)}",
                  f"- verdict: **{test['verdict']}**", ""]
        lines += [markdown_table(["seed", "DR mean/block (px)", "real mean/block (px)", "DR spread/block", "real spread/block"],
                                 [[str(s["seed"]), ", ".join(f"{v:.1f}" for v in s["mean_per_block_dr"]),
                                   ", ".join(f"{v:.1f}" for v in s["mean_per_block_real"]),
                                   ", ".join(f"{v:.2f}" for v in s["spread_per_block_dr"]),
                                   ", ".join(f"{v:.2f}" for v in s["spread_per_block_real"])] for s in test["per_seed"]]), ""]
    if payload["architecture"]:
        lines += ["## 6. Backbone architecture: the ladder's tower against the others", "",
                  *architecture_markdown(payload["architecture"], 4)]
        lines += [f"- {e['claim']}: **{e['dr_beats_real']}**. {describe(e['comparison'], labels)}."
                  for e in payload["architecture"]]
        if not world["can_show_effect"]:
            lines += ["", "The positive control (section 2, on the ladder's tower) is not established, so DR vs real on "
                      "any tower says nothing about caption quality here; the rows still compare the towers."]
        lines.append("")
    if payload["rungs"]:
        lines += ["## Rungs", "", markdown_table(["rung", "images", "source"],
                                                 [[r["label"], fmt(r["value"], 0), f"`{r['file']}` {r['key']}"]
                                                  for r in payload["rungs"]]), ""]
    if payload["timings"]["stages"]:
        lines += ["## Timings", "", markdown_table(["stage", "commands", "seconds", "load"],
                                                   [[s["stage"], str(s["commands"]), f"{s['seconds']:.1f}",
                                                     f"{s['load_min']:.2f}–{s['load_max']:.2f}"]
                                                    for s in payload["timings"]["stages"]]), ""]
        lines += [f"- make run `{r['run']}`: wall clock {r['wall_seconds']:.1f} s" for r in payload["timings"]["runs"]]
        lines.append("")
    if payload["missing"]:
        lines += ["## Missing", "", *[f"- `{m}`" for m in payload["missing"]], ""]
    return "\n".join(lines)


def headroom_markdown(headroom: dict[str, Any] | None, labels: dict[str, str]) -> list[str]:
    """The depth headroom paragraph: the floor, position-only and constant RMSE, and each row's share closed."""
    if headroom is None:
        return [f"Depth headroom: not measured (no `{layout.DEPTH_FLOOR}`; `qcap depth-floor` writes it).", ""]
    lines = [f"Depth headroom (`{layout.DEPTH_FLOOR}`): no model can go below RMSE {headroom['floor_m']:.3f} m on this "
             f"world's depth validation images (the posterior mean given each image's layout and depth order); "
             f"a per-pixel training mean that reads no image scores {headroom['position_m']:.3f} m and a constant "
             f"{headroom['constant_m']:.3f} m. Share of the {headroom['headroom_m']:.3f} m between them each backbone "
             "closes (mean RMSE over the verdict seeds; 100% = the floor, 0% = no better than position only):", ""]
    lines += [f"- {labels.get(r['key'], r['key'])}: {r['rmse_mean']:.3f} m, {r['above_floor_m']:+.3f} m above the floor, "
              + (f"{100 * r['headroom_closed']:.0f}% closed" if r["headroom_closed"] is not None else "no headroom")
              for r in headroom["rows"]]
    return [*lines, ""]


def main(argv: list[str], prog: str = "qcap science-report") -> int:
    cfg = parse_config(ScienceConfig, argv, prog=prog)
    payload = build(cfg)
    print(f"science: {cfg.out or cfg.demo / SCIENCE_MD} (verdict seeds {payload['seeds']})")
    print(f"  world can show a caption-quality effect: {payload['world']['can_show_effect']} — {payload['world']['why']}")
    for e in payload["claims"] + payload["mae"]:
        print(f"  {e['claim']}: {e['verdict']}")
    if payload["attention_test"]:
        print(f"  attention distance: {payload['attention_test']['verdict']}")
    return 0


if __name__ == "__main__":
    from base.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m demo.science"))

