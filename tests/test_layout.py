"""The package's two layers: the core (the algorithm, read top to bottom) never imports a tool, and no
module of the package takes part in an import cycle. Read from the source with `ast`, so an import
inside a function counts as much as one at the top."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kto_np"

# the core, in reading order (README "Layout": read these)
CORE = ("backend", "validation", "layers", "model", "edifice", "architectures", "logprobs", "losses", "dpo", "step",
        "optim", "gradcheck", "fast")
STDLIB_OK = {"__future__", "math", "numbers", "os", "typing", "dataclasses", "collections", "functools",
             "warnings", "itertools"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> tuple[str, list[str]]:
    """(the module an ImportFrom reads from, the candidate modules it names): `from .x import y`
    names x (and x.y, should y be a submodule); `from . import x` names x only."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    named = [f"{target}.{alias.name}" for alias in node.names]
    return target, (named if node.level and not node.module else [target] + named)


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(kto_np modules imported, other top-level modules imported) anywhere in the file."""
    ours, others = set(), set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = _modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.split(".")[0] == "kto_np" else others).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target, names = _resolve(module, node, path.name == "__init__.py")
            if target.split(".")[0] == "kto_np":
                ours.update(name for name in names if name in known)
            else:
                others.add(target.split(".")[0])
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


@pytest.mark.parametrize("name", CORE)
def test_core_imports_only_numpy_the_stdlib_and_the_core(name):
    path = PACKAGE / f"{name}.py" if (PACKAGE / f"{name}.py").exists() else PACKAGE / name / "__init__.py"
    ours, others = _imports(f"kto_np.{name}", path)
    tools = sorted(m for m in ours if m.removeprefix("kto_np.").split(".")[0] not in CORE)
    assert not tools, f"core module {name} imports tools {tools}"
    foreign = sorted(others - STDLIB_OK - {"numpy", "cupy", "cupyx", "kto_np"})
    assert not foreign, f"core module {name} imports {foreign}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_no_import_cycle_in_the_package():
    # the package's __init__ is its facade: it imports what it re-exports, and submodules import the
    # package only to reach siblings, so edges to "kto_np" itself are left out
    graph = {name: {m for m in _imports(name, path)[0] if m != "kto_np"} for name, path in _modules().items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
