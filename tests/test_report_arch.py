"""The ladder's tower (here the ViT) vs MCi on the same DR and real rungs, in qcap report and qcap science-report, on hand-made metrics files:
the MCi rows, their check against MCi random init, and the architecture comparison with its numbers."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import test_science_report as sci
from test_demo_report import make_demo, reported, run_report, table_rows, write_json

from demo.science import ScienceConfig, build

# per MCi backbone: (mIoU, RMSE) for seeds 0, 1, 2 — on MCi, DR is inside the noise of real on seg and clearly
# better on depth; on the ViT rows of test_demo_report it is the other way round (seg clear, depth a toss-up)
MCI = {
    "mci-random": ([0.10, 0.12, 0.08], [0.90, 0.91, 0.89]),
    "mci-datacomp-100": ([0.25, 0.27, 0.23], [0.60, 0.62, 0.58]),
    "mci-dr-100": ([0.26, 0.24, 0.28], [0.50, 0.52, 0.48]),
}


def add_mci(demo: Path, seeds=(0, 1, 2), det: dict[str, float] | None = None) -> Path:
    for backbone, (miou, rmse) in MCI.items():
        for seed in seeds:
            write_json(demo / f"finetune/{backbone}-s{seed}/seg/metrics.json", {"task": "seg", "metrics": {"mIoU": miou[seed]}})
            write_json(demo / f"finetune/{backbone}-s{seed}/depth/metrics.json", {"task": "depth", "metrics": {"rmse": rmse[seed]}})
            if det is not None:
                write_json(demo / f"finetune/{backbone}-s{seed}/det/metrics.json",
                           {"task": "det", "metrics": {"bbox_AP": det[backbone] + 0.01 * seed, "segm_AP": det[backbone] / 2}})
            if backbone != "mci-random":
                write_json(demo / f"clip/{backbone}-s{seed}/eval.json", {"zeroshot/top1": 0.3, "retrieval/image_to_text_R@1": 0.06,
                                                                         "retrieval/text_to_image_R@1": 0.05})
                write_json(demo / f"clip/{backbone}-s{seed}/config.json",
                           {"samples_seen": 6400, "total_steps": 100, "num_samples": 1000,
                            "config": {"caption_source": "dual" if "-dr-" in backbone else "real", "model": "qcap-tiny-mci"}})
    return demo


def spread(a: list[float], b: list[float]) -> float:
    """2 SE of the mean per-seed difference (both rows ran seeds 0, 1, 2: the comparison is paired)."""
    return 2 * statistics.stdev([x - y for x, y in zip(a, b, strict=True)]) / math.sqrt(len(a))


def test_report_shows_the_mci_rows_and_compares_the_towers_on_the_same_rungs(tmp_path):
    from test_demo_report import FINETUNE

    demo = add_mci(make_demo(tmp_path / "demo"))
    text, payload, rows = reported(demo)
    assert list(rows)[-3:] == ["MCi random init", "MCi real 100%", "MCi DR 100%"]
    for key, label in (("mci-random", "MCi random init"), ("mci-datacomp-100", "MCi real 100%"), ("mci-dr-100", "MCi DR 100%")):
        miou, rmse = MCI[key]
        assert rows[label][0] == f"{statistics.mean(miou):.3f} ± {statistics.stdev(miou):.3f}"
        assert rows[label][1] == f"{statistics.mean(rmse):.3f} ± {statistics.stdev(rmse):.3f}"
    assert rows["MCi DR 100%"][5:7] == ["0.400", "0.560"]  # it trained on dr-100's captions
    # MCi is checked against MCi random init, not the ViT's
    checks = {(c["row"], c["column"]): c for c in payload["pretraining_vs_random"]}
    assert checks[("MCi real 100%", "miou")]["comparison"]["b"] == "mci-random"
    assert checks[("real 100%", "miou")]["comparison"]["b"] == "random"

    arch = {(e["arch"], e["column"]): e for e in payload["architecture"]}
    assert set(arch) == {("main", "miou"), ("main", "rmse"), ("mci", "miou"), ("mci", "rmse")}
    expected = {
        ("main", "miou"): (FINETUNE["dr-100"][0], FINETUNE["datacomp-100"][0], 1, "yes, beyond 2 SE"),
        ("main", "rmse"): (FINETUNE["dr-100"][1], FINETUNE["datacomp-100"][1], -1, "no: inside the noise"),
        ("mci", "miou"): (MCI["mci-dr-100"][0], MCI["mci-datacomp-100"][0], 1, "no: inside the noise"),
        ("mci", "rmse"): (MCI["mci-dr-100"][1], MCI["mci-datacomp-100"][1], -1, "yes, beyond 2 SE"),
    }
    for where, (dr, real, sign, verdict) in expected.items():
        entry = arch[where]
        assert entry["dr_beats_real"] == verdict, where
        assert entry["comparison"]["better"] == pytest_approx(sign * (statistics.mean(dr) - statistics.mean(real)))
        assert entry["comparison"]["spread"] == pytest_approx(spread(dr, real))
        assert entry["cells"]["dr"]["mean"] == pytest_approx(statistics.mean(dr))
        assert entry["cells"]["real"]["sd"] == pytest_approx(statistics.stdev(real))
        assert entry["cells"]["dr"]["n"] == 3
    section = text.split("## Backbone architecture: the ladder's tower against the others", 1)[1].split("\n## ", 1)[0]
    mci_seg = arch[("mci", "miou")]
    assert (f"| MCi (qcap-tiny-mci) | segmentation (mIoU) | 0.100 ± 0.020 (n=3) | 0.250 ± 0.020 (n=3) | 0.260 ± 0.020 (n=3) "
            f"| {mci_seg['comparison']['better']:.3f} | {mci_seg['comparison']['spread']:.3f} | no: inside the noise |") in section
    assert "| the ladder's tower | segmentation (mIoU) |" in section  # its runs' config.json names no model and "yes, beyond 2 SE" in section
    assert payload["missing"] == []


def test_report_with_one_seed_gives_directions_and_a_missing_mci_random_is_an_empty_cell(tmp_path):
    demo = add_mci(make_demo(tmp_path / "demo", seeds=(0,)), seeds=(0,))
    for task in ("seg", "depth"):
        (demo / f"finetune/mci-random-s0/{task}/metrics.json").unlink()
    (demo / "finetune/mci-random-s0/seg").rmdir()
    (demo / "finetune/mci-random-s0/depth").rmdir()
    (demo / "finetune/mci-random-s0").rmdir()
    assert run_report([str(demo)]) == 0
    payload = json.loads((demo / "report.json").read_text())
    arch = {(e["arch"], e["column"]): e for e in payload["architecture"]}
    assert arch[("mci", "miou")]["dr_beats_real"] == "direction only (one seed): better"  # 0.26 vs 0.25
    assert arch[("mci", "miou")]["cells"]["random"]["n"] == 0
    assert "MCi random init" not in table_rows((demo / "report.md").read_text())
    # no MCi random init: the MCi rows have nothing to be checked against, and are not checked against the ViT's
    assert not [c for c in payload["pretraining_vs_random"] if c["row"].startswith("MCi")]


def test_science_report_compares_vit_and_mci_per_task_det_included(tmp_path):
    demo = sci.make_demo(tmp_path / "s", sci.GOOD_MIOU, sci.GOOD_RMSE)
    base = build(ScienceConfig(demo=demo))
    assert base["architecture"] == [] and "## 6. Backbone architecture" not in (demo / "science.md").read_text()
    assert not any("mci" in m for m in base["missing"])  # a folder without MCi runs does not ask for their files

    det = {"random": 0.05, "datacomp-100": 0.10, "dr-100": 0.12}
    for backbone, value in det.items():
        for seed, jitter in zip((0, 1, 2), sci.NOISE, strict=True):
            write_json(demo / f"finetune/{backbone}-s{seed}/det/metrics.json",
                       {"metrics": {"bbox_AP": value + jitter, "segm_AP": value / 2 + jitter}})
    add_mci(demo, det={"mci-random": 0.04, "mci-datacomp-100": 0.09, "mci-dr-100": 0.095})
    payload = build(ScienceConfig(demo=demo))
    text = (demo / "science.md").read_text()
    assert {r["key"] for r in payload["rows"]} >= {"mci-random", "mci-datacomp-100", "mci-dr-100"}
    sanity = {e["claim"]: e for e in payload["pretraining_vs_random"]}
    assert sanity["MCi DR 100% beats MCi random init on depth (RMSE)"]["verdict"] == "reproduced"
    arch = {(e["arch"], e["column"]): e for e in payload["architecture"]}
    assert set(arch) == {(a, c) for a in ("main", "mci") for c in ("miou", "rmse", "box_ap", "mask_ap")}
    # ViT: GOOD_MIOU's DR 0.25 vs real 0.20 with the same ±0.004 jitter on both: beyond the noise
    assert arch[("main", "miou")]["dr_beats_real"] == "yes, beyond 2 SE"
    assert arch[("main", "miou")]["comparison"]["better"] == pytest_approx(0.05)
    assert arch[("mci", "miou")]["dr_beats_real"] == "no: inside the noise"
    assert arch[("mci", "rmse")]["dr_beats_real"] == "yes, beyond 2 SE"
    # det: MCi DR 0.095 + 0.01 s vs real 0.09 + 0.01 s: each row's sd is 0.01, twice the difference, but the offset
    # is the seed's, shared by both rows, and the paired comparison takes it out: beyond the noise
    box = arch[("mci", "box_ap")]
    assert box["cells"]["dr"]["values"] == pytest_approx([0.095, 0.105, 0.115])
    assert box["comparison"]["better"] == pytest_approx(0.005) and box["comparison"]["paired"] is True
    assert abs(box["comparison"]["spread"]) < 1e-9 and box["dr_beats_real"] == "yes, beyond 2 SE"
    assert box["cells"]["dr"]["sources"][1] == {"file": "finetune/mci-dr-100-s1/det/metrics.json", "key": "metrics.bbox_AP",
                                                "value": box["cells"]["dr"]["values"][1], "seed": 1}
    assert arch[("main", "box_ap")]["dr_beats_real"] == "yes, beyond 2 SE"  # 0.12 vs 0.10, jitter 0.004
    section = text.split("## 6. Backbone architecture: the ladder's tower against the others", 1)[1].split("\n## ", 1)[0]
    assert "| MCi (qcap-tiny-mci) | detection (box AP) |" in section
    assert "- MCi (qcap-tiny-mci): DR beats real captions on segmentation (mIoU) at 100%: **no: inside the noise**." in section
    assert "inside the noise" in section and "beyond the noise" in section
    assert text.index("## 5. Attention distance") < text.index("## 6. Backbone architecture")


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-9, abs=1e-12)


def test_a_cnn_ladder_with_the_vit_beside_it_checks_mae_against_the_same_vit(tmp_path):
    """make science's layout: the ladder trains qcap-tiny-resnet10t, the ViT rows (vit-*) and MAE stand beside it;
    MAE is checked against the ViT's random init and compared with the ViT's DR row (the paper's same-ViT claim)."""
    vit_miou = {"vit-random": 0.09, "vit-datacomp-100": 0.11, "vit-dr-100": 0.13, "mae": 0.115}
    vit_rmse = {"vit-random": 0.72, "vit-datacomp-100": 0.70, "vit-dr-100": 0.69, "mae": 0.66}
    demo = sci.make_demo(tmp_path / "s", sci.GOOD_MIOU | vit_miou, sci.GOOD_RMSE | vit_rmse)
    for seed in (0, 1, 2):
        write_json(demo / f"clip/dr-100-s{seed}/config.json", {"config": {"model": "qcap-tiny-resnet10t"}})
    payload = build(ScienceConfig(demo=demo))
    text = (demo / "science.md").read_text()
    sanity = {e["claim"]: e for e in payload["pretraining_vs_random"]}
    assert sanity["MAE (real rung's images) beats ViT random init on segmentation (mIoU)"]["comparison"]["b"] == "vit-random"
    assert sanity["ViT DR 100% beats ViT random init on depth (RMSE)"]["comparison"]["b"] == "vit-random"
    assert sanity["DR 100% beats random init on depth (RMSE)"]["comparison"]["b"] == "random"
    mae = {e["claim"]: e for e in payload["mae"]}
    seg = mae["CLIP on ViT DR 100% beats MAE on segmentation (mIoU)"]
    assert (seg["comparison"]["a"], seg["comparison"]["b"]) == ("vit-dr-100", "mae")
    assert seg["comparison"]["better"] == pytest_approx(0.13 - 0.115) and seg["verdict"] == "reproduced"
    depth = mae["CLIP on ViT DR 100% beats MAE on depth (RMSE)"]
    assert depth["comparison"]["better"] == pytest_approx(0.66 - 0.69) and depth["verdict"] != "reproduced"
    arch = {(e["arch"], e["column"]): e for e in payload["architecture"]}
    assert set(arch) == {(a, c) for a in ("main", "vit") for c in ("miou", "rmse")}
    assert arch[("main", "miou")]["architecture"] == "ladder tower (qcap-tiny-resnet10t)"
    assert arch[("vit", "miou")]["rows"] == {"random": "vit-random", "real": "vit-datacomp-100", "dr": "vit-dr-100"}
    assert arch[("vit", "miou")]["comparison"]["better"] == pytest_approx(0.13 - 0.11)
    section = text.split("## 6. Backbone architecture: the ladder's tower against the others", 1)[1].split("\n## ", 1)[0]
    assert "| ladder tower (qcap-tiny-resnet10t) | segmentation (mIoU) |" in section
    assert "| ViT (qcap-tiny-clip) | depth (RMSE) |" in section


def test_rows_that_ran_the_same_seeds_are_compared_paired_by_seed():
    from demo.report import Cell, compare

    def cell(values, seeds=(0, 1, 2)):
        return Cell(values=list(values), sources=[{"file": f"f{s}", "key": "k", "value": v, "seed": s}
                                                  for s, v in zip(seeds, values, strict=True)])

    # a seed that is good for every row (finetune seed 1 here): unpaired, DR's +0.02 is inside the rows' spread;
    # paired, every seed has DR ahead by 0.015-0.025, beyond 2 SE of the mean per-seed difference
    dr, real = [0.18, 0.23, 0.20], [0.16, 0.21, 0.185]
    table = {"dr-100": {"miou": cell(dr)}, "datacomp-100": {"miou": cell(real)}}
    c = compare(table, "miou", "dr-100", "datacomp-100")
    diffs = [a - b for a, b in zip(dr, real, strict=True)]
    assert c.paired and c.n == 3 and c.better == pytest_approx(statistics.mean(diffs))
    assert c.spread == pytest_approx(2 * statistics.stdev(diffs) / math.sqrt(3)) and c.better > c.spread
    unpaired = 2 * math.sqrt(statistics.variance(dr) / 3 + statistics.variance(real) / 3)
    assert c.better < unpaired  # what the unpaired test would have said: inside the noise
    # lower is better on RMSE: the sign follows the column, the spread does not
    table = {"dr-100": {"rmse": cell([0.60, 0.55, 0.58])}, "datacomp-100": {"rmse": cell([0.62, 0.58, 0.59])}}
    c = compare(table, "rmse", "dr-100", "datacomp-100")
    assert c.paired and c.better == pytest_approx(0.02)
    # seeds that differ (a run missing): no pairs, the unpaired standard error
    table = {"dr-100": {"miou": cell(dr)}, "datacomp-100": {"miou": cell(real[:2], seeds=(0, 2))}}
    c = compare(table, "miou", "dr-100", "datacomp-100")
    assert not c.paired and c.spread == pytest_approx(
        2 * math.sqrt(statistics.variance(dr) / 3 + statistics.variance(real[:2]) / 2))
    # one seed: no spread at all
    table = {"dr-100": {"miou": cell([0.2], seeds=(0,))}, "datacomp-100": {"miou": cell([0.1], seeds=(0,))}}
    assert compare(table, "miou", "dr-100", "datacomp-100").spread is None
