"""``qcap reinforce``: dataset reinforcement (DataCompDR) — stored augmentations and teacher embeddings.

Usage::

    qcap reinforce --shards runs/demo/dr --out runs/demo/dr-reinforced \\
        --teachers ViT-L-14:openai,ViT-L-14:datacomp_xl_s13b_b90k --num-augmentations 30 \\
        --device cuda --num-workers 8

For every image of the input shards (DR shards from ``qcap build-dr``, or any image shards) it
draws ``--num-augmentations`` augmentations (Apple's recipe: RandomResizedCrop + RandAugment,
:mod:`base.augment`), runs the teacher ensemble (:mod:`captioning.teachers`) on each
augmented image and on the real caption and every synthetic caption, and writes output shard
``i`` for input shard ``i``: every input member copied verbatim, plus, as Apple's DataCompDR
holds them,

- ``KEY.paug.json`` = ``{"param_aug": "<JSON list>"}``, one ``[[i, j, h, w], [[op, magnitude], ...]]``
  per augmentation (the crop box in pixels of the stored image);
- ``KEY.npz`` (``--embeddings npz``, fp32): ``image_emb`` [augmentations, Σ dims] and ``text_emb``
  [1 + synthetic, Σ dims], row 0 the real caption, row 1 + i ``syn_text[i]``; or ``KEY.pth.gz``
  (``--embeddings pth.gz``): the same two tensors in bf16, ``torch.save`` of a dict, gzipped;

and qcap's ``KEY.reinforce.json``: the sha256, byte count and pixel size of the image bytes the
parameters were drawn on (a re-downloaded or resized image is detected when training, never
silently misaligned), the text rows' layout, and the fingerprints of the teachers and of the
augmentation config. ``config.json`` records the teachers (names, sources, weights
sha256, dims, logit scales), the augmentation config and the versions; ``summary.json``
the counts (``images_in = images_reinforced + Σ images_failed``); a folder reinforced before
these names holds ``reinforce_config.json`` and ``reinforce_summary.json``.

Work runs on Ray actors, one teacher ensemble per actor (a GPU each with ``--device cuda``),
one shard per call; each shard is written atomically with its marker by the actor that made it,
so a re-run after a kill skips finished shards and redoes the others from scratch — with the
same parameters (per-uid seeds) and the same embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from base.augment import RECORD_MEMBER, REPLACED_MEMBERS, encode_embeddings
from base.cli import UsageError
from base.config import arg, save_config
from base.raykit import ActorJobConfig
from base.stage import CONFIG_FILE, SUMMARY_FILE

log = logging.getLogger(__name__)



@dataclass(kw_only=True)
class ReinforceConfig(ActorJobConfig):
    """Store N augmentations per image and a teacher ensemble's embeddings of them and of every
    caption (DataCompDR's dataset reinforcement), resumably, on Ray."""

    STAGE: ClassVar[str] = "reinforce"  # its name in dataset cards' lineage

    shards: str = arg(shapes_output=False, help="input image shards (DR shards from qcap build-dr, or curated shards)")
    out: Path = arg(shapes_output=False, help="output folder; shard i of the input becomes shard i here, members copied plus paug.json/npz")
    teachers: str = arg(help="comma-separated teachers: MODEL:TAG, hf-hub:ID, local-dir:PATH or a checkpoint folder "
                             "(Apple: ViT-L-14:openai,ViT-L-14:datacomp_xl_s13b_b90k)")
    teacher_logit_scales: str | None = arg(None, help="comma-separated logit scale per teacher (default: each model's "
                                                      "own exp(logit_scale); Apple's v1 teachers: 100,100)")
    num_augmentations: int = arg(30, help="augmentations stored per image (DataCompDR-12M: 30, -1B: 10)")
    size: int = arg(224, help="RandomResizedCrop output side (Apple: 224)")
    scale_min: float = arg(0.08, help="RandomResizedCrop smallest area fraction")
    scale_max: float = arg(1.0, help="RandomResizedCrop largest area fraction")
    interpolation: Literal["bicubic", "bilinear", "nearest"] = arg("bicubic", help="RandomResizedCrop interpolation")
    rand_augment: bool = arg(True, help="apply RandAugment after the crop (Apple: yes, p 1.0)")
    rand_augment_p: float = arg(1.0, help="probability of RandAugment per augmentation")
    num_ops: int = arg(2, help="RandAugment ops per augmentation")
    magnitude: int = arg(9, help="RandAugment magnitude bin")
    seed: int = arg(0, help="parameter seed; each image's draws derive from it and the uid")
    embeddings: Literal["npz", "pth.gz"] = arg("npz", help="npz (fp32, DataCompDR-12M) or pth.gz (bf16, DataCompDR-12M-bf16)")
    batch_size: int = arg(256, shapes_output=False, help="augmented images per teacher call")
    max_pixels: int = arg(89_478_485, shapes_output=False, help="images with more pixels are refused undecoded (decompression bombs)")
    progress: bool = arg(True, shapes_output=False, help="show a progress bar")
    overwrite: bool = arg(False, shapes_output=False, help="start over: remove what qcap reinforce wrote in --out (its shards, markers, "
                                      "sizes.json, config and summary); other files are left alone")

    def __post_init__(self) -> None:
        from captioning.teachers import parse_teachers

        parse_teachers(self.teachers)
        self.logit_scales()
        for name in ("num_augmentations", "batch_size", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ValueError(f"scale_min/scale_max: need 0 < min <= max <= 1, got {self.scale_min}, {self.scale_max}")
        self.augment_config()

    def logit_scales(self) -> list[float] | None:
        if self.teacher_logit_scales is None:
            return None
        try:
            scales = [float(v) for v in self.teacher_logit_scales.split(",") if v.strip()]
        except ValueError:
            scales = []
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"teacher_logit_scales: positive numbers separated by commas, got {self.teacher_logit_scales!r}")
        return scales

    def augment_config(self):
        from base.augment import AugmentConfig

        return AugmentConfig(size=self.size, scale=(self.scale_min, self.scale_max), interpolation=self.interpolation,
                             rand_augment=self.rand_augment, rand_augment_p=self.rand_augment_p,
                             num_ops=self.num_ops, magnitude=self.magnitude)


@dataclass(frozen=True, kw_only=True)
class ReinforceContext:
    """What every actor needs: picklable, resolved."""

    specs: tuple  # TeacherSpec, ...
    logit_scales: tuple[float, ...] | None
    augment: Any  # AugmentConfig
    num_augmentations: int
    seed: int
    embeddings: str
    device: str
    autocast: str | None
    threads: int
    batch_size: int
    max_pixels: int
    teachers_fingerprint: str


def main(argv: list[str], prog: str = "qcap reinforce") -> int:
    from base.stage import shard_job_main

    return shard_job_main(ReinforceConfig, run, format_summary, argv, prog)


def run(cfg: ReinforceConfig) -> dict[str, Any]:
    from base.stage import run_shard_job

    return run_shard_job(cfg, stage="reinforce", resolve=resolve_teachers, identity=_identity, recorded=_recorded_identity,
                         work=reinforce_shards, summarize=summarize, own_files=(SUMMARY_FILE, CONFIG_FILE))


_WEIGHTS = "teacher weights sha256"


def _identity(cfg: ReinforceConfig, teachers: dict[str, Any]) -> dict[str, Any]:
    """What a folder's reinforcement depends on: the fields declared to shape it, and the teachers' weights."""
    from base.config import output_settings

    return {**output_settings(cfg), _WEIGHTS: [t.get("weights_sha256") for t in teachers["identities"]]}


def _recorded_identity(saved: dict[str, Any]) -> dict[str, Any]:
    from base.config import output_fields

    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    teachers = saved.get("teachers") if isinstance(saved.get("teachers"), list) else []
    return {**{name: config.get(name) for name in output_fields(ReinforceConfig)},
            _WEIGHTS: [t.get("weights_sha256") if isinstance(t, dict) else None for t in teachers]}


def resolve_teachers(cfg: ReinforceConfig) -> dict[str, Any]:
    """Load every teacher once on CPU (a bad one stops the job before Ray starts) and identify them."""
    from captioning.teachers import TeacherEnsemble, TeacherError, parse_teachers

    specs = parse_teachers(cfg.teachers)
    try:
        ensemble = TeacherEnsemble(specs, logit_scales=cfg.logit_scales())
    except TeacherError as err:
        raise UsageError(str(err)) from err
    identities = ensemble.identities()
    fingerprint = hashlib.sha256(json.dumps(identities, sort_keys=True).encode()).hexdigest()[:16]
    return {"specs": tuple(specs), "identities": identities, "dims": ensemble.dims,
            "logit_scales": ensemble.logit_scales, "fingerprint": fingerprint}


# --------------------------------------------------------------------------------------------
# Ray


def reinforce_shards(cfg: ReinforceConfig, pending: list[tuple[int, str]], teachers: dict[str, Any]) -> dict[int, str]:
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from base.raykit import ray_session
    from base.shards import ShardError, shard_size
    from base.stage import actor_device
    from captioning.job import versions

    with ray_session(cfg.ray_address):
        device, autocast = actor_device(cfg)
        context = ReinforceContext(
            specs=teachers["specs"], logit_scales=tuple(teachers["logit_scales"]), augment=cfg.augment_config(),
            num_augmentations=cfg.num_augmentations, seed=cfg.seed, embeddings=cfg.embeddings, device=device,
            autocast=autocast, threads=max(1, int(cfg.cpus_per_worker)), batch_size=cfg.batch_size,
            max_pixels=cfg.max_pixels, teachers_fingerprint=teachers["fingerprint"],
        )
        num_workers = min(cfg.actor_count(device), len(pending))
        save_config(cfg, Path(cfg.out) / CONFIG_FILE, teachers=teachers["identities"], teacher_dims=teachers["dims"],
                    teacher_logit_scales=teachers["logit_scales"], teachers_fingerprint=teachers["fingerprint"],
                    augmentation=context.augment.as_json(), device=device, autocast=autocast,
                    num_workers=num_workers, **versions())
        actor_cls = ray.remote(**cfg.actor_resources(device))(ReinforceActor)
        pool = ActorPool([actor_cls.remote(context) for _ in range(num_workers)])
        total = 0
        for _, path in pending:
            with contextlib.suppress(ShardError):  # the actor will say what is wrong with the shard
                total += shard_size(path)
        bar = tqdm(total=total or None, unit="img", desc="reinforce", disable=not cfg.progress, dynamic_ncols=True,
                   file=sys.stderr)
        start, images, failed = time.monotonic(), 0, {}
        work = [(shard_id, path, str(cfg.out)) for shard_id, path in pending]
        for result in pool.map_unordered(lambda actor, item: actor.reinforce_shard.remote(*item), work):
            if result.get("error"):
                log.error("shard %05d not reinforced: %s", result["shard_id"], result["error"])
                failed[result["shard_id"]] = result["error"]
                continue
            images += result["num_input"]
            bar.update(result["num_input"])
            bar.set_postfix({"images/s": f"{images / max(time.monotonic() - start, 1e-9):.1f}"}, refresh=False)
        bar.close()
        return failed


class ReinforceActor:
    """One teacher ensemble per actor; reinforces and writes one shard per call."""

    def __init__(self, context: ReinforceContext) -> None:
        from base.stage import actor_autocast
        from captioning.teachers import TeacherEnsemble

        self.autocast = actor_autocast(context)
        self.context = context
        self.ensemble = TeacherEnsemble(list(context.specs), device=context.device,
                                        logit_scales=list(context.logit_scales) if context.logit_scales else None)

    def reinforce_shard(self, shard_id: int, path: str, out: str) -> dict[str, Any]:
        from base.shards import ShardError

        try:
            return reinforce_one_shard(self.ensemble, self.context, shard_id, path, out, self.autocast)
        except ShardError as err:
            return {"shard_id": shard_id, "error": str(err)}


def reinforce_one_shard(ensemble, context: ReinforceContext, shard_id: int, path: str, out: str,
                        autocast=None) -> dict[str, Any]:
    """Stream a shard, reinforce its images a chunk at a time (at most ``batch_size`` augmented
    images held), and write output shard ``shard_id`` atomically, in input order."""
    from base.shards import ShardWriter, iter_samples

    counts = {"num_input": 0, "num_augmentations": 0, "num_texts": 0}
    per_chunk = max(1, context.batch_size // context.num_augmentations)
    with ShardWriter(out, shard_id) as writer:
        chunk: list[Any] = []
        for sample in iter_samples([path]):  # ShardError for an unreadable tar: the shard is retried later
            chunk.append(sample)
            if len(chunk) == per_chunk:
                _write_chunk(writer, _reinforce_chunk(ensemble, context, chunk, autocast), context, counts)
                chunk = []
        if chunk:
            _write_chunk(writer, _reinforce_chunk(ensemble, context, chunk, autocast), context, counts)
        writer.close(extra_stats=counts)
    return {"shard_id": shard_id, **counts}


def _reinforce_chunk(ensemble, context: ReinforceContext, samples: list[Any], autocast) -> list[dict[str, Any]]:
    """Per sample: its status, and for a success its parameters and embeddings."""
    import torch

    from base.augment import apply_pil, draw_many, to_tensor
    from base.multicaption import all_captions, text_layout
    from base.shards import decode_image

    cfg = context.augment
    rows: list[dict[str, Any]] = []
    images: list[Any] = []
    texts: list[str] = []
    for sample in samples:
        row: dict[str, Any] = {"sample": sample, "status": sample.status, "error": sample.error_message}
        rows.append(row)
        if not sample.ok:
            continue
        if sample.uid is None:
            row.update(status="missing_uid", error="the sample has no uid in its KEY.json")
            continue
        if sample.image is None:
            row.update(status="no_image", error="the sample has no image member")
            continue
        try:
            image = decode_image(sample.image, max_pixels=context.max_pixels)  # full size: boxes are in its pixels
        except ValueError as err:
            row.update(status="decode_error", error=str(err))
            continue
        params = draw_many(image, cfg, context.num_augmentations, context.seed, sample.uid)
        row["params"], row["image_size"] = params, list(image.size)
        row["images"] = (len(images), len(images) + len(params))
        images.extend(to_tensor(apply_pil(image, p, cfg), cfg, normalize=False) for p in params)
        keys = all_captions(sample)  # syn_text, then each captioner tag's key (base.multicaption)
        captions = [sample.text or "", *(c for key_captions in keys.values() for c in key_captions)]
        row["texts"] = (len(texts), len(texts) + len(captions))
        row["text_rows"] = text_layout(keys)
        texts.extend(captions)
    if images:
        image_emb = ensemble.encode_images(torch.stack(images), autocast_dtype=autocast)
        text_emb = ensemble.encode_texts(texts, autocast_dtype=autocast)
        for row in rows:
            if "images" in row:
                row["image_emb"] = image_emb[row["images"][0] : row["images"][1]]
                row["text_emb"] = text_emb[row["texts"][0] : row["texts"][1]]
    return rows


def _write_chunk(writer, rows: list[dict[str, Any]], context: ReinforceContext, counts: dict[str, int]) -> None:
    from base.augment import encode_paug
    from base.shards import Sample

    for row in rows:
        sample = row["sample"]
        counts["num_input"] += 1
        if row["status"] != "success":
            writer.write(Sample(key=sample.key, uid=sample.uid, meta=_meta_of(sample), status=row["status"],
                                error_message=row["error"]))
            continue
        extras = {k: v for k, v in sample.extras.items() if k not in REPLACED_MEMBERS}
        extras["paug.json"] = encode_paug(row["params"])
        extras[context.embeddings] = encode_embeddings(row["image_emb"], row["text_emb"], context.embeddings)
        extras[RECORD_MEMBER] = json.dumps({
            "image_sha256": hashlib.sha256(sample.image).hexdigest(),
            "image_bytes": len(sample.image),
            "image_size": row["image_size"],
            "num_augmentations": len(row["params"]),
            "text_rows": row["text_rows"],
            "teachers": context.teachers_fingerprint,
            "augmentation": context.augment.fingerprint(),
            "embeddings": context.embeddings,
        }, sort_keys=True).encode("utf-8")
        counts["num_augmentations"] += len(row["params"])
        counts["num_texts"] += int(row["text_emb"].shape[0])
        writer.write(Sample(key=sample.key, uid=sample.uid, image=sample.image, image_ext=sample.image_ext,
                            text=sample.text, syn_text=sample.syn_text, syn_provenance=sample.syn_provenance,
                            meta=dict(sample.meta), extras=extras))


def _meta_of(sample) -> dict[str, Any]:
    return {k: v for k, v in (sample.meta or {}).items() if k not in ("key", "uid", "status", "error_message")}


# --------------------------------------------------------------------------------------------
# Summary


def summarize(out: Path, tars: dict[int, str], failed: dict[int, str]) -> dict[str, Any]:
    """Counts over every finished shard: images in = reinforced + failed[status], shard by shard."""
    from collections import Counter

    from base.stage import reconcile_shards

    totals: Counter[str] = Counter()
    counts = reconcile_shards(
        out, tars, failed, each=lambda stats: totals.update(augmentations=stats["num_augmentations"],
                                                            texts=stats["num_texts"]))
    reinforced = counts.pop("successes")
    return {**counts, "images_reinforced": reinforced, "augmentations": totals["augmentations"],
            "texts_embedded": totals["texts"]}


def format_summary(summary: dict[str, Any]) -> str:
    from base.stage import format_reconciled

    return format_reconciled(summary, done="reinforced", count="images_reinforced", details=[
        f"  augmentations stored: {summary['augmentations']}; texts embedded: {summary['texts_embedded']}"])
