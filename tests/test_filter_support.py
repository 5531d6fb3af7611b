"""Raw shards made from the embedded world, for the filter, dedup, reshard and uid tests.

``raw_shards_from_world(W, out)`` does what a downloader does with the world's pool, from the
files on disk rather than over HTTP: every pool row becomes a sample of an img2dataset-layout
shard (``ShardWriter``), carrying every pool column; a readable image becomes a ``success``,
anything else (no file, HTML, corrupt bytes, a bomb, an unsafe URL) a ``failed_to_download``
row with the reason in ``error_message``. ``shared_world(tmp_path_factory)`` makes one world
and its raw shards per test session, so every test module reuses them.

The tests at the end check the helper itself against the truth table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from base.shards import Sample, ShardWriter, decode_image, finalize_folder, read_tables
from world.config import WorldConfig
from world.generate import generate_world

# Faults whose URL gives no usable image even to a downloader that retries (the server's 500s
# for http_500, a stall past any timeout, a cut body); http_500_transient succeeds on a retry.
UNREACHABLE = {"http_404", "http_500", "stall", "truncated", "bad_scheme", "private_ip"}
WORLD_SAMPLES = 240
SHARD_SIZE = 50
_CACHE: dict[str, tuple[Path, Path]] = {}


def world_config(out: Path, **overrides) -> WorldConfig:
    """A small pool (no clean or eval split) with every fault, duplicate and size kind planted."""
    fields = dict(out=out, num_samples=WORLD_SAMPLES, clean_samples=0, eval_samples=0, chunk_size=120, workers=1,
                  plant_each=2, rate_exact_dup=0.05, rate_near_dup=0.06)
    fields.update(overrides)
    return WorldConfig(**fields)


def raw_shards_from_world(world: Path, out: Path, *, shard_size: int = SHARD_SIZE) -> Path:
    pool = pq.read_table(world / "pool.parquet").to_pylist()
    truth = {row["uid"]: row for row in pq.read_table(world / "truth.parquet", columns=["uid", "fault", "path"]).to_pylist()}
    for shard_id, start in enumerate(range(0, len(pool), shard_size)):
        with ShardWriter(out, shard_id) as writer:
            for index, row in enumerate(pool[start:start + shard_size], start=start):
                writer.write(_sample(world, row, truth[row["uid"]], index))
    finalize_folder(out)
    return out


def _sample(world: Path, row: dict, truth: dict, index: int) -> Sample:
    key = f"{index:09d}"
    meta = dict(row)
    meta["caption"] = row["text"]
    path = world / truth["path"]
    error = None
    if truth["fault"] in UNREACHABLE:
        error = f"planted fault {truth['fault']}"
    elif not path.exists():
        error = "no file"
    else:
        data = path.read_bytes()
        try:
            image = decode_image(data)
        except ValueError as err:
            error = str(err)
    if error is not None:
        return Sample(key=key, uid=row["uid"], text=row["text"], meta=meta, status="failed_to_download",
                      error_message=error)
    meta.update(width=image.width, height=image.height)
    return Sample(key=key, uid=row["uid"], image=data, image_ext=path.suffix[1:], text=row["text"], meta=meta)


def shared_world(tmp_path_factory) -> tuple[Path, Path]:
    """(world folder, raw shard folder), made once per test session."""
    if "world" not in _CACHE:
        root = tmp_path_factory.mktemp("filter_world")
        world = root / "w"
        generate_world(world_config(world), progress=False)
        _CACHE["world"] = (world, raw_shards_from_world(world, root / "raw"))
    return _CACHE["world"]


def assert_datacomp_uids(path: Path) -> np.ndarray:
    """The file loads with plain numpy in DataComp's dtype, sorted by (f0, f1), without repeats."""
    array = np.load(path)
    assert array.dtype == np.dtype([("f0", "<u8"), ("f1", "<u8")]) == np.dtype("u8,u8")
    values = [int(a) << 64 | int(b) for a, b in zip(array["f0"], array["f1"], strict=True)]
    assert values == sorted(set(values)), f"{path}: not sorted and unique"
    return array


def truth_table(world: Path):
    return pq.read_table(world / "truth.parquet").to_pandas().query("split == 'pool'").set_index("uid")


def test_raw_shards_match_the_world(tmp_path_factory):
    world, raw = shared_world(tmp_path_factory)
    table = read_tables(str(raw)).to_pandas().set_index("uid")
    truth = truth_table(world)
    assert len(table) == WORLD_SAMPLES and set(table.index) == set(truth.index)
    failed = table[table.status != "success"]
    # every unreachable or undecodable planted fault failed, nothing else did
    bad = set(truth.index[truth.fault.isin(UNREACHABLE | {"corrupt", "not_image", "bomb"})])
    assert set(failed.index) == bad
    for column in ("text", "original_width", "original_height", "sha256", "url"):
        assert column in table.columns
    assert (table.loc[truth.index, "original_width"].to_numpy() == truth.width.to_numpy()).all()
