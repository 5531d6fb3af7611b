"""The reports' folder layout (demo/layout.py) against the Makefile's (`make layout`): every path the Makefile lists
is an instance of a layout pattern, and every file the reports read for the rows the Makefile makes is listed, so a
folder or file renamed on one side only fails here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from demo import layout, report, science

ROOT = Path(__file__).resolve().parents[1]


def make_layout(demo: Path, *variables: str) -> list[str]:
    """``make -s layout DEMO=demo VARIABLES...``: the listed paths, relative to ``demo``."""
    done = subprocess.run(["make", "-s", "--no-print-directory", "layout", f"DEMO={demo}", *variables], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    outside = [p for p in paths if not p.startswith(f"{demo}/")]
    assert not outside, f"make layout lists paths outside DEMO: {outside}"
    return [p[len(str(demo)) + 1:] for p in paths]


def listed_fractions(listed: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for rel in listed if (m := re.fullmatch(r"clip/datacomp-(\d+)-s\d+/eval\.json", rel))},
                  reverse=True)


def reports_read(listed: list[str], *, science_report: bool) -> list[str]:
    """Every file the reports read for the rows and seeds ``listed`` makes: the demo report's always-shown rows and
    the optional ones with runs listed; with ``science_report``, the science report's rows with runs listed too."""
    rows, seeds = layout.listed_rows(listed)
    seed_list = sorted(seeds)
    det = any((found := layout.match(rel)) and found[0] == "FINETUNE_METRICS" and found[1]["task"] == "det"
              for rel in listed)
    report_rows = [*report.ROWS, *(r for r in report.OPTIONAL_ROWS if r.key in rows)]
    read = report.files_read(report_rows, seed_list, det=det)
    if science_report:
        science_rows = [r for r in science.science_rows(listed_fractions(listed)) if r.key in rows]
        read += science.files_read(science_rows, seed_list, det=det)
    return read


@pytest.fixture(scope="module")
def demo_listing(tmp_path_factory) -> list[str]:
    return make_layout(tmp_path_factory.mktemp("demo"), "SEEDS=2")


# the science graph with every row it can make: make science's CNN ladder (so the ViT rows beside it), MCi, the
# reinforced rungs, detection
SCIENCE_ALL = ("SCIENCE=1", "SEEDS=2", "CLIP_MODEL=qcap-tiny-resnet10t", "MCI=1", "DRR=1", "DET=1")


@pytest.fixture(scope="module")
def science_listing(tmp_path_factory) -> list[str]:
    return make_layout(tmp_path_factory.mktemp("science"), *SCIENCE_ALL)


def test_demo_layout_agrees_with_the_reports(demo_listing):
    rows, seeds = layout.listed_rows(demo_listing)
    assert seeds == {0, 1}
    assert {r.key for r in report.ROWS} <= rows  # the report's always-shown rows are made
    assert rows <= set(report.ROW_BY_KEY)  # and no row is made that the report does not show
    assert layout.check(demo_listing, reports_read(demo_listing, science_report=False)) == []
    # every name of the demo's layout is written by make demo, but the science graph's own files
    assert set(layout.unused(demo_listing)) == {"ATTENTION_SEED", "DEPTH_FLOOR"}


@pytest.mark.parametrize("fractions", [None, "1.0 0.3 0.1"])
def test_science_layout_agrees_with_both_reports(science_listing, tmp_path, fractions):
    listing = science_listing if fractions is None else make_layout(
        tmp_path, *SCIENCE_ALL, f"LADDER_FRACTIONS={fractions}")
    rows, _ = layout.listed_rows(listing)
    fractions_listed = listed_fractions(listing)
    assert fractions_listed == ([100, 10] if fractions is None else [100, 30, 10])
    known = {r.key for r in science.science_rows(fractions_listed)} | set(report.ROW_BY_KEY)
    assert rows <= known, f"made but shown by no report: {sorted(rows - known)}"
    read = reports_read(listing, science_report=True)
    assert {"attention/s1/attention_distance.json", "dr-ladder/clean-100/summary.json",
            "finetune/mci-random-s1/det/metrics.json", "scores/oracle-100/summary.json",
            "finetune/vit-random-s1/depth/metrics.json", "clip/vit-dr-100-s0/config.json"} <= set(read)
    assert layout.check(listing, read) == []
    assert layout.unused(listing) == []  # every name of demo/layout.py is a file make science writes


def test_a_folder_renamed_in_the_makefile_only_is_reported(science_listing):
    read = reports_read(science_listing, science_report=True)
    renamed = [rel.replace("scores/", "caption-scores/") for rel in science_listing]
    problems = layout.check(renamed, read)
    assert "caption-scores/dr-100/summary.json: listed by make layout, but no pattern of demo.layout names it" in problems
    assert "scores/dr-100/summary.json: read by the reports, but make layout does not list it" in problems


def test_a_run_record_renamed_in_the_makefile_only_is_reported(tmp_path):
    """The Makefile's ladder target renamed (summary.json -> subset_summary.json), demo/layout.py not."""
    listing = make_layout(tmp_path, "SEEDS=1",
                          "LADDER_SUMMARIES=$(foreach r,$(RUNGS),$(LADDER_DEMO)/$(r)/subset_summary.json)")
    problems = layout.check(listing, reports_read(listing, science_report=False))
    assert "dr-ladder/dr-10/subset_summary.json: listed by make layout, but no pattern of demo.layout names it" in problems
    assert "dr-ladder/dr-10/summary.json: read by the reports, but make layout does not list it" in problems


def test_a_pattern_renamed_in_the_layout_only_is_reported(demo_listing):
    mutated = dict(layout.PATTERNS, CLIP_EVAL="pretrain/{row}-s{seed}/eval.json")
    problems = layout.check(demo_listing, [], patterns=mutated)
    assert "clip/dr-100-s1/eval.json: listed by make layout, but no pattern of demo.layout names it" in problems
    assert "CLIP_EVAL" in layout.unused(demo_listing, mutated)


def test_patterns_round_trip():
    rel = layout.path(layout.FINETUNE_METRICS, row="mci-dr-100", seed=12, task="det")
    assert rel == "finetune/mci-dr-100-s12/det/metrics.json"
    assert layout.match(rel) == ("FINETUNE_METRICS", {"row": "mci-dr-100", "seed": "12", "task": "det"})
    assert layout.run_folder("datacomp-10-s3") == ("datacomp-10", 3)
    assert layout.run_folder("datacomp-10") is None
    assert layout.match("clip/dr-100-s0/notes.txt") is None


def test_a_demo_folder_from_before_the_shared_names_is_read_by_its_old_summaries(tmp_path):
    """A stage's summary.json missing where the folder holds the summary the stage wrote before the shared names:
    the reports read that one; once the stage has written summary.json (a resumed make demo), that one."""
    (tmp_path / "curated").mkdir()
    (tmp_path / "curated" / "report.json").write_text("{}")
    (tmp_path / "dr-ladder" / "drr-10").mkdir(parents=True)
    (tmp_path / "dr-ladder" / "drr-10" / "reinforce_summary.json").write_text("{}")
    rung = layout.path(layout.RUNG_SUMMARY, rung="drr-10")
    assert layout.on_disk(tmp_path, layout.CURATED_SUMMARY) == "curated/report.json"
    assert layout.on_disk(tmp_path, rung) == "dr-ladder/drr-10/reinforce_summary.json"
    assert layout.on_disk(tmp_path, layout.DR_SUMMARY) == layout.DR_SUMMARY  # nothing there: the shared name
    assert layout.on_disk(tmp_path, layout.TIMINGS) == layout.TIMINGS  # not a summary
    (tmp_path / rung).write_text("{}")
    assert layout.on_disk(tmp_path, rung) == rung
