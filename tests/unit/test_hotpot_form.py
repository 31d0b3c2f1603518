import pytest

from common.errors import InvalidRequest
from producer.api.hotpot import to_request


def test_hotpot_fields_map_onto_a_job_request() -> None:
    request = to_request(
        "budget",
        {
            "inputText": "An astronaut riding a horse on Mars",
            "guidanceScale": "10",
            "negativePrompt": "blurry",
            "seed": "42",
            "width": "512",
            "height": "768",
            "steps": "12",
            "outputFormat": "JPG",
        },
    )
    assert request.prompt == "An astronaut riding a horse on Mars"
    assert request.tier == "budget"
    assert request.guidance_scale == 10.0
    assert (request.seed, request.width, request.height, request.steps) == (42, 512, 768, 12)
    assert request.output_format == "jpeg"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "inputText: is required"),
        ({"inputText": "  "}, "inputText: is required"),
        (
            {"inputText": "x", "guidanceScale": "loud"},
            "guidanceScale: Input should be a valid number, unable to parse string as a number",
        ),
        ({"inputText": "x", "width": "100"}, "width: must be a multiple of 8"),
        ({"inputText": "x", "outputFormat": "gif"}, "outputFormat: must be one of jpeg, png, webp"),
    ],
)
def test_errors_use_hotpot_names(fields: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        to_request("normal", fields)
    assert info.value.message == message
