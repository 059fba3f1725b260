"""Peak device memory of one segment, from shapes alone (no model needs to be loaded).

The block loop is the peak phase. What is resident then:

| part | bytes (704x384, 4 steps, bf16) |
|---|---|
| DiT weights (bf16; fp8 linears: 1 byte; offload: non-block weights + 2 block slots) | 32.6 GB / 17 GB |
| text encoder, unless `offload_encoders` (then it runs on the host, once per prompt) | 11.4 GB |
| wav2vec2 (resident, or visiting the device chunk by chunk when offloaded) | 0.6 GB |
| VAE weights and the streaming decoder's causal cache | 0.25 + 1.2 GB |
| the prompt's cross-attention K/V (all layers, 512 tokens) | 0.4 GB |
| cond (sink) cache: 2.5·fsl tokens x layers x (k, v) | 2.2 GB |
| step rings: steps x 9 latent frames x fsl x layers x (k, v), or 2 prefetched layers if offloaded | 31.1 GB |
| rotary tables the DiT keeps for forwards that repeat them (16) | 0.03 GB |
| CUDA graphs' pool, when block forwards are graphed: one forward's activations, its static inputs | 0.8 GB |
| transient: a block forward's activations, one VAE decoder call (4 latents on the compiled fast path; both with overlap_decode), or loading's one tensor | ~1-5 GB |

Loading puts every weight straight where the first segment's rung wants it (`checkpoint.Placement`),
one tensor at a time, so the loading peak is the weights plus one tensor's transient copies (the
largest LoRA-merged weight in float32 plus its bf16 cast): below the loop's peak, and counted in the
transient term so the estimate covers it. Before the loop, the portrait encode and the prompt encode
have their own, smaller peaks.

`cap_device_memory` makes a budget a hard limit of this process's CUDA allocator, so exceeding it is a
real out-of-memory error, not a number compared with the estimate. The activation
and decode terms are first-order models of what our code allocates; the GPU benchmark reports the
estimate against the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..base import GenerationConfig
from .backends import fp8_linear_names
from .config import DiTConfig
from .framepack import cond_token_count
from .kv_cache import kv_bytes_per_token
from .order import sweep_state_bytes
from .ring import ring_capacity_frames
from .rope import ROPE_TABLES_KEPT
from .text_encoder import TextEncoderConfig
from .vae import decoder_state_nbytes
from .vae_decode import DIFFUSERS, DecodeOptions, decode_options


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the models' weights as the engine holds them (compute dtype unless noted)."""

    dit: int  # the whole DiT (float32 modules at 4 bytes)
    dit_fp8_saving: int  # bytes fp8 saves (converted linears: itemsize - 1 byte each)
    dit_blocks: int  # all blocks together
    dit_block_slot: int  # one weight-offload slot: the largest block (one with an audio injector)
    text_encoder: int
    audio_encoder: int
    vae: int
    vae_base_dim: int = 96

    @classmethod
    def from_models(
        cls, dit: torch.nn.Module, text: torch.nn.Module, audio: torch.nn.Module, vae: torch.nn.Module
    ) -> ModelSizes:
        """Measured off loaded models (in whatever state they are: count them before fp8/offload)."""
        itemsize = dit.compute_dtype.itemsize
        linears = fp8_linear_names(dit)
        saving = sum(dit.get_submodule(n).weight.numel() * (itemsize - 1) for n in linears)
        blocks = [_nbytes(b) for b in dit.blocks]
        base_dim = int(vae.decoder.conv_out.weight.shape[1]) if hasattr(vae, "decoder") else 96
        return cls(
            _nbytes(dit),
            saving,
            sum(blocks),
            max(blocks),
            _nbytes(text),
            _nbytes(audio),
            _nbytes(vae),
            base_dim,
        )

    @classmethod
    def from_shapes(cls, dit_config: DiTConfig, dtype: torch.dtype = torch.bfloat16) -> ModelSizes:
        """The official models at `dit_config`'s DiT size, built on the meta device (no memory)."""
        return _sizes_from_shapes(dit_config, dtype)


@lru_cache(maxsize=8)
def _sizes_from_shapes(dit_config: DiTConfig, dtype: torch.dtype) -> ModelSizes:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    from .checkpoint import build_empty
    from .components import _xlsr53_config

    dit = build_empty(dit_config, "meta", dtype)
    with torch.device("meta"):
        text = UMT5EncoderModel(TextEncoderConfig().to_hf()).to(dtype)
        text.encoder.embed_tokens = text.shared
        audio = Wav2Vec2Model(_xlsr53_config(Wav2Vec2Config, dit_config)).to(dtype)
        vae = AutoencoderKLWan(base_dim=96, z_dim=16).to(dtype)
    return ModelSizes.from_models(dit, text, audio, vae)


def _nbytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part at the peak phase, and the total (what `Engine.estimate_memory` returns)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def saving_memory(config: GenerationConfig) -> bool:
    """Whether `config` is one of the ladder's memory-saving rungs (weights or rings off the GPU)."""
    return config.offload_weights or config.offload_kv_cache


def estimate_memory(
    config: GenerationConfig,
    dit: DiTConfig,
    sizes: ModelSizes,
    dtype: torch.dtype = torch.bfloat16,
    blocks: int | None = None,
) -> MemoryEstimate:
    """Peak device bytes of one segment of `blocks` blocks (None: any length) generated with `config`
    (see the module docstring); in sweep order, groups hold at most `config.sweep_blocks` blocks."""
    b = dtype.itemsize
    h, w = config.height // 8, config.width // 8
    fsl = dit.tokens_per_frame(h, w)
    per_token = kv_bytes_per_token(dit, dtype)  # keys + values, all layers
    cond_tokens = cond_token_count(dit, h, w)
    ring_tokens = ring_capacity_frames(dit) * fsl

    weights = sizes.dit - (sizes.dit_fp8_saving if config.fp8 else 0)
    if config.offload_weights:
        slot = sizes.dit_block_slot
        if config.fp8:
            slot -= sizes.dit_fp8_saving // dit.num_layers  # fp8 slots hold 1-byte linears
        weights = weights - (sizes.dit_blocks - (sizes.dit_fp8_saving if config.fp8 else 0)) + 2 * slot
    parts = {"dit_weights": weights, "vae_weights": sizes.vae, "audio_encoder": sizes.audio_encoder}
    if not config.offload_encoders:
        parts["text_encoder"] = sizes.text_encoder
    parts["text_context"] = 2 * dit.num_layers * dit.text_len * dit.dim * b
    parts["cond_cache"] = cond_tokens * per_token
    if config.offload_kv_cache:  # one layer being read and the next being prefetched (k and v)
        parts["kv_rings"] = 2 * 2 * ring_tokens * dit.dim * b
    else:
        parts["kv_rings"] = config.steps * ring_tokens * per_token
    if config.order == "sweep":  # every block's hidden state between layers (a longest group)
        group = config.sweep_blocks if blocks is None else min(config.sweep_blocks, blocks)
        parts["sweep_state"] = sweep_state_bytes(dit, h, w, group, b)
    parts["rope_tables"] = ROPE_TABLES_KEPT * max(dit.block_frames * fsl, cond_tokens) * dit.head_dim * 4
    parts["vae_decoder_cache"] = _decoder_state_nbytes(config.height, config.width, dtype, sizes.vae_base_dim)
    block = block_activation_bytes(dit, fsl, cond_tokens, b)
    if config.cuda_graphs:  # the graphs' pool keeps one block forward's activations, and their inputs
        parts["graph_pool"] = block + 2 * dit.block_frames * fsl * dit.dim * b
    decoding = decode_options(bool(config.compile), saving_memory(config))
    decode = decode_workspace_bytes(config.height, config.width, b, sizes.vae_base_dim, decoding)
    # A block decoding on the side stream while the next one's DiT runs: both working sets at once.
    working = block + decode if config.overlap_decode else max(block, decode)
    parts["transient"] = max(working, load_transient_bytes(dit, b))
    return MemoryEstimate(parts)


@lru_cache(maxsize=64)
def _decoder_state_nbytes(height: int, width: int, dtype: torch.dtype, base_dim: int) -> int:
    return decoder_state_nbytes(height, width, dtype, base_dim)  # runs the decoder on meta tensors


def block_activation_bytes(dit: DiTConfig, fsl: int, cond_tokens: int, b: int) -> int:
    """Live tensors at the peak of one block forward (self-attention of the largest context).

    n = 3·fsl query tokens attend to the ring's window, themselves and the sink, each part apart
    (`attend_parts`). At that point: the residual stream and its normed copy in float32, q/k/v, the
    float32 RoPE'd q and k, the three parts' outputs and their float32 merge, the sink keys RoPE'd in
    float32, the attention output; the FFN's hidden (ffn_dim wide, twice around the GELU) comes later
    and is counted if larger."""
    n = dit.block_frames * fsl
    d = dit.dim
    attention = n * d * (4 + 4 + 3 * b + 2 * 4 + b) + 3 * n * d * (b + 4) + cond_tokens * d * (4 + b)
    ffn = n * d * (4 + 4 + b) + 2 * n * dit.ffn_dim * b
    return max(attention, ffn)


def load_transient_bytes(dit: DiTConfig, b: int) -> int:
    """Loading's transient beyond the weights: the largest LoRA-merged weight (the FFN's) in float32,
    its cast to the model dtype, and (fp8) the float32 copy quantised in place."""
    return dit.ffn_dim * dit.dim * (4 + b + 4)


def cap_device_memory(device: torch.device, budget_bytes: int | None) -> float | None:
    """Make `budget_bytes` the most this process's CUDA allocator may hold on `device` (None: the whole
    device). Returns the fraction set, or None off CUDA (nothing to cap). Call it before loading: a
    cap set after the weights are resident cannot move them."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if budget_bytes is None else min(1.0, budget_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def decode_workspace_bytes(
    height: int, width: int, b: int, base_dim: int = 96, options: DecodeOptions = DIFFUSERS
) -> int:
    """One VAE decoder call at full resolution (frames of `base_dim` channels). diffusers' loop takes one
    latent (4 frames): a causal conv holds its input with 2 cached frames prepended, its output, and a
    float32 norm in between. The fused path (`vae_decode`) takes up to `options.chunk` latents a call
    and holds about six model-dtype copies of their frames (4.6 GiB at 704x384 in bf16 with 4 latents:
    calibrated on the measured peaks of docs/benchmarks.md, issue 12 round 4)."""
    frame = base_dim * height * width
    if options.fused:
        return options.chunk * 4 * frame * 6 * b
    return frame * (6 * b + 4 * b + 4 * 4)


__all__ = [
    "MemoryEstimate",
    "cap_device_memory",
    "load_transient_bytes",
    "ModelSizes",
    "block_activation_bytes",
    "decode_workspace_bytes",
    "saving_memory",
    "estimate_memory",
]
