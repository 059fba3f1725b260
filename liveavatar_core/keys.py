"""Content keys. A key is a hash of content and parameters, never of time, run ids or file names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Streaming hash of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def content_key(kind: str, **fields: Any) -> str:
    """A stable key for `kind` from JSON-serialisable fields (order-independent)."""
    canonical = json.dumps({"kind": kind, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def segment_key(
    *,
    audio_sha: str,
    portrait_sha: str,
    prompt: str,
    engine: str,
    engine_version: str,
    weights: str,
    config: dict[str, Any],
    seed: int,
    handoff_sha: str | None,
) -> str:
    """The cache key of one generated segment (ARCHITECTURE.md, "Cache keys are content, never time").

    `config` is the *requested* config, not the rung that ran: a re-run with another memory budget
    reuses what was made. `weights` tells real checkpoints from random ones.
    """
    return content_key(
        "segment",
        audio=audio_sha,
        portrait=portrait_sha,
        prompt=prompt,
        engine=engine,
        engine_version=engine_version,
        weights=weights,
        config=config,
        seed=seed,
        handoff=handoff_sha,
    )
