"""Which caption a training sample is paired with: DataCompDR's caption sources.

``--caption-source``:

- ``real`` — the web caption (``Sample.text``); when ``meta["captions"]`` lists several human
  references (the embedded world's clean split, MSCOCO-style), one of them, uniformly;
- ``synthetic`` — one of ``Sample.syn_text`` (``KEY.syn.json``), uniformly;
- ``mix:P`` — synthetic with probability P, else real (DataCompDR's mixing ratio);
- ``dual`` — both: the image is paired with one real and one synthetic caption, and the
  contrastive loss is the mean of image↔real and image↔synthetic (DataCompDR training).

Sources are picked from :data:`SOURCES` by name. A source draws with uniforms it derives from
the sample's seed, so a draw is a pure function of (run seed, position) and a resume repeats it.
A sample without ``syn.json`` under a synthetic source breaks the dataset's contract: a
:class:`~base.shards.ShardError` that says how to build DR shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from base.shards import Sample, ShardError

REAL = "real"
SYNTHETIC = "synthetic"
_MASK = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 folded over the values): per-sample seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        z = (state ^ (value & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        state = z ^ (z >> 31)
    return state


def uniform(seed: int, slot: int) -> float:
    """A uniform in [0, 1) from a seed and a slot number."""
    return (mix64(seed, slot) >> 11) / float(1 << 53)


def real_captions(sample: Sample) -> list[str]:
    """The human captions of a sample: ``meta["captions"]`` when it lists several, else ``text``."""
    listed = sample.meta.get("captions") if sample.meta else None
    if isinstance(listed, list):
        texts = [str(t) for t in listed if isinstance(t, str) and t.strip()]
        if texts:
            return texts
    return [sample.text] if sample.text and sample.text.strip() else []


def _pick(options: list[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _synthetic(sample: Sample, source: str) -> list[str]:
    if not sample.syn_text:
        raise ShardError(
            f"sample {sample.key!r} (uid {sample.uid}) has no synthetic captions (KEY.syn.json); caption source "
            f"{source!r} needs DR shards (qcap build-dr), or train with --caption-source real"
        )
    return sample.syn_text


@dataclass(frozen=True)
class CaptionSource:
    """How one sample's caption(s) are drawn. ``slots`` names the text tensors of a batch."""

    name: str  # as given on the command line, e.g. "mix:0.5"
    slots: tuple[str, ...]  # batch keys of the tokenized texts: ("text",) or ("text", "text_syn")
    needs_synthetic: bool  # whether samples must carry syn.json
    synthetic_prob: float  # probability of a synthetic caption in slot "text" (0 real, 1 synthetic)

    def pick(self, sample: Sample, seed: int) -> tuple[list[str], list[str]] | None:
        """One text per slot and the kind of each (``real``/``synthetic``); None: no caption."""
        if self.slots == ("text", "text_syn"):
            real = real_captions(sample)
            if not real:
                return None
            return [_pick(real, uniform(seed, 1)), _pick(_synthetic(sample, self.name), uniform(seed, 2))], [
                REAL,
                SYNTHETIC,
            ]
        use_synthetic = self.synthetic_prob >= 1.0 or (self.synthetic_prob > 0 and uniform(seed, 0) < self.synthetic_prob)
        if use_synthetic:
            return [_pick(_synthetic(sample, self.name), uniform(seed, 2))], [SYNTHETIC]
        real = real_captions(sample)
        if not real:
            return None
        return [_pick(real, uniform(seed, 1))], [REAL]


def _real(arg: str | None) -> CaptionSource:
    return CaptionSource(REAL, ("text",), needs_synthetic=False, synthetic_prob=0.0)


def _synthetic_source(arg: str | None) -> CaptionSource:
    return CaptionSource(SYNTHETIC, ("text",), needs_synthetic=True, synthetic_prob=1.0)


def _mix(arg: str | None) -> CaptionSource:
    try:
        prob = float(arg) if arg is not None else float("nan")
    except ValueError:
        prob = float("nan")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption_source: mix needs a probability in [0, 1], as in mix:0.5 (got {arg!r})")
    return CaptionSource(f"mix:{prob:g}", ("text",), needs_synthetic=prob > 0, synthetic_prob=prob)


def _dual(arg: str | None) -> CaptionSource:
    return CaptionSource("dual", ("text", "text_syn"), needs_synthetic=True, synthetic_prob=0.0)


# name → factory(argument after ':'); the registry the command line picks from
SOURCES: dict[str, Callable[[str | None], CaptionSource]] = {
    "real": _real,
    "synthetic": _synthetic_source,
    "mix": _mix,
    "dual": _dual,
}


def parse_caption_source(spec: str) -> CaptionSource:
    """``real``, ``synthetic``, ``mix:P`` or ``dual`` → a :class:`CaptionSource` (ValueError otherwise)."""
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise ValueError(f"caption_source: unknown source {spec!r}; choose real, synthetic, mix:P or dual")
    if name != "mix" and arg:
        raise ValueError(f"caption_source: {name!r} takes no argument (got {spec!r})")
    return SOURCES[name](arg or None)
