"""The depth floor (``qcap depth-floor``): its model of the generator redraws the world's own depth
maps, its draws keep each scene's depth order, and on a real world the floor lies below the
position-only prediction, which lies below the constant one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from base.cli import UsageError
from world.config import WorldConfig
from world.floor import FLOOR_FILE, depth_map, layout_of, measure, posterior_mean
from world.generate import _square_scene, generate_world
from world.scenes import render


@pytest.fixture(scope="module")
def depth_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(WorldConfig(out=out, num_samples=40, clean_samples=2, eval_samples=40, eval_image_size=64,
                               clean_image_size=48, workers=1), progress=False)
    return out


def test_the_floor_model_with_the_scene_own_draws_is_the_rendered_depth_map():
    for index in range(20):
        scene = _square_scene(0, "eval-depth", index, 64)
        layout = layout_of(scene)
        drawn = depth_map(layout, [scene.near_m], [scene.far_m], [scene.tilt], [[o.depth_m for o in scene.objects]])[0]
        np.testing.assert_allclose(drawn, render(scene, with_maps=True).depth_m, rtol=1e-6, atol=1e-6)


def test_posterior_draws_keep_the_depth_order_and_scatter_around_the_truth():
    scene = next(s for s in (_square_scene(0, "eval-depth", i, 64) for i in range(200)) if len(s.objects) >= 3)
    layout = layout_of(scene)
    mean, kept = posterior_mean(layout, np.random.default_rng(0), 128)
    assert kept == 128
    seen = [np.unique(mean[layout.instance_map == k + 1]) for k in range(len(scene.objects))]
    means = [float(v[0]) for v in seen if len(v)]
    assert all(len(v) <= 1 for v in seen)  # one depth per visible card
    assert means == sorted(means)  # nearest first, as the scene's order
    truth = render(scene, with_maps=True).depth_m
    assert 0 < np.abs(mean - truth).mean() < 2.0  # a real spread, not the truth itself, and not far off


def test_the_floor_scores_with_finetune_depth_metric():
    import torch

    from finetune.metrics import DepthMetrics
    from world.floor import _DepthScore

    rng = np.random.default_rng(3)
    ours, theirs = _DepthScore(), DepthMetrics()
    for _ in range(5):
        target = rng.uniform(0.5, 12.0, (16, 16))
        target[rng.random((16, 16)) < 0.2] = 0  # invalid pixels, and depths beyond the 10 m range
        pred = target * rng.uniform(0.6, 1.5, (16, 16)) + rng.normal(0, 0.3, (16, 16))
        ours.update(pred, target)
        theirs.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None])
    expected = theirs.compute()
    for key, value in ours.compute().items():
        assert value == pytest.approx(expected[key], rel=1e-9)


def test_floor_is_below_position_which_is_below_constant(depth_world, tmp_path):
    result = measure(depth_world, samples=32, progress=False)
    p = result["predictions"]
    assert result["num_images"] == 10 and result["num_training_images"] == 30
    assert result["fewest_samples_kept"] == 32
    assert p["floor"]["rmse"] < p["position"]["rmse"] < p["constant"]["rmse"]
    assert p["floor"]["delta1"] > p["constant"]["delta1"]
    assert result["headroom_m"] == pytest.approx(p["position"]["rmse"] - p["floor"]["rmse"])
    # the CLI writes the same numbers (same seed, same draws)
    run = subprocess.run([sys.executable, "-m", "qcap", "depth-floor", "--world", str(depth_world), "--out",
                          str(tmp_path / "f"), "--samples", "32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    written = json.loads((tmp_path / "f" / FLOOR_FILE).read_text())
    assert written["predictions"] == p
    assert f"floor {p['floor']['rmse']:.3f} m" in run.stdout


def test_a_depth_map_the_generator_does_not_redraw_is_refused(depth_world, tmp_path):
    import shutil

    world = tmp_path / "w"
    shutil.copytree(depth_world, world)
    png = sorted((world / "eval" / "depth" / "depth" / "validation").glob("*.png"))[0]
    depth = np.asarray(Image.open(png)).copy()
    depth[depth > 0] += 7
    Image.fromarray(depth).save(png)
    with pytest.raises(UsageError, match="does not redraw this depth map"):
        measure(world, samples=8, progress=False)
    run = subprocess.run([sys.executable, "-m", "qcap", "depth-floor", "--world", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr and "world.json: missing" in run.stderr
