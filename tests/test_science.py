"""make science at its smallest scale, for real: every stage of the science graph runs (controls, MAE,
attention per seed, the science report), and every number of the report equals its source file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from demo.science import HEADROOM_ROWS

ROOT = Path(__file__).parents[1]
SMALLEST = ["SCI_SCALE=0.05", "SCI_SEEDS=2", "SCI_FRACTIONS=1.0 0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _value(folder: Path, rel: str, key: str):
    node = json.loads((folder / rel).read_text())
    for part in key.split("."):
        node = node[part]
    return node


def check_science_folder(folder: Path) -> dict:
    """What the slow test asserts of a finished make science folder (also usable on a real run)."""
    payload = json.loads((folder / "science.json").read_text())
    text = (folder / "science.md").read_text()
    seeds = payload["seeds"]
    assert len(seeds) >= 2
    rows = {r["key"] for r in payload["rows"]}
    pcts = payload["fractions"]
    # the default graph: the CNN ladder, its controls at 100%, the ViT beside it and MAE (no MCi, DRR, det)
    expected = ({"random", "mae", "clean-100", "oracle-100", "shapes-100", "vit-random", "vit-datacomp-100", "vit-dr-100"}
                | {f"{k}-{p}" for p in pcts for k in ("datacomp", "dr")})
    assert rows == expected, rows ^ expected
    numbers = 0
    for key, cells in payload["table"].items():
        for column, cell in cells.items():
            assert cell["values"] == [s["value"] for s in cell["sources"]], (key, column)
            for source in cell["sources"]:
                assert _value(folder, source["file"], source["key"]) == source["value"], source
                numbers += 1
    for key in expected:
        for column in ("miou", "rmse"):
            assert payload["table"][key][column]["n"] == len(seeds), (key, column)
    # every comparison's means are the table's means
    assert payload["reinforced"] == []
    for group in ("pretraining_vs_random", "controls", "shapes_control", "claims", "mae"):
        assert payload[group], group
        for entry in payload[group]:
            c = entry["comparison"]
            assert c["a_mean"] == payload["table"][c["a"]][c["column"]]["mean"]
            assert c["b_mean"] == payload["table"][c["b"]][c["column"]]["mean"]
    # the ladder's tower (qcap-tiny-resnet10t) vs the ViT beside it: both dense tasks, each cell the table's
    arch = {(e["arch"], e["column"]) for e in payload["architecture"]}
    assert arch == {(a, c) for a in ("main", "vit") for c in ("miou", "rmse")}, arch
    assert {e["architecture"] for e in payload["architecture"]} == {"ladder tower (qcap-tiny-resnet10t)",
                                                                    "ViT (qcap-tiny-clip)"}
    # MAE is compared with CLIP on the same ViT
    assert {(e["comparison"]["a"], e["comparison"]["b"]) for e in payload["mae"]} == {("vit-dr-100", "mae")}
    for entry in payload["architecture"]:
        for role, key in entry["rows"].items():
            assert entry["cells"][role]["n"] == len(seeds), (entry["claim"], role)
            if entry["column"] in payload["table"][key]:  # seg and depth: the main table's cell (det: its own)
                assert entry["cells"][role]["mean"] == payload["table"][key][entry["column"]]["mean"]
            for source in entry["cells"][role]["sources"]:
                assert _value(folder, source["file"], source["key"]) == source["value"], source
    assert "## 6. Backbone architecture: the ladder's tower against the others" in text
    test = payload["attention_test"]
    assert test is not None and test["n_seeds"] == len(seeds)
    for entry in test["per_seed"]:
        pair = json.loads((folder / entry["source"]).read_text())["models"]
        assert entry["mean_per_block_dr"] == pytest.approx([sum(r) / len(r) for r in pair[0]["distance_px"]], rel=1e-12)
    assert payload["premise"]["holds"] is not None
    head = payload["depth_headroom"]  # qcap depth-floor's numbers, and the table's depth means between them
    assert head is not None and head["floor_m"] < head["position_m"] < head["constant_m"]
    for source in head["sources"].values():
        assert _value(folder, source["file"], source["key"]) == source["value"], source
    assert {r["key"]: r["rmse_mean"] for r in head["rows"]} == {
        k: payload["table"][k]["rmse"]["mean"] for k in HEADROOM_ROWS if k in payload["table"]}
    assert text.index("## 2. Positive control") < text.index("## 4. The paper's directions")
    assert (folder / "report.md").is_file()
    return {"numbers_checked": numbers, "world": payload["world"]}


def _dry_run(*args: str) -> str:
    run = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "QCAP_RUN": "dry"})
    assert run.returncode == 0, run.stderr
    return run.stdout


def _commands(dry: str, needle: str) -> list[str]:
    return [c for c in dry.replace("\\\n", " ").splitlines() if needle in c]


def test_science_graph_trains_a_cnn_ladder_with_controls_and_the_vit_mae_and_attention_beside_it(tmp_path):
    sci = _dry_run("science", f"SCI={tmp_path}/s", *SMALLEST)
    s = f"{tmp_path}/s"
    # the ladder and its controls: qcap-tiny-resnet10t at SCI_CLIP_BASE x SCI_SCALE = 76,800 x 0.05 samples seen
    ladder = [f"{k}-{p}" for p in ("100", "50") for k in ("datacomp", "dr")] + ["oracle-100", "shapes-100", "clean-100"]
    for seed in (0, 1):
        for rung in ladder:
            [cmd] = _commands(sci, f"--out {s}/clip/{rung}-s{seed} ")
            assert f"--model qcap-tiny-resnet10t --data {s}/dr-ladder/{rung} " in cmd and "--samples-seen 3840 " in cmd
        # the ViT beside it on the 100% rungs, and MAE of that ViT, at SCI_VIT_BASE x SCI_SCALE = 19,200 x 0.05
        for rung in ("datacomp-100", "dr-100"):
            [cmd] = _commands(sci, f"--out {s}/clip/vit-{rung}-s{seed} ")
            assert f"--model qcap-tiny-clip --data {s}/dr-ladder/{rung} " in cmd and "--samples-seen 960 " in cmd
        [mae] = _commands(sci, f"--out {s}/clip/mae-s{seed} ")
        assert f"qcap mae --data {s}/dr-ladder/datacomp-100 " in mae and "--samples-seen 960 " in mae
        for task, steps in (("seg", 40), ("depth", 10)):  # SCI_SEG_BASE 800, SCI_DEPTH_BASE 200, x 0.05
            assert (f"finetune {task} --random qcap-tiny-resnet10t --seed {seed} --data {s}/world/eval/{task} "
                    f"--out {s}/finetune/random-s{seed}/{task} --steps {steps} ") in sci
            assert (f"finetune {task} --random qcap-tiny-clip --seed {seed} --data {s}/world/eval/{task} "
                    f"--out {s}/finetune/vit-random-s{seed}/{task} --steps {steps} ") in sci
        # attention distance reads the ViT pair (the CNN has no attention heads)
        [attention] = _commands(sci, f"--out {s}/attention/s{seed}")
        assert f"--checkpoint {s}/clip/vit-dr-100-s{seed} " in attention and f"--compare {s}/clip/vit-datacomp-100-s{seed} " in attention
    [oracle] = _commands(sci, "control-rung --kind oracle")
    assert f"--kind oracle --shards {s}/dr-ladder/datacomp-100 " in oracle and "--num-captions 5" in oracle
    assert sci.count("control-rung --kind shapes") == 1 and f"--kind shapes --shards {s}/dr-ladder/datacomp-100 " in sci
    assert "control-rung --kind clean --like" in sci
    assert sci.count("qcap mae --data") == 2 and sci.count("attention-distance") == 3  # s0, s1 and the demo's
    # seeds x tasks x (random, mae, 2 x datacomp/dr, oracle/shapes/clean-100, vit-random, vit-datacomp-100, vit-dr-100)
    assert sci.count("qcap finetune ") == 2 * 2 * 12
    assert "mci" not in sci and "reinforce" not in sci and "finetune det" not in sci and "--det-samples" not in sci
    assert "science-report" in sci and "--fractions 100 50" in sci
    assert sci.count(f"qcap depth-floor --world {s}/world --out {s}/depth-floor") == 1
    [world] = _commands(sci, " world --out ")
    assert "--num-samples 600 --clean-samples 200 " in world  # SCI_POOL_BASE 12,000, SCI_CLEAN_BASE 4,000 x 0.05
    assert "--eval-samples 80 " in world  # SCI_EVAL_BASE 1,600 x 0.05
    assert world.rstrip().endswith("--colours red,yellow,blue --backgrounds grass,studio")  # SCI_WORLD_ARGS


def test_science_opt_ins_add_the_mci_tower_the_reinforced_rungs_and_detection(tmp_path):
    sci = _dry_run("science", f"SCI={tmp_path}/s", *SMALLEST, "SCI_MCI=1", "SCI_DRR=1", "SCI_DET=1")
    s = f"{tmp_path}/s"
    # the reinforced rungs: one teacher on the clean split, drr-P reinforced from dr-P at every fraction, trained with
    # the DR loss on the ladder's tower at its samples seen, finetuned on every task
    assert sci.count("qcap train --preset tiny --data " + f"{s}/world/clean --out {s}/teacher") == 1
    for pct in ("100", "50"):
        assert f"reinforce --shards {s}/dr-ladder/dr-{pct} --out {s}/dr-ladder/drr-{pct} --teachers {s}/teacher" in sci
        for seed in (0, 1):
            [cmd] = _commands(sci, f"--out {s}/clip/drr-{pct}-s{seed} ")
            assert f"--model qcap-tiny-resnet10t --data {s}/dr-ladder/drr-{pct} " in cmd
            assert "--distill-loss-weights 0.25 0.75" in cmd and "--samples-seen 3840 " in cmd
            for task in ("seg", "depth", "det"):
                assert f"--out {s}/finetune/drr-{pct}-s{seed}/{task} " in sci
    # the MCi tower: pretrained on dr-100 and datacomp-100 per seed, a random-init MCi, finetuned on every task;
    # no attention distance for it
    for seed in (0, 1):
        for rung in ("dr-100", "datacomp-100"):
            assert (f"--model qcap-tiny-mci --data {s}/dr-ladder/{rung} \\\n  --out {s}/clip/mci-{rung}-s{seed} "
                    f"--caption-source {'dual' if rung.startswith('dr') else 'real'}") in sci
        for task in ("seg", "depth", "det"):
            assert f"finetune {task} --random qcap-tiny-mci --seed {seed} --data {s}/world/eval/{task} --out {s}/finetune/mci-random-s{seed}/{task} " in sci
            for rung in ("dr-100", "datacomp-100"):
                assert f"finetune {task} --checkpoint {s}/clip/mci-{rung}-s{seed} --seed {seed}" in sci
    assert "mci" not in "".join(line for line in sci.splitlines() if "attention-distance" in line)
    # seeds x tasks x (the default 12, 2 x drr, mci-random, mci-dr-100, mci-datacomp-100)
    assert sci.count("qcap finetune ") == 2 * 3 * 17
    assert sci.count("qcap finetune det ") == 2 * 17 and "--det-samples" in sci


def test_science_with_the_vit_ladder_needs_no_vit_beside_it_and_the_demo_stays_as_it_was(tmp_path):
    sci = _dry_run("science", f"SCI={tmp_path}/s", *SMALLEST, "SCI_MODEL=qcap-tiny-clip")
    s = f"{tmp_path}/s"
    assert "vit-" not in sci and f"--model qcap-tiny-clip --data {s}/dr-ladder/dr-50 " in sci
    [attention] = _commands(sci, f"--out {s}/attention/s1")
    assert f"--checkpoint {s}/clip/dr-100-s1 " in attention and f"--compare {s}/clip/datacomp-100-s1 " in attention
    assert sci.count("qcap finetune ") == 2 * 2 * 9
    [mae] = _commands(sci, f"--out {s}/clip/mae-s0 ")
    assert "--samples-seen 3840 " in mae  # MAE at the ViT ladder's own samples seen, not SCI_VIT_BASE's
    demo = _dry_run("demo", f"DEMO={tmp_path}/d")
    assert "control-rung" not in demo and "qcap mae" not in demo and "science-report" not in demo
    assert "depth-floor" not in demo
    [world] = _commands(demo, " world --out ")
    assert "--colours" not in world and "--backgrounds" not in world  # the demo's world keeps every colour
    assert "finetune det" not in demo and "--det-samples" not in demo
    assert demo.count("qcap finetune ") == 2 * 6  # random + 4 rungs + drr-100, seg and depth, one seed
    assert demo.count(" --steps 50 ") == 2 * 6  # FT_BASE: every task
    d = f"{tmp_path}/d"
    # the demo's reinforced rung: drr-100 only, at the other rungs' samples seen; no MCi, no ViT beside the ladder
    assert demo.count("qcap reinforce ") == 1 and f"--shards {d}/dr-ladder/dr-100 --out {d}/dr-ladder/drr-100" in demo
    assert f"--out {d}/teacher" in demo and f"--out {d}/clip/drr-100-s0 --distill-loss-weights 0.25 0.75" in demo
    assert "drr-10-" not in demo and "drr-10 " not in demo
    commands = [c for c in demo.replace("\\\n", " ").splitlines() if " train --preset tiny " in c and f"{d}/clip/" in c]
    assert len(commands) == 5 and any("/clip/drr-100-s0" in c for c in commands)
    assert all("--model qcap-tiny-clip " in c for c in commands)
    assert {c.split("--samples-seen ")[1].split()[0] for c in commands} == {"9600"}  # the demo's CLIP base: every rung, drr-100 too
    assert "mci" not in demo and "vit-" not in demo
    assert "--num-samples 3000 --clean-samples 1000 " in demo


@pytest.mark.slow
def test_make_science_smallest_scale(tmp_path):
    folder = tmp_path / "science"
    cmd = ["make", "--no-print-directory", "science", f"SCI={folder}", f"PORT={_free_port()}", *SMALLEST]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = check_science_folder(folder)
    assert result["numbers_checked"] > 50
