"""merge_adapter: verified merges into a 16-bit base, combinations, idempotence, and refusals before work."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fts_mcp.adapters.inspect import LORA_KEY
from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.errors import InvalidArgument
from fts_mcp.training.spec import LoraSpec, TrainingSpec
from tests.conftest import FAST_TRAINING, SAMPLE_COMPLETION, make_adapter, wait_for
from tools.build_tiny_model import build

PROBE = torch.tensor([[5, 40, 77, 101, 3, 9, 200, 15]])


@pytest.fixture
def service(fts_home):
    s = Core(Settings.from_env())
    yield s
    s.close()


def finish(service, job, timeout=120):
    return wait_for(lambda: (j := service.jobs.get(job.job_id)).state.terminal and j, timeout, interval=0.3,
                    what=f"{job.kind} job {job.job_id}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 0.5)])
def test_merged_model_gives_the_unmerged_logits(service, tiny_model, adapter_a, dtype, tol):
    job = service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype=dtype)
    done = finish(service, job)
    assert done.state == "succeeded", (done.error, done.log_tail)
    v = done.artifacts.verification
    assert v.passed and v.max_abs_logit_diff <= v.tolerance and v.dtype == dtype
    out = Path(done.artifacts.output_dir)
    assert {"config.json", "model.safetensors", "README.md", "merge.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "## Verification" in card and f"{v.max_abs_logit_diff:.3g}" in card

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not [n for n, _ in merged.named_modules() if "lora" in n.lower()]  # no LoRA layers remain
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                          adapter_a).eval()
    with torch.no_grad():
        diff = (merged(PROBE).logits - reference(PROBE).logits).abs().max().item()
        base_diff = (AutoModelForCausalLM.from_pretrained(tiny_model)(PROBE).logits - reference(PROBE).logits)
    assert diff <= tol, diff
    assert base_diff.abs().max().item() > 2.0  # the adapter changes the model a lot; the merge kept that change

    again = service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype=dtype)
    assert again.job_id == job.job_id and service.jobs.list().total == 1  # the second identical call is a no-op


def deltas(folder: Path) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> scaling * B @ A of a saved adapter."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        match = LORA_KEY.search(key)
        if match and match.group(3) == "A":
            b = tensors[key.replace("lora_A", "lora_B")]
            out[(int(match.group(1)), match.group(2))] = (config["lora_alpha"] / config["r"]) * b.float() @ a.float()
    return out


@pytest.mark.slow
def test_cat_combination_equals_the_weighted_sum_of_deltas(service, tiny_model, adapter_a, adapter_b):
    job = service.merging.merge(adapters=[{"adapter": str(adapter_a), "weight": 0.7},
                                          {"adapter": str(adapter_b), "weight": 0.3}],
                                base_model=str(tiny_model), combination="cat", output="adapter", output_name="mix",
                                dtype="float32")
    done = finish(service, job)
    assert done.state == "succeeded", (done.error, done.log_tail)
    combined, a, b = deltas(Path(done.artifacts.output_dir)), deltas(adapter_a), deltas(adapter_b)
    assert set(combined) == set(a) == set(b) and len(combined) == 2 * 7
    for key, delta in combined.items():
        torch.testing.assert_close(delta, 0.7 * a[key] + 0.3 * b[key], atol=1e-6, rtol=1e-5)
    assert json.loads((Path(done.artifacts.output_dir) / "adapter_config.json").read_text())["r"] == 12


@pytest.mark.slow
@pytest.mark.extended  # CI's second step, as the real model's NF4 merge
def test_a_qlora_adapter_merges_into_the_nf4_weights_it_was_trained_on(service, tiny_model):
    """By default the merged model is the model that was trained and evaluated (the NF4 base, dequantized, + the
    adapter): its logits match the 4-bit base + adapter. Merged into the original 16-bit weights instead, the
    difference from the trained model is reported, not hidden."""
    train = service.training.start(str(tiny_model), str(SAMPLE_COMPLETION), quantization="nf4",
                                   lora=LoraSpec(r=8), training=TrainingSpec(**{**FAST_TRAINING, "max_steps": 20}))
    trained = finish(service, train)
    assert trained.state == "succeeded", trained.log_tail
    merge = service.merging.merge(trained.job_id, dtype="float32")  # base: the training job's own
    done = finish(service, merge)
    assert done.state == "succeeded", (done.error, done.log_tail)
    v = done.artifacts.verification
    assert v.passed and "NF4" in v.merged_into
    assert v.trained_base_max_abs_logit_diff <= v.tolerance  # the merged model answers as the trained one
    card = (Path(done.artifacts.output_dir) / "README.md").read_text()
    assert "NF4 base the adapter was trained on" in card and "final loss" in card

    original = finish(service, service.merging.merge(trained.job_id, dtype="float32", base_weights="original",
                                                     output_name="merged-original"))
    assert original.state == "succeeded", (original.error, original.log_tail)
    w = original.artifacts.verification
    assert w.passed and "original" in w.merged_into
    assert w.trained_base_max_abs_logit_diff > 10 * v.trained_base_max_abs_logit_diff  # shown: 16-bit is not NF4


def test_interrupted_merge_leaves_no_output_folder(service, tiny_model, adapter_a, monkeypatch):
    """The result is renamed into place only when complete: a failure while saving leaves nothing."""
    from transformers import PreTrainedModel

    from fts_mcp.adapters.merge import run
    from fts_mcp.adapters.spec import MergeJobSpec
    from fts_mcp.jobs.context import recording_context

    job = service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype="float32", output_name="half")
    service.jobs.cancel(job.job_id)  # keep the worker out of it; run the recipe here
    finish(service, job)
    record = service.jobs.store.get(job.job_id)
    original = PreTrainedModel.save_pretrained

    def save_then_die(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        run(MergeJobSpec(**record.spec), recording_context(service.jobs.store.job_dir(job.job_id), job.job_id)[0])
    out = Path(record.spec["output_dir"])
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_inputs_are_refused_before_any_work(service, fts_home, tiny_model, adapter_a, adapter_b, tmp_path):
    other_base = build(tmp_path / "other", hidden=32, layers=2)
    cases = [
        (dict(adapter=str(adapter_a), base_model=str(other_base)), "adapter", "made for another base"),
        (dict(adapter=str(fts_home)), "adapter", "no adapter_config.json"),
        (dict(adapter="job-000000000000"), "adapter", "no job"),
        (dict(adapter=str(adapter_a), adapters=[{"adapter": str(adapter_b)}]), "adapter", "exactly one"),
        (dict(adapters=[{"adapter": str(adapter_a)}, {"adapter": str(adapter_b)}], combination="linear"),
         "combination", "equal ranks"),
        (dict(adapters=[{"adapter": str(adapter_a)}, {"adapter": str(adapter_b)}], combination="dare_ties"),
         "combination", "equal ranks"),
        (dict(adapters=[{"adapter": str(adapter_a)}, {"adapter": str(adapter_a)}], combination="ties"),
         "density", "density in (0, 1]"),
        (dict(adapters=[{"adapter": str(adapter_a)}, {"adapter": str(adapter_b)}], combination="svd", density=0.5),
         "density", "applies to"),
        (dict(adapter=str(adapter_a), output="adapter"), "output", "already an adapter"),
        (dict(adapter=str(adapter_a), output_name="../up"), "output_name", "letters, digits"),
        (dict(adapter="/etc"), "adapter", "outside the allowed roots"),
    ]
    for kwargs, param, words in cases:
        kwargs.setdefault("base_model", str(tiny_model))
        with pytest.raises(Exception) as info:
            service.merging.merge(**kwargs)
        assert getattr(info.value, "param", None) == param, (kwargs, info.value)
        assert words in str(info.value), (kwargs, str(info.value))
    assert service.jobs.list().total == 0  # nothing was queued


def test_corrupt_files_and_name_collisions(service, fts_home, tiny_model, adapter_a):
    broken = fts_home / "broken"
    shutil.copytree(adapter_a, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InvalidArgument, match="corrupt"):
        service.merging.merge(str(broken), base_model=str(tiny_model))
    (broken / "adapter_config.json").write_text("{")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        service.merging.merge(str(broken), base_model=str(tiny_model))

    taken = fts_home / "models" / "taken"
    taken.mkdir(parents=True)
    (taken / "merge.json").write_text(json.dumps({"job_id": "job-000000000000", "inputs_key": "other"}))
    with pytest.raises(InvalidArgument, match="different inputs") as info:
        service.merging.merge(str(adapter_a), base_model=str(tiny_model), output_name="taken")
    assert info.value.param == "output_name"


def test_adapter_of_another_rank_pattern_still_reads(tiny_model, fts_home):
    """Adapters on a subset of modules are checked only where they exist."""
    from fts_mcp.adapters.inspect import check_fits_base, read_adapter
    from fts_mcp.models.architecture import from_config

    folder = make_adapter(tiny_model, fts_home / "qv", r=2, seed=3, targets=["q_proj", "v_proj"])
    info = read_adapter(folder)
    assert info.r == 2 and info.target_modules == ["q_proj", "v_proj"]
    check_fits_base(info, from_config(json.loads((tiny_model / "config.json").read_text()), source="t"),
                    base=str(tiny_model))


def test_merged_model_carries_the_chat_template_it_was_trained_with(service, tiny_model, adapter_a):
    """The adapter folder holds the tokenizer and chat template training used; the merged model must too, or
    apply_chat_template on it renders something else (or raises, for a base without a template)."""
    from transformers import AutoTokenizer

    from fts_mcp.adapters.merge import run
    from fts_mcp.adapters.spec import MergeJobSpec
    from fts_mcp.jobs.context import recording_context

    trained = AutoTokenizer.from_pretrained(tiny_model)
    trained.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    trained.save_pretrained(adapter_a)  # what the training recipe leaves beside the adapter
    assert (adapter_a / "chat_template.jinja").is_file()
    service.jobs.runner.tick = lambda: None
    job = service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype="float32", output_name="chat")
    out = run(MergeJobSpec(**job.spec), recording_context(service.jobs.store.job_dir(job.job_id), job.job_id)[0])
    merged = AutoTokenizer.from_pretrained(out.output_dir)
    messages = [{"role": "user", "content": "hi"}]
    assert merged.apply_chat_template(messages, tokenize=False) == "[user] hi\n"
    assert merged.apply_chat_template(messages, tokenize=False) == \
        trained.apply_chat_template(messages, tokenize=False)


# ---- a merge killed after (or while) publishing its output: resume reuses it, an identical request runs again -----

class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, not even `except Exception`."""


def merge_spec(service, adapter_a, tiny_model, name="resumed"):
    """A merge job left queued (no worker starts it), and its spec: the test runs the recipe in this process."""
    from fts_mcp.adapters.spec import MergeJobSpec

    service.jobs.runner.tick = lambda: None
    job = service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype="float32", output_name=name)
    return job, MergeJobSpec(**job.spec)


def context(service, job):
    from fts_mcp.jobs.context import recording_context

    return recording_context(service.jobs.store.job_dir(job.job_id), job.job_id)[0]


def assert_complete(artifacts):
    """Every file of the output is listed, with the size and sha256 it has on disk."""
    from fts_mcp.files import artifact_files

    out = Path(artifacts.output_dir)
    assert {"config.json", "model.safetensors", "merge.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert artifacts.files == artifact_files(out)
    assert artifacts.verification is not None and artifacts.verification.passed


def test_a_merge_killed_while_hashing_its_output_resumes(service, tiny_model, adapter_a, monkeypatch):
    from fts_mcp import files
    from fts_mcp.adapters.merge import run

    job, spec = merge_spec(service, adapter_a, tiny_model)
    hash_file = files.sha256_file

    def killed_while_hashing(path):
        raise Killed(str(path))

    monkeypatch.setattr(files, "sha256_file", killed_while_hashing)
    with pytest.raises(Killed):
        run(spec, context(service, job))
    monkeypatch.setattr(files, "sha256_file", hash_file)
    assert_complete(run(spec, context(service, job)))  # resume_job runs the recipe again in the same folder
    out = Path(spec.output_dir)
    assert not list(out.parent.glob(f".{out.name}*"))  # no staging folder left behind


def test_a_published_output_is_reused_not_merged_again(service, tiny_model, adapter_a, monkeypatch):
    """Killed after the output was renamed into place but before the job recorded it: the output is complete
    (merge.json is written last, then one rename publishes the folder), so the resumed job reuses it."""
    from fts_mcp.adapters import merge

    job, spec = merge_spec(service, adapter_a, tiny_model)
    first = merge.run(spec, context(service, job))

    def no_second_merge(spec):
        raise AssertionError("the base was loaded again for an output that is already there")

    monkeypatch.setattr(merge, "load_base", no_second_merge)
    again = merge.run(spec, context(service, job))
    assert again == first
    assert_complete(again)


def test_an_incomplete_output_of_the_same_merge_is_replaced(service, tiny_model, adapter_a):
    from fts_mcp.adapters.merge import run

    job, spec = merge_spec(service, adapter_a, tiny_model)
    out = Path(run(spec, context(service, job)).output_dir)
    (out / "model.safetensors").write_bytes(b"half a model")
    assert_complete(run(spec, context(service, job)))
    assert (out / "model.safetensors").stat().st_size > 1000


@pytest.mark.parametrize("earlier", ["failed", "interrupted", "forgotten"])
def test_an_identical_merge_whose_earlier_job_did_not_succeed_runs_again(service, tiny_model, adapter_a,
                                                                        monkeypatch, earlier):
    """The output is on disk, but the job that wrote it failed (a resume that tripped over it), was interrupted
    or is no longer on record: asking again starts a fresh job, which reuses the output, instead of answering
    with the failed job forever."""
    from fts_mcp.adapters import merge
    from fts_mcp.jobs.records import JobError
    from fts_mcp.jobs.states import JobState

    job, spec = merge_spec(service, adapter_a, tiny_model)
    merge.run(spec, context(service, job))
    store = service.jobs.store
    if earlier == "forgotten":
        manifest = json.loads((Path(spec.output_dir) / "merge.json").read_text())
        (Path(spec.output_dir) / "merge.json").write_text(json.dumps({**manifest, "job_id": "job-0123456789ab"}))
        store.transition(job.job_id, JobState.CANCELLED)
    else:
        store.claim_next(service.settings.slots)
        store.transition(job.job_id, JobState(earlier), error=JobError(code="internal_error", message="x"))
    fresh = service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype="float32",
                                  output_name="resumed")
    assert fresh.job_id != job.job_id and fresh.state == "queued"
    assert service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype="float32",
                                 output_name="resumed").job_id == fresh.job_id  # in flight: the same job
    monkeypatch.setattr(merge, "load_base", lambda spec: pytest.fail("merged again"))
    assert_complete(merge.run(merge.MergeJobSpec(**fresh.spec), context(service, fresh)))


@pytest.mark.parametrize("record", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_an_output_whose_merge_record_is_unreadable_is_refused_naming_it_and_left_alone(service, tiny_model, adapter_a,
                                                                                       record):
    """A folder whose merge.json is not a merge's record (bytes that are not JSON, not an object) is nobody's merge
    to reuse or replace: asking for that output is an argument error naming the folder, and nothing is touched."""
    from fts_mcp.errors import InvalidArgument
    from fts_mcp.jobs.states import JobState

    job, spec = merge_spec(service, adapter_a, tiny_model, name="kept")
    out = Path(spec.output_dir)
    out.mkdir(parents=True)
    (out / "merge.json").write_bytes(record)
    service.jobs.store.transition(job.job_id, JobState.CANCELLED)
    with pytest.raises(InvalidArgument) as refused:
        service.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype="float32", output_name="kept")
    assert refused.value.param == "output_name" and str(out) in refused.value.message
    assert (out / "merge.json").read_bytes() == record
