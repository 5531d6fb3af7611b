"""Test data for build-dr, subset and card tests: curated image shards, caption shards in
``qcap caption``'s documented formats, and a folder laid out like Apple's DataCompDR."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from conftest import make_jpeg, make_uid

from base.shards import Sample, ShardWriter, finalize_folder

CAPTIONER = {"backend": "open_clip", "model": "qcap-tiny-coca", "source": "/models/coca", "weights_sha256": "ab" * 32}
DECODING = {"decoding": "top_p", "top_p": 0.9, "temperature": 1.0, "num_captions": 3, "seq_len": 30,
            "min_seq_len": 5, "repetition_penalty": 1.0}


def image_sample(key: str, number: int, *, with_uid: bool = True) -> Sample:
    """An image sample as reshard writes it; ``with_uid=False``: its KEY.json lacks the uid."""
    image = make_jpeg(32, 24, seed=number)
    return Sample(key=key, uid=make_uid(number) if with_uid else None, image=image, text=f"web text of image {number}",
                  meta={"sha256": hashlib.sha256(image).hexdigest(), "url": f"http://example.com/{number}.jpg",
                        "clip_b32_similarity_score": 0.3})


def write_images(folder: Path, layout: list[list[int]], *, extra: dict[int, list[Sample]] | None = None) -> Path:
    """Curated shards: shard i holds the images numbered ``layout[i]`` (keys like reshard's),
    plus any ``extra[i]`` samples (duplicates, missing uids) and a failed row in shard 0."""
    for shard, numbers in enumerate(layout):
        with ShardWriter(folder, shard) as writer:
            for index, number in enumerate(numbers):
                writer.write(image_sample(f"{shard:05d}{index:04d}", number))
            for index, sample in enumerate((extra or {}).get(shard, [])):
                sample.key = f"{shard:05d}{9000 + index:04d}"
                writer.write(sample)
            if shard == 0:
                writer.write(Sample(key=f"{shard:05d}9999", uid=make_uid(99_999), status="http_404",
                                    error_message="HTTP 404"))
    finalize_folder(folder)
    return folder


def syn_captions(number: int, num: int = 3) -> list[str]:
    return [f"synthetic caption {j} of image {number} with a red cube" for j in range(num)]


def qcap_provenance(captions: list[str], flags: list[list[str]] | None = None,
                    scores: list[float | None] | None = None, seed: int = 0) -> dict:
    flags = flags or [[] for _ in captions]
    scores = scores or [None] * len(captions)
    return {"captioner": CAPTIONER, "decoding": DECODING, "seed": seed, "image_seed": 7, "postprocess": "first_sentence",
            "scorer": None, "qcap_version": "0.1.0",
            "captions": [{"raw": c + ". more", "num_tokens": 9, "flags": f, "score": s}
                         for c, f, s in zip(captions, flags, scores, strict=True)]}


def write_qcap_captions(folder: Path, layout: list[list[int]], *, failed: dict[int, str] | None = None,
                        captions: dict[int, tuple[list[str], list[list[str]], list]] | None = None,
                        key_prefix: str = "cap") -> Path:
    """Caption-only shards exactly as ``qcap caption --format webdataset`` writes them, keyed
    unlike the images (``key_prefix``); ``failed`` numbers get a failure row (Parquet only)."""
    failed = failed or {}
    for shard, numbers in enumerate(layout):
        with ShardWriter(folder, shard) as writer:
            for index, number in enumerate(numbers):
                key = f"{key_prefix}{shard:03d}x{index:04d}"
                if number in failed:
                    writer.write(Sample(key=key, uid=make_uid(number), meta={"sha256": "0" * 64},
                                        status=failed[number], error_message="undecodable image"))
                    continue
                texts, flags, scores = (captions or {}).get(number, (syn_captions(number), None, None))
                writer.write(Sample(key=key, uid=make_uid(number), syn_text=texts,
                                    syn_provenance=qcap_provenance(texts, flags, scores),
                                    meta={"sha256": hashlib.sha256(make_jpeg(32, 24, seed=number)).hexdigest(),
                                          "num_syn": len(texts)}))
            writer.close(extra_stats={"num_input": len(numbers)})
    finalize_folder(folder)
    (folder / "config.json").write_text(json.dumps({
        "stage": "caption", "config": {"seed": 0, "first_sentence": True, "num_captions": 3}, "captioner": CAPTIONER,
        "decoding": DECODING, "scorer": None}))
    return folder


def write_qcap_side_tables(folder: Path, layout: list[list[int]], *, failed: dict[int, str] | None = None) -> Path:
    """``qcap caption --format parquet`` side tables, written with the captioning stage's own schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from captioning.job import parquet_schema

    folder.mkdir(parents=True, exist_ok=True)
    failed = failed or {}
    for shard, numbers in enumerate(layout):
        rows = []
        for index, number in enumerate(numbers):
            row = {"key": f"side{shard}x{index}", "uid": make_uid(number), "status": "success", "error_message": None,
                   "sha256": None, "syn_text": None, "syn_flags": None, "syn_scores": None, "qcap": None}
            if number in failed:
                row.update(status=failed[number], error_message="undecodable image")
            else:
                texts = syn_captions(number)
                row.update(syn_text=texts, syn_flags=[[] for _ in texts], syn_scores=[0.25] * len(texts),
                           qcap=json.dumps(qcap_provenance(texts, scores=[0.25] * len(texts))))
            rows.append(row)
        pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema()), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}.done").write_bytes(b"")
    return folder


def apple_npz(num_syn: int, number: int, dim: int = 8, num_aug: int = 3) -> bytes:
    rng = np.random.default_rng(number)
    sink = io.BytesIO()
    np.savez(sink, image_emb=rng.standard_normal((num_aug, dim)).astype(np.float32),
             text_emb=rng.standard_normal((1 + num_syn, dim)).astype(np.float32))
    return sink.getvalue()


def write_apple(folder: Path, layout: dict[str, list[int]], *, captions: dict[int, list[str]] | None = None) -> Path:
    """Tars laid out like Apple's DataCompDR-1B (``NN/000000XX.tar``, no Parquet, no sizes.json),
    members ``url.txt``, ``syn.json``, ``paug.json``, ``npz`` and ``json`` = {uid, sha256}.

    Written with :mod:`tarfile` on purpose: this emulates a producer that is not qcap (Apple's
    own writer), so its bytes must not come from our ShardWriter."""
    for relative, numbers in layout.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for index, number in enumerate(numbers):
                key = f"{index:08d}"
                texts = (captions or {}).get(number, syn_captions(number, 5))
                members = {
                    "url.txt": f"http://example.com/{number}.jpg".encode(),
                    "syn.json": json.dumps({"syn_text": texts}).encode(),
                    "paug.json": json.dumps({"param_aug": json.dumps([{"crop": [0, 0, 1, 1], "n": number}])}).encode(),
                    "npz": apple_npz(len(texts), number),
                    "json": json.dumps({"uid": make_uid(number), "sha256": "f" * 64}).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (path.parent / "manifest.jsonl").write_text(json.dumps({"shard": path.stem, "num_samples": len(numbers)}) + "\n")
    return folder
