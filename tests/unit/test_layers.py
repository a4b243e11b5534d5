"""Layers point one way, and no module imports itself back.

    parallel core  <  data and models  <  building a run  <  training loop  <  tools and launchers

The import graph of ``common/``, ``bench/`` and ``k8s/`` is read from the source: module-level and
function-level imports alike (a lazy import cannot hide a cycle), relative imports resolved
against their package, ``from package import module`` counted as an import of that module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "bench", "k8s")

# The first prefix that matches names a module's layer (a prefix ending in "." names a package).
LAYERS = (
    ("tools and launchers", ("common.tools.", "common.tools", "common.data.__main__", "bench.", "bench", "k8s.",
                             "k8s")),
    ("training loop", ("common.train", "common.module", "common.step", "common.averaging", "common.checkpoint.", "common.checkpoint", "common.watchdog",
                       "common.recording", "common.evaluation")),
    ("building a run", ("common.run", "common.settings", "common.inference", "common.rundir", "common.cluster")),
    ("data and models", ("common.data.", "common.data", "common.models.", "common.models", "common.flops")),
    ("parallel core", ("common.parallel.", "common.parallel", "common.errors")),
)
ORDER = [name for name, _ in reversed(LAYERS)]  # lowest first


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module.startswith(p) if p.endswith(".") else module == p for p in prefixes):
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """``from ..x import y`` inside ``importer`` -> the absolute module name of ``..x``."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, path.name == "__init__.py")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def _reachable(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def upward_imports(graph) -> list[str]:
    return [f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)})"
            for module, deps in graph.items() for dep in sorted(deps)
            if ORDER.index(layer_of(dep)) > ORDER.index(layer_of(module))]


def cycles(graph) -> list[str]:
    return sorted(name for name in graph if name in _reachable(graph, name))


def test_every_import_points_down_or_within_its_layer():
    wrong = upward_imports(import_graph())
    assert not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles through {found}"


def test_the_graph_sees_relative_imports_and_the_tools():
    graph = import_graph()
    assert {"common.data.loading", "common.data.sources"} <= graph["common.data.datamodule"]  # `from .loading import`
    assert {"common.run", "common.parallel"} <= graph["common.train"]
    assert "common.run" in graph["common.tools.plan"] and "common.run" in graph["bench.cpu"]
    assert "common.cluster" in graph["k8s.render"] and "common.cluster" in graph["common.tools.slurm"]
    assert not any("common.train" in deps for deps in graph.values())  # only torchrun runs it


def test_an_import_that_points_up_or_closes_a_cycle_is_found():
    graph = import_graph()
    up = {**graph, "common.data.loading": graph["common.data.loading"] | {"common.run"}}
    assert upward_imports(up) == ["common.data.loading (data and models) imports common.run (building a run)"]
    back = {**graph, "common.data.audio": graph["common.data.audio"] | {"common.data.checks"}}  # the old cycle
    assert cycles(back) == ["common.data.audio", "common.data.checks"]


def test_tools_load_models_through_common_inference():
    graph = import_graph()
    for tool in ("common.tools.transcribe", "common.tools.synthesize", "common.tools.export", "common.evaluation"):
        assert "common.inference" in graph[tool], tool
    assert "common.train" not in _reachable(graph, "common.inference")
