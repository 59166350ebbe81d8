"""The embedded PostgreSQL of a new catalog: its data folder copied from one initdb per machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from catalog_snapshot import run_env

# Start a home's server, run one query through it, and stop it as the process ends.
QUERY = ("import sys, psycopg; from pathlib import Path; from lookalike import db; "
         "uri = db.embedded_uri(Path(sys.argv[1])); "
         "print(psycopg.connect(uri).execute('SELECT count(*) FROM pg_database').fetchone()[0])")


def serve(home: Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", QUERY, str(home)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def system_identifier(pgdata: Path) -> bytes:
    """pg_control's first field: the id initdb gave the cluster (a copy keeps it)."""
    return (pgdata / "global" / "pg_control").read_bytes()[:8]


def test_new_catalogs_start_from_one_initdb_template(tmp_path: Path) -> None:
    env = run_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert serve(tmp_path / "one", env) == serve(tmp_path / "two", env) == "3"  # postgres, template0/1
    (template,) = (tmp_path / "cache" / "lookalike" / "postgres").glob("initdb-*[0-9]")
    assert not list(template.parent.glob("*.partial-*")) and not list(tmp_path.glob("*/pg.partial-*"))
    ids = {system_identifier(p) for p in (template, tmp_path / "one" / "pg", tmp_path / "two" / "pg")}
    assert len(ids) == 1, "each catalog should be a copy of the template, not a fresh initdb"

    # A damaged template is made again; the next new catalog comes from the new one.
    (template / "global" / "pg_control").unlink()
    assert serve(tmp_path / "three", env) == "3"
    remade = system_identifier(template)
    assert remade not in ids and system_identifier(tmp_path / "three" / "pg") == remade
    assert serve(tmp_path / "one", env) == "3"  # an existing catalog is untouched


def test_without_a_usable_cache_initdb_makes_the_catalog(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the cache cannot be created under a file
    env = run_env(tmp_path, XDG_CACHE_HOME=str(blocked))
    assert serve(tmp_path / "home", env) == "3"
    assert (tmp_path / "home" / "pg" / "PG_VERSION").is_file()
