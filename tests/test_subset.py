"""``qcap subset``: nested seeded subsets with exact sizes, the real-captions-only variant of the
same images, resume, and clear errors. Real shards, the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_uid
from dr_data import syn_captions, write_images, write_qcap_captions

from base.shards import array_to_uids, iter_samples, load_uids, read_sizes
from curate.subset import pack, rank_keys

LAYOUT = [list(range(i * 50, i * 50 + 50)) for i in range(8)]  # 400 samples in 8 shards


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from qcap.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def dr(tmp_path_factory) -> Path:
    """A DR folder of 400 samples in 8 shards (built by build-dr from images and captions)."""
    from captioning.dr import BuildDRConfig, build

    root = tmp_path_factory.mktemp("ladder")
    images = write_images(root / "curated", LAYOUT)
    captions = write_qcap_captions(root / "syn", [sum(LAYOUT[4:], []), sum(LAYOUT[:4], [])])
    build(BuildDRConfig(images=str(images), captions=str(captions), out=root / "dr", progress=False, card=False))
    return root / "dr"


def uids_of(folder: Path) -> set[str]:
    return set(array_to_uids(load_uids(folder / "uids.npy")))


def subset(capsys, dr: Path, out: Path, *flags: str) -> dict:
    code, stdout, stderr = run_cli(["subset", "--shards", str(dr), "--out", str(out), "--no-progress", "--no-card",
                                    *flags], capsys)
    assert code == 0, stderr
    assert "counts reconcile: yes" in stdout
    return json.loads((out / "summary.json").read_text())


def test_subsets_are_nested_with_exact_sizes(tmp_path, dr, capsys, monkeypatch):
    ladder = {}
    for fraction in ("1.0", "0.1", "0.01", "0.255"):
        out = tmp_path / f"dr-{fraction}"
        summary = subset(capsys, dr, out, "--fraction", fraction, "--seed", "7")
        expected = math.floor(float(fraction) * 400 + 0.5)
        assert summary["num_selected"] == summary["num_written"] == expected  # exact: 400, 40, 4, 102
        samples = list(iter_samples(str(out)))
        assert len(samples) == len({s.uid for s in samples}) == expected
        assert {s.uid for s in samples} == uids_of(out)
        assert sum(read_sizes(out).values()) == expected
        ladder[fraction] = uids_of(out)
    assert ladder["0.01"] < ladder["0.1"] < ladder["0.255"] < ladder["1.0"]  # 1% ⊂ 10% ⊂ 25.5% ⊂ 100%
    assert ladder["1.0"] == set(array_to_uids(load_uids(dr / "uids.npy")))
    # the selection is the smallest keys of (hash(seed, uid), uid): recompute it independently
    everything = sorted(ladder["1.0"])
    hi = np.array([int(u[:16], 16) for u in everything], dtype=np.uint64)
    lo = np.array([int(u[16:], 16) for u in everything], dtype=np.uint64)
    ranks = rank_keys(7, hi, lo)
    smallest = {everything[i] for i in np.lexsort((lo, hi, ranks))[:40]}
    assert smallest == ladder["0.1"]
    # the threshold search works with crowded bins too (4 bins instead of 65,536)
    import curate.subset

    monkeypatch.setattr(curate.subset, "BIN_BITS", 2)
    subset(capsys, dr, tmp_path / "coarse", "--fraction", "0.1", "--seed", "7")
    assert uids_of(tmp_path / "coarse") == ladder["0.1"]
    monkeypatch.undo()
    # another seed draws another 10%; --num-samples is the same ranking by count
    other = subset(capsys, dr, tmp_path / "seed8", "--fraction", "0.1", "--seed", "8")
    assert other["num_selected"] == 40 and uids_of(tmp_path / "seed8") != ladder["0.1"]
    subset(capsys, dr, tmp_path / "n40", "--num-samples", "40", "--seed", "7")
    assert uids_of(tmp_path / "n40") == ladder["0.1"]
    # the full set keeps the input's shard layout; the 10% joins shards
    assert read_sizes(tmp_path / "dr-1.0") == read_sizes(dr)
    assert len(read_sizes(tmp_path / "dr-0.1")) == 1


def test_real_captions_variant_has_the_same_images_and_no_synthetic_captions(tmp_path, dr, capsys):
    subset(capsys, dr, tmp_path / "dr-10", "--fraction", "0.1", "--seed", "3")
    subset(capsys, dr, tmp_path / "datacomp-10", "--fraction", "0.1", "--seed", "3", "--captions", "real")
    with_syn = {s.uid: s for s in iter_samples(str(tmp_path / "dr-10"))}
    real = {s.uid: s for s in iter_samples(str(tmp_path / "datacomp-10"))}
    assert set(with_syn) == set(real) and len(real) == 40
    for uid, sample in real.items():
        number = next(n for n in range(400) if make_uid(n) == uid)
        assert sample.syn_text is None and sample.syn_provenance is None and "num_syn" not in sample.meta
        assert sample.image == with_syn[uid].image and sample.text == with_syn[uid].text == f"web text of image {number}"
        assert with_syn[uid].syn_text == syn_captions(number)
    # a subset of the real-only folder with the same seed and size picks the same uids again
    subset(capsys, tmp_path / "datacomp-10", tmp_path / "datacomp-1", "--num-samples", "4", "--seed", "3")
    subset(capsys, dr, tmp_path / "dr-1", "--fraction", "0.01", "--seed", "3")
    assert uids_of(tmp_path / "datacomp-1") == uids_of(tmp_path / "dr-1")


def test_subset_resumes_and_refuses_other_settings(tmp_path, dr, capsys):
    out = tmp_path / "half"
    subset(capsys, dr, out, "--fraction", "0.5", "--seed", "1", "--samples-per-shard", "40")
    num_shards = len(read_sizes(out))
    assert num_shards >= 3 and max(read_sizes(out).values()) <= 40 + 50
    reference = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    for name in ("00002.tar", "00002.done", "00001.done"):  # as if killed before these were finished
        (out / name).unlink()
    summary = subset(capsys, dr, out, "--fraction", "0.5", "--seed", "1", "--samples-per-shard", "40")
    assert summary["resumed_shards"] == num_shards - 2
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == reference
    code, _, stderr = run_cli(["subset", "--shards", str(dr), "--out", str(out), "--fraction", "0.5", "--seed", "2"], capsys)
    assert code == 2 and "other inputs or settings" in stderr


def test_bad_subset_requests_are_clear(tmp_path, dr, capsys):
    code, _, stderr = run_cli(["subset", "--shards", str(dr), "--out", str(tmp_path / "a"), "--num-samples", "401"], capsys)
    assert code == 2 and "more than the 400 samples" in stderr
    code, _, stderr = run_cli(["subset", "--shards", str(dr), "--out", str(tmp_path / "b"), "--fraction", "0.001"], capsys)
    assert code == 2 and "selects none" in stderr
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["subset", "--shards", str(dr), "--out", str(tmp_path / "c"), "--fraction", "0.1", "--num-samples", "3"],
                capsys)
    assert exit_info.value.code == 2 and "exactly one of --fraction or --num-samples" in capsys.readouterr().err
    (tmp_path / "taken").write_text("not a folder")
    code, _, stderr = run_cli(["subset", "--shards", str(dr), "--out", str(tmp_path / "taken"), "--fraction", "0.1",
                               "--overwrite"], capsys)
    assert code == 2 and "is a file, not a folder" in stderr and (tmp_path / "taken").read_text() == "not a folder"


def test_pack_keeps_whole_input_shards_together():
    assert pack([10, 10, 10], 10) == [[0], [1], [2]]
    assert pack([1, 1, 1, 1, 1], 2) == [[0, 1], [2, 3], [4]]
    assert pack([5, 0, 0, 30, 2, 0], 10) == [[0, 1, 2], [3], [4, 5]]
    assert pack([0, 0, 3, 0], 10) == [[0, 1, 2, 3]]


@pytest.mark.slow
def test_make_subsets_builds_both_rungs_of_the_ladder(tmp_path, dr):
    """`make subsets` (the documented entry point): one real-captions and one DR folder per fraction,
    the same uids in both, nested across fractions. Slow: four qcap processes (the fast tests run
    ``qcap subset`` itself in process)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    ladder = tmp_path / "ladder"
    # -o: never (re)install the venv from inside a test; the target runs the qcap it finds there
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "subsets", f"DR={dr}", f"LADDER={ladder}",
                           "FRACTIONS=0.1 0.01", "SEED=3"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in ladder.iterdir()) == ["datacomp-1", "datacomp-10", "dr-1", "dr-10"]
    for pct, n in (("10", 40), ("1", 4)):
        real, dual = ladder / f"datacomp-{pct}", ladder / f"dr-{pct}"
        assert uids_of(real) == uids_of(dual) and len(uids_of(real)) == n
        assert all(s.syn_text is None for s in iter_samples(str(real)))
        assert all(s.syn_text for s in iter_samples(str(dual)))
        assert (real / "README.md").is_file() and (dual / "preview.html").is_file()
    assert uids_of(ladder / "dr-1") < uids_of(ladder / "dr-10")
    assert f"ladder: {ladder}/{{datacomp,dr}}-{{10,1}} (seed 3)" in proc.stdout
    # no DR folder: one clear line, exit status 2
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "subsets", f"DR={tmp_path / 'none'}"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "is not a shard folder" in proc.stdout + proc.stderr
