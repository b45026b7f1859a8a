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
