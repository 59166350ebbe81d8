"""Text for people: byte sizes, and the `similar` command's report as small aligned tables."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from typing import Any

import pandas as pd

from lookalike.config import Config


def format_results(df: pd.DataFrame, cfg: Config, k: int) -> str:
    """The CLI's report: the query, then one small table per kind of match."""
    nd = cfg["neardup"]
    lines = [f"query: {df.attrs.get('query')}"]
    if df.attrs.get("model_ver"):
        lines.append(f"model: {df.attrs['model_ver']}")
    lines += [f"note: {n}" for n in df.attrs.get("notes", [])]
    sections = [("semantic", f"semantic neighbours (cosine distance, top {k})")]
    if not df.attrs.get("text"):
        sections = [
            ("exact", "exact copies (same sha256)"),
            ("near-duplicate", f"near-duplicates (pHash within {nd['phash_radius']} bits, flipped/rotated "
                               f"within {nd['orient_radius']}, or embedding cosine >= {nd['min_cosine']}; "
                               f"top {k})"),
            *sections,
        ]
    for kind, title in sections:
        part = df[df["kind"] == kind]
        lines += ["", f"{title}:"]
        if part.empty:
            lines.append("  none")
            continue
        if kind == "exact":
            for r in part.itertuples():
                lines.append(f"  image {r.image_id}  {r.width}x{r.height} {r.format}  "
                             f"{len(r.paths)} path(s):")
                lines += [f"    {p}" for p in r.paths]
                if r.path and r.path not in r.paths:
                    lines.append(f"    stored: {r.path}")
            continue
        lines += _table(part, kind)
    return "\n".join(lines)


def _table(part: pd.DataFrame, kind: str) -> list[str]:
    def dist(r: Any) -> str:  # r: a row of part.itertuples()
        if kind == "near-duplicate" and r.method != "embedding":
            return f"{r.distance:.0f} bits"
        return f"{r.distance:.4f}"  # cosine distance

    def how(r: Any) -> str:
        return f"{r.method} ({r.transform})" if r.transform else r.method

    def path(r: Any) -> str:
        more = len(r.paths) - (r.path in r.paths)  # a stored copy is not one of the found paths
        return f"{r.path or '(no path left)'}" + (f"  (+{more} more)" if more > 0 else "")

    columns: list[tuple[str, list[str], bool]] = [
        ("rank", [str(r.rank) for r in part.itertuples()], True),
        ("image", [str(r.image_id) for r in part.itertuples()], True),
        ("distance", [dist(r) for r in part.itertuples()], True),
    ]
    if kind == "near-duplicate":
        columns.append(("method", [how(r) for r in part.itertuples()], False))
    columns += [
        ("size", [f"{r.width}x{r.height}" for r in part.itertuples()], False),
        ("bytes", [human_bytes(r.bytes) for r in part.itertuples()], True),
        ("category", [r.category or "-" for r in part.itertuples()], False),
        ("path", [path(r) for r in part.itertuples()], False),
    ]
    widths = [max(len(h), *(len(v) for v in vals)) for h, vals, _ in columns]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if right else c.ljust(w)
               for c, w, (_, _, right) in zip(cells, widths, columns, strict=True)]
        return ("  " + "  ".join(out)).rstrip()

    rows = [line([h for h, _, _ in columns])]
    rows += [line([vals[i] for _, vals, _ in columns]) for i in range(len(part))]
    return rows


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1000:
        return f"{n} B"
    size, unit = float(n) / 1000, "kB"
    for bigger in ("MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{size:.1f} {unit}"


FORMATS = ("csv", "tsv", "json", "table")


def format_rows(header: list[str], rows: list[tuple], fmt: str) -> str:
    """Query results as text: CSV or TSV (LF line endings), JSON (a list of objects) or an aligned
    table with a row count, as psql prints on a terminal."""
    if fmt in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "json":
        return json.dumps([dict(zip(header, row, strict=True)) for row in rows], default=str, indent=1) + "\n"
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], int | float | Decimal) or row[i] is None for row in rows) and bool(rows)
               for i in range(len(header))]

    def line(values: list[str]) -> str:
        return " | ".join(v.rjust(w) if num else v.ljust(w)
                          for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    lines = [" | ".join(h.center(w) for h, w in zip(header, widths, strict=True)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    lines += [line(r) for r in cells]
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines) + "\n"
