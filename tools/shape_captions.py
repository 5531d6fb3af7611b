"""A calibration control: the same shards with captions that name only the shapes in each image.

Every caption becomes the classes and counts of the image's objects from the world's truth ("two stars and a
circle"), nothing else: no colour, size, texture, position or background. A CLIP trained on it can tell images
apart only by their shapes, which are the segmentation classes, so it measures whether the contrastive objective
learns shapes at all at a given compute when the captions leave it no shortcut (README, calibration log).

    .venv/bin/python tools/shape_captions.py --shards W/clean --world W --out W/clean-shapes
    .venv/bin/qcap train --preset tiny --data W/clean-shapes --out runs/shape-clip --caption-source real \\
        --samples-seen 19200 --eval-data W/eval --retrieval-data W/eval/retrieval

Samples whose uid the truth does not know are left out and counted; the counts printed at the end reconcile.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from base.cli import UsageError  # noqa: E402
from base.shards import ShardWriter, expand_shards, finalize_folder, iter_samples  # noqa: E402
from curate.subset import strip_synthetic  # noqa: E402
from world.describe import COUNT_TEXT, PLURALS  # noqa: E402
from world.oracle import load_truth  # noqa: E402


def shape_caption(objects: list[dict]) -> str:
    """'a square and two stars': each class present, with its count, in alphabetical order."""
    counts = Counter(o["cls"] for o in objects)
    return " and ".join(f"{COUNT_TEXT[n]} {cls if n == 1 else PLURALS[cls]}" for cls, n in sorted(counts.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="a shard folder of the world (e.g. W/clean or a ladder rung)")
    parser.add_argument("--world", required=True, type=Path, help="the world folder (its truth.parquet)")
    parser.add_argument("--out", required=True, type=Path, help="new shard folder (must not exist)")
    args = parser.parse_args()
    if args.out.exists():
        print(f"--out {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    try:
        truth = load_truth(args.world)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    counts = Counter()
    for shard, tar in enumerate(expand_shards(args.shards)):
        with ShardWriter(args.out, shard) as writer:
            for sample in iter_samples(tar):
                counts["read"] += 1
                if not sample.ok or sample.uid not in truth:
                    counts["left out"] += 1
                    continue
                # as qcap control-rung's oracle rung writes its captions: one real caption, nothing synthetic
                strip_synthetic(sample)
                meta = {k: v for k, v in sample.meta.items() if k not in ("captions", "caption")}
                writer.write(dataclasses.replace(sample, text=shape_caption(truth[sample.uid]["objects"]),
                                                 meta={**meta, "caption_source": "shapes"}))
                counts["written"] += 1
    finalize_folder(args.out)
    print(f"{args.out}: read {counts['read']} = written {counts['written']} + left out {counts['left out']}")
    return 0 if counts["read"] == counts["written"] + counts["left out"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
