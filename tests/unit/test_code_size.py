"""A newcomer reads a function in a screen and a class in a sitting: no function in ``common/`` is longer
than 60 lines and no class longer than 150 (docstrings and comments included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 150


def too_long(tree: ast.AST, path: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
            found.append(f"{path}:{node.lineno} class {node.name}: {lines} lines > {MAX_CLASS_LINES}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
            found.append(f"{path}:{node.lineno} {node.name}(): {lines} lines > {MAX_FUNCTION_LINES}")
    return found


def test_no_long_function_or_class_in_common():
    found = [f for p in sorted((ROOT / "common").rglob("*.py"))
             for f in too_long(ast.parse(p.read_text()), str(p.relative_to(ROOT)))]
    assert not found, "split these (one concern each):\n" + "\n".join(found)


def test_the_rule_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert too_long(ast.parse(f"def f():\n{body}\n"), "m.py") == [f"m.py:1 f(): {MAX_FUNCTION_LINES + 1} lines > 60"]
