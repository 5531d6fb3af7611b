"""The stage kit (base/stage.py): claiming an output folder, the run records, the pool."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import make_uid

from base.cli import UsageError
from base.config import arg
from base.shards import Sample, ShardWriter, completed_shards, is_complete
from base.stage import (
    CONFIG_FILE,
    NOWHERE,
    SUMMARY_FILE,
    claim_output,
    differences,
    pending_shards,
    run_pool,
    write_run_records,
)


@dataclass(kw_only=True)
class ToyConfig:
    STAGE: ClassVar[str] = "toy"

    out: Path = arg(shapes_output=False, help="output folder")
    seed: int = arg(0, help="what shapes the output")


OWN = ("sizes.json", CONFIG_FILE, SUMMARY_FILE)


def claim(out: Path, seed: int, *, overwrite: bool = False, **kwargs):
    return claim_output(out, stage="toy", identity={"settings": {"seed": seed}}, overwrite=overwrite, own_files=OWN,
                        **kwargs)


def toy_run(out: Path, seed: int, **kwargs) -> dict | None:
    """What a stage does: claim, record its config with the identity, write a shard."""
    saved = claim(out, seed, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    write_run_records(out, ToyConfig(out=out, seed=seed), identity={"settings": {"seed": seed}})
    with ShardWriter(out, 0) as writer:
        writer.write(Sample(key="a", uid=make_uid(1), image=b"jpeg", text="a cat"))
    return saved


def test_a_fresh_folder_is_claimed_and_the_records_have_one_pair_of_names(tmp_path):
    out = tmp_path / "out"
    assert toy_run(out, 1) is None
    write_run_records(out, summary={"num_written": 1})
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("0")) == [CONFIG_FILE, SUMMARY_FILE]
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "toy" and config["identity"] == {"settings": {"seed": 1}}
    assert config["config"]["seed"] == 1 and config["run_only"] == ["out"]
    assert json.loads((out / "summary.json").read_text()) == {"num_written": 1}


def test_a_rerun_with_the_same_identity_resumes(tmp_path):
    out = tmp_path / "out"
    toy_run(out, 1)
    saved = claim(out, 1)
    assert saved["identity"] == {"settings": {"seed": 1}}
    assert is_complete(out, 0)  # nothing was removed
    assert pending_shards(out, {0: "in/00000.tar", 1: "in/00001.tar"}) == [(1, "in/00001.tar")]


def test_another_identity_is_refused_naming_the_field(tmp_path):
    out = tmp_path / "out"
    toy_run(out, 1)
    with pytest.raises(UsageError) as refused:
        claim(out, 2)
    message = str(refused.value)
    assert "settings.seed: 1 -> 2" in message and "--overwrite" in message and "another --out" in message
    assert is_complete(out, 0)
    # a stage whose records predate the identity, killed before any shard: nothing to mix
    (out / "00000.done").unlink()
    assert claim(out, 2, only_with_shards=True) is None


def test_overwrite_removes_only_the_stages_own_files(tmp_path):
    out = tmp_path / "out"
    toy_run(out, 1)
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "00000.tar").write_bytes(b"a tar of mine")
    (out / "my.tar").write_bytes(b"another of mine")
    assert claim(out, 2, overwrite=True) is None
    assert sorted(p.name for p in out.iterdir()) == ["mine", "my.tar", "notes.txt"]
    assert (out / "mine" / "00000.tar").read_bytes() == b"a tar of mine"


def test_overwrite_removes_the_stages_own_folders_and_leaves_a_symlinks_target(tmp_path):
    out = tmp_path / "out"
    toy_run(out, 1)
    (out / ".work").mkdir()
    (out / ".work" / "index.npy").write_bytes(b"the stage's")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.bin").write_bytes(b"mine")
    (out / "cache").symlink_to(elsewhere, target_is_directory=True)
    claim(out, 2, overwrite=True, own_dirs=(".work", "cache"))
    assert not (out / ".work").exists() and not (out / "cache").exists()
    assert (elsewhere / "keep.bin").read_bytes() == b"mine"


def test_shards_the_stage_did_not_write_are_never_touched(tmp_path):
    out = tmp_path / "foreign"
    with ShardWriter(out, 0) as writer:
        writer.write(Sample(key="a", uid=make_uid(1), image=b"jpeg", text="someone's"))
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="qcap toy did not write them"):
            claim(out, 1, overwrite=overwrite)
    assert completed_shards(out) == {0}


def test_overwrite_refuses_a_record_of_another_stage(tmp_path):
    out = tmp_path / "out"
    toy_run(out, 1)
    with pytest.raises(UsageError, match="written by qcap toy, not qcap other"):
        claim_output(out, stage="other", identity={}, overwrite=True, own_files=OWN)
    assert is_complete(out, 0)


def test_a_file_or_a_broken_record_is_one_clear_error(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(UsageError, match="is a file, not a folder; choose a folder for the toy shards"):
        claim(tmp_path / "taken", 1, what="the toy shards")
    out = tmp_path / "out"
    toy_run(out, 1)
    (out / CONFIG_FILE).write_text("{ cut")
    with pytest.raises(UsageError, match="unreadable .*--overwrite to start over"):
        claim(out, 1)
    assert claim(out, 1, overwrite=True) is None and not (out / CONFIG_FILE).exists()


def test_differences_name_nested_fields_and_shorten_values():
    assert differences({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 3]}}) == ["b.c: [1, 2] -> [1, 3]"]
    assert differences(None, {"a": 1}) == ["identity: none recorded"]
    (long,) = differences({"x": "y" * 500}, {"x": "z"})
    assert long.startswith("x: 'yyy") and "..." in long and len(long) < 120


def _write_square(task: tuple[str, int]) -> int:
    folder, n = task
    Path(folder, f"{n}.txt").write_text(str(n * n))
    return n * n


def test_run_pool_runs_every_task_and_says_where(tmp_path):
    assert run_pool(_write_square, [], num_workers=4, ray_address=None, total=0, desc="toy", unit="task",
                    progress=False) == NOWHERE
    where = run_pool(_write_square, [(str(tmp_path), n) for n in (1, 2, 3)], num_workers=2, ray_address=None, total=14,
                     desc="toy", unit="task", progress=False, weight=lambda r: r)
    assert where == "local (2 processes)"
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"1.txt": "1", "2.txt": "4", "3.txt": "9"}
