"""An agent's whole request, scripted: "route requests to a fixed format; is fine-tuning right; does it fit; train,
check it beat the base, merge, publish as prod, serve it, then combine it with a second adapter".

The script talks to the server over stdio and, like an agent with no README, takes each call's arguments from the
previous answers (`next`, list_models, the estimate), never from knowledge of the code. It holds the server to
what an agent needs: the whole job in at most 20 calls besides polling, no call that waits long without saying
why, and every queued answer naming what it waits behind.
"""

import time

import pytest
from mcp import Client

from tests.conftest import SAMPLE_CHAT, SAMPLE_COMPLETION, server_params

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CALL_BUDGET = 20  # tool calls besides job_status polling
PATIENCE = 60.0  # seconds an agent waits on one call
TRAINING = {"max_steps": 60, "learning_rate": 0.01, "lr_scheduler": "constant", "warmup_ratio": 0,
            "micro_batch_size": 16, "gradient_accumulation_steps": 1, "max_seq_len": 256}
TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


class Agent:
    """Counts calls, times each, and keeps every answer a queued job gave while it was polled."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.calls: list[tuple[str, float]] = []
        self.queued: list[dict] = []

    async def call(self, tool: str, **arguments) -> dict:
        started = time.monotonic()
        result = await self.client.call_tool(tool, arguments)
        self.calls.append((tool, time.monotonic() - started))
        assert not result.is_error, f"{tool}: {result.content[0].text}"
        return result.structured_content

    async def follow(self, job: dict, what: str, timeout: float = 300) -> dict:
        """Poll job_status until the job ends (polling is not counted against the budget)."""
        deadline = time.monotonic() + timeout
        while job["state"] not in TERMINAL:
            if job["state"] == "queued":
                self.queued.append(job)
            assert time.monotonic() < deadline, f"{what} did not end: {job['state']} {job['progress']}"
            result = await self.client.call_tool("job_status", {"job_id": job["job_id"], "wait_seconds": 5})
            assert not result.is_error, result.content[0].text
            job = result.structured_content
        assert job["state"] == "succeeded", f"{what}: {job['state']} {job['error']}"
        return job

    @staticmethod
    def step(answer: dict, tool: str, **overrides) -> dict:
        """The arguments the answer's `next` proposes for `tool`, with the agent's own choices on top."""
        proposed = [s for s in answer["next"] if s["tool"] == tool]
        assert proposed, f"the answer proposes no {tool}: {answer['next']}"
        return {**proposed[0]["arguments"], **overrides}


@pytest.mark.extended
@pytest.mark.timeout(900)
async def test_an_agent_goes_from_question_to_served_stack_in_twenty_calls(fts_home):
    async with Client(server_params(fts_home)) as client:
        agent = Agent(client)

        advice = await agent.call("recommend_ft_vs_rag", output_format=True, knowledge_changes="never",
                                  labelled_examples=300, budget="tight")
        assert advice["recommendation"] == "fine_tune", advice["summary"]  # a tight budget is no vote for RAG

        models = (await agent.call("list_models"))["models"]
        model = next(m for m in models if m["source"] == "demo")

        plan = await agent.call("estimate_resources", base_model=model["base_model"], dataset_examples=16,
                                tokens_per_example=40, epochs=1)
        assert "this host" in plan["notes"][0] and plan["recommended_method"] in ("lora", "qlora")
        quantization = {"lora": "none", "qlora": "nf4"}[plan["recommended_method"]]

        report = await agent.call("validate_dataset", path=str(SAMPLE_CHAT), base_model=model["base_model"],
                                  max_seq_len=256)
        assert report["ok"]
        train = agent.step(report, "start_qlora_job")
        job = await agent.follow(await agent.call("start_qlora_job", **train, output_name="codewords",
                                                  quantization=quantization, training=TRAINING), "training")

        # a memorisation task: its own data is the held-out set
        evaluation = await agent.follow(await agent.call("evaluate_adapter", **agent.step(
            job, "evaluate_adapter", dataset=str(SAMPLE_CHAT), max_examples=16)), "evaluation")
        assert evaluation["artifacts"]["evaluation"]["better"], evaluation["artifacts"]["evaluation"]
        await agent.follow(await agent.call("merge_adapter", **agent.step(evaluation, "merge_adapter",
                                                                          dtype="float32")), "merge")

        deployed = await agent.call("deploy_adapter", **agent.step(evaluation, "deploy_adapter", alias="prod",
                                                                   runtime_url="local"))
        assert deployed["model"].endswith(":prod") and deployed["loaded"] and deployed["chat"]
        assert "/v1/chat/completions" in deployed["curl"]
        assert any(s["tool"] == "cancel_job" for s in deployed["next"])  # how to stop the managed runtime
        served = await agent.call("generate", **agent.step(deployed, "generate", max_tokens=8))
        assert served["via"] == "runtime"

        # the runtime keeps serving; a one-shot try with what training returned does not wait behind it
        one_shot = await agent.call("generate", model=job["job_id"], messages=[
            {"role": "system", "content": "You answer with the code word."},
            {"role": "user", "content": "Code word for apple?"}], max_tokens=8)
        assert one_shot["via"] == "job"

        second = await agent.follow(await agent.call(
            "start_qlora_job", base_model=train["base_model"], dataset=str(SAMPLE_COMPLETION), output_name="plain",
            quantization=quantization, training=TRAINING), "the second training")
        also = await agent.call("deploy_adapter", adapter=second["job_id"], name="plain", runtime_url="local")
        assert also["runtime_job"] == deployed["runtime_job"]  # one managed runtime per base
        stacked = await agent.call("generate", model=f"{deployed['model']}+{also['model']}", prompt="apple",
                                   max_tokens=8, runtime_url="local")
        assert stacked["via"] == "runtime"

        await agent.call("cancel_job", **agent.step(deployed, "cancel_job"))

    assert len(agent.calls) <= CALL_BUDGET, agent.calls
    slow = [(tool, round(seconds)) for tool, seconds in agent.calls if seconds > PATIENCE]
    assert not slow, f"calls that kept the agent waiting past {PATIENCE:g} s: {slow}"
    assert all(job["progress"].get("waiting") for job in agent.queued), agent.queued  # says behind what


async def test_a_queued_job_says_at_once_what_it_waits_behind(fts_home, tiny_model):
    """A training job queued behind another names it (and how to free the slot) in its very first answer."""
    async with Client(server_params(fts_home)) as client:
        agent = Agent(client)
        long = {**TRAINING, "max_steps": 5000}
        first = await agent.call("start_qlora_job", base_model=str(tiny_model), dataset=str(SAMPLE_CHAT),
                                 quantization="none", training=long)
        second = await agent.call("start_qlora_job", base_model=str(tiny_model), dataset=str(SAMPLE_CHAT),
                                  quantization="none", training=long)
        try:
            assert second["state"] == "queued"
            assert first["job_id"] in second["progress"]["waiting"]
            assert "cancel_job" in second["progress"]["waiting"]
        finally:
            for job in (second, first):
                await agent.call("cancel_job", job_id=job["job_id"])
