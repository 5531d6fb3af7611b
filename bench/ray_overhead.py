"""Ray's overhead per shard-parallel stage: the same command on the same cores, in one run, on

- ``local``: the local process pool (``--num-workers C``), the reference;
- ``joined``: Ray tasks on a one-node cluster of ``C`` CPUs that is already up (``ray start --head
  --num-cpus C``, started once by the bench and stopped at the end, joined with ``--ray-address``):
  what a user with a cluster pays per command;
- ``new``: a new local Ray per command (``--ray-address local --num-workers C``: the command starts
  Ray, runs, and stops it), what a user without a cluster would pay;
- with ``--reference TREE`` (a qcap source tree, e.g. ``git archive`` of an older commit), also
  ``joined-ref``: the joined case with that tree's code, for a before/after in the same run.

Each stage runs ``--repeats`` times per backend, alternating, each run into a fresh output folder
and as its own process (start-up, Ray's import and connection included: what a user pays).
Printed per stage: median wall seconds of each and each one's ratio to ``local`` (the goal: at
most 1.2). The outputs of every backend are checked equal to the local pool's, byte for byte.

Inputs (made once, in a temporary folder): curated image shards and caption shards for build-dr,
and a raw pool of the embedded world (with its planted faults and duplicates) for the filters.

Run::

    python bench/ray_overhead.py                       # 2 CPUs, 3 repeats, the default sizes
    python bench/ray_overhead.py --scale 0.25 --repeats 1   # a quick look
    python bench/ray_overhead.py --backends local joined   # leave out the new-Ray-per-command case
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# bench/ (this script's folder, first on the path) holds world.py, which would shadow the world package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' data makers: the same inputs the scale-out tests use
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_DISABLE_USAGE_STATS="1", OMP_NUM_THREADS="1",
           NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1")
# run records: wall times, where it ran, output paths (the data files are compared byte for byte)
RUN_RECORDS = {"build_dr.json", "build_dr_summary.json", "report.json", "config.json", "subset.json",
               "subset_summary.json", "reshard.json", "world.json", "summary.json", "README.md", "preview.html",
               "card.json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_head(cpus: int, temp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(temp / "head.log", "w")  # noqa: SIM115 - lives as long as the head
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", str(cpus), "--include-dashboard", "false",
                             "--temp-dir", str(temp / "ray"), "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in (temp / "head.log").read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ray start failed: {(temp / 'head.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return head, f"127.0.0.1:{port}"


def stop_head(head: subprocess.Popen) -> None:
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in RUN_RECORDS}


def make_inputs(root: Path, scale: float) -> dict[str, Path]:
    from dr_data import write_images, write_qcap_captions
    from test_filter_support import raw_shards_from_world, world_config

    from world.generate import generate_world

    shards, per_shard = max(4, int(80 * scale)), 125
    layout = [list(range(s * per_shard, (s + 1) * per_shard)) for s in range(shards)]
    numbers = [n for n in range(shards * per_shard) if n % 7]
    captions = [numbers[i::max(1, shards // 2)] for i in range(max(1, shards // 2))]
    world = root / "world"
    generate_world(world_config(world, num_samples=max(400, int(4000 * scale)), plant_each=4,
                                clean_samples=max(200, int(2000 * scale)), chunk_size=100), progress=False)
    raw = raw_shards_from_world(world, root / "raw", shard_size=100)
    from base.shards import read_tables, save_uids

    table = read_tables(str(raw)).to_pydict()
    save_uids(root / "keep.npy", [u for u, st in zip(table["uid"], table["status"], strict=True) if st == "success"])
    return {"images": write_images(root / "curated", layout), "syn": write_qcap_captions(root / "syn", captions),
            "raw": raw, "keep": root / "keep.npy", "world": world, "world_size": max(400, int(4000 * scale))}


def stages(inputs: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """stage -> (argv without --out and backend flags, the output flag's target name)."""
    return {
        "build-dr": (["build-dr", "--images", str(inputs["images"]), "--captions", str(inputs["syn"]), "--no-progress",
                      "--no-card"], "dr"),
        "filter basic": (["filter", "basic", "--shards", str(inputs["raw"]), "--no-progress", "--no-preview",
                          "--no-histograms"], "basic.npy"),
        "filter dedup": (["filter", "dedup", "--shards", str(inputs["raw"]), "--no-progress", "--no-preview",
                          "--no-histograms"], "dedup.npy"),
        "reshard": (["reshard", "--shards", str(inputs["raw"]), "--subset", str(inputs["keep"]), "--samples-per-shard",
                     "50", "--no-progress"], "curated"),
        "subset": (["subset", "--shards", str(inputs["images"]), "--fraction", "0.5", "--seed", "1", "--no-progress"],
                   "ladder"),
        "world": (["world", "--num-samples", str(inputs["world_size"]), "--clean-samples", "0", "--eval-samples", "0",
                   "--chunk-size", "100", "--no-preview"], "w"),
        "score-captions": (["score-captions", "--world", str(inputs["world"]), "--captions",
                            str(inputs["world"] / "clean"), "--field", "text"], "scores"),
    }


def run(argv: list[str], env: dict[str, str] = ENV) -> float:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "qcap"), *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"qcap {' '.join(argv)} failed: {done.stderr[-2000:]}")
    return seconds


BACKENDS = ("local", "joined", "new", "joined-ref")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--stages", nargs="*", default=None, help="only these stages (default: all)")
    parser.add_argument("--backends", nargs="*", default=["local", "joined", "new"], choices=BACKENDS,
                        help="local is always run (the reference)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a qcap source tree: adds joined-ref, the joined case run with that tree's code")
    args = parser.parse_args()
    backends = ["local", *(b for b in args.backends if b != "local")]
    if args.reference is not None and "joined-ref" not in backends:
        backends.append("joined-ref")
    if "joined-ref" in backends and args.reference is None:
        raise SystemExit("joined-ref needs --reference TREE")
    ref_env = None if args.reference is None else dict(ENV, PYTHONPATH=str(args.reference.resolve()))
    temp = Path(tempfile.mkdtemp(prefix="qro", dir="/tmp"))
    try:
        print(f"making inputs (scale {args.scale}) in {temp} ...", flush=True)
        inputs = make_inputs(temp, args.scale)
        head, address = start_head(args.cpus, temp)
        rows = []
        try:
            for name, (argv, target) in stages(inputs).items():
                if args.stages and name not in args.stages:
                    continue
                workers = ["--workers" if name == "world" else "--num-workers", str(args.cpus)]
                flags = {"local": (workers, ENV), "joined": (["--ray-address", address], ENV),
                         "new": (["--ray-address", "local", *workers], ENV),
                         "joined-ref": (["--ray-address", address], ref_env)}
                times: dict[str, list[float]] = {b: [] for b in backends}
                outputs: dict[str, Path] = {}
                for repeat in range(args.repeats):
                    for backend in backends:
                        folder = temp / "runs" / f"{name.replace(' ', '-')}-{backend}-{repeat}"
                        folder.mkdir(parents=True)
                        extra, env = flags[backend]
                        times[backend].append(run([*argv, "--out", str(folder / target), *extra], env))
                        outputs[backend] = folder
                reference = digest(outputs["local"])
                medians = {b: statistics.median(t) for b, t in times.items()}
                same = all(digest(outputs[b]) == reference for b in backends)
                rows.append((name, medians, same))
                print(f"  {name}: " + ", ".join(f"{b} {m:.2f} s" for b, m in medians.items())
                      + f"; same output: {same}", flush=True)
        finally:
            stop_head(head)
        load = os.getloadavg()[0]
        print(f"\nRay overhead on {args.cpus} CPUs (medians of {args.repeats}; load average now {load:.1f})")
        others = backends[1:]
        print(f"{'stage':<14} {'local':>8} " + " ".join(f"{b:>10} {b + '/local':>16}" for b in others) + "  same output")
        for name, medians, same in rows:
            local = medians["local"]
            print(f"{name:<14} {local:>7.2f}s " + " ".join(f"{medians[b]:>9.2f}s {medians[b] / local:>16.2f}"
                                                        for b in others) + f"  {'yes' if same else 'NO'}")
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
