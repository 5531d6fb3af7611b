"""Hostile checkpoints: every unsafe or damaged model file is refused as ONE line naming the
file, never by running its code and never with torch's advice to load with weights_only=False.

The hostile files are made here: pickles whose ``__reduce__`` calls ``os.system`` (writing a
marker file: the marker must never appear), truncated and garbage ``.pt``/``.bin``/
``.safetensors``, folders whose ``open_clip_config.json`` is no JSON or no object, wrong
shapes. They go through :func:`base.models.load_model` and through every command that
loads a checkpoint (caption, filter clip-score, train --pretrained, finetune, attention-distance),
by the real ``qcap`` entry point.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_jpeg, make_uid

from base.models import CONFIG_FILE, WEIGHTS_FILE, load_model, save_checkpoint_dir
from base.shards import Sample, ShardWriter, finalize_folder

QCAP = Path(sys.executable).parent / "qcap"
ROOT = Path(__file__).resolve().parents[1]


class RunsShell:
    """Unpickling this runs ``os.system`` (a shell command that writes the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.command = f"echo pwned > {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(good CLIP folder, marker path, {name: hostile checkpoint path})."""
    root = tmp_path_factory.mktemp("hostile-checkpoints")
    torch.manual_seed(0)
    good = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", root / "good")
    coca = save_checkpoint_dir(load_model("qcap-tiny-coca").model, "qcap-tiny-coca", root / "coca")
    marker = root / "MARKER"
    weights = (good / WEIGHTS_FILE).read_bytes()
    config = (good / CONFIG_FILE).read_bytes()
    evil_torch = _torch_bytes({"state_dict": RunsShell(marker)})
    evil_pickle = pickle.dumps({"visual.proj": RunsShell(marker)})
    good_pt = _torch_bytes(load_model("qcap-tiny-clip").model.state_dict())
    cases: dict[str, Path] = {}

    def folder(name: str, *, config_bytes: bytes | None = config, files: dict[str, bytes] | None = None) -> None:
        path = root / name
        path.mkdir()
        if config_bytes is not None:
            (path / CONFIG_FILE).write_bytes(config_bytes)
        for file_name, data in (files if files is not None else {WEIGHTS_FILE: weights}).items():
            (path / file_name).write_bytes(data)
        cases[name] = path

    def file(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)
        cases[name] = root / name

    file("os-system.pt", evil_torch)
    file("os-system-raw-pickle.bin", evil_pickle)
    file("truncated.pt", good_pt[: len(good_pt) // 2])
    file("garbage.pt", b"this is not a checkpoint at all " * 20)
    file("empty.pt", b"")
    file("list.pt", _torch_bytes([torch.zeros(2)]))
    file("truncated.safetensors", weights[: len(weights) // 2])
    file("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 4)
    file("coca-weights-for-clip.safetensors", (coca / WEIGHTS_FILE).read_bytes())
    folder("dir-pickle-as-safetensors", files={WEIGHTS_FILE: evil_pickle})
    folder("dir-os-system-bin", files={"open_clip_pytorch_model.bin": evil_torch})
    folder("dir-truncated-weights", files={WEIGHTS_FILE: weights[: len(weights) // 3]})
    folder("dir-config-not-json", config_bytes=b'{"model_cfg": {"embed_dim": ')
    folder("dir-config-a-list", config_bytes=b"[1, 2, 3]")
    folder("dir-config-no-model-cfg", config_bytes=json.dumps({"model_name": "qcap-tiny-clip"}).encode())
    folder("dir-config-bogus-model-cfg", config_bytes=json.dumps(
        {"model_cfg": {"embed_dim": 32, "vision_cfg": "nonsense"}, "model_name": "qcap-tiny-clip"}).encode())
    folder("dir-no-weights", files={})
    return good, marker, cases


FORBIDDEN = ("weights_only=False", "weights_only` set to `False", "Traceback")


def test_load_model_refuses_every_hostile_checkpoint_as_one_line(hostile):
    good, marker, cases = hostile
    for name, path in cases.items():
        with pytest.raises(ValueError) as info:
            load_model("qcap-tiny-clip", checkpoint=str(path))
        message = str(info.value)
        assert len(message.splitlines()) == 1, (name, message)
        assert str(path) in message, (name, message)
        assert not any(word in message for word in FORBIDDEN), (name, message)
        assert not marker.exists(), f"{name}: loading ran the pickle's code"
    # what the messages say, for the kinds a user meets
    def refused(name: str) -> str:
        with pytest.raises(ValueError) as info:
            load_model("qcap-tiny-clip", checkpoint=str(cases[name]))
        return str(info.value)

    assert "would run code" in refused("os-system.pt") and "posix.system" in refused("os-system.pt")
    assert "would run code" in refused("dir-os-system-bin")
    assert "truncated or corrupt" in refused("truncated.safetensors")
    assert "not a state dict" in refused("list.pt")
    assert "does not fit model 'qcap-tiny-clip'" in refused("coca-weights-for-clip.safetensors")
    assert "must hold a JSON object" in refused("dir-config-a-list")
    assert "not a readable JSON config" in refused("dir-config-not-json")
    assert "no weights file" in refused("dir-no-weights")
    # the same rules for --pretrained FILE, and a good checkpoint still loads
    with pytest.raises(ValueError, match="would run code"):
        load_model("qcap-tiny-clip", pretrained=str(cases["os-system.pt"]))
    assert load_model(checkpoint=str(good)).name == "qcap-tiny-clip"
    assert not marker.exists()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One tiny image shard folder and one image folder, for the commands to get to their model."""
    root = tmp_path_factory.mktemp("inputs")
    with ShardWriter(root / "shards", 0) as writer:
        for i in range(2):
            writer.write(Sample(key=f"0000000{i}", uid=make_uid(i), image=make_jpeg(seed=i), text=f"a photo {i}"))
    finalize_folder(root / "shards")
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(make_jpeg(64, 64))
    (root / "seg").mkdir()
    return root


def _commands(path: Path, inputs: Path, out: Path) -> dict[str, list[str]]:
    bare = path.is_file()
    model = ["--model", "qcap-tiny-clip"] if bare else []
    return {
        "caption": ["caption", "--shards", str(inputs / "shards"), "--out", str(out / "syn"), "--checkpoint",
                    str(path), *(["--model", "qcap-tiny-coca"] if bare else []), "--no-progress"],
        "clip-score": ["filter", "clip-score", "--shards", str(inputs / "shards"), "--checkpoint", str(path),
                       *model, "--top-fraction", "0.5", "--out", str(out / "u.npy"), "--num-cpus", "2"],
        "train": ["train", "--preset", "tiny", "--data", str(inputs / "shards"), "--out", str(out / "run"),
                  "--pretrained", str(path)],
        "finetune": ["finetune", "seg", "--checkpoint", str(path), *model, "--data", str(inputs / "seg"),
                     "--out", str(out / "ft")],
        "attention-distance": ["attention-distance", "--checkpoint", str(path), *model, "--images",
                               str(inputs / "images"), "--out", str(out / "ad")],
    }


@pytest.mark.parametrize("case", ["os-system.pt", "dir-os-system-bin", "truncated.safetensors",
                                  "dir-config-a-list", "dir-config-not-json"])
def test_every_command_refuses_a_hostile_checkpoint_with_one_line(hostile, inputs, tmp_path, capsys, case):
    from qcap.cli import main

    _, marker, cases = hostile
    path = cases[case]
    for command, argv in _commands(path, inputs, tmp_path).items():
        if command == "train" and path.is_dir():
            continue  # --pretrained takes a weights file (or a tag)
        code = main(argv)
        err = capsys.readouterr().err.strip()
        lines = [line for line in err.splitlines() if ": error: " in line]
        assert code == 2, (command, err)
        assert len(lines) == 1 and str(path) in lines[0], (command, err)
        assert not any(word in err for word in FORBIDDEN), (command, err)
        assert not marker.exists(), f"{command}: ran the pickle's code"


@pytest.mark.slow  # ~17 s of subprocesses; every command's refusal runs in-process above
def test_the_installed_command_prints_one_line_and_runs_nothing(hostile, inputs, tmp_path):
    """The real process, stdin closed: stderr is exactly one line, the marker never appears."""
    _, marker, cases = hostile
    env = {**os.environ, "QCAP_LOG_LEVEL": "ERROR"}
    for command, case in (("train", "os-system.pt"), ("finetune", "dir-os-system-bin")):
        argv = _commands(cases[case], inputs, tmp_path)[command]
        proc = subprocess.run([str(QCAP), *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              cwd=ROOT, env=env, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (command, proc.stderr)
        assert "would run code" in lines[0] and str(cases[case]) in lines[0], lines
        assert not marker.exists()
