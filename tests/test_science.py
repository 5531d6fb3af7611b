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
    expected = ({"random", "mae", "clean-100", "mci-random", "mci-datacomp-100", "mci-dr-100"}
                | {f"{k}-{p}" for p in pcts for k in ("datacomp", "dr", "drr", "oracle")})
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
    for group in ("pretraining_vs_random", "controls", "claims", "mae", "reinforced"):
        assert payload[group], group
        for entry in payload[group]:
            c = entry["comparison"]
            assert c["a_mean"] == payload["table"][c["a"]][c["column"]]["mean"]
            assert c["b_mean"] == payload["table"][c["b"]][c["column"]]["mean"]
    # ViT vs MCi: every dense task (det included) for both towers, each cell the table's
    arch = {(e["arch"], e["column"]) for e in payload["architecture"]}
    assert arch == {(a, c) for a in ("vit", "mci") for c in ("miou", "rmse", "box_ap", "mask_ap")}, arch
    for entry in payload["architecture"]:
        for role, key in entry["rows"].items():
            assert entry["cells"][role]["n"] == len(seeds), (entry["claim"], role)
            if entry["column"] in payload["table"][key]:  # seg and depth: the main table's cell (det: its own)
                assert entry["cells"][role]["mean"] == payload["table"][key][entry["column"]]["mean"]
            for source in entry["cells"][role]["sources"]:
                assert _value(folder, source["file"], source["key"]) == source["value"], source
    assert "## 6. Backbone architecture: ViT vs MCi" in text
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


def test_science_graph_adds_controls_mae_and_attention_per_seed_and_demo_stays_as_it_was(tmp_path):
    sci = _dry_run("science", f"SCI={tmp_path}/s", *SMALLEST)
    s = f"{tmp_path}/s"
    # the reinforced rungs: one teacher on the clean split, drr-P reinforced from dr-P at every fraction, trained with
    # the DR loss at the demo's samples seen, finetuned on every task
    assert sci.count("qcap train --preset tiny --data " + f"{s}/world/clean --out {s}/teacher") == 1
    for pct in ("100", "50"):
        assert f"reinforce --shards {s}/dr-ladder/dr-{pct} --out {s}/dr-ladder/drr-{pct} --teachers {s}/teacher" in sci
        for seed in (0, 1):
            assert (f"--data {s}/dr-ladder/drr-{pct} \\\n  --out {s}/clip/drr-{pct}-s{seed} "
                    "--distill-loss-weights 0.25 0.75") in sci
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
    assert "qcap mae --data" in sci and "mci" not in "".join(line for line in sci.splitlines() if "attention-distance" in line)
    for pct in ("100", "50"):
        assert f"control-rung --kind oracle --shards {tmp_path}/s/dr-ladder/datacomp-{pct}" in sci
        for seed in (0, 1):
            assert f"--data {tmp_path}/s/dr-ladder/oracle-{pct} --out {tmp_path}/s/clip/oracle-{pct}-s{seed}" in sci
    assert "control-rung --kind clean --like" in sci
    assert sci.count("qcap mae --data") == 2 and sci.count("attention-distance") == 3  # s0, s1 and the demo's
    # seeds x tasks x (random, mae, 2 x datacomp/dr/drr/oracle, clean-100, mci-random, mci-dr-100, mci-datacomp-100)
    assert sci.count("qcap finetune ") == 2 * 3 * 14
    assert sci.count("qcap finetune det ") == 2 * 14 and "--det-samples" in sci  # detection: make science only
    assert "science-report" in sci and "--fractions 100 50" in sci
    assert sci.count(f"qcap depth-floor --world {s}/world --out {s}/depth-floor") == 1
    demo = _dry_run("demo", f"DEMO={tmp_path}/d")
    assert "control-rung" not in demo and "qcap mae" not in demo and "science-report" not in demo
    assert "depth-floor" not in demo
    assert "finetune det" not in demo and "--det-samples" not in demo
    assert demo.count("qcap finetune ") == 2 * 6  # random + 4 rungs + drr-100, seg and depth, one seed
    d = f"{tmp_path}/d"
    # the demo's reinforced rung: drr-100 only, at the other rungs' samples seen; no MCi
    assert demo.count("qcap reinforce ") == 1 and f"--shards {d}/dr-ladder/dr-100 --out {d}/dr-ladder/drr-100" in demo
    assert f"--out {d}/teacher" in demo and f"--out {d}/clip/drr-100-s0 --distill-loss-weights 0.25 0.75" in demo
    assert "drr-10-" not in demo and "drr-10 " not in demo
    commands = [c for c in demo.replace("\\\n", " ").splitlines() if " train --preset tiny " in c and f"{d}/clip/" in c]
    assert len(commands) == 5 and any("/clip/drr-100-s0" in c for c in commands)
    assert {c.split("--samples-seen ")[1].split()[0] for c in commands} == {"9600"}  # the demo's CLIP base: every rung, drr-100 too
    assert "mci" not in demo


@pytest.mark.slow
def test_make_science_smallest_scale(tmp_path):
    folder = tmp_path / "science"
    cmd = ["make", "--no-print-directory", "science", f"SCI={folder}", f"PORT={_free_port()}", *SMALLEST]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = check_science_folder(folder)
    assert result["numbers_checked"] > 50
