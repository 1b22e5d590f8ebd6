"""The notebooks in ``notebooks/``: their Colab scaffolding, and that they run top to bottom.

Each notebook is executed in a fresh ipykernel kernel of the running interpreter with
``METAGRAD_NOTEBOOK_BUDGET=tiny``, which every notebook reads to shrink its training runs to a
few steps; a cell that raises fails that notebook's test. The executed copies are discarded.
(nbmake would collect the notebooks too, but only when pytest is given ``--nbmake``; the suite
does not use it.)
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys

import pytest

# Under pytest-xdist (--dist loadgroup) every test of this module runs on one worker, so the
# module fixture executes each notebook once.
pytestmark = pytest.mark.xdist_group("notebooks")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB_URL = "https://colab.research.google.com/github/metagrad/metagrad/blob/main/notebooks/"
CELL_TIMEOUT = 300  # seconds; a cell takes a few seconds at the tiny budget on a quiet CPU
# Kernels run concurrently, two at a time: most of their time is single-threaded compilation.
_WORKERS = max(1, min(2, os.cpu_count() or 1))
_KERNEL = "metagrad-notebook-tests"
_FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _ids(path: pathlib.Path) -> str:
    return path.stem


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f"expected the notebooks in {NOTEBOOK_DIR}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_scaffolding(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first, install, budget = nb.cells[:3]
    assert first.cell_type == "markdown"
    assert COLAB_BADGE in first.source, "the first cell must show the Colab badge"
    assert COLAB_URL + path.name in first.source, "the Colab badge must link to this notebook"
    assert install.cell_type == "code"
    assert "import metagrad" in install.source and "except ImportError" in install.source
    assert "pip install" in install.source, "the install cell must pip install metagrad"
    assert budget.cell_type == "code"
    assert 'os.environ.get("METAGRAD_NOTEBOOK_BUDGET", "full")' in budget.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_stored_outputs_have_no_errors_and_show_plots(path):
    # The committed notebooks carry their outputs (plots shown on GitHub and in Colab).
    nb = nbformat.read(path, as_version=4)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"stored error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, "the stored notebook should show its plots (execute it and save it)"


def _execute(paths: list[pathlib.Path]) -> dict[str, BaseException | None]:
    """Executes the notebooks, up to `_WORKERS` kernels at a time; returns each one's error."""
    results: dict[str, BaseException | None] = {}

    async def run_one(path: pathlib.Path, slots: asyncio.Semaphore) -> None:
        async with slots:
            nb = nbformat.read(path, as_version=4)
            client = nbclient.NotebookClient(
                nb,
                timeout=CELL_TIMEOUT,
                kernel_name=_KERNEL,
                resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
            )
            try:
                await client.async_execute()
            except Exception as error:  # noqa: BLE001 - reported by the test of this notebook
                results[path.name] = error
                return
            budget = "".join(
                out.get("text", "") for out in nb.cells[2].outputs if out.output_type == "stream"
            )
            ran_tiny = "budget: tiny" in budget
            results[path.name] = None if ran_tiny else AssertionError("did not run at budget tiny")

    async def run_all() -> None:
        slots = asyncio.Semaphore(_WORKERS)
        await asyncio.gather(*(run_one(path, slots) for path in paths))

    asyncio.run(run_all())
    return results


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
    # Only the notebooks whose test was selected (e.g. with -k) are executed.
    selected = [
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_notebook_executes"
    ]
    # A kernel spec of our own, for this very interpreter: a "python3" spec elsewhere on the
    # machine (e.g. in ~/.local/share/jupyter) could point to a Python without metagrad.
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / _KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "metagrad tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_dir))
        # The kernels are subprocesses and inherit this environment.
        patch.setenv("METAGRAD_NOTEBOOK_BUDGET", "tiny")
        # This checkout's metagrad, not an installed one (pytest's pythonpath is not inherited).
        root = str(NOTEBOOK_DIR.parent)
        path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        patch.setenv("PYTHONPATH", path)
        patch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        # At the tiny budget compilation dominates: cheaper XLA CPU code generation takes about
        # 40% off the kernels' time, and the notebooks assert no numbers.
        flags = os.environ.get("XLA_FLAGS", "") + _FAST_COMPILE
        patch.setenv("XLA_FLAGS", flags.strip())
        return _execute(selected)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_executes(path, executed):
    error = executed[path.name]
    if error is not None:
        pytest.fail(f"{path.name} failed at the tiny budget:\n{error}", pytrace=False)
