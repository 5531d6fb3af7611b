"""captioning.vocab: a BPE vocabulary fitted to the world, loaded through open_clip's HF-tokenizer path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from world.config import WorldConfig
from world.generate import generate_world

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("vocab")
    world = root / "w"
    generate_world(WorldConfig(out=world, num_samples=60, clean_samples=20, eval_samples=8, chunk_size=60, workers=1,
                               eval_image_size=32, clean_image_size=48), progress=False)
    run = subprocess.run([sys.executable, "-m", "captioning.vocab", "--world", str(world), "--out", str(root / "vocab"),
                          "--vocab-size", "400"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return root / "vocab", json.loads((root / "vocab" / "vocab.json").read_text())


def test_fitted_vocabulary_is_small_and_covers_the_world(vocab):
    folder, summary = vocab
    assert summary["vocab_size"] <= 400 and summary["texts"] > 100
    assert summary["special_ids"]["pad"] == 0
    assert summary["special_ids"]["eot"] == summary["vocab_size"] - 1  # highest: argmax pooling finds it
    assert summary["unk_share"] < 0.01
    config = json.loads((folder / "qcap-tiny-coca-world.json").read_text())
    assert config["text_cfg"]["vocab_size"] == config["multimodal_cfg"]["vocab_size"] == summary["vocab_size"]
    assert Path(config["text_cfg"]["hf_tokenizer_name"]) == (folder / "tokenizer").resolve()


def test_open_clip_loads_it_and_coca_trains_and_decodes_with_its_ids(vocab):
    from open_clip import CoCaLoss
    from open_clip.tokenizer import HFTokenizer

    from base.models import load_model
    from captioning.decode import generate
    from captioning.vocab import register, special_token_ids

    folder, summary = vocab
    name = register(folder / "qcap-tiny-coca-world.json")
    loaded = load_model(name)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    ids = special_token_ids(loaded.tokenizer)
    assert ids == summary["special_ids"]
    tokens = loaded.tokenizer(["a small red circle on the left", "two big blue squares"])
    assert tokens.shape == (2, 32) and int(tokens.max()) < summary["vocab_size"]
    assert (tokens[:, 0] == ids["sot"]).all()
    assert (tokens.argmax(dim=-1) == (tokens == ids["eot"]).int().argmax(dim=-1)).all()
    model = loaded.model.train()
    out = model(image=torch.randn(2, 3, 64, 64), text=tokens)
    assert out["logits"].shape[-1] == summary["vocab_size"]  # the decoder projects onto the fitted vocabulary
    parts = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)(
        out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"], output_dict=True)
    sum(parts.values()).backward()
    model.eval()
    with torch.no_grad():
        generated = generate(model, torch.randn(2, 3, 64, 64), decoding="top_p", num_captions=2, seq_len=12,
                             generator=torch.Generator().manual_seed(0), sot_token_id=ids["sot"], eos_token_id=ids["eot"],
                             pad_token_id=ids["pad"])
    assert generated.shape[0] == 4 and (generated[:, 0] == ids["sot"]).all()
    assert int(generated.max()) < summary["vocab_size"]
    text = loaded.tokenizer.tokenizer.decode(generated[0].tolist(), skip_special_tokens=True)
    assert isinstance(text, str)


def test_a_cnn_tower_captioner_with_the_fitted_vocab_loads_in_a_fresh_process_and_captions(vocab, tmp_path):
    """fit-vocab --base qcap-tiny-coca-resnet10t: the world's vocabulary on the CNN-tower CoCa; its
    checkpoint folder loads in a new process (no QCAP_MODEL_CONFIGS) and captions with its own ids."""
    from base.models import load_model, save_checkpoint_dir
    from captioning.vocab import register

    folder, summary = vocab
    world = folder.parent / "w"
    out = tmp_path / "vocab-cnn"
    run = subprocess.run([sys.executable, "-m", "captioning.vocab", "--world", str(world), "--out", str(out),
                          "--vocab-size", "400", "--base", "qcap-tiny-coca-resnet10t"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    config = json.loads((out / "qcap-tiny-coca-resnet10t-world.json").read_text())
    assert config["vision_cfg"]["timm_model_name"] == "resnet10t" and config["vision_cfg"]["output_tokens"] is True
    name = register(out / "qcap-tiny-coca-resnet10t-world.json")
    loaded = load_model(name)
    assert type(loaded.model.visual).__name__ == "TimmTokenTower"
    size = config["vision_cfg"]["image_size"]
    out_dict = loaded.model(image=torch.randn(2, 3, size, size), text=loaded.tokenizer(["a red circle", "a star"]))
    assert out_dict["logits"].shape[-1] == config["multimodal_cfg"]["vocab_size"]
    save_checkpoint_dir(loaded.model, name, tmp_path / "cap")
    script = (
        "import torch\n"
        "from captioning.backends import CaptionerSpec, OpenClipCaptioner\n"
        "from captioning.params import DecodeParams\n"
        f"c = OpenClipCaptioner(CaptionerSpec(checkpoint={str(tmp_path / 'cap')!r}))\n"
        "print(type(c.model.visual).__name__, c.sot, c.eot)\n"
        f"raw = c.caption(torch.randn(2, 3, {size}, {size}), DecodeParams(decoding='top_p', num_captions=2, top_p=0.9, "
        "seq_len=12), seeds=[1, 2])\n"
        "print(sum(len(r) for r in raw))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "QCAP_MODEL_CONFIGS"}
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    lines = fresh.stdout.split()
    assert lines[:3] == ["TimmTokenTower", str(summary["special_ids"]["sot"]), str(summary["special_ids"]["eot"])]
    assert lines[3] == "4"


def test_clip_tokenizer_ids_and_bad_world(tmp_path):
    import open_clip

    from captioning.vocab import special_token_ids

    assert special_token_ids(open_clip.get_tokenizer("ViT-B-32")) == {"sot": 49406, "eot": 49407, "pad": 0}
    run = subprocess.run([sys.executable, "-m", "captioning.vocab", "--world", str(tmp_path), "--out", str(tmp_path / "v")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "truth.parquet: missing" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow  # ~17 s; open_clip training and decoding with the fitted ids is the test above
def test_a_fitted_vocab_captioner_trains_with_qcap_train_and_captions_with_its_own_ids(vocab, tmp_path):
    """QCAP_MODEL_CONFIGS registers the fitted config; the checkpoint carries the tokenizer path; the
    captioner backend takes its start/end ids from that tokenizer (not CLIP's 49406/49407)."""
    import os

    from captioning.backends import CaptionerSpec, OpenClipCaptioner
    from captioning.params import DecodeParams

    folder, summary = vocab
    world = folder.parent / "w"
    env = {**os.environ, "QCAP_MODEL_CONFIGS": str(folder / "qcap-tiny-coca-world.json")}
    qcap = str(Path(sys.executable).parent / "qcap")
    run = subprocess.run([qcap, "train", "--preset", "tiny-coca", "--model", "qcap-tiny-coca-world", "--data",
                          str(world / "clean"), "--out", str(tmp_path / "cap"), "--samples-seen", "16", "--batch-size",
                          "8", "--workers", "0", "--threads", "1", "--tracker", "none"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    captioner = OpenClipCaptioner(CaptionerSpec(checkpoint=str(tmp_path / "cap")))  # no env var needed here
    assert (captioner.sot, captioner.eot) == (summary["special_ids"]["sot"], summary["special_ids"]["eot"])
    pixels = torch.randn(2, 3, 64, 64)
    raw = captioner.caption(pixels, DecodeParams(decoding="top_p", num_captions=5, top_p=0.9, seq_len=20), seeds=[1, 2])
    assert [len(r) for r in raw] == [5, 5]
    assert all(isinstance(c.text, str) and "<" not in c.text for r in raw for c in r)
    bad = subprocess.run([qcap, "train", "--preset", "tiny-coca", "--model", "qcap-tiny-coca-world", "--data",
                          str(world / "clean"), "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "QCAP_MODEL_CONFIGS": str(tmp_path / "nothing.json")})
    assert bad.returncode != 0 and "QCAP_MODEL_CONFIGS" in bad.stderr and "Traceback" not in bad.stderr
