"""Shared fixtures: real photos from ../shared/data and fresh catalog homes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lookalike.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
UKBENCH = SHARED_DATA / "nd-ukbench"
IMAGENET = SHARED_DATA / "imagenet-dev"
HIRES = SHARED_DATA / "photos-hires"


def pytest_configure(config: pytest.Config) -> None:
    if not UKBENCH.is_dir():
        raise pytest.UsageError(f"test photos missing: {SHARED_DATA} (../shared/data beside the repo)")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def cfg(home: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    return load_config(None, home)


@pytest.fixture
def ukbench_copy(tmp_path: Path) -> Path:
    """A writable copy of nd-ukbench, so a test can add files to it."""
    dest = tmp_path / "archive"
    shutil.copytree(UKBENCH, dest)
    return dest
