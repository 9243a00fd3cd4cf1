"""The package's shape: imports point down its floors, no import cycles, and the Backend protocol
lists every member its callers use.

Floors, lowest first: constants, paths, atomic < data, recipe < evaluate < backends < harness <
bench, ledger < compare < doctor, cli. A module may import its own floor or lower ones. The import graph
is read from the source (every `import` / `from` statement, function-level ones included), as
../shared/tools/import_cycles.py reads it.
"""
import ast
from pathlib import Path

import pytest

from _train_utils import ROOT

PACKAGE = ROOT / "mlx_ar"
FLOORS = {"constants": 0, "paths": 0, "atomic": 0, "data": 1, "recipe": 1, "evaluate": 2, "backends": 3,
          "harness": 4, "bench": 5, "ledger": 5, "compare": 6, "doctor": 7, "cli": 7}


def modules() -> dict:
    """{dotted name: path} of every module in the package."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict:
    """{module: {modules of the package it imports}}."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets.add(prefix)
                targets.update(f"{prefix}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else "constants"     # the package itself: a docstring
    if part not in FLOORS:
        raise AssertionError(f"{module} sits on no floor: add its top-level name to FLOORS")
    return FLOORS[part]


def test_the_graph_reader_sees_what_it_must():
    graph = import_graph()
    assert "mlx_ar.backends.cuda.kernels.fallback" in graph["mlx_ar.backends.cuda.kernels"]  # `from . import x`
    assert "mlx_ar.recipe" in graph["mlx_ar.harness.main"]                                  # `from ..x import y`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def _upward_edges():
    return sorted((a, b) for a, targets in import_graph().items() for b in targets if floor(b) > floor(a))


def test_imports_point_down_the_floors():
    upward = _upward_edges()
    assert upward == [], "\n".join(f"{a} imports {b}, a higher floor" for a, b in upward)


def test_a_backend_never_imports_the_harness_or_higher():
    graph = import_graph()
    found = sorted((a, b) for a, targets in graph.items() if a.startswith("mlx_ar.backends")
                   for b in targets if floor(b) > FLOORS["backends"])
    assert found == []


# --- the Backend protocol ---------------------------------------------------------------------
CALLERS = ("harness/main.py", "harness/loop.py", "bench.py", "evaluate.py")


def protocol_members() -> set:
    from mlx_ar.backends import Backend

    return {n for n in vars(Backend) if not n.startswith("_")} | set(Backend.__annotations__)


def test_callers_use_only_what_the_protocol_lists():
    """Every `backend.<member>` in the harness, the bench and evaluation is in Backend."""
    used = {}
    for rel in CALLERS:
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "backend":
                used.setdefault(node.attr, rel)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and node.args \
                    and getattr(node.args[0], "id", None) == "backend" and isinstance(node.args[1], ast.Constant):
                used.setdefault(node.args[1].value, rel)
    assert used, "the callers were not read"
    missing = {m: where for m, where in used.items() if m not in protocol_members()}
    assert missing == {}


def test_callers_probe_nothing_with_getattr():
    probing = [rel for rel in CALLERS if "getattr(backend" in (PACKAGE / rel).read_text()]
    assert probing == []


def test_the_cuda_backend_has_every_protocol_member():
    from mlx_ar.backends.cuda.backend import CudaBackend

    b = CudaBackend(ROOT / "train.py")
    assert [m for m in sorted(protocol_members()) if not hasattr(b, m)] == []


def test_backends_are_named_once():
    """The tuple of backend names lives in mlx_ar.backends; everyone else imports it."""
    spelled = [str(f.relative_to(ROOT)) for f in PACKAGE.rglob("*.py")
               if '("mlx", "cuda")' in f.read_text() or "['mlx', 'cuda']" in f.read_text()
               or '["mlx", "cuda"]' in f.read_text()]
    assert spelled == ["mlx_ar/backends/__init__.py"]


def test_the_tree_has_one_folder_per_backend_kernels_and_no_private_patching():
    cuda = PACKAGE / "backends" / "cuda"
    assert (cuda / "backend.py").exists() and (cuda / "kernels" / "__init__.py").exists()
    for f in (PACKAGE / "backends").rglob("*.py"):
        text = f.read_text()
        assert "compile_fx" not in text and "pycache_prefix" not in text, f
