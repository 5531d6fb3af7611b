"""Throughput of ``qcap filter clip-score`` against the bare model forward pass on the same batches.

    python bench/clip_score.py [--num-samples 400] [--model ViT-B-32] [--batch-size 32] [--work /tmp/qcap-bench-clip]

The filter reads the shards, decodes and preprocesses on Ray Data tasks and scores on one model
actor holding ``--cpus-per-worker`` CPUs (torch threads); the reference runs the same model with
the same number of torch threads on the same batches, already decoded and preprocessed, in this
process — the best the filter could do if reading and decoding cost nothing. The target: steady
filter throughput (from the moment the actor's model is loaded to the last score: Ray, worker and
model start-up excluded and reported separately) at least 0.8 of the reference's, i.e. the I/O
and decoding hide behind the model.

The data: an embedded world's pool (web-sized JPEGs, 240–1000 px) written as raw shards; the
model: a randomly initialised open_clip model saved as a checkpoint folder (weights do not change
the cost). Results go to stdout; BENCHMARKS.md records them with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_raw(world: Path, raw: Path, shard_size: int = 100) -> int:
    """The world's fault-free pool samples as raw shards (what a download of them gives)."""
    import pyarrow.parquet as pq

    from base.shards import Sample, ShardWriter, finalize_folder

    if (raw / "sizes.json").exists():
        return sum(json.loads((raw / "sizes.json").read_text()).values())
    truth = {r["uid"]: r for r in pq.read_table(world / "truth.parquet", columns=["uid", "fault", "path"]).to_pylist()}
    rows = [r for r in pq.read_table(world / "pool.parquet").to_pylist() if truth[r["uid"]]["fault"] == "none"]
    for shard, start in enumerate(range(0, len(rows), shard_size)):
        with ShardWriter(raw, shard) as writer:
            for i, row in enumerate(rows[start:start + shard_size], start=start):
                path = world / truth[row["uid"]]["path"]
                writer.write(Sample(key=f"{i:09d}", uid=row["uid"], image=path.read_bytes(), image_ext=path.suffix[1:],
                                    text=row["text"], meta=dict(row)))
    finalize_folder(raw)
    return len(rows)


def bare_forward(raw: Path, checkpoint: Path, batch_size: int, threads: int) -> dict:
    """Images/s of the model alone on the filter's batches (decoded and preprocessed beforehand)."""
    import torch

    from base.models import load_model
    from base.shards import decode_image, iter_samples
    from curate.filters.clip_score import score_batch

    torch.set_num_threads(threads)
    loaded = load_model(checkpoint=checkpoint)
    pixels, tokens = [], []
    for sample in iter_samples(str(raw)):
        pixels.append(loaded.preprocess_val(decode_image(sample.image)).numpy())
        tokens.append(loaded.tokenizer([sample.text or ""])[0].numpy())
    import numpy as np

    batches = [(np.stack(pixels[i:i + batch_size]), np.stack(tokens[i:i + batch_size]))
               for i in range(0, len(pixels), batch_size)]
    score_batch(loaded.model, *batches[0])  # warm-up
    started = time.perf_counter()
    for p, t in batches:
        score_batch(loaded.model, p, t)
    seconds = time.perf_counter() - started
    return {"images": len(pixels), "seconds": round(seconds, 3), "images_per_s": round(len(pixels) / seconds, 2)}


def filter_run(raw: Path, checkpoint: Path, out: Path, batch_size: int, cpus: int, threads: int) -> dict:
    from base.cli import run_guarded
    from curate.filters.cli import main as filter_main

    started = time.perf_counter()
    code = run_guarded(filter_main, ["clip-score", "--shards", str(raw), "--checkpoint", str(checkpoint), "--top-fraction", "0.3",
                 "--out", str(out), "--batch-size", str(batch_size), "--num-workers", "1", "--num-cpus", str(cpus),
                 "--cpus-per-worker", str(threads), "--rescore", "--no-progress", "--no-histograms"], "qcap filter")
    if code != 0:
        raise SystemExit(f"qcap filter clip-score failed with exit status {code}")
    wall = time.perf_counter() - started
    report = json.loads(out.with_name(out.stem + ".report").joinpath("report.json").read_text())
    scoring = report["settings"]["scoring"]
    return {**scoring, "command_seconds": round(wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=400, help="pool size of the world")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (random init)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model (the actor's CPUs)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray instance")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qcap-bench-clip"))
    args = parser.parse_args()

    import torch

    from base.models import load_model, save_checkpoint_dir
    from world.config import WorldConfig
    from world.generate import generate_world

    world = args.work / f"world-{args.num_samples}"
    generate_world(WorldConfig(out=world, num_samples=args.num_samples, clean_samples=0, eval_samples=0, workers=1),
                   progress=False)
    raw = args.work / f"raw-{args.num_samples}"
    num = make_raw(world, raw)
    checkpoint = args.work / f"{args.model}-random"
    if not checkpoint.exists():
        torch.manual_seed(0)
        save_checkpoint_dir(load_model(args.model).model, args.model, checkpoint)

    # the reference runs before and after the filter: on a shared machine the load drifts, and the
    # mean of the two brackets the filter's conditions better than either alone
    before = bare_forward(raw, checkpoint, args.batch_size, args.threads)
    print(f"reference before (bare forward, {args.threads} thread(s)): {before}", flush=True)
    run = filter_run(raw, checkpoint, args.work / "clip.npy", args.batch_size, args.cpus, args.threads)
    print(f"filter: {run}", flush=True)
    after = bare_forward(raw, checkpoint, args.batch_size, args.threads)
    print(f"reference after: {after}", flush=True)
    reference = {"before": before, "after": after,
                 "images_per_s": round((before["images_per_s"] + after["images_per_s"]) / 2, 2)}
    steady = run["steady_images_per_s"] / reference["images_per_s"] if run["steady_images_per_s"] else float("nan")
    overall = (run["images"] / run["seconds"]) / reference["images_per_s"]
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
        "load_average": os.getloadavg(), "model": args.model, "images": num, "batch_size": args.batch_size,
        "threads": args.threads, "ray_cpus": args.cpus, "reference_bare_forward": reference, "filter": run,
        "ratio_steady": round(steady, 3), "ratio_with_startup": round(overall, 3),
    }, indent=2))
    verdict = "meets" if steady >= 0.8 else "MISSES"
    print(f"clip-score filter: {run['steady_images_per_s']} img/s steady vs bare forward {reference['images_per_s']} img/s "
          f"-> {steady:.2f}x ({verdict} the 0.8 target); with Ray/actor start-up ({run['startup_seconds']} s): {overall:.2f}x")


if __name__ == "__main__":
    main()
