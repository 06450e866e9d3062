"""The layout's promises: data flows one way, models load through one function, the package ships whole."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fts_mcp.jobs.kinds import KINDS

PACKAGE = Path(__file__).resolve().parents[1] / "fts_mcp"
LOADER = PACKAGE / "models" / "loading.py"
RECIPES = sorted({kind.recipe for kind in KINDS.values()})


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_never_reach_the_job_store(recipe):
    """A recipe is run(spec, ctx): importing one must not bring in the store, the runner or SQLite."""
    code = (f"import sys, {recipe} as r; assert callable(r.run); "
            "print(sorted(m for m in ('fts_mcp.jobs.store', 'fts_mcp.jobs.runner', 'fts_mcp.jobs.worker', "
            "'fts_mcp.jobs.service', 'fts_mcp.core', 'sqlite3', 'mcp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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
    entry = ("import sys, fts_mcp.jobs.ray_entry; print(sorted(m for m in ('fts_mcp.jobs.store', "
             "'fts_mcp.jobs.runner', 'fts_mcp.jobs.service', 'fts_mcp.core', 'sqlite3', 'mcp') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
