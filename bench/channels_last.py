"""Channels-last image towers: one CLIP training step (forward, loss, backward, AdamW) with the image
tower's weights in NHWC (``qcap train --channels-last auto`` for a CNN tower) against the same step
in NCHW (open_clip's trainer; ``--channels-last off``), in one process.

The two models start from the same weights and take the same batches; their steps alternate, so
load from other jobs hits both alike. The loader is left out (``bench/train.py --nchw`` runs the
whole ``qcap train`` both ways): this is the model step the memory format changes.

Run::

    python bench/channels_last.py                              # qcap-tiny-resnet10t, batch 64, bf16 and fp32
    python bench/channels_last.py --model qcap-tiny-mci --steps 10
    python bench/channels_last.py --device cuda --model RN50 --batch-size 256 --image-size 224
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="qcap-tiny-resnet10t", help="open_clip CLIP model with a CNN image tower")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per memory format and precision")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16 (autocast), fp32")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from open_clip import ClipLoss

    from base.models import has_convolutional_tower, load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device)
    if not has_convolutional_tower(loaded.model):
        print(f"{args.model}: its image tower is not convolutional; --channels-last auto leaves it NCHW")
    size = args.image_size or loaded.model.visual.image_size[0]
    images = torch.randn(args.batch_size, 3, size, size, device=args.device)
    texts = loaded.tokenizer([f"a photo of object {i}" for i in range(args.batch_size)]).to(args.device)
    loss_fn = ClipLoss()
    print(f"{args.model}, batch {args.batch_size}, {size} px, {args.device}, {args.threads} thread(s), "
          f"{args.steps} timed steps each (median)")
    print("| precision | NCHW s/step (reference) | channels-last s/step | ratio |")
    print("|---|---|---|---|")
    for precision in args.precisions.split(","):
        runs = {}
        for fmt in ("nchw", "nhwc"):
            model = copy.deepcopy(loaded.model).train()
            if fmt == "nhwc":
                model.visual.to(memory_format=torch.channels_last)
            runs[fmt] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), [])

        def step(fmt: str, runs=runs, precision=precision) -> float:
            model, opt, _ = runs[fmt]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(images, texts)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for _ in range(3):  # warm-up: oneDNN/cuDNN pick their kernels
            for fmt in runs:
                step(fmt)
        for _ in range(args.steps):
            for fmt in runs:
                runs[fmt][2].append(step(fmt))
        nchw, nhwc = statistics.median(runs["nchw"][2]), statistics.median(runs["nhwc"][2])
        print(f"| {precision} | {nchw:.4f} | {nhwc:.4f} | {nchw / nhwc:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
