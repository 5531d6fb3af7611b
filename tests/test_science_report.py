"""demo.science: controls before verdicts, the oracle guard, the MAE row, the attention test — on hand-made files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from demo.science import CONTROL_FAILED, CONTROL_UNKNOWN, ScienceConfig, build

QCAP = str(Path(sys.executable).parent / "qcap")

ROOT = Path(__file__).parents[1]
NOISE = (-0.004, 0.0, 0.004)  # per-seed jitter: sd 0.004; 2 SE of a paired 3-seed difference ~0.008


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_demo(root: Path, miou: dict[str, float], rmse: dict[str, float], seeds=(0, 1, 2), f1=(0.5, 0.7),
              attention: bool = True) -> Path:
    for i, seed in enumerate(seeds):
        for k, backbone in enumerate(miou):
            jitter = NOISE[(i + k) % 3]  # each row its own noise over seeds: paired differences keep a spread
            _write(root / f"finetune/{backbone}-s{seed}/seg/metrics.json", {"metrics": {"mIoU": miou[backbone] + jitter}})
            _write(root / f"finetune/{backbone}-s{seed}/depth/metrics.json", {"metrics": {"rmse": rmse[backbone] - jitter}})
            if backbone not in ("random", "mae"):
                _write(root / f"clip/{backbone}-s{seed}/eval.json", {"zeroshot/top1": 0.2, "retrieval/image_to_text_R@1": 0.1,
                                                                     "retrieval/text_to_image_R@1": 0.1})
        if attention:
            dr = [[10, 11, 12, 13], [10, 11, 12, 13], [14, 15, 16, 17], [14, 15, 16, 17]]
            real = [[10, 11, 12, 13], [10, 11, 12, 13], [16 + i, 17 + i, 18 + i, 19 + i], [16, 17, 18, 19]]
            _write(root / f"attention/s{seed}/attention_distance.json",
                   {"models": [{"label": "DR", "distance_px": dr}, {"label": "real", "distance_px": real}]})
    _write(root / "scores/dr-100/summary.json", {"by_field": {"text": {"score": f1[0]}, "syn_text": {"score": f1[1]}}})
    return root


GOOD_MIOU = {"random": 0.10, "mae": 0.15, "datacomp-100": 0.20, "datacomp-10": 0.16, "dr-100": 0.25, "dr-10": 0.21,
             "oracle-100": 0.30, "clean-100": 0.27}
GOOD_RMSE = {"random": 0.70, "mae": 0.65, "datacomp-100": 0.60, "datacomp-10": 0.64, "dr-100": 0.55, "dr-10": 0.59,
             "oracle-100": 0.50, "clean-100": 0.53}


def test_everything_reproduced_when_the_controls_pass(tmp_path):
    demo = make_demo(tmp_path / "s", GOOD_MIOU, GOOD_RMSE)
    payload = build(ScienceConfig(demo=demo))
    assert payload["world"]["can_show_effect"] is True
    assert all(e["verdict"] == "reproduced" for e in payload["pretraining_vs_random"])
    assert len(payload["pretraining_vs_random"]) == 2 * 7  # every pretrained row, both tasks
    verdicts = {e["claim"]: e["verdict"] for e in payload["claims"] + payload["mae"]}
    assert verdicts["DR beats real captions on segmentation (mIoU) at 100%"] == "reproduced"
    assert verdicts["DR beats real captions on depth (RMSE) at 10%"] == "reproduced"
    assert verdicts["DR at 10% matches real captions at 100% on segmentation (mIoU)"] == "reproduced"
    assert verdicts["CLIP on DR 100% beats MAE on depth (RMSE)"] == "reproduced"
    assert payload["premise"]["holds"] is True
    assert payload["attention_test"]["verdict"].startswith(("supported", "locality supported"))
    # every number of the table is the number in its source file
    for cells in payload["table"].values():
        for cell in cells.values():
            for source in cell["sources"]:
                node = json.loads((demo / source["file"]).read_text())
                for part in source["key"].split("."):
                    node = node[part]
                assert node == source["value"]
            assert cell["values"] == [s["value"] for s in cell["sources"]]


def test_oracle_that_does_not_beat_real_makes_every_dr_verdict_uninformative(tmp_path):
    miou = GOOD_MIOU | {"oracle-100": 0.201}  # the perfect captioner is no better than the web's text
    demo = make_demo(tmp_path / "s", miou, GOOD_RMSE)
    payload = build(ScienceConfig(demo=demo))
    assert payload["world"]["can_show_effect"] is False
    assert "segmentation" in payload["world"]["why"] and "inconclusive" in payload["world"]["why"]
    for claim in payload["claims"]:
        assert claim["verdict"].startswith(CONTROL_FAILED), claim
    assert payload["claims"][0]["verdict"].endswith("(measured: reproduced)")
    text = (demo / "science.md").read_text()
    guard = text.index("**No — the DR verdicts below are uninformative**")
    assert guard < text.index("## 4. The paper's directions") < text.index("DR beats real captions")


def test_backbone_no_better_than_random_is_flagged_and_makes_data_efficiency_vacuous(tmp_path):
    miou = GOOD_MIOU | {"datacomp-100": 0.101, "datacomp-10": 0.10, "dr-10": 0.102, "oracle-100": 0.3}
    demo = make_demo(tmp_path / "s", miou, GOOD_RMSE)
    payload = build(ScienceConfig(demo=demo))
    bad = [e for e in payload["pretraining_vs_random"] if e["verdict"] != "reproduced"]
    assert {e["claim"] for e in bad} >= {"real 100% beats random init on segmentation (mIoU)"}
    eff = next(e for e in payload["claims"] if e["claim"] == "DR at 10% matches real captions at 100% on segmentation (mIoU)")
    assert eff["verdict"].startswith("vacuous")


def test_dev_seeds_are_left_out_and_one_seed_lists_what_it_cannot_give(tmp_path):
    demo = make_demo(tmp_path / "s", GOOD_MIOU, GOOD_RMSE, seeds=(0, 1, 2, 3))
    payload = build(ScienceConfig(demo=demo, dev_seeds=[0, 1, 2]))
    assert payload["seeds"] == [3] and payload["seeds_found"] == [0, 1, 2, 3]
    assert payload["table"]["dr-100"]["miou"]["n"] == 1
    assert "DR beats real captions on segmentation (mIoU) at 100%" in payload["one_seed_cannot_give"]
    assert payload["world"]["can_show_effect"] is None  # one seed cannot pass the control at 2 SE
    assert all(c["verdict"].startswith(CONTROL_UNKNOWN) for c in payload["claims"])
    assert payload["attention_test"]["verdict"].startswith("untestable")
    assert "One seed: no verdict at 2 SE can be given" in (demo / "science.md").read_text()


def test_missing_rows_and_bad_input(tmp_path):
    demo = make_demo(tmp_path / "s", {"random": 0.1, "datacomp-100": 0.2, "dr-100": 0.25},
                     {"random": 0.7, "datacomp-100": 0.6, "dr-100": 0.55}, attention=False)
    payload = build(ScienceConfig(demo=demo, fractions=[100]))
    assert payload["world"]["can_show_effect"] is None and "no oracle-100 rung" in payload["world"]["why"]
    assert all(c["verdict"].startswith("uninformative: no oracle control was measured") for c in payload["claims"])
    assert payload["mae"] == [] and payload["attention_test"] is None
    with pytest.raises(ValueError, match="must include 100"):
        ScienceConfig(demo=demo, fractions=[10])
    run = subprocess.run([QCAP, "science-report", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "not a folder" in run.stderr and "Traceback" not in run.stderr


def test_depth_headroom_places_each_backbone_between_the_floor_and_position_only(tmp_path):
    demo = make_demo(tmp_path / "s", GOOD_MIOU, GOOD_RMSE)
    payload = build(ScienceConfig(demo=demo))
    assert payload["depth_headroom"] is None and "depth-floor/depth_floor.json" in payload["missing"]
    assert "Depth headroom: not measured" in (demo / "science.md").read_text()
    preds = {"floor": {"rmse": 0.45}, "position": {"rmse": 0.75}, "constant": {"rmse": 1.5}}
    _write(demo / "depth-floor/depth_floor.json", {"predictions": preds})
    payload = build(ScienceConfig(demo=demo))
    head = payload["depth_headroom"]
    assert (head["floor_m"], head["position_m"], head["constant_m"]) == (0.45, 0.75, 1.5)
    assert head["headroom_m"] == pytest.approx(0.30)
    by_key = {r["key"]: r for r in head["rows"]}
    # the table's 3-seed mean RMSE of each row (its jitter averages out): random 0.70 closes 1/6, oracle 0.50 5/6
    assert by_key["random"]["rmse_mean"] == payload["table"]["random"]["rmse"]["mean"]
    assert by_key["random"]["headroom_closed"] == pytest.approx(0.05 / 0.30)
    assert by_key["oracle-100"]["headroom_closed"] == pytest.approx(0.25 / 0.30)
    assert by_key["dr-100"]["above_floor_m"] == pytest.approx(0.10)
    assert "drr-100" not in by_key  # a row with no runs is left out
    text = (demo / "science.md").read_text()
    assert "no model can go below RMSE 0.450 m" in text and "- oracle 100%: 0.500 m, +0.050 m above the floor, 83% closed" in text
    for name, source in head["sources"].items():
        assert source == {"file": "depth-floor/depth_floor.json", "key": f"predictions.{name}.rmse", "value": preds[name]["rmse"]}


def test_the_shapes_control_is_reported_beside_the_oracle_and_does_not_decide_the_guard(tmp_path):
    # the perfect captioner does not help, captions naming only the shapes do (seg), and not on depth
    miou = GOOD_MIOU | {"oracle-100": 0.201, "shapes-100": 0.26}
    rmse = GOOD_RMSE | {"shapes-100": 0.601}
    demo = make_demo(tmp_path / "s", miou, rmse)
    payload = build(ScienceConfig(demo=demo))
    assert payload["world"]["can_show_effect"] is False  # the guard reads the oracle alone
    shapes = {e["claim"]: e for e in payload["shapes_control"]}
    seg = shapes["shape-only captions beat real captions on segmentation (mIoU) at 100% (same images)"]
    assert seg["verdict"] == "reproduced" and (seg["comparison"]["a"], seg["comparison"]["b"]) == ("shapes-100", "datacomp-100")
    assert seg["comparison"]["better"] == pytest.approx(0.26 - 0.20)
    assert shapes["shape-only captions beat real captions on depth (RMSE) at 100% (same images)"]["verdict"] != "reproduced"
    text = (demo / "science.md").read_text()
    section = text.split("## 2. Positive control", 1)[1].split("## 3.", 1)[0]
    assert "a caption-content control that does not decide the guard" in section
    assert "- shape-only captions beat real captions on segmentation (mIoU) at 100% (same images): **reproduced**" in section
    # without a shapes rung there is no such entry, and nothing is asked of its files
    plain = build(ScienceConfig(demo=make_demo(tmp_path / "p", GOOD_MIOU, GOOD_RMSE)))
    assert plain["shapes_control"] == [] and not any("shapes" in m for m in plain["missing"])
