"""``--overwrite`` removes only what the stage itself wrote: a file and a folder of the user's in
the output folder survive it, in every stage that has an output folder.

Each stage runs once for real (tiny inputs, tiny models, the real CLI), is re-run with another
input or setting and refused, gets a foreign file and a foreign folder put in its output
folder (and a foreign file inside the stage's own ``card/`` where it writes one), and is re-run
with ``--overwrite``: the stage succeeds with the new setting, and what it did not write is
still there, bytes unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_uid
from dr_data import write_images, write_qcap_captions
from test_caption_job import coca_dir, ray_address, write_shards  # noqa: F401 - fixtures
from test_reinforce import teachers  # noqa: F401 - fixture

from base.shards import iter_samples, read_sizes, save_uids

FOREIGN_FILE = "notes.txt"
FOREIGN_DIR = "mine"
FOREIGN_TEXT = "the user's, not the stage's"


def plant_foreign(out: Path) -> None:
    """A file and a folder (with a file in it) of the user's, in ``out``."""
    (out / FOREIGN_FILE).write_text(FOREIGN_TEXT)
    (out / FOREIGN_DIR).mkdir()
    (out / FOREIGN_DIR / "keep.bin").write_bytes(b"\x00\x01 mine")


def assert_foreign_survived(out: Path) -> None:
    assert (out / FOREIGN_FILE).read_text() == FOREIGN_TEXT
    assert (out / FOREIGN_DIR / "keep.bin").read_bytes() == b"\x00\x01 mine"


def qcap(argv: list[str], capsys) -> tuple[int, str, str]:
    from qcap.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused_then_overwritten(argv: list[str], changed: list[str], out: Path, capsys, *, refusal: str) -> str:
    """Run ``argv``, then ``argv + changed`` (refused: one line, status 2), plant the foreign
    entries, then ``argv + changed + --overwrite``: it succeeds and they survive. Returns the
    last run's stdout."""
    code, _, stderr = qcap(argv, capsys)
    assert code == 0, stderr
    code, _, stderr = qcap([*argv, *changed], capsys)
    assert code == 2 and refusal in stderr and "Traceback" not in stderr, stderr
    plant_foreign(out)
    code, stdout, stderr = qcap([*argv, *changed, "--overwrite"], capsys)
    assert code == 0, stderr
    assert_foreign_survived(out)
    return stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Curated image shards (uids make_uid(0..6)), one failed download in shard 0."""
    return write_images(tmp_path_factory.mktemp("images") / "curated", [[0, 1, 2, 3], [4, 5, 6]])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from test_world import tiny_config

    from world.generate import generate_world

    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(tiny_config(out), progress=False)
    return out


def test_reshard(images, tmp_path, capsys):
    every, fewer = tmp_path / "every.npy", tmp_path / "fewer.npy"
    save_uids(every, [make_uid(n) for n in range(7)])
    save_uids(fewer, [make_uid(n) for n in (1, 2, 5)])
    out = tmp_path / "resharded"
    argv = ["reshard", "--shards", str(images), "--out", str(out), "--samples-per-shard", "2", "--no-progress"]
    refused_then_overwritten([*argv, "--subset", str(every)], ["--subset", str(fewer)], out, capsys,
                             refusal="--overwrite")
    assert sum(read_sizes(out).values()) == 3 and sorted(p.name for p in out.glob("*.tar")) == ["00000.tar",
                                                                                               "00001.tar"]
    assert json.loads((out / "summary.json").read_text())["num_written"] == 3


def test_subset_and_its_card(images, tmp_path, capsys):
    out = tmp_path / "subset"
    argv = ["subset", "--shards", str(images), "--out", str(out), "--seed", "3", "--no-progress"]
    code, _, stderr = qcap([*argv, "--num-samples", "5"], capsys)
    assert code == 0, stderr
    assert (out / "card" / "card.json").is_file() and (out / "README.md").is_file()
    (out / "card" / "my-figure.png").write_bytes(b"drawn by hand")  # the user's, in the stage's card folder
    (out / "my.npy").write_bytes(b"a uid file of mine")  # shaped like what subset writes, not subset's
    stdout = refused_then_overwritten([*argv, "--num-samples", "5"], ["--num-samples", "2", "--no-card"], out,
                                      capsys, refusal="--overwrite")
    assert "2" in stdout
    assert len(list(iter_samples(str(out)))) == 2
    assert not (out / "README.md").exists() and not (out / "card" / "card.json").exists()  # the old card went
    assert (out / "card" / "my-figure.png").read_bytes() == b"drawn by hand"
    assert (out / "my.npy").read_bytes() == b"a uid file of mine"


def test_build_dr(images, tmp_path, capsys):
    captions = write_qcap_captions(tmp_path / "syn", [[6, 5, 4], [3, 2, 1, 0]])
    out = tmp_path / "dr"
    argv = ["build-dr", "--images", str(images), "--captions", str(captions), "--out", str(out), "--no-progress"]
    code, _, stderr = qcap(argv, capsys)
    assert code == 0, stderr
    assert (out / "card" / "card.json").is_file() and (out / "README.md").is_file()
    # shaped like what build-dr writes, not build-dr's: a tar, a uid file, a figure in its card folder
    (out / "my.tar").write_bytes(b"a tar of mine")
    (out / "notes.npy").write_bytes(b"a uid file of mine")
    (out / "card" / "my-figure.png").write_bytes(b"drawn by hand")
    refused_then_overwritten(argv, ["--min-syn-captions", "2", "--no-card"], out, capsys,
                             refusal="other inputs or settings")
    assert json.loads((out / "summary.json").read_text())["reconciled"]
    assert not (out / "README.md").exists() and not (out / "card" / "card.json").exists()  # the old card went
    assert (out / "my.tar").read_bytes() == b"a tar of mine" and (out / "notes.npy").read_bytes() == b"a uid file of mine"
    assert (out / "card" / "my-figure.png").read_bytes() == b"drawn by hand"


@pytest.mark.slow  # ~25 s of Ray and a CoCa; caption's refusal of foreign shards is in test_caption_hostile.py
def test_caption(tmp_path, ray_address, coca_dir, capsys):  # noqa: F811
    shards = write_shards(tmp_path / "curated", [2, 1])
    out = tmp_path / "syn"
    argv = ["caption", "--shards", str(shards), "--out", str(out), "--checkpoint", str(coca_dir), "--batch-size", "4",
            "--num-workers", "1", "--ray-address", ray_address, "--no-progress"]
    refused_then_overwritten([*argv, "--num-captions", "2"], ["--num-captions", "1"], out, capsys,
                             refusal="--overwrite to start over")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciled"] and summary["captions"] == 3
    assert all(len(s.syn_text) == 1 for s in iter_samples(str(out)))


@pytest.mark.slow  # ~23 s of Ray and two teachers; the kit's --overwrite (every stage's) is in test_stage_kit.py
def test_reinforce(tmp_path, ray_address, teachers, capsys):  # noqa: F811
    from test_reinforce import write_dr

    shards = write_dr(tmp_path / "dr", [[0, 1], [2]])
    out = tmp_path / "reinforced"
    argv = ["reinforce", "--shards", str(shards), "--out", str(out), "--teachers", ",".join(teachers), "--size", "32",
            "--num-workers", "1", "--batch-size", "4", "--ray-address", ray_address, "--no-progress"]
    refused_then_overwritten([*argv, "--num-augmentations", "2"], ["--num-augmentations", "1"], out, capsys,
                             refusal="--overwrite to start over")
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["num_augmentations"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciled"] and summary["images_reinforced"] == 3


def test_reinforce_overwrite_refuses_shards_it_did_not_write(tmp_path, teachers, capsys):  # noqa: F811
    from test_reinforce import write_dr

    shards = write_dr(tmp_path / "dr", [[0]])
    foreign = write_dr(tmp_path / "foreign", [[1, 2]])  # someone's shards, no config.json
    code, _, stderr = qcap(["reinforce", "--shards", str(shards), "--out", str(foreign), "--teachers",
                            ",".join(teachers), "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "qcap reinforce did not write them" in stderr
    assert (foreign / "00000.tar").is_file() and (foreign / "00000.done").is_file()


def test_world(tmp_path, capsys):
    out = tmp_path / "w"
    argv = ["world", "--out", str(out), "--num-samples", "160", "--clean-samples", "0", "--eval-samples", "0",
            "--chunk-size", "160", "--workers", "1", "--stall-seconds", "1"]
    refused_then_overwritten(argv, ["--seed", "1"], out, capsys, refusal="other inputs or settings")
    info = json.loads((out / "world.json").read_text())
    assert info["seed"] == 1 and info["counts"]["splits"]["pool"] == 160


def test_world_overwrite_unlinks_a_symlink_under_a_world_name_and_keeps_its_target(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "photo.jpg").write_bytes(b"a photo of mine")
    out = tmp_path / "w"
    out.mkdir()
    (out / "images").symlink_to(elsewhere, target_is_directory=True)
    code, _, stderr = qcap(["world", "--out", str(out), "--num-samples", "160", "--clean-samples", "0",
                            "--eval-samples", "0", "--chunk-size", "160", "--workers", "1", "--overwrite"], capsys)
    assert code == 0, stderr
    assert (elsewhere / "photo.jpg").read_bytes() == b"a photo of mine" and not (out / "images").is_symlink()


def test_control_rung_oracle_and_clean(world, tmp_path, capsys):
    from base.shards import Sample, ShardWriter, finalize_folder

    samples = list(iter_samples(str(world / "clean")))
    rungs = []
    for name, count in (("rung-a", 4), ("rung-b", 3)):
        with ShardWriter(tmp_path / name, 0) as writer:
            for s in samples[:count]:
                writer.write(Sample(key=s.key, uid=s.uid, image=s.image, text="a photo, best price"))
        finalize_folder(tmp_path / name)
        rungs.append(tmp_path / name)
    oracle = tmp_path / "oracle"
    argv = ["control-rung", "--kind", "oracle", "--world", str(world), "--out", str(oracle)]
    refused_then_overwritten([*argv, "--shards", str(rungs[0])], ["--shards", str(rungs[1])], oracle, capsys,
                             refusal="other inputs or settings")
    assert json.loads((oracle / "summary.json").read_text())["num_written"] == 3

    clean = tmp_path / "clean"
    argv = ["control-rung", "--kind", "clean", "--world", str(world), "--out", str(clean)]
    refused_then_overwritten([*argv, "--num-samples", "5"], ["--num-samples", "3"], clean, capsys,
                             refusal="other inputs or settings")
    summary = json.loads((clean / "summary.json").read_text())
    assert summary["num_written"] == 3 and summary["reconciled"]
    assert len(np.load(clean / "uids.npy")) == 3
