"""A `.gguf` base: confined like any path, packaged files offered, bad files refused with the reason; the base an
adapter was trained on, recorded and read back."""

import json
from pathlib import Path

import pytest

from fts_mcp.config import Settings
from fts_mcp.errors import InvalidArgument, PathNotAllowed
from fts_mcp.models import gguf
from fts_mcp.models.base import FILE, TrainingBase, read_training_base, write_training_base
from fts_mcp.models.catalog import list_models
from fts_mcp.models.refs import looks_like_path, resolve_model_argument


def settings(home: Path, *roots: Path) -> Settings:
    return Settings.from_env({"FTS_HOME": str(home), "FTS_ROOTS": ":".join(str(r) for r in roots),
                              "FTS_GPUS": "none", "HOME": str(home)})


def test_a_gguf_name_is_a_path_not_a_hub_id():
    assert looks_like_path("model.Q4_K_M.gguf") and looks_like_path("sub/model.gguf")
    assert not looks_like_path("org/model")


def test_a_gguf_outside_the_roots_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "m.gguf"
    outside.parent.mkdir()
    outside.write_bytes(b"GGUF")
    home = tmp_path / "home"
    with pytest.raises(PathNotAllowed) as refused:
        resolve_model_argument(str(outside), settings(home, home))
    assert refused.value.param == "base_model"


def test_a_file_that_is_not_gguf_is_refused_naming_why_and_leaves_nothing_behind(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf file at all" * 100)
    home = tmp_path / "home"
    with pytest.raises(InvalidArgument) as refused:
        resolve_model_argument(str(fake), settings(home, tmp_path))
    assert "broken.gguf" in refused.value.message and "GGUF" in refused.value.message
    cache = gguf.cache_root(home)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []  # no half-converted folder


def test_a_converted_file_is_found_again_without_converting(tmp_path, monkeypatch):
    """The folder is keyed by the file's sha256; a second use reads the record and runs nothing."""
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    home = tmp_path / "home"
    gguf.cache_root(home).mkdir(parents=True)
    digest = gguf._digest(source, gguf.cache_root(home))
    folder = gguf.cache_root(home) / digest[:16]
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / gguf.ORIGIN).write_text(json.dumps({"source": str(source), "sha256": digest}))
    monkeypatch.setattr(gguf.subprocess, "run", lambda *a, **k: pytest.fail("converted twice"))
    assert gguf.import_gguf(source, home) == folder
    assert gguf.converted(source, home) == folder
    source.write_bytes(b"GGUF" + b"\1" * 64)  # other bytes: another model, not the cached one
    assert gguf.converted(source, home) is None


def test_list_models_offers_gguf_files_in_the_roots(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    home = tmp_path / "home"
    rows = {m.base_model: m for m in list_models(settings(home, tmp_path))}
    entry = rows[str(tmp_path / "models" / "tiny.Q4_0.gguf")]
    assert entry.source == "gguf" and "first use" in entry.note


def test_the_training_base_round_trips_and_a_bad_record_is_refused(tmp_path):
    assert read_training_base(tmp_path) is None  # adapters from elsewhere: nothing recorded
    write_training_base(tmp_path, TrainingBase(quantization="nf4", compute_dtype="float32"))
    assert read_training_base(tmp_path) == TrainingBase(quantization="nf4", compute_dtype="float32")
    assert "NF4" in read_training_base(tmp_path).describe()
    (tmp_path / FILE).write_text(json.dumps({"quantization": "int3"}))
    with pytest.raises(InvalidArgument) as refused:
        read_training_base(tmp_path)
    assert FILE in refused.value.message
