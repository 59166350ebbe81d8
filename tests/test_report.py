"""`lookalike report`: a static HTML report, checked in headless Chromium from a file:// URL."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from test_catalog import BROKEN_NAME, RESIZED_NAME, analyst_home

from lookalike import Catalog
from lookalike.cli import main
from lookalike.read.report import write_report

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analyst_home(tmp_path_factory)


@pytest.fixture(scope="module")
def report(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LOOKALIKE_DSN", raising=False)
        assert main(["report", "--out", str(out), "--home", str(home)]) == 0
    return out / "index.html"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    # Not a skip: the report is only checked here. `make install` installs Debian's chromium.
    pytest.fail("headless Chromium is needed to check the HTML report: apt-get install -y chromium")


def browse(page: Path, profile: Path, *args: str) -> str:
    done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def body_attributes(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def test_pages_render_with_every_thumbnail(report: Path, home: Path, tmp_path: Path) -> None:
    pages = sorted(report.parent.rglob("*.html"))
    doms = {page.relative_to(report.parent).as_posix(): browse(page, tmp_path / "profile", "--dump-dom")
            for page in pages}
    assert {"index.html", "groups/1.html", "exact.html", "timeline.html", "errors.html"} <= set(doms)
    with Catalog(home=home) as cat:
        clusters, groups, errors = cat.clusters(), cat.groups(), cat.errors()
        copied = cat.paths().query("copies > 1")["image_id"].nunique()
        months = cat.timeline("month").sort_values("period", ascending=False).head(24)
        members = cat.members(limit=24)
    category_pages = {p for p in doms if p.startswith("categories/")}
    assert category_pages == {f"categories/{c}.html" for c in clusters["cluster_id"]}
    # On every page, the inline script counted every <img> as decoded (naturalWidth > 0) after load.
    thumbnails = 0
    for name, dom in doms.items():
        body = body_attributes(dom)
        assert body["data-images-loaded"] == body["data-images-total"] == body["data-thumbnails"], name
        thumbnails += int(body["data-thumbnails"])
    # A thumbnail a gallery figure: categories, groups, exact copies and the months of capture.
    assert thumbnails == len(members) + len(groups) + copied + int(months["images"].clip(upper=24).sum())
    for c in clusters.itertuples():  # each category's page shows its closest members
        dom = doms[f"categories/{c.cluster_id}.html"]
        shown = set(members.loc[members["cluster_id"] == c.cluster_id, "image_id"])
        assert {int(i) for i in re.findall(r'data-image-id="(\d+)"', dom)} == shown
    index = doms["index.html"]
    assert [int(c) for c in re.findall(r'class="cluster" data-cluster-id="(\d+)"', index)] == \
        clusters["cluster_id"].tolist()  # every category, by name and size, largest first
    assert [int(n) for n in re.findall(r'class="cluster" [^>]*data-images="(\d+)"', index)] == \
        clusters["images"].tolist()
    group_pages = "".join(dom for name, dom in doms.items() if name.startswith("groups/"))
    assert {int(g) for g in re.findall(r'data-group-id="(\d+)"', group_pages)} == set(groups["group_id"])
    assert len(re.findall(r'<figure class="keep"', group_pages)) == groups["group_id"].nunique()
    assert len(re.findall(r'<tr class="error">', doms["errors.html"])) == len(errors) == \
        int(body_attributes(doms["errors.html"])["data-errors"])
    # Hostile file names are text, never markup.
    every = "".join(doms.values())
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in every and "<img src=x" not in every.replace('"', "")
    assert 'odd &lt;b&gt;&amp;amp; "quoted" \'name\'.jpg' in every and "<b>" not in every
    for page in pages:
        html = page.read_text()
        assert BROKEN_NAME not in html and RESIZED_NAME not in html
        # Self-contained: nothing fetched from anywhere but the report's own folder.
        assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", html)
        assert all((page.parent / unquote(src)).is_file() for src in re.findall(r"src='([^']+)'", html))
        assert all((page.parent / unquote(href)).is_file()
                   for href in re.findall(r"href='([^'#:]+\.html)'", html)), page


def test_pages_are_bounded(home: Path, tmp_path: Path) -> None:
    with Catalog(home=home) as cat:
        summary = write_report(cat, tmp_path / "small", per_cluster=2, max_groups=1, max_errors=1,
                               max_months=1)
        assert summary.groups == 1 and summary.errors == len(cat.errors()) > 1
    out = tmp_path / "small"
    for page in (out / "categories").glob("*.html"):
        assert int(body_attributes(page.read_text().replace("'", '"'))["data-thumbnails"]) <= 2
    assert [p.name for p in (out / "groups").glob("*.html")] == ["1.html"]
    assert len(re.findall(r"data-group-id='", (out / "groups" / "1.html").read_text())) == 1
    assert len(re.findall(r"<tr class=error>", (out / "errors.html").read_text())) == 1
    assert len(re.findall(r"<div class=month ", (out / "timeline.html").read_text())) == 1


def test_screenshot_and_a_broken_thumbnail(report: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    largest = re.search(r"href='(categories/\d+\.html)'", report.read_text()).group(1)
    browse(report.parent / largest, tmp_path / "profile", f"--screenshot={png}", "--window-size=1280,1600",
           "--hide-scrollbars")
    with Image.open(png) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 20  # thumbnails, not a blank page
    # A report whose thumbs/ folder lost a file says so on the page.
    copy = tmp_path / "copy"
    shutil.copytree(report.parent, copy)
    page = copy / largest
    src = re.search(r"<img src='([^']+)'", page.read_text()).group(1)
    (page.parent / unquote(src)).unlink()
    figures = page.read_text().count(src)
    dom = browse(page, tmp_path / "profile2", "--dump-dom")
    body = body_attributes(dom)
    assert figures >= 1  # a picture may be shown twice (two images with one thumbnail)
    assert int(body["data-images-loaded"]) == int(body["data-images-total"]) - figures
    assert 'id="broken-banner">' in dom and "thumbnails did not load" in dom
    assert len(re.findall(r'<figure class="[^"]*broken', dom)) >= 1
