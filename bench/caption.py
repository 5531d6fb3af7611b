"""Captioning speed: qcap's ``generate`` against open_clip 3.3's ``CoCa.generate``, side by side.

Both run in one process on the same model, images and settings, one after the other, and the
table gives captions/s for each and the ratio (median of ``--repeats`` runs):

  (a) greedy, 1 caption per image (tokens must be identical);
  (b) top-p 0.9, 5 captions per image (open_clip called 5 times, as Apple's generator does);
  (c) beam search, 6 beams in 3 groups (open_clip's defaults; tokens must be identical).

Run::

    python bench/caption.py                             # CPU: qcap-tiny-coca and coca_ViT-B-32
    python bench/caption.py --models qcap-tiny-coca --repeats 1 --num-images 8   # quick look
    python bench/caption.py --device cuda --precision bf16 --model coca_ViT-L-14 --batch-size 256

The reference. open_clip 3.3's ``generate`` imports transformers' ``BeamSearchScorer``,
which transformers 5 removed, so with the project's transformers it refuses to run. The
bench therefore re-executes itself with transformers 4.56.2 (the last release open_clip 3.3
imports it from) on ``PYTHONPATH``, installed once with pip into
``.venv/qcap-reference/transformers-4.56.2`` (``--reference-env``); there open_clip runs
unmodified, beam search included. qcap's ``generate`` does not use transformers at all, so
the library versions do not touch its side. Without that environment (no network),
``--reference-env none`` shims open_clip's import with transformers 5's processors
(:func:`patch_open_clip_generate`), enough for greedy and sampling; beam search is skipped.

Models are randomly initialised; open_clip never initialises the decoder's ``text_projection``
(``torch.empty``), so ``base.models.init_coca_decoder`` draws it from N(0, (s/sqrt(width))^2),
``s = --logit-scale`` (:func:`random_coca`). The default s = 6 gives next-token distributions
as peaked as a trained captioner's (top-p 0.9 nuclei of a few to a few tens of tokens; the
bench prints their size); with s = 1 every nucleus holds most of the 49,408-token vocabulary,
which no trained model does.

GPU mode (``--device cuda``) reports images/s for qcap (and open_clip on one batch, unless
``--no-reference``), and the fraction of the GPU's dense bf16 peak that the decoder reaches:
decoder FLOPs are counted from the model's dimensions for every row and step actually
decoded (matmuls of the text tower, the multimodal decoder and the vocabulary projection,
plus attention over the cached keys and the image tokens), divided by the decode time (the
batch's total minus its image encoding, timed apart).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REFERENCE_TRANSFORMERS = "4.56.2"
REFERENCE_PACKAGES = (f"transformers=={REFERENCE_TRANSFORMERS}", "huggingface_hub==0.36.0", "tokenizers==0.22.1")
REFERENCE_ENV = ROOT / ".venv" / "qcap-reference" / f"transformers-{REFERENCE_TRANSFORMERS}"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2, "B200": 2250.0}
_ENV_FLAG = "QCAP_BENCH_REFERENCE_ENV"


# --------------------------------------------------------------------------------------------
# The reference and the models (also used by tests/test_decode*.py)


def patch_open_clip_generate() -> str:
    """Make open_clip 3.3's ``CoCa.generate`` runnable; returns how.

    "native" when open_clip imported its generation helpers itself (transformers < 4.57 on
    the path); otherwise "shim": the module's names are bound to transformers 5's processors
    (the same classes open_clip asks for) and ``BeamSearchScorer``, which transformers 5 no
    longer has, to a stand-in that refuses, so greedy and sampling run and beam search fails
    loudly.
    """
    import open_clip.coca_model as coca_model

    if coca_model._has_transformers and not getattr(coca_model, "_qcap_shim", False):
        return "native"
    import transformers

    class BeamSearchScorerUnavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(
                f"transformers {transformers.__version__} has no BeamSearchScorer; run the beam reference "
                f"with transformers {REFERENCE_TRANSFORMERS} (see bench/caption.py)"
            )

    for name in ("LogitsProcessorList", "TopPLogitsWarper", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):
        setattr(coca_model, name, getattr(transformers, name))
    coca_model.BeamSearchScorer = BeamSearchScorerUnavailable
    coca_model.GENERATION_TYPES = {"top_k": transformers.TopKLogitsWarper, "top_p": transformers.TopPLogitsWarper,
                                   "beam_search": "beam_search"}
    coca_model._has_transformers = True
    coca_model._qcap_shim = True
    return "shim"


def random_coca(name: str, *, seed: int = 0, logit_scale: float = 6.0, device: str = "cpu"):
    """An open_clip CoCa with random weights (``base.models.load_model``), its decoder
    initialised by ``base.models.init_coca_decoder`` with the vocabulary projection drawn
    from N(0, (logit_scale / sqrt(width))^2)."""
    import torch

    from base.models import init_coca_decoder, load_model

    torch.manual_seed(seed)
    loaded = load_model(name, device=device)
    if logit_scale != 1.0:  # load_model drew the decoder at scale 1
        init_coca_decoder(loaded.model, logit_scale=logit_scale)
    return loaded


def ensure_reference_env(install: bool = True) -> Path | None:
    """The folder with transformers 4.56.2 for open_clip's reference; pip-installs it once."""
    marker = REFERENCE_ENV / "transformers" / "generation" / "beam_search.py"
    if marker.is_file():
        return REFERENCE_ENV
    if not install:
        return None
    REFERENCE_ENV.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(REFERENCE_ENV),
         *REFERENCE_PACKAGES],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 or not marker.is_file():
        print(f"could not install the reference environment ({proc.stderr.strip()[-300:]})", file=sys.stderr)
        return None
    return REFERENCE_ENV


def reference_python_env(env: Path) -> dict[str, str]:
    """Environment variables that put ``env`` (old transformers) ahead of the venv."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(env), str(ROOT), environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return environ


def reference_generate(model, images, *, decoding: str, seq_len: int, top_p: float = 0.9, top_k: int = 1,
                       temperature: float = 1.0, num_beams: int = 6, num_beam_groups: int = 3,
                       repetition_penalty: float = 1.0, min_seq_len: int = 5):
    """open_clip's ``CoCa.generate`` with qcap's decoding names (greedy = top-k 1)."""
    generation_type = {"greedy": "top_k", "top_k": "top_k", "top_p": "top_p", "beam": "beam_search"}[decoding]
    return model.generate(
        images, seq_len=seq_len, generation_type=generation_type, top_p=top_p,
        top_k=1 if decoding == "greedy" else top_k, temperature=temperature, num_beams=num_beams,
        num_beam_groups=num_beam_groups, repetition_penalty=repetition_penalty, min_seq_len=min_seq_len,
    )


# --------------------------------------------------------------------------------------------
# CPU comparison


CASES = {
    "a": {"label": "(a) greedy, 1 caption", "decoding": "greedy", "num_captions": 1},
    "b": {"label": "(b) top-p 0.9, 5 captions", "decoding": "top_p", "num_captions": 5},
    "c": {"label": "(c) beam, 6 beams / 3 groups", "decoding": "beam", "num_captions": 1},
}


def default_images(model: str, case: str) -> int:
    """Images per run: 16 for the tiny model; for larger ones 8 for greedy (a step over a few
    rows is bound by reading the weights, so greedy needs a batch to show the decoder) and 4
    for the 5-caption and beam cases (already 20 and 8 rows; open_clip takes minutes there)."""
    if model.startswith("qcap-tiny"):
        return 16
    return 8 if case == "a" else 4


def _time(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def nucleus_sizes(model, images, top_p: float, seq_len: int) -> float:
    """Mean top-p nucleus size over the first decoding steps of greedy continuations."""
    import torch

    from captioning import decode

    tokens = decode.generate(model, images, decoding="greedy", seq_len=seq_len)
    with torch.inference_mode():
        _, embs = model._encode_image(images)
        logits = model.text_decoder(embs, model._encode_text(tokens[:, :-1])[1]).float()
    params = decode.DecodeParams(decoding="top_p", top_p=top_p)
    sizes = []
    for pos in range(logits.shape[1]):
        _, _, keep = decode._candidates(logits[:, pos].clone(), params)
        sizes.append(keep.sum(-1).double().mean().item())
    return statistics.mean(sizes)


def run_cpu(args, reference_mode: str) -> list[dict]:
    import torch

    from captioning.decode import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        loaded = random_coca(name, logit_scale=args.logit_scale)
        model = loaded.model
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        torch.manual_seed(1)
        all_images = torch.randn(16, 3, size, size)
        nucleus = nucleus_sizes(model, all_images[:4], 0.9, args.seq_len)
        for case in args.cases:
            spec = CASES[case]
            num_images = args.num_images or default_images(name, case)
            images = all_images[:num_images] if num_images <= 16 else torch.randn(num_images, 3, size, size)
            if case == "c" and reference_mode != "native":
                rows.append({"model": name, "case": spec["label"], "skipped": "open_clip's beam search needs "
                             f"transformers {REFERENCE_TRANSFORMERS} (reference environment unavailable)"})
                continue
            num_captions = spec["num_captions"]
            ours_times, ref_times = [], []
            same = None
            ours_fn = functools.partial(generate, model, images, decoding=spec["decoding"],
                                        num_captions=num_captions, seq_len=args.seq_len, top_p=0.9)
            ref_fn = functools.partial(reference_generate, model, images, decoding=spec["decoding"],
                                       seq_len=args.seq_len, top_p=0.9)
            for repeat in range(args.repeats):
                t_ours, ours = _time(functools.partial(ours_fn, generator=torch.Generator().manual_seed(repeat)))
                torch.manual_seed(repeat)
                # Apple's generator calls open_clip once per caption
                t_ref, refs = _time(lambda ref_fn=ref_fn, num_captions=num_captions: [ref_fn() for _ in range(num_captions)])
                ours_times.append(t_ours)
                ref_times.append(t_ref)
                if spec["decoding"] in ("greedy", "beam"):
                    identical = torch.equal(ours, refs[0])
                    same = identical if same is None else (same and identical)
            num_out = num_images * num_captions
            ours_rate = num_out / statistics.median(ours_times)
            ref_rate = num_out / statistics.median(ref_times)
            rows.append({
                "model": name, "case": spec["label"], "images": num_images, "captions": num_out,
                "qcap_captions_per_s": round(ours_rate, 2), "open_clip_captions_per_s": round(ref_rate, 3),
                "speedup": round(ours_rate / ref_rate, 1), "identical_tokens": same,
                "qcap_s": [round(t, 3) for t in ours_times], "open_clip_s": [round(t, 3) for t in ref_times],
                "mean_top_p_nucleus": round(nucleus, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# GPU mode


def decoder_flops_per_token(model, pos: int, image_tokens: int) -> float:
    """FLOPs to decode one token at position ``pos`` (0-based) for one row, from the dims:
    2 per multiply-add of every matmul the step runs, attention over ``pos + 1`` cached keys
    and ``image_tokens`` image keys; the image keys/values themselves are computed once per
    image, outside the decode loop, and not counted."""
    text, decoder = model.text, model.text_decoder

    def block_matmul(block, cross: bool) -> float:
        d = block.attn.embed_dim
        in_proj = d * d if cross else 3 * d * d  # cross attention: image keys/values are cached
        return 2.0 * (in_proj + d * d + block.mlp.c_fc.weight.numel() + block.mlp.c_proj.weight.numel())

    flops = 0.0
    for block in text.transformer.resblocks:
        flops += block_matmul(block, False) + 4.0 * (pos + 1) * block.attn.embed_dim
    for block, cross in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        flops += block_matmul(block, False) + 4.0 * (pos + 1) * block.attn.embed_dim
        flops += block_matmul(cross, True) + 4.0 * image_tokens * cross.attn.embed_dim
    flops += 2.0 * decoder.text_projection.numel()
    return flops


def count_decoder_flops(model, tokens, eos: int, pad: int, image_tokens: int) -> float:
    """Sum of per-token FLOPs over every row and step actually decoded."""
    total = 0.0
    per_pos = [decoder_flops_per_token(model, pos, image_tokens) for pos in range(tokens.shape[1])]
    for row in tokens.tolist():
        length = len(row)
        for i in range(1, len(row)):
            if row[i] in (eos, pad):
                length = i + 1
                break
        total += sum(per_pos[: length - 1])
    return total


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def run_gpu(args) -> list[dict]:
    import torch

    from captioning.decode import generate
    from captioning.params import DecodeParams

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = args.model
    loaded = random_coca(name, logit_scale=args.logit_scale, device="cuda")
    model = loaded.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    torch.manual_seed(1)
    images = torch.randn(args.batch_size, 3, size, size, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        image_tokens = model._encode_image(images[:1])[1].shape[1]
    device_name = torch.cuda.get_device_name()
    peak = peak_tflops(device_name, args.peak_tflops)
    rows = []
    for case in args.cases:
        spec = CASES[case]
        num_captions = spec["num_captions"]

        def ours(spec=spec, num_captions=num_captions):
            out = generate(model, images, decoding=spec["decoding"], num_captions=num_captions, seq_len=args.seq_len,
                           top_p=0.9, generator=torch.Generator(device="cuda").manual_seed(0), autocast_dtype=dtype)
            torch.cuda.synchronize()
            return out

        def encode():
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model._encode_image(images)
            torch.cuda.synchronize()
            return out

        ours()  # warm-up (kernels, allocator)
        totals, encodes, flops = [], [], 0.0
        for _ in range(args.repeats):
            t_total, tokens = _time(ours)
            t_encode, _ = _time(encode)
            totals.append(t_total)
            encodes.append(t_encode)
            flops = count_decoder_flops(model, tokens.cpu(), 49407, model.pad_id, image_tokens)
            if spec["decoding"] == "beam":
                # each output row was decoded by one group of beams (a lower bound: beams may run
                # past the best hypothesis' end)
                flops *= DecodeParams(decoding="beam").group_size
        total, encode_s = statistics.median(totals), statistics.median(encodes)
        decode_s = max(total - encode_s, 1e-9)
        achieved = flops / decode_s / 1e12
        row = {
            "model": name, "case": spec["label"], "device": device_name, "precision": args.precision,
            "batch_size": args.batch_size, "qcap_images_per_s": round(args.batch_size / total, 1),
            "qcap_captions_per_s": round(args.batch_size * num_captions / total, 1),
            "decode_s": round(decode_s, 3), "encode_s": round(encode_s, 3),
            "decoder_tflops": round(achieved, 1),
            "fraction_of_bf16_peak": round(achieved / peak, 4) if peak else None, "bf16_peak_tflops": peak,
        }
        if not args.no_reference and case != "c":
            def reference(spec=spec, num_captions=num_captions):
                with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = [reference_generate(model, images, decoding=spec["decoding"], seq_len=args.seq_len)
                           for _ in range(num_captions)]
                torch.cuda.synchronize()
                return out

            t_ref, _ = _time(reference)
            row["open_clip_images_per_s"] = round(args.batch_size / t_ref, 2)
            row["speedup"] = round(t_ref / total, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qcap-tiny-coca", "coca_ViT-B-32"], help="CPU mode models")
    parser.add_argument("--model", default="coca_ViT-L-14", help="GPU mode model")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["a", "b", "c"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="GPU mode autocast")
    parser.add_argument("--batch-size", type=int, default=256, help="GPU mode images per batch")
    parser.add_argument("--num-images", type=int, default=0,
                        help="CPU mode images (0: 16 for the tiny model; 8 for greedy and 4 otherwise for others)")
    parser.add_argument("--seq-len", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (1 is steadiest on a shared machine; 0 = torch default)")
    parser.add_argument("--logit-scale", type=float, default=6.0, help="std of random logits (see the docstring)")
    parser.add_argument("--reference-env", default="auto",
                        help="auto (install transformers 4.56.2 once, re-run under it), none (shim), or a folder")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 dense peak, if not in the table")
    parser.add_argument("--no-reference", action="store_true", help="GPU mode: skip open_clip's batch")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reference_env != "none" and not os.environ.get(_ENV_FLAG):
        env = Path(args.reference_env) if args.reference_env != "auto" else ensure_reference_env()
        if env is not None:
            environ = reference_python_env(env)
            environ[_ENV_FLAG] = "1"
            return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=environ)
        print("reference environment unavailable: shimming open_clip's import; beam search is skipped", file=sys.stderr)
    mode = patch_open_clip_generate()
    import open_clip
    import torch
    import transformers

    print(f"# reference: open_clip {open_clip.__version__} with transformers {transformers.__version__} ({mode}); "
          f"torch {torch.__version__}; threads {args.threads or torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = run_gpu(args) if args.device == "cuda" else run_cpu(args, mode)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
