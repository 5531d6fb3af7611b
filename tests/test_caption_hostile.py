"""``qcap caption`` on hostile input: each bad sample is a per-sample status counted in the
summary (which reconciles with the input) and the job goes on; an error inside Ray is one
line; a Hugging Face folder that asks for remote code is refused without a prompt; and
``--overwrite`` removes only what caption wrote.

Real Ray (one local cluster for the module), real shards damaged with tarfile, the tiny CoCa,
the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import make_uid
from test_caption_job import coca_dir, ray_address, run_cli, write_shards  # noqa: F401 - fixtures
from test_train_hostile import rewrite_members

from base.shards import iter_samples, read_tables
from captioning import job

QCAP = Path(sys.executable).parent / "qcap"
ROOT = Path(__file__).resolve().parents[1]


def hostile_shards(folder: Path) -> Path:
    """Shards 0 and 2 good; shard 1: one good sample, then a duplicate uid, a KEY.json that is
    a list, a missing image, undecodable bytes, a malformed uid."""
    write_shards(folder, [3, 6, 2], broken={(1, 4)})
    key = "00001{:04d}".format
    meta = json.loads(tarfile.open(folder / "00001.tar").extractfile(f"{key(1)}.json").read())
    rewrite_members(folder / "00001.tar", {
        f"{key(1)}.json": json.dumps({**meta, "uid": make_uid(3)}).encode(),  # shard 1's first uid again
        f"{key(2)}.json": b"[1, 2, 3]",
        f"{key(3)}.jpg": None,
        f"{key(5)}.json": json.dumps({**meta, "uid": "NOT-A-UID"}).encode(),
    })
    return folder


def test_bad_samples_are_statuses_and_every_shard_is_written(tmp_path, ray_address, coca_dir, capsys):  # noqa: F811
    shards = hostile_shards(tmp_path / "curated")
    out = tmp_path / "syn"
    argv = ["caption", "--shards", str(shards), "--out", str(out), "--checkpoint", str(coca_dir),
            "--num-captions", "2", "--batch-size", "4", "--num-workers", "1", "--ray-address", ray_address,
            "--no-progress"]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.glob("*.done")) == ["00000.done", "00001.done", "00002.done"]
    summary = json.loads((out / job.SUMMARY_FILE).read_text())
    assert summary["images_in"] == 11 and summary["images_captioned"] == 6
    assert summary["images_failed"] == {"bad_json": 1, "bad_uid": 1, "decode_error": 1, "duplicate_uid": 1,
                                        "no_image": 1}
    assert summary["reconciled"] and summary["captions"] == 12 and not summary["failed_shards"]
    assert "counts reconcile: yes" in stdout
    table = read_tables(sorted(str(p) for p in out.glob("*.tar")))
    rows = table.to_pylist()
    assert len(rows) == 11 and len({row["key"] for row in rows}) == 11  # every input sample once
    by_status = {row["status"]: row for row in rows if row["status"] != "success"}
    assert "NOT-A-UID" in by_status["bad_uid"]["error_message"] and by_status["bad_uid"]["uid"] is None
    assert make_uid(3) in by_status["duplicate_uid"]["error_message"]
    written = [s.uid for s in iter_samples(str(out))]
    assert len(written) == len(set(written)) == 6  # a uid appears once

    # --overwrite (other settings start over, what caption did not write stays) costs two more Ray runs:
    # test_overwrite_foreign.py::test_caption in make test-all; the stage kit's --overwrite is fast in test_stage_kit.py


def test_overwrite_refuses_a_folder_of_shards_caption_did_not_write(tmp_path, coca_dir, capsys):  # noqa: F811
    shards = write_shards(tmp_path / "curated", [1])
    foreign = write_shards(tmp_path / "foreign", [2])  # someone's shards, no config.json
    code, _, stderr = run_cli(["caption", "--shards", str(shards), "--out", str(foreign), "--checkpoint",
                               str(coca_dir), "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "qcap caption did not write them" in stderr
    assert (foreign / "00000.tar").is_file() and (foreign / "00000.done").is_file()


def test_an_error_inside_ray_is_one_line(ray_address):  # noqa: F811
    import ray

    from base.raykit import clean_error
    from base.shards import ShardError

    @ray.remote(max_retries=0)
    def read_bad():
        raise ShardError("shard 00007.tar: KEY.json is not valid JSON")

    with pytest.raises(ShardError) as info:
        ray.get(read_bad.remote())
    assert len(str(info.value).splitlines()) > 3  # Ray's own message: the remote traceback
    clean = clean_error(info.value)
    assert type(clean) is ShardError and str(clean) == "shard 00007.tar: KEY.json is not valid JSON"
    assert clean_error(RuntimeError("a bug")) is None


def test_a_hugging_face_folder_asking_for_remote_code_is_refused_without_a_prompt(tmp_path):
    from test_caption_hf import tiny_hf_captioner

    model = tiny_hf_captioner(tmp_path / "blip", "blip")
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (model / "configuration_evil.py").write_text(code + "from transformers import PretrainedConfig\n"
                                                 "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (model / "modeling_evil.py").write_text(code)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForImageTextToText": "modeling_evil.EvilModel",
                                               "AutoProcessor": "modeling_evil.EvilProcessor"})
    (model / "config.json").write_text(json.dumps(config))
    shards = write_shards(tmp_path / "curated", [1])
    proc = subprocess.run(
        [str(QCAP), "caption", "--shards", str(shards), "--out", str(tmp_path / "syn"), "--backend", "hf",
         "--model", str(model), "--no-progress"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=300,
        env={**os.environ, "QCAP_LOG_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "trust_remote_code" in lines[0] and str(model) in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "syn" / "00000.done").exists()
