"""Every code example in README.md and docs/ runs, and what the pages cite exists.

* ```` ```python ```` blocks run as scripts in an empty folder, with
  ``dip_fast.restore`` capped at a few steps on the CPU (the examples keep
  their real settings; only the step count is cut);
* ```` ```pycon ```` blocks (and python blocks of ``>>>`` lines) run as doctests;
* every ``dip-fast ...`` line of a ```` ```bash ```` block parses with the
  command's own parser, and every ``make TARGET`` names a target of the Makefile;
* every repository path, C++/CUDA file name and ``dip_fast.*`` name in inline code exists.

The site itself is built by ``make docs`` (``mkdocs build --strict``).
"""
from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

import dip_fast
from dip_fast.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
ITERATIONS = 2  # steps each restore() of an example runs here

FENCE = re.compile(r"^```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^```", re.M | re.S)
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
REPO_PATH = re.compile(r"^(?:dip_fast|bench|scripts|tests|csrc|docs|\.ci)/[\w./-]*$")
DOTTED = re.compile(r"^dip_fast(?:\.\w+)+")
SOURCE_FILE = re.compile(r"^[\w-]+\.(?:h|cuh|cpp|cu)$")  # a C++/CUDA file named without its folder
PLACEHOLDER = re.compile(r"[<>*]|NAME|frob|\.\.\.")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:dip_fast. the fast backend falls back")]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _blocks(*langs: str) -> Iterator[Tuple[str, str, str]]:
    """``(id, language, code)`` of every fenced block in the pages, ``id`` being ``page:line``."""
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group("lang") in langs:
                line = text.count("\n", 0, m.start()) + 1
                yield f"{_rel(page)}:{line}", m.group("lang"), m.group("code")


def _params(*langs: str) -> List:
    return [pytest.param(lang, code, id=ident) for ident, lang, code in _blocks(*langs)]


def _is_doctest(lang: str, code: str) -> bool:
    return lang == "pycon" or code.lstrip().startswith(">>>")


@pytest.fixture
def quick_restore(monkeypatch, tmp_path):
    """Examples run in an empty folder with ``dip_fast.restore`` cut to ``ITERATIONS`` steps, on one CPU thread."""
    real = dip_fast.restore
    calls = []

    def restore(*args, **kwargs):
        kwargs["iterations"] = min(kwargs.get("iterations") or ITERATIONS, ITERATIONS)
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("num_threads", 1)
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dip_fast, "restore", restore)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("lang, code", _params("python", "pycon"))
def test_example_runs(lang, code, quick_restore, capsys):
    if _is_doctest(lang, code):
        test = doctest.DocTestParser().get_doctest(code, {}, "example", None, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, out=print)
        assert runner.failures == 0, capsys.readouterr().out
        assert runner.tries > 0
        return
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})


def _commands(code: str) -> Iterator[str]:
    """The command lines of a shell block: continuations joined, comments dropped."""
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield line


@pytest.mark.parametrize("lang, code", _params("bash", "sh"))
def test_shell_example_parses(lang, code):
    makefile = (ROOT / "Makefile").read_text()
    checked = 0
    for line in _commands(code):
        words = shlex.split(line)
        if "dip-fast" in words:
            argv = words[words.index("dip-fast") + 1:]
        elif "dip_fast" in words and "-m" in words:  # python -m dip_fast, torchrun ... -m dip_fast
            argv = words[words.index("dip_fast") + 1:]
        elif words[0] == "make":
            for target in words[1:]:
                if "=" not in target:
                    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target!r}"
            checked += 1
            continue
        else:
            continue
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"dip-fast {' '.join(argv)!r} does not parse (exit {exc.code})")
        checked += 1
    assert checked or "pip" in code or "cmake" in code, "a shell block with nothing checkable"


def _spans() -> Iterator[Tuple[str, str]]:
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for m in CODE_SPAN.finditer(text):
            yield _rel(page), m.group(1).strip()


def test_cited_paths_exist():
    sources = {p.name for p in (ROOT / "csrc").rglob("*")}
    missing = [(page, span) for page, span in _spans()
               if REPO_PATH.match(span) and not PLACEHOLDER.search(span) and not (ROOT / span).exists()]
    missing += [(page, span) for page, span in _spans() if SOURCE_FILE.match(span) and span not in sources]
    assert not missing, f"paths cited that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_cited_names_exist():
    names = {(page, m.group(0)) for page, span in _spans() for m in [DOTTED.match(span)]
             if m is not None and not PLACEHOLDER.search(span)}
    assert len(names) > 10
    missing = sorted((page, name) for page, name in names if not _resolves(name))
    assert not missing, f"names cited that do not exist: {missing}"


def test_every_page_is_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in PAGES[1:]]
    assert pages, "no pages under docs/"
    assert not [p for p in pages if f": {p}" not in nav], "a page under docs/ is missing from mkdocs.yml's nav"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def _roles_extension():
    pytest.importorskip("griffe")  # the docs extra
    spec = importlib.util.spec_from_file_location("griffe_sphinx_roles", ROOT / "scripts" / "griffe_sphinx_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_roles_become_links_and_a_role_naming_nothing_warns(tmp_path, caplog):
    """What makes ``mkdocs build --strict`` fail on a docstring that names an object the code no longer has."""
    import griffe

    roles = _roles_extension()
    package = tmp_path / "toy_docs"
    package.mkdir()
    (package / "__init__.py").write_text(
        '"""See :func:`run`, :class:`~toy_docs.sub.Thing`, :class:`torch.Tensor` and :data:`GONE`."""\n'
        "def run():\n    '''Run.'''\n")
    (package / "sub.py").write_text("class Thing:\n    '''A thing.'''\n")
    extensions = griffe.load_extensions(roles.SphinxRoles(package="toy_docs"))
    loader = griffe.GriffeLoader(extensions=extensions, search_paths=[str(tmp_path)])
    with caplog.at_level("WARNING"):
        text = loader.load("toy_docs").docstring.value
    assert '<autoref identifier="toy_docs.run" optional><code>run</code></autoref>' in text
    assert '<autoref identifier="toy_docs.sub.Thing" optional><code>Thing</code></autoref>' in text
    assert "<code>torch.Tensor</code>" in text and "<code>GONE</code>" in text
    assert "GONE" in caplog.text and "Tensor" not in caplog.text and "run" not in caplog.text


def test_docs_extension_examples():
    result = doctest.testmod(_roles_extension())
    assert result.attempted > 0 and result.failed == 0
