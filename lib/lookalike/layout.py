"""Where a catalog home keeps things: PostgreSQL data, manifests, stage outputs, thumbnails,
model exports, the near-duplicate indexes, logs and scratch space. Every path under a home is named here."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def machine_cache(kind: str) -> Path:
    """A cache shared by every home of this user on this machine: $XDG_CACHE_HOME/lookalike/<kind>
    (default ~/.cache/lookalike/<kind>). Model exports, the embedded PostgreSQL's initdb template."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lookalike" / kind


def file_safe(model_ver: str) -> str:
    """model_ver as part of a file name (open_clip versions hold ':' and '/')."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", model_ver)


@dataclass(frozen=True)
class Layout:
    home: Path
    store: Path | None = None  # the content-addressed store's root, when the catalog has one

    @property
    def pg(self) -> Path:
        """The embedded PostgreSQL's data folder (unused with an external DSN)."""
        return self.home / "pg"

    @property
    def index(self) -> Path:
        """The near-duplicate indexes, kept between runs (lookalike.dedup.indexes)."""
        return self.home / "index"

    @property
    def thumbs(self) -> Path:
        """Thumbnails, <ab>/<cd>/<sha256>_<size>.jpg: in the store when there is one (DESIGN.md)."""
        return self.store / "thumbs" if self.store is not None else self.home / "thumbs"

    @property
    def manifests(self) -> Path:
        return self.home / "manifests"

    @property
    def models(self) -> Path:
        return self.home / "models"

    def manifest(self, manifest_id: str) -> Path:
        return self.manifests / f"{manifest_id}.parquet"

    @property
    def all_stages(self) -> Path:
        return self.home / "stages"

    def stages(self, manifest_id: str) -> Path:
        """Every stage output of one manifest: kept until the manifest is loaded, for resuming."""
        return self.all_stages / manifest_id

    def stage(self, manifest_id: str, name: str) -> Path:
        """A stage's Parquet output for one manifest (a Spark output folder with _SUCCESS)."""
        return self.stages(manifest_id) / name

    @property
    def log_file(self) -> Path:
        """Every command's detail: DEBUG lines, the JVM's output, failures' tracebacks."""
        return self.home / "logs" / "lookalike.log"

    @property
    def progress(self) -> Path:
        """A running run's progress, rewritten every few seconds for `lookalike status`."""
        return self.home / "progress.json"

    @property
    def scratch(self) -> Path:
        """Spilled vectors and other temporary files of one run (memory-mapped, GBs at 1M images)."""
        return self.home / "scratch"

    @staticmethod
    def is_complete(stage_dir: Path) -> bool:
        return (stage_dir / "_SUCCESS").exists()
