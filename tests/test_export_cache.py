"""The machine's shared ONNX export cache: one export per model_ver, reused by every home (#23)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import IMAGENET, REPO
from PIL import Image

from lookalike.models import export_cache, registry, runtime


def samples() -> list[Image.Image]:
    out = []
    for path in sorted(IMAGENET.glob("*.JPEG"))[:4]:
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


@pytest.fixture(scope="module")
def effnet() -> registry.ModelSpec:
    return registry.resolve_model(registry.EFFNET)


@pytest.fixture(scope="module")
def primed(effnet: registry.ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An XDG cache folder holding the export, made by a first home."""
    xdg = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(xdg))
        runtime.ensure_export(effnet, "onnx", tmp_path_factory.mktemp("home1") / "models", 8, samples)
    return xdg


def cached(effnet: registry.ModelSpec) -> Path:
    return runtime.onnx_path(effnet, export_cache.shared_dir())


def test_second_home_reuses_the_export(effnet: registry.ModelSpec, primed: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(primed))
    assert export_cache.is_intact(cached(effnet))

    def no_export(*args: object) -> None:
        raise AssertionError("exported again, though the cache holds the export")

    monkeypatch.setattr(runtime, "_export_onnx", no_export)
    models = tmp_path / "home2" / "models"
    runtime.ensure_export(effnet, "onnx", models, 8, samples)
    mine = runtime.onnx_path(effnet, models)
    assert export_cache.sha256_of(mine) == export_cache.sha256_of(cached(effnet))
    assert runtime.export_is_current(effnet, models)
    embedder = runtime.get_embedder(effnet, backend="onnx", cache_dir=models, threads=1)
    assert embedder.embed_images(samples()[:2]).shape == (2, effnet.dim)


def test_corrupted_cache_is_detected_and_made_again(effnet: registry.ModelSpec, primed: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg"
    shutil.copytree(primed, xdg)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    path = cached(effnet)
    with open(path, "r+b") as f:  # one flipped byte in the weights: the file still loads
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not export_cache.is_intact(path)
    exports = []
    real = runtime._export_onnx

    def counted(spec: registry.ModelSpec, dest: Path, threads: int,
                verify: Sequence[Image.Image] | None) -> None:
        exports.append(dest)
        real(spec, dest, threads, verify)

    monkeypatch.setattr(runtime, "_export_onnx", counted)
    models = tmp_path / "home3" / "models"
    runtime.ensure_export(effnet, "onnx", models, 8, samples)
    assert len(exports) == 1
    assert export_cache.is_intact(path)
    assert export_cache.sha256_of(runtime.onnx_path(effnet, models)) == export_cache.sha256_of(path)


MAKER = """
import os, sys, time
from pathlib import Path
from lookalike.models import export_cache

target, log, go = map(Path, sys.argv[1:4])
while not go.exists():
    time.sleep(0.01)

def make(tmp):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    with open(tmp, "wb") as f:
        for _ in range(20):  # slow enough for the other process to arrive while it writes
            f.write(str(os.getpid()).encode().ljust(1000, b"."))
            f.flush()
            time.sleep(0.02)

export_cache.provide(target, make, lambda p: True, dest=Path(sys.argv[4]))
"""


def test_two_processes_at_once_leave_one_good_file(tmp_path: Path) -> None:
    target, log, go = tmp_path / "cache" / "m.onnx", tmp_path / "makers", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", MAKER, str(target), str(log), str(go),
                               str(tmp_path / f"home{i}" / "m.onnx")], env=env) for i in range(2)]
    time.sleep(0.5)
    go.touch()
    assert [p.wait(60) for p in procs] == [0, 0]
    makers = log.read_text().split()
    assert len(makers) == 1  # the second waited for the first and took its file
    assert export_cache.is_intact(target)
    assert target.read_bytes() == str(makers[0]).encode().ljust(1000, b".") * 20
    for i in range(2):
        assert (tmp_path / f"home{i}" / "m.onnx").read_bytes() == target.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.onnx", "m.onnx.lock", "m.onnx.sha256"]
