"""The LiveAvatar engine: a causal speech-to-video DiT (Wan2.2-S2V-14B + the LiveAvatar LoRA), its
encoders, VAE and scheduler, composed here and loaded once per worker.

`LiveAvatarEngine` is imported lazily, so importing one part (the config, the VAE) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import LiveAvatarEngine

__all__ = ["LiveAvatarEngine"]


def __getattr__(name: str):
    if name == "LiveAvatarEngine":
        from .engine import LiveAvatarEngine

        return LiveAvatarEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
