"""Apple's released DataCompDR caption/embedding shards, read as a caption source for ``qcap build-dr``.

Layout (apple/ml-mobileclip's ``training/README.md`` and ``hf_dataset_example.py``; the Hugging
Face cards of ``apple/DataCompDR-12M`` and ``apple/DataCompDR-1B``): webdataset tars without
images, ``DataCompDR-1B`` in numbered sub-folders (``00/00000010.tar`` …) with a
``manifest.jsonl``, no Parquet and no ``sizes.json``. Per sample:

- ``KEY.url.txt`` — the image URL;
- ``KEY.syn.json`` — ``{"syn_text": [5 CoCa captions]}`` (``coca_ViT-L-14``, per Apple);
- ``KEY.paug.json`` — ``{"param_aug": ...}``: the stored image augmentations (30 for 12M, 10 for 1B);
- ``KEY.npz`` — teacher embeddings: ``image_emb`` [augmentations, 1536], ``text_emb``
  [1 + 5, 1536] with the real caption at index 0 and synthetic caption i at 1 + i
  (``DataCompDR-12M-bf16`` has ``KEY.pth.gz`` instead);
- ``KEY.json`` — ``{"uid": ..., "sha256": ...}``: DataComp's uid, the join key.

Apple's shards carry no real caption and no image: the real caption and the image come from
the user's own image shards, joined by uid. ``paug.json``, ``npz`` and ``url.txt`` are carried
into the DR shards unchanged — except that when synthetic captions are dropped at build time,
``text_emb`` is re-indexed so row 0 stays the real caption and row 1 + i stays ``syn_text[i]``.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from base.shards import ShardError

ORIGIN = "apple/DataCompDR"
EMBEDDINGS = "npz"
CARRIED = ("url.txt", "paug.json", "npz", "pth.gz")
# What Apple's dataset cards say about how the captions were made (for provenance and cards).
DOCUMENTED = {
    "captioner": "coca_ViT-L-14 (OpenCLIP), as documented by Apple",
    "num_captions": 5,
    "teachers": "ViT-L-14 datacomp_xl_s13b_b90k + openai (1536-d: 2 x 768 concatenated)",
}


def list_tars(folder: str) -> list[str]:
    """Every ``.tar`` under ``folder`` (sub-folders included, as DataCompDR-1B is laid out), sorted."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(folder))
    if not fs.isdir(root):
        raise ShardError(f"{folder}: --apple-syn needs a folder of Apple's DataCompDR tars")
    found = sorted(p for p in fs.find(root) if p.endswith(".tar") and not os.path.basename(p).startswith("."))
    if not found:
        raise ShardError(f"{folder}: no .tar shards found (Apple's DataCompDR caption shards)")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return found if local else [fs.unstrip_protocol(p) for p in found]


def provenance(flags: list[list[str]]) -> dict[str, Any]:
    """qcap's ``KEY.qcap.json`` for captions that came from Apple's shards (no scores, flags
    computed at build time with :func:`captioning.quality.caption_flags`)."""
    return {
        "origin": ORIGIN,
        "captioner": None,
        "documented": DOCUMENTED,
        "captions": [{"flags": f, "score": None, "raw": None, "num_tokens": None} for f in flags],
    }


def realign_embeddings(extras: dict[str, bytes], kept: list[int], num_syn: int, where: str) -> dict[str, bytes]:
    """``extras`` with ``npz``'s ``text_emb`` re-indexed to the kept synthetic captions
    ([real, syn kept...]); other embedding formats cannot be re-indexed and are refused."""
    if kept == list(range(num_syn)):
        return extras
    if "pth.gz" in extras:
        raise ShardError(f"{where}: pth.gz embeddings cannot be re-indexed after dropping synthetic captions; "
                         "build with --drop-flags none (and no --min-score) to keep Apple's embeddings aligned")
    if EMBEDDINGS not in extras:
        return extras
    try:
        with np.load(io.BytesIO(extras[EMBEDDINGS]), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as err:
        raise ShardError(f"{where}: KEY.npz is not a readable npz ({err})") from err
    text = arrays.get("text_emb")
    if text is None or text.ndim < 1 or text.shape[0] != 1 + num_syn:
        shape = None if text is None else text.shape
        raise ShardError(f"{where}: npz text_emb has shape {shape}, expected [1 + {num_syn}, D] (real caption at 0); "
                         "cannot keep it aligned with dropped captions: build with --drop-flags none")
    arrays["text_emb"] = text[[0, *[1 + i for i in kept]]]
    sink = io.BytesIO()
    np.savez(sink, **arrays)
    return {**extras, EMBEDDINGS: sink.getvalue()}
