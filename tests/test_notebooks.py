"""The analyst notebooks run top to bottom on a catalog built by the real pipeline (test_catalog),
and are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient
from test_catalog import analyst_home, bytea_copy

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analyst_home(tmp_path_factory)


def execute(notebook: Path, workdir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(notebook, as_version=4)
    # The kernel inherits this process's environment: LOOKALIKE_HOME / LOOKALIKE_DSN.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
                   ).execute()
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebooks_are_committed_without_outputs() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_overview.ipynb", "02_clusters.ipynb",
                                           "03_near_duplicates.ipynb", "04_search.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"
        assert nb.cells[-1].source.lstrip().startswith("#") and "assert" in nb.cells[-1].source


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(notebook: Path, home: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_HOME", str(home))
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    nb = execute(notebook, tmp_path)
    assert "Error" not in printed(nb)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["02_clusters", "03_near_duplicates"])
def test_notebook_before_dedup_and_without_pgvector(name: str, home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_HOME", str(home))  # thumbnails; the tables come from the DSN
    monkeypatch.setenv("LOOKALIKE_DSN", bytea_copy(home))
    nb = execute(REPO / "notebooks" / f"{name}.ipynb", tmp_path)
    if name == "03_near_duplicates":
        assert "No near-duplicate groups yet" in printed(nb) and "0 groups shown" in printed(nb)
