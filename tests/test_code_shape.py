"""The shape targets of the package (issue 20), checked on every run.

No function over 80 lines of code (its docstring, blank lines and comment
lines not counted), no class over 250 lines, no cyclomatic complexity over
20 (radon), and no benchmark figure, date or machine detail in a docstring
or comment: figures live in ``bench/results-*.txt`` and ``docs/performance.md``.
"""

from __future__ import annotations

import ast
import io
import pathlib
import re
import tokenize

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pwriter"
SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if not path.name.endswith("_build.py"))
FUNCTION_LINES = 80
CLASS_LINES = 250
COMPLEXITY = 20
# A throughput or timing figure, a date, or a machine detail.
FIGURE = re.compile(r"\d+(\.\d+)?\s*(GiB|MiB|GB|MB|KiB)/s|\d+(\.\d+)?\s*(ms|µs|us|ns)\b|\b20\d\d-\d\d-\d\d\b"
                    r"|\d+(\.\d+)?x (faster|slower)|\b\d+[- ]core\b|\bthis VM\b", re.IGNORECASE)


def _name(path: pathlib.Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    skip: set[int] = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        skip = set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    assert node.end_lineno is not None
    return sum(1 for number in range(node.lineno, node.end_lineno + 1)
               if number not in skip and lines[number - 1].strip() and not lines[number - 1].strip().startswith("#"))


def _oversized() -> list[str]:
    found = []
    for path in SOURCES:
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = _code_lines(node, lines)
                if count > FUNCTION_LINES:
                    found.append(f"{_name(path)}:{node.lineno} function {node.name}: {count} lines of code")
            elif isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                count = node.end_lineno - node.lineno + 1
                if count > CLASS_LINES:
                    found.append(f"{_name(path)}:{node.lineno} class {node.name}: {count} lines")
    return found


def test_no_function_or_class_is_too_long() -> None:
    assert _oversized() == []


def test_no_function_is_too_complex() -> None:
    from radon import complexity as radon
    found = [f"{_name(path)}:{block.lineno} {block.name}: {block.complexity}"
             for path in SOURCES for block in radon.cc_visit(path.read_text()) if block.complexity > COMPLEXITY]
    assert found == []


def _prose(source: str) -> list[tuple[int, str]]:
    """Every comment and docstring of ``source``, with its first line number."""
    found = [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                found.append((getattr(node, "lineno", 1), docstring))
    return found


def test_no_figure_in_docstrings_or_comments() -> None:
    found = [f"{_name(path)}:{line}: {match.group(0)!r}" for path in SOURCES
             for line, text in _prose(path.read_text()) for match in FIGURE.finditer(text)]
    assert found == []


def test_the_checks_can_fail(tmp_path: pathlib.Path) -> None:
    """The figure pattern and the line count catch what they are meant to."""
    assert FIGURE.search("reaches 1.9 GiB/s here") and FIGURE.search("measured 2026-11-29")
    assert not FIGURE.search("a 4 MiB stripe")
    source = "def f():\n    '''doc\n    more'''\n" + "    x = 1\n" * 81
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert _code_lines(node, source.splitlines()) == 82  # (the def line counts)


PLANES = {"plan": 1, "data": 2, "service": 3, "faces": 4}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """The pwriter modules ``path`` imports (relative imports resolved), with their line numbers."""
    package = ["pwriter", *path.relative_to(PACKAGE).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found.append((node.lineno, ".".join(base + (node.module.split(".") if node.module else []))))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            found += [(node.lineno, name) for name in names if name.split(".")[0] in {"pwriter", "trio"}]
    return found


def test_each_plane_imports_only_the_planes_below_it() -> None:
    """plan < data < service < faces (see docs/architecture.md); the plan
    plane is pure: it never imports trio."""
    found = []
    for path in SOURCES:
        parts = path.relative_to(PACKAGE).parts
        plane = PLANES.get(parts[0]) if len(parts) > 1 else None
        if plane is None:
            continue
        for line, module in _imports(path):
            words = module.split(".")
            target = PLANES.get(words[1]) if len(words) > 1 and words[0] == "pwriter" else None
            if (target is not None and target > plane) or (parts[0] == "plan" and words[0] == "trio"):
                found.append(f"{_name(path)}:{line} imports {module}")
    assert found == []
