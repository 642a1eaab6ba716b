"""The notebooks in notebooks/ run headless (nbclient) on the tiny fixture model and are stored
without outputs."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["parity_walkthrough.ipynb", "benchmark_report.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_saved_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code"
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{name}: a cell was saved with outputs"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name: str, fixtures: Path, monkeypatch) -> None:
    # the kernel inherits this environment; the notebook finds the fixtures through it
    monkeypatch.setenv("COSYTOOLS_FIXTURES", str(fixtures.parent))
    monkeypatch.delenv("COSYTOOLS_BENCH_JSON", raising=False)
    monkeypatch.delenv("COSYTOOLS_DUMP", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    elapsed = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, f"{name}: expected plots"
    text = "".join(o.get("text", "") for o in outputs)
    if name == "parity_walkthrough.ipynb":
        assert "first divergence: flow.tap.step00.dit.block.01" in text
    else:
        assert "cosytools bench" in text and "eager" in text
    assert elapsed < 60, f"{name} took {elapsed:.0f} s"
