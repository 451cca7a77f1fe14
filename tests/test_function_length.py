"""No function of the project is longer than 80 body lines without a stated reason (issue 18).

A function's body lines run from its first statement after the docstring to its
last line (comments and blank lines inside count: they are what a reader scrolls
through). A function may go over when a comment ``# long: <reason>`` sits on its
``def`` line, on the line above it (above its decorators too), or as the first
line of its body.

``python3 tests/test_function_length.py`` lists every function over the limit,
marked or not, longest first.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("screener", "training")
LIMIT = 80

#: Long functions in files other sessions were editing when this check came in (issue 18); each is
#: to be split at its seams or given a ``# long: <reason>`` by whoever next owns its file, and its
#: line here removed. No function may join this list.
NOT_YET_SPLIT: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LongFunction:
    """One function over the limit."""

    path: str
    name: str
    lines: int
    reason: str | None


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if (len(body) > 1 and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def _reason(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    top = min([node.lineno] + [d.lineno for d in node.decorator_list])
    candidates = [lines[top - 2] if top >= 2 else "", lines[node.lineno - 1]]
    first = node.body[0].lineno
    candidates += lines[node.lineno:first - 1] + [lines[first - 1]]
    for text in candidates:
        if "# long:" in text:
            return text.split("# long:", 1)[1].strip() or None
    return None


def long_functions(files: list[Path] | None = None, limit: int = LIMIT) -> list[LongFunction]:
    """Every function (methods and nested ones too) over ``limit`` body lines, longest first.

    Parameters
    ----------
    files
        Python files to read; every ``.py`` under ``screener/`` and ``training/`` when omitted.
    limit
        Largest allowed number of body lines.

    Returns
    -------
    list of LongFunction
        ``reason`` is the text after ``# long:``, or None when there is none.
    """
    if files is None:
        files = sorted(f for p in PACKAGES for f in (ROOT / p).rglob("*.py"))
    out = []
    for f in files:
        text = f.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > limit:
                    rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
                    out.append(LongFunction(str(rel), node.name, n, _reason(node, lines)))
    return sorted(out, key=lambda x: -x.lines)


def test_the_counter_skips_the_docstring_and_reads_the_reason(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    f = tmp_path / "m.py"
    f.write_text(f'def short():\n    """Doc."""\n{body[:-len(chr(10) + "    x80 = 80")]}\n\n'
                 f'def long():\n    """Doc.\n\n    More.\n    """\n{body}\n\n'
                 f'# long: a table of cases, one per line\ndef excused():\n{body}\n')
    found = {x.name: x for x in long_functions([f])}
    assert set(found) == {"long", "excused"}
    assert found["long"].lines == 81 and found["long"].reason is None
    assert found["excused"].reason == "a table of cases, one per line"


def test_no_function_over_80_lines_without_a_reason() -> None:
    bare = [f"{x.path}:{x.name}:{x.lines}" for x in long_functions()
            if x.reason is None and f"{x.path}:{x.name}" not in NOT_YET_SPLIT]
    assert bare == [], "functions over 80 body lines without a '# long: <reason>' comment"


if __name__ == "__main__":
    for x in long_functions():
        print(f"{x.path}:{x.name}:{x.lines}" + (f"  # long: {x.reason}" if x.reason else ""))
    sys.exit(0)
