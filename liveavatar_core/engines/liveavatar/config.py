"""Hyper-parameters of the causal S2V DiT, read from the official `config.json`.

One frozen dataclass, passed whole to every module. Full-size defaults are the values of the released
Wan2.2-S2V-14B `config.json`; `DiTConfig.tiny()` gives a seconds-on-CPU model for tests. Numbers that
follow from the config (head dim, RoPE split, tokens per latent frame) are properties, never restated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import LiveAvatarError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch


class CheckpointError(LiveAvatarError):
    """A checkpoint file is missing, unreadable or does not match the model; names the file (and tensor)."""

    def __init__(self, path: str, problem: str, tensor: str | None = None):
        where = f"{path} [{tensor}]" if tensor else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.tensor = tensor
        self.problem = problem


class ConfigError(CheckpointError):
    """A `config.json` describes a model this implementation does not build."""


def rename_state_dict(
    state: dict[str, torch.Tensor],
    rename: Callable[[str], list[str]],
    expected: dict[str, torch.Tensor],
    *,
    source: str,
    model: str,
) -> dict[str, torch.Tensor]:
    """Map a checkpoint's tensors onto a model's names; the result has exactly `expected`'s keys and shapes.

    `rename` gives the model's name(s) for one checkpoint name (KeyError when it has none). Raises
    CheckpointError naming `source` and the tensor on an unknown, duplicate, missing or misshaped one.
    Nothing is copied: the values are the checkpoint's own (possibly memory-mapped) tensors.
    """
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        try:
            targets = rename(name)
        except KeyError:
            raise CheckpointError(source, f"unknown tensor: no place in {model}", name) from None
        for target in targets:
            if target in converted:
                raise CheckpointError(source, f"a second tensor maps onto {target!r}", name)
            if target not in expected:
                raise CheckpointError(source, f"maps onto {target!r}, which the model does not have", name)
            if tuple(tensor.shape) != tuple(expected[target].shape):
                need = tuple(expected[target].shape)
                raise CheckpointError(source, f"shape {tuple(tensor.shape)}, the model needs {need}", name)
            converted[target] = tensor
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise CheckpointError(source, f"{len(missing)} {model} tensors missing", missing[0])
    return converted


# Official config.json fields that select code paths. The released checkpoint sets them as below; any
# other value selects a variant we do not implement, so loading stops with a message naming the field.
_REQUIRED_FLAGS: dict[str, Any] = {
    "model_type": "s2v",
    "enable_adain": True,  # the global audio vector drives an AdaLayerNorm before each injector
    "adain_mode": "attn_norm",
    "enable_framepack": True,  # motion context through FramePack (not the motioner transformer)
    "enable_motioner": False,
    "zero_timestep": True,  # reference/motion tokens are modulated with t = 0
    "add_last_motion": True,
    "trainable_token_pos_emb": False,
    "enable_tsm": False,
    "qk_norm": True,
    "cross_attn_norm": True,
    "window_size": [-1, -1],
}

# Defaults of the official model class for fields a config.json may leave out (the official loader
# falls back to these, so we do too, then validate).
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "cond_dim": 0,
    "audio_dim": 5120,
    "num_audio_token": 4,
    "enable_adain": False,
    "adain_mode": "attn_norm",
    "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27],
    "zero_timestep": False,
    "enable_motioner": True,
    "add_last_motion": True,
    "enable_tsm": False,
    "trainable_token_pos_emb": False,
    "enable_framepack": False,
    "model_type": "s2v",
    "patch_size": [1, 2, 2],
    "text_len": 512,
    "in_dim": 16,
    "dim": 2048,
    "ffn_dim": 8192,
    "freq_dim": 256,
    "text_dim": 4096,
    "out_dim": 16,
    "num_heads": 16,
    "num_layers": 32,
    "window_size": [-1, -1],
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}


@dataclass(frozen=True)
class DiTConfig:
    """Shape and behaviour of the DiT. Field names follow the official config.json where one exists."""

    # --- official config.json fields ---
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512  # text tokens are zero-padded to this length and all of them are attended
    in_dim: int = 16  # latent channels in
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256  # sinusoidal timestep features
    text_dim: int = 4096  # umT5-XXL hidden size
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    cond_dim: int = 16  # pose-latent channels of `cond_encoder` (zeros when there is no pose video)
    audio_dim: int = 1024  # wav2vec2 hidden size
    num_audio_token: int = 4  # local audio tokens per latent frame (plus one learned padding token)
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)

    # --- fixed by the official code, not in config.json ---
    audio_layers: int = 25  # wav2vec2 hidden states (embeddings + 24 layers) the audio encoder weighs
    motion_frames: int = 73  # video frames of motion context; the audio prefix is this many frames
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)  # latent frames per bucket, nearest first
    ref_frame_position: int = 30  # RoPE frame of the reference latent in the sink forward
    rope_theta: float = 10000.0
    audio_norm_eps: float = 1e-5  # the injectors' AdaLayerNorm (diffusers default)

    # --- causal inference ---
    block_frames: int = 3  # latent frames denoised per DiT forward
    ring_frames: int = 12  # latent frames one step's KV ring cache holds (current block included)

    def __post_init__(self) -> None:
        problems = []
        if self.dim % self.num_heads:
            problems.append(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        elif self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} is odd (RoPE rotates pairs)")
        if self.dim % 4:
            problems.append(f"dim {self.dim} is not a multiple of 4 (audio encoder widths dim/4, dim/2)")
        bad_layers = [i for i in self.audio_inject_layers if not 0 <= i < self.num_layers]
        if bad_layers or len(set(self.audio_inject_layers)) != len(self.audio_inject_layers):
            problems.append(f"audio_inject_layers {self.audio_inject_layers} for {self.num_layers} layers")
        if tuple(self.patch_size) != (1, 2, 2):
            problems.append(f"patch_size {self.patch_size}: only (1, 2, 2) is implemented")
        if self.ring_frames % self.block_frames:
            problems.append(
                f"ring_frames {self.ring_frames} is not a multiple of block_frames {self.block_frames}"
            )
        if problems:
            raise ConfigError("DiTConfig", "; ".join(problems))

    # --- derived numbers ---
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axis_dims(self) -> tuple[int, int, int]:
        """Channels of each head rotated by the frame, height and width positions (sum = head_dim)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames of motion context FramePack reads (19 for 73 video frames)."""
        return sum(self.framepack_buckets)

    @property
    def audio_prefix_latents(self) -> int:
        """Latent steps the audio encoder output spends on the repeated-first-frame prefix (19)."""
        return (self.motion_frames + 3) // 4

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens of one latent frame: fsl = (H/16)·(W/16) for video H×W."""
        return (latent_height // self.patch_size[1]) * (latent_width // self.patch_size[2])

    def check_latent_size(self, latent_height: int, latent_width: int) -> None:
        """FramePack's 4x bucket patchifies by 8: latent sides must be multiples of 8 (video: of 64)."""
        if latent_height % 8 or latent_width % 8:
            raise ValueError(
                f"latent size {latent_height}x{latent_width}: both sides must be multiples of 8 "
                "(video sides multiples of 64)"
            )

    # --- constructors ---
    @classmethod
    def tiny(cls, **overrides: Any) -> DiTConfig:
        """A 4-layer, 64-wide model with the full model's structure (3 injectors, all FramePack buckets)
        for CPU tests. text_dim 32 / audio_dim 32 / audio_layers 3 match the tiny umT5 and wav2vec2 of
        `tiny_encoders.py`; override to match other encoders."""
        fields = dict(
            dim=64,
            ffn_dim=128,
            freq_dim=32,
            text_dim=32,
            num_heads=4,
            num_layers=4,
            text_len=16,
            audio_dim=32,
            audio_layers=3,  # a 2-layer tiny wav2vec2: embeddings + 2 hidden states
            audio_inject_layers=(0, 2, 3),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_official(cls, raw: dict[str, Any], source: str = "config.json") -> DiTConfig:
        """Build from the fields of an official config.json; raise ConfigError naming a bad field.

        Keys with no effect on inference (zero_init, motion_token_num, framepack_drop_mode: the drop
        mode only matters when FramePack drops buckets, which inference never does) and keys we do not
        know are ignored."""
        merged = {**_OFFICIAL_DEFAULTS, **raw}
        for name, wanted in _REQUIRED_FLAGS.items():
            value = merged.get(name)
            if isinstance(wanted, list):
                value = list(value) if isinstance(value, (list, tuple)) else value
            if value != wanted:
                raise ConfigError(
                    source, f"{name}={value!r} is not supported (the released model has {wanted!r})"
                )
        if merged["cond_dim"] <= 0:
            raise ConfigError(source, f"cond_dim={merged['cond_dim']}: the S2V model needs a cond_encoder")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in merged.items() if k in known}
        for key in ("patch_size", "audio_inject_layers", "framepack_buckets"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(source, str(exc)) from exc

    @classmethod
    def from_json_file(cls, path: str | Path) -> DiTConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(str(path), f"not valid JSON ({exc})") from exc
        return cls.from_official(raw, source=str(path))

    def to_official(self) -> dict[str, Any]:
        """The config.json the official code would read for this model (ours extends it for tiny sizes)."""
        out: dict[str, Any] = {"_class_name": "WanModel_S2V"}
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in _REQUIRED_FLAGS.items()})
        out.update(
            zero_init=True,
            motion_token_num=1024,
            framepack_drop_mode="padd",
            patch_size=list(self.patch_size),
            text_len=self.text_len,
            in_dim=self.in_dim,
            dim=self.dim,
            ffn_dim=self.ffn_dim,
            freq_dim=self.freq_dim,
            text_dim=self.text_dim,
            out_dim=self.out_dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            eps=self.eps,
            cond_dim=self.cond_dim,
            audio_dim=self.audio_dim,
            num_audio_token=self.num_audio_token,
            audio_inject_layers=list(self.audio_inject_layers),
        )
        # Our extensions (absent from the official file; defaults apply when missing).
        defaults = DiTConfig()
        for name in ("audio_layers", "motion_frames"):
            if getattr(self, name) != getattr(defaults, name):
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class LoraConfig:
    """The LiveAvatar LoRA: rank 128, alpha 64 (peft scaling alpha/rank = 0.5), no rsLoRA."""

    rank: int = 128
    alpha: float = 64.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
