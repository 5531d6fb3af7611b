"""Nested configs on the command line (``--trainer.lr``), declared once; presets as typed partial
settings, applied before the required-field check; old flat flags and saved configs still read."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from base.config import (
    ConfigError,
    Settings,
    arg,
    build_parser,
    changed_settings,
    flatten_settings,
    from_dict,
    load_config,
    nest_flat,
    output_settings,
    parse_config,
    run_fields,
    save_config,
    to_dict,
)


@dataclass(kw_only=True)
class Loop:
    """A loop config for tests."""

    lr: float = arg(0.1, help="learning rate")
    steps: int = arg(10, help="steps")
    schedule: Literal["cosine", "constant"] = arg("cosine", help="decay")
    log_every: int = arg(5, shapes_output=False, help="log interval")
    resume: bool = arg(False, shapes_output=False, help="continue")

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps: must be positive, got {self.steps}")


def loop_defaults() -> Loop:
    return Loop(lr=0.5, steps=20)


@dataclass(kw_only=True)
class Run:
    """A run config for tests: two required fields and a nested loop."""

    data: str = arg(help="input")
    out: Path = arg(help="output folder")
    batch_size: int = arg(8, help="batch")
    loop: Loop = arg(factory=loop_defaults, bare_flags=True, help="the loop")
    threads: int = arg(0, shapes_output=False, help="threads")


PRESETS = {
    "fast": lambda: Settings(Run, batch_size=2, loop=Settings(Loop, lr=0.9)),
    "full": lambda: Run(data="d", out=Path("o"), loop=Loop(lr=0.3, steps=3)),
}


def parse(argv, presets=PRESETS):
    return parse_config(Run, argv, prog="qcap run", presets=presets)


def test_nested_flags_parse_with_the_stage_defaults_and_bare_aliases():
    cfg = parse(["--data", "d", "--out", "o", "--loop.lr", "0.25", "--loop.schedule", "constant", "--no-loop.resume"])
    assert cfg == Run(data="d", out=Path("o"), loop=Loop(lr=0.25, steps=20, schedule="constant"))
    assert parse(["--data", "d", "--out", "o"]).loop == loop_defaults()  # the field's default, not Loop()'s
    aliased = parse(["--data", "d", "--out", "o", "--lr", "0.25", "--steps", "4", "--resume"])
    assert aliased.loop == Loop(lr=0.25, steps=4, resume=True)


def test_help_groups_a_nested_config_and_lists_its_aliases():
    text = build_parser(Run, prog="qcap run", presets=PRESETS).format_help()
    assert "loop (Loop): the loop" in text
    assert "--loop.lr LR, --lr LR" in text and "(default: 0.5)" in text  # the stage's default
    assert "--loop.schedule {cosine,constant}, --schedule {cosine,constant}" in text
    assert text.index("--batch-size") < text.index("loop (Loop)")  # the config's own flags first


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "d", "--out", "o", "--loop.lrr", "1"], "unrecognized arguments: --loop.lrr"),
        (["--data", "d", "--out", "o", "--loop.lr", "fast"], "invalid float value: 'fast'"),
        (["--data", "d", "--out", "o", "--loop.schedule", "step"], "invalid choice: 'step'"),
        (["--data", "d", "--out", "o", "--loop.steps", "0"], "loop.steps: must be positive, got 0"),
        (["--out", "o"], "missing required flag(s): --data"),
        (["--preset", "fast"], "missing required flag(s): --data, --out"),
        (["--data", "d", "--out", "o", "--loop"], "unrecognized arguments"),  # no abbreviations
    ],
)
def test_bad_nested_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_presets_are_typed_partial_settings_applied_before_the_required_check():
    cfg = parse(["--preset", "fast", "--data", "d", "--out", "o", "--loop.steps", "7"])
    # the preset's batch and lr, the flags' steps, the stage's defaults for the rest of the loop
    assert cfg == Run(data="d", out=Path("o"), batch_size=2, loop=Loop(lr=0.9, steps=7))
    assert parse(["--preset", "full"]) == Run(data="d", out=Path("o"), loop=Loop(lr=0.3, steps=3))
    assert parse(["--preset", "full", "--lr", "0.1"]).loop == Loop(lr=0.1, steps=3)
    assert PRESETS["fast"]()(data="x", out=Path("y")).loop == Loop(lr=0.9, steps=20)
    with pytest.raises(ConfigError, match=r"missing required flag\(s\): --out"):
        PRESETS["fast"]()(data="x")
    with pytest.raises(TypeError, match="unknown field"):
        Settings(Run, batch=3)
    no_presets = build_parser(Run, prog="qcap run").format_usage()
    assert "--data DATA" in no_presets and "[--data DATA]" not in no_presets  # argparse names it without presets


def test_nested_configs_round_trip_and_old_flat_records_still_read(tmp_path):
    cfg = Run(data="d", out=Path("o"), loop=Loop(lr=0.2, steps=3, log_every=1))
    save_config(cfg, tmp_path / "config.json")
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["config"]["loop"] == {"lr": 0.2, "steps": 3, "schedule": "cosine", "log_every": 1, "resume": False}
    assert set(payload["run_only"]) == {"threads", "loop.log_every", "loop.resume"} == set(run_fields(Run))
    assert load_config(Run, tmp_path / "config.json") == cfg
    assert from_dict(Run, to_dict(cfg)) == cfg
    # the flat form of before the loop was nested, and a nested record missing a sub-field
    flat = {"data": "d", "out": "o", "batch_size": 8, "lr": 0.2, "steps": 3, "log_every": 1, "threads": 0}
    assert nest_flat(Run, flat)["loop"] == {"lr": 0.2, "steps": 3, "log_every": 1}
    assert from_dict(Run, flat) == cfg
    assert from_dict(Run, {"data": "d", "out": "o", "loop": {"steps": 3}}).loop == Loop(lr=0.5, steps=3)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(Run, {**to_dict(cfg), "loop": {"lrr": 1.0}})


def test_output_settings_and_changes_leave_nested_run_only_fields_out():
    cfg = Run(data="d", out=Path("o"), loop=Loop(lr=0.2, log_every=1))
    assert output_settings(cfg)["loop"] == {"lr": 0.2, "steps": 10, "schedule": "cosine"}
    assert flatten_settings(output_settings(cfg), Run)["loop.lr"] == 0.2
    saved = to_dict(cfg)
    resumed = dataclasses.replace(cfg, threads=4, loop=dataclasses.replace(cfg.loop, log_every=9, resume=True))
    assert changed_settings(Run, saved, resumed) == []
    other = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, lr=0.3))
    assert changed_settings(Run, saved, other) == [("loop.lr", 0.2, 0.3)]


# ---- the real configs: every knob declared once, old spellings kept, defaults unchanged


def test_caption_decode_is_nested_with_the_old_flags_and_old_folders_recognised():
    from base.config import output_fields
    from captioning.job import CaptionConfig
    from captioning.params import DecodeParams

    argv = ["--shards", "c", "--out", "s", "--checkpoint", "k"]
    makefile = parse_config(CaptionConfig, [*argv, "--num-captions", "5", "--decoding", "top_p", "--top-p", "0.9"])
    assert makefile == parse_config(CaptionConfig, argv)  # the Makefile's flags are the defaults (DataCompDR's)
    assert makefile.decode == DecodeParams(decoding="top_p", num_captions=5, top_p=0.9) and makefile.num_captions == 5
    nested = parse_config(CaptionConfig, [*argv, "--decode.top-p", "0.5", "--decode.seq-len", "20"])
    assert (nested.decode.top_p, nested.decode.seq_len) == (0.5, 20)
    over = parse_config(CaptionConfig, [*argv, "--num-candidates", "8", "--select", "diverse"])
    assert over.decode_params().num_captions == 8 and over.num_captions == 5
    with pytest.raises(SystemExit):
        parse_config(CaptionConfig, [*argv, "--decoding", "beam"])
    # a caption_config.json written before decode was nested holds the decoding fields flat
    old = {k: v for k, v in to_dict(makefile).items() if k != "decode"} | to_dict(makefile.decode)
    assert {k: nest_flat(CaptionConfig, old).get(k) for k in output_fields(CaptionConfig)} == output_settings(makefile)
    assert from_dict(CaptionConfig, old) == makefile
    text = build_parser(CaptionConfig, prog="qcap caption").format_help()
    assert "decode (DecodeParams)" in text and "--decode.top-p TOP_P, --top-p TOP_P" in text


def test_train_mae_and_finetune_hold_the_loop_once_with_their_own_defaults():
    from finetune.run import PRESETS as FT_PRESETS
    from finetune.run import FinetuneConfig
    from train.config import PRESETS as TRAIN_PRESETS
    from train.config import TrainerConfig, TrainRunConfig, preset
    from train.mae import MaeRunConfig

    tiny = preset("tiny", data="d", out=Path("r"))
    # qcap train's defaults are what they were: lr 1e-3, warmup 10, wd 0.1, DataComp's 5 checkpoints per run
    assert tiny.trainer == TrainerConfig(lr=1e-3, warmup=10, weight_decay=0.1, checkpoints_per_run=5)
    assert tiny.trainer.checkpoint_interval(12) == math.ceil(12 / 5) and tiny.trainer.warmup_steps(12) == 10
    large = TRAIN_PRESETS["datacomp-large"]()(data="d", out=Path("r"))
    assert (large.trainer.lr, large.trainer.warmup, large.trainer.weight_decay, large.trainer.log_every) == (5e-4, 500, 0.2, 100)
    # the Makefile's and the bench's spellings, bare and nested
    argv = ["--preset", "tiny", "--data", "d", "--out", "r", "--caption-source", "real", "--seed", "3",
            "--samples-seen", "256", "--eval-data", "e", "--retrieval-data", "e/r", "--resume",
            "--log-every", "4", "--checkpoint-every", "100", "--lr", "1e-3", "--warmup", "10"]
    cfg = parse_config(TrainRunConfig, argv, presets=TRAIN_PRESETS)
    assert (cfg.trainer.seed, cfg.trainer.resume, cfg.trainer.log_every, cfg.trainer.checkpoint_every) == (3, True, 4, 100)
    assert parse_config(TrainRunConfig, ["--data", "d", "--out", "r", "--trainer.seed", "3"]).trainer.seed == 3
    text = build_parser(TrainRunConfig, prog="qcap train", presets=TRAIN_PRESETS).format_help()
    assert "trainer (TrainerConfig)" in text and "--trainer.warmup WARMUP, --warmup WARMUP" in text

    mae = parse_config(MaeRunConfig, ["--data", "d", "--out", "r", "--seed", "2", "--samples-seen", "256", "--resume"])
    assert mae.trainer == TrainerConfig(lr=1e-3, warmup=10, weight_decay=0.05, beta2=0.95, eps=1e-8,
                                        checkpoints_per_run=5, seed=2, resume=True)

    ft = parse_config(FinetuneConfig, ["--random", "qcap-tiny-clip", "--seed", "1", "--data", "w", "--out", "o",
                                       "--preset", "tiny", "--steps", "8", "--resume"],
                      presets=FT_PRESETS, fixed={"task": "seg"})
    assert ft.task == "seg" and ft.steps == 8
    assert ft.trainer == TrainerConfig(lr=1e-3, warmup_fraction=0.05, weight_decay=0.05, beta2=0.999, eps=1e-8,
                                       grad_clip_norm=1.0, seed=1, resume=True)
    assert ft.trainer.warmup_steps(100) == 5 and ft.trainer.checkpoint_interval(100) == 0  # only at the end


def test_a_train_run_folder_written_before_the_nesting_resumes(tmp_path):
    from train.config import changed_fields, preset, with_trainer

    cfg = preset("tiny", data="d", out=tmp_path / "r", samples_seen=64)
    flat = {k: v for k, v in to_dict(cfg).items() if k != "trainer"}
    flat |= {k: v for k, v in to_dict(cfg.trainer).items() if k not in ("warmup_fraction", "checkpoints_per_run")}
    assert changed_fields(flat, with_trainer(cfg, resume=True, stop_at_step=3)) == []
    assert changed_fields(flat, with_trainer(cfg, lr=0.5)) == [("trainer.lr", 1e-3, 0.5)]


def test_the_trainer_checks_its_knobs_by_name():
    from train.config import TrainerConfig

    with pytest.raises(ValueError, match="warmup: give warmup steps"):
        TrainerConfig(warmup=3, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="lr: must be positive"):
        TrainerConfig(lr=0)
