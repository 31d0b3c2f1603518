import pytest
from pydantic import ValidationError

from common.errors import InvalidRequest
from common.job import TERMINAL_EVENTS, JobRequest, JobStatus
from common.tiers import load_tiers


def test_defaults_follow_hotpot() -> None:
    request = JobRequest(prompt="a cat")
    assert request.tier == "normal"
    assert request.output_format == "jpeg"
    assert request.num_images == 1
    assert request.steps is None and request.width is None and request.seed is None


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"prompt": ""}, "at least 1 character"),
        ({"prompt": "   "}, "at least 1 character"),
        ({"prompt": "x", "width": 100}, "multiple of 8"),
        ({"prompt": "x", "height": 32}, "greater than or equal to 64"),
        ({"prompt": "x", "seed": 2**32}, "less than or equal to 4294967295"),
        ({"prompt": "x", "guidance_scale": -1}, "greater than or equal to 0"),
        ({"prompt": "x", "output_format": "gif"}, "'jpeg', 'png' or 'webp'"),
        ({"prompt": "x", "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(fields)
    assert fragment in str(info.value)


def test_tier_limits_name_the_tier_and_the_limit() -> None:
    budget = load_tiers().get("budget")
    with pytest.raises(InvalidRequest, match="steps must be at most 30 on tier budget"):
        budget.check_limits(steps=31, width=None, height=None, images=1)
    with pytest.raises(InvalidRequest, match="width must be at most 1024 on tier budget"):
        budget.check_limits(steps=10, width=2048, height=512, images=1)
    with pytest.raises(InvalidRequest, match="num_images must be at most 2"):
        budget.check_limits(steps=10, width=None, height=None, images=3)
    budget.check_limits(steps=30, width=1024, height=1024, images=2)


def test_terminal_states() -> None:
    assert {s for s in JobStatus if s.terminal} == {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELED,
    }


def test_terminal_events_are_the_terminal_statuses_events() -> None:
    assert sorted(TERMINAL_EVENTS) == ["job.canceled", "job.failed", "job.succeeded"]
