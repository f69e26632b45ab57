"""Notebook 4 (the simulator against the real cluster): committed with the outputs of its small
run, runs within its budget on the real broker, and finds the two sides in agreement.

The agreement is judged by ``tests/cluster/compare.py``'s ``check`` against its ``TOLERANCE``
(every tolerance is justified there), from the figures the notebook prints in its ``summary``
cell. The test applies ``check`` itself rather than trusting the notebook's verdict.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import compare

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "04-simulator-vs-reality.ipynb"
#: The small run takes about 45 s on a quiet 2-core machine: two real runs of about 14 s each
#: (topics, an aggregator joining its group, a 3 s lead, 10 s of traffic), 14 simulations and
#: the kernel. The budget leaves room for a loaded one.
BUDGET = 90.0
MARKER = "SUMMARY "


def summaries(nb: Any) -> dict[str, dict[str, Any]]:
    """The figures the notebook's ``summary`` cell printed."""
    cells = [c for c in nb.cells if "summary" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "one cell tagged 'summary'"
    text = "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream")
    lines = [x for x in text.splitlines() if x.startswith(MARKER)]
    assert len(lines) == 1, text
    out: dict[str, dict[str, Any]] = json.loads(lines[0][len(MARKER) :])
    return out


def disagreements(found: dict[str, dict[str, Any]]) -> list[str]:
    return [line for x in found.values() for line in compare.check(x)]


def test_committed_with_outputs_of_the_small_run() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and params[0].source.strip() == "FULL = False"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell was run"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plots are committed"
    found = summaries(nb)
    assert len(found) == 2, "the small run: two scenarios"
    assert all(x["scenario"]["duration"] <= 12.0 for x in found.values())
    assert disagreements(found) == []


def test_check_fails_on_a_disagreement() -> None:
    """The check can fail: each figure moved just past its tolerance is caught."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    base = next(iter(summaries(nb).values()))
    tol = compare.TOLERANCE
    assert compare.check(base) == []

    def moved(path: tuple[str, ...], value: float) -> dict[str, Any]:
        x = copy.deepcopy(base)
        d = x
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return x

    scenario = compare.Scenario(**base["scenario"])
    slack = tol.worst_slack_per_server * scenario.servers * scenario.allowance
    cases = {
        "worst window": moved(("worst", "real"), max(base["worst"]["sim"]) + slack + 1),
        "utilisation": moved(
            ("utilisation", "real"), min(base["utilisation"]["sim"]) - tol.utilisation - 0.005
        ),
        "per-client": moved(("fraction_outside_sim", "max"), tol.fraction + 0.005),
        "light share": moved(
            ("light_share", "real"), max(base["light_share"]["sim"]) + tol.light_share + 0.005
        ),
        "cold-start tokens": moved(("extra", "real"), 1.2 * max(base["extra"]["sim"])),
    }
    for name, x in cases.items():
        assert compare.check(x), name


def run_notebook(bootstrap: str) -> tuple[dict[str, dict[str, Any]], float]:
    """Execute the notebook on ``bootstrap``'s broker: its summaries and the seconds it took."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=int(BUDGET),
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError on any error
    return summaries(nb), time.perf_counter() - started


def describe(name: str, x: dict[str, Any]) -> str:
    u, w, ls = x["utilisation"], x["worst"], x["light_share"]
    return (
        f"{name}: worst window real {w['real']} sim {w['sim']} (bound {x['bound']}); "
        f"saturated {u['real']:.1%} real, sim {min(u['sim']):.1%}-{max(u['sim']):.1%} "
        f"(W/(W+lag) {u['predicted']:.1%}); light admitted {ls['real']:.1%} real, "
        f"sim {min(ls['sim']):.1%}-{max(ls['sim']):.1%}; furthest client "
        f"{x['fraction_outside_sim']['max']:.1%} of L out"
    )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(2 * BUDGET + 60)
def test_notebook_runs_and_agrees(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, measured: Callable[[str], None]
) -> None:
    """A disagreement must show in two runs. One real run in about fifty lands a tick's usage
    read and the tick itself on either side of a window-bucket boundary (the consumer's poll
    ends up to 1 ms early, the tick starts a few ms late, and the ticks' phase against the
    bucket grid is whatever the start made it): the hot clients' tokens then come back a tick
    early and utilisation at the 0.5 s tick is about 0.75-0.82 instead of the simulator's 2/3,
    the bound still held (seen once in CI, reproduced in the simulator by shifting those
    times). Both runs' figures are printed; a disagreement the second run repeats fails."""
    # the kernel inherits the environment: the notebook uses the session's broker
    monkeypatch.setenv("DRL_KAFKA_BOOTSTRAP", kafka_bootstrap)
    found, took = run_notebook(kafka_bootstrap)
    for name, x in found.items():
        measured(describe(name, x))
    measured(f"notebook 4 ran in {took:.1f} s (budget {BUDGET:g} s), load {os.getloadavg()[0]}")
    assert took < BUDGET, f"took {took:.1f} s"
    first = disagreements(found)
    if not first:
        return
    measured(f"the first run disagreed, run again: {first}")
    again, took = run_notebook(kafka_bootstrap)
    for name, x in again.items():
        measured("again, " + describe(name, x))
    assert disagreements(again) == [], f"both runs disagree; the first: {first}"
    assert took < BUDGET, f"took {took:.1f} s"
