"""Download speed: ``qcap download`` against raw ``img2dataset.download``, same pool, same settings.

A world without faults (no stalls, no errors: the timing measures throughput, not time-outs)
is served over loopback by ``qcap serve`` in a process of its own. Each downloader then runs
as its own process, alternating, for ``--repeats`` pairs:

- reference: ``img2dataset.download(...)`` with DataComp's arguments (parquet input, ``text``
  as caption, ``uid`` saved, ``face_bboxes`` blurred, webdataset output, keep_ratio_largest,
  resize only if bigger, sha256 computed, EXIF extracted) and the processes, threads, image
  size, shard size, retries and timeout given here;
- qcap: ``qcap download`` with the same values (``--allow-private-addresses``: loopback).

Two figures, each the best of the repeats:

- end to end: pool rows over the whole command's wall time (start-up included, for both);
- in-shard: the median over shards of rows / shard duration, both tools recording each shard's
  duration in ``_stats.json`` — the steady-state speed of fetch + resize + write, without
  start-up and process-pool overheads. This is where qcap's guard, status mapping and writer
  would show a cost.

The ratio qcap / img2dataset must stay at or above 0.9 on both. Both must download the same
number of images.

Run::

    python bench/download.py                              # 3,000 samples, 2 processes x 32 threads
    python bench/download.py --num-samples 1000 --repeats 1          # quick look
    python bench/download.py --distributor ray            # both on a local Ray
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

_REFERENCE = """
import sys, json
import img2dataset
args = json.loads(sys.argv[1])
img2dataset.download(
    url_list=args["pool"], input_format="parquet", url_col="url", caption_col="text",
    save_additional_columns=["uid"], bbox_col="face_bboxes", output_format="webdataset",
    output_folder=args["out"], processes_count=args["processes"], thread_count=args["threads"],
    image_size=args["image_size"], resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
    number_sample_per_shard=args["samples_per_shard"], retries=args["retries"], timeout=args["timeout"],
    oom_shard_count=5, distributor=args["distributor"], enable_wandb=False,
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_world(folder: Path, num_samples: int) -> Path:
    """A fault-free world (every fault rate 0, nothing planted); reused when it exists."""
    from world.config import FAULTS

    argv = [str(BIN / "qcap"), "world", "--out", str(folder), "--num-samples", str(num_samples),
            "--clean-samples", "0", "--eval-samples", "0", "--plant-each", "0"]
    for fault in FAULTS:
        argv += [f"--rate-{fault.replace('_', '-')}", "0"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return folder


def localize(world: Path, port: int, out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = json.loads((world / "world.json").read_text())["base_url"].rstrip("/")
    table = pq.read_table(world / "pool.parquet")
    urls = [u.replace(base, f"http://127.0.0.1:{port}", 1) for u in table.column("url").to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls, pa.string())), out)
    return out


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("qcap serve exited early")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"qcap serve did not listen on {port}")


def run_reference(pool: Path, out: Path, args: argparse.Namespace) -> dict:
    payload = json.dumps({
        "pool": str(pool), "out": str(out), "processes": args.processes, "threads": args.threads,
        "image_size": args.image_size, "samples_per_shard": args.samples_per_shard, "retries": args.retries,
        "timeout": args.timeout, "distributor": args.distributor,
    })
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _REFERENCE, payload], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed:\n{proc.stderr[-3000:]}")
    return {"wall": wall, **shard_figures(out)}


def shard_figures(out: Path) -> dict:
    """Successes, and the median per-shard speed (rows / duration), from the shards' _stats.json."""
    from base.shards import expand_shards, read_shard_stats

    stats = [read_shard_stats(tar) for tar in expand_shards(str(out))]
    speeds = sorted(s["count"] / s["duration"] for s in stats if s.get("duration"))
    return {"successes": sum(s["successes"] for s in stats), "shard_speed": speeds[len(speeds) // 2] if speeds else 0.0}


def run_qcap(pool: Path, out: Path, args: argparse.Namespace) -> dict:
    argv = [
        str(BIN / "qcap"), "download", "--pool", str(pool), "--out", str(out), "--distributor", args.distributor,
        "--processes", str(args.processes), "--threads", str(args.threads), "--image-size", str(args.image_size),
        "--samples-per-shard", str(args.samples_per_shard), "--retries", str(args.retries),
        "--timeout", str(args.timeout), "--allow-private-addresses", "--no-progress",
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, QCAP_LOG_LEVEL="WARNING"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"qcap download failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    figures = shard_figures(out)
    if figures["successes"] != manifest["num_success"]:
        raise SystemExit(f"qcap: stats say {figures['successes']} images, the manifest {manifest['num_success']}")
    return {"wall": wall, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=3000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10)
    parser.add_argument("--distributor", choices=["multiprocessing", "ray"], default="multiprocessing")
    parser.add_argument("--repeats", type=int, default=2, help="img2dataset/qcap pairs (best of each reported)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-download")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    world = make_world(args.workdir / f"world-{args.num_samples}", args.num_samples)
    port = free_port()
    server = subprocess.Popen([str(BIN / "qcap"), "serve", str(world), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.workdir))
    results: dict[str, list[dict]] = {"img2dataset": [], "qcap": []}
    load_before = os.getloadavg()
    try:
        wait_for_port(port, server)
        pool = localize(world, port, scratch / "pool.parquet")
        for repeat in range(args.repeats):
            for name, runner in (("img2dataset", run_reference), ("qcap", run_qcap)):
                out = scratch / f"{name}-{repeat}"
                result = runner(pool, out, args)
                results[name].append(result)
                print(f"  {name:11s} run {repeat + 1}: {result['wall']:6.1f} s  {args.num_samples / result['wall']:7.1f} samples/s "
                      f"end to end, {result['shard_speed']:7.1f} samples/s in-shard, {result['successes']} images", flush=True)
                shutil.rmtree(out)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()

    rate = {name: max(args.num_samples / r["wall"] for r in runs) for name, runs in results.items()}
    shard = {name: max(r["shard_speed"] for r in runs) for name, runs in results.items()}
    ratio, shard_ratio = rate["qcap"] / rate["img2dataset"], shard["qcap"] / shard["img2dataset"]
    same = {r["successes"] for runs in results.values() for r in runs} == {args.num_samples}
    print()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"pool: {args.num_samples} fault-free samples over loopback; {args.distributor}, {args.processes} processes x "
          f"{args.threads} threads, {args.image_size} px keep_ratio_largest, {args.samples_per_shard}/shard, "
          f"retries {args.retries}, timeout {args.timeout:g} s; best of {args.repeats}")
    print(f"{'':22s} {'end to end':>12s} {'in-shard':>12s}   (samples/s)")
    print(f"{'img2dataset.download':22s} {rate['img2dataset']:12.1f} {shard['img2dataset']:12.1f}")
    print(f"{'qcap download':22s} {rate['qcap']:12.1f} {shard['qcap']:12.1f}")
    print(f"{'ratio qcap/img2dataset':22s} {ratio:12.3f} {shard_ratio:12.3f}   (each must be >= 0.90)   "
          f"images: {'all downloaded by both' if same else 'MISSING'}")
    if min(ratio, shard_ratio) < 0.9 or not same:
        raise SystemExit(1)

if __name__ == "__main__":
    main()
