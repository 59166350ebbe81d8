"""The `lookalike` command line."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import time
from collections.abc import Sequence

import psycopg

from lookalike import db, failures, logs, preflight
from lookalike.cluster.names import display, name_by_analyst
from lookalike.config import Config, ConfigError, load_config
from lookalike.db.migrations import CatalogTooNew
from lookalike.db.runs import ModelMismatch
from lookalike.errors import one_line
from lookalike.labels.hierarchy import UnknownWordError, senses
from lookalike.layout import Layout
from lookalike.progress import describe, read_progress
from lookalike.read.text import FORMATS, format_rows


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="catalog home (default: catalog.home from the config)")
    p.add_argument("--config", help="TOML file overriding conf/lookalike.toml")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="more detail: INFO lines and libraries' warnings")
    p.add_argument("--debug", action="store_true",
                   help="everything, and a failure's traceback (also LOOKALIKE_DEBUG=1)")


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="when another run is writing to the catalog, wait for it instead of exiting")


class QueryFailed(RuntimeError):
    """The database refused an analyst's query; the message is its one-line error."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description=(
        "Catalog an image archive: exact copies, near-duplicates and similarity categories."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="incremental run over image roots (only new files)")
    p.add_argument("roots", nargs="+", metavar="ROOT")
    p.add_argument("--retry-errors", action="store_true", help="retry files recorded in ingest_errors")
    _wait(p)
    _common(p)

    p = sub.add_parser("recluster", help="re-embed every image from its thumbnail and cluster anew")
    p.add_argument("--model", help="switch to this model (default: the catalog's current one)")
    _wait(p)
    _common(p)

    p = sub.add_parser("status", help="what the catalog holds and how the last runs ended")
    _common(p)

    p = sub.add_parser("sql", help="run a read-only query; a table on a terminal, else CSV")
    p.add_argument("query")
    p.add_argument("--format", choices=FORMATS, help="output format (default: table on a terminal, else csv)")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                   help="cancel the query after this long (default 300; 0: never)")
    p.add_argument("--write", action="store_true",
                   help="allow the query to change the catalog (it then waits for the writer lock)")
    _wait(p)
    _common(p)

    p = sub.add_parser("similar", help="images like FILE (exact, near-duplicate, semantic) or like --text")
    p.add_argument("file", nargs="?", metavar="FILE", help="an image file; it need not be in the catalog")
    p.add_argument("-k", type=int, default=10, help="matches shown per kind (default 10)")
    p.add_argument("--text", help="a text query instead of FILE (CLIP models only)")
    _common(p)

    p = sub.add_parser("find", help="images whose labels fall under WORD (find dog: every breed), best first")
    p.add_argument("word", metavar="WORD")
    p.add_argument("-n", "--limit", type=int, default=100, help="at most this many (default 100; 0: all)")
    p.add_argument("--format", choices=("paths", "csv"), default="paths",
                   help="paths: one per line (default); csv: image_id, path, label, score, category")
    _common(p)

    p = sub.add_parser("label", help="name a category (an analyst's name is never replaced automatically)")
    p.add_argument("cluster_id", type=int, metavar="CLUSTER_ID")
    p.add_argument("name", metavar="NAME")
    _wait(p)
    _common(p)

    p = sub.add_parser("verify", help="check the store and the thumbnails against the catalog (exit 3 on "
                                      "a problem)")
    p.add_argument("--full", action="store_true", help="also read every stored original and check its sha256")
    _common(p)

    p = sub.add_parser("report", help="static HTML report: an index of every category, a page per category, "
                                      "near-duplicate groups paged, exact copies, errors")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for index.html, its pages and thumbnails")
    p.add_argument("--per-cluster", type=int, default=24, metavar="N",
                   help="thumbnails per category page and per near-duplicate group (default 24)")
    p.add_argument("--groups", type=int, default=1000, metavar="N",
                   help="near-duplicate groups shown, the largest first, 50 a page (default 1000)")
    _common(p)
    return parser


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from lookalike.driver.ingest import run

    try:
        summary = run(cfg, args.roots, retry_errors=args.retry_errors, wait=args.wait)
    except psycopg.OperationalError as e:
        # The server went away mid-run: every finished stage's Parquet is kept under the home.
        raise db.CatalogUnavailable(f"lost the catalog during the run: {one_line(e)} (finished stages "
                                    f"are kept in {cfg.home}; the next run resumes them)") from e
    print(summary.describe())
    return 0


def cmd_recluster(cfg: Config, args: argparse.Namespace) -> int:
    from lookalike.driver.recluster import recluster

    print(recluster(cfg, args.model, wait=args.wait).describe())
    return 0


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    with db.reader(cfg) as conn:
        print(f"catalog: {db.where(cfg)}")
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM image_paths), "
            "(SELECT count(*) FROM ingest_errors), (SELECT count(*) FROM near_duplicates), "
            "(SELECT count(DISTINCT group_id) FROM image_dup_group), "
            "(SELECT count(*) FROM clusters WHERE model_ver = (SELECT value FROM catalog_meta "
            "WHERE key = 'active_model_ver')), "
            "(SELECT count(*) FROM manifests WHERE status <> 'loaded')").fetchone()
        labels = ["images", "paths", "errors", "near-duplicate pairs", "near-duplicate groups",
                  "clusters", "unfinished manifests"]
        for label, value in zip(labels, counts, strict=True):
            print(f"{label:>22}: {value}")
        model = db.get_meta(conn, "active_model")
        print(f"{'model':>22}: {model or '(none yet)'}")
        largest = conn.execute("SELECT id, name, size FROM clusters WHERE model_ver = (SELECT value FROM "
                               "catalog_meta WHERE key = 'active_model_ver') ORDER BY size DESC, id LIMIT 8")
        # One a line, size first: names hold commas ('mixed: a, b, c') and parentheses ('vessel (craft)').
        rows = largest.fetchall()
        width = len(str(rows[0][2])) if rows else 0
        for i, (cid, name, size) in enumerate(rows):
            head = f"{'largest categories':>22}:" if i == 0 else " " * 23
            print(f"{head} {size:>{width}}  {display(name, cid)}")
        stored = db.get_meta(conn, "store_root")
        print(f"{'store':>22}: {stored or '(none: files are catalogued where they lie)'}")
        print(f"{'schema version':>22}: {db.get_meta(conn, 'schema_version')}")
        runs = conn.execute("SELECT run_id, kind, status, started_at, finished_at, summary, message "
                            "FROM runs ORDER BY run_id DESC LIMIT 5").fetchall()
        if runs:
            print("last runs:")
        for run_id, kind, status, started, finished, summary, message in runs:
            took = f"{(finished - started).total_seconds():.1f} s" if finished else "-"
            extra = ""
            if summary and kind == "recluster":
                extra = (f" {summary.get('model_ver')}: images={summary.get('images')} "
                         f"embedded={summary.get('embedded')} clusters={summary.get('clusters')}")
            elif summary:
                extra = (f" files={summary.get('files')} new={summary.get('new_images')} "
                         f"copies={summary.get('exact_copies')} errors={summary.get('errors')}")
            print(f"  {run_id:>5} {kind:<9} {status:<11} {started:%Y-%m-%d %H:%M:%S} {took:>9}{extra}")
            now = read_progress(Layout(cfg.home).progress) if status == "running" else None
            if now is not None and now.get("run_id") == run_id:
                print(f"{'':>8}{describe(now)} ({time.time() - now['updated']:.0f} s ago)")
            elif message and status != "ok":
                print(f"{'':>8}{message}")
    return 0


def cmd_sql(cfg: Config, args: argparse.Namespace) -> int:
    """Analysts' SQL: a READ ONLY transaction with a statement timeout, unless --write, which takes
    the writer lock like a run (a query cannot change the catalog behind a run's back)."""
    timeout_ms = int(args.timeout * 1000)
    if args.write:
        with db.writer(cfg, args.wait) as (conn, _):
            return _query(conn, args.query, timeout_ms, read_only=False, fmt=args.format)
    with db.reader(cfg) as conn:
        return _query(conn, args.query, timeout_ms, read_only=True, fmt=args.format)


def _query(conn: psycopg.Connection, query: str, timeout_ms: int, read_only: bool, fmt: str | None) -> int:
    try:
        with conn.transaction():
            if read_only:
                conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(f"SET LOCAL statement_timeout = {max(0, timeout_ms)}")
            cur = conn.execute(query)
            header = [c.name for c in cur.description] if cur.description else None
            rows = cur.fetchall() if header else []
    except psycopg.errors.ReadOnlySqlTransaction as e:
        raise QueryFailed(f"{one_line(e)} (`lookalike sql --write` may change the catalog)") from None
    except psycopg.errors.QueryCanceled as e:
        raise QueryFailed(f"{one_line(e)} (--timeout SECONDS allows longer queries)") from None
    except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedObject) as e:
        if db.get_meta(conn, "vector_type") == "bytea":
            raise QueryFailed(f"{one_line(e)}: nearest-neighbour SQL needs pgvector, and this catalog's "
                              "server has none (its vectors are float32 bytea); `lookalike similar` "
                              "searches them") from None
        raise QueryFailed(one_line(e)) from None
    except psycopg.Error as e:
        raise QueryFailed(one_line(e)) from None
    if header is not None:
        sys.stdout.write(format_rows(header, rows, fmt or ("table" if sys.stdout.isatty() else "csv")))
    return 0


def cmd_similar(cfg: Config, args: argparse.Namespace) -> int:
    from lookalike.read.catalog import Catalog
    from lookalike.read.search import QueryError
    from lookalike.read.text import format_results

    with Catalog(config=cfg) as cat:
        try:
            matches = cat.similar(args.file, k=args.k, text=args.text)
        except QueryError as e:  # e.g. --text on an image-only model: one line, no traceback
            print(f"lookalike: {e}", file=sys.stderr)
            return 2
        print(format_results(matches, cat.cfg, args.k))
    return 0


def cmd_find(cfg: Config, args: argparse.Namespace) -> int:
    from lookalike.read.catalog import Catalog

    with Catalog(config=cfg) as cat:
        try:
            found = cat.find(args.word, limit=args.limit or None)
        except UnknownWordError as e:
            raise QueryFailed(str(e)) from None
    meanings = senses(args.word)
    if len(meanings) > 1:  # 'plant' finds factories too: say so, and how to ask for one meaning
        shown = ", ".join(name if query == name else f"{name} [{query}]" for name, query in meanings)
        print(f"lookalike: {args.word!r} means {len(meanings)} things here, all searched: {shown}; "
              f"to search one alone, give its name or [id]: lookalike find {meanings[0][1]!r}",
              file=sys.stderr)
    if args.format == "csv":
        sys.stdout.write(format_rows(["image_id", "path", "label", "score", "category"],
                                     list(found[["image_id", "path", "label", "score", "category"]]
                                          .itertuples(index=False)), "csv"))
    else:
        sys.stdout.writelines(f"{path}\n" for path in found["path"])
    return 0


def cmd_label(cfg: Config, args: argparse.Namespace) -> int:
    with db.writer(cfg, args.wait) as (conn, _), conn.transaction(), conn.cursor() as cur:
        try:
            name_by_analyst(cur, args.cluster_id, args.name)
        except (KeyError, ValueError) as e:
            raise QueryFailed(str(e).strip("'\"")) from None
    print(f"category {args.cluster_id} is now named {' '.join(args.name.split())!r}")
    return 0


def cmd_report(cfg: Config, args: argparse.Namespace) -> int:
    from lookalike.read.catalog import Catalog
    from lookalike.read.report import write_report

    with Catalog(config=cfg) as cat:
        print(write_report(cat, args.out, per_cluster=args.per_cluster, max_groups=args.groups).describe())
    return 0


def cmd_verify(cfg: Config, args: argparse.Namespace) -> int:
    """One line per problem on stdout, a summary on stderr; 3 when there is any problem."""
    from lookalike import store
    from lookalike.db.runs import catalog_store
    from lookalike.layout import Layout

    with db.reader(cfg) as conn:
        root = catalog_store(conn)
        counts = store.VerifyCounts()
        problems = 0
        # A server-side cursor streams the rows: a million images are never held at once.
        with conn.transaction(), conn.cursor(name="verify") as cur:
            cur.execute("SELECT id, store_path, file_sha256, bytes, thumb_path FROM images ORDER BY id")
            for problem in store.verify(iter(cur), root, Layout(cfg.home, root).thumbs, args.full, counts):
                print(problem.line(), flush=True)
                problems += 1
    what = (f"{counts.stored_checked} stored originals ({'sha256' if args.full else 'sizes'}), "
            f"{counts.unknown} files the catalog does not know" if root is not None else "no store")
    temporary = f", {counts.temporary} temporary files (a run's)" if counts.temporary else ""
    print(f"verify: {counts.images} images, {what}, {counts.thumbnails_checked} thumbnails{temporary}: "
          f"{problems or 'no'} problems", file=sys.stderr)
    return 3 if problems else 0


# The interpreter's last garbage collections traverse the whole heap (1,500 modules after a run:
# numba, onnxruntime, pandas...) only for the OS to free it: ~0.3-0.4 s of every run's end. This
# handler, registered when the CLI is imported and so run after every later one (the embedded
# PostgreSQL's stop, the worker pool's), moves the heap out of the collector's reach first.
atexit.register(gc.freeze)

COMMANDS = {"run": cmd_run, "recluster": cmd_recluster, "status": cmd_status, "sql": cmd_sql,
            "similar": cmd_similar, "report": cmd_report, "find": cmd_find, "label": cmd_label,
            "verify": cmd_verify}


# Bad input or state: one line saying what to fix, exit 2 (lookalike.failures).
EXPECTED: tuple[type[BaseException], ...] = (
    ConfigError, preflight.RefusedStart, db.CatalogUnavailable, db.CatalogBusy, FileNotFoundError,
    QueryFailed, CatalogTooNew, ModelMismatch)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("LOOKALIKE_DEBUG", "") not in ("", "0")
    logs.setup(verbose=args.verbose, debug=debug)
    failures.catch_sigterm()
    try:
        cfg = load_config(args.config, args.home)
        preflight.check(cfg, roots=args.roots if args.command == "run" else None)
        if cfg.home.is_dir():
            logs.attach_file(cfg.home)
        return COMMANDS[args.command](cfg, args)
    except (Exception, KeyboardInterrupt) as e:  # KeyboardInterrupt: Ctrl-C, or SIGTERM
        return failures.end(e, EXPECTED, debug)


if __name__ == "__main__":
    sys.exit(main())
