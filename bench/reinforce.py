"""Dataset reinforcement: what storing the teachers' work buys, and what ``qcap reinforce`` costs.

Two measurements, one run, ratios printed:

1. **DR training step, stored vs online teachers.** The same batch (``--batch-size`` images,
   one stored augmentation each, a real and a synthetic caption) trains the student
   (``--student``) with the DR loss (:class:`train.distill.DistillTask`): once reading the
   teacher embeddings from the batch (what DataCompDR makes possible), once running the same
   teachers (``--teacher-model`` x ``--num-teachers``, random weights: only the compute
   matters) on the batch's augmented images and captions first. MobileCLIP reports ~16x with
   an online captioner too, ~3x with only the captions precomputed: this is the teachers' part.
2. **Reinforcement throughput.** ``qcap reinforce`` (Ray, one actor per ``--workers``, batched
   teacher calls, ``--num-augmentations`` per image) against a plain loop that, per image and
   augmentation, runs torchvision's online pipeline and calls open_clip's ``encode_image``
   once per teacher (and ``encode_text`` per caption): images/s of each.

Run::

    python bench/reinforce.py                                   # ViT-B-32 teachers, tiny student
    python bench/reinforce.py --teacher-model qcap-tiny-clip    # quick look
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_images(folder: Path, num_shards: int, per_shard: int, side: int) -> Path:
    import numpy as np
    from PIL import Image

    from base.shards import Sample, ShardWriter, finalize_folder

    rng = np.random.default_rng(0)
    for shard in range(num_shards):
        with ShardWriter(folder, shard) as writer:
            for index in range(per_shard):
                number = shard * per_shard + index
                pixels = rng.integers(0, 255, (side * 3 // 4, side, 3), dtype=np.uint8)
                import io

                sink = io.BytesIO()
                Image.fromarray(pixels).save(sink, format="JPEG", quality=85)
                image = sink.getvalue()
                uid = hashlib.md5(f"bench-{number}".encode()).hexdigest()
                writer.write(Sample(key=f"{shard:05d}{index:04d}", uid=uid, image=image, text=f"a photo number {number}",
                                    syn_text=[f"a synthetic caption {j} of photo {number}" for j in range(5)]))
    finalize_folder(folder)
    return folder


def save_teachers(folder: Path, model: str, num: int) -> list[str]:
    import torch

    from base.models import load_model, save_checkpoint_dir

    paths = []
    for seed in range(num):
        torch.manual_seed(seed)
        paths.append(str(save_checkpoint_dir(load_model(model).model, model, folder / f"teacher{seed}")))
    return paths


def bench_step(args, reinforced: Path, teachers: list[str]) -> tuple[float, float]:
    """Seconds per DR training step: stored embeddings, then teachers run online on the batch."""
    import torch

    from base.models import load_model
    from captioning.teachers import TeacherEnsemble, parse_teachers
    from train.distill import DistillTask, DRSettings, reinforced_stream
    from train.evaluate import EvalConfig
    from train.loader import LoaderConfig

    settings = DRSettings(weights=(0.25, 0.75))
    loaded = load_model(args.student)
    cfg = LoaderConfig(data=str(reinforced), batch_size=args.batch_size, workers=0, shuffle_buffer=8, chunk_shards=1)
    stream, dims, scales = reinforced_stream(cfg, loaded, settings)
    batch = next(iter(stream))
    task = DistillTask(settings=settings, dims=dims, scales=scales, model=loaded.model, model_name=loaded.name,
                       tokenizer=loaded.tokenizer, preprocess_val=loaded.preprocess_val,
                       evaluation=EvalConfig(classification=None, retrieval=None))
    model = loaded.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ensemble = TeacherEnsemble(parse_teachers(",".join(teachers)))
    # the online teachers see what the stored ones saw: the augmented image at the stored size
    encoder = stream.encoder
    raw_images = batch["image"] * torch.tensor(encoder.std).view(3, 1, 1) + torch.tensor(encoder.mean).view(3, 1, 1)
    if raw_images.shape[-1] != args.size:
        import torchvision.transforms.functional as F

        raw_images = F.resize(raw_images, [args.size, args.size], antialias=True)
    real = [f"a photo number {i}" for i in range(args.batch_size)]
    syn = [f"a synthetic caption 0 of photo {i}" for i in range(args.batch_size)]

    def step(online: bool) -> None:
        b = dict(batch)
        if online:
            b["teacher_image"] = ensemble.encode_images(raw_images)
            b["teacher_text"] = ensemble.encode_texts(real)
            b["teacher_text_syn"] = ensemble.encode_texts(syn)
        loss, _ = task.loss(model, b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    timings = {}
    for online in (False, True):
        step(online)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            step(online)
        timings[online] = (time.perf_counter() - start) / args.steps
    return timings[False], timings[True]


def bench_throughput(args, images: Path, teachers: list[str], out: Path) -> tuple[float, float, float]:
    """Images/s of qcap reinforce (end to end, and its per-shard function alone) and of the plain loop."""
    import torch

    from base.augment import AugmentConfig, online_transform
    from base.shards import decode_image, iter_samples
    from captioning.reinforce import ReinforceConfig, run
    from captioning.teachers import TeacherEnsemble, parse_teachers

    num_images = args.shards * args.per_shard
    start = time.perf_counter()
    summary = run(ReinforceConfig(shards=str(images), out=out, teachers=",".join(teachers),
                                  num_augmentations=args.num_augmentations, size=args.size, num_workers=args.workers,
                                  cpus_per_worker=args.threads, batch_size=args.reinforce_batch, progress=False))
    qcap_rate = num_images / (time.perf_counter() - start)
    assert summary["reconciled"] and summary["images_reinforced"] == num_images, summary

    # the same per-shard function each actor runs, in this process: the steady rate without Ray's
    # start and the actors' teacher loads (which a short run cannot amortise)
    from captioning.reinforce import ReinforceContext, reinforce_one_shard, resolve_teachers

    cfg = ReinforceConfig(shards=str(images), out=out.with_name("steady"), teachers=",".join(teachers),
                          num_augmentations=args.num_augmentations, size=args.size, batch_size=args.reinforce_batch)
    parts = resolve_teachers(cfg)
    context = ReinforceContext(specs=parts["specs"], logit_scales=None, augment=cfg.augment_config(),
                               num_augmentations=args.num_augmentations, seed=0, embeddings="npz", device="cpu",
                               autocast=None, threads=args.threads, batch_size=args.reinforce_batch,
                               max_pixels=10**8, teachers_fingerprint=parts["fingerprint"])
    torch.set_num_threads(args.threads)
    ensemble = TeacherEnsemble(list(parts["specs"]))
    start = time.perf_counter()
    for shard in range(args.shards):
        reinforce_one_shard(ensemble, context, shard, str(images / f"{shard:05d}.tar"), str(cfg.out))
    steady_rate = num_images / (time.perf_counter() - start)

    torch.set_num_threads(args.threads)
    ensemble = TeacherEnsemble(parse_teachers(",".join(teachers)))
    transform = online_transform(AugmentConfig(size=args.size))
    start = time.perf_counter()
    with torch.inference_mode():
        for sample in iter_samples(str(images)):
            image = decode_image(sample.image)
            for _ in range(args.num_augmentations):
                pixels = transform(image)[None]
                for teacher in ensemble.teachers:
                    x = pixels
                    if x.shape[-1] != teacher.image_size:
                        import torchvision.transforms.functional as F

                        x = F.resize(x, [teacher.image_size, teacher.image_size], antialias=True)
                    teacher.model.encode_image(x, normalize=True)
            for teacher in ensemble.teachers:
                for text in [sample.text, *sample.syn_text]:
                    teacher.model.encode_text(teacher.tokenizer([text]), normalize=True)
    loop_rate = num_images / (time.perf_counter() - start)
    return qcap_rate, steady_rate, loop_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-model", default="ViT-B-32", help="open_clip architecture of each teacher (random weights)")
    parser.add_argument("--num-teachers", type=int, default=2)
    parser.add_argument("--student", default="qcap-tiny-clip")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch for the step benchmark")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224, help="stored augmentation side (Apple: 224)")
    parser.add_argument("--num-augmentations", type=int, default=4)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="qcap reinforce actors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per actor; the plain loop too)")
    parser.add_argument("--reinforce-batch", type=int, default=64)
    args = parser.parse_args()

    import os

    import ray
    import torch

    torch.set_num_threads(args.threads)
    for name in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "RAY_DISABLE_USAGE_STATS"):
        os.environ.setdefault(name, "1")
    work = Path(tempfile.mkdtemp(prefix="qcap-bench-reinforce-"))
    try:
        images = make_images(work / "images", args.shards, args.per_shard, side=320)
        teachers = save_teachers(work / "teachers", args.teacher_model, args.num_teachers)
        ray.init(num_cpus=max(2, args.workers * args.threads + 1), include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        qcap_rate, steady_rate, loop_rate = bench_throughput(args, images, teachers, work / "reinforced")
        ray.shutdown()
        stored, online = bench_step(args, work / "reinforced", teachers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"teachers: {args.num_teachers} x {args.teacher_model} (random weights), student {args.student}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}, GPU {'yes' if torch.cuda.is_available() else 'no'}")
    print(f"DR step, batch {args.batch_size}: stored embeddings {stored * 1000:.1f} ms, teachers online "
          f"{online * 1000:.1f} ms -> online / stored = {online / stored:.2f}x")
    print(f"reinforce, {args.shards * args.per_shard} images x {args.num_augmentations} augmentations at {args.size} px: "
          f"qcap reinforce {qcap_rate:.2f} images/s end to end ({args.workers} actor(s), Ray start and teacher loads "
          f"included), {steady_rate:.2f} images/s steady (the actors' shard function); plain encode_image loop "
          f"{loop_rate:.2f} images/s -> steady / loop = {steady_rate / loop_rate:.2f}x, "
          f"end to end / loop = {qcap_rate / loop_rate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
