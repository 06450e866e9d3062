import pytest

from fts_mcp.errors import IllegalTransition, InvalidArgument
from fts_mcp.jobs.states import TERMINAL, TRANSITIONS, JobState, check_job_id, check_transition

LEGAL = [
    ("validating", "queued"), ("validating", "failed"), ("validating", "cancelled"),
    ("queued", "running"), ("queued", "cancelled"), ("queued", "failed"),
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"), ("running", "interrupted"),
    ("interrupted", "queued"),
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


def test_terminal_states_only_resume_from_interrupted():
    assert TERMINAL == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
    assert all(not TRANSITIONS[s] for s in TERMINAL if s != JobState.INTERRUPTED)


@pytest.mark.parametrize("bad", ["", "job-", "job-XYZ", "job-0123456789abc", "../job-0123456789ab", "JOB-0123456789ab"])
def test_job_ids_are_validated(bad):
    with pytest.raises(InvalidArgument, match="not a job id"):
        check_job_id(bad)
    assert check_job_id("job-0123456789ab") == "job-0123456789ab"
