"""Engines: the Engine interface, the degrade ladder runner, and the registry of engines by name."""

from .base import Engine, FrameSink, GenerationConfig, Rung, SegmentRequest, SegmentResult
from .ladder import Attempt, AttemptSink, LadderExhausted, generate_with_ladder
from .registry import EngineSpec

__all__ = [
    "Attempt",
    "AttemptSink",
    "Engine",
    "EngineSpec",
    "FrameSink",
    "GenerationConfig",
    "LadderExhausted",
    "Rung",
    "SegmentRequest",
    "SegmentResult",
    "generate_with_ladder",
]
