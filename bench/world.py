"""World generation speed: ``qcap world`` on all cores against the same generator in one process.

Each run is its own process (``python -m curate world ...``), so timings and peak memory are
clean; runs alternate multi / single for ``--repeats`` pairs. The table gives wall seconds,
images/s, CPU seconds (all processes: equal CPU with a worse wall time means the cores were
busy with something else), peak resident memory (the parent, and the largest worker) and the
speed-up ratio (median over pairs). The two outputs must be byte-identical (pool.parquet, truth.parquet,
world.json, every image): the bench checks it, so the speed is the same work's.

Memory flat in N: one more multi-process run at a quarter of the pool size; its peak memory
is printed beside the full run's (they should be about equal).

Run::

    python bench/world.py                          # 20,000 pool + 2,000 clean + 4 × 500 eval
    python bench/world.py --num-samples 4000 --repeats 1     # quick look

The reference is the same code with ``--workers 1`` (no multiprocessing); there is no other
generator of this world to compare with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import json, resource, sys, time
from world.cli import world_main
t = time.perf_counter()
code = world_main(sys.argv[1:])
wall = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
print("BENCH " + json.dumps({"wall": wall, "cpu": cpu, "self_mb": me.ru_maxrss / 1024, "child_mb": kids.ru_maxrss / 1024,
                             "code": code}))
"""


def run(out: Path, args: argparse.Namespace, workers: int, num_samples: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    argv = [
        "--out", str(out), "--num-samples", str(num_samples), "--clean-samples", str(args.clean_samples),
        "--eval-samples", str(args.eval_samples), "--workers", str(workers), "--seed", "0",
    ]
    env = dict(os.environ, QCAP_LOG_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"world generation failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--clean-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the multi-process run")
    parser.add_argument("--repeats", type=int, default=1, help="multi/single pairs (median reported)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the worlds are written (default: a temp dir)")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="qcap-bench-world-"))
    root.mkdir(parents=True, exist_ok=True)
    total = args.num_samples + args.clean_samples + 4 * args.eval_samples
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print(f"world: {args.num_samples} pool + {args.clean_samples} clean + 4 x {args.eval_samples} eval = {total} images")
    multi, single = [], []
    for _ in range(args.repeats):
        multi.append(run(root / "multi", args, args.workers, args.num_samples))
        single.append(run(root / "single", args, 1, args.num_samples))
    same = digest(root / "multi") == digest(root / "single")
    quarter = run(root / "quarter", args, args.workers, max(1, args.num_samples // 4))
    size_mb = sum(p.stat().st_size for p in (root / "multi").rglob("*") if p.is_file()) / 2**20

    def row(name: str, runs: list[dict], n: int = total) -> str:
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        return (f"  {name:<28} {wall:7.1f} s  {n / wall:7.0f} img/s  cpu {cpu:6.1f} s"
                f"   parent {max(r['self_mb'] for r in runs):5.0f} MB"
                f"   worker {max(r['child_mb'] for r in runs):5.0f} MB")

    print(row(f"qcap world, {args.workers} workers", multi))
    print(row("reference: 1 process", single))
    quarter_total = args.num_samples // 4 + args.clean_samples + 4 * args.eval_samples
    print(row(f"{args.workers} workers, pool / 4", [quarter], quarter_total))
    ratio = statistics.median(s["wall"] for s in single) / statistics.median(m["wall"] for m in multi)
    print(f"  speed-up over one process: {ratio:.2f}x   outputs byte-identical: {same}   world size: {size_mb:.0f} MB")
    if not same:
        raise SystemExit("the multi-process and single-process worlds differ")
    if args.workdir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"  (bench took {time.perf_counter() - started:.0f} s)")
