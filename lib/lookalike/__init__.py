"""lookalike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lookalike.read.catalog import Catalog

__all__ = ["Catalog"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import lookalike` (every Spark worker does) stays free of pandas and psycopg.
    if name == "Catalog":
        from lookalike.read.catalog import Catalog

        return Catalog
    raise AttributeError(f"module 'lookalike' has no attribute {name!r}")
