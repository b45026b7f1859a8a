"""Structural rules of the Python layer: tasks are told apart only by the registry, and restore() stays short."""
from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from typing import List

import dip_fast
from dip_fast import api
from dip_fast.tasks import registry

PACKAGE = Path(dip_fast.__file__).parent
#: The registry: the only modules that may name a task in a comparison.
REGISTRY_MODULES = {PACKAGE / "tasks" / "registry.py", PACKAGE / "tasks" / "builtin.py"}
#: The most lines restore()'s body (after its docstring) may have.
MAX_RESTORE_BODY = 60


def _task_names() -> set:
    names = set()
    for spec in registry.all_tasks():
        names.update((spec.name, *spec.aliases))
        if spec.command:
            names.add(spec.command)
    return names


def _string_constants(node: ast.AST) -> List[str]:
    """The string literals a comparison operand holds: itself, or the items of a literal tuple/list/set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for elt in node.elts for s in _string_constants(elt)]
    return []


def test_no_task_name_is_compared_with_a_string_outside_the_registry():
    names = _task_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in REGISTRY_MODULES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                hits = {s for operand in operands for s in _string_constants(operand)} & names
            else:
                continue
            if hits:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {sorted(hits)}")
    assert not found, "task names compared outside the registry:\n" + "\n".join(found)


def test_the_check_sees_a_comparison():
    """The rule above would catch the pattern it forbids."""
    tree = ast.parse('if task == "inpaint" or task in ("sr", "deblur"): pass')
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert {s for c in compares for o in [c.left, *c.comparators] for s in _string_constants(o)} == {
        "inpaint", "sr", "deblur"}


def restore_body_lines() -> int:
    """Lines of restore()'s body after its docstring, blank lines and comments included."""
    source = textwrap.dedent(inspect.getsource(api.restore))
    func = ast.parse(source).body[0]
    body = func.body[1:] if isinstance(func.body[0], ast.Expr) and isinstance(func.body[0].value, ast.Constant) \
        else func.body
    return body[-1].end_lineno - body[0].lineno + 1


def test_restore_body_is_short():
    assert restore_body_lines() <= MAX_RESTORE_BODY


# ---------------------------------------------------------------- the layers

#: The layers, lowest first: a module may import its own layer and those below it, never one above.
LAYERS = (
    ("dip_fast._version", "dip_fast._checks", "dip_fast._caller", "dip_fast._compat", "dip_fast._ops",
     "dip_fast._C", "dip_fast.io"),
    ("dip_fast.reference", "dip_fast.ops"),
    ("dip_fast.core",),
    ("dip_fast.tasks", "dip_fast.build"),
    ("dip_fast.pipeline",),
    ("dip_fast.api",),
    ("dip_fast.apps",),
    ("dip_fast", "dip_fast.__main__"),
)
#: The most modules the package's top level may hold (issue: a layout that shows the architecture).
MAX_TOP_LEVEL_MODULES = 12


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set:
    """The dip_fast modules ``path`` imports anywhere in its body (lazy imports too), TYPE_CHECKING aside."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dip_fast"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dip_fast"):
                continue
            for alias in node.names:  # "from pkg import module" imports the module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    found.discard(name)
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph() -> dict:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py's LAYERS"
    return best[0]


def test_imports_go_one_way_down_the_layers():
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, targets in _graph().items() for target in targets
              if _layer(target) > _layer(module) and not module.startswith(target + ".")]
    assert not upward, "\n".join(sorted(upward))


def _cycles(graph: dict) -> list:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node, counter=[0]):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_the_import_graph_has_no_cycle():
    # A package imports its submodules and they import siblings through it; only module-to-module
    # edges count, so a package's __init__ is left out of the graph.
    graph = {m: {t for t in ts if not _exists_package(t)} for m, ts in _graph().items() if not _exists_package(m)}
    assert _cycles(graph) == []


def _exists_package(module: str) -> bool:
    return (PACKAGE.parent.joinpath(*module.split(".")) / "__init__.py").exists()


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_top_level_stays_small():
    modules = [p for p in PACKAGE.glob("*.py")]
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, sorted(p.name for p in modules)


def test_every_preset_names_a_registered_task():
    from dip_fast import tasks

    for preset in tasks.PRESETS.values():
        assert registry.check_preset(preset) is preset


#: The most lines a function or method body (after its docstring) may have, unless a comment at its top
#: says why it must be one piece ("# one piece:").
MAX_BODY_LINES = 80


def _long_bodies() -> List[str]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str)
            if has_doc and len(body) == 1:
                continue
            first = body[1] if has_doc else body[0]
            size = node.end_lineno - first.lineno + 1
            if size > MAX_BODY_LINES and "# one piece:" not in lines[first.lineno - 1]:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({size} lines)")
    return found


def test_no_function_body_is_over_80_lines():
    assert _long_bodies() == []
