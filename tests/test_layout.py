"""The package's two layers: the core (the algorithm, read top to bottom, kto_np/fast included) never
imports a tool, and no module takes part in an import cycle. Read from the source with `ast`, so an import
inside a function counts as much as one at the top, and an import of a submodule counts as an import of each
package on the way."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kto_np"

# the core, in reading order (README "Where to start")
CORE = ("backend", "validation", "layers", "model", "edifice", "architectures", "logprobs", "losses", "dpo", "step",
        "optim", "gradcheck", "fast")
STDLIB_OK = {"__future__", "math", "numbers", "os", "typing", "dataclasses", "collections", "functools",
             "threading", "concurrent",
             "warnings", "itertools"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> tuple[str, list[str]]:
    """(the module an ImportFrom reads from, the names it imports, as candidate modules): `from .x import y`
    reads x and names x.y (a module should y be a submodule, else an attribute of x)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return target, [f"{target}.{alias.name}" for alias in node.names]


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(kto_np modules imported, other top-level modules imported) anywhere in the file.

    An import runs every package __init__ on the way: importing kto_np.oracle.check runs
    kto_np/oracle/__init__.py first, so it counts as importing kto_np.oracle too. The package's own
    __init__ (kto_np) is its facade, which every submodule runs under: it counts only where it is read,
    `import kto_np` or `from kto_np import name` with a name that is not a submodule.
    """
    ours, others = set(), set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = _modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.split(".")[0] == "kto_np" else others).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target, named = _resolve(module, node, path.name == "__init__.py")
            if target.split(".")[0] != "kto_np":
                others.add(target.split(".")[0])
                continue
            submodules = [name for name in named if name in known]
            ours.update(submodules)
            if target != "kto_np" or len(submodules) < len(named):
                ours.add(target)
    # the packages on the way (kto_np.oracle for kto_np.oracle.check), below the facade
    ours |= {".".join(name.split(".")[:depth]) for name in ours for depth in range(2, name.count(".") + 1)}
    ours.discard(module)
    return ours, {name.split(".")[0] for name in others}


def test_every_core_module_exists():
    known = _modules()
    missing = [name for name in CORE if f"kto_np.{name}" not in known]
    assert not missing, f"core modules missing: {missing}"


def test_the_import_reader_sees_a_tool_imported_inside_a_function(tmp_path):
    source = tmp_path / "layers.py"
    source.write_text("from . import backend\n\ndef f():\n    from .train import run\n    import scipy\n")
    ours, others = _imports("kto_np.layers", source)
    assert ours == {"kto_np.backend", "kto_np.train"} and others == {"scipy"}


def _core_modules() -> list[str]:
    """The core's modules, short names: a core package (fast) brings every module under it."""
    return sorted(name.removeprefix("kto_np.") for name in _modules()
                  if name != "kto_np" and name.removeprefix("kto_np.").split(".")[0] in CORE)


def test_every_module_of_a_core_package_is_checked():
    assert {"fast", "fast.layers", "fast.logprobs", "fast.optim"} <= set(_core_modules())


@pytest.mark.parametrize("name", _core_modules())
def test_core_imports_only_numpy_the_stdlib_and_the_core(name):
    ours, others = _imports(f"kto_np.{name}", _modules()[f"kto_np.{name}"])
    tools = sorted(m for m in ours if m.removeprefix("kto_np.").split(".")[0] not in CORE)
    assert not tools, f"core module {name} imports tools {tools}"
    # cupy and threadpoolctl are optional: imported where present (the CuPy backend, the fast room's BLAS
    # thread control), never required
    foreign = sorted(others - STDLIB_OK - {"numpy", "cupy", "cupyx", "threadpoolctl", "kto_np"})
    assert not foreign, f"core module {name} imports {foreign}"


def _import_graph() -> dict[str, set[str]]:
    # edges to the facade (kto_np itself) are left out: every submodule runs under it, and it imports
    # what it re-exports, so each would close a loop that says nothing
    return {name: {m for m in _imports(name, path)[0] if m != "kto_np"} for name, path in _modules().items()}


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle in them (Tarjan): each module that takes part in
    an import cycle is in exactly one, with every module it shares a cycle with."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each once, starting from its smallest module: [a, b, c, a]."""
    found = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                found.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def test_no_import_cycle_anywhere():
    """0 import cycles in the whole package, kto_np.oracle included, counting imports inside functions and the
    package __init__ files each import runs (a facade that imports its parts on first use, through
    importlib, as kto_np's and kto_np.oracle's do, adds no edge)."""
    graph = _import_graph()
    components = _components(graph)
    assert not components, "modules in an import cycle (one line per strongly connected component):\n" + "\n".join(
        ", ".join(c) for c in components)
    assert _cycles(graph) == []  # the two finders agree


@pytest.mark.parametrize("package", ["kto_np.oracle", "kto_np.exercises"])
def test_a_facade_imports_none_of_its_parts(package):
    """The oracle's and the exercises' __init__ import only the lazy-facade helper, never their own parts."""
    ours, _ = _imports(package, _modules()[package])
    parts = sorted(m for m in ours if m.startswith(package + "."))
    assert ours <= {"kto_np._facade"} and not parts, f"{package}/__init__.py imports {sorted(ours)}: it should " \
                                                     "import its parts on first use"


def test_every_name_of_the_oracle_facade_resolves():
    import kto_np.oracle as oracle  # noqa: PLC0415

    missing = [name for name in oracle.__all__ if not hasattr(oracle, name)]
    assert not missing, f"kto_np.oracle.__all__ names what it cannot give: {missing}"
    assert oracle.MISTAKES is oracle.KNOWN_MISTAKES
    with pytest.raises(AttributeError, match="no_such_name"):
        oracle.no_such_name  # noqa: B018


def test_the_cycle_finders_find_a_cycle():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"b"}, "e": {"a"}}
    assert _components(graph) == [["a", "b", "c", "d"]]
    assert _cycles(graph) == [["a", "b", "c", "a"], ["b", "d", "b"]]
    acyclic = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert _components(acyclic) == [] and _cycles(acyclic) == []


def test_an_import_through_a_package_init_is_an_edge(tmp_path):
    # kto_np.oracle.check imported from kto_np.layers runs kto_np/oracle/__init__.py first: a cycle
    # layers -> oracle -> ... -> layers exists even when no oracle module named in the import imports layers
    source = tmp_path / "layers.py"
    source.write_text("def f():\n    from kto_np.oracle.check import verify\n")
    ours, _ = _imports("kto_np.layers", source)
    assert ours == {"kto_np.oracle.check", "kto_np.oracle"}
    init = tmp_path / "__init__.py"
    init.write_text("from . import check\nfrom ..layers import layer_norm\n")
    assert _imports("kto_np.oracle", init)[0] == {"kto_np.oracle.check", "kto_np.layers"}
    graph = {"kto_np.layers": ours, "kto_np.oracle": {"kto_np.oracle.check", "kto_np.layers"},
             "kto_np.oracle.check": set()}
    assert _components(graph) == [["kto_np.layers", "kto_np.oracle"]]


def test_the_import_reader_sees_the_facade_only_where_it_is_read(tmp_path):
    source = tmp_path / "step.py"
    source.write_text("from . import backend\n")
    assert _imports("kto_np.step", source)[0] == {"kto_np.backend"}
    source.write_text("from . import backend, GPT\n")
    assert _imports("kto_np.step", source)[0] == {"kto_np.backend", "kto_np"}
