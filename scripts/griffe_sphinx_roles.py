"""The docstrings' Sphinx conventions, rendered by mkdocstrings for the documentation site (``make docs``).

The package's docstrings follow Google style with three habits from Sphinx
that mkdocstrings does not read; this griffe extension, loaded by
mkdocstrings (``mkdocs.yml``), rewrites them before they are parsed:

* **Roles.** Docstrings name other objects the way Sphinx does,
``:func:`restore``` or ``:class:`~dip_fast.tasks.Preset```. This griffe
extension, loaded by mkdocstrings (``mkdocs.yml``), turns each role into a
link: the name is looked up as Sphinx would (the enclosing class, the
module, its parent packages, then as an absolute path), aliases are
followed to the object they name, and the role becomes an optional
cross-reference, so the text links where the target has a page and stays
plain code where it has none (a private helper). A role that names nothing
in the package is a drift between the docstring and the code: it is logged
as a warning, and ``mkdocs build --strict`` fails on it.

  Names outside the package (``torch.Tensor``, ``numpy.ndarray``) are left
  as plain code.
* **Shared entries.** ``a, b: text`` in an ``Args:`` or ``Attributes:``
  section documents both names (as numpydoc allows); it becomes one entry per
  name, each with the text, so the check that every documented parameter is
  in the signature still applies to each name.
* **Doctest blocks.** A ``>>>`` block outside an ``Examples:`` section is
  code in reST; here it is fenced as a ``pycon`` block (otherwise Markdown
  would read ``x[0][1]`` as a link).
"""
from __future__ import annotations

import builtins
import html
import re
from typing import Any, Iterator, Optional

import griffe


SHARED_SECTIONS = ("Args:", "Arguments:", "Parameters:", "Attributes:", "Keyword Args:", "Other Parameters:")
SHARED_ENTRY = re.compile(r"^(?P<indent> +)(?P<names>[A-Za-z_]\w*(?:, *[A-Za-z_]\w*)+):(?P<rest>(?: .*)?)$")
ROLE = re.compile(r":(?:py:)?(?P<kind>func|meth|class|mod|data|attr|exc|obj|const):`(?P<text>[^`]+)`")
PACKAGE = "dip_fast"


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)  # type: ignore[arg-type]


def _lookup(collection: Any, path: str) -> Optional[griffe.Object]:
    """The object at ``path`` (aliases followed to their target), or None."""
    parts = path.split(".")
    try:
        obj = collection[parts[0]]
        for part in parts[1:]:
            if obj.is_alias:
                obj = obj.final_target
            obj = obj.members[part]
        return obj.final_target if obj.is_alias else obj
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _candidates(owner: griffe.Object, name: str) -> Iterator[str]:
    scope: Optional[griffe.Object] = owner if not owner.is_module else None
    while scope is not None and not scope.is_module:
        if scope.is_class:
            yield f"{scope.path}.{name}"
        scope = scope.parent
    module: Optional[griffe.Object] = owner.module
    while module is not None:
        yield f"{module.path}.{name}"
        module = module.parent
    yield name


def resolve(collection: Any, owner: griffe.Object, name: str) -> Optional[str]:
    """The full path of the object ``name`` means in ``owner``'s docstring, or None when it names nothing."""
    for path in _candidates(owner, name):
        target = _lookup(collection, path)
        if target is not None:
            return target.path
    return None


def split_shared_entries(text: str) -> str:
    r"""``a, b: text`` entries of the parameter and attribute sections, one entry per name.

    >>> print(split_shared_entries("Args:\n    a, b: the pair,\n        both.\n    c: alone."))
    Args:
        a: the pair,
            both.
        b: the pair,
            both.
        c: alone.
    """
    lines, out, i, section = text.split("\n"), [], 0, False
    while i < len(lines):
        line = lines[i]
        if line and not line.startswith(" "):
            section = line.strip() in SHARED_SECTIONS
        match = SHARED_ENTRY.match(line) if section else None
        if match is None:
            out.append(line)
            i += 1
            continue
        indent = len(match.group("indent"))
        body = [match.group("rest")]
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append("\n" + lines[i])
            i += 1
        while body and not body[-1].strip():  # a blank line after the entry stays after the copies
            body.pop()
            i -= 1
        for name in re.split(r", *", match.group("names")):
            out.append(f"{match.group('indent')}{name}:{''.join(body)}")
    return "\n".join(out)


def fence_doctests(text: str) -> str:
    r"""``>>>`` blocks outside a section (not indented) fenced as code.

    >>> fence_doctests("Text.\n\n>>> 1 + 1\n2\n\nMore.").split("\n")
    ['Text.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
    """
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if not lines[i].startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        out.append("```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append("```")
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Roles become optional cross-references (one naming nothing is a warning); shared entries and doctests.

    Args:
        package: the package whose names must resolve (a dotted name outside
            it, such as ``torch.Tensor``, is left as plain code).
    """

    def __init__(self, package: str = PACKAGE) -> None:
        super().__init__()
        self.package = package

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue

            def replace(match: "re.Match[str]", obj: griffe.Object = obj) -> str:
                text = match.group("text").strip()
                name = text.lstrip("~.")
                shown = name.rsplit(".", 1)[-1] if text.startswith("~") else name
                code = f"<code>{html.escape(shown)}</code>"
                target = resolve(collection, obj, name)
                if target is None:
                    if name.split(".")[0] == self.package or ("." not in name and not hasattr(builtins, name)):
                        # mkdocstrings routes griffe's logger into mkdocs', so --strict counts this
                        griffe.logger.warning("%s: the docstring's :%s:`%s` names nothing in %s",
                                     obj.path, match.group("kind"), text, self.package)
                    return code
                return f'<autoref identifier="{target}" optional>{code}</autoref>'

            text = fence_doctests(split_shared_entries(obj.docstring.value))
            obj.docstring.value = ROLE.sub(replace, text)
