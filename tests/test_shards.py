"""The shard module: round trips, interop with img2dataset/webdataset/datasets, atomicity, uids."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_jpeg, make_uid

from base import shards
from base.shards import Sample, ShardError, ShardWriter


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image_emb=np.arange(4, dtype=np.float32), text_emb=np.ones((2, 4), dtype=np.float32))
    return buffer.getvalue()


def _samples(n: int, *, fail_every: int = 0, uniform: bool = False) -> list[Sample]:
    """Samples; ``uniform`` gives every sample the same members (HF datasets needs that)."""
    out = []
    for i in range(n):
        if fail_every and i % fail_every == fail_every - 1:
            out.append(
                Sample(key=f"{i:09d}", uid=make_uid(i), status="http_404", error_message="HTTP Error 404", meta={"url": f"http://x/{i}.jpg"})
            )
        else:
            out.append(
                Sample(
                    key=f"{i:09d}",
                    uid=make_uid(i),
                    image=make_jpeg(seed=i),
                    text=f"caption number {i} ünïcode",
                    syn_text=[f"syn {i} a", f"syn {i} b"] if uniform or i % 2 == 0 else None,
                    syn_provenance={"captioner": "tiny", "seed": i} if uniform or i % 2 == 0 else None,
                    meta={"url": f"http://x/{i}.jpg", "width": 32, "height": 24, "sha256": "0" * 64},
                    extras={"npz": _npz()} if uniform or i == 0 else {},
                )
            )
    return out


def test_round_trip_keeps_every_field_and_failures_only_in_parquet(tmp_path):
    samples = _samples(10, fail_every=4)
    with ShardWriter(tmp_path, 3) as writer:
        writer.write_all(samples)
    sizes = shards.finalize_folder(tmp_path)

    ok = [s for s in samples if s.ok]
    assert sizes == {"00003.tar": len(ok)}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00003.tar": len(ok)}
    assert shards.is_complete(tmp_path, 3) and shards.completed_shards(tmp_path) == {3}

    back = list(shards.iter_samples(str(tmp_path)))
    assert [s.key for s in back] == [s.key for s in ok]
    for want, got in zip(ok, back, strict=True):
        assert got.uid == want.uid
        assert got.image == want.image and got.image_ext == "jpg"
        assert got.text == want.text
        assert got.syn_text == want.syn_text
        assert got.syn_provenance == want.syn_provenance
        assert got.extras == want.extras
        assert got.meta["url"] == want.meta["url"] and got.meta["uid"] == want.uid

    table = shards.read_table(str(tmp_path / "00003.tar"))
    rows = table.to_pylist()
    assert len(rows) == len(samples)  # failures are rows too
    failed = [r for r in rows if r["status"] != "success"]
    assert [r["key"] for r in failed] == [s.key for s in samples if not s.ok]
    assert all(r["error_message"] == "HTTP Error 404" for r in failed)
    assert table.schema.names[:4] == ["key", "uid", "status", "error_message"]
    stats = json.loads((tmp_path / "00003_stats.json").read_text())
    assert stats["count"] == 10 and stats["successes"] == len(ok)
    assert stats["status_dict"] == {"success": len(ok), "http_404": 10 - len(ok)}


def test_writer_output_is_deterministic(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, 0) as writer:
            writer.write_all(_samples(5))
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()
    assert (tmp_path / "a/00000.parquet").read_bytes() == (tmp_path / "b/00000.parquet").read_bytes()


def test_our_shard_reads_in_webdataset_and_hf_datasets(tmp_path):
    import webdataset as wds
    from datasets import load_dataset

    samples = _samples(6, uniform=True)
    with ShardWriter(tmp_path, 0) as writer:
        writer.write_all(samples)
    shards.finalize_folder(tmp_path)
    tar = str(tmp_path / "00000.tar")

    got = list(wds.WebDataset(tar, shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    assert got[0]["jpg"] == samples[0].image
    assert got[0]["txt"].decode() == samples[0].text
    assert json.loads(got[0]["syn.json"]) == {"syn_text": samples[0].syn_text}

    cache = str(tmp_path / "hf-cache")
    web = load_dataset("webdataset", data_files={"train": tar}, split="train", cache_dir=cache)
    assert len(web) == len(samples)
    assert web[1]["txt"] == samples[1].text
    assert web[2]["syn.json"]["syn_text"] == samples[2].syn_text
    assert web[0]["jpg"].size == (32, 24)
    assert list(web[3]["npz"]["image_emb"]) == [0, 1, 2, 3]
    par = load_dataset("parquet", data_files={"train": str(tmp_path / "00000.parquet")}, split="train", cache_dir=cache)
    assert par["uid"] == [s.uid for s in samples]


def test_reads_a_shard_written_by_real_img2dataset(tmp_path, http_dir):
    import pandas as pd
    from img2dataset import download

    folder, base = http_dir
    rows = []
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(make_jpeg(40 + i, 30, seed=i))
        rows.append({"url": f"{base}/{i}.jpg", "caption": f"image {i}", "uid": make_uid(i)})
    rows.append({"url": f"{base}/missing.jpg", "caption": "gone", "uid": make_uid(99)})
    pd.DataFrame(rows).to_parquet(tmp_path / "urls.parquet")
    out = tmp_path / "raw"
    download(
        url_list=str(tmp_path / "urls.parquet"),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid"],
        output_format="webdataset",
        output_folder=str(out),
        processes_count=1,
        thread_count=4,
        image_size=16,
        resize_mode="keep_ratio_largest",
        distributor="multiprocessing",
        enable_wandb=False,
        timeout=5,
        retries=0,
    )
    tars = shards.expand_shards(str(out))
    assert [os.path.basename(t) for t in tars] == ["00000.tar"]
    got = list(shards.iter_samples(tars))
    assert sorted(s.uid for s in got) == sorted(make_uid(i) for i in range(5))
    assert all(s.text.startswith("image ") and s.image and s.ok for s in got)
    table = shards.read_table(tars[0])
    statuses = dict(zip(table.column("uid").to_pylist(), table.column("status").to_pylist(), strict=True))
    assert statuses[make_uid(99)] == "failed_to_download"
    stats = shards.read_shard_stats(tars[0])  # img2dataset's own _stats.json
    assert (stats["count"], stats["successes"]) == (6, 5)
    assert shards.finalize_folder(out) == {"00000.tar": 5}
    assert shards.num_samples(f"{out}/{{00000..00000}}.tar") == 5


def test_expand_shards_forms(tmp_path):
    for i in range(3):
        with ShardWriter(tmp_path, i) as writer:
            writer.write_all(_samples(2))
    shards.finalize_folder(tmp_path)
    names = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert shards.expand_shards(f"{tmp_path}/{{00000..00002}}.tar") == names
    assert shards.expand_shards(str(tmp_path)) == names
    assert shards.expand_shards(f"{tmp_path}/*.tar") == names
    assert shards.expand_shards(f"{names[0]}::{names[2]}") == [names[0], names[2]]
    assert shards.expand_shards(f"file://{tmp_path}/{{00001..00001}}.tar") == [names[1]]  # local URLs normalise
    assert shards.num_samples(str(tmp_path)) == 6
    assert len(list(shards.iter_samples(f"file://{tmp_path}/00001.tar"))) == 2


def test_fsspec_url_folder_round_trip():
    """A folder that is an fsspec URL (an object store's stand-in: fsspec's in-memory
    filesystem) is written, finalized, listed and read like a local one."""
    import fsspec

    root = f"memory://qcap-test-{os.getpid()}/raw"
    memory = fsspec.filesystem("memory")
    try:
        for shard_id in range(2):
            with ShardWriter(root, shard_id) as writer:
                writer.write_all(_samples(4, fail_every=4))
        assert shards.finalize_folder(root) == {"00000.tar": 3, "00001.tar": 3}
        names = [f"memory:///qcap-test-{os.getpid()}/raw/{i:05d}.tar" for i in range(2)]
        assert shards.expand_shards(f"{root}/{{00000..00001}}.tar") == names
        assert shards.expand_shards(root) == shards.expand_shards(f"{root}/*.tar") == names
        assert shards.completed_shards(root) == {0, 1} and shards.num_samples(root) == 6
        assert [s.text for s in shards.iter_samples(root)] == [s.text for s in _samples(4, fail_every=4) if s.ok] * 2
        assert shards.read_tables(root).num_rows == 8
        assert not [p for p in memory.ls(root, detail=False) if ".tmp-" in p]
        shards.save_uids(f"{root}/uids.npy", [make_uid(1)])
        assert memory.cat(f"{root}/uids.npy")[:6] == b"\x93NUMPY"
        assert not os.path.exists("memory:"), "an fsspec URL must not create a local folder"
    finally:
        memory.rm(f"/qcap-test-{os.getpid()}", recursive=True)


def test_uid_npy_is_byte_identical_to_datacomps(tmp_path):
    uids = [make_uid(i) for i in range(50)] + ["ffffffffffffffff0000000000000000", "0" * 32]
    # DataComp's own construction (baselines/utils.py, resharder.py)
    reference = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    reference.sort()
    np.save(tmp_path / "ref.npy", reference)
    assert shards.save_uids(tmp_path / "ours.npy", reversed(uids)) == len(uids)
    assert (tmp_path / "ours.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    loaded = shards.load_uids(tmp_path / "ours.npy")
    assert shards.array_to_uids(loaded) == sorted(uids)
    mask = shards.uid_membership([uids[3], make_uid(1000), "0" * 32], loaded)
    assert mask.tolist() == [True, False, True]


def test_uid_file_contract_violations(tmp_path):
    np.save(tmp_path / "wrong_dtype.npy", np.arange(4, dtype=np.uint64))
    with pytest.raises(ShardError, match="wrong_dtype.npy.*dtype"):
        shards.load_uids(tmp_path / "wrong_dtype.npy")
    unsorted = np.array([(2, 0), (1, 0)], dtype=shards.UID_DTYPE)
    np.save(tmp_path / "unsorted.npy", unsorted)
    with pytest.raises(ShardError, match="unsorted.npy.*not sorted"):
        shards.load_uids(tmp_path / "unsorted.npy")
    with pytest.raises(ShardError, match="not 32 lowercase hex"):
        shards.uids_to_array(["xyz"])


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import make_jpeg, make_uid
    from base.shards import Sample, ShardWriter, is_complete
    out = sys.argv[1]
    if is_complete(out, 0):
        print("skipped", flush=True)
        sys.exit(0)
    with ShardWriter(out, 0) as writer:
        for i in range(40):
            writer.write(Sample(key=f"{{i:09d}}", uid=make_uid(i), image=make_jpeg(seed=i), text=str(i)))
            if i == 5:
                print("writing", flush=True)
            time.sleep(float(sys.argv[2]))
    print("done", flush=True)
    """
)


def test_writer_killed_mid_shard_leaves_nothing_visible_and_rerun_completes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_SLOW_WRITER.format(tests=os.path.dirname(__file__)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.05"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == []  # only hidden temporaries remain
    with pytest.raises(ShardError, match="matches no shard|holds no shard"):
        shards.expand_shards(str(out))

    done = subprocess.run([sys.executable, str(script), str(out), "0"], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("done")
    assert len(list(shards.iter_samples(str(out)))) == 40
    assert sorted(p.name for p in out.iterdir()) == ["00000.done", "00000.parquet", "00000.tar", "00000_stats.json"]
    again = subprocess.run([sys.executable, str(script), str(out), "0"], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == "skipped"


def test_move_shard_replaces_a_shard_and_finishes_after_an_interruption(tmp_path):
    live, staged = tmp_path / "live", tmp_path / "staged"
    for folder, n in ((live, 3), (staged, 5)):
        with ShardWriter(folder, 7) as writer:
            writer.write_all(_samples(n))
    new = {name: (staged / f"00007{name}").read_bytes() for name in shards.SHARD_FILE_SUFFIXES}
    # a move killed after the first rename: live's marker gone, Parquet already new, tar old
    (live / "00007.done").unlink()
    (staged / "00007.parquet").replace(live / "00007.parquet")
    assert not shards.is_complete(live, 7)
    shards.move_shard(staged, live, 7)  # the same call finishes it
    assert shards.is_complete(live, 7) and not shards.is_complete(staged, 7)
    assert {name: (live / f"00007{name}").read_bytes() for name in shards.SHARD_FILE_SUFFIXES} == new
    assert len(list(shards.iter_samples(str(live)))) == 5 and list(staged.iterdir()) == []
    with pytest.raises(ShardError, match="no complete shard to move"):
        shards.move_shard(staged, live, 7)

    shards.remove_shard(live, 7)
    assert list(live.iterdir()) == []


def test_remove_unfinished_keeps_complete_shards_and_other_files(tmp_path):
    with ShardWriter(tmp_path, 0) as writer:
        writer.write_all(_samples(2))
    shards.finalize_folder(tmp_path)
    with ShardWriter(tmp_path, 1) as writer:
        writer.write_all(_samples(2))
    (tmp_path / "00001.done").unlink()  # as if killed before its marker
    killed = ShardWriter(tmp_path, 2)  # a writer killed mid-shard: only its hidden temporary exists
    killed.write(_samples(1)[0])
    (tmp_path / "notes.txt").write_text("mine")
    removed = shards.remove_unfinished(tmp_path)
    assert sorted(removed) == sorted(["00001.parquet", "00001.tar", "00001_stats.json", os.path.basename(killed._tmp_tar)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.done", "00000.parquet", "00000.tar", "00000_stats.json", "notes.txt", "sizes.json"]
    killed.abort()


def test_bad_input_errors_name_the_file(tmp_path):
    with ShardWriter(tmp_path, 0) as writer:
        writer.write_all(_samples(3))
    corrupt = tmp_path / "00001.tar"
    corrupt.write_bytes((tmp_path / "00000.tar").read_bytes()[:1500])
    with pytest.raises(ShardError, match="00001.tar"):
        list(shards.iter_samples([str(corrupt)]))
    garbage = tmp_path / "00002.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="00002.tar"):
        list(shards.iter_samples([str(garbage)]))

    no_uid = tmp_path / "nouid"
    no_uid.mkdir()
    pq.write_table(shards.rows_to_table([{"key": "1", "status": "success"}]).drop(["uid"]), no_uid / "00000.parquet")
    with pytest.raises(ShardError, match="nouid/00000.parquet.*'uid'"):
        shards.read_table(str(no_uid / "00000.tar"))

    with pytest.raises(ShardError, match="matches no shard"):
        shards.expand_shards(f"{tmp_path}/nothing-*.tar")
    with pytest.raises(ShardError, match="00099.tar: no such shard"):
        shards.expand_shards(f"{tmp_path}/{{00099..00099}}.tar")
    with pytest.raises(ShardError, match="pool is missing column"):
        shards.read_pool(no_uid / "00000.parquet")
    with pytest.raises(ShardError, match="nope.parquet: no such pool file or folder"):
        shards.read_pool(tmp_path / "nope.parquet")
    with pytest.raises(ShardError, match="00002.tar: not a readable Parquet pool"):
        shards.read_pool(garbage)


def test_hostile_members_become_sample_statuses_and_are_never_followed(tmp_path):
    evil = tmp_path / "00000.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../etc/owned.txt")
        data = b"x"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (sample,) = shards.iter_samples([str(evil)])
    assert sample.status == shards.BAD_MEMBER and "unsafe path" in sample.error_message and not sample.ok
    assert sample.text is None  # the member's data is never read
    with pytest.raises(ShardError, match="unsafe path"):  # the low-level member reader stays strict
        list(shards.iter_members(str(evil)))

    big = tmp_path / "00001.tar"
    with tarfile.open(big, "w") as tar:
        info = tarfile.TarInfo("k.jpg")
        info.size = 5000
        tar.addfile(info, io.BytesIO(b"\0" * 5000))
        link = tarfile.TarInfo("k.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    (sample,) = shards.iter_samples([str(big)], max_member_bytes=1000)
    assert sample.status == shards.BAD_MEMBER and "over the 1000 limit" in sample.error_message
    assert sample.image is None
    (sample,) = shards.iter_samples([str(big)])
    assert sample.ok and sample.text is None  # the symlink was skipped, never followed


def test_decode_image_refuses_bombs_before_decoding():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="exceeds"):
        shards.decode_image(buffer.getvalue(), max_pixels=1_000_000)
    with pytest.raises(ValueError, match="undecodable"):
        shards.decode_image(b"not an image")
    assert shards.decode_image(make_jpeg(10, 8)).size == (10, 8)
    # draft: a JPEG decodes at a reduced scale that keeps both sides >= the requested size
    big = make_jpeg(512, 384)
    assert shards.decode_image(big, draft=64).size == (128, 96)
    assert shards.decode_image(big, draft=150).size == (256, 192)
    assert shards.decode_image(big, draft=200).size == (512, 384)
    assert shards.decode_image(buffer.getvalue(), max_pixels=20_000_000, draft=64).size == (4000, 4000)  # PNG: full
    # a header past twice PIL's own limit makes Image.open raise; it must still be a ValueError
    from world.generate import _bomb

    with pytest.raises(ValueError, match="exceeds"):
        shards.decode_image(_bomb(make_uid(0)), max_pixels=10**12)


def test_writer_rejects_bad_samples(tmp_path):
    with ShardWriter(tmp_path, 0) as writer:
        writer.write(Sample(key="a", uid=make_uid(1), image=b"x"))
        with pytest.raises(ShardError, match="duplicate sample key"):
            writer.write(Sample(key="a", uid=make_uid(2), image=b"x"))
        with pytest.raises(ShardError, match="without '.'"):
            writer.write(Sample(key="a.b", uid=make_uid(3), image=b"x"))
        with pytest.raises(ShardError, match="not 32 lowercase hex"):
            writer.write(Sample(key="c", uid="nope", image=b"x"))
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 1) as writer:
        writer.write(Sample(key="a", uid=make_uid(1), image=b"x"))
        raise RuntimeError("boom")
    assert not (tmp_path / "00001.tar").exists() and not shards.is_complete(tmp_path, 1)
    assert not any(p.name.startswith(".00001") for p in tmp_path.iterdir())


def test_parquet_only_shard_is_written_like_a_shard(tmp_path):
    """A side table (qcap caption --format parquet): Parquet, stats and marker, no tar; the
    writer's key and uid rules; a killed writer's temporaries cleared; nothing visible on bad rows."""
    import pyarrow as pa

    schema = pa.schema([("key", pa.string()), ("uid", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("score", pa.float64())])
    rows = [{"key": f"{i:09d}", "uid": make_uid(i), "status": "success" if i % 3 else "decode_error",
             "error_message": None if i % 3 else "bad jpeg", "score": 0.5 * i if i % 3 else None} for i in range(6)]
    (tmp_path / ".00002.parquet.tmp-0123456789ab").write_bytes(b"half a file")  # left by a killed writer
    stats = shards.write_parquet_shard(tmp_path, 2, rows, schema=schema, extra_stats={"num_input": 6})
    assert (stats.count, stats.successes, stats.status_counts) == (6, 4, {"decode_error": 2, "success": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00002.done", "00002.parquet", "00002_stats.json"]
    assert shards.is_complete(tmp_path, 2) and shards.remove_unfinished(tmp_path) == []
    table = shards.read_table(str(tmp_path / "00002.parquet"))
    assert table.schema == schema and table.to_pylist() == rows
    assert json.loads((tmp_path / "00002_stats.json").read_text()) == {
        "shard": "00002.parquet", "count": 6, "successes": 4, "failed": 2, "failed_to_download": 2,
        "failed_to_resize": 0, "status_dict": {"decode_error": 2, "success": 4}, "num_input": 6}
    # without a schema the columns are inferred, as ShardWriter's are
    shards.write_parquet_shard(tmp_path / "inferred", 0, rows[:1])
    assert shards.read_table(str(tmp_path / "inferred/00000.parquet")).schema.names == [*shards.BASE_COLUMNS, "score"]

    for bad, message in (({**rows[0], "key": "a.b"}, "without '.'"), ({**rows[0], "uid": "nope"}, "not 32 lowercase hex"),
                         ({**rows[0], "status": None}, "has no status")):
        with pytest.raises(ShardError, match=message):
            shards.write_parquet_shard(tmp_path, 3, [bad], schema=schema)
    with pytest.raises(ShardError, match="00003.parquet: duplicate sample key"):
        shards.write_parquet_shard(tmp_path, 3, [rows[0], rows[1], rows[0]], schema=schema)
    assert not shards.is_complete(tmp_path, 3) and not list(tmp_path.glob("*00003*"))


def test_shard_columns_reads_the_footer_and_names_a_bad_file(tmp_path):
    with ShardWriter(tmp_path, 0) as writer:
        writer.write_all(_samples(3, fail_every=3))
    want = shards.read_table(str(tmp_path / "00000.tar")).schema.names
    assert shards.shard_columns(str(tmp_path / "00000.tar")) == shards.shard_columns(tmp_path / "00000.parquet") == want
    assert want[:4] == list(shards.BASE_COLUMNS) and "url" in want
    with pytest.raises(ShardError, match="00001.parquet: missing"):
        shards.shard_columns(str(tmp_path / "00001.tar"))
    (tmp_path / "00002.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ShardError, match="00002.parquet: not a readable Parquet"):
        shards.shard_columns(str(tmp_path / "00002.tar"))
    with pytest.raises(ShardError, match="not a shard's .tar or .parquet"):
        shards.shard_columns(str(tmp_path / "sizes.json"))


def test_read_shard_stats_takes_the_tar_or_parquet_and_names_a_bad_file(tmp_path):
    with ShardWriter(tmp_path, 0) as writer:
        writer.write_all(_samples(4, fail_every=4))
        writer.close(extra_stats={"num_input": 4})
    want = json.loads((tmp_path / "00000_stats.json").read_text())
    assert shards.read_shard_stats(str(tmp_path / "00000.tar")) == shards.read_shard_stats(tmp_path / "00000.parquet") == want
    assert (want["count"], want["successes"], want["num_input"]) == (4, 3, 4)
    with pytest.raises(ShardError, match="00001_stats.json: missing"):
        shards.read_shard_stats(str(tmp_path / "00001.tar"))
    assert shards.read_shard_stats(str(tmp_path / "00001.tar"), missing_ok=True) is None
    (tmp_path / "00002_stats.json").write_text("{cut short")
    (tmp_path / "00003_stats.json").write_text("[1, 2]")
    for name, message in (("00002", "not valid JSON"), ("00003", "expected a JSON object")):
        with pytest.raises(ShardError, match=f"{name}_stats.json: {message}"):
            shards.read_shard_stats(str(tmp_path / f"{name}.tar"), missing_ok=True)
    # shard_size reads the stats, and counts the Parquet's successes when there are none
    assert shards.shard_size(str(tmp_path / "00000.tar")) == 3
    (tmp_path / "00000_stats.json").unlink()
    assert shards.shard_size(str(tmp_path / "00000.tar")) == 3


def test_uid_halves_mark_invalid_uids_and_split_the_rest():
    uids = [make_uid(3), None, "not-a-uid", make_uid(1).upper(), "ffffffffffffffff0000000000000001"]
    valid, hi, lo = shards.uid_halves(uids)
    assert valid.tolist() == [True, False, False, False, True]
    assert hi.dtype == lo.dtype == np.uint64 and len(hi) == len(lo) == 2
    assert [f"{int(a):016x}{int(b):016x}" for a, b in zip(hi, lo, strict=True)] == [uids[0], uids[4]]
    assert shards.is_uid(make_uid(0)) and not shards.is_uid(make_uid(0)[:31]) and not shards.is_uid(7)
    empty = shards.uid_halves([])
    assert [len(a) for a in empty] == [0, 0, 0]
    # in order, repeats kept; sorted and unique by default; a bad uid named in the error
    ordered = shards.uids_to_array([uids[4], uids[0], uids[4]], sort=False)
    assert shards.array_to_uids(ordered) == [uids[4], uids[0], uids[4]]
    assert shards.array_to_uids(shards.uids_to_array([uids[4], uids[0], uids[4]])) == [uids[0], uids[4]]
    with pytest.raises(shards.ShardError, match="not-a-uid"):
        shards.uids_to_array([uids[0], "not-a-uid"], sort=False)
