"""A vocabulary fitted to the embedded world, for a captioner whose decoder projection fits it.

Usage::

    qcap fit-vocab --world W --out W/vocab [--vocab-size 1024] [--base qcap-tiny-coca]
    QCAP_MODEL_CONFIGS=W/vocab/qcap-tiny-coca-world.json qcap train --preset tiny-coca --model qcap-tiny-coca-world ...

The tiny CoCa decodes over CLIP's 49,408-token vocabulary while the world's text uses a few
hundred words, so most of the captioner's compute is the vocabulary projection (and its
softmax) for tokens it never sees. This fits a BPE tokenizer with Hugging Face ``tokenizers`` on
the world's own text — every true description, every alt-text and every clean caption in
``truth.parquet`` and ``clean/`` — and writes

- ``OUT/tokenizer/`` — a ``transformers`` fast tokenizer folder (``tokenizer.json``,
  ``tokenizer_config.json``): ``<pad>`` = 0 (open_clip pads with 0; CoCa's loss ignores it),
  ``<unk>``, ``<start_of_text>``, and ``<end_of_text>`` as the **highest** id, so open_clip's
  ``argmax`` text pooling still finds the end of the text as it does with CLIP's tokenizer;
  every text becomes ``<start_of_text> … <end_of_text>`` (a template post-processor);
- ``OUT/<name>.json`` — ``--base``'s open_clip model config with ``vocab_size`` set to the fitted
  vocabulary (text tower and multimodal decoder) and ``text_cfg.hf_tokenizer_name`` pointing at
  ``OUT/tokenizer`` (absolute path): open_clip's own HF-tokenizer path
  (``open_clip.get_tokenizer``) then loads it for that model; ``register(OUT/<name>.json)``
  adds the config to open_clip's registry;
- ``OUT/vocab.json`` — the settings and counts (texts, vocabulary size, mean tokens per text).

Decoding with such a model must take its start/end/pad ids from the tokenizer
(:func:`special_token_ids`), not CLIP's constants 49406/49407.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from base.cli import UsageError
from base.config import arg, parse_config

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"
TOKENIZER_DIR = "tokenizer"
SUMMARY_FILE = "vocab.json"


@dataclass(kw_only=True)
class VocabConfig:
    """Fit a BPE tokenizer on a world's text and write an open_clip model config that uses it."""

    world: Path = arg(help="the world folder (truth.parquet, clean/)", metavar="W")
    out: Path = arg(help="output folder: tokenizer/, <name>.json, vocab.json", metavar="DIR")
    vocab_size: int = arg(1024, help="BPE vocabulary size (special tokens included); the world needs a few hundred")
    min_frequency: int = arg(2, help="a merge must occur this often")
    base: str = arg("qcap-tiny-coca", help="open_clip model config to copy with the fitted vocabulary")
    name: str | None = arg(None, help="model name of the written config (default: BASE-world)")

    def __post_init__(self) -> None:
        if self.vocab_size < 16:
            raise ValueError(f"vocab_size: must be >= 16, got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency: must be >= 1, got {self.min_frequency}")


def world_texts(world: Path) -> Iterator[str]:
    """Every description, alt-text and clean caption of a world."""
    import pyarrow.parquet as pq

    from base.shards import expand_shards, iter_samples

    path = world / "truth.parquet"
    if not path.is_file():
        raise UsageError(f"{path}: missing; is {world} a world folder (made by `qcap world`)?")
    table = pq.read_table(path, columns=["description", "text"])
    for column in ("description", "text"):
        yield from (t for t in table.column(column).to_pylist() if t)
    clean = world / "clean"
    if (clean / "sizes.json").is_file():
        for sample in iter_samples(expand_shards(str(clean)), with_image=False):
            captions = sample.meta.get("captions") if isinstance(sample.meta, dict) else None
            yield from (c for c in (captions or [sample.text]) if isinstance(c, str) and c)


def fit_tokenizer(texts: list[str], out: Path, *, vocab_size: int = 1024, min_frequency: int = 2):
    """Train the BPE tokenizer on ``texts`` and save it as a transformers fast tokenizer in ``out``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  special_tokens=[PAD, UNK, SOT], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([EOT])  # appended: the highest id (open_clip's argmax pooling finds it)
    sot, eot = tok.token_to_id(SOT), tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SOT, eos_token=EOT, pad_token=PAD, unk_token=UNK)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """``{"sot", "eot", "pad"}`` of an open_clip tokenizer: an ``HFTokenizer`` (its transformers
    tokenizer's bos/eos/pad ids) or CLIP's ``SimpleTokenizer`` (49406, 49407, pad 0)."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and getattr(inner, "bos_token_id", None) is not None:
        return {"sot": int(inner.bos_token_id), "eot": int(inner.eos_token_id), "pad": int(inner.pad_token_id or 0)}
    if hasattr(tokenizer, "sot_token_id") and hasattr(tokenizer, "eot_token_id"):
        return {"sot": int(tokenizer.sot_token_id), "eot": int(tokenizer.eot_token_id), "pad": 0}
    raise ValueError(f"{type(tokenizer).__name__}: cannot tell its start/end token ids")


def model_config(base: str, tokenizer_dir: Path, vocab_size: int) -> dict[str, Any]:
    from base.models import model_config as registry_config

    cfg = copy.deepcopy(registry_config(base))
    cfg["text_cfg"]["vocab_size"] = vocab_size
    cfg["text_cfg"]["hf_tokenizer_name"] = str(tokenizer_dir.resolve())
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"]["vocab_size"] = vocab_size
    return cfg


def register(config_path: Path) -> str:
    """Add a written config to open_clip's registry (model name = the file's stem)."""
    import open_clip

    from base.models import register_model_configs

    register_model_configs()
    open_clip.add_model_config(str(config_path))
    return config_path.stem


def build(cfg: VocabConfig) -> dict[str, Any]:
    from base.shards import atomic_write_json

    texts = list(world_texts(cfg.world))
    if not texts:
        raise UsageError(f"{cfg.world}: no text to fit a vocabulary on")
    fast = fit_tokenizer(texts, cfg.out / TOKENIZER_DIR, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    size = len(fast)
    name = cfg.name or f"{cfg.base}-world"
    config_path = cfg.out / f"{name}.json"
    atomic_write_json(config_path, model_config(cfg.base, cfg.out / TOKENIZER_DIR, size))
    lengths = [len(ids) for ids in fast(texts[:2000])["input_ids"]]
    ids = special_token_ids(type("T", (), {"tokenizer": fast})())
    summary = {"world": str(cfg.world), "texts": len(texts), "vocab_size": size, "asked_vocab_size": cfg.vocab_size,
               "special_ids": ids, "mean_tokens_per_text": statistics.fmean(lengths), "max_tokens_per_text": max(lengths),
               "unk_share": sum(t == fast.unk_token_id for seq in fast(texts[:2000])["input_ids"] for t in seq)
               / max(1, sum(lengths)), "model_name": name, "model_config": str(config_path), "base": cfg.base}
    atomic_write_json(cfg.out / SUMMARY_FILE, summary)
    return summary


def main(argv: list[str], prog: str = "qcap fit-vocab") -> int:
    cfg = parse_config(VocabConfig, argv, prog=prog)
    summary = build(cfg)
    print(f"{cfg.out}: vocabulary of {summary['vocab_size']} tokens from {summary['texts']} texts "
          f"({summary['mean_tokens_per_text']:.1f} tokens per text, max {summary['max_tokens_per_text']}); "
          f"model config {summary['model_config']} ({json.dumps(summary['special_ids'])})")
    return 0


if __name__ == "__main__":
    from base.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:], "python -m captioning.vocab"))
