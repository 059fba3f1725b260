"""Engines by name. Factories are imported lazily so choosing `preview` never loads model code."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .base import Engine

# name -> "module:factory"; a factory takes the EngineSpec's options as keyword arguments.
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


def engine_class(name: str) -> type[Engine]:
    """The engine's class (for its name and version) without loading any weights."""
    if name not in _FACTORIES:
        raise InputError("--engine", f"unknown engine {name!r}; known: {', '.join(names())} or auto")
    module_name, attr = _FACTORIES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def load(spec: EngineSpec) -> Engine:
    """The process's engine for `spec`, loaded on first use and kept for every later segment."""
    if spec not in _LOADED:
        cls = engine_class(spec.name)
        if spec.name == "preview":
            _LOADED[spec] = cls()
        else:
            _LOADED[spec] = cls(
                checkpoint_dir=spec.checkpoint_dir, random_weights=spec.random_weights, device=spec.device
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
        engine_class(requested)  # validates the name
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
