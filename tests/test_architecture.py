"""The layout's promises: data flows one way, models load through one function, the package ships whole."""

import ast
import json
import subprocess
import sys
from pathlib import Path

from fts_mcp.jobs.kinds import KINDS

PACKAGE = Path(__file__).resolve().parents[1] / "fts_mcp"
LOADER = PACKAGE / "models" / "loading.py"
RECIPES = sorted({kind.recipe for kind in KINDS.values()})


def test_recipes_never_reach_the_job_store():
    """A recipe is run(spec, ctx): importing one must not bring in the store, the runner or SQLite. One process
    imports them one after another (torch's import is paid once); a forbidden module is charged to the first recipe
    after whose import it is there."""
    code = ("import importlib, json, sys\n"
            "forbidden = ('fts_mcp.jobs.store', 'fts_mcp.jobs.runner', 'fts_mcp.jobs.worker', 'fts_mcp.jobs.service', "
            "'fts_mcp.core', 'sqlite3', 'mcp')\n"
            "found = {}\n"
            f"for recipe in {RECIPES!r}:\n"
            "    assert callable(importlib.import_module(recipe).run), recipe\n"
            "    found[recipe] = sorted(m for m in forbidden if m in sys.modules)\n"
            "print(json.dumps(found))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert set(found) == set(RECIPES) and not any(found.values()), found


def _loads_models(tree: ast.AST) -> list[str]:
    """Calls such as AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if name.startswith("Auto"):
                found.append(f"{name}.from_pretrained (line {node.lineno})")
    return found


def test_every_torch_side_module_loads_models_through_one_function():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path == LOADER:
            continue
        if calls := _loads_models(ast.parse(path.read_text())):
            offenders[str(path.relative_to(PACKAGE))] = calls
    assert not offenders, f"load models through fts_mcp.models.loading: {offenders}"
    assert _loads_models(ast.parse(LOADER.read_text()))  # the check sees the loader's own calls


def test_ray_is_imported_only_when_jobs_run_on_a_cluster_and_the_cluster_side_never_reaches_the_store():
    """FTS_RUNNER=local (the default) never imports Ray; the Ray job's entrypoint, which runs on the cluster with
    no access to the server's FTS_HOME, never imports the store, the runner or SQLite."""
    server = ("import sys, fts_mcp.server, fts_mcp.core, fts_mcp.jobs.runner, fts_mcp.jobs.worker; "
              "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", server], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    entry = ("import sys, fts_mcp.jobs.ray.entry, fts_mcp.jobs.ray.node; print(sorted(m for m in "
             "('fts_mcp.jobs.store', 'fts_mcp.jobs.runner', 'fts_mcp.jobs.service', 'fts_mcp.core', 'sqlite3', 'mcp') "
             "if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


# ---- layering: data flows one way ----------------------------------------------------------------------------
# Each module's layer, by its longest matching prefix (names relative to fts_mcp). A module may import its own
# layer and those below it, never one above.
LAYERS = {
    0: ["", "errors", "files", "names", "tokens", "paths", "config", "network", "plots", "arguments", "stdio",
        "ui"],
    1: ["models"],  # one loader, architectures, prompt encoding, dtypes, GGUF bases
    2: ["datafiles", "planning", "jobs.states", "jobs.records", "jobs.context", "jobs.watch", "training.spec",
        "training.checkpoints", "training.varlen", "adapters.spec", "edge.spec"],  # pure: specs, records, math
    3: ["training", "adapters", "edge"],  # recipes, the adapter store, the edge runtime (torch lives here)
    4: ["jobs"],  # the job store, runners (local, ranks, Ray), outcomes, the kinds table
    5: ["training.service", "adapters.service", "adapters.resolve", "edge.service", "planning.service"],
    6: ["core"],
    7: ["server", "cli", "answers", "demo", "real_demo", "docs", "__main__"],
}
# Imports that run against the layers on purpose, each with its reason.
AGAINST_LAYERS: dict[tuple[str, str], str] = {}


def _layer(module: str) -> int:
    best, rank = -1, None
    for level, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
                best, rank = len(prefix), level
    assert rank is not None, module
    return rank


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """fts_mcp module -> the fts_mcp modules it imports (at the top or lazily), names relative to fts_mcp."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for target in targets:
                if target == "fts_mcp" or target.startswith("fts_mcp."):
                    rel = target[len("fts_mcp."):] if target != "fts_mcp" else ""
                    while rel not in paths and "." in rel:
                        rel = rel.rsplit(".", 1)[0]
                    if rel in paths and rel != name:
                        deps.add(rel)
        graph[name] = deps
    return graph


def test_every_module_has_a_layer():
    for module in import_graph():
        _layer(module)


def test_imports_never_run_against_the_layers():
    against = {(m, d) for m, deps in import_graph().items() for d in deps if _layer(d) > _layer(m)}
    assert against <= set(AGAINST_LAYERS), sorted(against - set(AGAINST_LAYERS))
    assert len(AGAINST_LAYERS) <= 2


def test_adapters_never_import_the_edge_and_models_import_nothing_above_them():
    graph = import_graph()
    assert not {(m, d) for m, deps in graph.items() if m.startswith("adapters") for d in deps
                if d.startswith("edge")}
    assert not {(m, d) for m, deps in graph.items() if m.startswith("models") for d in deps if _layer(d) > 1}


def test_no_import_cycle():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles


def test_the_layering_check_sees_an_upward_import():
    """The check is not vacuous: the server importing planning is downward, planning importing the server is not."""
    assert _layer("planning.memory") < _layer("server")
    assert "planning.service" in import_graph()["server"]
