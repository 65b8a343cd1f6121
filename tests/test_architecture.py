"""The shape of the code, checked: imports point one way, the core does no I/O, modules stay small.

docs/ARCHITECTURE.md explains the layers; pyproject.toml's import-linter
contracts state them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "supervisor" / "core"
# The core decides; it never touches the event loop, sockets, processes, files or the clock (nor the
# metrics library: the exporter in io/metrics.py reads the core's figures).
CORE_FORBIDDEN = {"asyncio", "zmq", "os", "time", "subprocess", "socket", "signal", "threading", "psutil", "pathlib", "shutil", "datetime", "prometheus_client"}
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 45


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
    offenders = {path.name: sorted(_imported_roots(path) & CORE_FORBIDDEN) for path in CORE.glob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted([*REPO.glob("supervisor/**/*.py"), *REPO.glob("workers/*.py"), *REPO.glob("winservice/*.py")]):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
