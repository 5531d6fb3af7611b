"""The Hugging Face image-to-text backend, with tiny BLIP and GIT models built here (no downloads)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from captioning.backends import BACKENDS, CaptionerSpec, HFCaptioner, load_captioner
from captioning.params import DecodeParams

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + (
    ["a", "an", "the", "dog", "cat", "sits", "on", "in", "table", "red", "blue", "photo", "of", "with", "grass", "runs", "field", "ball"]
)


def tiny_hf_captioner(folder: Path, kind: str = "blip") -> Path:
    """Save a randomly initialised tiny BLIP or GIT (model, tokenizer, image processor) to ``folder``."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        CLIPImageProcessor,
        GitConfig,
        GitForCausalLM,
        GitProcessor,
    )

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, bos_token="[DEC]")
    vision = {"hidden_size": 32, "image_size": 32, "patch_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    if kind == "blip":
        text = {"vocab_size": len(WORDS), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 40, "bos_token_id": 5, "eos_token_id": 3,
                "sep_token_id": 3, "pad_token_id": 0}
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
        processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                                  tokenizer=tokenizer)
    else:
        config = GitConfig(vision_config=vision, vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                           bos_token_id=2, eos_token_id=3, pad_token_id=0)
        model = GitForCausalLM(config)
        processor = GitProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            tokenizer=tokenizer,
        )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def pil_images(num: int):
    from PIL import Image

    return [Image.new("RGB", (40 + i, 30), ((i * 70) % 256, (i * 40) % 256, 200)) for i in range(num)]


@pytest.mark.parametrize("kind", ["blip", pytest.param("git", marks=pytest.mark.slow)])
def test_hf_backend_captions_behind_the_same_interface(tmp_path, kind):
    folder = tiny_hf_captioner(tmp_path / kind, kind)
    captioner = load_captioner(CaptionerSpec(backend="hf", model=str(folder)))
    assert isinstance(captioner, HFCaptioner) and BACKENDS["hf"] is HFCaptioner
    identity = captioner.describe()
    assert identity["backend"] == "hf" and identity["model"] == kind and len(identity["weights_sha256"]) == 64

    preprocess = pickle.loads(pickle.dumps(captioner.preprocess()))  # travels to Ray workers
    pixels = torch.stack([preprocess(image) for image in pil_images(3)])
    assert pixels.shape == (3, 3, 32, 32)

    greedy = DecodeParams(decoding="greedy", seq_len=12, min_seq_len=2)
    first = captioner.caption(pixels, greedy, seeds=[0, 1, 2])
    assert [len(group) for group in first] == [1, 1, 1]
    assert captioner.caption(pixels, greedy, seeds=[7, 8, 9]) == first  # deterministic
    for group in first:
        caption = group[0]
        assert set(caption.text.split()) <= set(WORDS[6:]) and 1 <= caption.num_tokens <= 11

    sampled = DecodeParams(decoding="top_p", top_p=0.9, num_captions=3, seq_len=12, min_seq_len=2)
    together = captioner.caption(pixels, sampled, seeds=[10, 11, 12])
    alone = captioner.caption(pixels[1:2], sampled, seeds=[11])
    assert [len(group) for group in together] == [3, 3, 3]
    assert together[1] == alone[0]  # an image's samples depend on its seed, not on its batch
    assert captioner.caption(pixels, sampled, seeds=[10, 11, 99])[:2] == together[:2]

    beam = DecodeParams(decoding="beam", num_beams=4, num_beam_groups=2, seq_len=12, min_seq_len=2)
    assert [len(group) for group in captioner.caption(pixels, beam, seeds=[0, 1, 2])] == [1, 1, 1]
    assert captioner.effective_decoding(beam)["num_beam_groups"] == 1  # transformers 5 has no group beam search


def test_hf_backend_refuses_what_it_cannot_load(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face image-to-text model"):
        load_captioner(CaptionerSpec(backend="hf", model=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="--pretrained is an open_clip tag"):
        load_captioner(CaptionerSpec(backend="hf", model="x", pretrained="laion2b"))
    with pytest.raises(ValueError, match="unknown captioner backend 'onnx'"):
        load_captioner(CaptionerSpec(backend="onnx", model="x"))
