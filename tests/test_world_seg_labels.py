"""``qcap world --seg-labels colour``: the seg set labels each object's visible pixels with its
colour instead of its shape; the masks, the images and every other world file stay the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_world_det import _files, _world

from world.scenes import CLASSES, COLOURS


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("w")
    return _world(root / "shape", eval_samples=8), _world(root / "colour", eval_samples=8, seg_labels="colour")


def test_colour_labels_are_the_colours_of_the_objects_seen_where_the_shape_labels_are(worlds):
    shape, colour = worlds
    names = json.loads((colour / "eval" / "seg" / "classes.json").read_text())
    assert names["classes"] == ["background", *COLOURS] and names["num_classes"] == 1 + len(COLOURS)
    assert json.loads((shape / "eval" / "seg" / "classes.json").read_text())["classes"] == ["background", *CLASSES]
    truth = pq.read_table(colour / "truth.parquet").to_pandas()
    seg = truth[truth["split"] == "eval-seg"]
    assert len(seg) == 8
    for row in seg.itertuples():
        image = Path(row.path)
        sub, stem = image.parent.name, image.stem
        by_colour = np.asarray(Image.open(colour / "eval" / "seg" / "annotations" / sub / f"{stem}.png"))
        by_shape = np.asarray(Image.open(shape / "eval" / "seg" / "annotations" / sub / f"{stem}.png"))
        assert ((by_colour > 0) == (by_shape > 0)).all(), stem  # the same pixels are objects
        seen = {list(COLOURS)[v - 1] for v in np.unique(by_colour) if v}
        assert seen == {obj["colour"] for obj in row.objects}, stem  # every object is at least half visible
        # where one object is seen, its colour and its shape label the same pixels
        for obj in row.objects:
            if sum(o["colour"] == obj["colour"] for o in row.objects) == 1 and \
                    sum(o["cls"] == obj["cls"] for o in row.objects) == 1:
                assert ((by_colour == 1 + list(COLOURS).index(obj["colour"]))
                        == (by_shape == 1 + CLASSES.index(obj["cls"]))).all(), stem


def test_colour_labels_change_only_the_seg_annotations_and_the_records(worlds):
    shape, colour = worlds
    a, b = _files(shape), _files(colour)
    assert set(a) == set(b)
    differ = {name for name in a if a[name] != b[name]}
    assert differ and all(name.startswith("eval/seg/annotations/") for name in differ - {"world.json", "eval/seg/classes.json"})
    assert json.loads((colour / "world.json").read_text())["config"]["seg_labels"] == "colour"
    assert "seg_labels" not in json.loads((shape / "world.json").read_text())["config"]  # as before the option existed


def test_a_seg_label_kind_that_does_not_exist_is_refused(tmp_path, capsys):
    from base.cli import run_guarded
    from world.cli import world_main

    with pytest.raises(SystemExit) as info:  # argparse's choice check: usage and one line, status 2
        run_guarded(world_main, ["--out", str(tmp_path / "w"), "--num-samples", "4", "--seg-labels", "texture"],
                    "qcap world")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--seg-labels" in err and "colour" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()
