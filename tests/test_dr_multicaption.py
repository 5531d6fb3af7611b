"""Several captioners per image through ``qcap build-dr --tagged-captions TAG=DIR``: each caption
source joined by uid, its captions under ``syn_text_<TAG>`` with that source's provenance, the
caption filters applied per source, every image a source lacks counted, the counts reconciled;
then reinforced by ``qcap reinforce``'s own shard writer, and the training loader's
``--syn-text-key-regex`` draws only the keys it names, each with its own teacher text row."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_uid
from dr_data import qcap_provenance, syn_captions, write_images, write_qcap_captions, write_qcap_side_tables

from base.multicaption import TAGS_MEMBER, TAGS_PROVENANCE_MEMBER, all_captions, encode_tags, tagged_captions
from base.shards import Sample, ShardWriter, finalize_folder, iter_samples

torch.set_num_threads(1)
LAYOUT = [[0, 1, 2], [3, 4]]  # image numbers per curated shard


def blip_captions(number: int) -> list[str]:
    return [f"blip says image {number} shows a blue sphere", f"blip sees a blue sphere in image {number}"]


def write_tagged(folder: Path, numbers: list[int], tag: str, *, degenerate: set[int] = frozenset()) -> Path:
    """Caption-only shards as ``qcap caption --tag TAG`` writes them: no ``syn.json``, the captions
    under ``syn_text_<TAG>`` in ``KEY.syn_tags.json``, their provenance in ``KEY.qcap_tags.json``;
    ``degenerate`` numbers get only flagged captions."""
    key = f"syn_text_{tag}"
    with ShardWriter(folder, 0) as writer:
        for index, number in enumerate(numbers):
            texts = blip_captions(number)
            flags = [["too_short"], ["repeated_word"]] if number in degenerate else [[], []]
            provenance = {**qcap_provenance(texts, flags), "tag": tag}
            writer.write(Sample(key=f"blip{index:04d}", uid=make_uid(number), meta={"num_syn": len(texts)},
                                extras={TAGS_MEMBER: encode_tags({key: texts}),
                                        TAGS_PROVENANCE_MEMBER: json.dumps({key: provenance}).encode()}))
        writer.close(extra_stats={"num_input": len(numbers)})
    finalize_folder(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multicaption")
    return {
        "images": write_images(root / "curated", LAYOUT),
        "syn": write_qcap_captions(root / "syn", [[0, 1, 2, 3, 4]]),
        # blip: no caption for image 4, only degenerate ones for image 2, one for an image not curated (77)
        "blip": write_tagged(root / "blip", [3, 0, 1, 2, 77], "blip", degenerate={2}),
        # side tables (qcap caption --format parquet) as a second tagged source, missing image 0
        "coca": write_qcap_side_tables(root / "coca", [[1, 2], [3, 4]]),
    }


def build_argv(inputs: dict[str, Path], out: Path, *tagged: str) -> list[str]:
    return ["--images", str(inputs["images"]), "--captions", str(inputs["syn"]), "--out", str(out), "--no-progress",
            "--no-card", *(["--tagged-captions", *tagged] if tagged else [])]


def test_build_dr_merges_tagged_caption_sources_by_uid(inputs, tmp_path, capsys):
    from base.cli import run_guarded
    from captioning.dr import main

    out = tmp_path / "dr"
    tagged = (f"blip={inputs['blip']}", f"coca={inputs['coca']}")
    assert main(build_argv(inputs, out, *tagged)) == 0
    stdout = capsys.readouterr().out
    assert "counts reconcile: yes" in stdout
    assert "syn_text_blip: 3 of 5 kept images" in stdout and "syn_text_coca: 4 of 5 kept images" in stdout
    samples = {s.uid: s for s in iter_samples(str(out))}
    assert len(samples) == 5 and all(s.ok for s in samples.values())
    for number in range(5):
        sample = samples[make_uid(number)]
        assert sample.syn_text == syn_captions(number)  # --captions: Apple's syn_text, as before
        want = {}
        if number in (0, 1, 3):
            want["syn_text_blip"] = blip_captions(number)
        if number != 0:
            want["syn_text_coca"] = syn_captions(number)
        assert tagged_captions(sample) == want, number
        assert list(all_captions(sample)) == ["syn_text", *sorted(want)]
        if not want:
            assert TAGS_MEMBER not in sample.extras and TAGS_PROVENANCE_MEMBER not in sample.extras
            continue
        provenance = json.loads(sample.extras[TAGS_PROVENANCE_MEMBER])
        assert sorted(provenance) == sorted(want)  # provenance per tag
        for key, captions in want.items():
            record = provenance[key]
            assert len(record["captions"]) == len(captions)
            assert record["dr"]["kept"] == list(range(len(captions)))
            assert record["dr"]["source"] == ("qcap-webdataset" if key == "syn_text_blip" else "qcap-parquet")
        if "syn_text_blip" in want:
            assert provenance["syn_text_blip"]["tag"] == "blip"  # the captioner's own provenance, carried
            assert provenance["syn_text_blip"]["dr"]["caption_shard"] == "00000.tar"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["reconciled"] and summary["images_kept"] == 5
    blip, coca = summary["tagged"]["syn_text_blip"], summary["tagged"]["syn_text_coca"]
    assert blip["images"] == {"with_captions": 3, "all_dropped": 1, "unreadable": 0, "no_caption": 1,
                              "caption_failed": 0}
    assert blip["captions_in"] == 8 and blip["captions_kept"] == 6
    assert blip["captions_dropped"] == {"repeated_word": 1, "too_short": 1}
    assert blip["captions_without_images"] == 1  # image 77 was never curated
    assert coca["images"]["with_captions"] == 4 and coca["images"]["no_caption"] == 1
    assert coca["captions_without_images"] == 0
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["tagged_captions"]) == ["syn_text_blip", "syn_text_coca"]
    assert config["identity"]["tagged"]["syn_text_blip"]["kind"] == "qcap-webdataset"

    # the same command again: nothing to redo, same summary; other tagged sources: refused with one line
    assert main(build_argv(inputs, out, *tagged)) == 0
    assert "5 of 5 images with captions in 2/2 shards" in capsys.readouterr().out
    assert run_guarded(main, build_argv(inputs, out, f"blip={inputs['blip']}"), "qcap build-dr") == 2
    err = capsys.readouterr().err
    assert "other inputs or settings" in err and "tagged" in err and "Traceback" not in err
    # a folder built without tagged sources keeps its identity (no tagged keys): it resumes as before
    plain = tmp_path / "plain"
    assert main(build_argv(inputs, plain)) == 0
    assert "tagged" not in json.loads((plain / "config.json").read_text())["identity"]
    assert all(TAGS_MEMBER not in s.extras for s in iter_samples(str(plain)))


@pytest.mark.parametrize("bad, message", [
    ("blip", "is not TAG=FOLDER"),
    ("Blip=x", "captioner tag 'Blip'"),
    ("a=x a=y", "tag 'a' is given twice"),
])
def test_bad_tagged_sources_are_one_line(inputs, tmp_path, capsys, bad, message):
    from base.cli import run_guarded
    from captioning.dr import main

    with pytest.raises(SystemExit) as exit_:
        run_guarded(main, build_argv(inputs, tmp_path / "dr", *bad.split()), "qcap build-dr")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_tagged_folder_that_is_not_captions_is_one_line(inputs, tmp_path, capsys):
    from base.cli import run_guarded
    from captioning.dr import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_guarded(main, build_argv(inputs, tmp_path / "dr", f"blip={empty}"), "qcap build-dr") == 2
    err = capsys.readouterr().err
    assert f"--tagged-captions blip={empty}" in err and "Traceback" not in err and not (tmp_path / "dr").exists()


def test_tagged_keys_reinforced_then_chosen_by_regex(inputs, tmp_path):
    """The merged keys round-trip: reinforce embeds every key's captions (rows recorded per key),
    and the loader with a key regex draws only the keys it names, each with its teacher row."""
    from base.models import load_model, save_checkpoint_dir
    from base.shards import atomic_write_json
    from captioning.dr import main
    from captioning.reinforce import ReinforceConfig, ReinforceContext, reinforce_one_shard, resolve_teachers
    from captioning.teachers import TeacherEnsemble
    from train.distill import DRSettings, ReinforcedEncoder, reinforced_augment_config

    dr = tmp_path / "dr"
    assert main(build_argv(inputs, dr, f"blip={inputs['blip']}", f"coca={inputs['coca']}")) == 0
    torch.manual_seed(1)
    teacher = save_checkpoint_dir(load_model("qcap-tiny-clip").model, "qcap-tiny-clip", tmp_path / "teacher")
    out = tmp_path / "reinforced"
    cfg = ReinforceConfig(shards=str(dr), out=out, teachers=str(teacher), num_augmentations=2, size=32)
    parts = resolve_teachers(cfg)
    context = ReinforceContext(specs=parts["specs"], logit_scales=(100.0,), augment=cfg.augment_config(),
                               num_augmentations=2, seed=0, embeddings="npz", device="cpu", autocast=None, threads=1,
                               batch_size=16, max_pixels=10**7, teachers_fingerprint=parts["fingerprint"])
    ensemble = TeacherEnsemble(list(parts["specs"]), logit_scales=[100.0])
    for shard in range(len(LAYOUT)):
        reinforce_one_shard(ensemble, context, shard, str(dr / f"{shard:05d}.tar"), str(out))
    finalize_folder(out)
    atomic_write_json(out / "config.json", {"stage": "reinforce", "augmentation": context.augment.as_json(),
                                                      "teacher_dims": parts["dims"], "teacher_logit_scales": [100.0]})

    loaded = load_model("qcap-tiny-clip")
    samples = {s.uid: s for s in iter_samples(str(out))}
    assert len(samples) == 5
    for regex, allowed in ((r"^syn_text_blip$", {"syn_text_blip"}), (r"^syn_text$", {"syn_text"}),
                           (r"^syn_text_(blip|coca)$", {"syn_text_blip", "syn_text_coca"})):
        settings = DRSettings(syn_key_regex=regex)
        encoder = ReinforcedEncoder(loaded.tokenizer, settings, reinforced_augment_config(out, 32), size=32,
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        seen: set[str] = set()
        for sample in samples.values():
            keys = {k: v for k, v in all_captions(sample).items() if k in allowed}
            if not keys:  # images 2 and 4 have no blip captions
                continue
            record = json.loads(sample.extras["reinforce.json"])
            with np.load(io.BytesIO(sample.extras["npz"]), allow_pickle=False) as npz:
                text_emb = npz["text_emb"]
            assert text_emb.shape[0] == 1 + sum(len(v) for v in all_captions(sample).values())
            for seed in range(12):
                _, texts, _, _, _, teacher_texts = encoder.encode(sample, seed)
                key = next(k for k, v in keys.items() if texts[1] in v)  # the synthetic one is of an allowed key
                seen.add(key)
                row = record["text_rows"][key][0] + keys[key].index(texts[1])
                np.testing.assert_array_equal(teacher_texts[1].numpy(), text_emb[row])
                assert texts[0] == sample.text
        assert seen == allowed, regex
