import pytest

from fts_mcp.errors import IllegalTransition, InvalidArgument
from fts_mcp.jobs.states import TERMINAL, TRANSITIONS, JobState, check_job_id, check_transition, resumable

LEGAL = [
    ("validating", "queued"), ("validating", "failed"), ("validating", "cancelled"),
    ("queued", "running"), ("queued", "cancelled"), ("queued", "failed"),
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"), ("running", "interrupted"),
    ("interrupted", "queued"), ("cancelled", "queued"),
]


def test_table_is_exactly_the_documented_machine():
    table = {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == set(LEGAL)


@pytest.mark.parametrize("current", list(JobState))
@pytest.mark.parametrize("target", list(JobState))
def test_every_pair_is_allowed_or_raises(current, target):
    if (current.value, target.value) in LEGAL:
        check_transition("job-000000000000", current, target)
    else:
        with pytest.raises(IllegalTransition, match=f"cannot become {target.value}"):
            check_transition("job-000000000000", current, target)


def test_terminal_states_only_resume_from_interrupted_or_cancelled():
    assert TERMINAL == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
    assert all(not TRANSITIONS[s] for s in TERMINAL if s not in (JobState.INTERRUPTED, JobState.CANCELLED))


@pytest.mark.parametrize("state, has_checkpoint, expected", [
    ("interrupted", True, True), ("interrupted", False, True),  # merge/generate jobs simply run again
    ("cancelled", True, True), ("cancelled", False, False),
    ("succeeded", True, False), ("failed", True, False), ("running", True, False),
])
def test_one_rule_for_resuming(state, has_checkpoint, expected):
    assert resumable(JobState(state), has_checkpoint) is expected
    # every resumable state can actually be queued again
    assert not expected or JobState.QUEUED in TRANSITIONS[JobState(state)]


@pytest.mark.parametrize("bad", ["", "job-", "job-XYZ", "job-0123456789abc", "../job-0123456789ab", "JOB-0123456789ab",
                                 "job-0123456789ab\n"])
def test_job_ids_are_validated(bad):
    with pytest.raises(InvalidArgument, match="not a job id"):
        check_job_id(bad)
    assert check_job_id("job-0123456789ab") == "job-0123456789ab"
