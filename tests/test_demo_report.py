"""qcap report on small hand-made metrics files: the table, the verdicts, the sources, the timings."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from conftest import make_jpeg, make_uid

from base.shards import Sample, ShardWriter, finalize_folder
from demo.report import ROW_BY_KEY, ROWS, read_timings, stage_timings

RUNGS = ("datacomp-10", "datacomp-100", "dr-10", "dr-100")
# per backbone: (mIoU, RMSE) for seeds 0, 1, 2 — DR clearly better on seg at 100%, depth a toss-up
FINETUNE = {
    "random": ([0.10, 0.11, 0.09], [0.90, 0.92, 0.88]),
    "datacomp-10": ([0.20, 0.21, 0.19], [0.80, 0.70, 0.90]),
    "datacomp-100": ([0.30, 0.31, 0.29], [0.70, 0.60, 0.80]),
    "dr-10": ([0.32, 0.31, 0.33], [0.75, 0.55, 0.95]),
    "dr-100": ([0.40, 0.41, 0.39], [0.71, 0.50, 0.89]),
}
EVAL = {"zeroshot/top1": 0.25, "retrieval/image_to_text_R@1": 0.05, "retrieval/text_to_image_R@1": 0.04}
SCORES = {"datacomp-10": {"text": 0.41}, "datacomp-100": {"text": 0.40},
          "dr-10": {"text": 0.41, "syn_text": 0.55}, "dr-100": {"text": 0.40, "syn_text": 0.56}}
TIMINGS = [
    ("r1", "world", "2026-01-01T00:00:00Z", "20.5", "0", "0.50", "1.20", "qcap world --out W"),
    ("r1", "download", "2026-01-01T00:00:21Z", "40.0", "130", "1.20", "1.90", "qcap download"),  # interrupted
    ("r2", "download", "2026-01-01T00:05:00Z", "35.5", "0", "0.30", "1.70", "qcap download"),
    ("r2", "pretrain", "2026-01-01T00:06:00Z", "50.0", "0", "1.70", "1.10", "qcap train a"),
    ("r2", "pretrain", "2026-01-01T00:07:00Z", "52.0", "0", "1.10", "1.00", "qcap train b"),
]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_demo(root: Path, seeds=(0, 1, 2), *, skip: tuple[str, ...] = ()) -> Path:
    for seed in seeds:
        for backbone, (miou, rmse) in FINETUNE.items():
            for task, metrics in (("seg", {"mIoU": miou[seed], "mAcc": 0.5}), ("depth", {"rmse": rmse[seed]})):
                rel = f"finetune/{backbone}-s{seed}/{task}/metrics.json"
                if rel not in skip:
                    write_json(root / rel, {"task": task, "metrics": metrics})
        for rung in RUNGS:
            write_json(root / f"clip/{rung}-s{seed}/eval.json", {k: v + 0.01 * seed for k, v in EVAL.items()})
            write_json(root / f"clip/{rung}-s{seed}/config.json",
                       {"samples_seen": 6400, "total_steps": 100, "num_samples": 1000 if rung.endswith("100") else 100,
                        "config": {"caption_source": "dual" if rung.startswith("dr") else "real"}})
    for rung, fields in SCORES.items():
        write_json(root / f"scores/{rung}/summary.json",
                   {"by_field": {f: {"score": v, "share_hallucinating": 0.3} for f, v in fields.items()}})
    (root / "timings.tsv").write_text("".join("\t".join(row) + "\n" for row in TIMINGS))
    return root


def run_report(argv: list[str]) -> int:
    from base.cli import run_guarded
    from demo.report import main

    return run_guarded(main, argv, "qcap report")


def reported(demo: Path) -> tuple[str, dict, dict[str, list[str]]]:
    """``qcap report DEMO`` run (exit 0), then its report.md, report.json and Result table rows."""
    assert run_report([str(demo)]) == 0
    text = (demo / "report.md").read_text()
    return text, json.loads((demo / "report.json").read_text()), table_rows(text)


def table_rows(text: str) -> dict[str, list[str]]:
    """The Result table's cells by row label."""
    section = text.split("## Result", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in {row.label for row in ROW_BY_KEY.values()}:
            rows[cells[0]] = cells[1:]
    return rows


def test_report_table_verdicts_and_sources(tmp_path):
    demo = make_demo(tmp_path / "demo")
    assert run_report([str(demo)]) == 0
    text = (demo / "report.md").read_text()
    payload = json.loads((demo / "report.json").read_text())
    rows = table_rows(text)
    assert set(rows) == {row.label for row in ROWS}

    # every mIoU / RMSE cell is mean ± sample sd of the hand-made files, computed here independently
    for row in ROWS:
        miou, rmse = FINETUNE[row.key]
        assert rows[row.label][0] == f"{statistics.mean(miou):.3f} ± {statistics.stdev(miou):.3f}"
        assert rows[row.label][1] == f"{statistics.mean(rmse):.3f} ± {statistics.stdev(rmse):.3f}"
        sources = payload["table"][row.key]["miou"]["sources"]
        assert [s["file"] for s in sources] == [f"finetune/{row.key}-s{s}/seg/metrics.json" for s in (0, 1, 2)]
        assert [s["value"] for s in sources] == miou and all(s["key"] == "metrics.mIoU" for s in sources)
    # zero-shot and retrieval: pretrained rows only; random init is not evaluated
    assert rows["random init"][2:5] == ["—", "—", "—"]
    top1 = [EVAL["zeroshot/top1"] + 0.01 * s for s in (0, 1, 2)]
    assert rows["DR 10%"][2] == f"{statistics.mean(top1):.3f} ± {statistics.stdev(top1):.3f}"
    # caption F1: real everywhere, synthetic only for DR rows, one file per rung (no seed spread)
    assert rows["real 100%"][5:7] == ["0.400", "—"]
    assert rows["DR 100%"][5:7] == ["0.400", "0.560"]
    assert payload["table"]["dr-100"]["f1_syn"]["sources"] == [
        {"file": "scores/dr-100/summary.json", "key": "by_field.syn_text.score", "value": 0.56}]

    claims = {c["claim"]: c for c in payload["claims"]}
    seg100 = claims["DR beats real captions on segmentation (mIoU) at 100% of the data"]
    assert seg100["verdict"] == "reproduced"
    assert seg100["comparison"]["better"] == pytest.approx(0.10)
    assert "inconclusive" in claims["DR beats real captions on depth (RMSE) at 100% of the data"]["verdict"]
    # DR 10% (0.32) against real 100% (0.30) on seg: at least as good
    assert claims["DR at 10% matches real captions at 100% on segmentation (mIoU)"]["verdict"] == "reproduced"
    for claim in payload["claims"]:
        assert f"**{claim['claim']}: {claim['verdict']}.**" in text
    assert "The premise — synthetic captions describe the images better than the web's — holds here" in text

    # timings: interrupted commands are left out, resumed ones counted; load range per stage
    stages = {s["stage"]: s for s in payload["timings"]["stages"]}
    assert stages["download"]["seconds"] == 35.5 and stages["download"]["commands"] == 1
    assert stages["pretrain"] == {"stage": "pretrain", "seconds": 102.0, "commands": 2, "runs": 1,
                                  "load_min": 1.0, "load_max": 1.7}
    assert payload["timings"]["total_seconds"] == 158.0
    assert "| pretrain | 2 | 102.0 | 1.00–1.70 | 1 |" in text
    assert (demo / "report" / "data_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["missing"] == []
    # no reinforced or MCi runs in the folder: none of their rows, files or sections
    assert [r["key"] for r in payload["rows"]] == [row.key for row in ROWS]
    assert payload["reinforced"] == [] and payload["architecture"] == []
    assert "distillation" not in text and "MCi" not in text


def test_one_seed_gives_directions_only_never_a_verdict(tmp_path):
    demo = make_demo(tmp_path / "demo", seeds=(0,))
    assert run_report([str(demo), "--out", str(tmp_path / "out" / "r.md")]) == 0
    payload = json.loads((tmp_path / "out" / "report.json").read_text())
    claims = {c["claim"]: c["verdict"] for c in payload["claims"]}
    assert claims["DR beats real captions on segmentation (mIoU) at 100% of the data"] == (
        "direction only (one seed): as claimed")
    # seed 0 depth at 10%: DR 0.75 vs real 0.80 -> DR better; at 100%: DR 0.71 vs real 0.70 -> worse
    assert claims["DR beats real captions on depth (RMSE) at 100% of the data"] == "direction only (one seed): the opposite"
    assert claims["DR at 10% matches real captions at 100% on depth (RMSE)"] == "direction only (one seed): the opposite"
    assert not any(v.startswith(("reproduced", "not reproduced", "holds")) for v in claims.values())
    text = (tmp_path / "out" / "r.md").read_text()
    assert "one seed gives no spread" in text
    assert table_rows(text)["DR 100%"][0] == "0.400"  # no ± with one seed


def test_missing_files_leave_empty_cells_and_are_listed(tmp_path):
    demo = make_demo(tmp_path / "demo", seeds=(0,), skip=("finetune/dr-10-s0/seg/metrics.json",))
    assert run_report([str(demo)]) == 0
    text = (demo / "report.md").read_text()
    assert table_rows(text)["DR 10%"][0] == "—"
    assert "- `finetune/dr-10-s0/seg/metrics.json`" in text.split("## Missing", 1)[1]
    payload = json.loads((demo / "report.json").read_text())
    assert {c["claim"]: c["verdict"] for c in payload["claims"]}[
        "DR at 10% matches real captions at 100% on segmentation (mIoU)"] == "not measured"


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert run_report([str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    demo = make_demo(tmp_path / "demo", seeds=(0,))
    (demo / "timings.tsv").write_text("r1\tworld\t20.5\n")
    assert run_report([str(demo)]) == 2
    assert re.search(r"timings\.tsv:1: expected 8 tab-separated fields", capsys.readouterr().err)
    (demo / "timings.tsv").unlink()
    (demo / "clip" / "dr-10-s0" / "eval.json").write_text("{not json")
    assert run_report([str(demo)]) == 2
    assert "eval.json: not valid JSON" in capsys.readouterr().err


def test_caption_grid_from_a_dr_folder(tmp_path):
    demo = make_demo(tmp_path / "demo", seeds=(0,))
    folder = demo / "dr-ladder" / "dr-100"
    with ShardWriter(folder, 0) as writer:
        for i in range(3):
            writer.write(Sample(key=f"0000000{i}", uid=make_uid(i), image=make_jpeg(48, 32, seed=i), text=f"web text {i}",
                                syn_text=[f"a red cube number {i}", f"a blue ball {i}"]))
    finalize_folder(folder)
    assert run_report([str(demo), "--grid-samples", "2"]) == 0
    payload = json.loads((demo / "report.json").read_text())
    assert (demo / "report" / "caption_samples.png").read_bytes()[:4] == b"\x89PNG"
    assert "caption_samples" in payload["figures"]
    assert "![real vs synthetic captions](report/caption_samples.png)" in (demo / "report.md").read_text()


def test_timings_file_round_trip(tmp_path):
    path = tmp_path / "timings.tsv"
    path.write_text("".join("\t".join(row) + "\n" for row in TIMINGS))
    rows = read_timings(path)
    assert [r["exit"] for r in rows] == [0, 130, 0, 0, 0]
    assert [s["stage"] for s in stage_timings(rows)] == ["world", "download", "pretrain"]


def test_a_match_with_a_backbone_no_better_than_random_is_vacuous(tmp_path):
    demo = make_demo(tmp_path / "demo")
    for seed, miou in enumerate([0.30, 0.12, 0.08]):  # real 100% no longer clearly beats random init on seg
        write_json(demo / f"finetune/datacomp-100-s{seed}/seg/metrics.json", {"task": "seg", "metrics": {"mIoU": miou}})
    assert run_report([str(demo)]) == 0
    claims = {c["claim"]: c["verdict"] for c in json.loads((demo / "report.json").read_text())["claims"]}
    assert claims["DR at 10% matches real captions at 100% on segmentation (mIoU)"] == (
        "vacuous (real 100% does not clearly beat random init on segmentation (mIoU): "
        "inconclusive (within the seed spread))")
    assert claims["DR at 10% matches real captions at 100% on depth (RMSE)"].startswith("reproduced")


# DR + distillation 100% (drr-100): seg clearly better than DR 100% (0.40 ± 0.01), depth a toss-up
DRR = ([0.45, 0.46, 0.44], [0.72, 0.49, 0.90])


def add_drr(demo: Path, seeds=(0, 1, 2)) -> Path:
    miou, rmse = DRR
    for seed in seeds:
        write_json(demo / f"finetune/drr-100-s{seed}/seg/metrics.json", {"task": "seg", "metrics": {"mIoU": miou[seed]}})
        write_json(demo / f"finetune/drr-100-s{seed}/depth/metrics.json", {"task": "depth", "metrics": {"rmse": rmse[seed]}})
        write_json(demo / f"clip/drr-100-s{seed}/eval.json", {k: v + 0.02 + 0.01 * seed for k, v in EVAL.items()})
        write_json(demo / f"clip/drr-100-s{seed}/config.json",
                   {"samples_seen": 6400, "total_steps": 100, "num_samples": 1000, "task": "clip-dr",
                    "config": {"caption_source": "dual", "model": "qcap-tiny-clip", "distill_loss_weights": [0.25, 0.75]}})
    return demo


def test_the_reinforced_rung_is_a_row_beside_dr_with_its_columns_and_its_comparison(tmp_path):
    demo = add_drr(make_demo(tmp_path / "demo"))
    text, payload, rows = reported(demo)
    assert list(rows) == [row.label for row in ROWS] + ["DR + distillation 100%"]  # after the DR rows
    miou, rmse = DRR
    cells = rows["DR + distillation 100%"]
    assert cells[0] == f"{statistics.mean(miou):.3f} ± {statistics.stdev(miou):.3f}"
    assert cells[1] == f"{statistics.mean(rmse):.3f} ± {statistics.stdev(rmse):.3f}"
    top1 = [EVAL["zeroshot/top1"] + 0.02 + 0.01 * s for s in (0, 1, 2)]
    assert cells[2] == f"{statistics.mean(top1):.3f} ± {statistics.stdev(top1):.3f}"
    # it trained on dr-100's captions: their scores, from dr-100's file
    assert cells[5:7] == ["0.400", "0.560"]
    assert payload["table"]["drr-100"]["f1_syn"]["sources"] == [
        {"file": "scores/dr-100/summary.json", "key": "by_field.syn_text.score", "value": 0.56}]
    claims = {e["claim"]: e for e in payload["reinforced"]}
    seg = claims["DR + distillation beats DR (captions only) on segmentation (mIoU) at 100%"]
    assert seg["verdict"] == "reproduced" and seg["comparison"]["b"] == "dr-100"
    assert seg["comparison"]["better"] == pytest.approx(statistics.mean(miou) - statistics.mean(FINETUNE["dr-100"][0]))
    assert claims["DR + distillation beats DR (captions only) on depth (RMSE) at 100%"]["verdict"].startswith("inconclusive")
    assert "## Does distillation add to the synthetic captions?" in text
    assert f"**{seg['claim']}: reproduced.** DR + distillation 100% 0.450 vs DR 100% 0.400" in text
    assert {"row": "DR + distillation 100%", "column": "miou"} in [{"row": c["row"], "column": c["column"]}
                                                                    for c in payload["pretraining_vs_random"]]
    training = {t["row"]: t for t in payload["training"]}
    assert training["DR + distillation 100%"]["distill_loss_weights"] == [0.25, 0.75]
    assert "| DR + distillation 100% | qcap-tiny-clip | dual | DR loss, weights 0.25 / 0.75 | 1000 | 6400 |" in text
    assert len(payload["claims"]) == 6  # the paper's verdicts are unchanged
    assert payload["missing"] == []
