"""The one definition of Hotpot's wire contract that the API and the remote fallback share."""

from __future__ import annotations

import json

from common import hotpot


def test_form_names_every_field_as_hotpot_does() -> None:
    sent = hotpot.form(
        prompt="a fox",
        guidance_scale=7.5,
        negative_prompt="",
        seed=42,
        steps=None,
        output_format="png",
        init_image="aGk=",
    )
    assert sent == {
        "inputText": "a fox",
        "guidanceScale": "7.5",
        "seed": "42",
        "outputFormat": "png",
        "seedImage": "aGk=",
    }


def test_form_and_fields_are_inverse() -> None:
    ours = {name: f"v-{name}" for name in hotpot.FIELDS.values()}
    theirs = hotpot.form(**ours)
    assert {hotpot.FIELDS[name]: value for name, value in theirs.items()} == ours


def test_the_art_fields_are_a_subset_without_steps_or_model() -> None:
    assert hotpot.ART_FIELDS.items() <= hotpot.FIELDS.items()
    assert "steps" not in hotpot.ART_FIELDS and "model" not in hotpot.ART_FIELDS


def test_error_body_and_its_message() -> None:
    body = hotpot.error_body(402, "not enough credits", credits_left=0)
    assert body == {"code": 402, "message": "not enough credits", "credits_left": 0}
    assert hotpot.error_message(json.dumps(body).encode()) == "not enough credits"


def test_error_message_of_a_body_that_is_not_ours() -> None:
    assert hotpot.error_message(b"<html>502 Bad Gateway</html>") == "<html>502 Bad Gateway</html>"
    assert hotpot.error_message(b'["a list"]') == '["a list"]'
    assert hotpot.error_message(b"x" * 1000) == "x" * 200
    assert hotpot.error_message(b"\xff\xfe") == "\ufffd\ufffd"
