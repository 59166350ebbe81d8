"""Where a catalog home keeps things: PostgreSQL data, manifests, stage outputs, thumbnails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def thumbs(self) -> Path:
        return self.home / "thumbs"

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

    def scratch(self, name: str) -> Path:
        return self.home / "scratch" / name

    @staticmethod
    def is_complete(stage_dir: Path) -> bool:
        return (stage_dir / "_SUCCESS").exists()
