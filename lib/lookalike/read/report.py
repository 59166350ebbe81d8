"""A static HTML report of a catalog, in pages that stay small at a million images.

    DIR/index.html              every category by name and size, linked to its page; the latest
                                runs and the categories they joined; what duplicates waste
    DIR/categories/<id>.html    one category: the images closest to its centroid
    DIR/groups/<n>.html         near-duplicate groups, the largest first, a page of them at a time
    DIR/exact.html              images stored at more than one path
    DIR/timeline.html           the latest months by capture date
    DIR/errors.html             files that could not be catalogued

Every page opens from a file:// URL with no server and no external asset: the styles and the
one script are inline, and every thumbnail is a small copy under DIR/thumbs/ (the same relative
path as in the catalog, so a second report into DIR reuses them). Every path and message is
HTML-escaped. On load, the script counts the page's thumbnails that decoded and writes the
result into <body data-images-loaded / data-images-total>, and flags broken ones.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from PIL import Image

from lookalike.cluster.names import display
from lookalike.files import replacing
from lookalike.progress import plural
from lookalike.read.catalog import Catalog
from lookalike.read.text import human_bytes

REPORT_THUMB = 240  # px, longest side: galleries show them at about 160 px
REPORT_THUMB_QUALITY = 85
GROUPS_PER_PAGE = 50


@dataclass
class ReportSummary:
    index: Path
    clusters: int
    groups: int
    exact: int
    errors: int
    thumbnails: int  # figures, over every page
    missing: int  # catalogued images whose thumbnail file is gone
    pages: list[Path] = field(default_factory=list)
    written: int = 0  # thumbnail files made (a second report into DIR reuses the first one's)

    def describe(self) -> str:
        missing = f", {self.missing} thumbnails missing" if self.missing else ""
        return (f"report: {self.index} ({len(self.pages)} pages: {self.clusters} categories, "
                f"{self.groups} near-duplicate groups, {self.exact} images with exact copies, "
                f"{self.errors} errors, {self.thumbnails} thumbnails, {self.written} new{missing})")


def write_report(cat: Catalog, out: str | Path, per_cluster: int = 24, max_groups: int = 1000,
                 max_errors: int = 1000, max_months: int = 24) -> ReportSummary:
    """Write DIR/index.html, its pages and DIR/thumbs/. per_cluster bounds the thumbnails of a
    category page and of a group; max_groups the groups shown (GROUPS_PER_PAGE a page) and the
    images with exact copies; max_errors/max_months the other pages."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clusters = cat.clusters(limit=None)
    grown = cat.growth(runs=1, limit=None).set_index("cluster_id")["new_images"]
    arrivals = cat.arrivals(by="run", limit=12).iloc[::-1]
    waste = cat.wasted_bytes().iloc[0]
    groups = cat.groups(limit=max_groups)
    group_ids = list(dict.fromkeys(groups["group_id"]))
    errors = cat.errors(limit=max_errors)
    months = cat.timeline("month").sort_values("period", ascending=False)
    counts = cat.sql("SELECT (SELECT count(*) FROM images) AS images, (SELECT count(*) FROM image_paths) "
                     "AS paths, (SELECT count(*) FROM ingest_errors) AS errors").iloc[0]
    n_errors = int(counts["errors"])

    group_pages = [group_ids[i:i + GROUPS_PER_PAGE] for i in range(0, len(group_ids), GROUPS_PER_PAGE)]
    nav = [("index.html", plural(len(clusters), "category", "categories")),
           ("groups/1.html", plural(int(waste["near_groups"]), "near-duplicate group")),
           ("exact.html", f"{plural(int(waste['exact_images']), 'image')} with exact copies"),
           ("timeline.html", f"{plural(len(months), 'month')} of pictures"),
           ("errors.html", plural(n_errors, "error"))]
    report = _Report(cat, out, nav,
                     f"{plural(int(counts['images']), 'image')} · {plural(int(counts['paths']), 'path')}")

    ids = clusters["cluster_id"].tolist()
    for k, c in enumerate(clusters.itertuples()):
        shown = cat.members(int(c.cluster_id), limit=per_cluster)
        around = (ids[k - 1] if k else None, ids[k + 1] if k + 1 < len(ids) else None)
        report.page(f"categories/{c.cluster_id}.html", display(c.name, c.cluster_id),
                    lambda r, c=c, shown=shown, around=around: _category_page(r, c, shown, around),
                    {"cluster-id": c.cluster_id, "images": c.images})
    for n, page_ids in enumerate(group_pages or [[]], start=1):
        report.page(f"groups/{n}.html", f"Near-duplicate groups, page {n}",
                    lambda r, n=n, page_ids=page_ids: _groups_page(r, groups, page_ids, n, len(group_pages),
                                                                     int(waste["near_groups"]), per_cluster),
                    {"groups": len(page_ids)})
    exact = cat.sql(
        "SELECT i.id AS image_id, i.width, i.height, i.format, i.bytes, i.thumb_path, "
        "array_agg(p.path ORDER BY p.path) AS paths FROM images i JOIN image_paths p ON p.image_id = i.id "
        "GROUP BY i.id HAVING count(*) > 1 ORDER BY count(*) DESC, i.id LIMIT %s", (max_groups,))
    report.page("exact.html", "Exact copies", lambda r: _exact_page(r, exact, int(waste["exact_images"])),
                {"exact": len(exact)})
    report.page("timeline.html", "By capture date",
                lambda r: _timeline_page(r, cat, months.head(max_months), per_cluster), {})
    report.page("errors.html", "Errors", lambda r: _errors_page(errors, n_errors), {"errors": len(errors)})
    report.make_thumbnails()
    index = report.page("index.html", "lookalike catalog report",
                        lambda r: _index_page(r, clusters, grown, arrivals, waste),
                        {"clusters": len(clusters), "groups": len(group_ids),
                         "group-pages": len(group_pages)})
    return ReportSummary(index, len(clusters), len(group_ids), int(waste["exact_images"]), n_errors,
                         report.thumbnails, report.missing, report.pages, report.written)


class _Report:
    """Writes the pages (each through a temporary name: a reader never sees half a page), and
    copies thumbnails into DIR/thumbs as they are referenced."""

    def __init__(self, cat: Catalog, out: Path, nav: Sequence[tuple[str, str]] = (),
                 counts: str = "") -> None:
        self.cat = cat
        self.out = out
        self.nav = nav  # (page under DIR, its link text) in every page's header
        self.counts = counts  # the catalog's size, in every page's header
        self.thumbnails = 0  # figures written, over every page
        self.written = 0  # thumbnail files made
        self.missing = 0
        self.pages: list[Path] = []
        self._depth = 0  # folders between the page being written and DIR
        self._to_make: dict[Path, Path] = {}  # report thumbnail -> the catalog's, to make
        self._page_thumbnails = 0

    def page(self, name: str, title: str, body: Callable[[_Report], list[str]],
             data: dict[str, object]) -> Path:
        """Render `body(self)` (a list of lines) as DIR/name under the common header."""
        self._depth = name.count("/")
        self._page_thumbnails = 0
        lines = body(self)
        links = "".join(f"<a href='{_e(self.link(href))}'>{_e(text)}</a>" for href, text in self.nav)
        attributes = " ".join(f"data-{k}='{_e(v)}'" for k, v in {**data,
                              "thumbnails": self._page_thumbnails}.items())
        document = "\n".join([
            "<!doctype html>",
            "<html lang=en><head><meta charset=utf-8>",
            "<meta name=viewport content='width=device-width, initial-scale=1'>",
            f"<title>{_e(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            f"<body {attributes}>",
            "<header>",
            f"<h1>{_e(title)}</h1>",
            f"<p class=meta>{_e(self.cat.where)} · model {_e(self.cat.model_ver or '(none yet)')} · "
            f"generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}</p>",
            f"<nav>{links}<span>{_e(self.counts)}</span></nav>",
            "<p id=broken-banner hidden></p>",
            "</header>",
            *lines,
            f"<script>{SCRIPT}</script>",
            "</body></html>",
        ])
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            tmp.write_text(document, encoding="utf-8")
        self.pages.append(path)
        return path

    def link(self, name: str) -> str:
        """A link from the page being written to DIR/name."""
        return quote("../" * self._depth + name)

    def thumb_src(self, thumb_path: str) -> str | None:
        """The page-relative URL of a small copy of the thumbnail, made by make_thumbnails();
        None if the catalog lost the thumbnail."""
        dest = self.out / "thumbs" / thumb_path
        if dest not in self._to_make and not dest.exists():
            source = self.cat.layout.thumbs / thumb_path
            if not source.is_file():
                self.missing += 1
                return None
            self._to_make[dest] = source
        self.thumbnails += 1
        self._page_thumbnails += 1
        return self.link(f"thumbs/{thumb_path}")

    def make_thumbnails(self) -> None:
        """The small copies the pages refer to, on every core (Pillow decodes, resizes and
        encodes without the GIL): a million-image report shows ~100k of them."""
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            self.written += sum(pool.map(_small_copy, self._to_make.values(), self._to_make.keys()))
        self._to_make.clear()

    def figure(self, image_id: int, thumb_path: str, path: str | None, caption: list[str],
               css: str = "") -> str:
        src = self.thumb_src(thumb_path)
        alt = f"image {image_id}"
        picture = (f"<img src='{_e(src)}' alt='{_e(alt)}' width={REPORT_THUMB} height={REPORT_THUMB}>"
                   if src else "<div class=nothumb>thumbnail missing</div>")
        link = _file_url(path)
        if link:
            picture = f"<a href='{_e(link)}'>{picture}</a>"
        title = f" title='{_e(path)}'" if path else ""
        lines = "".join(f"<span>{_e(c)}</span>" for c in caption)
        # The path is cut from the left (rtl) so the file name shows; the LRM keeps its leading "/" first.
        path_line = f"<span class=path>\u200e{_e(path) if path else '(no path)'}</span>"
        return (f"<figure class='{css}' data-image-id='{image_id}'{title}>{picture}"
                f"<figcaption>{lines}{path_line}</figcaption></figure>")


def _small_copy(source: Path, dest: Path) -> int:
    """Write a REPORT_THUMB copy of a catalog thumbnail (bilinear: as sharp at this size as
    Lanczos, at half its cost)."""
    with Image.open(source) as im:
        im.draft("RGB", (REPORT_THUMB, REPORT_THUMB))  # a large JPEG decodes at a fraction of its size
        small = im.convert("RGB")
    small.thumbnail((REPORT_THUMB, REPORT_THUMB), Image.Resampling.BILINEAR)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp:
        small.save(tmp, "JPEG", quality=REPORT_THUMB_QUALITY)
    return 1


def _index_page(r: _Report, clusters: pd.DataFrame, grown: pd.Series, arrivals: pd.DataFrame,
                waste: pd.Series) -> list[str]:
    out = ["<section id=arrivals>", "<h2>Latest runs</h2>"]
    out += _table(["run", "new images", "bytes", "the categories most of them joined"],
                  [f"<tr class=arrival><td>{a.run_id}</td><td>{a.images}</td>"
                   f"<td>{human_bytes(a.bytes)}</td><td>{_e(a.categories or '')}</td></tr>"
                   for a in arrivals.itertuples()], empty="Nothing catalogued yet.")
    out.append("</section>")
    out += ["<section id=waste>", "<h2>What duplicates take</h2>",
            f"<p>Exact copies: {int(waste['exact_images'])} images at more than one path, "
            f"{human_bytes(int(waste['exact_wasted_bytes']))} in their extra paths "
            f"(<a href='{r.link('exact.html')}'>list</a>). "
            f"Near-duplicates: {int(waste['near_groups'])} groups, "
            f"{human_bytes(int(waste['near_wasted_bytes']))} in the copies other than the one to keep "
            f"(<a href='{r.link('groups/1.html')}'>groups</a>).</p>", "</section>"]
    out += ["<section id=clusters>", f"<h2>Similarity categories · {len(clusters)}</h2>"]
    out += _table(["category", "images", "joined in the latest batch", "mean similarity"],
                  [f"<tr class=cluster data-cluster-id='{c.cluster_id}' data-images='{c.images}'>"
                   f"<td><a href='{r.link(f'categories/{c.cluster_id}.html')}'>"
                   f"{_e(display(c.name, c.cluster_id))}</a> <small>#{c.cluster_id}</small></td>"
                   f"<td>{c.images}</td><td>{int(grown.get(c.cluster_id, 0))}</td>"
                   f"<td>{c.mean_sim:.2f}</td></tr>" for c in clusters.itertuples()],
                  empty="No categories yet: the catalog has no embedded images.")
    out.append("</section>")
    return out


def _category_page(r: _Report, c: Any, shown: pd.DataFrame,
                   around: tuple[int | None, int | None]) -> list[str]:
    steps = [f"<a href='{r.link(f'categories/{cid}.html')}'>{label}</a>"
             for cid, label in zip(around, ("larger category", "smaller category"), strict=True) if cid]
    more = f" · the {len(shown)} closest to the centroid" if c.images > len(shown) else ""
    out = [f"<p class=steps>{' · '.join(steps)}</p>",
           f"<div class=cluster id='cluster-{c.cluster_id}' data-cluster-id='{c.cluster_id}' "
           f"data-images='{c.images}'>",
           f"<h2>#{c.cluster_id} · {c.images} images{more}</h2>", "<div class=gallery>"]
    for m in shown.itertuples():
        out.append(r.figure(m.image_id, m.thumb_path, m.path,
                            [f"#{m.image_id} · {m.width}×{m.height} {m.format}",
                             f"similarity {m.sim_score:.2f}"]))
    out.append("</div></div>")
    return out


def _groups_page(r: _Report, groups: pd.DataFrame, group_ids: list[int], page: int, pages: int,
                 total: int, per_group: int) -> list[str]:
    shown = len(groups["group_id"].unique())
    out = ["<section id=near-duplicates>"]
    if not total:
        return [*out, "<p class=empty>No near-duplicate groups yet.</p>", "</section>"]
    out.append(f"<p>{total} groups{f'; the {shown} largest are shown' if shown < total else ''}, "
               f"{GROUPS_PER_PAGE} a page. Keep: the largest resolution, then the most bytes. Distances "
               "are to the copy to keep: the detected pair's method and distance, and pHash bits.</p>")
    out.append("<p class=pages>" + " ".join(
        f"<strong>{n}</strong>" if n == page else f"<a href='{r.link(f'groups/{n}.html')}'>{n}</a>"
        for n in range(1, pages + 1)) + "</p>")
    by_group = {gid: part for gid, part in groups[groups["group_id"].isin(group_ids)].groupby("group_id")}
    for gid in group_ids:
        part = by_group[gid]
        out.append(f"<div class=group id='group-{gid}' data-group-id='{gid}' data-members='{len(part)}'>")
        out.append(f"<h3>Group {gid} <small>{len(part)} images · "
                   f"{human_bytes(int(part['wasted_bytes'].iloc[0]))} in the copies not kept</small></h3>"
                   "<div class=gallery>")
        for m in part.head(per_group).itertuples():
            if m.keep:
                how = "keep"
            elif m.method == "phash_orient":  # its plain pHash distance says nothing: it is flipped
                how = f"flipped/rotated · pHash {m.distance:.0f} bits"
            elif m.method == "embedding":
                how = f"embedding {m.distance:.3f} · pHash {m.phash_to_keep} bits"
            else:
                how = f"pHash {m.phash_to_keep} bits"
            out.append(r.figure(m.image_id, m.thumb_path, m.path,
                                [f"#{m.image_id} · {m.width}×{m.height} {m.format}",
                                 f"{human_bytes(m.bytes)} · {m.paths} path(s)", how],
                                "keep" if m.keep else "dup"))
        out.append("</div></div>")
    out.append("</section>")
    return out


def _exact_page(r: _Report, exact: pd.DataFrame, total: int) -> list[str]:
    out = ["<section id=exact>", f"<h2>{total} images stored at more than one path</h2>"]
    if exact.empty:
        out.append("<p class=empty>No file is stored twice.</p>")
    elif len(exact) < total:
        out.append(f"<p>The {len(exact)} images with the most copies are shown.</p>")
    for e in exact.itertuples():
        figure = r.figure(e.image_id, e.thumb_path, e.paths[0],
                          [f"#{e.image_id} · {e.width}×{e.height} {e.format}", human_bytes(e.bytes)])
        paths = "".join(f"<li>{_e(p)}</li>" for p in e.paths)
        out.append(f"<div class=exact data-image-id='{e.image_id}'>{figure}<ul>{paths}</ul></div>")
    out.append("</section>")
    return out


def _timeline_page(r: _Report, cat: Catalog, months: pd.DataFrame, per_month: int) -> list[str]:
    """The latest months by capture date, each with its first pictures."""
    out = ["<section id=timeline>"]
    if months.empty:
        return [*out, "<p class=empty>No capture times yet.</p>", "</section>"]
    shown = cat.sql(
        "SELECT * FROM (SELECT date_trunc('month', taken_at) AS period, id AS image_id, thumb_path, "
        "coalesce(store_path, path_original) AS path, width, height, format, taken_at, row_number() OVER "
        "(PARTITION BY date_trunc('month', taken_at) ORDER BY taken_at, id) AS rank FROM images "
        "WHERE taken_at >= %(since)s) x WHERE rank <= %(per)s ORDER BY period DESC, rank",
        {"since": months["period"].min(), "per": per_month})
    by_month = {p: part for p, part in shown.groupby("period")}
    for m in months.itertuples():
        exif = f" · {m.from_exif} from EXIF" if m.from_exif != m.images else ""
        out.append(f"<div class=month data-period='{m.period:%Y-%m}' data-images='{m.images}'>")
        out.append(f"<h3>{m.period:%B %Y} <small>{m.images} images{exif}</small></h3><div class=gallery>")
        for t in by_month.get(m.period, shown.iloc[0:0]).itertuples():
            out.append(r.figure(t.image_id, t.thumb_path, t.path,
                                [f"#{t.image_id} · {t.taken_at:%Y-%m-%d %H:%M}",
                                 f"{t.width}×{t.height} {t.format}"]))
        out.append("</div></div>")
    out.append("</section>")
    return out


def _errors_page(errors: pd.DataFrame, total: int) -> list[str]:
    out = ["<section id=errors>", f"<h2>Files that could not be catalogued · {total}</h2>"]
    if 0 < len(errors) < total:
        out.append(f"<p>The latest {len(errors)} are listed.</p>")
    out += _table(["path", "error", "reason", "when"],
                  [f"<tr class=error><td class=path>{_e(e.path)}</td><td><code>{_e(e.error)}</code></td>"
                   f"<td>{_e(e.message)}</td><td class=when>{e.at:%Y-%m-%d %H:%M}</td></tr>"
                   for e in errors.itertuples()], empty="None.")
    return [*out, "</section>"]


def _table(headers: list[str], rows: list[str], empty: str) -> list[str]:
    """A table's lines: its header row, then `rows` (each a whole <tr>); without rows, the
    `empty` message in its place."""
    if not rows:
        return [f"<p class=empty>{_e(empty)}</p>"]
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return [f"<table><thead><tr>{head}</tr></thead><tbody>", *rows, "</tbody></table>"]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _file_url(path: str | None) -> str | None:
    if not path or not path.startswith("/"):
        return None
    try:
        return Path(path).as_uri()
    except ValueError:
        return None


STYLE = """
:root { color-scheme: light; --line: #d8dde3; --muted: #5b6570; --keep: #1d7a3a; --dup: #b35c00; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 24px 48px;
       color: #1c2329; background: #fafbfc; }
header { position: sticky; top: 0; background: #fafbfcf2; border-bottom: 1px solid var(--line);
         padding: 12px 0 8px; z-index: 1; }
section, .cluster, .group { scroll-margin-top: 120px; }  /* anchors land below the sticky header */
.pages strong, .pages a { margin-right: 6px; }
h1 { font-size: 20px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 16px 0 6px; }
h3 small, .meta, .hint, .empty { color: var(--muted); font-weight: normal; }
nav { display: flex; gap: 16px; flex-wrap: wrap; }
nav a { color: #0b5cad; text-decoration: none; }
#broken-banner { background: #fde8e8; border: 1px solid #e0a0a0; padding: 6px 10px; margin: 8px 0 0; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(168px, 1fr)); gap: 10px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px;
         min-width: 0; }
figure img, .nothumb { display: block; width: 100%; height: 150px; object-fit: contain;
                       background: #eef1f4; border-radius: 3px; }
.nothumb { display: flex; align-items: center; justify-content: center; color: var(--muted); }
figure.broken { border-color: #d33; }
figcaption { display: flex; flex-direction: column; font-size: 12px; margin-top: 4px; }
figcaption .path { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
                   direction: rtl; text-align: left; }
figure.keep { border: 2px solid var(--keep); }
figure.keep figcaption span:nth-child(3) { color: var(--keep); font-weight: 600; }
figure.dup figcaption span:nth-child(3) { color: var(--dup); }
.exact { display: flex; gap: 12px; align-items: flex-start; margin: 8px 0; }
.exact figure { width: 180px; flex: none; }
.exact ul { margin: 0; padding-left: 18px; font-family: ui-monospace, monospace; font-size: 12px;
            word-break: break-all; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
td.when { white-space: nowrap; }
td.path { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
"""

# Counts the thumbnails that decoded (naturalWidth > 0) once the page has loaded, for people
# (a banner) and for tests (data attributes on <body>).
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  imgs.forEach(function (i) {
    if (!(i.complete && i.naturalWidth > 0)) { i.closest('figure').classList.add('broken'); }
  });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok.length));
  if (ok.length < imgs.length) {
    var banner = document.getElementById('broken-banner');
    banner.textContent = (imgs.length - ok.length) + ' of ' + imgs.length +
      ' thumbnails did not load: keep the thumbs/ folder next to index.html.';
    banner.hidden = false;
  }
});
"""
