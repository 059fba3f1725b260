"""The Engine interface: loaded once per worker process, then asked for segment after segment.

An engine turns one segment request (audio samples, portrait, prompt, config, seed, and the handoff
state the previous segment ended with) into video frames, written incrementally to a sink, and
returns the handoff state for the next segment.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from .. import size as output_size
from ..errors import InputError, OutOfMemory
from ..timebase import AUDIO_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME

GiB = 1024**3


def format_bytes(n: int | float) -> str:
    """Human-readable size in binary units (memory budgets and estimates in messages)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class GenerationConfig:
    """What a segment asks of an engine. Engines ignore knobs that mean nothing to them.

    Quality knobs: height, width (the generated area; output size is fixed per lecture), steps.
    Speed/memory knobs (same pictures, slower or smaller): the offload flags, order, sweep_blocks,
    cuda_graphs and overlap_decode.
    fp8 changes numerics slightly (e4m3 linears, one scale per token and per output channel) and
    sits between the two groups.
    compile: run with compiled kernels (rounding-level differences); None lets the engine choose.
    order: the denoising order, "block" (block after block) or "sweep" (step-major, layer-major: the
    same pictures; with offload_weights each layer's weights cross to the device once per step sweep).
    sweep_blocks: blocks per group in sweep order: more amortise streamed weights and offloaded rings
    over more blocks, fewer hold less device state (one block's hidden state per block of a group).
    cuda_graphs: replay block forwards as CUDA graphs (same kernels, same pictures, less host work)
    where weights and rings are on the GPU. Off by default: on an H200 the DiT is GPU-bound and
    graphs gained 1% (round 4), then cost the fp8 DiT 8% (round 6, docs/benchmarks.md); a host whose
    CPU cannot keep up may gain more.
    overlap_decode: decode each block on a second CUDA stream while the next block's DiT runs (same
    pictures; both steps' working memory at once). Off by default: on an H200 +3% fp8, -10% bf16 in
    round 4; fp8 15% slower end to end in round 6.
    row_kernels: with compiled chains, the chains that have one run as one-pass Triton kernels
    (`row_kernels.py`: the norms, the GELU and the attention merge that feed fp8 linears, RMSNorm +
    RoPE; within an e4m3 step of the eager chains). None (default) uses them wherever chains compile
    on a CUDA GPU Triton supports: fp8 1.05x end to end on an H200, the median of five side-by-side
    pairs (round 7, docs/benchmarks.md).
    """

    height: int = 704
    width: int = 384
    steps: int = 4
    fp8: bool = False
    offload_encoders: bool = False
    offload_kv_cache: bool = False
    offload_weights: bool = False
    compile: bool | None = None
    order: Literal["block", "sweep"] = "block"
    sweep_blocks: int = 64  # 64 blocks: 30.7 s of video, a whole default segment
    cuda_graphs: bool = False
    overlap_decode: bool = False
    row_kernels: bool | None = None

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        return cls(**data)

    @classmethod
    def for_output(cls, size: str, precision: str = "bf16", aspect: float | None = None) -> GenerationConfig:
        """What a lecture (or a course profile) asks for: its size ("auto" or "WIDTHxHEIGHT", see
        liveavatar_core.size), the portrait's width/height `aspect` that "auto" follows, and precision."""
        width, height = output_size.resolve(output_size.normalise(size), aspect)
        return cls(height=height, width=width, fp8=precision == "fp8")

    @property
    def size(self) -> str:
        """WIDTHxHEIGHT, as video tools write it."""
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Rung:
    """One step of the degrade ladder: a config and what taking it costs."""

    name: str
    config: GenerationConfig
    costs: Literal["nothing", "speed", "quality"]


@dataclass(frozen=True)
class SegmentRequest:
    """One segment of work. Arrays are owned by the caller and not modified."""

    audio: np.ndarray  # float32 [samples], 16 kHz mono, this segment's samples only
    num_frames: int  # video frames to produce at 25 fps (covers the audio, last frame may be partial)
    portrait: np.ndarray  # uint8 [H, W, 3] RGB, cropped around the face to the output aspect
    prompt: str
    seed: int
    config: GenerationConfig
    face_box: tuple[int, int, int, int] | None = None  # x, y, w, h of the face in `portrait`
    handoff: bytes | None = None  # state the previous segment ended with; None starts fresh
    memory_budget_bytes: int | None = None  # None: the device's own capacity is the limit

    def check(self) -> None:
        """Reject malformed requests before any work starts."""
        if self.audio.ndim != 1 or self.audio.dtype != np.float32:
            raise InputError(
                "segment audio", f"expected float32 [samples], got {self.audio.dtype} {self.audio.shape}"
            )
        expected = -(-len(self.audio) // SAMPLES_PER_FRAME)
        if self.num_frames != expected:
            raise InputError(
                "segment", f"{len(self.audio)} samples need {expected} frames, not {self.num_frames}"
            )
        if self.portrait.ndim != 3 or self.portrait.shape[2] != 3 or self.portrait.dtype != np.uint8:
            raise InputError(
                "segment portrait",
                f"expected uint8 [H, W, 3], got {self.portrait.dtype} {self.portrait.shape}",
            )

    @property
    def duration_s(self) -> float:
        return len(self.audio) / AUDIO_SAMPLE_RATE


class FrameSink(Protocol):
    """Where frames go as they are made (an encoder, a test buffer). Frames are uint8 [n, H, W, 3]."""

    def write(self, frames: np.ndarray) -> None: ...


@dataclass
class SegmentResult:
    frames_written: int
    handoff: bytes  # serialised state to start the next segment from (small: travels through storage)
    seconds: float
    peak_memory_bytes: int  # measured peak of the engine's own buffers/device memory during the call
    details: dict[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """Load once, generate many. Subclasses implement `_generate`, `estimate_memory` and `ladder`."""

    name: ClassVar[str]
    version: ClassVar[str]

    def default_config(self) -> GenerationConfig:
        return GenerationConfig()

    @abstractmethod
    def estimate_memory(self, config: GenerationConfig, num_frames: int | None = None) -> int:
        """Peak bytes one segment takes on the engine's device with this config: a segment of
        `num_frames`, or (None) the most any segment length can take."""

    @abstractmethod
    def ladder(self, config: GenerationConfig) -> list[Rung]:
        """Ordered configs to try: `config` itself first, then cheaper ones (speed before quality)."""

    def generate(self, request: SegmentRequest, sink: FrameSink) -> SegmentResult:
        """Check the request, refuse it up front if its estimate is over budget, then run it."""
        request.check()
        estimate = self.estimate_memory(request.config, request.num_frames)
        budget = request.memory_budget_bytes
        if budget is not None and estimate > budget:
            raise OutOfMemory(
                f"{self.name} at {request.config.size}, {request.config.steps} steps needs about "
                f"{format_bytes(estimate)}, over the budget of {format_bytes(budget)}",
                needed_bytes=estimate,
                budget_bytes=budget,
            )
        start = time.perf_counter()
        result = self._generate(request, sink)
        result.seconds = time.perf_counter() - start
        return result

    @abstractmethod
    def _generate(self, request: SegmentRequest, sink: FrameSink) -> SegmentResult:
        """Produce exactly `request.num_frames` frames into `sink`; raise OutOfMemory on a real OOM."""

    def close(self) -> None:
        """Release device memory. The engine is unusable afterwards."""


__all__ = [
    "FPS",
    "Engine",
    "FrameSink",
    "GenerationConfig",
    "GiB",
    "format_bytes",
    "Rung",
    "SegmentRequest",
    "SegmentResult",
]
