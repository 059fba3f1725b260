"""Course manifest: a YAML file listing a course's lectures and the defaults they share.

    id: cs101                        # URL-safe: a-z, 0-9, '-', '_'
    output_prefix: s3://videos/cs101 # lecture N is published under {output_prefix}/{lecture id}
    notify_webhook: https://hooks.example.org/T0/B0  # optional: POSTed to when a course run ends
    defaults: {portrait: lee.jpg, prompt: "...", engine: auto, profile: standard, seed: 0}
    lectures:
      - {id: 01-welcome, audio: audio/01.mp3}
      - {id: 02-regression, audio: audio/02.mp3, profile: draft}

Validation is strict (unknown fields, duplicate keys and duplicate ids are errors) and every error
names the field and its line in the YAML. Relative paths resolve against the YAML file's folder
(or, for a manifest read from a URL, against that URL's prefix).
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .errors import InputError

Engine = Literal["auto", "preview", "liveavatar"]
ProfileName = Literal["draft", "standard", "fast", "spot"]
# fp8: LiveAvatar's block linears in e4m3 (fp8 GPUs only; faster, slightly different pictures).
Precision = Literal["bf16", "fp8"]
# Lowercase only, so ids cannot collide on case-insensitive disks; no dots, so an id is never
# "..", never looks like a file ("summary.json") and needs no escaping in a URL or an S3 key.
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1)]

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class Profile(BaseModel):
    """A named set of generation settings (the subset of a lecture job that decides look and cost)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str
    size: str  # WIDTHxHEIGHT of the generated video (exact: every lecture of a course alike)
    precision: Precision = "bf16"
    segment_seconds: float  # target segment length; cuts fall in pauses near it
    max_segment_seconds: float  # no segment is longer


PROFILES: dict[str, Profile] = {
    "draft": Profile(
        description="Review copy (384x256): a third of the pixels of standard, so about 3x cheaper per minute",
        size="384x256",
        segment_seconds=30.0,
        max_segment_seconds=40.0,
    ),
    "standard": Profile(
        description="The model's own size, 704 wide x 384 high; the default",
        size="704x384",
        segment_seconds=30.0,
        max_segment_seconds=40.0,
    ),
    "fast": Profile(
        description="Standard size with fp8 linears: about 1.3x faster on fp8 GPUs (H100, L40S), "
        "slightly different pictures",
        size="704x384",
        precision="fp8",
        segment_seconds=30.0,
        max_segment_seconds=40.0,
    ),
    "spot": Profile(
        description="Standard pictures in short segments: a preempted GPU loses at most 20 s of work",
        size="704x384",
        segment_seconds=15.0,
        max_segment_seconds=20.0,
    ),
}


class _Strict(BaseModel):
    # strict: YAML gives real types, so "seed: '3'" or "id: 101" are mistakes worth naming.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Defaults(_Strict):
    """Settings every lecture takes unless it overrides them."""

    portrait: Text | None = None
    prompt: Text | None = None
    engine: Engine = "auto"
    profile: ProfileName = "standard"
    seed: int = Field(0, ge=0)


class Lecture(_Strict):
    """One lecture as written: its id and audio, and any default it overrides."""

    id: Id
    audio: Text
    title: str | None = None
    portrait: Text | None = None
    prompt: Text | None = None
    engine: Engine | None = None
    profile: ProfileName | None = None
    seed: int | None = Field(None, ge=0)


class LectureSpec(BaseModel):
    """A lecture with every default applied and every path resolved: ready to become a job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    course_id: str
    lecture_id: str
    title: str | None
    audio: str
    portrait: str
    prompt: str
    engine: Engine
    profile: ProfileName
    size: str
    precision: Precision
    segment_seconds: float
    max_segment_seconds: float
    seed: int
    out: str  # {output_prefix}/{lecture_id}: the lecture's own folder or S3 prefix

    def job_fields(self) -> dict[str, Any]:
        """The lecture job's fields (named as in the production flow's parameters) this spec decides."""
        return {
            "audio": self.audio,
            "image": self.portrait,
            "prompt": self.prompt,
            "out": self.out,
            "engine": self.engine,
            "size": self.size,
            "precision": self.precision,
            "segment_seconds": self.segment_seconds,
            "max_segment_seconds": self.max_segment_seconds,
            "seed": self.seed,
        }


class Course(_Strict):
    """A validated course manifest. Paths in it are already resolved (see `parse_course`)."""

    id: Id
    title: str | None = None
    output_prefix: Text
    # POSTed to (JSON: run, state, message) when a run of this course ends; see flows/notify.py.
    notify_webhook: Text | None = None
    defaults: Defaults = Defaults()
    lectures: list[Lecture] = Field(min_length=1)

    @property
    def summary_url(self) -> str:
        return f"{self.output_prefix}/summary.json"

    def lecture_out(self, lecture_id: str) -> str:
        return f"{self.output_prefix}/{lecture_id}"

    def lectures_resolved(self) -> list[LectureSpec]:
        """Every lecture with the course defaults and its profile's settings applied."""
        return [self._resolve(lecture) for lecture in self.lectures]

    def _resolve(self, lecture: Lecture) -> LectureSpec:
        d = self.defaults
        profile = lecture.profile or d.profile
        settings = PROFILES[profile]
        portrait, prompt = lecture.portrait or d.portrait, lecture.prompt or d.prompt
        if portrait is None or prompt is None:  # parse_course rejects this; reached only when built by hand
            raise InputError(
                f"lecture {lecture.id}", "needs a portrait and a prompt, its own or the defaults'"
            )
        return LectureSpec(
            course_id=self.id,
            lecture_id=lecture.id,
            title=lecture.title,
            audio=lecture.audio,
            portrait=portrait,
            prompt=prompt,
            engine=lecture.engine or d.engine,
            profile=profile,
            size=settings.size,
            precision=settings.precision,
            segment_seconds=settings.segment_seconds,
            max_segment_seconds=settings.max_segment_seconds,
            seed=d.seed if lecture.seed is None else lecture.seed,
            out=self.lecture_out(lecture.id),
        )


Loc = tuple[str | int, ...]  # a pydantic error location, e.g. ("lectures", 2, "audio")
Problem = tuple[int | None, str, str]  # line (1-based), dotted field, what is wrong


class CourseError(InputError):
    """The manifest is invalid. The message names the first problem; `problems` lists them all."""

    def __init__(self, source: str, problems: list[Problem]):
        line, field, problem = problems[0]
        where = source if line is None else f"{source}:{line}"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{where} {field}".rstrip(), problem + more)
        self.source = source
        self.line = line
        self.field = field
        self.problems = problems


def load_course(path: str | os.PathLike[str], *, check_local_files: bool = False) -> Course:
    """Read and validate a course manifest from a local file (or a file:// URL)."""
    text_path = str(path)
    local = Path(text_path.removeprefix("file://"))
    try:
        text = local.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(text_path, f"cannot read the course manifest ({exc.strerror or exc})") from None
    return parse_course(text, source=str(local), check_local_files=check_local_files)


def parse_course(text: str, *, source: str, check_local_files: bool = False) -> Course:
    """Validate manifest `text` read from `source` (a path or URL: names errors, anchors relative paths).

    With `check_local_files`, every input that is a local path must exist (URLs are not fetched).
    """
    root, data = _compose(text, source)
    try:
        course = Course.model_validate(data)
    except ValidationError as exc:
        # An unknown field first: a misspelt key ("audo:") also shows up as its field missing.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        problems = [(_line(root, e["loc"]), _dotted(e["loc"]), _explain(e)) for e in errors]
    else:
        problems = [(_line(root, loc), _dotted(loc), msg) for loc, msg in _cross_checks(course)]
    if problems:
        raise CourseError(source, problems)
    course = _resolve_paths(course, root, source)
    if check_local_files:
        missing = [
            (loc, p) for loc, p in _inputs(course) if not _URL.match(p) and not Path(p).expanduser().exists()
        ]
        if missing:
            raise CourseError(
                source, [(_line(root, loc), _dotted(loc), f"no such file {p}") for loc, p in missing]
            )
    return course


# --- YAML with line numbers --------------------------------------------------------------------------


def _compose(text: str, source: str) -> tuple[yaml.Node, Any]:
    """The node tree (for line numbers) and the plain data built from it."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise CourseError(source, [(None, "", "the file is empty")])
        if duplicates := _duplicate_keys(root):  # before construction, which merges "<<" keys in place
            raise CourseError(source, duplicates)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise CourseError(source, [(line, "", f"not valid YAML: {exc.problem or exc.context}")]) from None
    finally:
        loader.dispose()
    if not isinstance(root, yaml.MappingNode):
        raise CourseError(source, [(root.start_mark.line + 1, "", "expected a mapping of id, lectures, ...")])
    return root, data


def _key(node: yaml.Node) -> str:
    return node.value if isinstance(node, yaml.ScalarNode) else "?"


def _duplicate_keys(node: yaml.Node, loc: Loc = ()) -> list[Problem]:
    """PyYAML keeps the last of two equal keys silently; a manifest with both is a mistake."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if key.tag == "tag:yaml.org,2002:merge":
                continue
            name = _key(key)
            if name in first_line:
                problems.append(
                    (line, _dotted((*loc, name)), f"duplicate key (first on line {first_line[name]})")
                )
            first_line.setdefault(name, line)
            problems += _duplicate_keys(value, (*loc, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, (*loc, index))
    return problems


def _line(root: yaml.Node, loc: Loc) -> int:
    """Line (1-based) of the deepest node on `loc`: the field itself, or the mapping that lacks it."""
    node = root
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            # last match: after "<<" merging a key may appear twice, and the mapping's own one wins
            child = next((v for k, v in reversed(node.value) if _key(k) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
    return node.start_mark.line + 1


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(error: dict[str, Any]) -> str:
    """Pydantic's message, reworded where a user needs to know what to write instead."""
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        parent = error["loc"][:-1]
        model = Defaults if parent == ("defaults",) else Lecture if parent[:1] == ("lectures",) else Course
        close = difflib.get_close_matches(str(error["loc"][-1]), list(model.model_fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown field; expected one of {', '.join(model.model_fields)}{hint}"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch":
        return f"{value!r} is not an id: use 1-64 of a-z 0-9 - _, starting with a letter or digit"
    if kind == "string_type" and isinstance(value, int | float | bool | date):
        return f"expected text, got {value!r} (YAML read it as {type(value).__name__}); put it in quotes"
    return f"{error['msg']} (got {value!r})" if kind.endswith(("_type", "literal_error")) else error["msg"]


# --- checks across fields ----------------------------------------------------------------------------


def _cross_checks(course: Course) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    if course.notify_webhook and not re.match(r"https?://[^/\s]+", course.notify_webhook):
        problems.append((("notify_webhook",), f"{course.notify_webhook!r} is not an http(s):// URL"))
    seen: dict[str, int] = {}
    for index, lecture in enumerate(course.lectures):
        if lecture.id in seen:
            first = seen[lecture.id]
            problems.append(
                (("lectures", index, "id"), f"duplicate lecture id {lecture.id!r} (see lectures[{first}])")
            )
        seen.setdefault(lecture.id, index)
        for name in ("portrait", "prompt"):
            if getattr(lecture, name) is None and getattr(course.defaults, name) is None:
                problems.append((("lectures", index), f"no {name}: set defaults.{name} or the lecture's own"))
    return problems


# --- paths -------------------------------------------------------------------------------------------


def _inputs(course: Course) -> list[tuple[Loc, str]]:
    """Every input path or URL in the manifest, with its location."""
    found: list[tuple[Loc, str]] = []
    if course.defaults.portrait:
        found.append((("defaults", "portrait"), course.defaults.portrait))
    for index, lecture in enumerate(course.lectures):
        found.append((("lectures", index, "audio"), lecture.audio))
        if lecture.portrait:
            found.append((("lectures", index, "portrait"), lecture.portrait))
    return found


def _resolve_paths(course: Course, root: yaml.Node, source: str) -> Course:
    """Anchor every relative path at the manifest's folder; URLs and absolute paths stay as written."""

    def resolve(value: str, loc: Loc) -> str:
        try:
            return resolve_against(value, source)
        except ValueError as exc:
            raise CourseError(source, [(_line(root, loc), _dotted(loc), str(exc))]) from None

    defaults = course.defaults
    if defaults.portrait:
        portrait = resolve(defaults.portrait, ("defaults", "portrait"))
        defaults = defaults.model_copy(update={"portrait": portrait})
    lectures = []
    for index, lecture in enumerate(course.lectures):
        update = {"audio": resolve(lecture.audio, ("lectures", index, "audio"))}
        if lecture.portrait:
            update["portrait"] = resolve(lecture.portrait, ("lectures", index, "portrait"))
        lectures.append(lecture.model_copy(update=update))
    prefix = resolve(course.output_prefix, ("output_prefix",)).rstrip("/")
    return course.model_copy(update={"defaults": defaults, "lectures": lectures, "output_prefix": prefix})


def resolve_against(value: str, source: str) -> str:
    """`value` as written in the manifest read from `source`: URLs, absolute and ~ paths as they are;
    relative paths joined to the manifest's folder (a local directory, or the URL prefix it came from)."""
    if _URL.match(value) or os.path.isabs(value) or value.startswith("~"):
        return value
    if not _URL.match(source):
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(source)), value))
    scheme, rest = source.split("://", 1)
    bucket, _, key = rest.partition("/")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), value))
    if joined == ".." or joined.startswith("../"):
        raise ValueError(f"{value!r} climbs above {scheme}://{bucket}")
    return f"{scheme}://{bucket}" if joined == "." else f"{scheme}://{bucket}/{joined}"
