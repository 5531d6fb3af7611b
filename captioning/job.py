"""``qcap caption``: synthetic captions for every image of a shard folder, on Ray (DataCompDR).

Usage::

    qcap caption --shards runs/demo/curated --out runs/demo/syn \\
        --model coca_ViT-L-14 --pretrained mscoco_finetuned_laion2B-s13B-b90k \\
        --num-captions 5 --decoding top_p --top-p 0.9 --device cuda --num-workers 8

    qcap caption --shards runs/demo/curated --out runs/demo/syn --checkpoint runs/coca/final \\
        --format parquet --scorer-model ViT-B-32 --scorer-pretrained laion2b_s34b_b79k

The pipeline is one streamed Ray Data job: read the input shards (tasks, a few hundred
samples at a time) → decode and preprocess the images (tasks) → caption them (actors, one
model per actor, ``--gpus-per-worker`` GPUs each) → the driver gathers each shard's rows
and writes output shard ``i`` for input shard ``i`` atomically, with its completion marker.
A re-run (after a crash or a SIGKILL) skips shards whose marker exists and redoes the rest
from scratch, so no caption is lost or written twice. Each image's sampling seed is derived
from ``--seed`` and its uid, so a redone shard gets the captions it would have got.

Output (see ARCHITECTURE.md, "caption"): caption-only shards keyed by uid, Apple's
``KEY.syn.json`` = ``{"syn_text": [...]}`` and qcap's provenance ``KEY.qcap.json``
(``--format webdataset``), or one Parquet side table per shard (``--format parquet``);
``config.json`` (the resolved config, captioner and scorer identity) and ``summary.json``
(counts that reconcile) beside them (a folder captioned before these names holds
``caption_config.json`` and ``caption_summary.json``; it resumes as it was).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from base.cli import UsageError
from base.config import arg, save_config
from base.raykit import ActorJobConfig
from base.stage import CONFIG_FILE, SUMMARY_FILE
from captioning.params import DecodeParams

log = logging.getLogger(__name__)

READ_CHUNK = 256  # samples per block out of the reader
# A folder holds captions made with one value of each field that shapes them (declared on CaptionConfig).
# Fingerprint fields added later: a folder captioned before they existed holds their defaults.
_FINGERPRINT_DEFAULTS = {"num_candidates": 0, "select": "score", "diversity": 0.5, "tag": None}


@dataclass(kw_only=True)
class CaptionConfig(ActorJobConfig):
    """Write N synthetic captions per image of a shard folder (DataCompDR), resumably, on Ray."""

    STAGE: ClassVar[str] = "caption"  # its name in dataset cards' lineage

    shards: str = arg(shapes_output=False, help="input shards: a folder, brace pattern or glob of .tar shards (curated output)")
    out: Path = arg(shapes_output=False, help="output folder; shard i of the input becomes shard i here")
    model: str | None = arg(None, help="open_clip CoCa name (coca_ViT-L-14, qcap-tiny-coca) or, for --backend hf, a hub id or folder")
    pretrained: str | None = arg(None, help="open_clip pretrained tag or weights file (e.g. mscoco_finetuned_laion2B-s13B-b90k)")
    checkpoint: str | None = arg(None, help="a checkpoint folder (qcap/open_clip local-dir, a training run, an HF folder) or weights file")
    backend: Literal["open_clip", "hf"] = arg("open_clip", help="captioner family: open_clip CoCa, or hf image-to-text (BLIP, GIT)")
    num_candidates: int = arg(0, help="over-generate: decode this many candidates per image and keep --num-captions "
                                      "of them by --select (LAION-COCO: 40 -> 5); 0: decode --num-captions")
    select: Literal["score", "diverse"] = arg("score", help="over-generation's choice: score (highest CLIP score, "
                                                            "needs --scorer-model) or diverse (score - λ·word overlap)")
    diversity: float = arg(0.5, help="--select diverse: λ, the weight of the overlap with the captions kept")
    tag: str | None = arg(None, help="captioner tag: write the captions under syn_text_<tag> (KEY.syn_tags.json, "
                                     "provenance KEY.qcap_tags.json) instead of Apple's syn_text")
    decode: DecodeParams = arg(factory=lambda: DecodeParams(decoding="top_p", num_captions=5), bare_flags=True,
                               help="how to decode (DataCompDR: top_p 0.9, 5 captions per image kept)")
    seed: int = arg(0, help="sampling seed; each image's seed derives from it and the image's uid")
    first_sentence: bool = arg(True, help="keep only the first sentence of each caption (DataCompDR)")
    scorer_model: str | None = arg(None, help="score each caption against its image with this open_clip CLIP (optional)")
    scorer_pretrained: str | None = arg(None, help="the scorer's pretrained tag or weights file")
    scorer_checkpoint: str | None = arg(None, help="the scorer's checkpoint folder or weights file")
    batch_size: int = arg(64, shapes_output=False, help="images per captioning call")
    output_format: Literal["webdataset", "parquet"] = arg("webdataset", flag="--format",
                                                          help="caption-only tar shards, or one Parquet side table per shard")
    max_pixels: int = arg(89_478_485, shapes_output=False, help="images with more pixels are refused undecoded (decompression bombs)")
    progress: bool = arg(True, shapes_output=False, help="show a progress bar")
    overwrite: bool = arg(False, shapes_output=False, help="start over: remove what qcap caption wrote in --out (its shards, markers, "
                                      "sizes.json, config and summary); other files are left alone")

    def __post_init__(self) -> None:
        if self.model is None and self.checkpoint is None:
            raise ValueError("model: give --model (with --pretrained, or alone for random weights) or --checkpoint")
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("pretrained: give --pretrained or --checkpoint, not both")
        if self.scorer_pretrained is not None and self.scorer_checkpoint is not None:
            raise ValueError("scorer_pretrained: give --scorer-pretrained or --scorer-checkpoint, not both")
        if (self.scorer_pretrained or self.scorer_checkpoint) and self.scorer_model is None and self.scorer_checkpoint is None:
            raise ValueError("scorer_model: --scorer-pretrained needs --scorer-model")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.gpus_per_worker <= 0 or self.cpus_per_worker <= 0:
            raise ValueError("gpus_per_worker/cpus_per_worker: must be > 0")
        if self.num_candidates < 0:
            raise ValueError(f"num_candidates: must be >= 0, got {self.num_candidates}")
        if self.overgenerates:
            if self.decode.decoding == "beam":
                raise ValueError("num_candidates: beam search gives one caption per image; over-generate with "
                                 "--decoding top_p or top_k")
            if self.select == "score" and not self.has_scorer:
                raise ValueError("select: --select score ranks the candidates by CLIP score; give --scorer-model, "
                                 "or use --select diverse")
        elif self.num_candidates:
            raise ValueError(f"num_candidates: {self.num_candidates} candidates cannot give {self.decode.num_captions} "
                             "captions; give more than --num-captions, or 0")
        if self.diversity < 0:
            raise ValueError(f"diversity: must be >= 0, got {self.diversity}")
        from base.multicaption import key_of

        try:
            key_of(self.tag)
        except ValueError as err:
            raise ValueError(f"tag: {err}") from err
        self.decode_params()  # its own checks, named by field

    @property
    def num_captions(self) -> int:
        """Captions written per image (``--num-captions``, ``decode.num_captions``)."""
        return self.decode.num_captions

    @property
    def overgenerates(self) -> bool:
        return self.num_candidates > self.num_captions

    def decode_params(self) -> DecodeParams:
        """The decoding as run: ``decode``, with ``--num-candidates`` rows per image when over-generating."""
        return replace(self.decode, num_captions=max(self.num_captions, self.num_candidates))

    @property
    def has_scorer(self) -> bool:
        return self.scorer_model is not None or self.scorer_checkpoint is not None


@dataclass(frozen=True, kw_only=True)
class JobContext:
    """What every Ray worker needs: picklable, resolved."""

    spec: Any  # CaptionerSpec
    params: DecodeParams
    seed: int
    first_sentence: bool
    device: str  # "cpu" or "cuda"
    autocast: str | None  # "bf16", "fp16" or None
    threads: int
    scorer: dict[str, Any] | None  # ClipScorer arguments, or None
    captioner: dict[str, Any]  # the captioner's provenance
    scorer_identity: dict[str, Any] | None
    decoding: dict[str, Any]  # the decoding as the backend applies it
    max_pixels: int
    pixel_shape: tuple[int, ...]
    scorer_pixel_shape: tuple[int, ...] | None
    keep: int | None = None  # over-generation: captions kept of params.num_captions candidates
    select: str = "score"
    diversity: float = 0.5
    tag: str | None = None  # captioner tag: captions under syn_text_<tag>


def main(argv: list[str], prog: str = "qcap caption") -> int:
    from base.stage import shard_job_main

    return shard_job_main(CaptionConfig, run, format_summary, argv, prog)


def run(cfg: CaptionConfig) -> dict[str, Any]:
    """Caption every pending shard; returns the summary (also written to the output folder)."""
    from base.stage import run_shard_job

    return run_shard_job(
        cfg, stage="caption", resolve=resolve_models, identity=_identity, recorded=_recorded_identity,
        work=caption_shards, finalize=cfg.output_format == "webdataset",
        summarize=lambda out, tars, failed: summarize(out, tars, cfg.output_format, failed),
        own_files=(SUMMARY_FILE, CONFIG_FILE))


_WEIGHTS = "captioner weights sha256"


def _identity(cfg: CaptionConfig, parts: dict[str, Any]) -> dict[str, Any]:
    """What a folder's captions depend on: the fields declared to shape them (nested ones by
    dotted name, ``decode.top_p``), and the captioner's weights."""
    from base.config import flatten_settings, output_settings

    return {**flatten_settings(output_settings(cfg), CaptionConfig), _WEIGHTS: parts["captioner"].get("weights_sha256")}


def _recorded_identity(saved: dict[str, Any]) -> dict[str, Any]:
    """The identity of the captions a caption folder's ``config.json`` describes (fields added since hold
    their defaults; a config written flat, before decoding was nested, reads as its nested form)."""
    from base.config import ConfigError, from_dict

    config = saved.get("config")
    try:
        recorded = from_dict(CaptionConfig, {**_FINGERPRINT_DEFAULTS, **config})
    except (ConfigError, TypeError, ValueError, KeyError) as err:
        raise UsageError(f"{CONFIG_FILE}: not a caption config ({err}); add --overwrite to start over") from err
    captioner = saved.get("captioner") if isinstance(saved.get("captioner"), dict) else {}
    return _identity(recorded, {"captioner": captioner})


def resolve_models(cfg: CaptionConfig) -> dict[str, Any]:
    """Load the captioner (and scorer) once here, on CPU: a wrong checkpoint fails before Ray
    starts, and the weights are hashed once for the provenance."""
    from captioning.backends import CaptionerSpec, load_captioner

    spec = CaptionerSpec(backend=cfg.backend, model=cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    params = cfg.decode_params()
    try:
        captioner = load_captioner(spec, device="cpu")
    except ValueError as err:
        raise UsageError(f"captioner: {err}") from err
    if params.seq_len > captioner.max_positions():
        raise UsageError(f"seq_len: the captioner holds at most {captioner.max_positions()} positions, got {params.seq_len}")
    from PIL import Image

    probe = Image.new("RGB", (64, 48))
    parts: dict[str, Any] = {
        "spec": spec,
        "params": params,
        "captioner": captioner.describe(),
        "decoding": captioner.effective_decoding(params),
        "transform": captioner.preprocess(),
        "pixel_shape": tuple(captioner.preprocess()(probe).shape),
        "scorer": None,
        "scorer_identity": None,
        "scorer_transform": None,
        "scorer_pixel_shape": None,
    }
    del captioner
    if cfg.has_scorer:
        from base.models import weights_sha256
        from captioning.quality import ClipScorer

        scorer_args = {"model": cfg.scorer_model, "pretrained": cfg.scorer_pretrained, "checkpoint": cfg.scorer_checkpoint}
        try:
            scorer = ClipScorer(**scorer_args)
        except ValueError as err:
            raise UsageError(f"scorer: {err}") from err
        source = scorer.source
        parts.update(
            scorer=scorer_args,
            scorer_identity={"model": scorer.name, "source": source,
                             "weights_sha256": weights_sha256(source) if os.path.isfile(source) else None},
            scorer_transform=scorer.preprocess,
            scorer_pixel_shape=tuple(scorer.preprocess(probe).shape),
        )
        del scorer
    return parts


# --------------------------------------------------------------------------------------------
# The Ray pipeline


def caption_shards(cfg: CaptionConfig, pending: list[tuple[int, str]], parts: dict[str, Any]) -> dict[int, str]:
    """Run the Ray pipeline over ``pending`` shards; returns the shards that failed (id → why)."""
    from base.raykit import clean_error, ray_session
    from base.shards import shard_size
    from base.stage import actor_device

    with ray_session(cfg.ray_address):
        device, autocast = actor_device(cfg)
        context = JobContext(
            spec=parts["spec"], params=parts["params"], seed=cfg.seed, first_sentence=cfg.first_sentence,
            device=device, autocast=autocast, threads=max(1, int(cfg.cpus_per_worker)), scorer=parts["scorer"],
            captioner=parts["captioner"], scorer_identity=parts["scorer_identity"], decoding=parts["decoding"],
            max_pixels=cfg.max_pixels, pixel_shape=parts["pixel_shape"], scorer_pixel_shape=parts["scorer_pixel_shape"],
            keep=cfg.num_captions if cfg.overgenerates else None, select=cfg.select, diversity=cfg.diversity,
            tag=cfg.tag,
        )
        num_workers = cfg.actor_count(device)
        save_config(cfg, Path(cfg.out) / CONFIG_FILE, captioner=context.captioner, scorer=context.scorer_identity,
                    decoding=context.decoding, device=device, autocast=autocast, num_workers=num_workers,
                    **versions())
        dataset = build_dataset(pending, context, parts, cfg, num_workers)
        expected = {shard_id: _expected_size(path, shard_size) for shard_id, path in pending}
        collector = Collector(Path(cfg.out), cfg.output_format, context, expected, progress=cfg.progress)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(batch)
        except Exception as err:
            clean = clean_error(err)
            if clean is None:
                raise
            collector.bar.close()
            raise clean from None
        return collector.finish()


def _expected_size(path: str, shard_size) -> int | None:
    from base.shards import ShardError

    try:
        return shard_size(path)
    except ShardError:
        return None  # the reader will say what is wrong with the shard


def versions() -> dict[str, str]:
    import open_clip
    import ray
    import torch

    from base.versions import qcap_version

    return {"qcap_version": qcap_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "ray": ray.__version__, "python": sys.version.split()[0]}


def build_dataset(pending, context: JobContext, parts: dict[str, Any], cfg: CaptionConfig, num_workers: int):
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False  # our own bar counts images and captions
    items = [{"shard_id": shard_id, "path": path} for shard_id, path in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"chunk": READ_CHUNK})
    dataset = dataset.map_batches(
        preprocess_batch,
        batch_format="numpy",
        fn_kwargs={"transform": parts["transform"], "scorer_transform": parts["scorer_transform"], "context": context},
    )
    resources = cfg.actor_resources(context.device)
    return dataset.map_batches(
        CaptionActor,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        fn_constructor_kwargs={"context": context},
        **resources,
    )


# Columns that every stage carries. kind: "sample", "end" (index = the shard's sample count)
# or "error" (the shard could not be read; error_message says why).
_ROW_COLUMNS = ("shard_id", "index", "kind", "key", "source_key", "uid", "sha256", "status", "error_message")


def read_shards(batch: dict, chunk: int) -> Iterator[dict]:
    """Stream one input shard's samples (image bytes included) in blocks of ``chunk``, then
    its end marker (or an error marker).

    Every sample becomes one row: a sample the reader could not read whole keeps the reader's
    status (``bad_json``, ``bad_member``, ``duplicate_key``, ``truncated``); one without a uid,
    with a uid that is not DataComp's, with a uid seen earlier in the shard, or without an image
    is ``missing_uid``, ``bad_uid``, ``duplicate_uid``, ``no_image``. Only ``success`` rows are
    captioned; the others are counted in the shard's Parquet, so the output reconciles with
    the input and one hostile sample never stops the job."""
    from base.shards import ShardError, iter_samples

    for shard_id, path in zip(batch["shard_id"].tolist(), batch["path"].tolist(), strict=True):
        rows: list[dict] = []
        count = 0
        keys: set[str] = set()
        uids: set[str] = set()
        try:
            listed = _listed_successes(str(path))
        except ShardError as err:
            yield _columns([_marker(shard_id, -1, "error", str(err))])
            continue
        by_key = {key: i for i, (key, _) in reversed(list(enumerate(listed or [])))}
        seen: set[int] = set()
        problems: list[str] = []
        unlisted = 0
        try:
            for sample in iter_samples([str(path)], problems=problems if listed is not None else None):
                if listed is not None:  # the Parquet's successes are the shard's samples: one row each
                    place = by_key.get(sample.key)
                    if place is None or place in seen:
                        unlisted += 1  # a stray member or a repeat the Parquet does not list: not a sample
                        continue
                    seen.add(place)
                rows.append(_sample_row(shard_id, count, sample, keys, uids))
                count += 1
                if len(rows) == chunk:
                    yield _columns(rows)
                    rows = []
        except ShardError as err:
            rows.append(_marker(shard_id, -1, "error", str(err)))
            yield _columns(rows)
            continue
        for place, (key, uid) in enumerate(listed or []):
            if place in seen:
                continue
            cause = problems[0] if problems else f"{path}: its Parquet lists this success, the tar does not hold it"
            rows.append(_missing_row(shard_id, count, key, uid, cause, keys))
            count += 1
        if unlisted:
            log.warning("%s: %d tar sample(s) its Parquet does not list were left out (qcap shards verify shows them)",
                        path, unlisted)
        rows.append(_marker(shard_id, count, "end", ""))
        yield _columns(rows)


def _listed_successes(path: str) -> list[tuple[str, str]] | None:
    """``(key, uid)`` of the successes a shard's Parquet lists, in order; None for a tar that
    has no Parquet (then the tar's own samples are the input)."""
    from base.shards import ShardError, read_table, sibling

    try:
        table = read_table(path, columns=["key", "uid", "status"], require_uid=False)
    except ShardError:
        import fsspec

        fs, stripped = fsspec.core.url_to_fs(sibling(path, ".parquet"))
        if not fs.exists(stripped):
            return None
        raise
    return [(k, u) for k, u, st in zip(table.column("key").to_pylist(), table.column("uid").to_pylist(),
                                       table.column("status").to_pylist(), strict=True) if st == "success"]


def _missing_row(shard_id: int, index: int, key, uid, cause: str, keys: set[str]) -> dict:
    """The row of a success its Parquet lists but the tar cannot give (cut before it, or absent)."""
    from base.shards import is_uid

    name = key if isinstance(key, str) and key and "." not in key and "/" not in key and key not in keys else f"row{index:06d}"
    while name in keys:
        name += "x"
    keys.add(name)
    return {"shard_id": shard_id, "index": index, "kind": "sample", "key": name,
            "source_key": str(key) if name != key and key is not None else "", "uid": uid if is_uid(uid) else "",
            "sha256": "", "status": "missing_from_tar", "error_message": cause, "image": b""}


def _sample_row(shard_id: int, index: int, sample, keys: set[str], uids: set[str]) -> dict:
    """One input sample as a row of the pipeline, its status decided here (see read_shards).
    The row's key is the input's, unless that key cannot name an output sample (empty, with
    '.' or '/', or a key seen earlier in the shard): then a stand-in, the input key in the
    error message."""
    from base.shards import is_uid

    status, error = "success", ""
    uid = sample.uid if is_uid(sample.uid) else ""
    key = sample.key
    if not isinstance(key, str) or not key or "." in key or "/" in key or key in keys:
        key = f"row{index:06d}"
        while key in keys:
            key += "x"
    keys.add(key)
    if not sample.ok:
        status, error = sample.status, str(sample.error_message or f"the shard reader marked it {sample.status}")
    elif sample.uid is None:
        status, error = "missing_uid", "the sample has no uid in its KEY.json"
    elif not uid:
        status, error = "bad_uid", f"uid {str(sample.uid)[:80]!r} is not 32 lowercase hex characters (DataComp's uid)"
    elif uid in uids:
        status, error = "duplicate_uid", f"uid {uid} appears earlier in this shard (the first copy is captioned)"
        uid = ""
    elif sample.image is None:
        status, error = "no_image", "the sample has no image member"
    if key != sample.key:
        error = f"input key {str(sample.key)[:80]!r} cannot name an output sample (stand-in {key}); {error}".rstrip("; ")
    if status == "success":
        uids.add(uid)
    meta = sample.meta if isinstance(sample.meta, dict) else {}
    sha = meta.get("sha256")
    return {"shard_id": shard_id, "index": index, "kind": "sample", "key": key,
            "source_key": str(sample.key) if key != sample.key and sample.key is not None else "", "uid": uid,
            "sha256": sha if isinstance(sha, str) else "", "status": status, "error_message": error,
            "image": (sample.image or b"") if status == "success" else b""}


def _marker(shard_id: int, index: int, kind: str, error: str) -> dict:
    return {"shard_id": shard_id, "index": index, "kind": kind, "key": "", "source_key": "", "uid": "", "sha256": "",
            "status": kind, "error_message": error, "image": b""}


def _columns(rows: list[dict]) -> dict:
    import numpy as np

    out = {}
    for name in (*_ROW_COLUMNS, "image"):
        values = [row[name] for row in rows]
        out[name] = np.array(values, dtype=np.int64) if name in ("shard_id", "index") else _objects(values)
    return out


def _objects(values: list) -> Any:
    import numpy as np

    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def preprocess_batch(batch: dict, transform, scorer_transform, context: JobContext) -> dict:
    """Decode each image (pixel bound checked first) and apply the captioner's (and scorer's)
    preprocessing; an image that does not decode becomes status ``decode_error``."""
    import numpy as np

    from base.shards import decode_image

    n = len(batch["kind"])
    status = batch["status"].copy()
    error = batch["error_message"].copy()
    pixels = np.zeros((n, *context.pixel_shape), dtype=np.float32)
    scorer_pixels = np.zeros((n, *context.scorer_pixel_shape), dtype=np.float32) if scorer_transform else None
    for i in range(n):
        if batch["kind"][i] != "sample" or status[i] != "success":
            continue
        try:
            image = decode_image(batch["image"][i], max_pixels=context.max_pixels)
        except ValueError as err:
            status[i], error[i] = "decode_error", str(err)
            continue
        pixels[i] = np.asarray(transform(image), dtype=np.float32)
        if scorer_pixels is not None:
            scorer_pixels[i] = np.asarray(scorer_transform(image), dtype=np.float32)
    out = {name: batch[name] for name in _ROW_COLUMNS}
    out.update(status=status, error_message=error, pixels=pixels)
    if scorer_pixels is not None:
        out["scorer_pixels"] = scorer_pixels
    return out


class CaptionActor:
    """One captioner (and scorer) per actor; captions the successful rows of each batch."""

    def __init__(self, context: JobContext) -> None:
        from base.stage import actor_autocast
        from captioning.backends import load_captioner

        self.autocast = actor_autocast(context)
        self.context = context
        self.captioner = load_captioner(context.spec, device=context.device)
        self.scorer = None
        if context.scorer is not None:
            from captioning.quality import ClipScorer

            self.scorer = ClipScorer(**context.scorer, device=context.device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from captioning.backends import image_seed
        from captioning.quality import process_caption

        context = self.context
        ok = np.array([kind == "sample" and status == "success" for kind, status in
                       zip(batch["kind"], batch["status"], strict=True)], dtype=bool)
        results = [""] * len(ok)
        index = np.flatnonzero(ok)
        if len(index) and context.keep is not None:
            from captioning.overgen import overgenerate

            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][index]))
            seeds = [image_seed(context.seed, uid) for uid in batch["uid"][index]]
            scorer_pixels = (torch.from_numpy(np.ascontiguousarray(batch["scorer_pixels"][index]))
                             if self.scorer is not None else None)
            chosen = overgenerate(self.captioner, self.scorer, pixels, scorer_pixels, context.params, seeds,
                                  keep=context.keep, rule=context.select, diversity=context.diversity,
                                  first_sentence=context.first_sentence, autocast_dtype=self.autocast)
            for j, i in enumerate(index.tolist()):
                kept, record = chosen[j]
                results[i] = json.dumps({"syn_text": [c.text for c in kept], "image_seed": seeds[j],
                                         "captions": [c.as_json() for c in kept], "overgenerate": record})
        elif len(index):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][index]))
            seeds = [image_seed(context.seed, uid) for uid in batch["uid"][index]]
            raw = self.captioner.caption(pixels, context.params, seeds, autocast_dtype=self.autocast)
            processed = [
                [process_caption(r.text, num_tokens=r.num_tokens, truncated=r.truncated,
                                 keep_first_sentence=context.first_sentence) for r in group]
                for group in raw
            ]
            if self.scorer is not None:
                scorer_pixels = torch.from_numpy(np.ascontiguousarray(batch["scorer_pixels"][index]))
                scores = self.scorer.score(scorer_pixels, [[c.text for c in group] for group in processed],
                                           autocast_dtype=self.autocast)
                for group, group_scores in zip(processed, scores, strict=True):
                    for caption, score in zip(group, group_scores, strict=True):
                        caption.score = score
            for j, i in enumerate(index.tolist()):
                results[i] = json.dumps({"syn_text": [c.text for c in processed[j]], "image_seed": seeds[j],
                                         "captions": [c.as_json() for c in processed[j]]})
        out = {name: batch[name] for name in _ROW_COLUMNS}
        out["result"] = _objects(results)
        return out


# --------------------------------------------------------------------------------------------
# The driver side: gather rows per shard, write each shard once


@dataclass
class _Pending:
    rows: list[dict] = field(default_factory=list)
    count: int | None = None  # from the end marker
    error: str | None = None


class Collector:
    """Gathers each shard's rows as they stream in and writes the shard when all have come."""

    def __init__(self, out: Path, output_format: str, context: JobContext, expected: dict[int, int | None],
                 progress: bool = True) -> None:
        from tqdm import tqdm

        self.out = out
        self.write = WRITERS[output_format]
        self.context = context
        self.pending: dict[int, _Pending] = {shard_id: _Pending() for shard_id in expected}
        self.failed: dict[int, str] = {}
        self.start = time.monotonic()
        self.num_images = 0
        self.num_captions = 0
        total = sum(v for v in expected.values() if v is not None)
        self.bar = tqdm(total=total, unit="img", desc="caption", disable=not progress, dynamic_ncols=True,
                        file=sys.stderr)

    def add(self, batch: dict) -> None:
        names = list(_ROW_COLUMNS) + ["result"]
        touched = set()
        for values in zip(*(batch[name] for name in names), strict=True):
            row = dict(zip(names, values, strict=True))
            shard_id = int(row["shard_id"])
            if shard_id not in self.pending:
                raise RuntimeError(f"shard {shard_id}: rows arrived after the shard was written")
            state = self.pending[shard_id]
            if row["kind"] == "end":
                state.count = int(row["index"])
            elif row["kind"] == "error":
                state.error = str(row["error_message"])
            else:
                state.rows.append(row)
                self.num_images += 1
                if row["result"]:
                    self.num_captions += len(json.loads(row["result"])["syn_text"])
            touched.add(shard_id)
        self.bar.update(sum(1 for kind in batch["kind"] if kind == "sample"))
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix({"captions/s": f"{self.num_captions / elapsed:.1f}"}, refresh=False)
        for shard_id in touched:
            self._maybe_write(shard_id)

    def _maybe_write(self, shard_id: int) -> None:
        state = self.pending[shard_id]
        if state.error is not None:
            log.error("shard %05d not captioned: %s", shard_id, state.error)
            self.failed[shard_id] = state.error
            del self.pending[shard_id]
            return
        if state.count is None or len(state.rows) < state.count:
            return
        if len(state.rows) > state.count:
            raise RuntimeError(f"shard {shard_id}: {len(state.rows)} rows for {state.count} samples")
        rows = sorted(state.rows, key=lambda row: int(row["index"]))
        self.write(self.out, shard_id, rows, self.context)
        del self.pending[shard_id]

    def finish(self) -> dict[int, str]:
        self.bar.close()
        for shard_id, state in list(self.pending.items()):
            why = state.error or f"only {len(state.rows)} of {state.count} samples came back"
            log.error("shard %05d not captioned: %s", shard_id, why)
            self.failed[shard_id] = why
        return self.failed


def provenance(context: JobContext, result: dict[str, Any]) -> dict[str, Any]:
    """qcap's ``KEY.qcap.json`` for one image."""
    from base.versions import qcap_version

    extra: dict[str, Any] = {}
    if result.get("overgenerate") is not None:  # every candidate, its score and flags: overgen.reselect redoes it
        extra["overgenerate"] = result["overgenerate"]
    if context.tag:
        extra["tag"] = context.tag
    return {
        **extra,
        "captioner": context.captioner,
        "decoding": context.decoding,
        "seed": context.seed,
        "image_seed": result["image_seed"],
        "postprocess": "first_sentence" if context.first_sentence else "clean",
        "scorer": context.scorer_identity,
        "captions": result["captions"],
        "qcap_version": qcap_version(),
    }


def _shard_stats(rows: list[dict]) -> dict[str, Any]:
    from collections import Counter

    from captioning.quality import is_degenerate

    flags: Counter[str] = Counter()
    num_captions = num_degenerate = 0
    for row in rows:
        if not row["result"]:
            continue
        for caption in json.loads(row["result"])["captions"]:
            num_captions += 1
            flags.update(caption["flags"])
            num_degenerate += is_degenerate(caption["flags"])
    return {"num_input": len(rows), "num_captions": num_captions, "num_degenerate": num_degenerate,
            "flag_counts": dict(sorted(flags.items()))}


def write_webdataset(out: Path, shard_id: int, rows: list[dict], context: JobContext) -> None:
    """Caption-only tar shard: KEY.json, KEY.syn.json (Apple's), KEY.qcap.json (ours); failures
    in the Parquet only."""
    from base.shards import Sample, ShardWriter

    with ShardWriter(out, shard_id) as writer:
        for row in rows:
            meta = {"sha256": row["sha256"]} if row["sha256"] else {}
            if row.get("source_key"):  # the input's key, where it could not name an output sample
                meta["source_key"] = row["source_key"]
            if row["status"] != "success":
                writer.write(Sample(key=row["key"], uid=row["uid"] or None, meta=meta, status=row["status"],
                                    error_message=row["error_message"]))
                continue
            result = json.loads(row["result"])
            meta["num_syn"] = len(result["syn_text"])
            if context.tag:  # a tagged captioner: syn_text_<tag> in KEY.syn_tags.json (base.multicaption)
                from base.multicaption import TAGS_MEMBER, TAGS_PROVENANCE_MEMBER, encode_tags, key_of

                key = key_of(context.tag)
                extras = {TAGS_MEMBER: encode_tags({key: result["syn_text"]}),
                          TAGS_PROVENANCE_MEMBER: json.dumps({key: provenance(context, result)}, ensure_ascii=False,
                                                             sort_keys=True).encode("utf-8")}
                writer.write(Sample(key=row["key"], uid=row["uid"], meta=meta, extras=extras))
                continue
            writer.write(Sample(key=row["key"], uid=row["uid"], syn_text=result["syn_text"],
                                syn_provenance=provenance(context, result), meta=meta))
        writer.close(extra_stats=_shard_stats(rows))


def parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("uid", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
        ("sha256", pa.string()),
        ("syn_text", pa.list_(pa.string())),
        ("syn_flags", pa.list_(pa.list_(pa.string()))),
        ("syn_scores", pa.list_(pa.float64())),
        ("qcap", pa.string()),
        ("source_key", pa.string()),  # the input's key where it could not name an output sample (else null)
    ])


def write_parquet(out: Path, shard_id: int, rows: list[dict], context: JobContext) -> None:
    """One Parquet side table per shard (every sample, failures included), its stats, then its
    completion marker: a Parquet-only shard (:func:`base.shards.write_parquet_shard`)."""
    from base.shards import write_parquet_shard

    records = []
    for row in rows:
        record = {"key": row["key"], "uid": row["uid"] or None, "status": row["status"],
                  "error_message": row["error_message"] or None, "sha256": row["sha256"] or None,
                  "syn_text": None, "syn_flags": None, "syn_scores": None, "qcap": None,
                  "source_key": row.get("source_key") or None}
        if row["status"] == "success":
            result = json.loads(row["result"])
            record.update(
                syn_text=result["syn_text"],
                syn_flags=[c["flags"] for c in result["captions"]],
                syn_scores=[c["score"] for c in result["captions"]] if context.scorer_identity else None,
                qcap=json.dumps(provenance(context, result), ensure_ascii=False, sort_keys=True),
            )
        records.append(record)
    write_parquet_shard(out, shard_id, records, schema=parquet_schema(), extra_stats=_shard_stats(rows))


WRITERS = {"webdataset": write_webdataset, "parquet": write_parquet}


# --------------------------------------------------------------------------------------------
# Summary


def summarize(out: Path, tars: dict[int, str], output_format: str, failed: dict[int, str]) -> dict[str, Any]:
    """Counts over every finished shard of the folder (this run's and earlier ones'), checked
    against the input: images in = captioned + failed[status], shard by shard."""
    from collections import Counter

    from base.stage import reconcile_shards

    flags: Counter[str] = Counter()
    totals: Counter[str] = Counter()

    def count(stats: dict[str, Any]) -> None:
        flags.update(stats.get("flag_counts", {}))
        totals.update({"captions": stats["num_captions"], "degenerate": stats["num_degenerate"]})

    counts = reconcile_shards(out, tars, failed, each=count)
    captioned = counts.pop("successes")
    return {
        **counts, "format": output_format, "images_captioned": captioned,
        "captions": totals["captions"], "captions_degenerate": totals["degenerate"],
        "caption_flags": dict(sorted(flags.items())),
    }


def format_summary(summary: dict[str, Any]) -> str:
    from base.stage import format_reconciled

    return format_reconciled(summary, done="captioned", count="images_captioned", where=f" ({summary['format']})", details=[
        f"  captions: {summary['captions']} ({summary['captions_degenerate']} degenerate; flags {summary['caption_flags']})"])
