"""``qcap control-rung``: the ladder's positive controls, built from the embedded world's truth.

Usage::

    qcap control-rung --kind oracle --shards LADDER/datacomp-100 --world W --out LADDER/oracle-100
    qcap control-rung --kind clean --like LADDER/datacomp-100 --world W --out LADDER/clean-100
    qcap control-rung --kind shapes --shards LADDER/datacomp-100 --world W --out LADDER/shapes-100

A caption-quality effect can only be measured in a world where better captions *can* make a
better backbone. Two rungs test that, each trained like every other rung (same model, same
samples seen):

- ``oracle`` — the same images (same uids, same shard layout) as ``--shards`` (a rung of the
  ladder), each captioned by the world's **true description** (``truth.parquet``): the perfect
  captioner. If this rung does not beat the real-caption rung of the same images on the dense
  tasks, the world (at this scale) cannot show a caption-quality effect at all.
  With ``--num-captions N`` (N > 1) each image gets N distinct true captions of varying detail
  instead, written from its truth by the clean split's annotator styles (``meta["captions"]``,
  one drawn per sample by ``--caption-source real``): the perfect captioner in DataCompDR's
  format (5 per image). On a small palette a CLIP learns the shapes from these and not from the one
  long description (README, calibration log).
- ``clean`` — the world's clean split (human-quality captions, several per image in
  ``meta["captions"]``; other images than the pool's), as many images as ``--like`` holds,
  picked by ``qcap subset``'s seeded rank so the choice is reproducible. Trained with
  ``--caption-source real``, one of the captions is drawn per sample.
- ``shapes`` — like ``oracle``, but each caption names only the image's shapes and their counts
  ("a square and two stars", :func:`world.describe.shape_caption`): no colour, size, texture,
  position or background, so a CLIP can tell images apart only by the segmentation classes. It
  measures whether the contrastive objective learns the shapes at a given compute when the
  captions leave it no shortcut (README, calibration log: with the ``qcap-tiny-resnet10t`` tower at
  76,800 samples seen it beats random init on segmentation over three seeds, where the full
  descriptions do not).

Every rung carries real captions only (no ``syn.json``): they are trained with
``--caption-source real``. The run records are every stage's two: ``DIR/config.json`` (the settings and the rung's
identity) and ``DIR/summary.json`` (written last: the counts of a finished rung). A clean rung is ``qcap subset``'s
work, so its records are subset's, with the rung's own under ``control`` in each (no two stages write one file). A
re-run skips finished shards, a re-run with other settings is refused (``--overwrite``); a rung written before these
names (``control.json``, ``control_summary.json``, a clean rung's ``subset.json``) is resumed as it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from base.cli import UsageError
from base.config import arg, parse_config

log = logging.getLogger(__name__)

STAGE = "control-rung"
KINDS = ("oracle", "clean", "shapes")


@dataclass(kw_only=True)
class ControlConfig:
    """Write a positive-control rung: the true descriptions of a rung's images (oracle) or the
    clean split's human captions at a rung's size (clean)."""

    STAGE: ClassVar[str] = STAGE  # its name in run records and dataset cards' lineage

    kind: Literal["oracle", "clean", "shapes"] = arg(
        help="oracle: --shards' images with the world's true descriptions; clean: the world's clean split at --like's "
             "size; shapes: --shards' images with captions naming only their shapes and counts")
    world: Path = arg(help="the world folder (truth.parquet, clean/)", metavar="W")
    out: Path = arg(help="output shard folder", metavar="DIR")
    shards: str | None = arg(None, help="oracle: the rung whose images get the true descriptions (folder or shard list)")
    like: str | None = arg(None, help="clean: a rung whose number of samples the clean rung matches")
    num_samples: int | None = arg(None, help="clean: number of samples instead of --like")
    seed: int = arg(0, help="clean: the rank seed that picks the clean images (qcap subset's rule)")
    allow_fewer: bool = arg(False, help="clean: take the whole clean split when it holds fewer samples than asked")
    num_captions: int = arg(
        1, help="oracle: true captions per image. 1: the true description, as the text. N > 1: N distinct true "
                "captions of varying detail (the clean split's annotator styles) in meta['captions'], one drawn per "
                "sample by --caption-source real: the perfect captioner writing DataCompDR's 5 per image")
    overwrite: bool = arg(False, shapes_output=False, help="replace an output folder made with other settings")

    def __post_init__(self) -> None:
        if self.num_captions < 1:
            raise ValueError(f"num_captions: must be >= 1, got {self.num_captions}")
        if self.num_captions > 1 and self.kind != "oracle":
            raise ValueError(f"num_captions: only --kind oracle writes several captions per image (got --kind {self.kind})")
        if self.kind in ("oracle", "shapes"):
            if not self.shards:
                raise ValueError(f"shards: --kind {self.kind} needs --shards (the rung whose images it re-captions)")
            if self.like or self.num_samples is not None:
                raise ValueError("like: --like and --num-samples are for --kind clean")
        else:
            if self.shards:
                raise ValueError("shards: --kind clean reads the world's clean split; give --like or --num-samples")
            if (self.like is None) == (self.num_samples is None):
                raise ValueError("like: --kind clean needs exactly one of --like or --num-samples")
            if self.num_samples is not None and self.num_samples < 1:
                raise ValueError(f"num_samples: must be >= 1, got {self.num_samples}")


def _recorded(out: Path) -> tuple[bool, Any]:
    """Whether ``out`` holds a control rung's run records, and the rung identity they record: an
    oracle rung's ``config.json`` (stage control-rung), a clean rung's (subset's, with the rung's
    own under ``control``), or a rung's ``control.json`` from before the shared names."""
    from base.stage import CONFIG_FILE, LEGACY_RECORDS, read_record

    legacy = out / LEGACY_RECORDS[STAGE]["config"]
    if legacy.is_file():
        return True, read_record(legacy).get("identity")
    path = out / CONFIG_FILE
    if not path.is_file():
        return False, None
    saved = read_record(path)
    if saved.get("stage") == STAGE:
        return True, saved.get("identity")
    if isinstance(saved.get("control"), dict):
        return True, saved["control"].get("identity")
    return False, None


def _claim(cfg: ControlConfig, identity: dict[str, Any]) -> None:
    """Claim the output folder for a rung whose identity is ``identity``: a control rung's folder
    with the same identity resumes, one with another is refused (:func:`base.stage.refuse_mismatch`),
    or with ``--overwrite`` loses what control-rung wrote there, of either kind (its shards with
    their markers and temporaries, ``sizes.json``, the run records — a clean rung's, subset's,
    with ``uids.npy`` — and the records' names from before); every other file and
    folder stays. Anything else is claimed as every stage claims (:func:`base.stage.claim_output`):
    another stage's folder or a folder of shards no stage recorded is refused."""
    from base.stage import (
        CONFIG_FILE,
        SUMMARY_FILE,
        claim_output,
        legacy_names,
        read_record,
        refuse_mismatch,
        remove_stage_files,
    )
    from curate.subset import UIDS_FILE

    ours, recorded = _recorded(cfg.out)
    if not ours and (cfg.out / CONFIG_FILE).is_file():
        written_by = read_record(cfg.out / CONFIG_FILE).get("stage")
        raise UsageError(f"{cfg.out} holds {f'qcap {written_by}' if written_by else 'another stage'}'s output "
                         f"({CONFIG_FILE}), not a control rung: qcap {STAGE} did not write it; choose another --out")
    if not ours:
        claim_output(cfg.out, stage=STAGE, identity=identity, overwrite=cfg.overwrite, own_files=(),
                     what="the control rung")
    elif cfg.overwrite:
        remove_stage_files(cfg.out, STAGE, (CONFIG_FILE, SUMMARY_FILE, UIDS_FILE, *legacy_names(STAGE),
                                            *legacy_names("subset")))  # a rung has no card (subset runs with --no-card)
    elif recorded != identity:
        refuse_mismatch(cfg.out, STAGE, recorded, identity)


def true_descriptions(world: Path) -> dict[str, str]:
    """uid → the world's true description (every split)."""
    import pyarrow.parquet as pq

    path = world / "truth.parquet"
    if not path.is_file():
        raise UsageError(f"{path}: missing; is {world} a world folder (made by `qcap world`)?")
    table = pq.read_table(path, columns=["uid", "description"])
    return dict(zip(table.column("uid").to_pylist(), table.column("description").to_pylist(), strict=True))


def true_captions(world: Path, num: int) -> dict[str, list[str]]:
    """uid → ``num`` distinct true captions of varying detail, written from the uid's truth row by the
    clean split's annotator styles (:func:`world.describe.clean_captions`), seeded by the uid."""
    import numpy as np

    from world.describe import clean_captions
    from world.oracle import load_truth
    from world.scenes import Scene, SceneObject

    out = {}
    for uid, row in load_truth(world).items():
        scene = Scene(width=0, height=0, background=row["background"],
                      objects=[SceneObject(**o) for o in row["objects"]],
                      relations=[(r["front"], r["back"]) for r in row["relations"]])
        out[uid] = clean_captions(scene, np.random.default_rng(int(uid[:16], 16)), num)
    return out


def shape_captions(world: Path) -> dict[str, str]:
    """uid → a caption naming only the image's shapes and their counts (every split)."""
    from world.describe import shape_caption
    from world.oracle import load_truth

    return {uid: shape_caption(o["cls"] for o in row["objects"]) for uid, row in load_truth(world).items()}


def build_oracle(cfg: ControlConfig) -> dict[str, Any]:
    """One output shard per input shard, same ids and samples, text := the true description (``--kind oracle``) or
    the shapes-only caption (``--kind shapes``)."""
    from base.shards import ShardError, ShardWriter, finalize_folder, is_complete, iter_samples
    from base.stage import make_folder, shards_by_id, write_run_records
    from curate.subset import strip_synthetic

    started = time.time()
    by_id = shards_by_id(cfg.shards)
    if not by_id:
        raise ShardError(f"{cfg.shards}: no shards")
    tars, ids = list(by_id.values()), list(by_id)
    identity = {"kind": cfg.kind, "shards": [str(Path(t).resolve()) for t in tars],
                "world": str(cfg.world.resolve())}
    if cfg.num_captions > 1:  # a one-caption rung records what it recorded before the option existed
        identity["num_captions"] = cfg.num_captions
    _claim(cfg, identity)
    make_folder(cfg.out)
    write_run_records(cfg.out, cfg, identity=identity)
    if cfg.kind == "shapes":
        truth: dict[str, Any] = shape_captions(cfg.world)
    elif cfg.num_captions > 1:
        truth = true_captions(cfg.world, cfg.num_captions)
    else:
        truth = true_descriptions(cfg.world)
    resumed = 0
    for tar, shard_id in zip(tars, ids, strict=True):
        if is_complete(cfg.out, shard_id):
            resumed += 1
            continue
        with ShardWriter(cfg.out, shard_id) as writer:
            for sample in iter_samples([tar]):
                if not sample.ok:
                    continue
                description = truth.get(sample.uid or "")
                if description is None:
                    raise ShardError(f"{tar}: sample {sample.key} (uid {sample.uid}) is not in {cfg.world}/truth.parquet; "
                                     f"the {cfg.kind} rung needs the world these images came from (--world)")
                strip_synthetic(sample)
                sample.meta = {k: v for k, v in sample.meta.items() if k not in ("captions", "caption")}
                if isinstance(description, list):  # several true captions: the first is the text
                    sample.text, sample.meta["captions"] = description[0], description
                else:
                    sample.text = description
                sample.meta["caption_source"] = cfg.kind
                writer.write(sample)
    sizes = finalize_folder(cfg.out)
    summary = {"kind": cfg.kind, "shards": cfg.shards, "world": str(cfg.world), "out": str(cfg.out),
               "num_written": sum(sizes.values()), "num_input": _successes(tars), "num_shards": len(tars),
               "resumed_shards": resumed, "seconds": round(time.time() - started, 3)}
    summary["reconciled"] = summary["num_written"] == summary["num_input"]
    write_run_records(cfg.out, cfg, summary, identity=identity)  # the config again, then the summary (last)
    return summary


def _successes(tars: list[str]) -> int:
    from base.shards import shard_size

    return sum(shard_size(t) for t in tars)


def build_clean(cfg: ControlConfig) -> dict[str, Any]:
    """``qcap subset`` of the clean split, at ``--like``'s size (or ``--num-samples``)."""
    from base.config import to_dict
    from base.shards import expand_shards, num_samples
    from curate.subset import SubsetConfig, subset

    clean = cfg.world / "clean"
    if not (clean / "sizes.json").is_file():
        raise UsageError(f"{clean}: no clean split (sizes.json); make the world with --clean-samples > 0")
    available = num_samples(str(clean))
    wanted = cfg.num_samples if cfg.num_samples is not None else num_samples(cfg.like)
    if wanted > available:
        if not cfg.allow_fewer:
            raise UsageError(f"{clean}: holds {available} samples, {wanted} asked (the size of {cfg.like or 'the request'}); "
                             "make the world with a larger --clean-samples, or pass --allow-fewer")
        wanted = available
    identity = {"kind": "clean", "world": str(cfg.world.resolve()), "num_samples": wanted, "seed": cfg.seed,
                "clean": [str(Path(t).resolve()) for t in expand_shards(str(clean))]}
    _claim(cfg, identity)
    control = {"stage": STAGE, "config": to_dict(cfg), "identity": identity, "kind": "clean", "world": str(cfg.world),
               "like": cfg.like, "num_available": available, "num_asked": cfg.num_samples or num_samples(cfg.like)}
    result = subset(SubsetConfig(shards=str(clean), out=cfg.out, num_samples=wanted, seed=cfg.seed, captions="real",
                                 card=False, progress=False, overwrite=cfg.overwrite), control=control)
    return {"kind": "clean", "world": str(cfg.world), "like": cfg.like, "out": str(cfg.out), "num_written":
            result["num_written"], "num_available": available, "num_asked": control["num_asked"],
            "seed": cfg.seed, "reconciled": bool(result["reconciled"])}


def main(argv: list[str], prog: str = "qcap control-rung") -> int:
    cfg = parse_config(ControlConfig, argv, prog=prog)
    summary = build_clean(cfg) if cfg.kind == "clean" else build_oracle(cfg)
    print(f"{cfg.out}: {cfg.kind} control rung, {summary['num_written']} samples"
          + (f" (reconciled with {summary.get('num_input', summary.get('num_asked'))})" if summary["reconciled"] else
             " — counts do NOT reconcile, see summary.json"))
    return 0 if summary["reconciled"] else 1
