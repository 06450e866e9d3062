"""FTS_TRUST_REMOTE_CODE behaves the same for every recipe, the token counter and the edge runtime: a model that
ships its own code is refused (naming the setting) without it, and trains, merges, generates and serves with it.

The recipes run in this process through `run(spec, ctx)` on the spec the core would hand a worker, so the
test covers both halves: the core records the setting in every job's spec, every recipe honours it.
"""

import json
import shutil
from pathlib import Path

import pytest

from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.errors import InvalidArgument
from fts_mcp.jobs.context import recording_context
from fts_mcp.jobs.kinds import KINDS, recipe
from fts_mcp.training.spec import TrainingSpec
from tests.conftest import FAST_TRAINING, SAMPLE_COMPLETION, make_adapter

pytestmark = pytest.mark.slow

CONFIG_CODE = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"
"""
MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


@pytest.fixture(scope="module")
def remote_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model, repackaged as a model whose architecture lives in code shipped beside its weights."""
    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    shutil.copytree(tiny_model, folder)
    (folder / "configuration_tiny_remote.py").write_text(CONFIG_CODE)
    (folder / "modeling_tiny_remote.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny-remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def core_for(monkeypatch, fts_home, remote_model, trust: bool) -> Core:
    roots = f"{fts_home}:{remote_model.parent}:{SAMPLE_COMPLETION.parent}"
    monkeypatch.setenv("FTS_ROOTS", roots)
    if trust:
        monkeypatch.setenv("FTS_TRUST_REMOTE_CODE", "1")
    else:
        monkeypatch.delenv("FTS_TRUST_REMOTE_CODE", raising=False)
    core = Core(Settings.from_env())
    core.jobs.runner.tick = lambda: None  # the recipes run here, not in workers
    return core


def submit_each_kind(core: Core, remote_model: Path, adapter: Path):
    train = core.training.start(str(remote_model), str(SAMPLE_COMPLETION), quantization="none",
                                training=TrainingSpec(**{**FAST_TRAINING, "max_steps": 2}))
    merge = core.merging.merge(str(adapter), base_model=str(remote_model), dtype="float32")
    generate = core.edge._generate_spec("base", "Code word for apple:", None, 4, 0.0, str(remote_model))
    return [(job.kind, KINDS[job.kind].spec.model_validate(job.spec)) for job in (train, merge)] + \
        [("generate", generate)]


def run_recipe(kind, spec, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    return recipe(kind)(spec, recording_context(folder)[0])


def test_remote_code_is_refused_everywhere_without_the_setting(monkeypatch, fts_home, tiny_model, remote_model):
    adapter = make_adapter(tiny_model, fts_home / "adapter", r=4, seed=3)
    core = core_for(monkeypatch, fts_home, remote_model, trust=False)
    for kind, spec in submit_each_kind(core, remote_model, adapter):
        assert spec.trust_remote_code is False
        with pytest.raises(InvalidArgument, match="FTS_TRUST_REMOTE_CODE") as info:
            run_recipe(kind, spec, fts_home / "work" / kind)
        assert info.value.param == "base_model", kind
    from fts_mcp.adapters.sources import StoreSource
    from fts_mcp.edge.engine import Engine

    with pytest.raises(InvalidArgument, match="FTS_TRUST_REMOTE_CODE"):
        Engine(str(remote_model), StoreSource(core.settings.store, core.settings.edge_cache))
    core.close()


def test_remote_code_trains_merges_generates_and_serves_with_the_setting(monkeypatch, fts_home, tiny_model,
                                                                         remote_model):
    adapter = make_adapter(tiny_model, fts_home / "adapter", r=4, seed=3)
    core = core_for(monkeypatch, fts_home, remote_model, trust=True)
    results = {}
    for kind, spec in submit_each_kind(core, remote_model, adapter):
        assert spec.trust_remote_code is True
        results[kind] = run_recipe(kind, spec, fts_home / "work" / kind)
    assert (Path(results["train"].adapter_dir) / "adapter_model.safetensors").is_file()
    assert results["merge"].verification.passed
    assert results["generate"].finish_reason in ("stop", "length")
    from fts_mcp.adapters.sources import StoreSource
    from fts_mcp.edge.engine import Engine

    engine = Engine(str(remote_model), StoreSource(core.settings.store, core.settings.edge_cache), max_rank=8,
                    trust_remote_code=core.settings.trust_remote_code)
    assert type(engine.model).__name__ == "TinyRemoteForCausalLM"
    stats = core.training.validate_dataset(str(SAMPLE_COMPLETION), base_model=str(remote_model)).token_stats
    assert stats is not None and stats.total_tokens > 0
    core.close()
