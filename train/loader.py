"""Streaming image–text batches from shards, split across processes and workers, resumable.

Built on :mod:`base.shards` (``expand_shards``, ``iter_samples``, ``read_sizes``,
``decode_image``): no sample counts by hand, one way to open a shard.

How a stream is laid out (per process ``rank`` of ``world_size``, per DataLoader worker):

- **Shard split.** Each epoch, every process draws the same seeded permutation of the shard
  list; process ``rank`` takes every ``world_size``-th shard of it, and its worker ``w`` of
  ``W`` every ``W``-th of those. Each sample is therefore read by exactly one process and one
  worker per epoch; epochs follow each other without end (the trainer stops at its step count).
  The split is by shard, not by sample: with a shard count that does not divide by the
  processes (or shards of unequal sizes) the processes' shares differ in size; each trains the
  same number of samples per step, so a smaller share comes round sooner and the processes'
  epochs drift apart (nothing is dropped or padded; samples seen follow the step count).
  With ``resampled=True`` (DataComp's ``--dataset-resampled``, a fixed samples-seen budget)
  each worker instead draws shards with replacement, weighted by their sample counts.
- **Chunks and shuffle buffer.** A worker reads its shards ``chunk_shards`` at a time; within
  a chunk samples pass a shuffle buffer of ``shuffle_buffer`` (webdataset's buffer shuffle),
  whose generator is seeded by (seed, rank, worker, chunk). The buffer drains at a chunk's end.
- **Decode and skip.** After the buffer, images are decoded with ``decode_image`` (pixel bound
  checked first) and open_clip's train transform, captions drawn by the caption source
  (:mod:`train.captions`) and tokenized per batch. An undecodable image, or a sample without
  image or caption, is skipped and counted (``data/skipped_<reason>``); the batch is filled
  from the next samples. Augmentation and caption draws are seeded per sample. A stream that
  skips more samples in a row than the whole dataset holds stops with a ``ShardError``: its
  shards hold nothing to train on, and it would otherwise spin forever.
- **Position.** Every batch carries its worker's position (chunk, samples drawn from the
  chunk's buffer); the main process keeps the last consumed position of each worker. A resume
  replays at most one chunk per worker through the buffer without decoding, so it is exact and
  its cost is bounded. DataLoader serves workers round-robin, so after ``n`` batches the
  workers are rotated by ``n mod W`` to keep the same order as the uninterrupted run.

The DataLoader is *not* passed to ``accelerator.prepare``: the split above is already per
process, and Accelerate would split an IterableDataset again (``IterableDatasetShard``: each
process would keep 1/world of its own share) or read everything on rank 0 and scatter it
(``dispatch_batches``, Accelerate's default for iterable datasets).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from base.shards import Sample, ShardError, decode_image, expand_shards, iter_samples, read_sizes
from train.captions import CaptionSource, mix64

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LoaderConfig:
    """How shards become batches."""

    data: str  # shard list: brace pattern, glob, folder or '::'-joined list
    batch_size: int  # samples per batch on this process
    workers: int = 2  # DataLoader worker processes per training process (0: load in the training process)
    shuffle_buffer: int = 1000  # samples held by each worker's shuffle buffer
    chunk_shards: int = 4  # shards a worker reads per shuffle chunk (bounds a resume's replay)
    resampled: bool = False  # draw shards with replacement (fixed samples-seen budget, DataComp's default)
    seed: int = 0  # seeds the shard order, buffers, augmentation and caption draws

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_shards", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")


class SkipSample(Exception):
    """A sample that cannot be trained on; ``reason`` becomes the counter's name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ImageTextEncoder:
    """Sample → (image tensor, caption texts); a list of those → a batch dict of tensors.

    Batch keys: ``image`` (float, N×3×H×W), one LongTensor of tokens per caption slot
    (``text``; ``text_syn`` under the ``dual`` source), ``uid`` (list of str).
    """

    def __init__(self, preprocess, tokenizer, source: CaptionSource, *, max_pixels: int = 89_478_485,
                 draft: int | None = None) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.source = source
        self.max_pixels = max_pixels
        self.draft = draft  # JPEGs decode at a DCT scale keeping >= this many pixels per side
        self.restore_rng = get_worker_info() is None  # in the training process: leave the model's RNG alone

    def encode(self, sample: Sample, seed: int) -> tuple[Any, list[str], list[str], str | None]:
        """(image tensor, texts per slot, kinds, uid); raises :class:`SkipSample`."""
        if not sample.ok:  # a sample the shard reader could not read whole (bad_json, bad_member, ...)
            raise SkipSample(sample.status)
        if sample.image is None:
            raise SkipSample("no_image")
        picked = self.source.pick(sample, seed)
        if picked is None:
            raise SkipSample("no_caption")
        texts, kinds = picked
        try:
            image = decode_image(sample.image, max_pixels=self.max_pixels, draft=self.draft)
        except ValueError as err:
            raise SkipSample("too_large" if "exceeds" in str(err) else "undecodable") from err
        # Augmentation is a pure function of the position: seed torch's CPU generator (what
        # torchvision's random transforms draw from). Not torch.manual_seed: it also queues a
        # lazy CUDA seeding that formats a stack trace, over a millisecond per sample.
        generator = torch.default_generator
        saved = generator.get_state() if self.restore_rng else None
        generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            return self.preprocess(image), texts, kinds, sample.uid
        finally:
            if saved is not None:
                generator.set_state(saved)

    def collate(self, items: Sequence[tuple[Any, list[str], list[str], str | None]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"image": torch.stack([item[0] for item in items])}
        for slot_index, slot in enumerate(self.source.slots):
            batch[slot] = self.tokenizer([item[1][slot_index] for item in items])
        batch["uid"] = [item[3] or "" for item in items]
        return batch


# --------------------------------------------------------------------------------------------
# Which shards a worker reads


class ShardPlan:
    """The shard chunks of every (rank, worker) stream; pure functions of the seed."""

    def __init__(self, shards: Sequence[str], sizes: Sequence[int], *, rank: int, world_size: int, num_workers: int,
                 chunk_shards: int, resampled: bool, seed: int) -> None:
        self.shards = list(shards)
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.chunk_shards, self.resampled, self.seed = chunk_shards, resampled, seed
        streams = world_size * num_workers
        if not resampled and len(self.shards) < streams:
            raise ShardError(
                f"{len(self.shards)} shard(s) for {world_size} process(es) x {num_workers} worker(s); every stream "
                "needs a shard of its own: use fewer --workers, more shards, or --resampled"
            )
        if self.sizes.sum() <= 0:
            raise ShardError("the shard list holds no samples (sizes.json counts are all 0)")
        self._size_of = {path: int(size) for path, size in zip(self.shards, self.sizes, strict=True)}

    def expected_samples(self, shards: Sequence[str]) -> int:
        """What sizes.json says a chunk's shards hold (a shard drawn twice counts twice)."""
        return sum(self._size_of[path] for path in shards)

    def _mine(self, logical: int, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in perm[self.rank :: self.world_size][logical :: self.num_workers]]

    def chunks_per_epoch(self, logical: int) -> int:
        count = len(range(self.rank, len(self.shards), self.world_size)[logical :: self.num_workers])
        return math.ceil(count / self.chunk_shards)

    def chunk(self, logical: int, index: int) -> list[str]:
        """The shard paths of chunk ``index`` of worker stream ``logical``."""
        if self.resampled:
            rng = np.random.default_rng([self.seed, self.rank, logical, index, 1])
            picks = rng.choice(len(self.shards), size=self.chunk_shards, replace=True, p=self.sizes / self.sizes.sum())
            return [self.shards[int(i)] for i in picks]
        per_epoch = self.chunks_per_epoch(logical)
        epoch, within = divmod(index, per_epoch)
        mine = self._mine(logical, epoch)
        return [self.shards[i] for i in mine[within * self.chunk_shards : (within + 1) * self.chunk_shards]]

    def epoch_of(self, logical: int, index: int) -> int:
        return 0 if self.resampled else index // self.chunks_per_epoch(logical)


def buffered_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's buffer shuffle: keep ``size`` items, emit a random one per new item, drain."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# --------------------------------------------------------------------------------------------
# The worker side


def _worker_info() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardIterable(IterableDataset):
    """The IterableDataset each DataLoader worker iterates (its logical stream of batches)."""

    def __init__(self, plan: ShardPlan, encoder: ImageTextEncoder, *, batch_size: int, shuffle_buffer: int,
                 seed: int, rotation: int, starts: dict[int, tuple[int, int]]) -> None:
        self.plan, self.encoder = plan, encoder
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rotation, self.starts = rotation, starts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_info()
        if num_workers != self.plan.num_workers:
            raise RuntimeError(f"stream planned for {self.plan.num_workers} workers, runs with {num_workers}")
        logical = (worker + self.rotation) % num_workers
        start_chunk, start_drawn = self.starts.get(logical, (0, 0))
        # In the training process (no workers) per-sample seeding must not disturb the model's RNG.
        self.encoder.restore_rng = get_worker_info() is None
        yield from self._batches(logical, start_chunk, start_drawn)

    def _batches(self, logical: int, start_chunk: int, start_drawn: int) -> Iterator[dict[str, Any]]:
        rank, seed = self.plan.rank, self.seed
        items: list[Any] = []
        skipped: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        # More skips in a row than the whole dataset holds: this stream's shards hold nothing to
        # train on (every image broken or missing), and it would spin forever.
        skip_limit = int(self.plan.sizes.sum())
        in_a_row = 0
        chunk = start_chunk
        # an encoder that takes the epoch (train.distill's, for --dr-augmentation sequential) gets it
        takes_epoch = "epoch" in inspect.signature(self.encoder.encode).parameters
        while True:
            shards = self.plan.chunk(logical, chunk)
            epoch = self.plan.epoch_of(logical, chunk)
            rng = random.Random(mix64(seed, rank, logical, chunk, 0xB0FF))
            drawn = 0
            samples = buffered_shuffle(iter_samples(shards), self.shuffle_buffer, rng)
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    expected = self.plan.expected_samples(shards)
                    if drawn != expected:  # a lying sizes.json: it sets the epoch and the default samples seen
                        yield {"_error": f"{', '.join(shards)}: sizes.json says {expected} samples, the tar(s) hold "
                                         f"{drawn}; 'qcap shards verify' names the wrong entries, 'qcap shards "
                                         "finalize' rewrites them from the shards' stats"}
                        return
                    break
                except ShardError as err:  # the shard as a whole: one clear line in the training process
                    yield {"_error": str(err)}
                    return
                drawn += 1
                if chunk == start_chunk and drawn <= start_drawn:
                    continue  # replaying a resumed chunk: already trained on
                try:
                    position_seed = mix64(seed, rank, logical, chunk, drawn)
                    item = (self.encoder.encode(sample, position_seed, epoch=epoch) if takes_epoch
                            else self.encoder.encode(sample, position_seed))
                except SkipSample as skip:
                    skipped[skip.reason] += 1
                    in_a_row += 1
                    if in_a_row > skip_limit:
                        yield {"_error": f"{in_a_row} samples in a row could not be trained on ({dict(skipped)}), "
                                         f"more than the {skip_limit} the shards hold; last shards read: "
                                         f"{', '.join(shards)}"}
                        return
                    continue
                in_a_row = 0
                kinds.update(item[2])
                items.append(item)
                if len(items) == self.batch_size:
                    batch = self.encoder.collate(items)
                    batch["_position"] = [logical, chunk, drawn, self.plan.epoch_of(logical, chunk)]
                    batch["_skipped"] = dict(skipped)
                    batch["_captions"] = dict(kinds)
                    yield batch
                    items, skipped, kinds = [], Counter(), Counter()
            chunk += 1


# --------------------------------------------------------------------------------------------
# The training-process side: a BatchStream


class ShardStream:
    """Endless batches of one process (the :class:`train.loop.BatchStream` protocol).

    ``record_uids`` (a path) appends ``batch_index<TAB>uid`` for every trained sample, so a run
    can show which samples each process saw; a resume drops the lines after its position.
    """

    def __init__(self, config: LoaderConfig, encoder: ImageTextEncoder, *, rank: int = 0, world_size: int = 1,
                 record_uids: str | os.PathLike | None = None) -> None:
        self.config = config
        self.encoder = encoder
        self.rank, self.world_size = rank, world_size
        self.shards = expand_shards(config.data)
        self.sizes = _shard_sizes(self.shards)
        self.num_samples = int(sum(self.sizes))
        workers = config.workers
        if not config.resampled:
            fit = max(1, len(self.shards) // world_size)
            if workers > fit:
                log.warning("%d shards for %d process(es): using %d loader worker(s) instead of %d",
                            len(self.shards), world_size, fit, workers)
                workers = fit
        self.num_workers = workers
        self.plan = ShardPlan(self.shards, self.sizes, rank=rank, world_size=world_size,
                              num_workers=max(1, workers), chunk_shards=config.chunk_shards,
                              resampled=config.resampled, seed=config.seed)
        self.positions: dict[int, tuple[int, int]] = {}
        self.epochs: dict[int, int] = {}
        self.num_batches = 0
        self.counts: Counter[str] = Counter()
        self.record_uids = Path(record_uids) if record_uids is not None else None

    # ---- BatchStream -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical_workers = self.plan.num_workers
        dataset = ShardIterable(
            self.plan,
            self.encoder,
            batch_size=self.config.batch_size,
            shuffle_buffer=self.config.shuffle_buffer,
            seed=self.config.seed,
            rotation=self.num_batches % logical_workers,
            starts=dict(self.positions),
        )
        # The DataLoader's base seed comes from its own generator, not torch's global RNG: a resumed
        # run restores the global RNG, and a draw here would shift the model's stream (dropout).
        generator = torch.Generator().manual_seed(mix64(self.config.seed, self.rank, self.num_batches) >> 1)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.num_workers else None,
            persistent_workers=False,
            generator=generator,
        )
        record = open(self.record_uids, "a", encoding="utf-8") if self.record_uids else None
        try:
            for batch in _unwrapped(loader):
                if "_error" in batch:
                    raise ShardError(batch["_error"])
                logical, chunk, drawn, epoch = (int(v) for v in batch.pop("_position"))
                self.positions[logical] = (chunk, drawn)
                self.epochs[logical] = epoch
                skipped = batch.pop("_skipped")
                kinds = batch.pop("_captions")
                uids = batch.pop("uid")
                self.counts["samples"] += len(uids)
                self.counts.update({f"skipped_{k}": int(v) for k, v in skipped.items()})
                self.counts.update({f"captions_{k}": int(v) for k, v in kinds.items()})
                if record is not None:
                    record.write("".join(f"{self.num_batches}\t{uid}\n" for uid in uids))
                    record.flush()
                self.num_batches += 1
                yield batch
        finally:
            if record is not None:
                record.close()

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_batches": self.num_batches,
            "num_workers": self.plan.num_workers,
            "num_shards": len(self.shards),
            "positions": {str(k): list(v) for k, v in sorted(self.positions.items())},
            "epochs": {str(k): v for k, v in sorted(self.epochs.items())},
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_workers"]) != self.plan.num_workers:
            raise ValueError(
                f"checkpoint's data position is for {state['num_workers']} loader worker(s) per process, this run "
                f"has {self.plan.num_workers}; resume with --workers {state['num_workers']}"
            )
        if int(state["num_shards"]) != len(self.shards):
            raise ValueError(
                f"checkpoint was trained on {state['num_shards']} shards, --data now lists {len(self.shards)}; "
                "resume with the same shard list"
            )
        self.num_batches = int(state["num_batches"])
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}
        self.epochs = {int(k): int(v) for k, v in state.get("epochs", {}).items()}
        self.counts = Counter({k: int(v) for k, v in state["counts"].items()})
        if self.record_uids is not None and self.record_uids.exists():
            kept = [line for line in self.record_uids.read_text(encoding="utf-8").splitlines(keepends=True)
                    if line.strip() and int(line.split("\t", 1)[0]) < self.num_batches]
            tmp = self.record_uids.with_name(f".{self.record_uids.name}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.record_uids)

    # ---- reporting ---------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Additive counters for logging (the Trainer sums them over processes): samples trained,
        ``skipped_<reason>``, ``captions_real``/``captions_synthetic`` drawn."""
        return {f"data/{k}": float(v) for k, v in sorted(self.counts.items())}


def _unwrapped(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate a DataLoader; a ShardError or ConfigError raised in a worker process comes out as
    the original one-line error. torch re-raises a worker's exception in this process as the same
    type, with 'Caught X in DataLoader worker process N' and the worker's whole traceback as its
    message; that would reach the user as a traceback."""
    from base.config import ConfigError

    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (ShardError, ConfigError) as err:
            original = original_worker_message(err)
            if original is None:
                raise
            raise type(err)(original) from None
        yield batch


def original_worker_message(err: BaseException) -> str | None:
    """The message a DataLoader worker's exception had before torch wrapped it (None when
    ``err`` is not such a re-raise)."""
    text = str(err)
    if not text.startswith(f"Caught {type(err).__name__} in DataLoader worker process"):
        return None
    cls = type(err)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = text.rfind(prefix)
        if at >= 0:
            return text[at + len(prefix):].strip()
    return text.splitlines()[0]


def _shard_sizes(shards: Sequence[str]) -> list[int]:
    """Samples per shard from each folder's sizes.json (or the shards' stats)."""
    by_folder: dict[str, dict[str, int]] = {}
    sizes = []
    for tar in shards:
        folder = os.path.dirname(tar)
        if folder not in by_folder:
            by_folder[folder] = read_sizes(folder)
        name = os.path.basename(tar)
        if name not in by_folder[folder]:
            raise ShardError(f"{folder}/sizes.json has no entry for {name}; run 'qcap shards finalize {folder}'")
        sizes.append(by_folder[folder][name])
    return sizes


def peek_sample(shards: Sequence[str]) -> Sample | None:
    """The first readable sample of the shards, image included (for up-front contract checks)."""
    for tar in shards:
        for sample in iter_samples([tar]):
            if sample.ok:  # a sample the reader could not read whole says nothing about the folder
                return sample
    return None
