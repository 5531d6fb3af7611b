"""``qcap caption --num-candidates K --select score|diverse`` on real Ray with a real tiny CoCa
and a real CLIP scorer: every candidate and its score in the provenance, the N kept the
selection rule's choice (redone from provenance alone), other settings refused on re-run;
``--tag`` writes the captions under ``syn_text_<tag>`` (base.multicaption's members)."""

from __future__ import annotations

import json

import pytest
import torch
from test_caption_job import coca_dir, ray_address, run_cli, write_shards  # noqa: F401 (fixtures)

from base.shards import iter_samples

torch.set_num_threads(1)


@pytest.mark.slow  # ~30 s of Ray and a CoCa; selection itself is in test_multicaption_overgen.py
def test_overgenerate_then_select_and_a_tagged_captioner(tmp_path, ray_address, coca_dir, capsys):  # noqa: F811
    from base.models import load_model, save_checkpoint_dir
    from base.multicaption import TAGS_MEMBER, TAGS_PROVENANCE_MEMBER, all_captions, tagged_captions
    from base.shards import decode_image
    from captioning.overgen import reselect, select
    from captioning.quality import ClipScorer

    torch.manual_seed(3)
    clip_dir = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", tmp_path / "clip")
    shards = write_shards(tmp_path / "curated", [3, 2])
    out = tmp_path / "syn"
    base = ["caption", "--shards", str(shards), "--checkpoint", str(coca_dir), "--num-captions", "2",
            "--scorer-checkpoint", str(clip_dir), "--num-workers", "1", "--ray-address", ray_address, "--no-progress",
            "--seq-len", "12"]
    code, stdout, stderr = run_cli([*base, "--out", str(out), "--num-candidates", "5", "--select", "score"], capsys)
    assert code == 0, stderr
    scorer = ClipScorer(None, checkpoint=str(clip_dir))
    images = {s.uid: s.image for s in iter_samples(str(shards))}
    written = list(iter_samples(str(out)))
    assert len(written) == 5
    for sample in written:
        record = sample.syn_provenance["overgenerate"]
        assert record["num_candidates"] == 5 and record["select"] == "score" and len(record["kept"]) == 2
        candidates = record["candidates"]
        texts = [c["text"] for c in candidates]
        # each candidate's score is the scorer's similarity for it, and the kept two the rule's choice
        pixels = scorer.preprocess(decode_image(images[sample.uid]))[None]
        assert [c["score"] for c in candidates] == pytest.approx(scorer.score(pixels, [texts])[0], abs=1e-5)
        assert record["kept"] == select(texts, [c["score"] for c in candidates], 2,
                                        flags=[c["flags"] for c in candidates])
        assert sample.syn_text == [texts[i] for i in record["kept"]]
        assert reselect(record, 2)[0] == sample.syn_text  # the choice redone without decoding
        assert [c["score"] for c in sample.syn_provenance["captions"]] == [candidates[i]["score"] for i in record["kept"]]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["num_candidates"] == 5 and config["decoding"]["num_captions"] == 5

    # other over-generation settings on the same folder: refused with one line
    code, _, stderr = run_cli([*base, "--out", str(out), "--num-candidates", "5", "--select", "diverse"], capsys)
    assert code == 2 and "select: 'score' -> 'diverse'" in stderr and "Traceback" not in stderr
    with pytest.raises(SystemExit) as exit_:
        run_cli([*base, "--out", str(tmp_path / "x"), "--num-candidates", "5", "--tag", "Bad Tag"], capsys)
    assert exit_.value.code == 2 and "tag: captioner tag 'Bad Tag'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # --select score without a scorer
        run_cli([*base[:-6], "--out", str(tmp_path / "y"), "--num-candidates", "3", "--no-progress"], capsys)
    assert exit_.value.code == 2 and "--scorer-model" in capsys.readouterr().err

    # a tagged captioner, diverse selection: syn_text_<tag> in syn_tags.json, provenance in qcap_tags.json
    tagged = tmp_path / "tagged"
    code, _, stderr = run_cli([*base, "--out", str(tagged), "--num-candidates", "4", "--select", "diverse",
                               "--diversity", "0.7", "--tag", "coca_tiny"], capsys)
    assert code == 0, stderr
    for sample in iter_samples(str(tagged)):
        assert sample.syn_text is None and sample.syn_provenance is None
        assert {TAGS_MEMBER, TAGS_PROVENANCE_MEMBER} <= set(sample.extras)
        captions = tagged_captions(sample)["syn_text_coca_tiny"]
        provenance = json.loads(sample.extras[TAGS_PROVENANCE_MEMBER])["syn_text_coca_tiny"]
        assert provenance["tag"] == "coca_tiny" and provenance["overgenerate"]["select"] == "diverse"
        assert reselect(provenance["overgenerate"], 2)[0] == captions and len(captions) == 2
        assert list(all_captions(sample)) == ["syn_text_coca_tiny"]

    # both captioners joined by build-dr: syn_text from the first, syn_text_coca_tiny from the tagged one
    from captioning.dr import main as build_dr

    dr = tmp_path / "dr"
    assert build_dr(["--images", str(shards), "--captions", str(out), "--tagged-captions", f"coca_tiny={tagged}",
                     "--out", str(dr), "--no-progress", "--no-card", "--drop-flags", "none"]) == 0
    assert "syn_text_coca_tiny: 5 of 5 kept images" in capsys.readouterr().out
    first = {s.uid: s.syn_text for s in written}
    second = {s.uid: tagged_captions(s)["syn_text_coca_tiny"] for s in iter_samples(str(tagged))}
    merged = list(iter_samples(str(dr)))
    assert len(merged) == 5
    for sample in merged:
        assert sample.syn_text == first[sample.uid]
        assert tagged_captions(sample) == {"syn_text_coca_tiny": second[sample.uid]}
        provenance = json.loads(sample.extras[TAGS_PROVENANCE_MEMBER])["syn_text_coca_tiny"]
        assert provenance["tag"] == "coca_tiny" and provenance["dr"]["kept"] == [0, 1]
        assert reselect(provenance["overgenerate"], 2)[0] == second[sample.uid]  # candidates kept through the join
