"""The config convention: dataclass → flags, presets, strict parsing, resolved config on disk."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from base.config import ConfigError, arg, build_parser, from_dict, load_config, parse_config, save_config, to_dict


@dataclass(kw_only=True)
class DemoConfig:
    """A config for tests."""

    out: Path = arg(help="output folder")
    image_size: int = arg(512, help="side in pixels")
    lr: float = arg(1e-3, help="learning rate")
    mode: Literal["fast", "exact"] = arg("exact", help="how")
    shuffle: bool = arg(True, help="shuffle samples")
    fractions: tuple[float, ...] = arg((1.0, 0.1), help="subset fractions")
    seed: int | None = arg(None, help="seed, or none for random")

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size: must be positive, got {self.image_size}")


PRESETS = {"tiny": lambda: DemoConfig(out=Path("runs/tiny"), image_size=64, lr=0.01)}


def test_flags_types_and_defaults():
    cfg = parse_config(DemoConfig, ["--out", "x", "--image-size", "128", "--no-shuffle", "--fractions", "1", "0.5", "0.1", "--mode", "fast"])
    assert cfg == DemoConfig(out=Path("x"), image_size=128, shuffle=False, fractions=(1.0, 0.5, 0.1), mode="fast")
    assert parse_config(DemoConfig, ["--out", "y"]).seed is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "x", "--image-sise", "1"], "unrecognized arguments: --image-sise"),
        (["--out", "x", "--image-size", "big"], "invalid int value: 'big'"),
        (["--out", "x", "--mode", "slow"], "invalid choice: 'slow'"),
        (["--image-size", "3"], "the following arguments are required: --out"),
        (["--out", "x", "--image-size", "-3"], "image_size: must be positive"),
        (["--out", "x", "--image"], "unrecognized arguments"),  # no abbreviations
    ],
)
def test_bad_flags_are_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(DemoConfig, argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_preset_then_overrides():
    cfg = parse_config(DemoConfig, ["--preset", "tiny", "--lr", "0.5"], presets=PRESETS)
    assert (cfg.out, cfg.image_size, cfg.lr) == (Path("runs/tiny"), 64, 0.5)
    help_text = build_parser(DemoConfig, presets=PRESETS).format_help()
    assert "--preset {tiny}" in help_text and "side in pixels" in help_text


def test_resolved_config_round_trips(tmp_path):
    cfg = DemoConfig(out=Path("o"), fractions=(1.0, 0.01), seed=3)
    save_config(cfg, tmp_path / "config.json", qcap_version="test")
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["config"]["out"] == "o" and payload["qcap_version"] == "test"
    assert from_dict(DemoConfig, payload["config"]) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DemoConfig, {**to_dict(cfg), "imagesize": 3})


@dataclass(kw_only=True)
class TaskConfig:
    """A positional Literal that a preset may leave out (qcap finetune's task)."""

    task: Literal["seg", "depth"] = arg(help="which task", positional=True)
    steps: int = arg(10, help="steps")


def test_optional_positional_choice_is_checked_and_may_be_absent(capsys):
    presets = {"tiny": lambda: TaskConfig(task="seg", steps=2)}
    assert parse_config(TaskConfig, ["depth", "--preset", "tiny"], presets=presets) == TaskConfig(task="depth", steps=2)
    assert parse_config(TaskConfig, ["--preset", "tiny"], presets=presets) == TaskConfig(task="seg", steps=2)
    with pytest.raises(SystemExit):
        parse_config(TaskConfig, ["--preset", "tiny", "sег"], presets=presets)
    assert "invalid choice: 'sег'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no preset, no task: the missing field is named
        parse_config(TaskConfig, [], presets=presets)
    assert "missing required flag(s): TASK" in capsys.readouterr().err


@dataclass(kw_only=True)
class FilesConfig:
    """A positional list (qcap uids' input files)."""

    files: list[Path] = arg(help="input files", positional=True, metavar="FILE")
    out: Path = arg(help="output file")


def test_positional_list_takes_one_or_more_values(capsys):
    cfg = parse_config(FilesConfig, ["a.npy", "b.npy", "--out", "c.npy"])
    assert cfg == FilesConfig(files=[Path("a.npy"), Path("b.npy")], out=Path("c.npy"))
    assert parse_config(FilesConfig, ["--out", "c.npy", "a.npy"]).files == [Path("a.npy")]
    with pytest.raises(SystemExit):
        parse_config(FilesConfig, ["--out", "c.npy"])
    assert "the following arguments are required: FILE" in capsys.readouterr().err
    assert "FILE [FILE ...]" in build_parser(FilesConfig).format_usage()
    # under a preset the list may be left out (the preset's stands) or given (it replaces the preset's)
    presets = {"two": lambda: FilesConfig(files=[Path("x"), Path("y")], out=Path("o"))}
    assert parse_config(FilesConfig, ["--preset", "two"], presets=presets).files == [Path("x"), Path("y")]
    assert parse_config(FilesConfig, ["--preset", "two", "z"], presets=presets).files == [Path("z")]


def test_lists_of_paths_round_trip(tmp_path):
    cfg = FilesConfig(files=[Path("a.npy"), Path("b.npy")], out=Path("c.npy"))
    save_config(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["config"]["files"] == ["a.npy", "b.npy"]
    assert load_config(FilesConfig, tmp_path / "config.json") == cfg


def test_whether_a_field_shapes_the_output_is_declared_on_the_field_once(tmp_path):
    """Each stage's output identity, resume check and card lineage read the fields' declarations
    (``arg(..., shapes_output=False)`` for how and where a run runs), not hand-kept lists."""
    from base.config import output_fields, output_settings, run_fields, save_config
    from captioning.dr import BuildDRConfig, identity
    from captioning.job import CaptionConfig
    from curate.subset import SubsetConfig
    from train.config import TrainRunConfig, changed_fields, with_trainer
    from world.config import WorldConfig

    for cls in (CaptionConfig, BuildDRConfig, SubsetConfig, WorldConfig, TrainRunConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        top_run = {name for name in run_fields(cls) if "." not in name}  # a nested config's own by dotted name
        assert set(output_fields(cls)) | top_run == fields
        assert not set(output_fields(cls)) & top_run
        assert {"progress", "overwrite"} & fields <= top_run or cls is TrainRunConfig
    caption = CaptionConfig(shards="in", out=tmp_path / "syn", checkpoint="ckpt", num_workers=3)
    assert set(output_settings(caption)) == set(output_fields(CaptionConfig))
    assert "num_workers" not in output_settings(caption) and "top_p" in output_settings(caption)["decode"]
    world = WorldConfig(out=tmp_path / "w", workers=7, ray_address="auto")
    defaults_left_out = {"det_samples", "seg_labels", "colours", "backgrounds"}  # identity() omits these at defaults
    assert world.identity() == {k: v for k, v in output_settings(world).items() if k not in defaults_left_out}
    colour = WorldConfig(out=tmp_path / "w", seg_labels="colour", det_samples=4, colours="red,blue", backgrounds="sky")
    assert colour.identity() == output_settings(colour)
    # a palette is recorded in the generator's order, so two spellings of one palette are one world
    assert WorldConfig(out=tmp_path / "w", colours="blue, red").identity()["colours"] == "red,blue"
    assert "workers" not in world.identity() and "seed" in world.identity()
    old = with_trainer(TrainRunConfig(data="d", out=tmp_path / "r", threads=1), log_every=5)
    assert "trainer.log_every" in run_fields(old) and "trainer.lr" not in run_fields(old)
    saved = to_dict(old)
    assert changed_fields(saved, with_trainer(dataclasses.replace(old, threads=4), log_every=1)) == []  # declared run-only
    assert changed_fields(saved, with_trainer(old, lr=1.0)) == [("trainer.lr", 1e-3, 1.0)]
    dr = BuildDRConfig(images="i", captions="c", out=tmp_path / "dr", num_workers=4)
    assert "num_workers" not in identity(dr, [], _NoShards())["settings"]
    # save_config records what the card needs: the run-only fields and the stage's name
    save_config(SubsetConfig(shards="s", out=tmp_path / "sub", fraction=0.5, num_workers=2), tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["stage"] == "subset" and set(saved["run_only"]) == set(run_fields(SubsetConfig))
    assert "num_workers" in saved["run_only"] and "fraction" not in saved["run_only"]


class _NoShards:
    kind, folder, shards = "qcap-webdataset", "c", []
