"""Run one segment down the degrade ladder: on OutOfMemory, retry on the next rung.

Every attempt is recorded (rung, config, error, seconds) for the manifest. Each attempt writes to a
fresh sink; a failed attempt's partial output is discarded, so nothing half-made survives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..errors import OutOfMemory
from .base import Engine, FrameSink, SegmentRequest, SegmentResult, format_bytes


class AttemptSink(FrameSink, Protocol):
    def close(self) -> None: ...  # finish: the output is complete and kept

    def abort(self) -> None: ...  # give up: remove whatever was written


@dataclass
class Attempt:
    rung: str
    config: dict[str, Any]
    error: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "config": self.config,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class LadderOutcome:
    result: SegmentResult
    attempts: list[Attempt] = field(default_factory=list)


class LadderExhausted(OutOfMemory):
    """Even the last rung does not fit."""

    def __init__(self, message: str, attempts: list[Attempt], **kw: Any):
        super().__init__(message, **kw)
        self.attempts = attempts


def generate_with_ladder(
    engine: Engine, request: SegmentRequest, make_sink: Callable[[], AttemptSink]
) -> LadderOutcome:
    """Try `request.config`'s ladder rung by rung until one fits; raise LadderExhausted if none does."""
    attempts: list[Attempt] = []
    for rung in engine.ladder(request.config):
        sink = make_sink()
        start = time.perf_counter()
        try:
            result = engine.generate(replace(request, config=rung.config), sink)
        except OutOfMemory as exc:
            sink.abort()
            attempts.append(Attempt(rung.name, rung.config.to_dict(), str(exc), time.perf_counter() - start))
            continue
        except BaseException:
            sink.abort()
            raise
        sink.close()
        attempts.append(Attempt(rung.name, rung.config.to_dict(), None, time.perf_counter() - start))
        return LadderOutcome(result, attempts)
    smallest = min(engine.estimate_memory(r.config) for r in engine.ladder(request.config))
    budget = request.memory_budget_bytes
    budget_text = format_bytes(budget) if budget is not None else "the device's memory"
    raise LadderExhausted(
        f"no rung of the {engine.name} ladder fits the memory budget of {budget_text}; "
        f"the smallest estimate is {format_bytes(smallest)} ({len(attempts)} attempts)",
        attempts,
        needed_bytes=smallest,
        budget_bytes=budget,
    )
