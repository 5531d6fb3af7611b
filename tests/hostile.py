"""Generator of hostile inputs for the reliability suite (``tests/test_hostile*.py``).

Everything here is made from scratch, with real encoders: images with PIL (every mode and
format, plus bytes that only pretend to be images), good shards with
:class:`base.shards.ShardWriter`, broken shards with raw :mod:`tarfile` writes (members that
break webdataset's key rule, links, ``../`` names, a header claiming a huge size, a tar cut
mid-member, a file that is no tar at all) beside a Parquet and ``_stats.json`` written with
pyarrow/json, uid files with numpy, checkpoints with safetensors/torch/pickle, pools with pyarrow.

A *case* is one hostile input folder: :func:`build_case` writes it and returns a :class:`Case`
that says what the folder holds — every Parquet row (so a test can check that every input row is
accounted for exactly once), the successes whose image cannot be decoded (a decoding stage must
record them as non-success), and whether the folder breaks the shard contract (``qcap shards
verify`` must report it). :data:`CASES` lists every case by class.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# uids


def uid(i: int, salt: str = "hostile") -> str:
    """A valid DataComp uid (32 lowercase hex)."""
    return hashlib.md5(f"{salt}-{i}".encode()).hexdigest()


MALFORMED_UIDS = {
    "uid-31-hex": uid(900)[:31],
    "uid-uppercase": uid(901).upper(),
    "uid-non-hex": "z" * 32,
    "uid-33-hex": uid(902) + "a",
    "uid-empty": "",
}

# --------------------------------------------------------------------------------------------
# Images


def _pil():
    from PIL import Image

    return Image


def _save(image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _pattern(mode: str, size: tuple[int, int], seed: int):
    """A picture with some structure (so hashes differ between seeds) in ``mode``."""
    Image = _pil()
    rgb = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    for x in range(0, size[0], 3):
        for y in range(0, size[1], 5):
            rgb.putpixel((x, y), ((x * 7 + seed) % 256, (y * 11) % 256, 255 - (x + y) % 256))
    return rgb.convert(mode)


def _p_with_transparency(seed: int) -> bytes:
    image = _pattern("RGB", (40, 30), seed).convert("P", palette=_pil().Palette.ADAPTIVE, colors=16)
    return _save(image, "PNG", transparency=0)


def _i16_png(seed: int) -> bytes:
    Image = _pil()
    array = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * (seed + 17)).astype(np.uint16)
    return _save(Image.fromarray(array), "PNG")  # uint16 -> mode I;16


def _cmyk_jpeg(seed: int) -> bytes:
    return _save(_pattern("CMYK", (40, 30), seed), "JPEG", quality=85)


def _gif(seed: int) -> bytes:
    return _save(_pattern("RGB", (40, 30), seed).convert("P"), "GIF")


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels; its data is a few bytes. Opening
    it for decoding would allocate over a gigabyte; a careful reader refuses it on the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def broken_png() -> bytes:
    """A PNG with a sound 40x30 header whose pixel data is not a zlib stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 40, 30, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib " * 30) + chunk(b"IEND", b"")


# name -> (member extension, bytes of seed); every one decodes with PIL into an RGB picture
GOOD_IMAGES: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "rgb-jpeg": ("jpg", lambda s: _save(_pattern("RGB", (40, 30), s), "JPEG", quality=90)),
    "L-png": ("png", lambda s: _save(_pattern("L", (40, 30), s), "PNG")),
    "LA-png": ("png", lambda s: _save(_pattern("LA", (40, 30), s), "PNG")),
    "P-transparency-png": ("png", _p_with_transparency),
    "RGBA-png": ("png", lambda s: _save(_pattern("RGBA", (40, 30), s), "PNG")),
    "CMYK-jpeg": ("jpg", _cmyk_jpeg),
    "I16-png": ("png", _i16_png),
    "1bit-png": ("png", lambda s: _save(_pattern("1", (40, 30), s), "PNG")),
    "L-jpeg": ("jpg", lambda s: _save(_pattern("L", (40, 30), s), "JPEG")),
    "webp": ("webp", lambda s: _save(_pattern("RGB", (40, 30), s), "WEBP")),
    "gif-named-jpg": ("jpg", _gif),
    "png-named-jpg": ("jpg", lambda s: _save(_pattern("RGB", (40, 30), s), "PNG")),
    "tiny-1x1": ("jpg", lambda s: _save(_pattern("RGB", (1, 1), s), "JPEG")),
    "huge-aspect-2000x2": ("png", lambda s: _save(_pattern("RGB", (2000, 2), s), "PNG")),
    "tall-1x600": ("png", lambda s: _save(_pattern("RGB", (1, 600), s), "PNG")),
}

# name -> (member extension, bytes of seed); none of these is a decodable image within bounds
BAD_IMAGES: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "bomb-png-20000x20000": ("png", lambda s: bomb_png()),
    "bomb-png-named-jpg": ("jpg", lambda s: bomb_png(30000, 30000)),
    "garbage-named-jpg": ("jpg", lambda s: b"\xff\xd8\xff\xe0" + bytes((i * 131 + s) % 256 for i in range(400))),
    "html-named-jpg": ("jpg", lambda s: b"<!doctype html><html><body>404 not found</body></html>"),
    "truncated-jpeg-head": ("jpg", lambda s: GOOD_IMAGES["rgb-jpeg"][1](s)[:40]),
    "empty-image-member": ("jpg", lambda s: b""),
    "png-broken-idat": ("png", lambda s: broken_png()),
}


def good_jpeg(seed: int) -> bytes:
    return GOOD_IMAGES["rgb-jpeg"][1](seed)


# --------------------------------------------------------------------------------------------
# Raw shards: a tar written member by member, with the Parquet and stats beside it


@dataclass
class Member:
    """One tar member: a regular file, or with ``kind`` a link/symlink/dir, or a header that lies
    about its size (``claimed_size``)."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file | symlink | hardlink | dir
    target: str = ""  # link target
    claimed_size: int | None = None  # header size field, when it lies


def _tar_bytes(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mtime = 0
            info.mode = 0o644
            if m.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, m.target
                tar.addfile(info)
            elif m.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, m.target
                tar.addfile(info)
            elif m.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
    data = buffer.getvalue()
    for m in members:  # a header that claims more bytes than follow (the size field rewritten)
        if m.claimed_size is not None:
            data = _rewrite_size(data, m.name, m.claimed_size)
    return data


def _rewrite_size(data: bytes, name: str, size: int) -> bytes:
    """Set the ustar size field of member ``name``'s header (and fix its checksum)."""
    block = tarfile.BLOCKSIZE
    raw = bytearray(data)
    for offset in range(0, len(raw), block):
        header = raw[offset:offset + block]
        if header[:100].rstrip(b"\0") == name.encode():
            field_ = b"%011o\0" % size if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
            raw[offset + 124:offset + 136] = field_
            raw[offset + 148:offset + 156] = b"        "
            checksum = sum(raw[offset:offset + block])
            raw[offset + 148:offset + 156] = b"%06o\0 " % checksum
            return bytes(raw)
    raise AssertionError(f"no header for {name}")


def sample_members(key: str, uid_: str | None, text: str | bytes, image: bytes | None, ext: str = "jpg",
                   meta: dict | bytes | None = None) -> list[Member]:
    """The members of one sample as img2dataset writes them (image, txt, json)."""
    members = []
    if image is not None:
        members.append(Member(f"{key}.{ext}", image))
    members.append(Member(f"{key}.txt", text if isinstance(text, bytes) else text.encode("utf-8")))
    if meta is None:
        meta = {"key": key, "status": "success", **({"uid": uid_} if uid_ is not None else {})}
    members.append(Member(f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    return members


def row(key: str, uid_: str | None, status: str = "success", text: str | None = "a photo of a red square on grass",
        width: int = 400, height: int = 300, **extra: Any) -> dict[str, Any]:
    """One Parquet row of a raw shard (img2dataset's columns plus the pool's)."""
    return {"key": key, "uid": uid_, "status": status, "error_message": None if status == "success" else f"[{status}]",
            "url": f"http://example.com/{key}.jpg", "text": text, "caption": text, "original_width": width,
            "original_height": height, **extra}


def write_raw_shard(folder: Path, shard_id: int, rows: list[dict[str, Any]], members: list[Member] | None = None, *,
                    tar_bytes: bytes | None = None, stats: dict[str, Any] | None = None, done: bool = True) -> Path:
    """A shard written by hand: ``{id}.tar`` (``members`` or raw ``tar_bytes``), ``{id}.parquet``
    (``rows``), ``{id}_stats.json`` (counted from the rows unless ``stats`` lies), ``{id}.done``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard_id:05d}"
    tar = folder / f"{name}.tar"
    tar.write_bytes(tar_bytes if tar_bytes is not None else _tar_bytes(members or []))
    columns = ["key", "uid", "status", "error_message", "url", "text", "caption", "original_width", "original_height"]
    schema = pa.schema([(c, pa.int64() if c.startswith("original_") else pa.string()) for c in columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    pq.write_table(table, folder / f"{name}.parquet")
    successes = sum(r["status"] == "success" for r in rows)
    counted = {"shard": f"{name}.tar", "count": len(rows), "successes": successes, "failed": len(rows) - successes,
               "failed_to_download": len(rows) - successes, "failed_to_resize": 0,
               "status_dict": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats if stats is not None else counted))
    if done:
        (folder / f"{name}.done").write_bytes(b"")
    return tar


def write_good_shard(folder: Path, shard_id: int, n: int, *, start: int = 0, failures: int = 1) -> list[dict[str, Any]]:
    """A shard written by qcap's own writer: ``n`` good samples and ``failures`` failed downloads.
    Returns its Parquet rows."""
    from base.shards import Sample, ShardWriter

    rows = []
    with ShardWriter(folder, shard_id) as writer:
        for i in range(n):
            key = f"{shard_id:05d}{i:04d}"
            r = row(key, uid(start + i), text=f"a photo of a small red square number {start + i} on green grass")
            image = good_jpeg(start + i)
            writer.write(Sample(key=key, uid=r["uid"], image=image, text=r["text"],
                                meta={c: r[c] for c in ("url", "original_width", "original_height")} | {
                                    "sha256": hashlib.sha256(image).hexdigest(), "text": r["text"]}))
            rows.append(r)
        for j in range(failures):
            key = f"{shard_id:05d}{n + j:04d}"
            r = row(key, uid(start + 5000 + j), status="http_404")
            writer.write(Sample(key=key, uid=r["uid"], status="http_404", error_message="HTTP 404",
                                meta={c: r[c] for c in ("url", "text", "original_width", "original_height")}))
            rows.append(r)
    return rows


def write_sizes(folder: Path, sizes: dict[str, int] | None = None) -> None:
    """``sizes.json`` from the shards' stats (``base.shards.finalize_folder``), or a lying one."""
    if sizes is None:
        from base.shards import finalize_folder

        finalize_folder(folder)
    else:
        (folder / "sizes.json").write_text(json.dumps(sizes))


# --------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One hostile shard folder and what it holds."""

    klass: str  # the class of hostile input (json, keys, members, captions, images, bombs, tars, sizes, uids, dups, empty)
    name: str  # the variant
    folder: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # every Parquet row: shard (tar name), key, uid, status
    undecodable: set[str] = field(default_factory=set)  # uids of successes without a decodable image
    decodable: set[str] = field(default_factory=set)  # uids of hostile-format successes that do decode
    no_image: set[str] = field(default_factory=set)  # uids of success rows with no image member in the tar
    problems: bool = False  # breaks the shard contract: `qcap shards verify` must report it (naming `problem_shard`)
    problem_shard: str = "00001.tar"
    malformed_uids: bool = False  # a success row with a uid that is not DataComp's
    duplicate_uids: bool = False  # a uid on two success rows

    @property
    def id(self) -> str:
        return f"{self.klass}-{self.name}"

    @property
    def success_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "success"]


GOOD_PER_SHARD = 3


def _base(case: Case) -> None:
    """Shard 0 of every case: good samples and a failed download, by qcap's own writer."""
    for r in write_good_shard(case.folder, 0, GOOD_PER_SHARD, start=0):
        case.rows.append({**r, "shard": "00000.tar"})


def _add_rows(case: Case, shard: str, rows: list[dict[str, Any]]) -> None:
    case.rows.extend({**r, "shard": shard} for r in rows)


def cu(case: Case, i: int) -> str:
    """A uid of case ``case`` alone: cases can be combined into one folder without clashing."""
    return uid(i, salt=case.id)


def _one_sample_shard(case: Case, key: str, u: str | None, members: list[Member], *, text: str | None = None,
                      **kw) -> None:
    rows = [row(key, u, text=text or "a photo of a blue circle on a white table")]
    write_raw_shard(case.folder, 1, rows, members, **kw)
    _add_rows(case, "00001.tar", rows)


def build_json_case(case: Case, variant: bytes) -> None:
    _base(case)
    u = cu(case, 100)
    _one_sample_shard(case, "000010000", u, sample_members("000010000", u, "a blue circle", good_jpeg(100), meta=variant))
    case.problems = True  # a KEY.json that is not an object of the sample's fields


JSON_VARIANTS = {
    "json-list": b"[1, 2]",
    "json-string": b'"str"',
    "json-truncated": b'{"uid": "' + uid(100).encode(),
    "json-invalid-utf8": b'{"uid": "' + uid(100).encode() + b'", "note": "\xff\xfe\xc3"}',
    "json-null": b"null",
    "json-number": b"42",
    "json-uid-not-string": json.dumps({"uid": 12345, "key": "000010000"}).encode(),
}


def build_keys_case(case: Case, variant: str) -> None:
    """A sample whose key webdataset splits differently from the Parquet's key."""
    _base(case)
    u = cu(case, 110)
    key = {"dot-in-key": "a.b", "slash-in-key": "dir/k", "dots-and-slash": "x/y.z", "leading-dot": ".hidden"}[variant]
    members = sample_members(key, u, "a blue circle", good_jpeg(110))
    _one_sample_shard(case, key, u, members)
    case.problems = True


def build_members_case(case: Case, variant: str) -> None:
    """Success rows whose members are missing from the tar."""
    _base(case)
    rows = [row("000010000", cu(case, 120)), row("000010001", cu(case, 121))]
    if variant == "success-row-not-in-tar":  # the Parquet lists a success the tar lacks entirely
        members = sample_members("000010001", cu(case, 121), "a blue circle", good_jpeg(121))
        case.undecodable.add(cu(case, 120))
        case.no_image.add(cu(case, 120))
    elif variant == "json-without-image":  # the tar holds txt+json, no image member
        members = (sample_members("000010000", cu(case, 120), "a blue circle", None)
                   + sample_members("000010001", cu(case, 121), "a blue circle", good_jpeg(121)))
        case.undecodable.add(cu(case, 120))
        case.no_image.add(cu(case, 120))
    elif variant == "image-only":  # image without json or txt: no uid in the tar
        members = ([Member("000010000.jpg", good_jpeg(120))]
                   + sample_members("000010001", cu(case, 121), "a blue circle", good_jpeg(121)))
    elif variant == "image-in-unknown-format-member":  # KEY.gif: not one of the shard layer's image extensions
        members = ([Member("000010000.gif", _gif(120))] + sample_members("000010000", cu(case, 120), "a circle", None)[0:2]
                   + sample_members("000010001", cu(case, 121), "a blue circle", good_jpeg(121)))
        case.undecodable.add(cu(case, 120))
        case.no_image.add(cu(case, 120))
    elif variant == "members-interleaved":  # one sample's members split by another's: webdataset sees 3 samples
        a = sample_members("000010000", cu(case, 120), "a blue circle", good_jpeg(120))
        b = sample_members("000010001", cu(case, 121), "a red circle", good_jpeg(121))
        members = [a[0], b[0], a[1], a[2], b[1], b[2]]
    elif variant == "duplicate-member":  # the same member twice
        a = sample_members("000010000", cu(case, 120), "a blue circle", good_jpeg(120))
        members = a + [a[0]] + sample_members("000010001", cu(case, 121), "a red circle", good_jpeg(121))
    else:
        raise ValueError(variant)
    write_raw_shard(case.folder, 1, rows, members)
    _add_rows(case, "00001.tar", rows)
    case.problems = True


def build_captions_case(case: Case, variant: str) -> None:
    """Captions that are not clean UTF-8 text (in KEY.txt, and in the Parquet's text)."""
    _base(case)
    texts: dict[str, tuple[str, bytes]] = {
        "non-utf8-txt": ("a photo of a cat on a sofa", b"a photo of a \xff\xfe cat \xc3\x28 on a sofa"),
        "nul-in-caption": ("a photo of\x00 a cat\x00 on a sofa", b"a photo of\x00 a cat\x00 on a sofa"),
        "control-chars": ("a photo\x1b[31m of a cat\x07 on a sofa\r\n\x0c", b"a photo\x1b[31m of a cat\x07"),
        "empty-caption": ("", b""),
        "huge-caption": ("word " * 20000, ("word " * 20000).encode()),
        "rtl-and-emoji": ("\u202e\U0001f600 photo \u0000 of a cat \ud7ff", "\u202e\U0001f600 photo of a cat".encode()),
    }
    text, raw = texts[variant]
    rows, members = [], []
    for i in range(2):
        key = f"00001{i:04d}"
        u = cu(case, 130 + i)
        rows.append(row(key, u, text=text))
        members += sample_members(key, u, raw, good_jpeg(130 + i))
    write_raw_shard(case.folder, 1, rows, members)
    _add_rows(case, "00001.tar", rows)


def build_images_case(case: Case, kinds: list[str]) -> None:
    """One success per image kind (good and bad ones), as img2dataset would write them."""
    _base(case)
    rows, members = [], []
    for i, kind in enumerate(kinds):
        key = f"00001{i:04d}"
        u = cu(case, 200 + i)
        if kind in GOOD_IMAGES:
            ext, make = GOOD_IMAGES[kind]
            case.decodable.add(u)
        else:
            ext, make = BAD_IMAGES[kind]
            case.undecodable.add(u)
        rows.append(row(key, u, text=f"a photo of a shape drawn as {kind.replace('-', ' ')}"))
        members += sample_members(key, u, f"a photo of a shape {i}", make(200 + i), ext)
    write_raw_shard(case.folder, 1, rows, members)
    _add_rows(case, "00001.tar", rows)


def build_tar_case(case: Case, variant: str) -> None:
    """Hostile and broken tars (the Parquet and stats are right; the tar is not)."""
    _base(case)
    u0, u1 = cu(case, 300), cu(case, 301)
    rows = [row("000010000", u0), row("000010001", u1)]
    good = sample_members("000010000", u0, "a blue circle", good_jpeg(300)) + sample_members(
        "000010001", u1, "a red circle", good_jpeg(301))
    tar_bytes = None
    members = None
    if variant == "cut-mid-member":
        whole = _tar_bytes(good)
        tar_bytes = whole[: 512 * 3 + 200]
    elif variant == "cut-at-header":
        tar_bytes = _tar_bytes(good)[: 512 * 5 + 100]
    elif variant == "dotdot-member":
        members = good[:3] + [Member("../../escape.txt", b"owned")] + good[3:]
    elif variant == "absolute-member":
        members = good[:3] + [Member("/tmp/qcap-hostile-absolute.txt", b"owned")] + good[3:]
    elif variant == "dotdot-sample":
        members = [Member(f"../000010000.{m.name.split('.', 1)[1]}", m.data) for m in good[:3]] + good[3:]
    elif variant == "symlink-member":
        members = good[:3] + [Member("000010001.jpg", kind="symlink", target="/etc/passwd")] + good[4:]
        case.undecodable.add(u1)
        case.no_image.add(u1)
    elif variant == "hardlink-member":
        members = good[:3] + [Member("000010001.jpg", kind="hardlink", target="000010000.jpg")] + good[4:]
        case.undecodable.add(u1)
        case.no_image.add(u1)
    elif variant == "directory-member":
        members = [Member("000010000", kind="dir")] + good
    elif variant == "huge-claimed-size":
        members = good[:3] + [Member("000010001.jpg", good[3].data, claimed_size=10**12)] + good[4:]
    elif variant == "not-a-tar":
        tar_bytes = b"this is a text file, not a tar archive\n" * 40
    elif variant == "gzip-named-tar":
        tar_bytes = zlib.compress(_tar_bytes(good))
    elif variant == "empty-file":
        tar_bytes = b""
    elif variant == "random-bytes":
        tar_bytes = bytes((i * 197 + 13) % 256 for i in range(4096))
    else:
        raise ValueError(variant)
    write_raw_shard(case.folder, 1, rows, members, tar_bytes=tar_bytes)
    _add_rows(case, "00001.tar", rows)
    case.problems = True


def build_sizes_case(case: Case, variant: str) -> None:
    """A folder whose sizes.json or _stats.json does not match its shards."""
    _base(case)
    rows = write_good_shard(case.folder, 1, 2, start=400)
    _add_rows(case, "00001.tar", rows)
    if variant == "sizes-json-too-big":
        write_sizes(case.folder, {"00000.tar": GOOD_PER_SHARD, "00001.tar": 50})
    elif variant == "sizes-json-too-small":
        write_sizes(case.folder, {"00000.tar": GOOD_PER_SHARD, "00001.tar": 0})
    elif variant == "sizes-json-missing-shard":
        write_sizes(case.folder, {"00000.tar": GOOD_PER_SHARD})
    elif variant == "sizes-json-not-object":
        (case.folder / "sizes.json").write_text("[3, 2]")
    elif variant == "sizes-json-negative":
        write_sizes(case.folder, {"00000.tar": GOOD_PER_SHARD, "00001.tar": -7})
    elif variant == "stats-successes-lie":
        stats = json.loads((case.folder / "00001_stats.json").read_text())
        stats.update(successes=40, count=41)
        (case.folder / "00001_stats.json").write_text(json.dumps(stats))
        write_sizes(case.folder)
    elif variant == "stats-not-object":
        write_sizes(case.folder)
        (case.folder / "00001_stats.json").write_text('["successes", 2]')
    elif variant == "stats-truncated":
        write_sizes(case.folder)
        (case.folder / "00001_stats.json").write_text('{"successes": 2, "cou')
    else:
        raise ValueError(variant)
    case.problems = True


def build_uids_case(case: Case, variant: str) -> None:
    """Success rows whose uid is not DataComp's (in the Parquet and KEY.json)."""
    _base(case)
    bad = MALFORMED_UIDS[variant]
    rows = [row("000010000", bad), row("000010001", cu(case, 501))]
    members = sample_members("000010000", bad, "a blue circle", good_jpeg(500)) + sample_members(
        "000010001", cu(case, 501), "a red circle", good_jpeg(501))
    write_raw_shard(case.folder, 1, rows, members)
    _add_rows(case, "00001.tar", rows)
    case.malformed_uids = True


def build_dups_case(case: Case, variant: str) -> None:
    """The same uid on two success rows: in one shard, or across shards."""
    _base(case)
    dup = uid(0, "hostile")  # shard 0's first sample
    if variant == "dup-uid-in-shard":
        rows = [row("000010000", cu(case, 600)), row("000010001", cu(case, 600))]
        members = sample_members("000010000", cu(case, 600), "a blue circle", good_jpeg(600)) + sample_members(
            "000010001", cu(case, 600), "a blue circle again", good_jpeg(601))
    elif variant == "dup-uid-across-shards":
        rows = [row("000010000", dup), row("000010001", cu(case, 602))]
        members = sample_members("000010000", dup, "a blue circle", good_jpeg(602)) + sample_members(
            "000010001", cu(case, 602), "a red circle", good_jpeg(603))
    elif variant == "dup-uid-success-and-failure":
        rows = [row("000010000", dup, status="http_404"), row("000010001", cu(case, 604))]
        members = sample_members("000010001", cu(case, 604), "a red circle", good_jpeg(604))
    else:
        raise ValueError(variant)
    write_raw_shard(case.folder, 1, rows, members)
    _add_rows(case, "00001.tar", rows)
    case.duplicate_uids = variant != "dup-uid-success-and-failure"


def build_empty_case(case: Case, variant: str) -> None:
    """Folders with nothing (or nothing readable) to work on."""
    case.folder.mkdir(parents=True, exist_ok=True)
    if variant == "no-shards":
        (case.folder / "README.txt").write_text("nothing here\n")
        case.problems = True
        case.problem_shard = str(case.folder.name)
    elif variant == "zero-row-shard":
        write_raw_shard(case.folder, 0, [], [])
        write_sizes(case.folder)
        case.problems = False
    elif variant == "only-failures":
        rows = [row("000000000", uid(700), status="http_404"), row("000000001", uid(701), status="decode_error")]
        write_raw_shard(case.folder, 0, rows, [])
        write_sizes(case.folder)
        _add_rows(case, "00000.tar", rows)
    elif variant == "tar-without-parquet":
        write_good_shard(case.folder, 0, 2)
        (case.folder / "00000.parquet").unlink()
        case.problems = True
        case.problem_shard = "00000"
    elif variant == "parquet-not-parquet":
        write_good_shard(case.folder, 0, 2)
        (case.folder / "00000.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
        case.problems = True
        case.problem_shard = "00000"
    elif variant == "parquet-without-uid-column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        write_good_shard(case.folder, 0, 2)
        pq.write_table(pa.table({"key": ["000000000", "000000001"], "status": ["success", "success"]}),
                       case.folder / "00000.parquet")
        case.problems = True
        case.problem_shard = "00000"
    else:
        raise ValueError(variant)


CASES: dict[str, tuple[str, Callable[[Case], None]]] = {}


def _register(klass: str, variants, builder) -> None:
    for variant in variants:
        name = variant if isinstance(variant, str) else variant[0]
        CASES[f"{klass}-{name}"] = (klass, (lambda c, v=variant: builder(c, v)))


_register("json", [(k, v) for k, v in JSON_VARIANTS.items()], lambda c, kv: build_json_case(c, kv[1]))
_register("keys", ["dot-in-key", "slash-in-key", "dots-and-slash", "leading-dot"], build_keys_case)
_register("members", ["success-row-not-in-tar", "json-without-image", "image-only", "image-in-unknown-format-member",
                      "members-interleaved", "duplicate-member"], build_members_case)
_register("captions", ["non-utf8-txt", "nul-in-caption", "control-chars", "empty-caption", "huge-caption",
                       "rtl-and-emoji"], build_captions_case)
CASES["images-every-mode"] = ("images", lambda c: build_images_case(c, list(GOOD_IMAGES)))
CASES["bombs-and-undecodable"] = ("bombs", lambda c: build_images_case(c, list(BAD_IMAGES)))
CASES["images-mixed"] = ("images", lambda c: build_images_case(c, ["CMYK-jpeg", "bomb-png-20000x20000", "I16-png",
                                                                   "garbage-named-jpg", "P-transparency-png"]))
_register("tars", ["cut-mid-member", "cut-at-header", "dotdot-member", "absolute-member", "dotdot-sample",
                   "symlink-member", "hardlink-member", "directory-member", "huge-claimed-size", "not-a-tar",
                   "gzip-named-tar", "empty-file", "random-bytes"], build_tar_case)
_register("sizes", ["sizes-json-too-big", "sizes-json-too-small", "sizes-json-missing-shard", "sizes-json-not-object",
                    "sizes-json-negative", "stats-successes-lie", "stats-not-object", "stats-truncated"],
          build_sizes_case)
_register("uids", list(MALFORMED_UIDS), build_uids_case)
_register("dups", ["dup-uid-in-shard", "dup-uid-across-shards", "dup-uid-success-and-failure"], build_dups_case)
_register("empty", ["no-shards", "zero-row-shard", "only-failures", "tar-without-parquet", "parquet-not-parquet",
                    "parquet-without-uid-column"], build_empty_case)

# cases whose sizes.json the builder wrote itself; the others get one from finalize_folder
_OWN_SIZES = {"sizes", "empty"}


def build_case(case_id: str, root: Path) -> Case:
    """Write case ``case_id`` under ``root/case_id`` and describe it."""
    klass, builder = CASES[case_id]
    case = Case(klass=klass, name=case_id[len(klass) + 1:], folder=root / case_id)
    builder(case)
    if klass not in _OWN_SIZES:
        _finalize_tolerant(case.folder)
    return case


def _finalize_tolerant(folder: Path) -> None:
    """sizes.json from each shard's stats (hand-written shards have correct stats)."""
    sizes = {}
    for stats in sorted(folder.glob("*_stats.json")):
        sizes[stats.name.replace("_stats.json", ".tar")] = json.loads(stats.read_text())["successes"]
    (folder / "sizes.json").write_text(json.dumps(sizes))


def input_rows(folder: Path) -> list[tuple[str, str]]:
    """(tar name, key) of every row of every readable Parquet in ``folder`` (what a stage must account for)."""
    import pyarrow.parquet as pq

    out = []
    for parquet in sorted(folder.glob("*.parquet")):
        try:
            keys = pq.read_table(parquet, columns=["key"]).column("key").to_pylist()
        except Exception:  # noqa: BLE001 - a hostile Parquet is simply not counted
            continue
        out += [(parquet.name.replace(".parquet", ".tar"), k) for k in keys]
    return out


# --------------------------------------------------------------------------------------------
# uid files


def write_npy_variants(folder: Path) -> dict[str, Path]:
    """Hostile uid files: 0 bytes, wrong dtype, 2-D, unsorted, a pickled object array, truncated, not npy."""
    from base.shards import UID_DTYPE, uids_to_array

    folder.mkdir(parents=True, exist_ok=True)
    good = uids_to_array([uid(i) for i in range(4)])
    out = {}

    def save(name: str, array) -> None:
        path = folder / f"{name}.npy"
        np.save(path, array, allow_pickle=True)
        out[name] = path

    (folder / "zero-bytes.npy").write_bytes(b"")
    out["zero-bytes"] = folder / "zero-bytes.npy"
    save("wrong-dtype-int64", np.arange(4, dtype=np.int64))
    save("strings", np.array([uid(i) for i in range(4)]))
    save("two-d", np.stack([good, good]))
    save("unsorted", good[::-1].copy())
    save("object-pickle", np.array([{"uid": uid(0)}, None], dtype=object))
    whole = io.BytesIO()
    np.save(whole, good)
    (folder / "truncated.npy").write_bytes(whole.getvalue()[:-10])
    out["truncated"] = folder / "truncated.npy"
    (folder / "text.npy").write_text("not a numpy file\n")
    out["text"] = folder / "text.npy"
    assert good.dtype == UID_DTYPE
    return out


def uid_file(path: Path, uids: list[str]) -> Path:
    from base.shards import save_uids

    save_uids(path, uids)
    return path


# --------------------------------------------------------------------------------------------
# Checkpoints


MARKER_ENV = "QCAP_HOSTILE_MARKER"


class Malicious:
    """Unpickling this runs ``open(marker, 'w')``: a loader that unpickles is caught by the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_checkpoint_variants(folder: Path, good_dir: Path, marker: Path) -> dict[str, Path]:
    """Bad checkpoints, each a folder laid out like a good one (``open_clip_config.json`` +
    weights) or a bare weights file: ``good_dir`` is a real tiny checkpoint folder to copy from."""
    import pickle
    import shutil

    import torch

    from base.models import CONFIG_FILE, WEIGHTS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def as_dir(name: str, weights: bytes | None, config: bytes | None = None, weights_name: str = WEIGHTS_FILE) -> None:
        d = folder / name
        d.mkdir()
        (d / CONFIG_FILE).write_bytes(config if config is not None else (good_dir / CONFIG_FILE).read_bytes())
        if weights is not None:
            (d / weights_name).write_bytes(weights)
        out[name] = d

    good_weights = (good_dir / WEIGHTS_FILE).read_bytes()
    malicious = pickle.dumps({"state_dict": Malicious(marker)})
    buffer = io.BytesIO()
    torch.save({"state_dict": Malicious(marker)}, buffer)
    torch_malicious = buffer.getvalue()
    as_dir("pickle-as-safetensors", malicious)
    as_dir("truncated-safetensors", good_weights[: len(good_weights) // 3])
    as_dir("garbage-safetensors", b"\x00\x01garbage" * 100)
    as_dir("safetensors-header-huge", struct.pack("<Q", 2**62) + b"{}")
    as_dir("config-list", good_weights, b"[1, 2, 3]")
    as_dir("config-string", good_weights, b'"qcap-tiny-clip"')
    as_dir("config-truncated", good_weights, b'{"model_cfg": {"embed_dim": ')
    as_dir("config-unknown-model", good_weights, json.dumps({"model_name": "no-such-model-xyz"}).encode())
    as_dir("weights-missing", None)
    for name, data in (("malicious.pt", torch_malicious), ("malicious-pickle.bin", malicious),
                       ("garbage.pt", b"PK\x03\x04 not a zip" * 50), ("truncated.safetensors",
                                                                           good_weights[: len(good_weights) // 2]),
                       ("empty.pt", b"")):
        (folder / name).write_bytes(data)
        out[name.replace(".", "-")] = folder / name
    shutil.copy(good_dir / WEIGHTS_FILE, folder / "good.safetensors")
    return out


# --------------------------------------------------------------------------------------------
# Pools


def write_pool(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A DataComp pool Parquet: uid, url, text (+ original sizes, sha256 null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
                        ("original_width", pa.int64()), ("original_height", pa.int64())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


HOSTILE_URLS = {
    "ftp-scheme": "ftp://127.0.0.1/a.jpg",
    "file-scheme": "file:///etc/passwd",
    "javascript-scheme": "javascript:alert(1)",
    "data-scheme": "data:image/png;base64,iVBORw0KGgo=",
    "gopher-scheme": "gopher://127.0.0.1:70/_GET",
    "no-scheme": "example.com/a.jpg",
    "private-10": "http://10.0.0.1/a.jpg",
    "private-192": "http://192.168.1.1/a.jpg",
    "link-local-metadata": "http://169.254.169.254/latest/meta-data/",
    "zero-address": "http://0.0.0.0:9/a.jpg",
    "ipv6-loopback": "http://[::1]:9/a.jpg",
    "decimal-loopback": "http://2130706433:9/a.jpg",
    "userinfo-trick": "http://example.com@10.0.0.1/a.jpg",
    "idn-host": "http://bücher.invalid/a.jpg",
    "empty-url": "",
    "huge-url": "http://example.invalid/" + "a" * 5000,
}


def env_marker_absent(marker: Path) -> bool:
    return not marker.exists() and not os.path.exists("/tmp/qcap-hostile-absolute.txt")


# --------------------------------------------------------------------------------------------
# A caption folder for build-dr (qcap caption's webdataset layout), written by qcap's writer


def write_caption_folder(images: Path, out: Path, num_captions: int = 2) -> int:
    """Caption-only shards for every success with a valid uid in ``images``' readable Parquets
    (same shard ids and keys, as ``qcap caption`` writes them); returns the captions written."""
    import pyarrow.parquet as pq

    from base.shards import Sample, ShardWriter, finalize_folder, is_uid

    written = 0
    out.mkdir(parents=True, exist_ok=True)
    for parquet in sorted(images.glob("*.parquet")):
        try:
            table = pq.read_table(parquet, columns=["key", "uid", "status"]).to_pylist()
        except Exception:  # noqa: BLE001 - the hostile Parquets get no captions
            continue
        seen = set()
        with ShardWriter(out, int(parquet.stem)) as writer:
            for r in table:
                key = r["key"]
                if r["status"] != "success" or not is_uid(r["uid"]) or "." in key or "/" in key or key in seen:
                    continue
                seen.add(key)
                writer.write(Sample(key=key, uid=r["uid"], image=None,
                                    syn_text=[f"a synthetic caption {j} of a red shape" for j in range(num_captions)],
                                    meta={"key": key, "status": "success", "num_syn": num_captions}))
                written += 1
    finalize_folder(out)
    return written


# --------------------------------------------------------------------------------------------
# Running a command the way `qcap` does, and the contract every run must keep


@dataclass
class Result:
    code: int
    out: str
    err: str
    logs: str


def run_cli(argv: list[str], capfd, caplog) -> Result:
    """Run ``qcap ARGV`` in-process through ``base.cli.run_guarded`` (what ``qcap`` calls),
    with the command function ``qcap.cli.all_commands()`` registers. argparse's SystemExit is an
    exit status; any other exception escaping the command fails the test, with its traceback."""
    import importlib
    import traceback

    import pytest

    from base.cli import run_guarded
    from qcap.cli import all_commands

    command = all_commands()[argv[0]]
    module_name, func_name = command.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    caplog.clear()
    try:
        code = run_guarded(func, list(argv[1:]), f"qcap {argv[0]}")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except Exception as err:  # noqa: BLE001 - the contract violation under test
        captured = capfd.readouterr()
        pytest.fail(f"qcap {' '.join(map(str, argv))}: uncaught {type(err).__name__}: {err}\n"
                    f"{''.join(traceback.format_exception(err)[-6:])}\nstderr: {captured.err[-2000:]}", pytrace=False)
    captured = capfd.readouterr()
    return Result(int(code), captured.out, captured.err, caplog.text)


def _without_logging_errors(text: str) -> str:
    """``text`` less the reports of ``logging.Handler.handleError`` ("--- Logging error ---" ...
    "Arguments: ..."): a library's background thread writing to a stderr that pytest's capture has
    already closed is the test harness's artefact, not the command's output."""
    import re

    return re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n?", "", text, flags=re.S)


def assert_contract(res: Result, *, allow_exit: tuple[int, ...] = ()) -> None:
    """No traceback anywhere; a non-zero exit comes with a one-line ``error:`` on stderr (an
    exit in ``allow_exit`` is a stage's own documented status, checked by the caller)."""
    res = Result(res.code, res.out, _without_logging_errors(res.err), _without_logging_errors(res.logs))
    assert "Traceback" not in res.err, f"Traceback on stderr:\n{res.err[-3000:]}"
    assert "Traceback" not in res.logs, f"Traceback in the log:\n{res.logs[-3000:]}"
    if res.code != 0 and res.code not in allow_exit:
        lines = [line for line in res.err.splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line]
        assert errors, (f"exit {res.code} without a one-line error on stderr: {res.err[-2000:]!r}; "
                        f"stdout: {res.out[-1500:]!r}")
