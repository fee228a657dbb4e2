"""The package's architecture read from its imports: no module imports back into what imports it,
and the client side loads neither llama.cpp nor Ray until it connects."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cluster"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every cluster module and the cluster modules it imports, anywhere in its body."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_the_package_imports_back_into_one_that_imports_it() -> None:
    cycle = _cycle(_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_client_side_loads_neither_llama_cpp_nor_ray_on_import() -> None:
    code = ("import sys, cluster.client, cluster.protocol, cluster.sampling, cluster.dispatch; "
            "print(sorted(m for m in ('llama_cpp', 'ray', 'cluster._native', 'cluster.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"imported by the client side: {out}"


@pytest.mark.parametrize("module", ["_native", "_routing"])
def test_each_native_module_has_a_stub_declaring_each_of_its_public_names(module: str) -> None:
    native = importlib.import_module(f"cluster.{module}")
    stub = ast.parse((PACKAGE / f"{module}.pyi").read_text())
    declared = set()
    for node in stub.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            declared.add(node.target.id)
    public = {name for name in dir(native) if not name.startswith("_")}
    assert public == declared, (public - declared, declared - public)


def test_the_routing_maths_load_without_the_nodes_native_cache() -> None:
    """The router's decisions need ``cluster._routing`` only (std C++); the cache module, which
    links ggml, is for the processes that run a model. (The router process still reads the
    model's vocabulary through llama.cpp, to tokenize, when its actor starts.)"""
    code = ("import sys, numpy as np, cluster.router, cluster.routing.warmth as w, cluster.token_affinity as a; "
            "w.prefix_hashes(list(range(64))); a.affinity_encode(np.full((2, 4), 0.5, np.float32)); "
            "maps = open('/proc/self/maps').read(); "
            "print(sorted({m for m in ('llama_cpp', 'cluster._native', 'cluster.engine') if m in sys.modules} | "
            "({'libggml'} if 'libggml' in maps else set())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"loaded for routing: {out}"
