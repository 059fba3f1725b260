"""Engines by name. Model code is imported only to load an engine.

Each engine's module (the part before ":" in its factory) is light: it names the engine's `VERSION`
and its `token_counter(checkpoint_dir)` without importing model code, so that a flow on a CPU host can
choose the engine and key its segments in well under a second. (Importing the LiveAvatar engine's
model code takes 8 s on a 2-core CPU host and 14 s on a GPU host.) Only reading a checkpoint's
tokenizer imports it, where the flow's host has the checkpoints (as when it generates in-process).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .base import Engine, GenerationConfig

# name -> "module:factory"; a factory takes the EngineSpec's options as keyword arguments (the module
# is light: see above; the factory may be a lazily imported attribute).
_FACTORIES: dict[str, str] = {
    "preview": "liveavatar_core.engines.preview:PreviewEngine",
    "liveavatar": "liveavatar_core.engines.liveavatar:LiveAvatarEngine",
}

_LOADED: dict[EngineSpec, Engine] = {}


@dataclass(frozen=True)
class EngineSpec:
    """Which engine, and how to load it. Hashable: one loaded instance per spec per process."""

    name: str
    checkpoint_dir: str | None = None
    random_weights: bool = False
    device: str | None = None


def names() -> list[str]:
    return sorted(_FACTORIES)


def _module(name: str):
    if name not in _FACTORIES:
        raise InputError("--engine", f"unknown engine {name!r}; known: {', '.join(names())} or auto")
    return importlib.import_module(_FACTORIES[name].split(":")[0])


def engine_version(name: str) -> str:
    """The version of the engine's output (part of every segment's key), without its model code."""
    return _module(name).VERSION


def token_counter(name: str, checkpoint_dir: str | None) -> Callable[[str], int] | None:
    """Counts prompt tokens as the engine's text encoder sees them; None when it has no tokenizer."""
    return _module(name).token_counter(checkpoint_dir)


def engine_class(name: str) -> type[Engine]:
    """The engine's class (imports its model code; loads no weights)."""
    return getattr(_module(name), _FACTORIES[name].split(":")[1])


def load(
    spec: EngineSpec, memory_budget_bytes: int | None = None, prepare_for: GenerationConfig | None = None
) -> Engine:
    """The process's engine for `spec`, loaded on first use and kept for every later segment.

    On first use, `memory_budget_bytes` caps the device memory the engine may take (loading included)
    and `prepare_for` is the config its weights are placed for; later segments bring their own budget."""
    if spec not in _LOADED:
        cls = engine_class(spec.name)
        if spec.name == "preview":
            _LOADED[spec] = cls()
        else:
            _LOADED[spec] = cls(
                checkpoint_dir=spec.checkpoint_dir,
                random_weights=spec.random_weights,
                device=spec.device,
                memory_budget_bytes=memory_budget_bytes,
                prepare_for=prepare_for,
            )
    return _LOADED[spec]


def unload_all() -> None:
    """Close every loaded engine (frees device memory)."""
    while _LOADED:
        _, engine = _LOADED.popitem()
        engine.close()


def resolve(requested: str, checkpoint_dir: str | None, random_weights: bool) -> tuple[str, str]:
    """Pick the engine for `--engine auto|NAME`; returns (name, reason) so the choice can be reported."""
    if requested != "auto":
        _module(requested)  # validates the name
        return requested, f"--engine {requested} was asked for"
    gpu = _cuda_available()
    if not gpu:
        return "preview", "no CUDA GPU on this machine, so the CPU preview renderer (not LiveAvatar)"
    if random_weights:
        return "liveavatar", "a CUDA GPU is present and --random-weights was asked for"
    if checkpoint_dir and Path(checkpoint_dir).is_dir():
        return "liveavatar", f"a CUDA GPU and the checkpoint directory {checkpoint_dir} are present"
    where = checkpoint_dir or os.environ.get("LIVEAVATAR_CHECKPOINT_DIR") or "(none given)"
    return "preview", f"a CUDA GPU is present but no checkpoint directory ({where}), so the preview renderer"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
