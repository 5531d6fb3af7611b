"""Can an image tower learn the world's 10 shapes at all? A supervised probe of the calibration (README).

Trains a randomly initialised image tower with a linear head on 4,000 single-object images of the embedded
world's classification scenes (the 10 shapes, one object near the middle) and prints validation accuracy on 500
more every 100 steps (batch 64, AdamW lr 1e-3, bf16 autocast, 600 steps; the tower stays in training mode).

    .venv/bin/python tools/shape_probe.py 64 8    # qcap-tiny-clip's ViT tower: 64 px, patch 8
    .venv/bin/python tools/shape_probe.py 64 4    # the same ViT with patch 4
    .venv/bin/python tools/shape_probe.py 64 0    # qcap-tiny-mci's MCi (FastViT) tower
"""

import sys
import time

import numpy as np
import open_clip
import torch
from open_clip.model import _build_vision_tower

from base.models import register_model_configs
from world.generate import _square_scene
from world.scenes import CLASSES, render

register_model_configs()
size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
patch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
N = 4000


def data(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(n):
        c = i % len(CLASSES)
        scene = _square_scene(7, split, i, size, num_objects=1, classes=(CLASSES[c],))
        xs.append(np.asarray(render(scene).image, dtype=np.float32) / 255.0)
        ys.append(c)
    return torch.tensor(np.stack(xs)).permute(0, 3, 1, 2), torch.tensor(ys)


t = time.time()
xtr, ytr = data("sup-train", N)
xva, yva = data("sup-val", 500)
torch.manual_seed(0)
if patch == 0:
    model = open_clip.create_model("qcap-tiny-mci").visual
else:
    model = _build_vision_tower(128, dict(image_size=size, layers=4, width=128, head_width=32, patch_size=patch))
mean = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
std = torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
with torch.no_grad():
    dim = model((xva[:2] - mean) / std).shape[1]
head = torch.nn.Linear(dim, len(CLASSES))
opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.05)
for step in range(600):
    idx = torch.randint(0, N, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(head(model((xtr[idx] - mean) / std)).float(), ytr[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 99:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            acc = (head(model((xva - mean) / std)).argmax(1) == yva).float().mean().item()
        print(f"step {step + 1}: loss {loss.item():.3f}, validation accuracy {acc:.3f} ({time.time() - t:.0f} s)", flush=True)
