"""Over-generate then select with a real tiny CoCa and a real CLIP scorer; the choice redone
from provenance alone; per-captioner caption keys chosen by Apple's key regex."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import make_jpeg, make_uid

torch.set_num_threads(1)


def test_select_rules_on_hand_made_candidates():
    from captioning.overgen import select

    texts = ["a red cube on a table", "a red cube on a table top", "two blue spheres", "a a a a", "green grass"]
    scores = [0.30, 0.29, 0.20, 0.90, 0.10]
    flags = [[], [], [], ["repeated_word"], []]
    assert select(texts, scores, 3, rule="score", flags=flags) == [0, 1, 2]  # the degenerate one ranks last
    assert select(texts, scores, 3, rule="diverse", flags=flags, diversity=0.5) == [0, 2, 4]  # near-duplicate 1 left out
    assert select(texts, [None] * 5, 2, rule="diverse") == [0, 2]
    with pytest.raises(ValueError, match="select"):
        select(texts, scores, 2, rule="best")


def test_overgenerate_keeps_the_best_scored_and_reselects_without_decoding(tmp_path):
    from base.models import init_coca_decoder, load_model, save_checkpoint_dir
    from base.shards import decode_image
    from captioning.backends import CaptionerSpec, image_seed, load_captioner
    from captioning.overgen import overgenerate, reselect, select
    from captioning.params import DecodeParams
    from captioning.quality import ClipScorer

    torch.manual_seed(0)
    coca = load_model("qcap-tiny-coca").model
    init_coca_decoder(coca, logit_scale=6.0)
    folder = save_checkpoint_dir(coca, "qcap-tiny-coca", tmp_path / "coca")
    captioner = load_captioner(CaptionerSpec(checkpoint=str(folder)))
    scorer = ClipScorer("qcap-tiny-clip")
    images = [decode_image(make_jpeg(48, 40, seed=i)) for i in range(2)]
    pixels = torch.stack([captioner.preprocess()(im) for im in images])
    scorer_pixels = torch.stack([scorer.preprocess(im) for im in images])
    params = DecodeParams(decoding="top_p", num_captions=6, seq_len=12, top_p=0.9)
    seeds = [image_seed(0, make_uid(i)) for i in range(2)]
    results = overgenerate(captioner, scorer, pixels, scorer_pixels, params, seeds, keep=2, rule="score")
    for (kept, record), image_scorer_pixels in zip(results, scorer_pixels, strict=True):
        assert record["num_candidates"] == 6 and len(kept) == 2 and len(record["kept"]) == 2
        candidates = record["candidates"]
        # every candidate's score is the scorer's own similarity for it
        assert [c["score"] for c in candidates] == scorer.score(image_scorer_pixels[None], [[c["text"] for c in candidates]])[0]
        assert [k.text for k in kept] == [candidates[i]["text"] for i in record["kept"]]
        assert record["kept"] == select([c["text"] for c in candidates], [c["score"] for c in candidates], 2,
                                        flags=[c["flags"] for c in candidates])
        stored = json.loads(json.dumps(record))  # as KEY.qcap.json holds it
        assert reselect(stored, 2)[1] == record["kept"]  # the same choice, no decoding
        texts, indices = reselect(stored, 3, rule="diverse")
        assert len(indices) == 3 and texts == [candidates[i]["text"] for i in indices]


def test_caption_keys_are_chosen_by_regex(tmp_path):
    """syn_text plus syn_text_<tag>: the encoder draws only from keys matching the regex, and the
    teacher text row it returns is that caption's row."""
    import io

    import numpy as np

    from base.augment import AugmentConfig, draw_many, encode_paug
    from base.models import load_model
    from base.multicaption import TAGS_MEMBER, all_captions, encode_tags, key_of, text_layout
    from base.shards import Sample, decode_image
    from train.distill import DRSettings, ReinforcedEncoder

    image = make_jpeg(40, 30, seed=1)
    keys = {"syn_text": ["base a", "base b"], key_of("coco"): ["coco a"], key_of("dfn"): ["dfn a", "dfn b", "dfn c"]}
    assert key_of("coco") == "syn_text_coco"
    with pytest.raises(ValueError):
        key_of("Bad Tag")
    layout = text_layout({"syn_text": keys["syn_text"], **dict(sorted((k, v) for k, v in keys.items() if k != "syn_text"))})
    rows = 1 + sum(len(v) for v in keys.values())
    text_emb = np.arange(rows, dtype=np.float32)[:, None].repeat(4, axis=1)  # row r holds r: the index is visible
    sink = io.BytesIO()
    np.savez(sink, image_emb=np.zeros((2, 4), np.float32), text_emb=text_emb)
    cfg = AugmentConfig(size=32)
    sample = Sample(key="k", uid=make_uid(1), image=image, text="real", syn_text=keys["syn_text"],
                    extras={TAGS_MEMBER: encode_tags({k: v for k, v in keys.items() if k != "syn_text"}),
                            "paug.json": encode_paug(draw_many(decode_image(image), cfg, 2, 0, make_uid(1))),
                            "npz": sink.getvalue(),
                            "reinforce.json": json.dumps({"image_sha256": hashlib.sha256(image).hexdigest(),
                                                          "image_bytes": len(image), "image_size": [40, 30],
                                                          "text_rows": layout}).encode()})
    assert list(all_captions(sample)) == ["syn_text", "syn_text_coco", "syn_text_dfn"]
    tokenizer = load_model("qcap-tiny-clip").tokenizer
    for regex, allowed in ((r"^syn_text.*$", set(sum(keys.values(), []))), (r"^syn_text_dfn$", set(keys["syn_text_dfn"])),
                           (r"^syn_text$", set(keys["syn_text"]))):
        encoder = ReinforcedEncoder(tokenizer, DRSettings(syn_key_regex=regex), cfg, size=32, mean=cfg.mean, std=cfg.std)
        seen = set()
        for seed in range(40):
            _, texts, kinds, _, _, t_texts = encoder.encode(sample, seed)
            assert kinds == ["real", "synthetic"] and texts[0] == "real" and float(t_texts[0][0]) == 0
            key = next(k for k, v in keys.items() if texts[1] in v)
            assert float(t_texts[1][0]) == layout[key][0] + keys[key].index(texts[1])
            seen.add(texts[1])
        assert seen == allowed, regex
