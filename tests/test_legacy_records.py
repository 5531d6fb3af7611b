"""Folders written before every stage named its run records config.json and summary.json: they
resume (no refusal, nothing redone or removed), are read, and are refused or overwritten as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_uid
from dr_data import write_images, write_qcap_captions

from base.cli import UsageError
from base.shards import save_uids
from base.stage import (
    CONFIG_FILE,
    LEGACY_RECORDS,
    SUMMARY_FILE,
    claim_output,
    read_run_record,
    run_record_path,
    write_run_records,
)

LAYOUT = [list(range(0, 12)), list(range(12, 20)), list(range(20, 30))]


def files(folder: Path) -> dict[str, tuple[int | None, bytes]]:
    """Every file under ``folder``: its bytes, and for a shard's files their modification time too (a shard
    redone changes it; sizes.json and the uid list are written again by every run, the same bytes)."""
    return {p.name: (p.stat().st_mtime_ns if p.name[0].isdigit() else None, p.read_bytes())
            for p in sorted(folder.iterdir()) if p.is_file()}


def to_legacy(out: Path, stage: str) -> None:
    """The folder as the stage left it before the shared names: its records under their old names."""
    names = LEGACY_RECORDS[stage]
    (out / CONFIG_FILE).rename(out / names["config"])
    (out / SUMMARY_FILE).rename(out / names["summary"])


def test_the_kit_reads_a_legacy_record_and_resumes_refuses_or_overwrites_by_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"a shard")  # the stage's shard: claimed by its legacy record
    (out / "subset.json").write_text(json.dumps({"stage": "subset", "identity": {"seed": 1}, "plan": [[0]]}))
    (out / "subset_summary.json").write_text(json.dumps({"num_written": 3}))
    assert run_record_path(out, "config", "subset") == out / "subset.json"
    assert read_run_record(out, "summary", "subset") == {"num_written": 3}
    assert run_record_path(out, "config", "reinforce") is None  # another stage's names are not this one's
    saved = claim_output(out, stage="subset", identity={"seed": 1}, overwrite=False, own_files=(CONFIG_FILE,))
    assert saved is not None and saved["plan"] == [[0]]  # resumed: the legacy record is the run's record
    with pytest.raises(UsageError, match=r"seed: 1 -> 2"):
        claim_output(out, stage="subset", identity={"seed": 2}, overwrite=False, own_files=(CONFIG_FILE,))
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "subset.json", "subset_summary.json"]
    # the shared names, once written, are read first; a config.json of another stage is not this one's
    write_run_records(out, summary={"num_written": 4})
    assert read_run_record(out, "summary", "subset") == {"num_written": 4}
    (out / CONFIG_FILE).write_text(json.dumps({"stage": "reinforce", "identity": {}}))
    assert run_record_path(out, "config", "subset") == out / "subset.json"
    assert run_record_path(out, "config", "reinforce") == out / CONFIG_FILE
    (out / CONFIG_FILE).unlink()
    # --overwrite removes the legacy records with the stage's other files, and only those
    (out / "notes.txt").write_text("mine")
    assert claim_output(out, stage="subset", identity={"seed": 2}, overwrite=True,
                        own_files=(CONFIG_FILE, SUMMARY_FILE)) is None
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_legacy_subset_folder_resumes_without_redoing_or_removing_anything(tmp_path):
    from curate.subset import SubsetConfig, subset

    images = write_images(tmp_path / "curated", LAYOUT)
    cfg = SubsetConfig(shards=str(images), out=tmp_path / "sub", fraction=0.5, seed=3, samples_per_shard=6,
                       progress=False, card=False)
    first = subset(cfg)
    to_legacy(cfg.out, "subset")
    before = files(cfg.out)
    again = subset(cfg)
    assert again["reconciled"] and again["resumed_shards"] == again["num_output_shards"] == first["num_output_shards"]
    assert again["num_written"] == first["num_written"]
    after = files(cfg.out)
    assert {k: v for k, v in after.items() if k != SUMMARY_FILE} == before  # no shard redone, nothing removed
    assert json.loads(after[SUMMARY_FILE][1])["num_written"] == first["num_written"]


def test_a_legacy_reshard_folder_resumes_without_redoing_or_removing_anything(tmp_path):
    from curate.reshard import ReshardConfig, reshard

    raw = write_images(tmp_path / "raw", LAYOUT)
    save_uids(tmp_path / "subset.npy", [make_uid(n) for n in range(0, 30, 3)])
    cfg = ReshardConfig(shards=str(raw), subset=tmp_path / "subset.npy", out=tmp_path / "curated",
                        samples_per_shard=4, progress=False)
    first = reshard(cfg)
    # reshard then wrote its identity in reshard.json, a config.json without it, and report.json
    config = json.loads((cfg.out / CONFIG_FILE).read_text())
    plan = {k: config.pop(k) for k in ("identity", "num_shards", "num_samples")}
    (cfg.out / "reshard.json").write_text(json.dumps({"config": config["config"], **plan}))
    (cfg.out / CONFIG_FILE).write_text(json.dumps(config))
    (cfg.out / SUMMARY_FILE).rename(cfg.out / "report.json")
    shards = {k: v for k, v in files(cfg.out).items() if k.startswith("0")}
    again = reshard(cfg)
    assert again["resumed_shards"] == first["num_output_shards"] and again["num_written"] == first["num_written"]
    after = files(cfg.out)
    assert {k: v for k, v in after.items() if k.startswith("0")} == shards
    assert {"reshard.json", "report.json", CONFIG_FILE, SUMMARY_FILE} <= set(after)


def test_a_finished_legacy_dr_folder_resumes_from_its_old_summary(tmp_path):
    from captioning.dr import BuildDRConfig, build
    from captioning.dr_sources import describe_caption_folder

    images = write_images(tmp_path / "curated", LAYOUT)
    captions = write_qcap_captions(tmp_path / "syn", [sum(LAYOUT[1:], []), LAYOUT[0]])
    assert describe_caption_folder(str(captions), "qcap-webdataset")["caption_config"]["stage"] == "caption"
    (captions / CONFIG_FILE).rename(captions / "caption_config.json")  # a caption folder from before: still read
    assert describe_caption_folder(str(captions), "qcap-webdataset")["caption_config"]["captioner"]
    cfg = BuildDRConfig(images=str(images), captions=str(captions), out=tmp_path / "dr", progress=False, card=False)
    first = build(cfg)
    assert first["reconciled"] and not (cfg.out / ".build-dr").exists()  # the join's work files are gone
    to_legacy(cfg.out, "build-dr")
    shards = {k: v for k, v in files(cfg.out).items() if k.startswith("0")}
    again = build(cfg)  # nothing pending: the join's counts come from build_dr_summary.json
    assert again["reconciled"] and again["join"] == first["join"] and again["images_kept"] == first["images_kept"]
    assert {k: v for k, v in files(cfg.out).items() if k.startswith("0")} == shards
    assert (cfg.out / "build_dr.json").is_file() and (cfg.out / SUMMARY_FILE).is_file()
