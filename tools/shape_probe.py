"""Can an image tower learn the world's 10 shapes at all? A supervised probe of the calibration (README).

Trains a randomly initialised image tower with a linear head on single-object images of the embedded world's
classification scenes (the 10 shapes, one object near the middle) and prints validation accuracy on 500 more
every 100 steps (batch 64, AdamW, bf16 autocast where the CPU has it, one torch thread; evaluated in eval mode).

    .venv/bin/python tools/shape_probe.py --tower vit                 # qcap-tiny-clip's ViT tower: 64 px, patch 8
    .venv/bin/python tools/shape_probe.py --tower vit --patch 4       # the same ViT with patch 4
    .venv/bin/python tools/shape_probe.py --tower vit-avg             # ... pooled by the mean of its patch tokens
    .venv/bin/python tools/shape_probe.py --tower mci                 # qcap-tiny-mci's MCi (FastViT) tower
    .venv/bin/python tools/shape_probe.py --tower timm:resnet10t      # any timm model, randomly initialised
    .venv/bin/python tools/shape_probe.py --tower vit --data fixed    # 4,000 training images drawn again and again

``--data fresh`` (the default) renders new images for every batch, so the probe measures how fast the tower
learns, not how fast it overfits a small set; ``--data fixed`` is the first version's 4,000-image set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from base.models import register_model_configs  # noqa: E402
from train.run import resolve_precision  # noqa: E402
from world.generate import _square_scene  # noqa: E402
from world.scenes import CLASSES, render  # noqa: E402

MEAN = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
STD = torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
FIXED_TRAIN = 4000


def images(split: str, indices, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-object scenes ``indices`` of ``split`` (class = index mod 10), normalised, with their labels."""
    xs, ys = [], []
    for i in indices:
        c = i % len(CLASSES)
        scene = _square_scene(7, split, i, size, num_objects=1, classes=(CLASSES[c],))
        xs.append(np.asarray(render(scene).image, dtype=np.float32) / 255.0)
        ys.append(c)
    x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2)
    return (x - MEAN) / STD, torch.tensor(ys)


def tower(name: str, size: int, patch: int) -> torch.nn.Module:
    import open_clip
    from open_clip.model import _build_vision_tower

    if name in ("vit", "vit-avg"):  # qcap-tiny-clip's own vision config, at --size and --patch
        model_cfg = open_clip.get_model_config("qcap-tiny-clip")
        vision_cfg = {**model_cfg["vision_cfg"], "image_size": size, "patch_size": patch}
        if name == "vit-avg":
            vision_cfg["pool_type"] = "avg"
        return _build_vision_tower(model_cfg["embed_dim"], vision_cfg)
    if name == "mci":
        return open_clip.create_model("qcap-tiny-mci").visual
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=0)
    raise SystemExit(f"--tower: unknown tower {name!r} (vit, vit-avg, mci or timm:NAME)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", default="vit", help="vit, vit-avg, mci or timm:NAME (default: vit)")
    parser.add_argument("--data", choices=("fresh", "fixed"), default="fresh", help="new images every batch, or 4,000 reused")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--patch", type=int, default=8, help="ViT patch size (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    register_model_configs()
    start = time.time()
    x_val, y_val = images("sup-val", range(500), args.size)
    if args.data == "fixed":
        x_fixed, y_fixed = images("sup-train", range(FIXED_TRAIN), args.size)
    torch.manual_seed(0)
    model = tower(args.tower, args.size, args.patch)
    with torch.no_grad():
        dim = model(x_val[:2]).shape[1]
    head = torch.nn.Linear(dim, len(CLASSES))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    bf16 = resolve_precision("auto") == "bf16"  # qcap train's rule: bf16 only where the hardware computes it natively
    next_index = 0
    for step in range(1, args.steps + 1):
        if args.data == "fixed":
            pick = torch.randint(0, FIXED_TRAIN, (64,))
            x, y = x_fixed[pick], y_fixed[pick]
        else:
            x, y = images("sup-train", range(next_index, next_index + 64), args.size)
            next_index += 64
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(head(model(x)).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                accuracy = (head(model(x_val)).argmax(1) == y_val).float().mean().item()
            model.train()
            print(f"{args.tower} ({args.data}) step {step}: loss {loss.item():.3f}, validation accuracy {accuracy:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
