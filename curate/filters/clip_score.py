"""CLIP-score filter: ``qcap filter clip-score --shards RAW (--checkpoint DIR | --model M --pretrained TAG)
(--top-fraction 0.3 | --threshold 0.25) --out clip.npy``.

The score is the cosine similarity of the L2-normalised image and caption embeddings of any
open_clip model (``model.encode_image``/``encode_text``; a CoCa's contrastive towers too, so a
small captioner trained on clean data doubles as a DFN-style filter network), computed like
DataComp's ``clip_b32_similarity_score``/``clip_l14_similarity_score`` columns: the model's
eval transform on the decoded image, its tokenizer on the caption.

Selection, as in mlfoundations/datacomp ``baselines/filters.py``:

- ``--threshold T`` keeps every sample scoring ``>= T`` (DataComp: B/32 ≥ 0.25 — also
  LAION-2B's 0.28);
- ``--top-fraction p`` turns ``p`` into a threshold the way DataComp's ``get_threshold`` does —
  ``n = int(N * p)``, threshold = the ``n``-th largest score (0-based), keep ``>=`` — so it keeps
  ``int(N * p) + 1`` samples when scores do not tie (DataComp: top 30% by L/14). ``N`` counts the
  scored candidates (downloaded, inside ``--subset``, decodable).

How it runs: a Ray Data pipeline — read tasks stream each shard's candidate samples and decode
and preprocess them (CPU tasks), model actors (``--num-workers``, one model each, ``--device``,
``--cpus-per-worker``/``--gpus-per-worker``) score batches of ``--batch-size``. Ray is started
locally with an explicit CPU count, or joined with ``--ray-address``. The driver writes a
per-shard part (``OUT.scores.parts/{shard}.parquet``) as soon as all of a shard's scores have
arrived, so a killed run redoes only unfinished shards, then the scores Parquet
(``OUT.scores.parquet`` or ``--scores``: ``uid, score, shard, key``, the model in its metadata).
A second threshold reuses that file and costs no model pass; a file made by another model is
refused (``--rescore`` recomputes).

Per row, not per uid: a uid can be in a folder twice (two overlapping downloads); each row is
scored on its own (the scores file is keyed by ``shard, key``; ``uid`` is carried along) and the
top fraction is of the scored *rows*.

Drop reasons: ``low_clip_score``; and, for a row that gets no score, why (the scores file's
``status``, decisions' ``score_status`` and ``error_message``): ``no_caption`` (no caption, or an
empty or blank one — it is not scored against the empty string), ``bad_caption`` (not UTF-8, a
NUL inside, not text), ``undecodable_image`` (bytes that do not decode, a pixel bomb),
``no_image`` (no image member, or not in the tar at all), ``bad_member`` (a ``KEY.json`` that is
not a JSON object, two members of one kind), ``unreadable_shard`` (the tar breaks before the
sample: scored again on the next run), and the runner's ``bad_uid``. One bad sample never stops
the run; a request for more CPUs or GPUs than Ray has is refused before any work
(:func:`check_resources`), and a failure inside Ray is one line (:func:`reraise_ray_error`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from base.shards import ShardError, atomic_write_bytes, decode_image
from curate.filters.base import (
    BaseFilter,
    FilterRecord,
    Keep,
    ShardRows,
    candidate_mask,
    read_shard_rows,
    run_filter,
)
from curate.filters.config import ClipScoreConfig
from curate.filters.members import UNREADABLE_SHARD, SampleProblem, label_stem, read_wanted, shard_labels
from curate.filters.report import Histogram, score_edges

log = logging.getLogger(__name__)
PARTS_SUFFIX = ".parts"
SCORE_COLUMNS = ("uid", "score", "shard", "key", "status", "error")
OK = "ok"  # a scored sample's status in the scores file; anything else is the reason it has no score
UNDECODABLE = "undecodable_image"
_META_KEY = b"qcap.clip_score"


# --------------------------------------------------------------------------------------------
# Identity of the scores: which model, which preprocessing


def model_identity(cfg: ClipScoreConfig) -> dict[str, Any]:
    """What makes two score files comparable: model, weights, caption source and decode size.

    A checkpoint that is not there, or a folder that holds none, is a UsageError here, before
    any shard is read or Ray starts."""
    from base.cli import UsageError

    name, weights = cfg.model, cfg.pretrained
    if cfg.checkpoint is not None:
        from base.models import inspect_checkpoint_dir, weights_sha256

        path = Path(cfg.checkpoint)
        if path.is_dir():
            try:  # the folder's config checked, its weights file found as open_clip will load it
                _, recorded, path = inspect_checkpoint_dir(path)
            except ValueError as err:
                raise UsageError(f"--checkpoint {err}") from err
            name = recorded or name
        elif not path.is_file():
            raise UsageError(f"--checkpoint {path}: no such file or folder (a qcap checkpoint folder, a training "
                             "run or a weights file)")
        weights = f"sha256:{weights_sha256(path)}"
    return {"model": name or "unknown", "weights": weights, "text_column": cfg.text_column,
            "decode_size": cfg.decode_size, "precision": cfg.precision}


# --------------------------------------------------------------------------------------------
# Scores on disk


class ScoreIndex:
    """(shard label, key) -> (score, status) lookups: one sorted key array per shard (compact).

    Keyed by the sample, not the uid: a uid downloaded twice is two rows, each with its own score."""

    def __init__(self, shards: Sequence[str], keys: Sequence[str], scores: Sequence[float],
                 statuses: Sequence[str], errors: Sequence[str | None] = ()) -> None:
        self.by_shard: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.errors: dict[tuple[str, str], str] = {  # only unscored samples have one: small
            (sh, str(k)): e for sh, k, e in zip(shards, keys, errors, strict=False) if e}
        shards_arr = np.asarray(list(shards), dtype=object)
        keys_arr = np.asarray([str(k) for k in keys], dtype=str) if len(keys) else np.zeros(0, dtype=str)
        scores_arr = np.asarray(scores, dtype=np.float32)
        statuses_arr = np.asarray(list(statuses), dtype=object)
        for shard in dict.fromkeys(shards_arr.tolist()):
            rows = np.flatnonzero(shards_arr == shard)
            # the last row of a key wins (parts are read after the file: newest last)
            _, last = np.unique(keys_arr[rows][::-1], return_index=True)
            rows = rows[::-1][last]
            order = np.argsort(keys_arr[rows], kind="stable")
            rows = rows[order]
            self.by_shard[shard] = (keys_arr[rows], scores_arr[rows], statuses_arr[rows])

    def __len__(self) -> int:
        return sum(len(k) for k, _, _ in self.by_shard.values())

    def error(self, shard: str, key: str) -> str | None:
        return self.errors.get((shard, str(key)))

    def lookup(self, shard: str, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(scores, found, statuses) of ``keys`` of ``shard``: NaN where there is no score — not
        scored yet (found False, status None) or scored and unusable (found True, its status)."""
        out = np.full(len(keys), np.nan, dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        statuses: list[str | None] = [None] * len(keys)
        have = self.by_shard.get(shard)
        if not len(keys) or have is None or not len(have[0]):
            return out, found, statuses
        sorted_keys, scores, status = have
        query = np.asarray([str(k) for k in keys], dtype=str)
        index = np.clip(np.searchsorted(sorted_keys, query), 0, len(sorted_keys) - 1)
        found = sorted_keys[index] == query
        out[found] = scores[index[found]]
        for i in np.flatnonzero(found):
            statuses[i] = status[index[i]]
        return out, found, statuses


def read_scores(path: Path, identity: dict[str, Any] | None = None):
    """A scores Parquet as a pyarrow table; refuses one made by another model (when given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable scores Parquet ({err}); delete it or pass --rescore") from err
    missing = [c for c in ("uid", "score", "shard", "key") if c not in table.column_names]
    if missing:
        raise ShardError(f"{path}: missing column(s) {missing}; a scores file holds uid, score, shard and key")
    if identity is not None:
        recorded = json.loads((table.schema.metadata or {}).get(_META_KEY, b"null"))
        if recorded is not None and recorded != identity:
            differ = {k: (recorded.get(k), identity.get(k)) for k in sorted(set(recorded) | set(identity))
                      if recorded.get(k) != identity.get(k)}
            raise ShardError(
                f"{path}: scores made with other settings (theirs, now): {json.dumps(differ)}; repeat the flags "
                "they were made with, pass --rescore to recompute, or give --scores another path"
            )
    if "status" not in table.column_names:  # written before statuses: a missing score was an undecodable image
        import pyarrow.compute as pc

        table = table.append_column("status", pc.if_else(pc.is_null(table.column("score"), nan_is_null=True),
                                                         pa.scalar(UNDECODABLE), pa.scalar(OK)))
    if "error" not in table.column_names:
        table = table.append_column("error", pa.nulls(table.num_rows, pa.string()))
    return table


def _scores_table(rows: dict[str, list], identity: dict[str, Any]):
    import pyarrow as pa

    schema = pa.schema([("uid", pa.string()), ("score", pa.float32()), ("shard", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error", pa.string())],
                       metadata={_META_KEY: json.dumps(identity, sort_keys=True).encode()})
    return pa.table({name: rows[name] for name in SCORE_COLUMNS}, schema=schema)


def _write_parquet(table, path: Path) -> None:
    import io

    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, sink.getvalue())


def _write_part(path: Path, rows: dict[str, list], identity: dict[str, Any]) -> None:
    """A shard's scores; rows of an earlier part of the same shard (other keys) are kept."""
    if path.exists():
        old = read_scores(path, identity).to_pydict()
        new = set(rows["key"])
        rows = {c: [v for v, k in zip(old[c], old["key"], strict=True) if k not in new] + rows[c] for c in SCORE_COLUMNS}
    _write_parquet(_scores_table(rows, identity), path)


# --------------------------------------------------------------------------------------------
# The Ray Data pipeline


def _read_shard(item: dict[str, Any], *, transform, tokenizer, text_column: str | None,
                decode_size: int | None) -> Iterator[dict[str, Any]]:
    """One shard's candidate samples, decoded and preprocessed (a Ray Data flat_map).

    Every wanted key comes out exactly once: a sample that cannot be scored comes out with its
    reason in ``status`` (``bad_member``, ``no_image``, ``no_caption``, ``bad_caption``,
    ``undecodable_image``, ``unreadable_shard``) and placeholder pixels and tokens, so one bad
    member never stops the pipeline and the driver can count every shard complete."""
    empty_tokens = tokenizer([""])[0].numpy()
    for sample in read_wanted(item["tar"], item["keys"]):  # a tar that breaks: its rows' unreadable_shard
        status, error, tokens, pixels = "", "", empty_tokens, None
        try:
            sample.meta()  # a KEY.json that is there must be an object
            data = sample.image()
            text = sample.caption(text_column)
            tokens = tokenizer([text])[0].numpy()
            pixels = transform(decode_image(data, draft=decode_size)).numpy()
        except SampleProblem as problem:
            status, error = problem.reason, problem.message[:300]
        except ValueError as err:  # decode_image: undecodable bytes, a pixel bomb
            status, error = UNDECODABLE, str(err)[:300]
        except OSError as err:  # PIL reading past the header (a truncated file) in the transform
            status, error = UNDECODABLE, f"undecodable image ({err})"[:300]
        yield {"shard": item["label"], "key": sample.key, "tokens": tokens, "status": status, "error": error,
               "pixels": pixels if pixels is not None else np.zeros(item["pixel_shape"], dtype=np.float32)}


class ClipScorer:
    """A Ray Data actor: one open_clip model, scores batches of preprocessed images and tokens."""

    def __init__(self, *, model: str | None, pretrained: str | None, checkpoint: str | None, device: str,
                 precision: str, threads: int) -> None:
        import torch

        from base.models import load_model

        torch.set_num_threads(max(1, threads))
        self.device = device
        self.loaded = load_model(model, pretrained=pretrained, checkpoint=checkpoint, device=device, precision=precision)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.ready_at = time.time()  # model loaded: from here on, throughput is the pipeline's, not start-up's

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = score_batch(self.loaded.model, batch["pixels"], batch["tokens"], device=self.device, dtype=self.dtype)
        scores[np.asarray([bool(s) for s in batch["status"]], dtype=bool)] = np.nan
        return {"shard": batch["shard"], "key": batch["key"], "score": scores, "status": batch["status"],
                "error": batch["error"], "ready_at": np.full(len(scores), self.ready_at)}


def score_batch(model, pixels: np.ndarray, tokens: np.ndarray, *, device: str = "cpu", dtype=None) -> np.ndarray:
    """Cosine similarity of each image with its caption (float32, one per row)."""
    import torch

    images = torch.as_tensor(np.ascontiguousarray(pixels), device=device)
    texts = torch.as_tensor(np.ascontiguousarray(tokens), device=device)
    if dtype is not None:
        images = images.to(dtype)
    with torch.inference_mode():
        image_emb = model.encode_image(images, normalize=True)
        text_emb = model.encode_text(texts, normalize=True)
        return (image_emb.float() * text_emb.float()).sum(dim=-1).cpu().numpy().astype(np.float32)


READ_CPUS = 1.0  # what each Ray Data read task (a shard's flat_map) asks for: Ray's default for a task


def check_resources(cfg: ClipScoreConfig, cpus: float, gpus: float, where: str) -> None:
    """Refuse, before any work, a pipeline that the CPUs (and GPUs) on offer cannot run.

    Ray Data's model actors hold their ``--cpus-per-worker`` for the whole run, and the read
    tasks (decode + preprocess) need ``READ_CPUS`` more; with fewer CPUs than both, the read
    stage is never scheduled and the run waits forever without a word (``--num-cpus 1`` with
    one 1-CPU actor did). Splitting one CPU into fractions behind the user's back would run
    torch on a share it cannot limit itself to, so the run is refused with what would work."""
    from base.cli import UsageError

    actors = cfg.num_workers * cfg.cpus_per_worker
    needed = actors + READ_CPUS
    if cpus < needed:
        fits = cpus - READ_CPUS  # what the actors could share
        hints = [f"--num-cpus {math.ceil(needed)} or more" if cfg.ray_address is None else "a larger cluster"]
        if fits > 0:
            hints.append(f"--cpus-per-worker {math.floor(100 * fits / cfg.num_workers) / 100:g}")
        if cfg.num_workers > 1:
            hints.append("fewer --num-workers")
        raise UsageError(
            f"{where} offers {cpus:g} CPU(s), but {cfg.num_workers} model worker(s) x {cfg.cpus_per_worker:g} CPU "
            f"plus {READ_CPUS:g} for the read tasks need {needed:g} (with fewer the read tasks never run): give "
            + ", or ".join(hints))
    if cfg.device == "cuda" and gpus < cfg.num_workers * cfg.gpus_per_worker:
        raise UsageError(f"{where} offers {gpus:g} GPU(s), but {cfg.num_workers} model worker(s) x "
                         f"{cfg.gpus_per_worker:g} GPU need {cfg.num_workers * cfg.gpus_per_worker:g}: use fewer "
                         "--num-workers, a smaller --gpus-per-worker, or --device cpu")


_REMOTE_ERROR = re.compile(r"^((?:[A-Za-z_]\w*\.)*)([A-Za-z_]\w*(?:Error|Exception)): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def reraise_ray_error(err: BaseException) -> None:
    """A failure inside the Ray pipeline as one line. Ray Data wraps a task's exception in
    ``RayTaskError(UserCodeException)`` whose text is the remote traceback (~170 lines printed
    as it propagated) and whose cause object is gone, so the original is read back from that
    traceback: a ``ShardError`` is re-raised as a ShardError, a ``ValueError``/``UsageError``/
    ``ConfigError`` as a UsageError, with the original message; any other failure (an actor that
    died, memory, a bug) is a UsageError naming it, its trace left in Ray's session logs."""
    from base.cli import UsageError

    found: list[tuple[str, str]] = []  # (exception class, message) of every non-Ray exception line
    for text in [str(err), *(str(c) for c in _chain(err)), str(getattr(err, "cause", "") or "")]:
        for line in text.splitlines():
            match = _REMOTE_ERROR.match(_ANSI.sub("", line).strip())
            if match and not match.group(1).startswith("ray.") and not match.group(2).startswith(("Ray", "UserCode")):
                found.append((match.group(2), match.group(3)))
    for kinds, error in ((("ShardError",), ShardError), (("UsageError", "ConfigError", "ValueError"), UsageError)):
        messages = [message for kind, message in found if kind in kinds]
        if messages:
            raise error(messages[-1]) from None
    if found:
        kind, message = found[0]
        raise UsageError(f"clip-score: the Ray pipeline failed: {kind}: {message[:300]}") from None
    first = next((_ANSI.sub("", line).strip() for line in str(err).splitlines() if line.strip()), "")
    raise UsageError(f"clip-score: the Ray pipeline failed ({type(err).__name__}): {first[:300]}") from None


def compute_scores(cfg: ClipScoreConfig, todo: dict[str, list[str]], labels: dict[str, str], parts: Path,
                   identity: dict[str, Any]) -> dict[str, float]:
    """Score the candidates of the shards in ``todo`` (tar -> keys) on Ray Data, one part per shard.

    Returns timings: ``seconds`` (from the driver's model check to the last score, Ray start
    included), ``startup_seconds`` (until the first actor had its model loaded), and
    ``steady_images_per_s``: images over the time from then to the last score — the pipeline's
    throughput once it can run (reading and decoding not hidden behind the model show up here).
    """
    import ray.data
    from ray.exceptions import RayError
    from tqdm import tqdm

    started = time.time()
    if cfg.ray_address is None and not ray.is_initialized():  # a local Ray of known size: refuse before any work
        check_resources(cfg, float(cfg.num_cpus or os.cpu_count() or 1), float("inf"),
                        f"--num-cpus {cfg.num_cpus}" if cfg.num_cpus else f"this machine ({os.cpu_count()} CPUs)")

    from base.models import load_model

    checkpoint = str(cfg.checkpoint) if cfg.checkpoint is not None else None
    # The driver loads the model once: a wrong name or checkpoint fails here, before Ray starts,
    # pretrained weights are cached for the actors, and the transform and tokenizer come along.
    try:
        probe = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=checkpoint)
    except (ValueError, RuntimeError) as err:  # open_clip: RuntimeError for an unknown model or pretrained tag
        from base.cli import UsageError

        raise UsageError(f"cannot load the scoring model: {str(err)[:500]}") from err
    transform, tokenizer = probe.preprocess_val, probe.tokenizer
    from PIL import Image

    pixel_shape = list(transform(Image.new("RGB", (32, 32))).shape)  # stands in for undecodable images
    del probe
    todo = {tar: sorted(set(keys)) for tar, keys in todo.items()}  # a key twice in a Parquet is one sample
    expected = {labels[tar]: len(keys) for tar, keys in todo.items()}
    items = [{"tar": tar, "label": labels[tar], "keys": keys, "pixel_shape": pixel_shape} for tar, keys in todo.items()]
    from base.raykit import ray_session

    with ray_session(cfg.ray_address, cfg.num_cpus):
        resources = ray.cluster_resources()
        check_resources(cfg, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)),
                        "the Ray cluster" if cfg.ray_address else "Ray")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        ctx.print_on_execution_start = False
        gpus = cfg.gpus_per_worker if cfg.device == "cuda" else 0
        dataset = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .flat_map(_read_shard, fn_kwargs={"transform": transform, "tokenizer": tokenizer,
                                              "text_column": cfg.text_column, "decode_size": cfg.decode_size})
            .map_batches(
                ClipScorer, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
                num_cpus=cfg.cpus_per_worker,
                num_gpus=gpus or None,
                fn_constructor_kwargs={"model": cfg.model, "pretrained": cfg.pretrained, "checkpoint": checkpoint,
                                       "device": cfg.device, "precision": cfg.precision,
                                       "threads": max(1, int(cfg.cpus_per_worker))},
            )
        )
        pending: dict[str, dict[str, list]] = {name: {c: [] for c in SCORE_COLUMNS} for name in expected}
        bar = tqdm(total=sum(expected.values()), desc="clip-score", unit="img", disable=not cfg.progress)
        ready = float("inf")
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                ready = min(ready, float(batch["ready_at"].min()))
                for shard, key, score, status, error in zip(batch["shard"], batch["key"], batch["score"],
                                                            batch["status"], batch["error"], strict=True):
                    rows = pending[str(shard)]
                    rows["uid"].append(None)  # filled from the Parquet when the scores file is written
                    rows["score"].append(float(score))
                    rows["shard"].append(str(shard))
                    rows["key"].append(str(key))
                    rows["status"].append(str(status) or OK)
                    rows["error"].append(str(error) or None)
                    if len(rows["key"]) == expected[str(shard)]:
                        _write_part(parts / f"{label_stem(str(shard))}.parquet", rows, identity)
                bar.update(len(batch["key"]))
        except RayError as err:  # a task or actor failed: one line, not the remote traceback
            reraise_ray_error(err)
        finally:
            bar.close()
        finished = time.time()
    short = {s: (len(r["key"]), expected[s]) for s, r in pending.items() if len(r["key"]) != expected[s]}
    if short:  # read_wanted yields every wanted key once: a shortfall is a bug here, not the data's fault
        raise RuntimeError(f"clip-score: shards came back short (scored, wanted): {short}")
    total = sum(expected.values())
    ready = min(ready, finished)
    steady = total / (finished - ready) if finished > ready else None
    return {"images": total, "seconds": round(finished - started, 3), "startup_seconds": round(ready - started, 3),
            "steady_images_per_s": round(steady, 2) if steady else None}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__


# --------------------------------------------------------------------------------------------
# The filter


class ClipScoreFilter(BaseFilter):
    name = "clip-score"
    value_types: ClassVar[dict[str, str]] = {"clip_score": "float32", "score_status": "string"}

    def __init__(self, cfg: ClipScoreConfig) -> None:
        super().__init__(cfg)
        self.cfg: ClipScoreConfig = cfg
        self.index: ScoreIndex | None = None
        self.cutoff: float | None = None
        self.num_scored = 0
        self.num_computed = 0
        self.identity: dict[str, Any] = {}
        self._scores = np.zeros(0, dtype=np.float32)
        self.labels: dict[str, str] = {}
        self.timings: dict[str, float] = {}  # of the model pass, when one ran

    def output_paths(self) -> list[Path]:
        path = self.cfg.scores_path()
        return [path, path.with_name(path.name + PARTS_SUFFIX) / "x.parquet"]

    def prepare(self, shards: Sequence[str], subset: np.ndarray | None) -> None:
        cfg = self.cfg
        self.identity = model_identity(cfg)
        path = cfg.scores_path()
        parts = path.with_name(path.name + PARTS_SUFFIX)
        if path.is_dir():
            from base.cli import UsageError

            raise UsageError(f"--scores {path}: is a folder; name the scores Parquet file")
        if cfg.rescore:
            import shutil

            shutil.rmtree(parts, ignore_errors=True)
            if path.exists():
                path.unlink()
        labels = shard_labels(shards)
        index = self._load_existing(path, parts)
        todo: dict[str, list[str]] = {}
        candidates = list(self._candidates(shards, subset))
        for tar, _, keys, _ in candidates:
            _, found, statuses = index.lookup(labels[tar], keys)
            # not scored yet, or the tar broke before the sample last time (it may have been fixed)
            redo = [k for k, f, st in zip(keys, found, statuses, strict=True) if not f or st == UNREADABLE_SHARD]
            if redo:
                todo[tar] = redo
        if todo:
            self.num_computed = len({(t, k) for t, keys in todo.items() for k in keys})
            log.info("clip-score: scoring %d samples of %d shards", self.num_computed, len(todo))
            self.timings = compute_scores(cfg, todo, labels, parts, self.identity)
        if todo or not path.exists() or parts.exists():
            self._write_scores_file(path, parts, candidates, labels)
            index = self._load_existing(path, parts)
        self.index, self.labels = index, labels
        # DataComp's get_threshold over this run's scored candidate *rows* (the file may hold more)
        scores = [index.lookup(labels[tar], keys)[0] for tar, _, keys, _ in candidates]
        flat = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
        self._scores = flat[~np.isnan(flat)]
        self.num_scored = len(self._scores)
        if cfg.threshold is not None:
            self.cutoff = float(cfg.threshold)
        elif self.num_scored == 0:
            self.cutoff = float("inf")
        else:
            n = min(int(self.num_scored * cfg.top_fraction), self.num_scored - 1)
            self.cutoff = float(-np.sort(-self._scores)[n])

    def _candidates(self, shards: Sequence[str], subset: np.ndarray | None
                    ) -> Iterator[tuple[str, list[int], list[str], list[str]]]:
        """(tar, rows, keys, uids) of every shard's candidates: downloaded, a valid uid, inside the subset."""
        for tar in shards:
            rows = self.read_rows(tar)
            usable, inside = candidate_mask(rows, subset)
            chosen = [int(i) for i in np.flatnonzero(usable & inside)]
            yield tar, chosen, [rows.keys[i] for i in chosen], [rows.uids[i] for i in chosen]

    def _load_existing(self, path: Path, parts: Path) -> ScoreIndex:
        """Scores already made: the scores file and any parts (a killed run's finished shards)."""
        columns: dict[str, list] = {"shard": [], "key": [], "score": [], "status": [], "error": []}
        sources = ([path] if path.exists() else []) + (sorted(parts.glob("*.parquet")) if parts.exists() else [])
        for source in sources:
            table = read_scores(source, self.identity)
            for name in columns:
                columns[name] += table.column(name).to_pylist()
        return ScoreIndex(columns["shard"], columns["key"], [np.nan if s is None else s for s in columns["score"]],
                          [OK if s is None else s for s in columns["status"]], columns["error"])

    def _write_scores_file(self, path: Path, parts: Path, candidates, labels: dict[str, str]) -> None:
        """The scores file: the previous file's rows plus every part, one row per sample (shard,
        key; the newest wins), each with the uid its Parquet row gives it."""
        import pyarrow as pa

        tables = []
        if path.exists():
            tables.append(read_scores(path, self.identity).select(list(SCORE_COLUMNS)))
        tables += [read_scores(p, self.identity).select(list(SCORE_COLUMNS)) for p in sorted(parts.glob("*.parquet"))]
        if not tables:
            _write_parquet(_scores_table({c: [] for c in SCORE_COLUMNS}, self.identity), path)
            return
        table = pa.concat_tables(tables).to_pydict()
        uid_of = {(labels[tar], key): uid for tar, _, keys, uids in candidates for key, uid in zip(keys, uids, strict=True)}
        latest: dict[tuple[str, str], int] = {}
        for i, sample in enumerate(zip(table["shard"], table["key"], strict=True)):  # parts last: newest wins
            latest[sample] = i
        order = sorted(latest.values())
        rows = {c: [table[c][i] for i in order] for c in SCORE_COLUMNS}
        rows["uid"] = [uid_of.get((sh, k), u) for sh, k, u in zip(rows["shard"], rows["key"], rows["uid"], strict=True)]
        _write_parquet(_scores_table(rows, self.identity), path)
        import shutil

        shutil.rmtree(parts, ignore_errors=True)  # everything they held is in the file now

    def read_rows(self, tar: str) -> ShardRows:
        return read_shard_rows(tar, text_column=self.cfg.text_column)

    def annotate(self, shard: str, records: list[FilterRecord]) -> None:
        if self.index is None:
            raise RuntimeError("prepare() must run before annotate()")
        scores, found, statuses = self.index.lookup(self.labels[shard], [r.key for r in records])
        if not found.all():
            raise RuntimeError(f"clip-score: {int((~found).sum())} candidates of {shard} have no score")
        for record, score, status in zip(records, scores, statuses, strict=True):
            record.values["clip_score"] = None if np.isnan(score) else float(score)
            record.values["score_status"] = status if np.isnan(score) else OK
            if np.isnan(score):
                record.error = self.index.error(self.labels[shard], record.key)

    def keep(self, record: FilterRecord) -> Keep:
        score = record.values.get("clip_score")
        if score is None:
            status = record.values.get("score_status") or OK
            return False, status if status != OK else UNDECODABLE
        return (score >= self.threshold), "low_clip_score"

    @property
    def threshold(self) -> float:
        if self.cutoff is None:
            raise RuntimeError("the cut-off is known only after prepare() scored the candidates")
        return self.cutoff

    def histograms(self) -> list[Histogram]:
        cut = [self.threshold] if np.isfinite(self.threshold) else []
        return [Histogram("clip_score", f"CLIP score (cosine similarity, {self.identity.get('model')})",
                          score_edges(self._scores, cut), cutoffs=cut, reason="low_clip_score")]

    def summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "source": "mlfoundations/datacomp baselines/filters.py (get_threshold, load_uids_with_clip_score)",
            "model": self.identity,
            "rule": f"top {cfg.top_fraction:g} of scored candidates (n = int(N * p); keep score >= n-th largest)"
            if cfg.top_fraction is not None else f"score >= {cfg.threshold:g}",
            "top_fraction": cfg.top_fraction,
            "threshold": self.cutoff,
            "num_scored": self.num_scored,
            "num_computed_now": self.num_computed,
            "scoring": self.timings or None,
            "scores": str(cfg.scores_path()),
        }


def main(cfg: ClipScoreConfig) -> dict:
    return run_filter(ClipScoreFilter(cfg), cfg)
