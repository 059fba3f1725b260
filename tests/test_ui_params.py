"""The flow parameter models as the Prefect UI sees them: ordered form, plain optional fields, refusals."""

from __future__ import annotations

import json

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import build_error_obj, validate
from pydantic import ValidationError

from flows.course import CourseParams, produce_course
from flows.lecture import LectureParams, produce_lecture

REQUIRED = {"audio": "a.mp3", "image": "p.jpg", "prompt": "A teacher", "out": "out"}


def _schema(flow) -> dict:
    # What the server stores; a JSONB round trip may reorder keys, so nothing may rely on their order.
    stored = json.loads(json.dumps(parameter_schema(flow).model_dump(), sort_keys=True))
    return stored


def _fields(flow, model: str) -> list[tuple[str, dict]]:
    props = _schema(flow)["definitions"][model]["properties"]
    return sorted(props.items(), key=lambda item: item[1]["position"])


@pytest.mark.parametrize(
    ("flow", "model", "cls"),
    [(produce_lecture, "LectureParams", LectureParams), (produce_course, "CourseParams", CourseParams)],
)
def test_positions_restore_declaration_order(flow, model, cls):
    fields = _fields(flow, model)
    assert [name for name, _ in fields] == list(cls.model_fields)
    assert [p["position"] for _, p in fields] == list(range(len(cls.model_fields)))


def test_lecture_form_fields_read_as_labels_and_optional_text_is_plain():
    props = dict(_fields(produce_lecture, "LectureParams"))
    assert [props[n]["title"] for n in ("audio", "image", "out", "segment_seconds")] == [
        "Lecture audio",
        "Portrait",
        "Destination",
        "Segment length (s)",
    ]
    for name in ("title", "work", "checkpoint_dir", "memory_budget_gb"):
        assert "anyOf" not in props[name] and "default" not in props[name], name
    assert props["title"]["type"] == "string" and props["memory_budget_gb"]["type"] == "number"
    for name in ("audio", "image", "out"):
        assert "worker" in props[name]["description"]
    assert props["size"]["default"] == "auto" and "pattern" in props["size"]
    assert props["dispatch"]["enum"] == ["in-process", "gpu-workers"]


def _server_check(values: dict) -> dict:
    """The check the Prefect server runs at submission (deployments enforce their parameter schema)."""
    schema = _schema(produce_lecture)
    return build_error_obj(validate({"params": values}, schema))


def test_server_accepts_a_form_with_optional_fields_empty_or_null():
    assert _server_check(dict(REQUIRED))["valid"]
    assert _server_check({**REQUIRED, "title": None, "memory_budget_gb": None})["valid"]


@pytest.mark.parametrize("size", ["704 by 384", "big", "704x384px", "7040x384000"])
def test_server_refuses_a_malformed_size_on_the_size_field(size):
    result = _server_check({**REQUIRED, "size": size})
    assert not result["valid"]
    params = next(e for e in result["errors"] if e["property"] == "params")
    assert [e["property"] for e in params["errors"]] == ["size"]


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("700x384", "700x384 has width 700, not a multiple of 16 (try 704x384"),
        ("704x390", "704x390 has height 390, not a multiple of 16 (try 704x384"),
        ("32x64", "32x64 has width 32, outside 64-2048 pixels"),
        ("huge", "'huge' is not a size: write auto, or WIDTHxHEIGHT"),
    ],
)
def test_model_refuses_bad_sizes_naming_the_field(size, message):
    with pytest.raises(ValidationError) as caught:
        LectureParams(**REQUIRED, size=size)
    error = caught.value.errors()[0]
    assert error["loc"] == ("size",) and message in error["msg"] and "--" not in error["msg"]


def test_model_refuses_a_maximum_below_the_target():
    with pytest.raises(ValidationError) as caught:
        LectureParams(**REQUIRED, segment_seconds=30, max_segment_seconds=20)
    error = caught.value.errors()[0]
    assert error["loc"] == ("max_segment_seconds",)
    assert "20 s is shorter than the segment length (30 s)" in error["msg"] and "--" not in error["msg"]


def test_empty_optional_text_means_unset_and_sizes_normalise():
    params = LectureParams(**REQUIRED, title="  ", work="", size=" 1280X720 ")
    assert params.title is None and params.work is None and params.size == "1280x720"
    assert LectureParams(**REQUIRED).size == "auto"
    assert CourseParams(course="c.yaml", size="").size is None
    with pytest.raises(ValidationError, match="height 721, not a multiple of 16"):
        CourseParams(course="c.yaml", size="1280x721")


def test_a_run_with_rules_the_schema_cannot_state_fails_at_start_naming_the_field():
    from prefect.exceptions import ParameterTypeError

    bad = {**REQUIRED, "size": "700x384", "segment_seconds": 30, "max_segment_seconds": 20}
    with pytest.raises(ParameterTypeError) as caught:
        produce_lecture.validate_parameters({"params": bad})  # what a flow run does before any work
    text = str(caught.value)
    assert "params.size: Value error, 700x384 has width 700, not a multiple of 16" in text
    assert "params.max_segment_seconds: Value error, 20 s is shorter than the segment length (30 s)" in text


def test_server_accepts_what_the_cli_sends_for_a_course():
    """`liveavatar-batch course --deployment` sends the whole model, unset fields as null."""
    sent = CourseParams(course="s3://b/course.yaml").model_dump(mode="json")
    assert sent["size"] is None and sent["work"] is None
    schema = _schema(produce_course)
    assert build_error_obj(validate({"params": sent}, schema))["valid"]
    bad = build_error_obj(validate({"params": {**sent, "size": "wide"}}, schema))
    assert not bad["valid"] and bad["errors"][0]["errors"][0]["property"] == "size"
