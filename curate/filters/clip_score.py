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

Drop reasons: ``low_clip_score``, ``undecodable_image`` (bytes in the tar that do not decode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

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
from curate.filters.report import Histogram, score_edges
from curate.shards import ShardError, atomic_write_bytes, decode_image, iter_samples, uids_to_array

log = logging.getLogger(__name__)
PARTS_SUFFIX = ".parts"
SCORE_COLUMNS = ("uid", "score", "shard", "key")
_META_KEY = b"qcap.clip_score"


# --------------------------------------------------------------------------------------------
# Identity of the scores: which model, which preprocessing


def model_identity(cfg: ClipScoreConfig) -> dict[str, Any]:
    """What makes two score files comparable: model, weights, caption source and decode size.

    A checkpoint that is not there, or a folder that holds none, is a UsageError here, before
    any shard is read or Ray starts."""
    from curate.cli import UsageError

    name, weights = cfg.model, cfg.pretrained
    if cfg.checkpoint is not None:
        from curate.models import CONFIG_FILE, WEIGHTS_FILE, resolve_checkpoint_dir, weights_sha256

        path = Path(cfg.checkpoint)
        if path.is_dir():
            try:
                folder = resolve_checkpoint_dir(path)
            except ValueError as err:
                raise UsageError(f"--checkpoint {err}") from err
            name = json.loads((folder / CONFIG_FILE).read_text()).get("model_name") or name
            path = folder / WEIGHTS_FILE
        elif not path.is_file():
            raise UsageError(f"--checkpoint {path}: no such file or folder (a qcap checkpoint folder, a training "
                             "run or a weights file)")
        weights = f"sha256:{weights_sha256(path)}"
    return {"model": name or "unknown", "weights": weights, "text_column": cfg.text_column,
            "decode_size": cfg.decode_size, "precision": cfg.precision}


# --------------------------------------------------------------------------------------------
# Scores on disk


class ScoreIndex:
    """uid -> score lookups over sorted DataComp uid arrays (compact: 20 bytes a sample)."""

    def __init__(self, uids: Sequence[str], scores: Sequence[float]) -> None:
        pairs = uids_to_array(uids, sort=False)
        order = np.argsort(pairs, kind="stable")
        self.uids, self.scores = pairs[order], np.asarray(scores, dtype=np.float32)[order]

    def __len__(self) -> int:
        return len(self.uids)

    def lookup(self, uids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, found) of ``uids``: NaN where there is no score — not scored yet (found False)
        or scored and undecodable (found True)."""
        out = np.full(len(uids), np.nan, dtype=np.float32)
        found = np.zeros(len(uids), dtype=bool)
        if not len(uids) or not len(self.uids):
            return out, found
        query = uids_to_array(uids, sort=False)
        index = np.clip(np.searchsorted(self.uids, query), 0, len(self.uids) - 1)
        found = self.uids[index] == query
        out[found] = self.scores[index[found]]
        return out, found


def read_scores(path: Path, identity: dict[str, Any] | None = None):
    """A scores Parquet as a pyarrow table; refuses one made by another model (when given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{path}: not a readable scores Parquet ({err}); delete it or pass --rescore") from err
    missing = [c for c in ("uid", "score") if c not in table.column_names]
    if missing:
        raise ShardError(f"{path}: missing column(s) {missing}; a scores file holds uid and score")
    if identity is not None:
        recorded = json.loads((table.schema.metadata or {}).get(_META_KEY, b"null"))
        if recorded is not None and recorded != identity:
            differ = {k: (recorded.get(k), identity.get(k)) for k in sorted(set(recorded) | set(identity))
                      if recorded.get(k) != identity.get(k)}
            raise ShardError(
                f"{path}: scores made with other settings (theirs, now): {json.dumps(differ)}; repeat the flags "
                "they were made with, pass --rescore to recompute, or give --scores another path"
            )
    return table


def _scores_table(rows: dict[str, list], identity: dict[str, Any]):
    import pyarrow as pa

    schema = pa.schema([("uid", pa.string()), ("score", pa.float32()), ("shard", pa.string()), ("key", pa.string())],
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
    """A shard's scores; rows of an earlier part of the same shard (other uids) are kept."""
    if path.exists():
        old = read_scores(path, identity).to_pydict()
        new = set(rows["uid"])
        rows = {c: [v for v, u in zip(old[c], old["uid"], strict=True) if u not in new] + rows[c] for c in SCORE_COLUMNS}
    _write_parquet(_scores_table(rows, identity), path)


# --------------------------------------------------------------------------------------------
# The Ray Data pipeline


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Join ``address``, start a local Ray with an explicit CPU count, or reuse a running one."""
    import ray

    if ray.is_initialized():  # a caller (a notebook, a test session) owns Ray: use it, leave it up
        yield
        return
    if address is not None:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _read_shard(item: dict[str, Any], *, transform, tokenizer, text_column: str | None,
                decode_size: int | None) -> Iterator[dict[str, Any]]:
    """One shard's candidate samples, decoded and preprocessed (a Ray Data flat_map)."""
    wanted = set(item["keys"])
    shard = os.path.basename(item["tar"])
    for sample in iter_samples([item["tar"]]):
        if sample.key not in wanted:
            continue
        text = sample.text if text_column is None else sample.meta.get(text_column)
        tokens = tokenizer([text or ""])[0].numpy()
        error = ""
        try:
            image = decode_image(sample.image or b"", draft=decode_size)
            pixels = transform(image).numpy()
        except ValueError as err:
            error = str(err)[:200]
            pixels = None
        yield {"shard": shard, "key": sample.key, "uid": sample.uid, "tokens": tokens, "error": error,
               "pixels": pixels if pixels is not None else np.zeros(item["pixel_shape"], dtype=np.float32)}


class ClipScorer:
    """A Ray Data actor: one open_clip model, scores batches of preprocessed images and tokens."""

    def __init__(self, *, model: str | None, pretrained: str | None, checkpoint: str | None, device: str,
                 precision: str, threads: int) -> None:
        import torch

        from curate.models import load_model

        torch.set_num_threads(max(1, threads))
        self.device = device
        self.loaded = load_model(model, pretrained=pretrained, checkpoint=checkpoint, device=device, precision=precision)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.ready_at = time.time()  # model loaded: from here on, throughput is the pipeline's, not start-up's

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = score_batch(self.loaded.model, batch["pixels"], batch["tokens"], device=self.device, dtype=self.dtype)
        scores[np.asarray([bool(e) for e in batch["error"]], dtype=bool)] = np.nan
        return {"shard": batch["shard"], "key": batch["key"], "uid": batch["uid"], "score": scores,
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


def compute_scores(cfg: ClipScoreConfig, todo: dict[str, list[str]], parts: Path, identity: dict[str, Any]) -> dict[str, float]:
    """Score the candidates of the shards in ``todo`` (tar -> keys) on Ray Data, one part per shard.

    Returns timings: ``seconds`` (from the driver's model check to the last score, Ray start
    included), ``startup_seconds`` (until the first actor had its model loaded), and
    ``steady_images_per_s``: images over the time from then to the last score — the pipeline's
    throughput once it can run (reading and decoding not hidden behind the model show up here).
    """
    import ray.data
    from tqdm import tqdm

    started = time.time()

    from curate.models import load_model

    checkpoint = str(cfg.checkpoint) if cfg.checkpoint is not None else None
    # The driver loads the model once: a wrong name or checkpoint fails here, before Ray starts,
    # pretrained weights are cached for the actors, and the transform and tokenizer come along.
    try:
        probe = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=checkpoint)
    except (ValueError, RuntimeError) as err:  # open_clip: RuntimeError for an unknown model or pretrained tag
        from curate.cli import UsageError

        raise UsageError(f"cannot load the scoring model: {str(err)[:500]}") from err
    transform, tokenizer = probe.preprocess_val, probe.tokenizer
    from PIL import Image

    pixel_shape = list(transform(Image.new("RGB", (32, 32))).shape)  # stands in for undecodable images
    del probe
    expected = {os.path.basename(tar): len(keys) for tar, keys in todo.items()}
    items = [{"tar": tar, "keys": keys, "pixel_shape": pixel_shape} for tar, keys in todo.items()]
    with ray_session(cfg.ray_address, cfg.num_cpus):
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
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            ready = min(ready, float(batch["ready_at"].min()))
            for shard, key, uid, score in zip(batch["shard"], batch["key"], batch["uid"], batch["score"], strict=True):
                rows = pending[str(shard)]
                rows["uid"].append(str(uid))
                rows["score"].append(float(score))
                rows["shard"].append(str(shard))
                rows["key"].append(str(key))
                if len(rows["uid"]) == expected[str(shard)]:
                    _write_part(parts / f"{Path(str(shard)).stem}.parquet", rows, identity)
            bar.update(len(batch["uid"]))
        bar.close()
        finished = time.time()
    short = {s: (len(r["uid"]), expected[s]) for s, r in pending.items() if len(r["uid"]) != expected[s]}
    if short:  # the tar lacks samples its Parquet lists as successes: a broken shard, not a bug here
        raise ShardError(f"clip-score: these shards' tars hold fewer candidates than their Parquets list "
                         f"(scored, listed): {short}; check them with `qcap shards verify`")
    total = sum(expected.values())
    ready = min(ready, finished)
    steady = total / (finished - ready) if finished > ready else None
    return {"images": total, "seconds": round(finished - started, 3), "startup_seconds": round(ready - started, 3),
            "steady_images_per_s": round(steady, 2) if steady else None}


# --------------------------------------------------------------------------------------------
# The filter


class ClipScoreFilter(BaseFilter):
    name = "clip-score"
    value_types: ClassVar[dict[str, str]] = {"clip_score": "float32"}

    def __init__(self, cfg: ClipScoreConfig) -> None:
        super().__init__(cfg)
        self.cfg: ClipScoreConfig = cfg
        self.index: ScoreIndex | None = None
        self.cutoff: float | None = None
        self.num_scored = 0
        self.num_computed = 0
        self.identity: dict[str, Any] = {}
        self._scores = np.zeros(0, dtype=np.float32)
        self.timings: dict[str, float] = {}  # of the model pass, when one ran

    def prepare(self, shards: Sequence[str], subset: np.ndarray | None) -> None:
        cfg = self.cfg
        self.identity = model_identity(cfg)
        path = cfg.scores_path()
        parts = path.with_name(path.name + PARTS_SUFFIX)
        if cfg.rescore:
            import shutil

            shutil.rmtree(parts, ignore_errors=True)
            if path.exists():
                path.unlink()
        index = self._load_existing(path, parts)
        todo: dict[str, list[str]] = {}
        for tar, uids, keys in self._candidates(shards, subset):
            missing = ~index.lookup(uids)[1]
            if missing.any():
                todo[tar] = [k for k, m in zip(keys, missing, strict=True) if m]
        if todo:
            self.num_computed = sum(len(k) for k in todo.values())
            log.info("clip-score: scoring %d samples of %d shards", self.num_computed, len(todo))
            self.timings = compute_scores(cfg, todo, parts, self.identity)
        if todo or not path.exists() or parts.exists():
            self._write_scores_file(path, parts)
            index = self._load_existing(path, parts)
        self.index = index
        # DataComp's get_threshold over this run's scored candidates (the file may hold more)
        scores = [index.lookup(uids)[0] for _, uids, _ in self._candidates(shards, subset)]
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

    @staticmethod
    def _candidates(shards: Sequence[str], subset: np.ndarray | None) -> Iterator[tuple[str, list[str], list[str]]]:
        """(tar, uids, keys) of every shard's candidates: downloaded and inside the subset."""
        for tar in shards:
            rows = read_shard_rows(tar)
            success, inside = candidate_mask(rows, subset)
            chosen = np.flatnonzero(success & inside)
            yield tar, [rows.uids[i] for i in chosen], [rows.keys[i] for i in chosen]

    def _load_existing(self, path: Path, parts: Path) -> ScoreIndex:
        """Scores already made: the scores file and any parts (a killed run's finished shards)."""
        uids: list[str] = []
        scores: list[float] = []
        sources = ([path] if path.exists() else []) + (sorted(parts.glob("*.parquet")) if parts.exists() else [])
        for source in sources:
            table = read_scores(source, self.identity)
            uids += table.column("uid").to_pylist()
            scores += table.column("score").to_pylist()
        return ScoreIndex(uids, [np.nan if s is None else s for s in scores])

    def _write_scores_file(self, path: Path, parts: Path) -> None:
        """The scores file: the previous file's rows plus every part, one row per uid."""
        import pyarrow as pa

        tables = []
        if path.exists():
            tables.append(read_scores(path, self.identity).select(list(SCORE_COLUMNS)))
        tables += [read_scores(p, self.identity).select(list(SCORE_COLUMNS)) for p in sorted(parts.glob("*.parquet"))]
        if not tables:
            rows: dict[str, list] = {c: [] for c in SCORE_COLUMNS}
            _write_parquet(_scores_table(rows, self.identity), path)
            return
        table = pa.concat_tables(tables).to_pydict()
        latest: dict[str, int] = {}
        for i, uid in enumerate(table["uid"]):  # parts come after the old file: newest score wins
            latest[uid] = i
        order = sorted(latest.values())
        rows = {c: [table[c][i] for i in order] for c in SCORE_COLUMNS}
        _write_parquet(_scores_table(rows, self.identity), path)
        import shutil

        shutil.rmtree(parts, ignore_errors=True)  # everything they held is in the file now

    def read_rows(self, tar: str) -> ShardRows:
        return read_shard_rows(tar, text_column=self.cfg.text_column)

    def annotate(self, shard: str, records: list[FilterRecord]) -> None:
        if self.index is None:
            raise RuntimeError("prepare() must run before annotate()")
        scores, found = self.index.lookup([r.uid for r in records])
        if not found.all():
            raise RuntimeError(f"clip-score: {int((~found).sum())} candidates of {shard} have no score")
        for record, score in zip(records, scores, strict=True):
            record.values["clip_score"] = None if np.isnan(score) else float(score)

    def keep(self, record: FilterRecord) -> Keep:
        score = record.values.get("clip_score")
        if score is None:
            return False, "undecodable_image"
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
