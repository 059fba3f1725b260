"""What the LiveAvatar engine is made of, and where it comes from: the official checkpoint layout, or
seeded random weights at full size (benchmarks, capacity planning; only when asked for).

Official layout under `checkpoint_dir` (as the reference README downloads it):

    Wan2.2-S2V-14B/  config.json, diffusion_pytorch_model*.safetensors (+ index),
                     models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer),
                     Wan2.1_VAE.pth, wav2vec2-large-xlsr-53-english/
    LiveAvatar/      liveavatar.safetensors (the LoRA, merged into the DiT at load)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .audio_features import AudioFeatureExtractor
from .checkpoint import CONFIG_NAME, INDEX_NAME, LORA_NAME, Placement, build_empty, load_dit, random_init
from .config import CheckpointError, DiTConfig
from .dit import LiveAvatarDiT
from .text_encoder import TextEncoder, TextEncoderConfig, clean_prompt, load_umt5_encoder
from .tiny_encoders import (
    T5_CHECKPOINT,
    T5_TOKENIZER_DIR,
    VAE_CHECKPOINT,
    WAV2VEC2_DIR,
    TinyT5Config,
    tiny_wav2vec2_config,
)
from .vae import WanVideoVAE

if TYPE_CHECKING:
    from .memory import ModelSizes

# Chooses the DiT's placement once the encoders are loaded and every model's size is known.
PlacementChoice = Callable[[DiTConfig, "ModelSizes"], Placement]
RANDOM_CHUNK_ELEMENTS = 1 << 26  # random draws of larger tensors go row-chunk by row-chunk (256 MB)

WAN_DIR = "Wan2.2-S2V-14B"
LORA_DIR = "LiveAvatar"


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of every file the engine reads, under one checkpoint root."""

    root: Path

    @property
    def wan(self) -> Path:
        return self.root / WAN_DIR

    @property
    def lora(self) -> Path:
        return self.root / LORA_DIR / LORA_NAME

    @property
    def text_encoder(self) -> Path:
        return self.wan / T5_CHECKPOINT

    @property
    def tokenizer(self) -> Path:
        return self.wan / T5_TOKENIZER_DIR

    @property
    def vae(self) -> Path:
        return self.wan / VAE_CHECKPOINT

    @property
    def wav2vec2(self) -> Path:
        return self.wan / WAV2VEC2_DIR

    def check(self) -> None:
        """Raise CheckpointError naming the first missing file, with the layout we expect."""
        needed = [
            self.wan / CONFIG_NAME,
            self.wan / INDEX_NAME,
            self.lora,
            self.text_encoder,
            self.tokenizer,
            self.vae,
            self.wav2vec2 / "config.json",
        ]
        for path in needed:
            if not path.exists():
                raise CheckpointError(
                    str(path),
                    f"not found; --checkpoint-dir must hold {WAN_DIR}/ (from Wan-AI/Wan2.2-S2V-14B) and "
                    f"{LORA_DIR}/{LORA_NAME} (from Quark-Vision/Live-Avatar)",
                )


@dataclass
class Components:
    """The loaded models. The DiT lives as its `placement` says, the VAE on the engine's device, the
    encoders in host memory (they visit the device as the config places them)."""

    dit: LiveAvatarDiT
    vae: WanVideoVAE
    text: TextEncoder
    audio: AudioFeatureExtractor
    weights: str  # "checkpoint" or "random"
    sizes: ModelSizes  # of the plain models (bf16 DiT), before fp8 or offload
    placement: Placement

    def encoders(self) -> list:
        return [self.text, self.audio]


def load_components(
    layout: CheckpointLayout, device: torch.device, dtype: torch.dtype, choose: PlacementChoice | None = None
) -> Components:
    """The official checkpoints. The VAE is cast on the host and then moved to `device`; umT5 (the
    memory-mapped file) and wav2vec2 stay on the host in `dtype`; then the DiT streams in with the LoRA
    merged, straight into the placement `choose` picks from the models' sizes (default: all on
    `device`, plain). No float32 copy of any model reaches the device."""
    layout.check()
    config = DiTConfig.from_json_file(layout.wan / CONFIG_NAME)
    vae = WanVideoVAE.load(layout.vae).to(dtype=dtype).to(device)
    model, text_config = load_umt5_encoder(layout.text_encoder)
    text = TextEncoder(
        model.to(dtype), load_tokenizer(layout.tokenizer), text_config, text_len=config.text_len
    )
    audio = AudioFeatureExtractor.load(layout.wav2vec2).to(dtype=dtype)
    _check_fit(config, text, audio, str(layout.wan))
    sizes, placement = _place(config, device, dtype, text, audio, vae, choose)
    dit = load_dit(
        layout.wan,
        layout.lora,
        device=device,
        dtype=dtype,
        fp8=placement.fp8,
        blocks_on_host=placement.blocks_on_host,
    )
    return Components(dit, vae, text, audio, "checkpoint", sizes, placement)


def _place(config, device, dtype, text, audio, vae, choose):
    from .memory import ModelSizes

    sizes = ModelSizes.from_models(build_empty(config, "meta", dtype), text.model, audio.model, vae.model)
    return sizes, (choose(config, sizes) if choose is not None else Placement(torch.device(device), dtype))


def random_components(
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    *,
    tiny: bool = False,
    choose: PlacementChoice | None = None,
) -> Components:
    """Seeded random weights: the official architectures at full size, or (`tiny`) the test-sized ones
    (DiT `DiTConfig.tiny`, VAE base width 8, 2-layer umT5 and wav2vec2). Each tensor is drawn on
    `device` and stored at once in its final dtype and place: the VAE on `device`, the encoders on the
    host, the DiT where `choose` says (`checkpoint.random_init`).

    Text goes through a deterministic word-hash tokenizer (no vocabulary ships with random weights)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    if tiny:
        audio_config = tiny_wav2vec2_config()
        config = DiTConfig.tiny(
            audio_layers=audio_config.num_hidden_layers + 1, audio_dim=audio_config.hidden_size
        )
        t5 = TinyT5Config()
        text_config = TextEncoderConfig(
            vocab_size=4096,
            dim=t5.dim,
            attn_dim=t5.dim,
            ffn_dim=t5.ffn_dim,
            num_heads=t5.num_heads,
            num_layers=t5.num_layers,
        )
        vae_width = 8
    else:
        config, text_config, vae_width = DiTConfig(), TextEncoderConfig(), 96
        audio_config = _xlsr53_config(Wav2Vec2Config, config)
    with torch.device("meta"):
        vae_model = AutoencoderKLWan(base_dim=vae_width, z_dim=16)
        text_model = UMT5EncoderModel(text_config.to_hf())
        audio_model = Wav2Vec2Model(audio_config)
    homes = (device, "cpu", "cpu")
    for i, (module, home) in enumerate(zip((vae_model, text_model, audio_model), homes, strict=True)):
        module.to(dtype).to_empty(device=home)
        random_fill(module, seed + 1 + i, work_device=device)
        module.eval().requires_grad_(False)
    text_model.encoder.embed_tokens = text_model.shared
    vae = WanVideoVAE(vae_model)
    text = TextEncoder(
        text_model, HashTokenizer(text_config.vocab_size), text_config, text_len=config.text_len
    )
    audio = AudioFeatureExtractor(audio_model)
    _check_fit(config, text, audio, "random weights")
    sizes, placement = _place(config, device, dtype, text, audio, vae, choose)
    dit = random_init(
        config, device, dtype, seed=seed, fp8=placement.fp8, blocks_on_host=placement.blocks_on_host
    )
    return Components(dit, vae, text, audio, "random", sizes, placement)


def _xlsr53_config(config_cls, dit_config: DiTConfig):
    """wav2vec2-large-xlsr-53's architecture (its width and depth are what the full DiT reads)."""
    return config_cls(
        hidden_size=dit_config.audio_dim,
        num_hidden_layers=dit_config.audio_layers - 1,
        num_attention_heads=16,
        intermediate_size=4 * dit_config.audio_dim,
        conv_dim=(512,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
    )


def random_fill(module: nn.Module, seed: int, work_device: torch.device | str | None = None) -> None:
    """Seeded weights that keep activations near unit scale: norms ~1, biases ~0, others N(0, 1/fan_in).

    Drawn in float32 on `work_device` (default: where the module is), row chunk by row chunk for large
    tensors, and cast into each parameter in place: one chunk is the only transient."""
    device = torch.device(work_device or next(module.parameters()).device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm = p.ndim <= 1 and re.search(r"norm|gamma|scale", name) or name.endswith("gamma")
            rows = max(1, RANDOM_CHUNK_ELEMENTS // max(1, p[0].numel())) if p.ndim else 1
            for start in range(0, p.shape[0] if p.ndim else 1, rows):
                target = p[start : start + rows] if p.ndim else p
                if norm:
                    draw = 1.0 + 0.1 * torch.randn(target.shape, generator=generator, device=device)
                else:
                    draw = torch.empty(target.shape, dtype=torch.float32, device=device)
                    std = 0.02 if p.ndim <= 1 else max(1, p[0].numel()) ** -0.5
                    draw.normal_(0.0, std, generator=generator)
                target.copy_(draw)
                del draw
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()


def _check_fit(config: DiTConfig, text: TextEncoder, audio: AudioFeatureExtractor, source: str) -> None:
    """The encoders' widths must be what the DiT reads."""
    if text.config.dim != config.text_dim:
        raise CheckpointError(
            source, f"text encoder width {text.config.dim}, the DiT reads {config.text_dim}"
        )
    hidden = audio.model.config.hidden_size
    if (audio.num_states, hidden) != (config.audio_layers, config.audio_dim):
        raise CheckpointError(
            source,
            f"wav2vec2 gives {audio.num_states} states of {hidden}, the DiT reads {config.audio_layers} of {config.audio_dim}",
        )


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise CheckpointError(str(folder), "umT5 tokenizer folder not found")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of the cleaned prompt plus </s>, before the encoder's truncation to 512."""
    return len(tokenizer([clean_prompt(text)], add_special_tokens=True).input_ids[0])


class HashTokenizer:
    """Random-weights stand-in for the umT5 tokenizer: each word hashes to an id, then </s> (id 1).

    Deterministic across processes (no Python hash randomisation); callable like a transformers tokenizer
    for what `TextEncoder` asks of it."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        import zlib

        return [3 + zlib.crc32(word.encode()) % (self.vocab_size - 3) for word in text.split()] + [1]

    def __call__(
        self, texts, add_special_tokens=True, truncation=False, max_length=None, return_tensors=None
    ):
        ids = [self._ids(t) for t in texts]
        if truncation and max_length:
            ids = [i[:max_length] for i in ids]

        class Encoded:
            input_ids = torch.tensor(ids) if return_tensors == "pt" else ids

        return Encoded()


__all__ = [
    "CheckpointLayout",
    "Components",
    "HashTokenizer",
    "count_tokens",
    "load_components",
    "load_tokenizer",
    "random_components",
    "random_fill",
]
