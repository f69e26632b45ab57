"""The simulator notebooks run, as committed (``FULL = False``: the small sweeps), in bounded
time; and they are committed with their outputs, so that the plots show without running them.

Nothing is injected and nothing is written back: a reader flips ``FULL = True`` by hand.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
MINE = (
    "01-accuracy-vs-sync-interval.ipynb",
    "02-algorithms-compared.ipynb",
    "03-cold-start-and-degraded.ipynb",
    "05-published-anchors.ipynb",
    "06-adaptive-limits.ipynb",
)
#: Each notebook takes < 20 s in CI mode on a developer machine; this leaves room for slow CI.
BUDGET = 60.0


def parameters(nb: Any) -> str:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "one cell tagged 'parameters'"
    return str(cells[0].source)


@pytest.mark.parametrize("name", MINE)
def test_committed_with_outputs_of_the_small_run(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert parameters(nb).strip() == "FULL = False"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell was run"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plots are committed"


@pytest.mark.timeout(BUDGET + 30)
@pytest.mark.parametrize("name", MINE)
def test_notebook_runs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=int(BUDGET),
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError on any error
    took = time.perf_counter() - started
    assert took < BUDGET, f"{name} took {took:.1f} s"
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert images
