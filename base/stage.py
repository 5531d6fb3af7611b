"""The stage kit: what every shard-parallel stage's driver does around its own work.

A stage claims its output folder (:func:`claim_output`: a file there is refused, a folder made
with other output-shaping settings is refused with one :class:`~base.cli.UsageError` that names
the differing fields, ``--overwrite`` removes only the stage's own files, a folder of shards
the stage did not write is never touched), plans its shards, skips the finished ones
(:func:`pending_shards`), runs the others on a pool with a bar (:func:`run_pool`), finalizes and
reconciles, and writes its run records (:func:`write_run_records`). The actor stages (caption,
reinforce) share one whole driver, :func:`run_shard_job`.

Usage::

    saved = claim_output(out, stage="reshard", identity=ident, overwrite=cfg.overwrite,
                         own_files=(CONFIG_FILE, SUMMARY_FILE))
    make_folder(out)
    write_run_records(out, cfg, identity=ident)              # the resolved config, before any work
    ran_on = run_pool(write_shard, todo, num_workers=cfg.num_workers, ray_address=cfg.ray_address,
                      total=len(plan), initial=len(plan) - len(todo), desc="reshard", unit="shard")
    write_run_records(out, summary=summary)                  # the summary, last
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from base.cli import UsageError
from base.config import arg, save_config
from base.raykit import RAY_ADDRESS_HELP
from base.shards import (
    SIZES_FILE,
    ShardError,
    atomic_write_json,
    completed_shards,
    expand_shards,
    finalize_folder,
    is_complete,
    remove_own_files,
    shard_id_of,
)

log = logging.getLogger(__name__)

# The run records every stage writes beside its output, under these two names: the resolved
# config (base.config.save_config, with the output's identity; its "stage" names the stage) and
# the summary whose counts reconcile, written last (write_run_records).
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RECORD_KINDS = ("config", "summary")
# The names the stages gave these records before they shared the two above. A folder written
# then is still resumed by its stage (claim_output) and read by the stages and reports after it
# (run_record_path, read_run_record); nothing writes these names any more.
LEGACY_RECORDS: dict[str, dict[str, str]] = {
    "reshard": {"config": "reshard.json", "summary": "report.json"},
    "subset": {"config": "subset.json", "summary": "subset_summary.json"},
    "build-dr": {"config": "build_dr.json", "summary": "build_dr_summary.json"},
    "caption": {"config": "caption_config.json", "summary": "caption_summary.json"},
    "reinforce": {"config": "reinforce_config.json", "summary": "reinforce_summary.json"},
    "control-rung": {"config": "control.json", "summary": "control_summary.json"},
}
RUN_RECORDS = (CONFIG_FILE, SUMMARY_FILE)  # what every stage's --overwrite removes among its own files
NOWHERE = "nowhere (every shard was already written)"  # where a run ran that had nothing to do
_SHARD_FILE = re.compile(r"^\d+(?:\.tar|\.parquet|_stats\.json|\.done)$")
_SHOWN = 80  # characters of a differing value an error shows


# --------------------------------------------------------------------------------------------
# The run fields: how and where a shard stage runs, never what it writes


@dataclass(kw_only=True)
class PoolConfig:
    """Where a shard-parallel stage's tasks run (:func:`run_pool`, :class:`base.workers.Workers`):
    local processes or Ray tasks; the output is the same bytes on any pool."""

    num_workers: int = arg(1, shapes_output=False, help="local processes running the shard tasks (the output is the "
                                                        "same for any number)")
    ray_address: str | None = arg(None, shapes_output=False, help=RAY_ADDRESS_HELP)


@dataclass(kw_only=True)
class ShardStageConfig(PoolConfig):
    """The run fields of a stage that claims an output folder (:func:`claim_output`): its pool,
    ``--overwrite`` and the progress bars. A stage's config extends it (or
    :class:`CardStageConfig`); none of these fields shapes the output."""

    overwrite: bool = arg(False, shapes_output=False, help="replace an output folder made with other inputs or settings "
                                                           "(only the stage's own files are removed)")
    progress: bool = arg(True, shapes_output=False, help="show progress bars")

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("num_workers: must be >= 1")


@dataclass(kw_only=True)
class CardStageConfig(ShardStageConfig):
    """:class:`ShardStageConfig` for a stage that writes a dataset card beside its shards."""

    card: bool = arg(True, shapes_output=False, help="write the dataset card (README.md, preview.html, card/*.png)")


# --------------------------------------------------------------------------------------------
# The output folder


def check_folder(out: str | os.PathLike, what: str = "the output") -> Path:
    """``out`` as a Path; a UsageError when it is a file (a typo for a folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder; choose a folder for {what}")
    return out


def make_folder(out: str | os.PathLike, what: str = "the output") -> Path:
    """Make the output folder (and its parents); a UsageError when it cannot be one."""
    out = check_folder(out, what)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot be made a folder ({err.strerror or err})") from err
    return out


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A run record a previous run wrote (a JSON object); a UsageError saying how to start over
    when it is not readable."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: unreadable ({err}); use --overwrite to start over") from err
    if not isinstance(value, dict):
        raise UsageError(f"{path}: not a run record (a JSON object); use --overwrite to start over")
    return value


def legacy_names(stage: str) -> tuple[str, ...]:
    """The run records' names ``stage`` wrote before the shared ones (none for a newer stage)."""
    return tuple(LEGACY_RECORDS.get(stage, {}).values())


def run_record_path(folder: str | os.PathLike, kind: str, stage: str) -> Path | None:
    """The ``kind`` (``config`` or ``summary``) run record ``stage`` left in ``folder``: the shared
    name (a ``config.json`` only when its ``stage`` is this one, or when it cannot be read: the
    caller says so), else the stage's legacy name (:data:`LEGACY_RECORDS`); None when neither."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"kind: one of {RECORD_KINDS}, not {kind!r}")
    folder = Path(folder)
    path = folder / (CONFIG_FILE if kind == "config" else SUMMARY_FILE)
    if path.is_file():
        if kind == "summary":
            return path
        try:
            written_by = json.loads(path.read_text(encoding="utf-8")).get("stage", stage)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return path
        if written_by == stage:
            return path
    legacy = LEGACY_RECORDS.get(stage, {}).get(kind)
    if legacy is not None and (folder / legacy).is_file():
        return folder / legacy
    return None


def read_run_record(folder: str | os.PathLike, kind: str, stage: str) -> dict[str, Any] | None:
    """The ``kind`` run record ``stage`` left in ``folder`` (:func:`run_record_path`: the shared
    name, else the legacy one), None when there is none; a UsageError when it is unreadable."""
    path = run_record_path(folder, kind, stage)
    return None if path is None else read_record(path)


def differences(recorded: Any, identity: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``field: recorded -> now`` for each field of ``identity`` whose recorded value differs
    (nested objects by dotted name); values are shortened to a readable length."""
    if not isinstance(recorded, Mapping):
        return [f"{prefix or 'identity'}: none recorded"]
    out = []
    for name in sorted(set(identity) | set(recorded), key=lambda n: (n not in identity, str(n))):
        old, new = recorded.get(name), identity.get(name)
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += differences(old, new, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}: {_short(old)} -> {_short(new)}")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def refuse_mismatch(out: str | os.PathLike, stage: str, recorded: Any, identity: Mapping[str, Any]) -> None:
    """The one refusal of a re-run that would mix outputs: a UsageError naming the fields."""
    changed = differences(recorded, identity)
    raise UsageError(f"{out}: holds {stage} output made with other inputs or settings ({'; '.join(changed)}); "
                     "use the same settings to resume, another --out, or --overwrite to start over")


def remove_stage_files(out: str | os.PathLike, stage: str, own_files: Sequence[str],
                       own_dirs: Sequence[str] = (), *, card: bool = False) -> list[str]:
    """``--overwrite``: remove what the stage wrote in ``out`` and only that: its shards, their
    markers and temporaries, ``sizes.json`` (:func:`base.shards.finalize_folder`'s), the files
    named in ``own_files``, the folders named in ``own_dirs`` (a symlink under one of those names
    is unlinked, never followed) and, with ``card``, the dataset card's files
    (:func:`base.card.remove_card`)."""
    from base.card import remove_card

    out = Path(out)
    removed = remove_own_files(out, (SIZES_FILE, *own_files)) + (remove_card(out) if card else [])
    for name in own_dirs:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    if removed:
        log.info("--overwrite: removed %d file(s) %s had written in %s", len(removed), stage, out)
    return removed


def claim_output(
    out: str | os.PathLike,
    *,
    stage: str,
    identity: Mapping[str, Any],
    overwrite: bool,
    own_files: Sequence[str],
    own_dirs: Sequence[str] = (),
    card: bool = False,
    record: str = CONFIG_FILE,
    recorded: Callable[[dict[str, Any]], Any] | None = None,
    what: str = "the output",
    only_with_shards: bool = False,
) -> dict[str, Any] | None:
    """Claim ``out`` for a run of ``stage`` whose output is ``identity``.

    - a file at ``out``: UsageError (``what`` names what belongs there);
    - the stage's legacy config record (:data:`LEGACY_RECORDS`: a folder it began before the
      shared names) is read in place of ``record``, so such a folder resumes, or is refused, as it was;
    - no ``record``: the stage wrote nothing here (a stage records before it writes shards), so
      nothing is removed; shard files there are someone else's: UsageError (``--overwrite`` included);
    - ``--overwrite``: the stage's own files are removed (:func:`remove_stage_files`: shards,
      ``own_files``, the legacy records, ``own_dirs``, with ``card`` the dataset card), the run
      starts over; returns None;
    - a ``record`` whose identity (``recorded(record)``, default its ``"identity"``) differs:
      UsageError naming the fields (:func:`refuse_mismatch`); with ``only_with_shards`` only when
      a shard was finished (a run killed before any shard mixes nothing);
    - else: returns the record of the run being resumed, or None for a fresh folder.
    """
    out = check_folder(out, what)
    legacy = legacy_names(stage)
    # a folder the stage began before the shared names holds its identity under the legacy name
    # (reshard's config.json then held none), and nothing writes that name now: it goes first
    path = next((out / name for name in (LEGACY_RECORDS.get(stage, {}).get("config"), record)
                 if name is not None and (out / name).is_file()), out / record)
    if not path.is_file():
        foreign = sorted(p.name for p in out.iterdir() if _SHARD_FILE.match(p.name)) if out.is_dir() else []
        if foreign:
            raise UsageError(f"{out} holds shard files ({foreign[0]}, ...) but no {record}: qcap {stage} did not "
                             "write them; choose another --out")
        return None  # the stage wrote nothing here (it records before its shards): nothing to remove
    if overwrite:
        try:
            written_by = read_record(path).get("stage", stage)
        except UsageError:
            written_by = stage  # the stage's own record, broken by a kill or by hand
        if written_by != stage:
            raise UsageError(f"--overwrite: {path} was written by qcap {written_by}, not qcap {stage}; choose "
                             "another --out")
        remove_stage_files(out, stage, (*own_files, *legacy), own_dirs, card=card)
        return None
    if only_with_shards and not completed_shards(out):
        return None
    saved = read_record(path)
    previous = recorded(saved) if recorded is not None else saved.get("identity")
    if previous != identity:
        refuse_mismatch(out, stage, previous, identity)
    return saved


def write_run_records(out: str | os.PathLike, cfg: Any = None, summary: Mapping[str, Any] | None = None, *,
                      summary_name: str = SUMMARY_FILE, **extra: Any) -> None:
    """The stage's run records in ``out`` (a folder or an fsspec URL): the resolved config
    (``cfg``, with ``extra`` facts such as the identity or versions, :func:`base.config.save_config`)
    as ``config.json`` and the ``summary`` as ``summary.json``, each written atomically; either may
    be left out (None: the config is written before the work, the summary last). ``summary_name``
    is for the two summaries that keep their names: a filter's ``report.json`` and download's
    ``manifest.json``, which bench/clip_score.py and bench/download.py read."""
    if cfg is not None:
        save_config(cfg, _inside(out, CONFIG_FILE), **extra)
    if summary is not None:
        atomic_write_json(_inside(out, summary_name), dict(summary))


def _inside(out: str | os.PathLike, name: str) -> str | Path:
    """``out/name``: a Path, or for an fsspec URL (``s3://...``, which a Path would mangle) a string."""
    return f"{str(out).rstrip('/')}/{name}" if "://" in str(out) else Path(out) / name


# --------------------------------------------------------------------------------------------
# Shards and the pool


def shards_by_id(spec: str) -> dict[int, str]:
    """The input shards of ``spec`` by shard id; ShardError for two shards with one id."""
    shards: dict[int, str] = {}
    for path in expand_shards(spec):
        shard_id = shard_id_of(path)
        if shard_id in shards:
            raise ShardError(f"{path} and {shards[shard_id]} share shard id {shard_id}; give one folder at a time")
        shards[shard_id] = path
    return shards


def pending_shards(out: str | os.PathLike, shards: Mapping[int, str]) -> list[tuple[int, str]]:
    """The ``(id, input)`` pairs, in id order, whose output shard in ``out`` is not finished."""
    return [(shard_id, path) for shard_id, path in sorted(shards.items()) if not is_complete(out, shard_id)]


def refuse_stale(out: str | os.PathLike, planned: set[int] | range) -> None:
    """A finished output shard the plan does not hold (a folder from a larger plan): UsageError."""
    stale = sorted(set(completed_shards(out)) - set(planned))
    if stale:
        raise UsageError(f"{out}: holds shards {stale[:5]} beyond this run's plan of {len(planned)}; use --overwrite")


def run_pool(func: Callable[[Any], Any], todo: list[Any], *, num_workers: int, ray_address: str | None,
             total: int | None, desc: str, unit: str, initial: int = 0, progress: bool = True,
             weight: Callable[[Any], int] | None = None, start_method: str = "spawn") -> str:
    """Run module-level ``func`` over the task records ``todo`` on a local pool of
    ``num_workers`` processes or as Ray tasks at ``ray_address`` (:class:`base.workers.Workers`),
    with a bar; returns where it ran, for the summary. Each task writes its shard atomically,
    marker last, so a retried task (a worker or node lost) redoes a shard, never doubles one."""
    from tqdm import tqdm

    from base.workers import Workers

    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not progress or not todo,
               dynamic_ncols=True)
    with Workers(min(num_workers, max(1, len(todo))), ray_address=ray_address if todo else None,
                 start_method=start_method) as workers:
        ran_on = workers.where if todo else NOWHERE
        workers.map(func, todo, bar, weight=weight)
    bar.close()
    return ran_on


# --------------------------------------------------------------------------------------------
# The actor stages' driver (caption, reinforce)


def reconcile_shards(out: str | os.PathLike, shards: Mapping[int, str], failed: Mapping[int, str],
                     each: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Counts over every finished output shard of ``out`` (this run's and earlier ones'), from
    their stats (``num_input``, ``successes``, ``status_dict``; ``each`` sees every shard's
    stats for the stage's own counts), checked against the input, shard by shard: images in =
    successes + failed[status]. An input shard with nothing to count it by is logged."""
    from collections import Counter

    from base.shards import read_shard_stats, shard_name, shard_size

    statuses: Counter[str] = Counter()
    images_in = successes = 0
    problems, done = [], []
    uncounted: dict[str, str] = {}  # input shard → why its samples could not be counted
    for shard_id, tar in sorted(shards.items()):
        if not is_complete(out, shard_id):
            continue
        done.append(shard_id)
        stats = read_shard_stats(Path(out) / f"{shard_name(shard_id)}.parquet")  # every shard has its Parquet
        statuses.update(stats["status_dict"])
        images_in, successes = images_in + stats["num_input"], successes + stats["successes"]
        if each is not None:
            each(stats)
        try:
            in_tar = shard_size(tar)
        except ShardError as err:  # e.g. a tar-only input: no stats or Parquet to count it by
            uncounted[shard_name(shard_id)] = str(err)
            continue
        if in_tar != stats["num_input"]:
            problems.append(f"{shard_name(shard_id)}: input holds {in_tar} samples, output {stats['num_input']}")
    if uncounted:
        name, why = next(iter(uncounted.items()))
        log.warning("%d input shard(s) could not be counted, so their output is not checked against the "
                    "input's size (shard %s: %s)", len(uncounted), name, why)
    failures = {status: count for status, count in sorted(statuses.items()) if status != "success"}
    return {
        "out": str(out), "num_shards": len(shards), "num_shards_done": len(done),
        "failed_shards": {shard_name(k): v for k, v in sorted(failed.items())},
        "images_in": images_in, "successes": successes, "images_failed": failures,
        "reconciled": images_in == successes + sum(failures.values()) and not problems, "problems": problems,
    }


def shard_job_main(config_cls: type, run: Callable[[Any], dict[str, Any]], format_summary: Callable[[dict], str],
                   argv: list[str], prog: str) -> int:
    """An actor stage's command: parse its config, run it, print its summary; exit status 0
    when the counts reconcile and no shard failed, else 1 (re-run to retry)."""
    from base.config import parse_config

    summary = run(parse_config(config_cls, argv, prog=prog))
    print(format_summary(summary))
    return 0 if summary["reconciled"] and not summary["failed_shards"] else 1


def format_reconciled(summary: Mapping[str, Any], *, done: str, count: str, details: Sequence[str],
                      where: str = "") -> str:
    """The lines a :func:`reconcile_shards` summary prints: ``{done} N of M images in a/b shards
    -> OUT{where}``, the failed images, the stage's ``details``, whether the counts reconcile,
    and the shards that failed (re-run to retry). ``count`` names the summary's successes."""
    failed = ", ".join(f"{k} {v}" for k, v in summary["images_failed"].items()) or "none"
    lines = [
        f"{done} {summary[count]} of {summary['images_in']} images in {summary['num_shards_done']}/"
        f"{summary['num_shards']} shards -> {summary['out']}{where}",
        f"  failed images: {failed}",
        *details,
        f"  counts reconcile: {'yes' if summary['reconciled'] else 'NO ' + '; '.join(summary['problems'])}",
    ]
    if summary["failed_shards"]:
        lines.append(f"  shards not {done} (re-run to retry): {summary['failed_shards']}")
    return "\n".join(lines)


def actor_device(cfg: Any) -> tuple[str, str | None]:
    """In the Ray session: the device an actor stage's ``--device`` means on the cluster joined
    (:meth:`base.raykit.ActorJobConfig.resolve_device`) and its autocast (``--precision``: bf16
    by default on GPU; CPU runs fp32)."""
    device = cfg.resolve_device()
    autocast = None
    if device == "cuda":
        autocast = {"auto": "bf16", "fp32": None}.get(cfg.precision, cfg.precision)
    elif cfg.precision in ("bf16", "fp16"):
        log.warning("--precision %s applies on GPU; running fp32 on CPU", cfg.precision)
    return device, autocast


def actor_autocast(context: Any):
    """In an actor, before it loads its models: the torch threads of a CPU actor, and the
    autocast dtype of ``context.autocast`` (None: fp32)."""
    import torch

    if context.device == "cpu":
        torch.set_num_threads(context.threads)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(context.autocast or "")


def run_shard_job(
    cfg: Any,
    *,
    stage: str,
    resolve: Callable[[Any], dict[str, Any]],
    identity: Callable[[Any, dict[str, Any]], dict[str, Any]],
    recorded: Callable[[dict[str, Any]], Any],
    work: Callable[[Any, list[tuple[int, str]], dict[str, Any]], dict[int, str]],
    summarize: Callable[[Path, dict[int, str], dict[int, str]], dict[str, Any]],
    own_files: Sequence[str],
    finalize: bool = True,
) -> dict[str, Any]:
    """Output shard ``i`` for input shard ``i`` of ``cfg.shards`` in ``cfg.out``, resumably.

    The input's shards by id; an ``--out`` that is the input's folder is refused; ``resolve``
    loads what the work needs (models: one line if one cannot load, before any work);
    with ``identity(cfg, resolved)`` :func:`claim_output` checks ``recorded(config record)``; ``work(cfg,
    pending, resolved)`` makes the pending shards (and writes ``config.json``) and returns the
    shards that failed (id → why); the folder is finalized (``sizes.json``), and
    ``summarize(out, shards, failed)`` is written as ``summary.json`` and returned."""
    shards = shards_by_id(cfg.shards)
    out = Path(cfg.out)
    if any(Path(path).parent.resolve() == out.resolve() for path in shards.values()):
        raise UsageError(f"--out {out} is the input folder: output shard i would replace input shard i; choose another --out")
    resolved = resolve(cfg)
    claim_output(out, stage=stage, identity=identity(cfg, resolved), overwrite=cfg.overwrite, own_files=own_files,
                 recorded=recorded, only_with_shards=True)
    make_folder(out)
    pending = pending_shards(out, shards)
    failed: dict[int, str] = {}
    if pending:
        failed = work(cfg, pending, resolved)
    else:
        log.info("all %d shards of %s are done already", len(shards), out)
    if finalize and any(is_complete(out, shard_id) for shard_id in shards):
        finalize_folder(out)
    summary = summarize(out, shards, failed)
    write_run_records(out, summary=summary)
    return summary
