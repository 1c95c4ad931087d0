"""The example notebooks run top to bottom on the tiny model.

Cells are executed in one namespace in this process (what a kernel would do, without needing Jupyter here);
each notebook's own asserts are its checks, and the test checks what the last cells leave behind.
"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def run_notebook(path: Path) -> dict:
    namespace: dict = {"__name__": "__main__"}
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{path.name}:{cell['id']}", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tiny_sd1_model, monkeypatch):
    monkeypatch.setenv("SDCORE_MODEL", str(tiny_sd1_model))
    namespace = run_notebook(path)
    if path.name == "01-quickstart.ipynb":
        assert namespace["steps"] == list(range(1, 9))
        assert namespace["result"].images[0].size == (64, 64)
        assert namespace["slow"].state.value == "cancelled"


def test_there_are_notebooks():
    assert NOTEBOOKS
