"""Per-caption quality controls on planted cases: first sentence, degenerate-output flags."""

from __future__ import annotations

import pytest

from captioning.quality import DEGENERATE, caption_flags, clean, first_sentence, is_degenerate, process_caption


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("a dog sitting on a couch . a cat sleeping . ", "a dog sitting on a couch"),  # CLIP BPE spacing
        ("a man riding a wave on top of a surfboard .", "a man riding a wave on top of a surfboard"),
        ("two birds on a wire ! they sing", "two birds on a wire"),
        ("is this a cat ? yes", "is this a cat"),
        ("a plate of food , with a fork and knife", "a plate of food, with a fork and knife"),
        ("version 2.5 of the app . next", "version 2.5 of the app"),  # a decimal point is not a sentence end
        ("  lots   of   space  ", "lots of space"),
    ],
)
def test_first_sentence_is_kept_as_datacompdr_did(raw, kept):
    assert first_sentence(raw) == kept


@pytest.mark.parametrize(
    ("caption", "flags"),
    [
        ("a 2 2 2 2", ["repeated_word"]),
        ("a dog a dog a dog", ["low_diversity", "repeated_phrase"]),
        ("a red car parked on a table on a table on a table", ["low_diversity", "repeated_phrase"]),
        ("a big red car with a small red car next to another red car", ["repeated_phrase"]),
        ("", ["empty"]),
        ("...", ["empty"]),
        ("dog", ["too_short"]),
        ("a cat", ["too_short"]),
        ("2 2 2", ["no_letters", "repeated_word", "too_short"]),
        ("# # # %", ["no_letters"]),
        ("the the the the the the", ["low_diversity", "repeated_word"]),
        ("a brown dog running across a grassy field", []),
        ("a woman holding an umbrella in the rain", []),
    ],
)
def test_degenerate_output_is_flagged(caption, flags):
    assert caption_flags(caption) == flags
    assert is_degenerate(flags) == bool(set(flags) & DEGENERATE)


def test_truncation_is_recorded_but_not_degenerate_by_itself():
    flags = caption_flags("a long caption that ran until the limit", truncated=True)
    assert flags == ["truncated"] and not is_degenerate(flags)


def test_process_caption_keeps_raw_text_and_flags_the_kept_sentence():
    processed = process_caption("a dog . dog dog dog dog dog", num_tokens=9, truncated=False)
    assert processed.text == "a dog" and processed.raw == "a dog. dog dog dog dog dog"
    assert processed.flags == ["too_short"]  # the kept sentence is short; the repetition was cut away
    assert processed.as_json() == {"raw": processed.raw, "num_tokens": 9, "flags": ["too_short"], "score": None}
    whole = process_caption("a dog . dog dog dog dog dog", num_tokens=9, truncated=False, keep_first_sentence=False)
    assert "repeated_word" in whole.flags


def test_clean_fixes_bpe_spacing():
    assert clean("a dog , a cat 's toy .") == "a dog, a cat's toy."
