"""Hostile shard folders for the filter tests, built in tmp_path from real shards.

``hostile_folder(root)`` writes real JPEG shards with ``ShardWriter`` and then breaks them the
way a bad downloader, an overlapping re-download or a hand-edited folder does: tar members
rewritten with ``tarfile`` (a non-object ``KEY.json``, no ``KEY.json``, no image member,
non-UTF-8 and NUL-bearing captions, a pixel bomb, bytes that do not decode) and Parquet rows
rewritten with pyarrow (a malformed uid, a success without uid, a row the tar lacks). It returns
the folder and, per case, the (shard, key) of the row that carries it.

The checks of the helper itself are at the end.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import make_uid

from base.shards import Sample, ShardWriter, finalize_folder, read_tables


def make_image(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A real image whose content depends on ``seed`` (bands and a dot: distinct pHashes)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    draw = ImageDraw.Draw(image)
    w, h = size
    x = (seed * 13) % (w - 12)
    y = (seed * 7) % (h - 12)
    draw.rectangle((x, y, x + 11, y + 11), fill=(255 - (seed * 37) % 256, (seed * 17) % 256, 255))
    if seed % 2:
        draw.line((0, 0, w, h), fill=(0, 0, 0), width=3)
    else:
        draw.line((0, h, w, 0), fill=(255, 255, 255), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height pixels (PIL refuses it at open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _sample(index: int, uid: str, image: bytes, text: str | None, ext: str = "jpg") -> Sample:
    meta = {"text": text, "original_width": 400, "original_height": 300}
    return Sample(key=f"{index:09d}", uid=uid, image=image, image_ext=ext, text=text, meta=meta)


def rewrite_tar(tar: Path, edit) -> None:
    """Rewrite every member of ``tar`` through ``edit(name, data) -> list[(name, data)]``."""
    with tarfile.open(tar) as source:
        members = [(info.name, source.extractfile(info).read()) for info in source if info.isfile()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as target:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                target.addfile(info, io.BytesIO(new_data))
    tar.write_bytes(out.getvalue())


def rewrite_parquet(parquet: Path, edit) -> None:
    """Rewrite the rows of a shard's Parquet through ``edit(rows) -> rows`` (the schema kept, uid as string)."""
    table = pq.read_table(parquet)
    rows = edit(table.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), parquet)


def hostile_folder(root: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Three shards: clean samples, duplicates across and within shards, and one row per hostile case.

    Returns (folder, case -> (shard file name, key)). Shard 0 holds 12 clean samples (uids 0..11)
    plus a second row of sample 0 (same uid, bytes and caption: ``dup_uid_same_shard``);
    shard 1 repeats sample 3 (same uid, same image, same caption: ``dup_uid_other_shard``) and
    holds the no-caption cases; shard 2 holds the broken members and Parquet rows.
    """
    folder = root / "raw"
    cases: dict[str, tuple[str, str]] = {}
    images = {i: make_image(i) for i in range(40)}
    with ShardWriter(folder, 0) as writer:
        for i in range(12):
            writer.write(_sample(i, make_uid(i), images[i], f"a photo of thing number {i} on a table"))
        writer.write(_sample(12, make_uid(0), images[0], "a photo of thing number 0 on a table"))
        cases["dup_uid_same_shard"] = ("00000.tar", f"{12:09d}")
    with ShardWriter(folder, 1) as writer:
        writer.write(_sample(100, make_uid(3), images[3], "a photo of thing number 3 on a table"))
        cases["dup_uid_other_shard"] = ("00001.tar", f"{100:09d}")
        for index, (name, text) in enumerate([("no_txt", None), ("empty_caption", ""), ("blank_caption", " \t\n ")],
                                             start=101):
            writer.write(_sample(index, make_uid(index), images[index - 81], text))
            cases[name] = ("00001.tar", f"{index:09d}")
        writer.write(_sample(104, make_uid(104), images[24], "a clean sample in the second shard"))
    broken = ["bomb", "undecodable", "no_json", "json_list", "no_image", "non_utf8_caption", "nul_caption",
              "bad_uid", "no_uid", "not_in_tar"]
    with ShardWriter(folder, 2) as writer:
        for index, name in enumerate(broken, start=200):
            writer.write(_sample(index, make_uid(index), images[index - 170], f"a photo of case {name} here"))
            cases[name] = ("00002.tar", f"{index:09d}")
        writer.write(_sample(299, make_uid(299), images[39], "a clean sample after the broken ones"))
    keys = {name: cases[name][1] for name in broken}

    def edit(name: str, data: bytes) -> list[tuple[str, bytes]]:
        key, ext = name.split(".", 1)
        if key == keys["bomb"] and ext == "jpg":
            return [(f"{key}.png", png_bomb())]
        if key == keys["undecodable"] and ext == "jpg":
            return [(name, b"\xff\xd8\xff\xe0 these bytes are no JPEG")]
        if key == keys["no_json"] and ext == "json":
            return []
        if key == keys["json_list"] and ext == "json":
            return [(name, b"[1, 2, 3]")]
        if key in (keys["no_image"], keys["not_in_tar"]) and ext == "jpg":
            return []
        if key == keys["not_in_tar"]:
            return []
        if key == keys["non_utf8_caption"] and ext == "txt":
            return [(name, b"caf\xe9 au lait \xff\xfe on a table")]
        if key == keys["nul_caption"] and ext == "txt":
            return [(name, b"a cat\x00 on a mat")]
        return [(name, data)]

    rewrite_tar(folder / "00002.tar", edit)

    def rows(rows: list[dict]) -> list[dict]:
        for row in rows:
            if row["key"] == keys["bad_uid"]:
                row["uid"] = "not-a-uid"
            if row["key"] == keys["no_uid"]:
                row["uid"] = None
            if row["key"] == keys["nul_caption"]:
                row["text"] = "a cat\x00 on a mat"
        return rows

    rewrite_parquet(folder / "00002.parquet", rows)
    finalize_folder(folder)
    return folder, cases


def test_hostile_folder_is_what_it_says(tmp_path):
    folder, cases = hostile_folder(tmp_path)
    table = read_tables(str(folder)).to_pandas()
    assert len(table) == 13 + 5 + 11 and (table.status == "success").all()
    by_key = table.set_index("key")
    assert by_key.uid[cases["bad_uid"][1]] == "not-a-uid" and by_key.uid[cases["no_uid"][1]] is None
    assert (table.uid == make_uid(3)).sum() == 2 and (table.uid == make_uid(0)).sum() == 2
    with tarfile.open(folder / "00002.tar") as tar:
        names = set(tar.getnames())
    assert f"{cases['bomb'][1]}.png" in names and f"{cases['no_image'][1]}.txt" in names
    assert not any(n.startswith(cases["not_in_tar"][1]) for n in names)
    assert f"{cases['no_json'][1]}.jpg" in names and f"{cases['no_json'][1]}.json" not in names
