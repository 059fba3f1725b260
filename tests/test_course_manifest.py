"""Course manifest: defaults applied, paths resolved, and every mistake named with its field and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from liveavatar_core.course import PROFILES, CourseError, LectureSpec, load_course, parse_course
from liveavatar_core.errors import InputError

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
id: cs101
title: Intro
output_prefix: s3://videos/cs101/
defaults:
  portrait: portraits/lee.jpg
  prompt: A lecturer speaks.
  engine: preview
  profile: standard
  seed: 3
lectures:
  - id: 01-welcome
    audio: audio/01.mp3
  - id: 02-regression
    title: Regression
    audio: s3://raw/cs101/02.mp3
    portrait: /srv/portraits/kim.png
    prompt: Another lecturer speaks.
    engine: liveavatar
    profile: draft
    seed: 9
"""


def write(tmp_path: Path, text: str, name: str = "course.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(text: str, source: str = "course.yaml") -> CourseError:
    with pytest.raises(CourseError) as info:
        parse_course(textwrap.dedent(text), source=source)
    return info.value


def test_defaults_apply_and_lectures_override_them(tmp_path: Path) -> None:
    course = load_course(write(tmp_path, GOOD))
    first, second = course.lectures_resolved()
    assert first == LectureSpec(
        course_id="cs101",
        lecture_id="01-welcome",
        title=None,
        audio=str(tmp_path / "audio/01.mp3"),
        portrait=str(tmp_path / "portraits/lee.jpg"),
        prompt="A lecturer speaks.",
        engine="preview",
        profile="standard",
        size=PROFILES["standard"].size,
        precision="bf16",
        segment_seconds=PROFILES["standard"].segment_seconds,
        max_segment_seconds=PROFILES["standard"].max_segment_seconds,
        seed=3,
        out="s3://videos/cs101/01-welcome",
    )
    assert (second.audio, second.portrait, second.prompt) == (
        "s3://raw/cs101/02.mp3",
        "/srv/portraits/kim.png",
        "Another lecturer speaks.",
    )
    assert (second.engine, second.profile, second.size, second.seed) == ("liveavatar", "draft", "384x256", 9)
    assert second.out == "s3://videos/cs101/02-regression"
    assert second.job_fields()["precision"] == "bf16"
    assert course.summary_url == "s3://videos/cs101/summary.json"


def test_seed_zero_overrides_a_nonzero_default() -> None:
    course = parse_course(GOOD.replace("seed: 9", "seed: 0"), source="/c/course.yaml")
    assert course.lectures_resolved()[1].seed == 0


def test_the_example_course_is_valid() -> None:
    course = load_course(REPO / "examples/course.yaml")
    lectures = course.lectures_resolved()
    assert len(lectures) == 3
    assert all(lec.audio == str(REPO / "examples/lecture.mp3") for lec in lectures)
    assert course.output_prefix == str(REPO / "out/demo-course")
    assert {lec.profile for lec in lectures} <= set(PROFILES)


def test_relative_paths_of_a_manifest_read_from_s3_resolve_against_its_prefix() -> None:
    text = GOOD.replace("s3://videos/cs101/", "../published")
    course = parse_course(text, source="s3://bucket/courses/cs101/course.yaml")
    first = course.lectures_resolved()[0]
    assert first.audio == "s3://bucket/courses/cs101/audio/01.mp3"
    assert first.portrait == "s3://bucket/courses/cs101/portraits/lee.jpg"
    assert first.out == "s3://bucket/courses/published/01-welcome"


def test_a_relative_path_may_not_climb_out_of_the_bucket() -> None:
    error = error_of(GOOD.replace("audio/01.mp3", "../../../x.mp3"), source="s3://bucket/courses/c.yaml")
    assert (error.line, error.field) == (12, "lectures[0].audio")
    assert "climbs above s3://bucket" in str(error)


@pytest.mark.parametrize(
    ("change", "line", "field", "says"),
    [
        (
            ("  seed: 3\n", "  seed: 3\n  profil: draft\n"),
            10,
            "defaults.profil",
            "unknown field; expected one of",
        ),
        (("title: Intro\n", "title: Intro\nowner: me\n"), 3, "owner", "unknown field"),
        (("    seed: 9\n", "    seed: 9\n    speed: 2\n"), 21, "lectures[1].speed", "unknown field"),
        (("id: 01-welcome", "id: 01-Welcome"), 11, "lectures[0].id", "is not an id"),
        (("id: 01-welcome", "id: ../etc"), 11, "lectures[0].id", "is not an id"),
        (("id: 01-welcome", "id: summary.json"), 11, "lectures[0].id", "is not an id"),
        (("id: 01-welcome", "id: 01"), 11, "lectures[0].id", "put it in quotes"),
        (("id: cs101", "id: cs 101"), 1, "id", "is not an id"),
        (
            ("profile: draft", "profile: hd"),
            19,
            "lectures[1].profile",
            "'draft', 'standard', 'fast' or 'spot'",
        ),
        (
            ("engine: liveavatar", "engine: gpu"),
            18,
            "lectures[1].engine",
            "'auto', 'preview' or 'liveavatar'",
        ),
        (("  seed: 3", "  seed: '3'"), 9, "defaults.seed", "valid integer"),
        (("    seed: 9", "    seed: -1"), 20, "lectures[1].seed", "greater than or equal to 0"),
        (("    audio: audio/01.mp3\n", ""), 11, "lectures[0].audio", "required field is missing"),
        (("output_prefix: s3://videos/cs101/\n", ""), 1, "output_prefix", "required field is missing"),
        (("02-regression", "01-welcome"), 13, "lectures[1].id", "duplicate lecture id '01-welcome'"),
    ],
)
def test_mistakes_name_the_field_and_its_line(
    change: tuple[str, str], line: int, field: str, says: str
) -> None:
    old, new = change
    assert old in GOOD
    error = error_of(GOOD.replace(old, new, 1))
    assert (error.line, error.field) == (line, field), error.problems
    assert says in str(error)
    assert str(error).startswith(f"course.yaml:{line} {field}: ")
    assert "\n" not in str(error)


def test_a_lecture_without_portrait_or_prompt_anywhere_is_named() -> None:
    text = GOOD.replace("  portrait: portraits/lee.jpg\n", "")
    error = error_of(text)
    assert (error.line, error.field) == (10, "lectures[0]")
    assert "no portrait: set defaults.portrait" in str(error)


def test_every_problem_is_kept_and_the_message_counts_the_rest() -> None:
    text = GOOD.replace("engine: liveavatar", "engine: gpu").replace("profile: draft", "profile: hd")
    error = error_of(text)
    assert [(line, field) for line, field, _ in error.problems] == [
        (18, "lectures[1].engine"),
        (19, "lectures[1].profile"),
    ]
    assert str(error).endswith("(and 1 more)")


def test_duplicate_yaml_keys_are_errors_not_silently_the_last_one() -> None:
    text = GOOD.replace("    audio: audio/01.mp3\n", "    audio: audio/01.mp3\n    audio: audio/99.mp3\n")
    error = error_of(text)
    assert (error.line, error.field) == (13, "lectures[0].audio")
    assert "duplicate key (first on line 12)" in str(error)


def test_broken_yaml_names_its_line() -> None:
    error = error_of(GOOD.replace("  - id: 02-regression", "  - id: [02-regression"))
    assert error.line is not None and error.line >= 13
    assert "not valid YAML" in str(error)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "lectures: []\n"])
def test_empty_or_shapeless_manifests_are_rejected(text: str) -> None:
    error = error_of(text)
    assert isinstance(error, InputError)


def test_yaml_anchors_and_merge_keys_work() -> None:
    text = GOOD.replace(
        "  - id: 01-welcome\n    audio: audio/01.mp3\n",
        "  - &first\n    id: 01-welcome\n    audio: audio/01.mp3\n  - <<: *first\n    id: 01b-welcome\n",
    )
    course = parse_course(text, source="/srv/c/course.yaml")
    assert [lec.audio for lec in course.lectures_resolved()][:2] == ["/srv/c/audio/01.mp3"] * 2
    assert [lec.lecture_id for lec in course.lectures_resolved()][:2] == ["01-welcome", "01b-welcome"]
    error = error_of(text.replace("    id: 01b-welcome\n", "    id: 01b-welcome\n    seed: x\n"))
    assert (error.line, error.field) == (16, "lectures[1].seed")


def test_check_local_files_names_the_missing_input(tmp_path: Path) -> None:
    (tmp_path / "portraits").mkdir()
    (tmp_path / "portraits/lee.jpg").write_bytes(b"jpg")
    path = write(tmp_path, GOOD)
    load_course(path)  # not checked: fine
    with pytest.raises(CourseError) as info:
        load_course(path, check_local_files=True)
    # the portrait exists, the first lecture's audio does not; URLs and other hosts' paths are not checked
    assert [(line, field) for line, field, _ in info.value.problems] == [
        (12, "lectures[0].audio"),
        (16, "lectures[1].portrait"),
    ]
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio/01.mp3").write_bytes(b"mp3")
    with pytest.raises(CourseError, match="lectures\\[1\\].portrait: no such file /srv/portraits/kim.png"):
        load_course(path, check_local_files=True)


def test_an_unreadable_manifest_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the course manifest"):
        load_course(tmp_path / "nope.yaml")


def test_the_fast_profile_asks_for_fp8_at_standard_size() -> None:
    course = parse_course(GOOD.replace("profile: draft", "profile: fast"), source="/c/course.yaml")
    fast = course.lectures_resolved()[1]
    assert (fast.profile, fast.size, fast.precision) == ("fast", "704x384", "fp8")
    assert fast.job_fields()["precision"] == "fp8"
