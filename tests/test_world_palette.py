"""qcap world --colours/--backgrounds: a smaller palette, drawn everywhere the world draws a scene."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from world.alttext import _WEB_BG
from world.config import WorldConfig
from world.floor import measure
from world.generate import generate_world
from world.scenes import BACKGROUNDS, CLASSES, COLOURS, Palette, sample_rng, sample_scene

QCAP = str(Path(sys.executable).parent / "qcap")
PALETTE = {"colours": "yellow,red,blue", "backgrounds": "studio,grass"}  # not in the generator's order


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("palette") / "w"
    generate_world(WorldConfig(out=out, num_samples=200, clean_samples=40, eval_samples=24, det_samples=8,
                               chunk_size=100, workers=1, eval_image_size=48, clean_image_size=64, **PALETTE),
                   progress=False)
    return out


def test_every_split_draws_only_the_palette_and_world_json_records_it(world):
    config = json.loads((world / "world.json").read_text())["config"]
    assert config["colours"] == "red,yellow,blue" and config["backgrounds"] == "grass,studio"  # canonical order
    rows = pq.read_table(world / "truth.parquet").to_pylist()
    splits = {r["split"] for r in rows}
    assert {"pool", "clean", "eval-seg", "eval-depth", "eval-cls", "eval-retrieval", "eval-det"} <= splits
    colours = {o["colour"] for r in rows for o in r["objects"]}
    backgrounds = {r["background"] for r in rows}
    assert colours == {"red", "yellow", "blue"} and backgrounds == {"grass", "studio"}


def test_web_alt_text_names_no_colour_outside_the_palette(world):
    # wrong attributes and SEO text name another colour of the world's palette, not one no image has
    rows = pq.read_table(world / "truth.parquet").to_pylist()
    english = [r["text"] for r in rows if r["split"] == "pool" and r["lang"] == "en" and r["text"]]
    kinds = {r["text_kind"] for r in rows if r["split"] == "pool"}
    assert {"wrong_attr", "seo"} <= kinds and len(english) > 50
    outside = [c for c in COLOURS if c not in ("red", "yellow", "blue")]
    backdrops = [p for phrases in _WEB_BG.values() for p in phrases]  # "on green grass" names the background
    bare = [re.sub("|".join(map(re.escape, backdrops)), "", t, flags=re.IGNORECASE) for t in english]
    said = [t for t in bare if re.search(r"\b(" + "|".join(outside) + r")\b", t, re.IGNORECASE)]
    assert said == []


def test_the_depth_floor_redraws_a_palette_world(world):
    # qcap depth-floor redraws each validation scene and refuses one its generator does not reproduce
    result = measure(world, samples=8, progress=False)
    assert result["num_images"] == 6 and result["predictions"]["floor"]["rmse"] < result["predictions"]["constant"]["rmse"]


def test_a_palette_that_runs_out_of_colours_takes_other_classes():
    # white is the only colour that shows on the night background: a class can appear once only
    palette = Palette.parse("white,black", "night")
    for i in range(300):
        scene = sample_scene(sample_rng(3, "pool", i, 0), 64, 64, palette=palette)
        assert scene.background == "night" and {o.colour for o in scene.objects} == {"white"}
        groups = {(o.cls, o.colour) for o in scene.objects}
        assert len({cls for cls, _ in groups}) == len(groups) and all(cls in CLASSES for cls, _ in groups)


def test_the_default_palette_is_every_colour_and_background():
    assert Palette.parse(None, None) == Palette() and Palette().spec() is None
    assert Palette.parse(",".join(COLOURS), ",".join(reversed(BACKGROUNDS))).spec() is None
    rng_a, rng_b = sample_rng(0, "pool", 5, 0), sample_rng(0, "pool", 5, 0)
    assert sample_scene(rng_a, 64, 64) == sample_scene(rng_b, 64, 64, palette=Palette())


@pytest.mark.parametrize(("colours", "backgrounds", "message"), [
    ("red,purpel", None, "unknown colour purpel"),
    ("red", None, "at least two colours"),
    (None, "sky,moon", "unknown background moon"),
    ("red,red,blue", None, "named twice"),
    ("white,grey", "studio", "stands out on the studio background"),
])
def test_a_bad_palette_is_refused_naming_what_is_wrong(tmp_path, colours, backgrounds, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(out=tmp_path, colours=colours, backgrounds=backgrounds)


def test_the_cli_refuses_a_bad_palette_in_one_line(tmp_path):
    proc = subprocess.run([QCAP, "world", "--out", str(tmp_path / "w"), "--colours", "red,purpel"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown colour purpel" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "world.json").exists()
    help_text = subprocess.run([QCAP, "world", "--help"], capture_output=True, text=True).stdout
    assert "--colours" in help_text and "--backgrounds" in help_text


def test_scene_draws_do_not_depend_on_how_the_palette_was_spelled():
    a = Palette.parse("blue, red", "sky")
    b = Palette.parse("red,blue", "sky")
    assert a == b
    scenes = [sample_scene(sample_rng(1, "clean", i, 0), 64, 64, palette=p) for p in (a, b) for i in range(3)]
    assert scenes[:3] == scenes[3:]
    assert np.all([o.colour in ("red", "blue") for s in scenes for o in s.objects])
