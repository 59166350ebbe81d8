"""`lookalike report`: a static HTML report, checked in headless Chromium from a file:// URL."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from test_catalog import BROKEN_NAME, RESIZED_NAME, analyst_home

from lookalike import Catalog
from lookalike.cli import main

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


def test_galleries_render_with_every_thumbnail(report: Path, home: Path, tmp_path: Path) -> None:
    dom = browse(report, tmp_path / "profile", "--dump-dom")
    body = body_attributes(dom)
    with Catalog(home=home) as cat:
        clusters, groups, errors = cat.clusters(), cat.groups(), cat.errors()
        copied = cat.paths().query("copies > 1")["image_id"].nunique()
        months = cat.timeline("month").sort_values("period", ascending=False).head(24)
        # A thumbnail a gallery figure: categories, groups, exact copies and the months of capture.
        shown = len(cat.members(limit=24)) + len(groups) + copied + int(months["images"].clip(upper=24).sum())
    # The inline script counted every <img> as decoded (naturalWidth > 0) after the load event.
    assert body["data-images-loaded"] == body["data-images-total"] == body["data-thumbnails"] == str(shown)
    assert {int(c) for c in re.findall(r'data-cluster-id="(\d+)"', dom)} == set(clusters["cluster_id"])
    assert [int(n) for n in re.findall(r'class="cluster" [^>]*data-images="(\d+)"', dom)] == \
        clusters["images"].tolist()
    assert {int(g) for g in re.findall(r'data-group-id="(\d+)"', dom)} == set(groups["group_id"])
    assert len(re.findall(r'<tr class="error">', dom)) == len(errors) == int(body["data-errors"])
    assert len(re.findall(r'<figure class="keep"', dom)) == groups["group_id"].nunique()
    # Hostile file names are text, never markup.
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in dom and "<img src=x" not in dom.replace('"', "")
    assert 'odd &lt;b&gt;&amp;amp; "quoted" \'name\'.jpg' in dom and "<b>" not in dom
    html = report.read_text()
    assert BROKEN_NAME not in html and RESIZED_NAME not in html
    # Self-contained: nothing fetched from anywhere but the report's own folder.
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", html)
    assert all((report.parent / src).is_file() for src in re.findall(r"src='([^']+)'", html))


def test_screenshot_and_a_broken_thumbnail(report: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    browse(report, tmp_path / "profile", f"--screenshot={png}", "--window-size=1280,1600",
           "--hide-scrollbars")
    with Image.open(png) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 20  # thumbnails, not a blank page
    # A report whose thumbs/ folder lost a file says so on the page.
    copy = tmp_path / "copy"
    shutil.copytree(report.parent, copy)
    lost = next((copy / "thumbs").rglob("*.jpg"))
    lost.unlink()
    figures = (copy / "index.html").read_text().count(quote(lost.relative_to(copy).as_posix()))
    dom = browse(copy / "index.html", tmp_path / "profile2", "--dump-dom")
    body = body_attributes(dom)
    assert figures >= 1  # a picture may be in a category and in its month of capture
    assert int(body["data-images-loaded"]) == int(body["data-images-total"]) - figures
    assert 'id="broken-banner">' in dom and "thumbnails did not load" in dom
    assert len(re.findall(r'<figure class="[^"]*broken', dom)) >= 1
