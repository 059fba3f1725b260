"""What the tasks pass each other: small, serialisable records that point into the work store."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StagedFile(_Record):
    """A user input copied into the work store under its content hash."""

    source: str  # the URL the user gave
    url: str  # work-store URL
    sha256: str


class SpeechSpanRecord(_Record):
    start_s: float
    end_s: float


class AudioPrep(_Record):
    """The normalised lecture audio (16 kHz mono PCM16 WAV) and what was learned preparing it."""

    source: StagedFile  # the lecture as uploaded: the published track is made from it
    wav_url: str
    samples: int
    duration_s: float
    sample_rate: int  # of the source
    channels: int  # of the source
    codec: str  # of the source
    loudness_in: dict[str, float]
    loudness_out: dict[str, float]
    speech: list[SpeechSpanRecord]


class PlannedSegment(_Record):
    index: int
    start_sample: int
    end_sample: int
    frames: int
    cut: str
    audio_url: str  # this segment's own 16 kHz mono WAV slice
    audio_sha256: str


class PortraitPrep(_Record):
    url: str  # PNG of the crop at output size
    sha256: str
    face_box: tuple[int, int, int, int]
    faces_found: int
    warnings: list[str]


class PromptPrep(_Record):
    text: str
    tokens: int
    truncated: bool
    warnings: list[str]


class EngineChoice(_Record):
    name: str
    version: str
    weights: str  # none | checkpoint | random
    reason: str
    checkpoint_dir: str | None = None
    random_weights: bool = False
    device: str | None = None


class SegmentJob(_Record):
    """Everything one segment's generation needs; `key` is its content (cache) key."""

    key: str
    index: int
    audio_url: str
    frames: int
    portrait_url: str
    face_box: tuple[int, int, int, int]
    prompt: str
    engine: EngineChoice
    config: dict[str, Any]
    seed: int
    handoff_url: str | None
    memory_budget_bytes: int | None
    work: str


class SegmentOutput(_Record):
    index: int
    key: str
    video_url: str
    handoff_url: str
    frames: int
    attempts: list[dict[str, Any]]
    seconds: float
    peak_memory_bytes: int
    details: dict[str, Any] = {}  # what the engine reported for the attempt that succeeded
