"""The LiveAvatar engine: a causal speech-to-video DiT (Wan2.2-S2V-14B + the LiveAvatar LoRA), its
encoders, VAE and scheduler, composed here and loaded once per worker.

`LiveAvatarEngine` is imported lazily, so importing one part (the config, the VAE) stays light, and
so does what a flow asks of the engine without loading it: its version and its prompt token counter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import LiveAvatarEngine

__all__ = ["VERSION", "LiveAvatarEngine", "token_counter"]

VERSION = "1"  # of the engine's output: part of every segment's key


def token_counter(checkpoint_dir: str | None) -> Callable[[str], int] | None:
    """umT5 tokens of a prompt (with </s>), from the tokenizer in the checkpoint folder; None without one."""
    if not checkpoint_dir:
        return None
    from .components import CheckpointLayout, count_tokens, load_tokenizer

    folder = CheckpointLayout(Path(checkpoint_dir)).tokenizer
    if not folder.is_dir():
        return None
    tokenizer = load_tokenizer(folder)
    return lambda text: count_tokens(tokenizer, text)


def __getattr__(name: str):
    if name == "LiveAvatarEngine":
        from .engine import LiveAvatarEngine

        return LiveAvatarEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
