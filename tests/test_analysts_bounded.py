"""The analyst surfaces stay bounded however large the catalog: every Catalog frame within its
limit, paging that covers a table once, exports streamed, report pages of a set size (#21).

The catalog is bench/big_catalog.py's synthetic one (the product's own load path, with
synthetic features), small enough to build in seconds; bench/analysts.py times the same
surfaces on a million images.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from lookalike import Catalog
from lookalike.config import load_config
from lookalike.read import report as report_module
from lookalike.read.catalog import ROWS
from lookalike.read.report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from big_catalog import build

FILES = 3000


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(None, tmp_path_factory.mktemp("synthetic") / "home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LOOKALIKE_DSN", raising=False)
        build(cfg, FILES, weeks=3, thumbnails=6, say=lambda _: None)
    return cfg.home


@pytest.fixture(scope="module")
def cat(home: Path) -> Catalog:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LOOKALIKE_DSN", raising=False)
        catalog = Catalog(home=home)
    yield catalog
    catalog.close()


def bounded_calls(cat: Catalog, k: int) -> dict[str, tuple[pd.DataFrame, int, str]]:
    """Every frame-returning Catalog method called with a bound k: (frame, bound, what it counts)."""
    largest = int(cat.clusters(limit=1)["cluster_id"].iloc[0])
    return {
        "images": (cat.images(limit=k), k, "rows"),
        "paths": (cat.paths(limit=k), k, "rows"),
        "errors": (cat.errors(limit=k), k, "rows"),
        "runs": (cat.runs(limit=2), 2, "rows"),
        "near_duplicates": (cat.near_duplicates(limit=k), k, "rows"),
        "groups": (cat.groups(limit=k), k, "group_id"),
        "clusters": (cat.clusters(limit=k), k, "rows"),
        "members": (cat.members(largest, limit=k), k, "rows"),
        "growth": (cat.growth(limit=k), k, "rows"),
        "arrivals": (cat.arrivals(limit=2), 2, "rows"),
        "embeddings": (cat.embeddings(limit=k), k, "rows"),
        "find": (cat.find("animal", limit=k), k, "rows"),
        "similar": (cat.similar(int(cat.images(limit=1)["image_id"].iloc[0]), k=k), 3 * k, "rows"),
        # one row (a summary) or one per period: bounded by the catalog's time span, not its size
        "timeline": (cat.timeline("year"), 10, "rows"),
        "wasted_bytes": (cat.wasted_bytes(), 1, "rows"),
        "sql": (cat.sql("SELECT 1 AS one"), 1, "rows"),
    }


def test_every_frame_within_its_limit(cat: Catalog) -> None:
    k = 7
    calls = bounded_calls(cat, k)
    # Every public method that returns a frame is checked here (a new one must be added above).
    frames = {name for name, member in inspect.getmembers(Catalog, inspect.isfunction)
              if not name.startswith("_") and "DataFrame" in str(inspect.signature(member).return_annotation)}
    assert frames - {"stream"} == set(calls)
    for name, (frame, bound, counted) in calls.items():
        n = len(frame) if counted == "rows" else frame[counted].nunique()
        assert 0 < n <= bound, (name, n, bound)
    # The catalog is larger than every bound, so the bounds above were what held.
    assert len(cat.images(limit=None)) > k and cat.groups(limit=None)["group_id"].nunique() > k
    # The defaults are bounds too.
    defaults = {name: inspect.signature(getattr(Catalog, name)).parameters["limit"].default
                for name in ("images", "paths", "errors", "near_duplicates", "runs", "groups", "clusters",
                             "members", "growth", "arrivals", "embeddings", "find")}
    assert all(isinstance(v, int) and 0 < v <= ROWS for v in defaults.values()), defaults


def test_paging_covers_each_row_once(cat: Catalog) -> None:
    every = cat.images(limit=None)
    pages, after = [], None
    while not (page := cat.images(limit=400, after=after)).empty:
        pages.append(page)
        after = int(page["image_id"].iloc[-1])
    paged = pd.concat(pages)
    assert len(pages) == math.ceil(len(every) / 400)
    assert paged["image_id"].tolist() == every["image_id"].tolist()
    paths, after = [], None
    while not (page := cat.paths(limit=500, after=after)).empty:
        paths += page["path"].tolist()
        after = page["path"].iloc[-1]
    assert paths == cat.paths(limit=None)["path"].tolist() and len(set(paths)) == len(paths)
    groups = cat.groups(limit=None)
    first, second = cat.groups(limit=5), cat.groups(limit=5, offset=5)
    assert set(first["group_id"]).isdisjoint(second["group_id"])
    assert list(dict.fromkeys(groups["group_id"]))[:10] == [*dict.fromkeys(first["group_id"]),
                                                             *dict.fromkeys(second["group_id"])]


def test_stream_and_export(cat: Catalog, tmp_path: Path) -> None:
    batches = list(cat.stream("SELECT id FROM images ORDER BY id", rows=1000))
    assert all(len(b) <= 1000 for b in batches) and len(batches) > 1
    assert pd.concat(batches)["id"].tolist() == cat.images(limit=None)["image_id"].tolist()
    selection = cat.find("animal", limit=None)
    assert cat.export(selection, tmp_path / "animals.parquet") == len(selection) > 0
    table = pq.read_table(tmp_path / "animals.parquet").to_pandas()
    assert sorted(table["image_id"]) == sorted(selection["image_id"])
    assert table["paths"].map(len).min() >= 1 and table["category"].notna().all()
    assert cat.export(selection["image_id"].tolist(), tmp_path / "animals.csv") == len(selection)
    csv = pd.read_csv(tmp_path / "animals.csv")
    assert csv["image_id"].tolist() == table["image_id"].tolist()
    assert cat.export([], tmp_path / "none.csv") == 0 and list(pd.read_csv(tmp_path / "none.csv").columns)
    with pytest.raises(ValueError, match=r"csv or \.parquet"):
        cat.export(selection, tmp_path / "animals.xlsx")


def test_time_growth_and_waste(cat: Catalog) -> None:
    arrivals = cat.arrivals(by="run")
    assert arrivals["images"].sum() == len(cat.images(limit=None)) and len(arrivals) == 3
    # the three categories most joined, "name count, name count, name count" (a name may hold commas)
    assert (arrivals["categories"].str.count(r" \d+(?:, |$)") == 3).all()
    first_run = int(arrivals["run_id"].iloc[0])
    top = cat.sql("SELECT c.name, count(*) AS n FROM images i JOIN image_cluster ic ON ic.image_id = i.id "
                  "JOIN clusters c ON c.id = ic.cluster_id WHERE i.run_id = %s GROUP BY c.id, c.name "
                  "ORDER BY n DESC, c.id LIMIT 1", (first_run,)).iloc[0]
    assert arrivals["categories"].iloc[0].startswith(f"{top['name']} {top['n']}")
    growth = cat.growth(runs=1, limit=None)
    assert growth["new_images"].sum() == arrivals["images"].iloc[-1]
    assert (growth["share"] <= 1).all() and growth["new_images"].is_monotonic_decreasing
    waste = cat.wasted_bytes().iloc[0]
    groups = cat.groups(limit=None, order="wasted")
    per_group = groups.drop_duplicates("group_id")["wasted_bytes"]
    assert per_group.is_monotonic_decreasing and per_group.sum() == waste["near_wasted_bytes"] > 0
    kept = groups.loc[groups["keep"]]
    assert (groups.groupby("group_id")["bytes"].sum() - kept.set_index("group_id")["bytes"]).sum() == \
        waste["near_wasted_bytes"]
    copies = cat.paths(limit=None).drop_duplicates("image_id")
    assert waste["exact_images"] == (copies["copies"] > 1).sum() > 0


def test_report_pages_bounded(cat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "GROUPS_PER_PAGE", 10)
    summary = write_report(cat, tmp_path / "report", per_cluster=3, max_groups=25, max_errors=2)
    out = tmp_path / "report"
    clusters = cat.clusters(limit=None)
    assert len(list((out / "categories").glob("*.html"))) == len(clusters) == summary.clusters
    for page in (out / "categories").glob("*.html"):
        assert len(re.findall(r"<figure ", page.read_text())) <= 3
    group_pages = sorted((out / "groups").glob("*.html"))
    assert len(group_pages) == 3 and summary.groups == 25
    assert [len(re.findall(r"data-group-id='", p.read_text())) for p in group_pages] == [10, 10, 5]
    index = (out / "index.html").read_text()
    assert "<img " not in index and len(re.findall(r"<tr class=cluster ", index)) == len(clusters)
    assert len(re.findall(r"<tr class=error>", (out / "errors.html").read_text())) == 2
