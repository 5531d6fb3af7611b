"""build-dr's uid join against the hand join DataCompDR users write today, at two sizes.

Data: ``N`` image samples in shards of 1,000 and the same uids' caption shards (5 captions and
qcap provenance each) in shards of 1,000 *in another order* (not co-sorted), plus 2% one-sided
uids on each side. Both joins run as their own processes, one after the other, and write the same
DR shards:

- qcap: ``qcap build-dr`` (hash-partitioned index, ``--partition-rows`` = N / 8, one process);
- reference: the hand join — read every caption sample into a dict keyed by uid, then stream the
  image shards and write each matched sample with ``ShardWriter`` (what a user of Apple's
  DataCompDR shards does by hand).

Printed per size: wall seconds and peak resident memory (ru_maxrss of the process) for each,
and the ratios qcap / reference. The point is the memory column across sizes: the hand join's
grows with N (every caption in memory), build-dr's stays near its import baseline.

Run::

    python bench/build_dr.py                  # N = 10,000 and 40,000
    python bench/build_dr.py --sizes 2000     # quick look
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD = 1000

HAND_JOIN = r"""
import json, resource, sys, time
from base.shards import ShardWriter, expand_shards, finalize_folder, iter_samples
images, captions, out = sys.argv[1:4]
start = time.time()
by_uid = {}
for sample in iter_samples(captions, with_image=False):
    by_uid.setdefault(sample.uid, sample)
for shard_id, tar in enumerate(expand_shards(images)):
    with ShardWriter(out, shard_id) as writer:
        for sample in iter_samples([tar]):
            caption = by_uid.get(sample.uid)
            if caption is None:
                continue
            sample.syn_text, sample.syn_provenance = caption.syn_text, caption.syn_provenance
            writer.write(sample)
finalize_folder(out)
print(json.dumps({"seconds": time.time() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

QCAP_JOIN = r"""
import json, resource, sys, time
from captioning.dr import BuildDRConfig, build
images, captions, out, rows = sys.argv[1:5]
start = time.time()
summary = build(BuildDRConfig(images=images, captions=captions, out=out, partition_rows=int(rows),
                              progress=False, card=False))
assert summary["reconciled"], summary["checks"]
print(json.dumps({"seconds": time.time() - start, "kept": summary["images_kept"],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_data(root: Path, n: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_jpeg, make_uid

    from base.shards import Sample, ShardWriter, finalize_folder

    jpeg = make_jpeg(32, 24, seed=1)
    extra = max(1, n // 50)
    image_numbers = list(range(n + extra))  # the last `extra` have no caption
    caption_numbers = list(range(extra, n + 2 * extra))  # the first `extra` images have none either
    random.Random(0).shuffle(caption_numbers)
    images, captions = root / "images", root / "syn"
    for shard in range(0, len(image_numbers), SHARD):
        with ShardWriter(images, shard // SHARD) as writer:
            for i in image_numbers[shard:shard + SHARD]:
                writer.write(Sample(key=f"{i:09d}", uid=make_uid(i), image=jpeg, text=f"web caption {i}"))
    finalize_folder(images)
    for shard in range(0, len(caption_numbers), SHARD):
        with ShardWriter(captions, shard // SHARD) as writer:
            for i in caption_numbers[shard:shard + SHARD]:
                texts = [f"a synthetic caption number {j} of image {i} with some words" for j in range(5)]
                provenance = {"captioner": {"model": "bench"}, "seed": 0,
                              "captions": [{"raw": t, "num_tokens": 12, "flags": [], "score": 0.3} for t in texts]}
                writer.write(Sample(key=f"c{i:09d}", uid=make_uid(i), syn_text=texts, syn_provenance=provenance,
                                    meta={"num_syn": 5}))
    finalize_folder(captions)
    return images, captions


def run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    args = parser.parse_args()
    print(f"{'N':>8} | {'qcap s':>8} {'hand s':>8} {'ratio':>6} | {'qcap MB':>8} {'hand MB':>8} {'ratio':>6}")
    for n in args.sizes:
        root = Path(tempfile.mkdtemp(prefix="bench-dr-"))
        try:
            started = time.time()
            images, captions = make_data(root, n)
            made = time.time() - started
            hand = run(HAND_JOIN, str(images), str(captions), str(root / "hand"))
            qcap = run(QCAP_JOIN, str(images), str(captions), str(root / "qcap"), str(max(1, n // 8)))
            assert qcap["kept"] == n, qcap  # images extra..n+extra-1 have captions
            print(f"{n:>8} | {qcap['seconds']:>8.1f} {hand['seconds']:>8.1f} {qcap['seconds'] / hand['seconds']:>6.2f} | "
                  f"{qcap['peak_mb']:>8.0f} {hand['peak_mb']:>8.0f} {qcap['peak_mb'] / hand['peak_mb']:>6.2f}"
                  f"   (data made in {made:.0f} s)", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"children CPU: {usage.ru_utime + usage.ru_stime:.1f} s")


if __name__ == "__main__":
    main()
