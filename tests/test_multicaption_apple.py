"""Several captioners per image as Apple lays them out (one ``syn.json`` with ``syn_text`` and
``syn_text_<suffix>`` keys) and as qcap does (``syn_tags.json``/``qcap_tags.json``): read and
written back intact by the shard layer, seen by ``base.multicaption``, and all dropped by
``qcap subset --captions real`` together with the reinforcement members."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from conftest import make_jpeg, make_uid

from base.multicaption import TAGS_MEMBER, TAGS_PROVENANCE_MEMBER, all_captions, encode_tags, tagged_captions
from base.shards import Sample, ShardWriter, finalize_folder, iter_samples

APPLE_SYN = {"syn_text": ["first a", "first b"], "syn_text_dfn_mscoco38k": ["dfn a", "dfn b", "dfn c"],
             "syn_text_coco": ["coco a"]}


def write_apple_tar(path: Path) -> Path:
    """A tar as Apple's multi-captioner generator writes it (tarfile: not our writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for index in range(2):
            members = {"jpg": make_jpeg(24, 16, seed=index), "syn.json": json.dumps(APPLE_SYN).encode(),
                       "json": json.dumps({"uid": make_uid(index)}).encode(), "txt": f"web {index}".encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{index:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_apples_multi_captioner_syn_json_survives_read_and_write(tmp_path):
    tar = write_apple_tar(tmp_path / "apple" / "00000000.tar")
    samples = list(iter_samples([str(tar)]))
    assert [s.status for s in samples] == ["success", "success"]
    first = samples[0]
    assert first.syn_text == APPLE_SYN["syn_text"]
    assert tagged_captions(first) == {"syn_text_coco": ["coco a"], "syn_text_dfn_mscoco38k": ["dfn a", "dfn b", "dfn c"]}
    assert list(all_captions(first)) == ["syn_text", "syn_text_coco", "syn_text_dfn_mscoco38k"]
    # written by ShardWriter and read back: the same syn.json keys and captions
    with ShardWriter(tmp_path / "copy", 0) as writer:
        for sample in samples:
            writer.write(sample)
    finalize_folder(tmp_path / "copy")
    with tarfile.open(tmp_path / "copy" / "00000.tar") as copied:
        stored = json.loads(copied.extractfile(f"{samples[0].key}.syn.json").read())
    assert stored == APPLE_SYN
    again = list(iter_samples(str(tmp_path / "copy")))
    assert [all_captions(s) for s in again] == [all_captions(s) for s in samples]
    # qcap's tagged member adds to Apple's keys (qcap's wins on the same key)
    mixed = Sample(key="k", syn_text=["x"], syn_keys={"syn_text_coco": ["old"]},
                   extras={TAGS_MEMBER: encode_tags({"syn_text_coco": ["new"], "syn_text_blip": ["b"]})})
    assert tagged_captions(mixed) == {"syn_text_coco": ["new"], "syn_text_blip": ["b"]}


def test_a_syn_json_without_any_caption_list_is_still_bad_json(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for ext, data in {"jpg": make_jpeg(8, 8), "syn.json": json.dumps({"syn_text_x": "not a list"}).encode(),
                          "json": b"{}"}.items():
            info = tarfile.TarInfo(f"a.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = iter_samples([str(path)])
    assert sample.status == "bad_json" and "lacks the list 'syn_text'" in sample.error_message


def test_subset_real_captions_drops_every_synthetic_and_reinforcement_member(tmp_path, capsys):
    from qcap.cli import main

    folder = tmp_path / "dr"
    with ShardWriter(folder, 0) as writer:
        for number in range(6):
            writer.write(Sample(
                key=f"{number:09d}", uid=make_uid(number), image=make_jpeg(24, 16, seed=number), text=f"real {number}",
                syn_text=["a", "b"], syn_keys={"syn_text_dfn": ["d"]}, syn_provenance={"captioner": {}},
                meta={"num_syn": 2},
                extras={TAGS_MEMBER: encode_tags({"syn_text_coco": ["c"]}),
                        TAGS_PROVENANCE_MEMBER: json.dumps({"syn_text_coco": {}}).encode(),
                        "npz": b"n", "pth.gz": b"p", "paug.json": b"{}", "reinforce.json": b"{}",
                        "url.txt": b"http://example.com/x.jpg"}))
    finalize_folder(folder)
    out = tmp_path / "real"
    code = main(["subset", "--shards", str(folder), "--out", str(out), "--fraction", "1", "--captions", "real",
                 "--no-progress", "--no-card"])
    stdout = capsys.readouterr().out
    assert code == 0 and "counts reconcile: yes" in stdout, stdout
    written = list(iter_samples(str(out)))
    assert len(written) == 6
    for sample in written:
        assert sample.syn_text is None and sample.syn_keys is None and sample.syn_provenance is None
        assert set(sample.extras) == {"url.txt"} and all_captions(sample) == {}
        assert sample.text.startswith("real ") and sample.image is not None
    with tarfile.open(out / "00000.tar") as tar:
        assert not [name for name in tar.getnames() if name.endswith(".syn.json")]
