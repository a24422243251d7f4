"""The layout keeps its promises: no import cycles among the project's modules, cluster/
imports neither ebm nor pipelines, ebm imports no ray/mlflow/pyarrow, and no test-only hook lives in
production code."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ebm", "pipelines", "cluster")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and modules[t].name != "__init__.py":
                found.add(t)
    return found


def test_no_import_cycle_among_the_projects_modules():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 30       # the walk saw the whole tree


def test_cluster_imports_neither_ebm_nor_pipelines():
    modules = _modules()
    for m, p in modules.items():
        if m.startswith("cluster"):
            bad = sorted(t for t in _imports(m, p, modules) if t.split(".")[0] in ("ebm", "pipelines"))
            assert not bad, f"{m} imports {bad}"


def test_ebm_imports_no_ray_mlflow_pyarrow_and_production_code_has_no_test_hooks():
    for f in (ROOT / "ebm").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("ray", "mlflow", "pyarrow")], f
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text()
            assert "test_hooks" not in text and "EBM_TEST_HOOKS" not in text, f
