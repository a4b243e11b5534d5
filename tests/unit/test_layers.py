"""Layers point one way: models and data below the training loop, command-line tools above it.

The import graph of ``common`` is read from the source (module-level and function-level imports
alike, so a lazy import cannot hide a cycle)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"common.transcribe", "common.synthesize", "common.export", "common.plan", "common.data.__main__",
         "common.tools.check_run", "common.profile_batches"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (ROOT / "common").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _reachable(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_training_entry_imports_no_command_line_tool():
    reached = _reachable(import_graph(), "common.train")
    assert not reached & TOOLS, f"common.train reaches command-line tools {sorted(reached & TOOLS)}"
    assert {"common.models", "common.evaluation", "common.inference"} <= reached  # evaluation loads the ASR model


def test_no_import_cycles_in_common():
    graph = import_graph()
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"import cycles through {cycles}"


def test_tools_load_models_through_common_inference():
    graph = import_graph()
    for tool in ("common.transcribe", "common.synthesize", "common.export", "common.evaluation"):
        assert "common.inference" in graph[tool], tool
    assert "common.train" not in _reachable(graph, "common.inference")
