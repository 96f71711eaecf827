"""Atomic files and seeds: nothing half-written is ever visible; derived seeds are stable and distinct."""

import pytest

from dilm import DilmError
from dilm.files import atomic_path, atomic_write_dir, atomic_write_text, write_json
from dilm.seeds import derive_seed


def test_atomic_text_and_json_leave_only_the_target(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    write_json(tmp_path / "sub" / "b.json", {"x": 1})
    assert (tmp_path / "a.txt").read_text() == "one"
    assert (tmp_path / "sub" / "b.json").read_text() == '{\n  "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "sub"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".pt" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]


def test_atomic_dir_replaces_or_yields(tmp_path):
    target = tmp_path / "ckpt"
    assert atomic_write_dir(target, lambda d: (d / "w").write_text("1"))
    assert atomic_write_dir(target, lambda d: (d / "w").write_text("2"))
    assert (target / "w").read_text() == "2"
    assert not atomic_write_dir(target, lambda d: (d / "w").write_text("3"), replace=False)  # first one wins
    assert (target / "w").read_text() == "2"

    def broken(d):
        (d / "w").write_text("4")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_dir(target, broken)
    assert (target / "w").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_derived_seeds_are_stable_distinct_and_valid():
    assert derive_seed(3, "pool", 1) == derive_seed(3, "pool", 1)
    seeds = {derive_seed(s, name, c) for s in range(4) for name in ("pool", "final set") for c in range(4)}
    assert len(seeds) == 32  # no collisions between runs, streams or classes
    assert all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(0, 1, 0) != derive_seed(0, 0, 1)
    with pytest.raises(DilmError, match="seed must be >= 0"):
        derive_seed(-1, "pool")


def test_made_once_writes_a_missing_file_once_and_leaves_nothing_when_writing_fails(tmp_path):
    """``made_once``: the writer runs only while the file is missing; a writer that fails leaves no file behind (the
    next call writes it)."""
    import pytest

    from dilm.files import made_once

    calls = []

    def write(tmp):
        calls.append(tmp)
        tmp.write_text("features")

    path = tmp_path / "cache" / "x.pt"

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        made_once(path, fails)
    assert not path.exists() and [p.name for p in path.parent.iterdir()] == ["x.lock"]
    assert made_once(path, write) == path and path.read_text() == "features"
    assert made_once(path, write) == path and len(calls) == 1
