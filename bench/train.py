"""Training speed: ``qcap train`` against open_clip's own trainer, and the loader alone.

Both trainers run as their own processes, one after the other (alternating, ``--repeats``
pairs), on the same shards, model, global batch size, loader workers and torch threads:

- qcap: ``qcap train --preset tiny ...`` (Accelerate, qcap's shard stream);
- reference: ``python -m open_clip_train.main`` from the installed open_clip_torch[training]
  (webdataset pipeline), started through a two-line wrapper that registers qcap's tiny model
  configs with open_clip and sets the thread count — nothing else of qcap runs in it.

Throughput is steady-state samples/s: each trainer's own progress windows (qcap's
``metrics.jsonl`` ``samples_per_s``; open_clip's ``Batch (t)`` window average, which like
qcap's includes waiting for data), the first two windows dropped (start-up), the median of the
rest. Each run's CPU time (user + system, its loader workers included, start-up included) per
1000 samples is printed too: on a machine shared with other jobs it is steadier than
samples/s. The loader alone is qcap's ``ShardStream`` iterated without a model, with the same
workers: the samples/s it delivers versus what training consumes (must stay above 1x).

Run::

    python bench/train.py                       # CPU: qcap-tiny-clip, batch 64, 1 worker, 1 thread
    python bench/train.py --repeats 1 --samples 768         # quick look
    python bench/train.py --precision bf16      # both in bf16 autocast (qcap's default on bf16 CPUs)
    python bench/train.py --gpu                 # ViT-B-16, bf16, batch 256, 8 workers (one GPU)
    python bench/train.py --model qcap-tiny-resnet10t --precision bf16 --nchw
                                                # a CNN tower: qcap's channels-last default, and NCHW beside it

GPU mode trains ViT-B-16 at 224 px in bf16 autocast (qcap ``--precision bf16``, open_clip
``--precision amp_bf16``) on 320x240 JPEG shards and reports samples/s for both trainers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

# open_clip's trainer with qcap's tiny configs registered and the thread count fixed; the
# rest of argv goes to open_clip_train.main unchanged.
REFERENCE_WRAPPER = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
    "from base.models import register_model_configs; register_model_configs(); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
_OPEN_CLIP_WINDOW = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): ([0-9.]+)")


def make_shards(folder: Path, *, num_shards: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> str:
    """Shards of web-like JPEGs (gradients plus noise, quality 90) with a caption each."""
    import numpy as np
    from PIL import Image

    from base.shards import Sample, ShardWriter, finalize_folder

    rng = np.random.default_rng(seed)
    width, height = size
    index = 0
    for shard in range(num_shards):
        with ShardWriter(folder, shard) as writer:
            for k in range(per_shard):
                base = rng.integers(0, 255, 3)
                ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(-120, 120, 3)
                pixels = np.clip(base + ramp + rng.normal(0, 25, (height, width, 3)), 0, 255).astype("uint8")
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                uid = f"{index:032x}"
                writer.write(Sample(key=f"{shard:05d}{k:04d}", uid=uid, image=buffer.getvalue(),
                                    text=f"a photo of object {index % 97} in colour {index % 13}",
                                    syn_text=[f"synthetic caption {index} {j}" for j in range(5)]))
                index += 1
    finalize_folder(folder)
    return f"{folder}/{{00000..{num_shards - 1:05d}}}.tar"


def steady(values: list[float]) -> float:
    kept = values[2:] if len(values) > 3 else values[1:] or values
    return statistics.median(kept)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_qcap(args, data: str, out: Path, channels_last: str | None = None) -> float:
    cmd = [str(BIN / "qcap"), "train", "--preset", "tiny", "--model", args.model, "--data", data, "--out", str(out),
           "--batch-size", str(args.batch_size), "--samples-seen", str(args.samples), "--workers", str(args.workers),
           "--threads", str(args.threads), "--precision", args.precision, "--tracker", "none",
           "--log-every", str(args.log_every), "--checkpoint-every", str(10**9), "--lr", "1e-3", "--warmup", "10",
           "--channels-last", channels_last or args.channels_last]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"qcap train failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return steady([row["samples_per_s"] for row in rows if "samples_per_s" in row])


def run_open_clip(args, data: str, out: Path) -> float:
    precision = "amp_bf16" if args.precision == "bf16" else "fp32"
    cmd = [sys.executable, "-c", REFERENCE_WRAPPER, str(args.threads),
           "--train-data", data, "--train-num-samples", str(args.samples), "--dataset-type", "webdataset",
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--model", args.model,
           "--epochs", "1", "--lr", "1e-3", "--warmup", "10", "--wd", "0.1", "--precision", precision,
           "--log-every-n-steps", str(args.log_every), "--logs", str(out), "--name", "reference",
           "--save-frequency", "0", "--seed", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train.main failed:\n{proc.stderr[-3000:]}")
    windows = [(int(n), float(t)) for n, t in _OPEN_CLIP_WINDOW.findall(proc.stdout + proc.stderr)]
    if not windows:
        raise RuntimeError(f"no progress lines in open_clip's output:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return steady([args.batch_size / t for _, t in windows])


def run_loader(args, data: str) -> float:
    """Samples/s of qcap's stream alone (same workers, decode, augmentation and tokenization)."""
    import torch

    from base.models import load_model
    from train.captions import parse_caption_source
    from train.loader import ImageTextEncoder, LoaderConfig, ShardStream
    from train.run import input_side

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    encoder = ImageTextEncoder(loaded.preprocess_train, loaded.tokenizer, parse_caption_source("real"),
                               draft=2 * input_side(loaded.model))
    stream = ShardStream(LoaderConfig(data=data, batch_size=args.batch_size, workers=args.workers), encoder)
    batches = iter(stream)
    next(batches)  # worker start-up
    count = max(4, args.samples // args.batch_size)
    start = time.perf_counter()
    deque(islice(batches, count), maxlen=0)  # consume the batches, keep none
    return count * args.batch_size / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="ViT-B-16, bf16, batch 256, 8 workers, 224 px (one GPU)")
    parser.add_argument("--model", default=None, help="open_clip model (default: qcap-tiny-clip; ViT-B-16 with --gpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size (default 64; 256 with --gpu)")
    parser.add_argument("--samples", type=int, default=None, help="samples per training run (default 1536; 30720 --gpu)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default 1; 8 with --gpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="both trainers: fp32, or bf16 autocast (open_clip's amp_bf16); default fp32, bf16 --gpu")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="qcap train --channels-last (auto: NHWC weights for a CNN tower; open_clip's trainer: NCHW)")
    parser.add_argument("--nchw", action="store_true",
                        help="also run qcap with --channels-last off each repeat (the memory format's own gain)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating qcap/open_clip pairs")
    parser.add_argument("--keep", type=Path, default=None, help="keep shards and runs here (default: a temp folder)")
    args = parser.parse_args()
    args.model = args.model or ("ViT-B-16" if args.gpu else "qcap-tiny-clip")
    args.batch_size = args.batch_size or (256 if args.gpu else 64)
    args.samples = args.samples or (30720 if args.gpu else 1536)
    args.workers = args.workers if args.workers is not None else (8 if args.gpu else 1)
    args.precision = args.precision or ("bf16" if args.gpu else "fp32")
    args.log_every = 10 if args.gpu else 4
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = args.keep or Path(tempfile.mkdtemp(prefix="qcap-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        num_shards = max(8, args.workers * 2)
        per_shard = -(-args.samples // num_shards)
        size = (320, 240) if args.gpu else (256, 192)
        started = time.perf_counter()
        data = make_shards(work / "shards", num_shards=num_shards, per_shard=per_shard, size=size)
        print(f"shards: {num_shards} x {per_shard} JPEGs of {size[0]}x{size[1]} ({time.perf_counter() - started:.0f}s)")
        print(f"model {args.model}, batch {args.batch_size}, {args.samples} samples/run, workers {args.workers}, "
              f"threads {args.threads}, {args.precision}, machine: {os.cpu_count()} cores")
        qcap, reference, nchw = [], [], []
        cpu: dict[str, list[float]] = {"qcap": [], "open_clip": [], "qcap-nchw": []}
        runners = [("qcap", run_qcap, qcap), ("open_clip", run_open_clip, reference)]
        if args.nchw:
            runners.append(("qcap-nchw", lambda a, d, o: run_qcap(a, d, o, channels_last="off"), nchw))
        for repeat in range(args.repeats):
            for name, runner, results in runners:
                out = work / f"{name}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                before = _cpu_seconds()
                value = runner(args, data, out)
                cpu[name].append((_cpu_seconds() - before) / args.samples * 1000)
                results.append(value)
                print(f"  {name:9s} run {repeat + 1}: {value:8.1f} samples/s, {cpu[name][-1]:6.2f} CPU s/1000 samples")
        loader = run_loader(args, data)
        q, r = statistics.median(qcap), statistics.median(reference)
        print()
        cq, cr = statistics.median(cpu["qcap"]), statistics.median(cpu["open_clip"])
        print("| trainer | samples/s (median) | ratio | CPU s / 1000 samples (median) |")
        print("|---|---|---|---|")
        print(f"| open_clip_train.main (reference) | {r:.1f} | 1.00x | {cr:.2f} |")
        print(f"| qcap train (--channels-last {args.channels_last}) | {q:.1f} | {q / r:.2f}x | {cq:.2f} |")
        if nchw:
            n, cn = statistics.median(nchw), statistics.median(cpu["qcap-nchw"])
            print(f"| qcap train (--channels-last off) | {n:.1f} | {n / r:.2f}x | {cn:.2f} |")
        print(f"| qcap loader alone ({args.workers} worker(s)) | {loader:.1f} | {loader / q:.2f}x of qcap training | |")
        print(f"\nqcap / open_clip = {q / r:.2f}x samples/s (goal >= 1.0x); CPU per sample open_clip / qcap = "
              f"{cr / cq:.2f}x; loader / training = {loader / q:.2f}x (must be > 1)")
        if nchw:
            print(f"qcap --channels-last {args.channels_last} / off = {q / statistics.median(nchw):.2f}x samples/s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
