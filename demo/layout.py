"""The demo's folder layout, named once: the files under ``DEMO`` that ``make demo`` / ``make science`` write and
the reports (:mod:`demo.report`, :mod:`demo.science`) read.

Every name is a format-string pattern relative to ``DEMO``. Fields: ``{row}`` a backbone (a rung of the ladder,
``random``, ``mae``, ``mci-…``), ``{seed}`` an integer, ``{task}`` a finetuning task (``seg``, ``depth``, ``det``),
``{rung}`` a folder of the ladder (``datacomp-P``, ``dr-P``, ``drr-P``, ``oracle-P``, ``shapes-P``, ``clean-100``), ``{filter}`` a
curation filter (``basic``, ``clip``, ``dedup``). ``make layout DEMO=... [SCIENCE=1] [SEEDS=N]`` prints the Makefile's
own paths for them, one a line; ``tests/test_demo_layout.py`` checks that each listed path has a pattern here and that
each file the reports read for the listed rows is listed (:func:`check`), so a folder renamed on one side only fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from base.stage import LEGACY_RECORDS, SUMMARY_FILE

CLIP = "clip"  # qcap train / qcap mae runs
FINETUNE = "finetune"  # qcap finetune runs, one folder per task inside
SCORES = "scores"  # qcap score-captions, one folder per rung
LADDER = "dr-ladder"  # the rungs: qcap subset, qcap reinforce, qcap control-rung
ATTENTION_DIR = "attention"  # qcap attention-distance
WORLD = "world"  # the embedded world (the report's default --world)
TRUTH = "truth.parquet"  # inside a world folder: one row per uid with its true description
RUN_DIR = "{row}-s{seed}"  # a training or finetuning run of one backbone and seed

CLIP_RUN = f"{CLIP}/{RUN_DIR}"
CLIP_EVAL = f"{CLIP_RUN}/eval.json"
CLIP_CONFIG = f"{CLIP_RUN}/config.json"
FINETUNE_RUN = f"{FINETUNE}/{RUN_DIR}"
FINETUNE_METRICS = f"{FINETUNE_RUN}/{{task}}/metrics.json"
SCORE_SUMMARY = f"{SCORES}/{{rung}}/summary.json"
PER_CAPTION = f"{SCORES}/{{rung}}/per_caption.parquet"
RUNG = f"{LADDER}/{{rung}}"
RUNG_SUMMARY = f"{RUNG}/{SUMMARY_FILE}"  # the rung's run record, written last: qcap subset's, reinforce's or control-rung's
ATTENTION = f"{ATTENTION_DIR}/attention_distance.json"  # DR 100% against real 100%, seed 0
ATTENTION_PNG = f"{ATTENTION_DIR}/attention_distance.png"
ATTENTION_SEED = f"{ATTENTION_DIR}/s{{seed}}/attention_distance.json"  # the same per seed (make science)
WORLD_TRUTH = f"{WORLD}/{TRUTH}"
TIMINGS = "timings.tsv"  # tools/timed.sh's log
RAW_MANIFEST = "raw/manifest.json"  # qcap download
FILTER_REPORT = "filters/{filter}.report/report.json"  # qcap filter basic|clip-score|dedup
CURATED_SUMMARY = f"curated/{SUMMARY_FILE}"  # qcap reshard
CAPTION_SUMMARY = f"syn/{SUMMARY_FILE}"  # qcap caption
DR_SUMMARY = f"dr/{SUMMARY_FILE}"  # qcap build-dr
DEPTH_FLOOR = "depth-floor/depth_floor.json"  # qcap depth-floor on the world (make science): the depth task's headroom

# every file pattern by name (each path ``make layout`` lists must be an instance of one)
PATTERNS: dict[str, str] = {
    "CLIP_EVAL": CLIP_EVAL, "CLIP_CONFIG": CLIP_CONFIG, "FINETUNE_METRICS": FINETUNE_METRICS,
    "SCORE_SUMMARY": SCORE_SUMMARY, "PER_CAPTION": PER_CAPTION,
    "RUNG_SUMMARY": RUNG_SUMMARY,
    "ATTENTION": ATTENTION, "ATTENTION_PNG": ATTENTION_PNG, "ATTENTION_SEED": ATTENTION_SEED,
    "WORLD_TRUTH": WORLD_TRUTH, "TIMINGS": TIMINGS, "RAW_MANIFEST": RAW_MANIFEST, "FILTER_REPORT": FILTER_REPORT,
    "CURATED_SUMMARY": CURATED_SUMMARY, "CAPTION_SUMMARY": CAPTION_SUMMARY, "DR_SUMMARY": DR_SUMMARY,
    "DEPTH_FLOOR": DEPTH_FLOOR,
}
# a rung's run record (the file its command writes last) and the record's count of images written, by caption kind
RUNG_RECORDS: dict[str, tuple[str, str]] = {
    "real": (RUNG_SUMMARY, "num_written"),
    "dr": (RUNG_SUMMARY, "num_written"),
    "drr": (RUNG_SUMMARY, "images_reinforced"),
    "oracle": (RUNG_SUMMARY, "num_written"),
    "shapes": (RUNG_SUMMARY, "num_written"),
    "clean": (RUNG_SUMMARY, "num_written"),
}
# the caption-grid figure reads this rung's shards and caption scores
GRID_RUNG = "dr-100"

_FIELD = re.compile(r"\{(\w+)\}")
_FIELD_REGEX = {"seed": r"\d+", "task": r"[a-z]+"}


def path(pattern: str, **fields: object) -> str:
    """``pattern`` with its fields filled in: a path relative to ``DEMO``."""
    return pattern.format(**fields)


def regex(pattern: str) -> re.Pattern[str]:
    """A pattern as a regular expression over whole relative paths; each field a named group."""
    parts, end = [], 0
    for m in _FIELD.finditer(pattern):
        parts.append(re.escape(pattern[end:m.start()]))
        parts.append(f"(?P<{m.group(1)}>{_FIELD_REGEX.get(m.group(1), r'[A-Za-z0-9][A-Za-z0-9_.-]*?')})")
        end = m.end()
    parts.append(re.escape(pattern[end:]))
    return re.compile("".join(parts))


def on_disk(root: str | Path, rel: str) -> str:
    """``rel``, or, where a stage's ``summary.json`` is missing from a folder written before the stages shared
    that name, the summary the stage wrote there then (``curated/report.json``, a rung's ``subset_summary.json``:
    :data:`base.stage.LEGACY_RECORDS`)."""
    folder, _, name = rel.rpartition("/")
    if name != SUMMARY_FILE or (Path(root) / rel).is_file():
        return rel
    for names in LEGACY_RECORDS.values():
        legacy = f"{folder}/{names['summary']}" if folder else names["summary"]
        if (Path(root) / legacy).is_file():
            return legacy
    return rel


def match(rel: str, patterns: Mapping[str, str] = PATTERNS) -> tuple[str, dict[str, str]] | None:
    """The name and fields of the pattern a relative path is an instance of (None: no pattern)."""
    for name, pattern in patterns.items():
        m = regex(pattern).fullmatch(rel)
        if m:
            return name, m.groupdict()
    return None


def run_folder(name: str) -> tuple[str, int] | None:
    """(row, seed) of a run folder's name ``<row>-s<seed>`` (None: not a run folder)."""
    m = regex(RUN_DIR).fullmatch(name)
    return (m.group("row"), int(m.group("seed"))) if m else None


def run_parents() -> tuple[str, str]:
    """The folders that hold the runs, one ``<row>-s<seed>`` folder each: training's, then finetuning's."""
    return CLIP, FINETUNE


def listed_rows(paths: Iterable[str]) -> tuple[set[str], set[int]]:
    """The rows and seeds that have a run (a training or finetuning file) among relative ``paths``."""
    rows: set[str] = set()
    seeds: set[int] = set()
    for rel in paths:
        found = match(rel)
        if found and found[0] in ("CLIP_EVAL", "CLIP_CONFIG", "FINETUNE_METRICS"):
            rows.add(found[1]["row"])
            seeds.add(int(found[1]["seed"]))
    return rows, seeds


def unused(listed: Iterable[str], patterns: Mapping[str, str] = PATTERNS) -> list[str]:
    """The names of ``patterns`` no path of ``listed`` is an instance of (a name the Makefile never writes)."""
    used = {found[0] for found in (match(rel, patterns) for rel in listed) if found}
    return [name for name in patterns if name not in used]


def check(listed: Iterable[str], read: Iterable[str], patterns: Mapping[str, str] = PATTERNS) -> list[str]:
    """Disagreements between the files a Makefile lists (``listed``) and the files the reports read (``read``),
    both relative to ``DEMO``: a listed path that is an instance of no pattern, and a file read that is not listed.
    Empty when the two agree."""
    listed = list(listed)
    problems = [f"{rel}: listed by make layout, but no pattern of demo.layout names it"
                for rel in listed if match(rel, patterns) is None]
    have = set(listed)
    problems += [f"{rel}: read by the reports, but make layout does not list it" for rel in dict.fromkeys(read)
                 if rel not in have]
    return problems
