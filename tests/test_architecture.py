"""The shape of the code, checked: imports point one way and never in a circle, the core does no
I/O, the code is formatted, and a module or function grown far past its idea sets off an alarm.

docs/ARCHITECTURE.md explains the layers; pyproject.toml's import-linter
contracts state them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
# The pure floors: the core's decisions and the planner's.
PURE = [REPO / "supervisor" / "core", REPO / "supervisor" / "planning" / "decide"]
# The core decides; it never touches the event loop, sockets, processes, files or the clock (nor the
# metrics library: the exporter in io/metrics.py reads the core's figures).
CORE_FORBIDDEN = {
    "asyncio",
    "zmq",
    "os",
    "time",
    "subprocess",
    "socket",
    "signal",
    "threading",
    "psutil",
    "pathlib",
    "shutil",
    "datetime",
    "prometheus_client",
}
# Smoke alarms, counted on formatted code: modules are cut by meaning, not by these numbers.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 90


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a test dependency (pyproject.toml)"
    result = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_the_core_imports_no_io():
    paths = [path for folder in PURE for path in folder.glob("*.py")]
    assert len(paths) > 10
    offenders = {str(path.relative_to(REPO)): sorted(_imported_roots(path) & CORE_FORBIDDEN) for path in paths}
    assert {name: found for name, found in offenders.items() if found} == {}


def import_cycles(*packages: str) -> list[list[str]]:
    """Every set of modules that import each other in a circle (Tarjan's strongly connected
    components over grimp's graph), TYPE_CHECKING and function-level imports included."""
    graph = grimp.build_graph(*packages, exclude_type_checking_imports=False)
    imports = {module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in imports.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = [stack.pop()]
            while component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1 or module in imports.get(module, ()):
                cycles.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_itself_through_others():
    assert import_cycles("supervisor", "workers", "winservice") == []


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (package / "c.py").write_text("from . import d\n")
    (package / "d.py").write_text("def late():\n    from . import c\n")
    (package / "e.py").write_text("from . import a, c\n")  # imports into circles without closing one
    monkeypatch.syspath_prepend(str(tmp_path))
    assert sorted(import_cycles("circle")) == [["circle.a", "circle.b"], ["circle.c", "circle.d"]]


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(
        [*REPO.glob("supervisor/**/*.py"), *REPO.glob("workers/**/*.py"), *REPO.glob("winservice/*.py")]
    ):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno >= MAX_FUNCTION_LINES
            ):
                too_long.append(
                    f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
                )
    assert too_long == []


def test_the_code_is_formatted():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is a test dependency (pyproject.toml)"
    result = subprocess.run([ruff, "format", "--check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
