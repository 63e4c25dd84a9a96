"""The benchmark scripts stay runnable as the package moves: every name they import from minigpt exists."""

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _minigpt_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for each ``from minigpt... import name``, ``(module, None)`` for ``import minigpt...``."""
    imports: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "minigpt":
            imports += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            imports += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "minigpt"]
    return imports


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.stem)
def test_every_name_a_benchmark_imports_from_minigpt_exists(path):
    missing = []
    for module_name, name in _minigpt_imports(path):
        module = importlib.import_module(module_name)
        if name is not None and not hasattr(module, name):
            missing.append(f"from {module_name} import {name}")
    assert not missing, f"{path.name} imports names minigpt no longer has: {missing}"
