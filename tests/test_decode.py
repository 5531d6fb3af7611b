"""captioning.decode against open_clip 3.3's own ``CoCa.generate``: same tokens, same distributions.

open_clip's ``generate`` cannot import its helpers under transformers 5; the bench's
``patch_open_clip_generate`` binds them to transformers' processors (the very classes open_clip
asks for), and open_clip's code then runs as released. Beam search needs transformers' old
``BeamSearchScorer``: ``tests/test_decode_beam.py`` (slow) runs that reference in a
subprocess with transformers 4.56.2.

Random CoCa weights come from open_clip's initialisation, the decoder's from
``base.models.init_coca_decoder`` (open_clip leaves its vocabulary projection empty) at logit
scale 1 (unit-scale logits, the hardest case for near-ties) or 6 (peaked distributions like a
trained captioner's).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from captioning import decode
from captioning.decode import DecodeParams, generate

ROOT = Path(__file__).resolve().parents[1]
EOS = decode.EOS_TOKEN_ID


def _load_bench():
    spec = importlib.util.spec_from_file_location("qcap_bench_caption", ROOT / "bench" / "caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: steady on a shared machine, and the reference is slow otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    bench.patch_open_clip_generate()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return bench.random_coca("qcap-tiny-coca", seed=0, logit_scale=1.0).model


@pytest.fixture(scope="module")
def peaked():
    return bench.random_coca("qcap-tiny-coca", seed=1, logit_scale=6.0).model


def images(num: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(num, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference(model, pixels, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return bench.reference_generate(model, pixels, **kwargs)


def first_divergence(model, pixels, ours, ref) -> str:
    """Where two greedy outputs part, and how close the two tokens' logits were there."""
    for row in range(ours.shape[0]):
        width = min(ours.shape[1], ref.shape[1])
        diff = (ours[row, :width] != ref[row, :width]).nonzero()
        if len(diff):
            pos = int(diff[0])
            with torch.no_grad():
                _, embs = model._encode_image(pixels[row : row + 1])
                prefix = ref[row : row + 1, :pos]
                logits = model.text_decoder(embs, model._encode_text(prefix)[1])[0, -1]
            a, b = int(ours[row, pos]), int(ref[row, pos])
            return f"row {row} position {pos}: qcap {a} ({logits[a]:.7f}) vs open_clip {b} ({logits[b]:.7f})"
    return "shapes differ"


# --------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize(
    "settings",
    [
        {"decoding": "greedy"},
        {"decoding": "greedy", "repetition_penalty": 1.3, "min_seq_len": 12},
        {"decoding": "top_k", "top_k": 1, "temperature": 0.7},
    ],
    ids=["greedy", "greedy-penalty-minlen", "top_k-1"],
)
def test_greedy_tokens_are_identical_to_open_clip(tiny, settings):
    num = 24 if settings == {"decoding": "greedy"} else 8
    pixels = images(num, seed=3)
    ref = reference(tiny, pixels, seq_len=30, **settings)
    ours = generate(tiny, pixels, seq_len=30, generator=torch.Generator().manual_seed(0), **settings)
    assert ours.shape == ref.shape and torch.equal(ours, ref), first_divergence(tiny, pixels, ours, ref)
    assert ours.shape[1] == 30 and (ours[:, 0] == decode.SOT_TOKEN_ID).all()
    # the captions differ from image to image: not a degenerate constant output
    assert len({tuple(row) for row in ours.tolist()}) == num


@pytest.mark.slow
def test_greedy_tokens_are_identical_to_open_clip_on_coca_vit_b_32():
    model = bench.random_coca("coca_ViT-B-32", seed=0, logit_scale=1.0).model
    assert_cached_logits_match_full_prefix(model, 224, 8)
    pixels = images(16, seed=4, size=224)
    ref = reference(model, pixels, decoding="greedy", seq_len=30)
    ours = generate(model, pixels, seq_len=30)
    assert torch.equal(ours, ref), first_divergence(model, pixels, ours, ref)
    assert len({tuple(row) for row in ours.tolist()}) >= 12  # not a constant output (random weights repeat some)


def assert_cached_logits_match_full_prefix(model, size: int, steps: int) -> None:
    pixels = images(4, seed=5, size=size)
    tokens = torch.randint(1, 49000, (4, steps), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = decode.SOT_TOKEN_ID
    assert decode._KVStepper.supports(model)
    with torch.no_grad():
        latent, embs = model._encode_image(pixels)
        rows = decode._Rows(torch.arange(4), torch.zeros(4, dtype=torch.long), 1)
        stepper = decode._KVStepper(model, embs, rows, steps, model.pad_id)
        for pos in range(steps):
            ours = stepper.step(tokens[:, pos], pos)
            full = model(pixels, tokens[:, : pos + 1], image_latent=latent, image_embs=embs,
                         output_labels=False)["logits"][:, -1]
            torch.testing.assert_close(ours, full, rtol=0, atol=2e-5)


def test_cached_step_logits_match_open_clips_full_prefix_forward(tiny):
    """At every step the KV-cached logits are open_clip's full-prefix logits, up to float noise
    (open_clip's own values for a position move by as much between steps)."""
    assert_cached_logits_match_full_prefix(tiny, 64, 30)


def test_variable_lengths_and_finished_rows_leave_the_batch(tiny, monkeypatch):
    """Rows that end early stop being computed, the output is padded as open_clip pads it."""
    model = bench.random_coca("qcap-tiny-coca", seed=3, logit_scale=1.0).model
    pixels = images(12, seed=7)
    with torch.no_grad():  # make EOS win exactly where a frequent token would: rows end at varied steps
        greedy = generate(model, pixels, seq_len=20, min_seq_len=3)
        common = Counter(greedy[:, 3:-1].flatten().tolist()).most_common(1)[0][0]
        projection = model.text_decoder.text_projection
        projection[:, EOS] = projection[:, common] * 1.001
    sizes = []
    real_step = decode._KVStepper.step

    def spy(self, tokens, pos):
        sizes.append(tokens.shape[0])
        return real_step(self, tokens, pos)

    monkeypatch.setattr(decode._KVStepper, "step", spy)
    ours = generate(model, pixels, seq_len=20, min_seq_len=3)
    ref = reference(model, pixels, decoding="greedy", seq_len=20, min_seq_len=3)
    assert torch.equal(ours, ref), first_divergence(model, pixels, ours, ref)
    lengths = [row.index(EOS) + 1 for row in ours.tolist()]
    assert len(set(lengths)) > 2, lengths  # varied lengths, some ended early
    assert all(row[length:] == [model.pad_id] * (ours.shape[1] - length) for row, length in zip(ours.tolist(), lengths, strict=True))
    # at step p exactly the rows still unfinished were computed
    expected = [sum(1 for length in lengths if length > pos + 1) for pos in range(len(sizes))]
    assert sizes == expected and sizes[-1] < sizes[0]


def test_full_prefix_fallback_gives_the_same_tokens(tiny, monkeypatch):
    """Models the KV path does not cover fall back to full-prefix steps, with the same results."""
    pixels = images(8, seed=11)
    cached = generate(tiny, pixels, seq_len=24)
    cached_beam = generate(tiny, pixels, seq_len=16, decoding="beam")
    monkeypatch.setattr(decode._KVStepper, "supports", staticmethod(lambda model: False))
    assert torch.equal(generate(tiny, pixels, seq_len=24), cached)
    assert torch.equal(generate(tiny, pixels, seq_len=16, decoding="beam"), cached_beam)


# --------------------------------------------------------------------------------------------
# Sampling: the same distribution


def _prefixes(tokens: torch.Tensor, depth: int) -> list[tuple[int, ...]]:
    return [tuple(row[1 : 1 + depth]) for row in tokens.tolist()]


def homogeneity_p_value(a: list, b: list) -> float:
    """Chi-square test that two samples of categories come from one distribution; categories
    seen fewer than 10 times in both samples together are pooled."""
    from scipy.stats import chi2_contingency

    count_a, count_b = Counter(a), Counter(b)
    table, pooled = [], [0, 0]
    for key in set(count_a) | set(count_b):
        pair = [count_a[key], count_b[key]]
        if sum(pair) >= 10:
            table.append(pair)
        else:
            pooled = [pooled[0] + pair[0], pooled[1] + pair[1]]
    if sum(pooled):
        table.append(pooled)
    assert len(table) >= 3, f"too few categories for a test: {table}"
    return float(chi2_contingency(np.array(table).T)[1])


SAMPLING = {
    "top_p": {"decoding": "top_p", "top_p": 0.9},
    "top_p-temp-penalty": {"decoding": "top_p", "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.5},
    "top_k": {"decoding": "top_k", "top_k": 4, "temperature": 1.3},
}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[] if name == "top_p" else [pytest.mark.slow]) for name in sorted(SAMPLING)]
)
def test_sampling_draws_from_open_clips_distribution(peaked, name):
    """Many captions of one image from both; the first two tokens' joint frequencies agree
    (chi-square homogeneity test), and a wrongly set filter is told apart by the same test."""
    settings = SAMPLING[name]
    draws = 200
    pixel = images(1, seed=13 + len(name))
    ours = generate(peaked, pixel, num_captions=draws, seq_len=4, min_seq_len=3,
                    generator=torch.Generator().manual_seed(1), **settings)
    torch.manual_seed(2)
    ref = reference(peaked, pixel.expand(draws, -1, -1, -1), seq_len=4, min_seq_len=3, **settings)
    p_value = homogeneity_p_value(_prefixes(ours, 2), _prefixes(ref, 2))
    assert p_value > 1e-3, f"qcap and open_clip sample differently (p = {p_value:.2e})"
    # the same test tells a filter that keeps only the best token apart
    narrower = dict(settings, **({"top_p": 0.05} if "top_p" in settings else {"top_k": 1}))
    wrong = generate(peaked, pixel, num_captions=draws, seq_len=4, min_seq_len=3,
                     generator=torch.Generator().manual_seed(3), **narrower)
    assert homogeneity_p_value(_prefixes(wrong, 2), _prefixes(ref, 2)) < 1e-6


def test_filters_keep_the_tokens_transformers_warpers_keep():
    """top-k and top-p kept sets equal transformers' warpers' on peaked and flat rows (flat rows
    overflow the candidate window and take the full-sort path)."""
    import transformers

    gen = torch.Generator().manual_seed(0)
    peaked_rows = torch.randn(64, 49408, generator=gen) * 6
    flat_rows = torch.randn(8, 49408, generator=gen) * 0.5
    ties = torch.zeros(4, 49408)
    ties[:, :7] = 3.0  # seven tokens tied at the top
    scores = torch.cat([peaked_rows, flat_rows, ties])
    for params, warper in (
        (DecodeParams(decoding="top_p", top_p=0.9), transformers.TopPLogitsWarper(0.9)),
        (DecodeParams(decoding="top_p", top_p=0.5), transformers.TopPLogitsWarper(0.5)),
        (DecodeParams(decoding="top_k", top_k=5), transformers.TopKLogitsWarper(5)),
    ):
        values, ids, keep = decode._candidates(scores.clone(), params)
        theirs = torch.isfinite(warper(None, scores.clone()))
        ours = torch.zeros_like(theirs)
        for row in range(scores.shape[0]):
            ours[row, ids[row][keep[row]]] = True
        # which of many exactly tied tokens a nucleus ends on is the sort's choice, for both:
        # on tied rows the number kept must agree, elsewhere the very tokens
        untied = 72 if params.decoding == "top_p" else scores.shape[0]
        mismatched = (ours[:untied] != theirs[:untied]).any(-1).nonzero().flatten().tolist()
        assert not mismatched, f"{params.decoding}: rows {mismatched} keep other tokens than transformers"
        assert torch.equal(ours.sum(-1), theirs.sum(-1))
        if params.decoding == "top_p" and params.top_p == 0.9:
            assert int(keep[64:72].sum(-1).min()) > decode._CANDIDATES  # the full-sort path ran
        if params.decoding == "top_k":
            assert int(keep[72:].sum(-1).min()) == 7  # ties with the k-th best are kept


def test_per_image_generators_make_captions_independent_of_the_batch(peaked):
    pixels = images(3, seed=17)

    def gens(ids):
        return [torch.Generator().manual_seed(1000 + i) for i in ids]

    together = generate(peaked, pixels, decoding="top_p", num_captions=4, generator=gens([0, 1, 2]))
    alone = generate(peaked, pixels[1:2], decoding="top_p", num_captions=4, generator=gens([1]))
    width = alone.shape[1]
    assert torch.equal(together[4:8, :width], alone)
    assert (together[4:8, width:] == peaked.pad_id).all()
    assert len({tuple(row) for row in alone.tolist()}) > 1  # four different samples of one image


# --------------------------------------------------------------------------------------------
# Contract errors


def test_bad_arguments_are_clear_errors(tiny):
    from base.models import load_model

    clip = load_model("qcap-tiny-clip").model
    with pytest.raises(ValueError, match="not an open_clip CoCa captioner"):
        generate(clip, images(1, 0))
    with pytest.raises(ValueError, match="one caption per image"):
        generate(tiny, images(1, 0), decoding="beam", num_captions=2)
    with pytest.raises(ValueError, match="at most 32 positions"):
        generate(tiny, images(1, 0), seq_len=40)
    with pytest.raises(ValueError, match="2 generators for 1 images"):
        generate(tiny, images(1, 0), decoding="top_p", generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="decoding: must be one of"):
        generate(tiny, images(1, 0), decoding="nucleus")
    with pytest.raises(ValueError, match="seq_len: must be larger than min_seq_len"):
        generate(tiny, images(1, 0), seq_len=5, min_seq_len=5)
