"""qcap control-rung: the oracle rung (true descriptions of a rung's images), the shapes rung and the clean rung."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_jpeg, make_uid

from base.shards import Sample, ShardWriter, finalize_folder, iter_samples, read_sizes
from world.config import WorldConfig
from world.controls import ControlConfig, build_clean, build_oracle, true_descriptions
from world.generate import generate_world

QCAP = str(Path(sys.executable).parent / "qcap")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("controls") / "w"
    generate_world(WorldConfig(out=out, num_samples=60, clean_samples=30, eval_samples=8, chunk_size=60, workers=1,
                               eval_image_size=32, clean_image_size=48), progress=False)
    return out


def _rung(world: Path, out: Path, count: int) -> Path:
    """A rung-like folder: clean images under their own uids, with web-like text and synthetic captions."""
    samples = list(iter_samples([str(p) for p in sorted((world / "clean").glob("*.tar"))]))[:count]
    with ShardWriter(out, 3) as writer:
        for s in samples:
            writer.write(Sample(key=s.key, uid=s.uid, image=s.image, text="a photo, best price",
                                syn_text=["a synthetic caption"], meta={"captions": ["x", "y"], "num_syn": 1}))
    finalize_folder(out)
    return out


def test_oracle_rung_has_the_true_descriptions_of_the_same_images(world, tmp_path):
    rung = _rung(world, tmp_path / "datacomp-100", 12)
    truth = true_descriptions(world)
    summary = build_oracle(ControlConfig(kind="oracle", world=world, shards=str(rung), out=tmp_path / "oracle-100"))
    assert summary["reconciled"] and summary["num_written"] == 12
    source = {s.uid: s for s in iter_samples([str(rung / "00003.tar")])}
    out = list(iter_samples([str(tmp_path / "oracle-100" / "00003.tar")]))  # same shard id as the input
    assert [s.uid for s in out] == list(source)
    for s in out:
        assert s.text == truth[s.uid] and s.text != source[s.uid].text
        assert s.image == source[s.uid].image
        assert s.syn_text is None and "captions" not in s.meta and s.meta["caption_source"] == "oracle"
    assert read_sizes(tmp_path / "oracle-100") == {"00003.tar": 12}
    # one caption per image records the identity it recorded before --num-captions existed
    assert set(json.loads((tmp_path / "oracle-100" / "config.json").read_text())["identity"]) == {"kind", "shards", "world"}
    # a re-run resumes (nothing to write); other settings are refused
    again = build_oracle(ControlConfig(kind="oracle", world=world, shards=str(rung), out=tmp_path / "oracle-100"))
    assert again["resumed_shards"] == 1 and again["num_written"] == 12


def test_oracle_rung_with_five_true_captions_per_image(world, tmp_path):
    from world.oracle import load_truth, score_caption

    rung = _rung(world, tmp_path / "datacomp-100", 12)
    truth = load_truth(world)
    out = tmp_path / "oracle5-100"
    summary = build_oracle(ControlConfig(kind="oracle", world=world, shards=str(rung), out=out, num_captions=5))
    assert summary["reconciled"] and summary["num_written"] == 12
    samples = list(iter_samples([str(out / "00003.tar")]))
    assert [s.uid for s in samples] == [s.uid for s in iter_samples([str(rung / "00003.tar")])]
    styles = set()
    for s in samples:
        captions = s.meta["captions"]
        assert len(captions) == 5 == len(set(captions)) and s.text == captions[0]
        assert s.syn_text is None and s.meta["caption_source"] == "oracle"
        for caption in captions:  # every one true: no wrong fact, no object that is not there
            scored = score_caption(truth[s.uid], caption)
            assert scored["fact_precision"] == 1.0 and scored["num_hallucinated"] == 0, (caption, scored)
            assert scored["object_recall"] == 1.0  # every annotator style names every group
        styles.add(len({len(c.split()) for c in captions}) > 1)  # of varying detail
    assert styles == {True}
    # the captions are a function of the uid: a rebuild writes the same bytes
    again = build_oracle(ControlConfig(kind="oracle", world=world, shards=str(rung), out=tmp_path / "again",
                                       num_captions=5))
    assert again["num_written"] == 12
    assert (tmp_path / "again" / "00003.tar").read_bytes() == (out / "00003.tar").read_bytes()
    # another caption count is another rung: refused in the same folder
    from base.cli import UsageError

    with pytest.raises(UsageError):
        build_oracle(ControlConfig(kind="oracle", world=world, shards=str(rung), out=out, num_captions=3))
    one = json.loads((tmp_path / "again" / "config.json").read_text())["identity"]
    assert one["num_captions"] == 5
    with pytest.raises(ValueError, match="num_captions"):
        ControlConfig(kind="shapes", world=world, shards=str(rung), out=tmp_path / "x", num_captions=5)
    with pytest.raises(ValueError, match="num_captions"):
        ControlConfig(kind="oracle", world=world, shards=str(rung), out=tmp_path / "x", num_captions=0)


def test_shapes_rung_names_only_each_images_shapes_and_counts(world, tmp_path, capsys):
    from collections import Counter

    from qcap.cli import main as qcap
    from world.oracle import load_truth
    from world.scenes import CLASSES, COLOURS

    rung = _rung(world, tmp_path / "datacomp-100", 12)
    truth = load_truth(world)
    out = tmp_path / "shapes-100"
    assert qcap(["control-rung", "--kind", "shapes", "--shards", str(rung), "--world", str(world), "--out", str(out)]) == 0
    assert "shapes control rung, 12 samples (reconciled with 12)" in capsys.readouterr().out
    samples = list(iter_samples([str(out / "00003.tar")]))
    assert [s.uid for s in samples] == [s.uid for s in iter_samples([str(rung / "00003.tar")])]
    for s in samples:
        counts = Counter(o["cls"] for o in truth[s.uid]["objects"])
        parts = s.text.split(" and ")
        assert len(parts) == len(counts)  # one part per class present, in alphabetical order
        named = [next(c for c in sorted(CLASSES, key=len, reverse=True) if c in part) for part in parts]
        assert named == sorted(counts)
        for part, cls in zip(parts, named, strict=True):
            n = counts[cls]
            assert part.startswith(("an " if cls[0] in "aeiou" else "a ") if n == 1 else ("two ", "three ", "four "))
        assert not any(colour in s.text.split() for colour in COLOURS)  # no colour, nothing but shapes
        assert s.syn_text is None and s.meta["caption_source"] == "shapes"
    assert json.loads((out / "summary.json").read_text())["kind"] == "shapes"
    # an oracle rung's folder is not silently turned into a shapes rung
    build_oracle(ControlConfig(kind="oracle", world=world, shards=str(rung), out=tmp_path / "oracle-100"))
    assert qcap(["control-rung", "--kind", "shapes", "--shards", str(rung), "--world", str(world),
                 "--out", str(tmp_path / "oracle-100")]) == 2


def test_clean_rung_matches_the_like_rungs_size(world, tmp_path):
    rung = _rung(world, tmp_path / "datacomp-100", 10)
    summary = build_clean(ControlConfig(kind="clean", world=world, like=str(rung), out=tmp_path / "clean-100"))
    assert summary["reconciled"] and summary["num_written"] == 10
    clean = {s.uid: s for s in iter_samples([str(p) for p in sorted((world / "clean").glob("*.tar"))])}
    out = list(iter_samples([str(p) for p in sorted((tmp_path / "clean-100").glob("*.tar"))]))
    assert len(out) == 10
    for s in out:
        assert s.text == clean[s.uid].text and len(s.meta["captions"]) >= 2  # the human captions ride along
    # the rung is subset's work: the folder's two run records are subset's, the rung's own inside each
    saved = json.loads((tmp_path / "clean-100" / "config.json").read_text())
    recorded = json.loads((tmp_path / "clean-100" / "summary.json").read_text())
    assert saved["stage"] == "subset" and saved["control"]["stage"] == "control-rung"
    assert saved["control"]["identity"]["kind"] == "clean" and saved["control"]["config"]["like"] == str(rung)
    assert recorded["num_written"] == 10 and recorded["control"]["num_available"] == 30
    assert not (tmp_path / "clean-100" / "control.json").exists()


def _files(folder: Path) -> dict[str, tuple[int | None, bytes]]:
    """Each file's bytes, and a shard file's modification time (a shard redone changes it)."""
    return {p.name: (p.stat().st_mtime_ns if p.name[0].isdigit() else None, p.read_bytes())
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_rungs_written_with_the_old_record_names_resume_and_refuse_as_before(world, tmp_path):
    """Rungs from before the shared names (control.json, control_summary.json; a clean rung's subset.json and
    subset_summary.json beside them): resumed with nothing redone or removed; other settings still refused."""
    from base.cli import UsageError

    rung = _rung(world, tmp_path / "datacomp-100", 10)
    oracle = ControlConfig(kind="oracle", world=world, shards=str(rung), out=tmp_path / "oracle-100")
    clean = ControlConfig(kind="clean", world=world, like=str(rung), out=tmp_path / "clean-100")
    build_oracle(oracle)
    build_clean(clean)
    for cfg in (oracle, clean):
        config, summary = (json.loads((cfg.out / name).read_text()) for name in ("config.json", "summary.json"))
        control = config.pop("control", None)
        summary.pop("control", None)
        if control is not None:  # the clean rung: subset's own records, the rung's beside them
            (cfg.out / "subset.json").write_text(json.dumps(config))
            (cfg.out / "subset_summary.json").write_text(json.dumps(summary))
            config = {"config": control["config"], "identity": control["identity"]}
        (cfg.out / "control.json").write_text(json.dumps({**config, "summary": summary}))
        (cfg.out / "control_summary.json").write_text(json.dumps(summary))
        (cfg.out / "config.json").unlink()
        (cfg.out / "summary.json").unlink()
    before = {cfg.out: _files(cfg.out) for cfg in (oracle, clean)}
    assert build_oracle(oracle)["resumed_shards"] == 1
    assert build_clean(clean)["num_written"] == 10
    for cfg in (oracle, clean):
        after = _files(cfg.out)
        assert {k: v for k, v in after.items() if k not in ("config.json", "summary.json")} == before[cfg.out]
        assert json.loads((cfg.out / "summary.json").read_text())["num_written"] == 10
    with pytest.raises(UsageError, match="seed: 0 -> 1"):
        build_clean(ControlConfig(kind="clean", world=world, like=str(rung), seed=1, out=clean.out))


def test_overwrite_replaces_a_rung_of_the_other_kind_and_keeps_the_users_files(world, tmp_path):
    """A clean rung's records are subset's, an oracle rung's control-rung's: --overwrite removes either (one stage
    wrote both); a user's README.md, notes and other stages' folders are refused or left alone."""
    from base.cli import UsageError

    rung = _rung(world, tmp_path / "datacomp-100", 6)
    out = tmp_path / "rung"
    oracle = ControlConfig(kind="oracle", world=world, shards=str(rung), out=out)
    clean = ControlConfig(kind="clean", world=world, num_samples=4, out=out)
    build_oracle(oracle)
    (out / "README.md").write_text("mine")
    with pytest.raises(UsageError, match="other inputs or settings"):
        build_clean(clean)
    clean.overwrite = True
    assert build_clean(clean)["num_written"] == 4 and not (out / "00003.tar").exists()  # the oracle's shard went
    oracle.overwrite = True
    assert build_oracle(oracle)["num_written"] == 6 and not (out / "uids.npy").exists()
    assert (out / "README.md").read_text() == "mine"
    from curate.subset import SubsetConfig, subset

    plain = tmp_path / "sub"  # a plain subset folder is no rung, --overwrite or not
    assert subset(SubsetConfig(shards=str(rung), out=plain, num_samples=2, card=False, progress=False))["reconciled"]
    with pytest.raises(UsageError, match="qcap subset's output"):
        build_oracle(ControlConfig(kind="oracle", world=world, shards=str(rung), out=plain, overwrite=True))
    assert len(list(plain.glob("*.tar"))) == 1


def test_cli_errors_are_one_line(world, tmp_path):
    # an image whose uid the world does not know: the oracle cannot caption it
    stranger = tmp_path / "stranger"
    with ShardWriter(stranger, 0) as writer:
        writer.write(Sample(key="0", uid=make_uid(99), image=make_jpeg(), text="hello"))
    finalize_folder(stranger)
    result = subprocess.run([QCAP, "control-rung", "--kind", "oracle", "--world", str(world), "--shards", str(stranger),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "not in" in result.stderr and "truth.parquet" in result.stderr and "Traceback" not in result.stderr
    # more clean samples asked than the split holds
    result = subprocess.run([QCAP, "control-rung", "--kind", "clean", "--world", str(world), "--num-samples", "31",
                             "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "holds 30 samples, 31 asked" in result.stderr, result.stderr
    result = subprocess.run([QCAP, "control-rung", "--kind", "clean", "--world", str(world), "--shards", "x",
                             "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].endswith("--kind clean reads the world's clean split; give --like or --num-samples")
