"""A static HTML report of a catalog: cluster galleries, near-duplicate groups, exact copies, errors.

DIR/index.html opens from a file:// URL with no server and no external asset: the styles and
the one script are inline, and every thumbnail is a small copy under DIR/thumbs/ (the same
relative path as in the catalog, so a second report into DIR reuses them). Every path and
message is HTML-escaped. On load, the script counts the thumbnails that decoded and writes
the result into <body data-images-loaded / data-images-total>, and flags broken ones.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from PIL import Image

from lookalike.cluster.names import display
from lookalike.files import replacing
from lookalike.read.catalog import Catalog
from lookalike.read.text import human_bytes

REPORT_THUMB = 240  # px, longest side: galleries show them at about 160 px
REPORT_THUMB_QUALITY = 85


@dataclass
class ReportSummary:
    index: Path
    clusters: int
    groups: int
    exact: int
    errors: int
    thumbnails: int
    missing: int  # catalogued images whose thumbnail file is gone

    def describe(self) -> str:
        missing = f", {self.missing} thumbnails missing" if self.missing else ""
        return (f"report: {self.index} ({self.clusters} clusters, {self.groups} near-duplicate groups, "
                f"{self.exact} images with exact copies, {self.errors} errors, "
                f"{self.thumbnails} thumbnails{missing})")


def write_report(cat: Catalog, out: str | Path, per_cluster: int = 24, max_groups: int = 200,
                 max_errors: int = 1000, max_months: int = 24) -> ReportSummary:
    """Write DIR/index.html and DIR/thumbs/; per_cluster/max_groups/max_errors/max_months bound its
    size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(cat, out)
    clusters = cat.clusters()
    members = cat.members(limit=per_cluster)
    groups = cat.groups()
    group_ids = list(dict.fromkeys(groups["group_id"]))
    exact = cat.sql(
        "SELECT i.id AS image_id, i.width, i.height, i.format, i.bytes, i.thumb_path, "
        "array_agg(p.path ORDER BY p.path) AS paths FROM images i JOIN image_paths p ON p.image_id = i.id "
        "GROUP BY i.id HAVING count(*) > 1 ORDER BY count(*) DESC, i.id LIMIT %s", (max_groups,))
    n_exact = int(cat.sql("SELECT count(*) AS n FROM (SELECT 1 FROM image_paths GROUP BY image_id "
                          "HAVING count(*) > 1) x")["n"].iloc[0])
    errors = cat.errors()
    months = cat.timeline("month").sort_values("period", ascending=False)
    counts = cat.sql("SELECT (SELECT count(*) FROM images) AS images, (SELECT count(*) FROM image_paths) "
                     "AS paths, (SELECT count(*) FROM ingest_errors) AS errors").iloc[0]

    body = [
        "<header>",
        "<h1>lookalike catalog report</h1>",
        f"<p class=meta>{_e(cat.where)} · model {_e(cat.model_ver or '(none yet)')} · "
        f"generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}</p>",
        "<nav>",
        f"<a href='#clusters'>{len(clusters)} clusters</a>",
        f"<a href='#near-duplicates'>{len(group_ids)} near-duplicate groups</a>",
        f"<a href='#exact'>{n_exact} images with exact copies</a>",
        f"<a href='#timeline'>{len(months)} months of pictures</a>",
        f"<a href='#errors'>{len(errors)} errors</a>",
        f"<span>{counts['images']} images · {counts['paths']} paths</span>",
        "</nav>",
        "<p id=broken-banner hidden></p>",
        "</header>",
        *_clusters_section(page, clusters, members, per_cluster),
        *_groups_section(page, groups, group_ids[:max_groups], per_cluster),
        *_exact_section(page, exact, n_exact),
        *_timeline_section(page, cat, months.head(max_months), per_cluster),
        *_errors_section(errors, max_errors),
    ]
    data = (f"data-clusters='{len(clusters)}' data-groups='{min(len(group_ids), max_groups)}' "
            f"data-errors='{min(len(errors), max_errors)}' data-thumbnails='{page.thumbnails}'")
    document = "\n".join([
        "<!doctype html>",
        "<html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        "<title>lookalike catalog report</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        f"<body {data}>",
        *body,
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ])
    index = out / "index.html"
    with replacing(index) as tmp:  # a reader never sees half a report
        tmp.write_text(document, encoding="utf-8")
    return ReportSummary(index, len(clusters), min(len(group_ids), max_groups), n_exact,
                         len(errors), page.thumbnails, page.missing)


class _Page:
    """Copies thumbnails into the report as they are referenced, and renders figures."""

    def __init__(self, cat: Catalog, out: Path) -> None:
        self.cat = cat
        self.out = out
        self.thumbnails = 0
        self.missing = 0

    def thumb_src(self, thumb_path: str) -> str | None:
        """The report-relative URL of a small copy of the thumbnail; None if the catalog lost it."""
        dest = self.out / "thumbs" / thumb_path
        if not dest.exists():
            source = self.cat.layout.thumbs / thumb_path
            if not source.is_file():
                self.missing += 1
                return None
            dest.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(source) as im:
                small = im.convert("RGB")
            small.thumbnail((REPORT_THUMB, REPORT_THUMB), Image.Resampling.LANCZOS)
            with replacing(dest) as tmp:
                small.save(tmp, "JPEG", quality=REPORT_THUMB_QUALITY)
        self.thumbnails += 1
        return quote(f"thumbs/{thumb_path}")

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


def _clusters_section(page: _Page, clusters: pd.DataFrame, members: pd.DataFrame,
                      per_cluster: int) -> list[str]:
    out = ["<section id=clusters>", f"<h2>Similarity categories · {len(clusters)} clusters</h2>"]
    if clusters.empty:
        out.append("<p class=empty>No clusters yet: the catalog has no embedded images.</p>")
    else:  # a contents list by name, so a category can be found without scrolling
        out.append("<p class=contents>" + " · ".join(
            f"<a href='#cluster-{c.cluster_id}'>{_e(display(c.name, c.cluster_id))}</a> ({c.images})"
            for c in clusters.itertuples()) + "</p>")
    by_cluster = {cid: part for cid, part in members.groupby("cluster_id")}
    for c in clusters.itertuples():
        shown = by_cluster.get(c.cluster_id, members.iloc[0:0])
        more = f" · showing the {len(shown)} closest to the centroid" if c.images > len(shown) else ""
        out.append(f"<div class=cluster id='cluster-{c.cluster_id}' data-cluster-id='{c.cluster_id}' "
                   f"data-images='{c.images}'>")
        out.append(f"<h3>{_e(display(c.name, c.cluster_id))} <small>#{c.cluster_id} · {c.images} images"
                   f"{more}</small></h3>")
        out.append("<div class=gallery>")
        for m in shown.itertuples():
            out.append(page.figure(m.image_id, m.thumb_path, m.path,
                                   [f"#{m.image_id} · {m.width}×{m.height} {m.format}",
                                    f"similarity {m.sim_score:.2f}"]))
        out.append("</div></div>")
    out.append("</section>")
    return out


def _groups_section(page: _Page, groups: pd.DataFrame, group_ids: list[int], per_group: int) -> list[str]:
    total = groups["group_id"].nunique()
    out = ["<section id=near-duplicates>", f"<h2>Near-duplicate groups · {total}</h2>"]
    if groups.empty:
        out.append("<p class=empty>No near-duplicate groups yet.</p>")
    elif len(group_ids) < total:
        out.append(f"<p>The {len(group_ids)} largest groups are shown.</p>")
    if total:
        out.append("<p class=hint>Keep: the largest resolution, then the most bytes. Distances are to the "
                   "copy to keep: the detected pair's method and distance, and pHash bits.</p>")
    for gid in group_ids:
        part = groups[groups["group_id"] == gid]
        out.append(f"<div class=group id='group-{gid}' data-group-id='{gid}' data-members='{len(part)}'>")
        out.append(f"<h3>Group {gid} <small>{len(part)} images</small></h3><div class=gallery>")
        for m in part.head(per_group).itertuples():
            if m.keep:
                how = "keep"
            elif m.method == "phash_orient":  # its plain pHash distance says nothing: it is flipped
                how = f"flipped/rotated · pHash {m.distance:.0f} bits"
            elif m.method == "embedding":
                how = f"embedding {m.distance:.3f} · pHash {m.phash_to_keep} bits"
            else:
                how = f"pHash {m.phash_to_keep} bits"
            out.append(page.figure(m.image_id, m.thumb_path, m.path,
                                   [f"#{m.image_id} · {m.width}×{m.height} {m.format}",
                                    f"{human_bytes(m.bytes)} · {m.paths} path(s)", how],
                                   "keep" if m.keep else "dup"))
        out.append("</div></div>")
    out.append("</section>")
    return out


def _exact_section(page: _Page, exact: pd.DataFrame, total: int) -> list[str]:
    out = ["<section id=exact>", f"<h2>Exact copies · {total} images stored at more than one path</h2>"]
    if exact.empty:
        out.append("<p class=empty>No file is stored twice.</p>")
    elif len(exact) < total:
        out.append(f"<p>The {len(exact)} images with the most copies are shown.</p>")
    for r in exact.itertuples():
        figure = page.figure(r.image_id, r.thumb_path, r.paths[0],
                             [f"#{r.image_id} · {r.width}×{r.height} {r.format}", human_bytes(r.bytes)])
        paths = "".join(f"<li>{_e(p)}</li>" for p in r.paths)
        out.append(f"<div class=exact data-image-id='{r.image_id}'>{figure}<ul>{paths}</ul></div>")
    out.append("</section>")
    return out


def _timeline_section(page: _Page, cat: Catalog, months: pd.DataFrame, per_month: int) -> list[str]:
    """The latest months by capture date, each with its first pictures."""
    out = ["<section id=timeline>", "<h2>By capture date</h2>"]
    if months.empty:
        out += ["<p class=empty>No capture times yet.</p>", "</section>"]
        return out
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
        for r in by_month.get(m.period, shown.iloc[0:0]).itertuples():
            out.append(page.figure(r.image_id, r.thumb_path, r.path,
                                   [f"#{r.image_id} · {r.taken_at:%Y-%m-%d %H:%M}",
                                    f"{r.width}×{r.height} {r.format}"]))
        out.append("</div></div>")
    out.append("</section>")
    return out


def _errors_section(errors: pd.DataFrame, limit: int) -> list[str]:
    out = ["<section id=errors>", f"<h2>Files that could not be catalogued · {len(errors)}</h2>"]
    if errors.empty:
        out.append("<p class=empty>None.</p>")
        out.append("</section>")
        return out
    if len(errors) > limit:
        out.append(f"<p>The first {limit} are listed.</p>")
    out.append("<table><thead><tr><th>path</th><th>error</th><th>reason</th><th>when</th></tr></thead><tbody>")
    for r in errors.head(limit).itertuples():
        out.append(f"<tr class=error><td class=path>{_e(r.path)}</td><td><code>{_e(r.error)}</code></td>"
                   f"<td>{_e(r.message)}</td><td class=when>{r.at:%Y-%m-%d %H:%M}</td></tr>")
    out.append("</tbody></table></section>")
    return out


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
