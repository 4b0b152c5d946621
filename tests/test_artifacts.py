"""The artifact cache: hits, misses, invalidation, crashed builds and concurrent builders."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from backbone.artifacts import COMPLETE, config_hash, get_or_build


def _counting_build(counter: Path):
    def build(folder: Path) -> None:
        with counter.open("a") as f:
            f.write("x")
        (folder / "weights.txt").write_text("w")

    return build


def test_config_hash_is_canonical():
    a = {"model": {"n_layer": 2, "n_embd": 64}, "lr": 1e-3}
    b = {"lr": 1e-3, "model": {"n_embd": 64, "n_layer": 2}}
    assert config_hash(a) == config_hash(b) == config_hash(OmegaConf.create(b))
    assert len(config_hash(a)) == 16
    assert config_hash(a) != config_hash({**a, "lr": 2e-3})
    # interpolations are resolved before hashing
    assert config_hash(OmegaConf.create({"x": 3, "y": "${x}"})) == config_hash({"x": 3, "y": 3})


def test_hit_miss_and_invalidation(tmp_path):
    counter = tmp_path / "count"
    build = _counting_build(counter)
    root = tmp_path / "cache"
    first = get_or_build(root, "sft", {"lr": 1.0}, build)
    assert (first / COMPLETE).exists() and (first / "weights.txt").exists()
    assert (first / "key.json").exists()
    assert first.name.startswith("sft-")
    assert get_or_build(root, "sft", {"lr": 1.0}, build) == first
    assert counter.read_text() == "x"
    other = get_or_build(root, "sft", {"lr": 2.0}, build)
    assert other != first
    assert counter.read_text() == "xx"
    assert not list(root.glob(".tmp-*"))


def test_crashed_build_is_never_used(tmp_path):
    root = tmp_path / "cache"

    def crash(folder: Path) -> None:
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="midway"):
        get_or_build(root, "rm", {"k": 1}, crash)
    assert not [p for p in root.glob("rm-*") if p.is_dir()]
    assert len(list(root.glob(".tmp-rm-*"))) == 1

    counter = tmp_path / "count"
    path = get_or_build(root, "rm", {"k": 1}, _counting_build(counter))
    assert counter.read_text() == "x"
    assert (path / "weights.txt").exists() and not (path / "half.txt").exists()
    assert not list(root.glob(".tmp-*")), "the retry cleans the crashed build's leftovers"


def test_two_processes_build_once(tmp_path):
    root, counter = tmp_path / "cache", tmp_path / "count"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from backbone.artifacts import get_or_build

        def build(folder):
            with open({str(counter)!r}, "a") as f:
                f.write("x")
            time.sleep(1.0)  # long enough that the other process arrives mid-build
            (folder / "weights.txt").write_text("w")

        print(get_or_build({str(root)!r}, "base", {{"n": 1}}, build))
        """
    )
    repo = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert counter.read_text() == "x"
    assert (Path(outs[0]) / "weights.txt").exists()
