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


# Each package's layer, lowest first: a module imports its own package and those of lower layers only
# (the package ``__init__`` docstrings say the same). The root package and its ``__main__`` sit above all.
LAYERS = {
    "cluster.errors": 0, "cluster._native": 0, "cluster._routing": 0,
    "cluster.engine": 1,
    "cluster.routing": 2, "cluster.models": 2,
    "cluster.distributed": 3,
    "cluster.api": 4, "cluster.train": 4,
    "cluster.bench": 5,
    "cluster.cli": 6,
}


def _layer_of(module: str) -> str | None:
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), None)


def test_every_module_belongs_to_a_layer_and_imports_only_its_own_and_lower_ones() -> None:
    upward = []
    for name, targets in _imports().items():
        if name in ("cluster", "cluster.__main__"):
            continue
        own = _layer_of(name)
        assert own is not None, f"{name} is in no layer of LAYERS"
        for target in targets:
            theirs = _layer_of(target)
            if theirs is not None and theirs != own and LAYERS[theirs] >= LAYERS[own]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that run up or across the layers: " + ", ".join(sorted(upward))


def test_the_package_root_holds_no_module_of_a_layer_above_errors() -> None:
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__", "errors"))
    assert flat == [], f"modules outside the layer packages: {flat}"


def test_the_client_side_loads_neither_llama_cpp_nor_ray_on_import() -> None:
    code = ("import sys, cluster.distributed.client, cluster.distributed.protocol, cluster.engine.sampling, cluster.distributed.dispatch; "
            "print(sorted(m for m in ('llama_cpp', 'ray', 'cluster._native', 'cluster.engine.moe_engine') if m in sys.modules))")
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
    links ggml, is for the processes that run a model. (Nor does the router process load llama.cpp
    when its actor starts: requests reach it as token ids, tests/test_edge.py.)"""
    code = ("import sys, numpy as np, cluster.distributed.router, cluster.routing.warmth, cluster.engine.prefix as p, cluster.engine.token_affinity as a; "
            "p.prefix_hashes(list(range(64))); a.affinity_encode(np.full((2, 4), 0.5, np.float32)); "
            "maps = open('/proc/self/maps').read(); "
            "print(sorted({m for m in ('llama_cpp', 'cluster._native', 'cluster.engine.moe_engine') if m in sys.modules} | "
            "({'libggml'} if 'libggml' in maps else set())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"loaded for routing: {out}"


def _native_imports(path: Path) -> list[str]:
    """The statements of ``path`` that import ``cluster._native`` (absolutely or relatively)."""
    package = _module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("cluster._native")]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = (base or "").rstrip(".")
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [n for n in [base, *names] if n == "cluster._native" or n.startswith("cluster._native.")]
    return found


def test_the_engine_reaches_the_native_cache_only_through_its_binding_module() -> None:
    """``cluster.engine.cache`` is the typed surface of ``cluster._native``; every other engine module
    goes through it (``cluster._routing``, the router's maths, is a module of its own)."""
    assert _native_imports(PACKAGE / "engine" / "cache.py"), "the check no longer sees the binding's own import"
    through = {_module_name(p): found for p in sorted((PACKAGE / "engine").rglob("*.py"))
               if p.name != "cache.py" and (found := _native_imports(p))}
    assert not through, f"engine modules importing cluster._native: {through}"
