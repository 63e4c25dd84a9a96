"""Every chapter notebook runs top to bottom (in a scratch folder, so it leaves no files behind),
with no error and no warning about missing notebook widgets (IProgress)."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

# Every notebook runs with no data folder (the package ships the data they read), as on a fresh clone.
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _described(notebook, index: int, problem: str) -> str:
    """The cell's number and source, then what went wrong, as a test failure message."""
    source = notebook.cells[index].source
    return f"cell {index}:\n{source}\n---\n{ANSI_ESCAPE.sub('', problem)}"


def _problems(notebook) -> list[str]:
    """Every unexpected error output and every IProgress warning, each with its cell."""
    problems = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        expected_error = "raises-exception" in cell.metadata.get("tags", [])
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error" and not expected_error:
                trace = "\n".join(output.get("traceback", [])) or f"{output['ename']}: {output['evalue']}"
                problems.append(_described(notebook, index, trace))
            elif output.get("output_type") == "stream" and "IProgress" in output.get("text", ""):
                problems.append(_described(notebook, index, f"{output['name']}: {output['text']}"))
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    failure = None
    try:
        client.execute()
    except CellExecutionError as err:  # execution stopped at the failing cell
        failure = err
    # The failing cell's error output names the cell; the exception itself is the fallback.
    problems = _problems(notebook) or ([str(failure)] if failure else [])
    assert not problems, f"{path.name}:\n" + "\n\n".join(problems)
