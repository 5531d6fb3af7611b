"""Beam search against open_clip 3.3's own group beam search (slow: installs the reference once).

open_clip 3.3's beam search needs transformers' ``BeamSearchScorer``, gone from transformers 5.
The bench's reference environment (transformers 4.56.2 in ``.venv/qcap-reference``, pip-installed
once) runs open_clip unmodified in a subprocess; qcap's decoder, which uses no transformers
code, runs in the same subprocess on the same weights and images. Greedy is compared there too,
against open_clip's untouched import path.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("bench_caption", sys.argv[1])
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
assert bench.patch_open_clip_generate() == "native", "open_clip did not import its beam scorer"
import transformers
from captioning.decode import generate
torch.set_num_threads(1)
cases = [
    ("qcap-tiny-coca", 1.0, 12, 30, {}),
    ("qcap-tiny-coca", 6.0, 12, 30, {}),
    ("qcap-tiny-coca", 1.0, 8, 24, {"repetition_penalty": 1.4, "min_seq_len": 10}),
    ("qcap-tiny-coca", 1.0, 8, 24, {"num_beams": 4, "num_beam_groups": 1}),
    ("qcap-tiny-coca", 1.0, 8, 24, {"num_beams": 4, "num_beam_groups": 2}),
    ("coca_ViT-B-32", 1.0, 4, 20, {}),
]
results = []
for name, scale, num, seq_len, extra in cases:
    model = bench.random_coca(name, seed=len(results), logit_scale=scale).model
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    pixels = torch.randn(num, 3, size, size, generator=torch.Generator().manual_seed(len(results)))
    kwargs = {"num_beams": 6, "num_beam_groups": 3, **extra}
    with torch.no_grad():
        ref = bench.reference_generate(model, pixels, decoding="beam", seq_len=seq_len, **kwargs)
        ref_greedy = bench.reference_generate(model, pixels, decoding="greedy", seq_len=seq_len)
    ours = generate(model, pixels, decoding="beam", seq_len=seq_len, **kwargs)
    ours_greedy = generate(model, pixels, decoding="greedy", seq_len=seq_len)
    width = min(ref.shape[1], ref_greedy.shape[1])
    results.append({"case": f"{name} scale={scale} {extra}", "ref": ref.tolist(), "ours": ours.tolist(),
                    "greedy_equal": torch.equal(ref_greedy, ours_greedy), "transformers": transformers.__version__,
                    "beam_is_not_greedy": bool((ref[:, :width] != ref_greedy[:, :width]).any())})
print(json.dumps(results))
"""


def _bench():
    spec = importlib.util.spec_from_file_location("qcap_bench_caption", ROOT / "bench" / "caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_beam_search_tokens_are_identical_to_open_clips_group_beam_search():
    bench = _bench()
    env = bench.ensure_reference_env()
    assert env is not None, "could not pip-install the reference environment (transformers 4.56.2)"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "bench" / "caption.py")],
        capture_output=True, text=True, cwd=ROOT, env=bench.reference_python_env(env), timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for result in results:
        assert result["transformers"] == bench.REFERENCE_TRANSFORMERS
        assert result["ours"] == result["ref"], f"{result['case']}: beam outputs differ"
        assert result["greedy_equal"], f"{result['case']}: greedy outputs differ"
    # the beams leave greedy's path: the comparison exercises the beam bookkeeping
    assert all(result["beam_is_not_greedy"] for result in results)
