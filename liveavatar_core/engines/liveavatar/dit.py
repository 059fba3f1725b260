"""The causal speech-to-video DiT of LiveAvatar (Wan2.2-S2V-14B architecture), written for streaming.

Per job the pipeline calls, in this order:

1. `embed_text(text_states)` once: text tokens -> per-layer cross-attention K/V (`TextContext`).
2. `forward_sink(reference_latent, motion_latents, text, cond_cache)`: a t = 0 forward, without audio,
   over the reference latent + FramePack motion tokens, which fills the cond K/V cache.
3. For every block of `block_frames` latent frames (absolute index `frame_index`, 0, 3, 6, …):
   `encode_audio(features)` once, then for each denoising step i:
   `forward_block(noisy, t_i, frame_index=…, sink_distance=…, …, ring_cache=rings[i])` -> flow
   prediction; it also writes the block's K/V into step i's ring cache (`write_cache=True`).
   Or, in sweep order, `forward_sweep` runs step i of many consecutive blocks layer by layer.
   Which of the two runs, and when, is decided by `order.py`.

Token layout: a latent [B, 16, F, H, W] becomes F·(H/2)·(W/2) tokens, frame-major. Every block is
`x += gate·SelfAttn(mod(norm1 x)); x += CrossAttn(norm3 x, text); x += gate·FFN(mod(norm2 x))`, with
per-frame modulation from the timestep, then (at 12 layers) `x += AudioInjector(x, audio)`.
The official tensor names map onto this module tree as described in `checkpoint.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .chains import EAGER, Stored
from .config import DiTConfig
from .dit_audio import AudioInjector, AudioTokens, CausalAudioEncoder
from .framepack import FramePack
from .graphs import BlockGraphs
from .kv_cache import CondKVCache, RingKVCache, contiguous_runs
from .layers import Attention, LayerNorm32, attend, attend_parts, input_dtype, sinusoidal_embedding
from .rope import (
    ROPE_TABLES_KEPT,
    RopeTable,
    block_positions,
    cond_positions,
    reference_frame_for_block,
    rope_table,
)

# Parameters the official model computes in float32 under autocast (timestep MLPs, head, audio
# encoder); the loader keeps them in float32 whatever the model dtype (about 0.6 GB at full size).
FLOAT32_MODULES = ("time_embedding", "time_projection", "head.head", "audio_encoder")

# trainable_cond_mask rows: which kind of token a row is added to.
NOISY, REFERENCE, MOTION = 0, 1, 2


class TextContext(NamedTuple):
    """Cross-attention keys/values of the (zero-padded) prompt for every layer, computed once per job."""

    k: torch.Tensor  # [layers, B, text_len, heads, head_dim]
    v: torch.Tensor


class SelfContext(NamedTuple):
    """What a block's tokens attend to besides themselves (block mode)."""

    ring_k: list[torch.Tensor]  # the window's runs of contiguous ring slots: [B, n, H, D] each
    ring_v: list[torch.Tensor]
    cond_k: torch.Tensor  # sink keys without RoPE [B, Lc, H, D]
    cond_v: torch.Tensor
    cond_rope: RopeTable  # the sink's rotary table for this block's position


class BlockInputs(NamedTuple):
    """A block forward's inputs to the layer loop (see `LiveAvatarDiT.prepare_block`)."""

    x: torch.Tensor  # [B, F·h·w, dim] tokens, compute dtype
    rope: RopeTable  # the block's tokens
    cond_rope: RopeTable  # the sink tokens, placed for this block
    e: torch.Tensor  # float32 [B, F, dim], for the head
    e0: torch.Tensor  # float32 [B, F, 6, dim], for the blocks
    grid: tuple[int, int, int]  # (F, h, w)


class DiTBlock(nn.Module):
    chains = EAGER

    def __init__(self, config: DiTConfig, with_audio: bool):
        super().__init__()
        dim = config.dim
        self.norm1 = LayerNorm32(dim, config.eps, elementwise_affine=False)
        self.self_attn = Attention(config)
        self.norm3 = LayerNorm32(dim, config.eps, elementwise_affine=True)  # before text attention
        self.cross_attn = Attention(config)
        self.norm2 = LayerNorm32(dim, config.eps, elementwise_affine=False)
        # The official module layout (ffn.0, ffn.2); `forward` runs the GELU as a chain (`chains.gelu`).
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        # shift/scale/gate for self-attention, then for the FFN; added to the timestep projection.
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.audio = AudioInjector(config) if with_audio else None

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        rope: RopeTable,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        context: SelfContext | None,
        audio: AudioTokens | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, dim] in the compute dtype, N = G groups (latent frames) of S tokens; t_mod float32
        [B, G, 6, dim]. context None is the sink forward: tokens attend only among themselves.

        Returns the new x and this call's keys/values [B, N, H, D] for a cache: with RoPE in block mode
        (ring cache), without in sink mode (cond cache)."""
        mod = (self.modulation.float().unsqueeze(0) + t_mod).unsqueeze(3)  # [B, G, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # [B, G, 1, dim] each
        chains, eps, dtype = self.chains, self.norm1.eps, x.dtype
        attn, text_attn, (up, _, down) = self.self_attn, self.cross_attn, self.ffn
        # Each chain stores its result as the linear it feeds takes it (e4m3 rows for fp8, see chains.py).

        # Self-attention; the residual stream is float32 inside the block.
        h = chains.modulated_norm(x, shift1, scale1, eps, input_dtype(attn.q, x))
        y, k, v = self._self_attention(h, dtype, rope, context)
        norm3 = self.norm3
        x32, h = chains.residual_then_norm(
            x, y, gate1, norm3.weight, norm3.bias, norm3.eps, input_dtype(text_attn.q, x)
        )

        # Text cross-attention (no modulation, affine norm).
        y = text_attn.out(attend(text_attn.queries(h), text_k, text_v))
        x32, h = chains.add_then_modulated_norm(x32, y, shift2, scale2, eps, input_dtype(up, x))

        # Feed-forward; the stream is rounded to x's dtype as it leaves the block.
        y = down(chains.gelu(up(h), input_dtype(down, x)))
        x = chains.gated_residual(x32, y, gate2, dtype)
        if self.audio is not None and audio is not None:
            x = self.audio(x, audio)
        return x, k, v

    def _self_attention(
        self, h: Stored, dtype: torch.dtype, rope: RopeTable, context: SelfContext | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: the normed block input (as the projections take it); dtype: the activations'."""
        attn, chains = self.self_attn, self.chains
        if context is None:  # sink: among themselves; the cache keeps keys without RoPE
            q = attn.queries(h)
            k_raw, v = attn.keys_values(h)
            k = chains.apply_rope(k_raw, rope, dtype)
            return attn.out(attend(chains.apply_rope(q, rope, dtype), k, v)), k_raw, v
        heads = attn.num_heads
        q = chains.rms_rope(attn.q(h), attn.norm_q.weight, attn.norm_q.eps, rope, heads)
        k = chains.rms_rope(attn.k(h), attn.norm_k.weight, attn.norm_k.eps, rope, heads)
        v = attn.v(h).unflatten(-1, (heads, -1))
        cond_k = chains.apply_rope(context.cond_k, context.cond_rope, dtype)
        parts = [*zip(context.ring_k, context.ring_v, strict=True), (k, v), (cond_k, context.cond_v)]
        return attn.out(attend_parts(q, parts, chains, input_dtype(attn.o, q))), k, v


class Head(nn.Module):
    """Per-frame modulated LayerNorm, then a linear map to patch pixels (1·2·2·out_dim per token)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_dim * 4)
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, F·S, dim], e float32 [B, F, dim] -> float32 [B, F·S, 4·out_dim]."""
        b, n, dim = x.shape
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)  # [B, F, dim]
        h = self.norm(x).reshape(b, e.shape[1], -1, dim).float() * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.head(h.reshape(b, n, dim).to(self.head.weight.dtype)).float()


class LiveAvatarDiT(nn.Module):
    """The causal S2V DiT. Build with `checkpoint.load_dit` or `checkpoint.random_init`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cond_encoder = nn.Conv3d(
            config.cond_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.trainable_cond_mask = nn.Embedding(3, dim)  # rows NOISY, REFERENCE, MOTION
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        inject = set(config.audio_inject_layers)
        self.blocks = nn.ModuleList(DiTBlock(config, i in inject) for i in range(config.num_layers))
        self.head = Head(config)
        self.audio_encoder = CausalAudioEncoder(config)
        self.frame_packer = FramePack(config)
        self._rope_tables: OrderedDict[tuple, RopeTable] = OrderedDict()
        self.graphs: BlockGraphs | None = None  # block forwards replayed as CUDA graphs (graphs.py)

    # --- dtype/device of the activations: those of the patch embedding (never quantised) ---
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # --- per-job and per-block conditioning ---
    @torch.no_grad()
    def embed_text(self, text_states: Sequence[torch.Tensor] | torch.Tensor) -> TextContext:
        """Prompt encoder states -> per-layer cross-attention K/V.

        text_states: one [L_i, text_dim] tensor per batch item holding only the real tokens (or a
        [B, L, text_dim] tensor whose L tokens are all real). Like the official model, each item is
        zero-padded to `text_len` and every one of the text_len positions is attended to.
        """
        cfg = self.config
        items = list(text_states.unbind(0)) if isinstance(text_states, torch.Tensor) else list(text_states)
        padded = torch.zeros(
            len(items), cfg.text_len, cfg.text_dim, device=self.device, dtype=self.compute_dtype
        )
        for i, states in enumerate(items):
            if states.ndim != 2 or states.shape[1] != cfg.text_dim or states.shape[0] > cfg.text_len:
                raise ValueError(
                    f"text states must be [<= {cfg.text_len}, {cfg.text_dim}], got {tuple(states.shape)}"
                )
            padded[i, : states.shape[0]] = states
        context = self.text_embedding(padded)
        keys, values = zip(*(block.cross_attn.keys_values(context) for block in self.blocks), strict=True)
        return TextContext(torch.stack(keys), torch.stack(values))

    @torch.no_grad()
    def encode_audio(self, features: torch.Tensor) -> AudioTokens:
        """wav2vec2 states of one block's video frames [B, audio_layers, audio_dim, 4·block_frames]
        -> AudioTokens for the block's latent frames.

        Like the official model, the block is encoded on its own, after `motion_frames` (73) copies of
        its first frame; the outputs covering that prefix are dropped.
        """
        if features.ndim != 4 or features.shape[1] != self.config.audio_layers:
            raise ValueError(
                f"audio features must be [B, {self.config.audio_layers}, audio_dim, frames], got {tuple(features.shape)}"
            )
        prefix = features[..., :1].expand(*features.shape[:3], self.config.motion_frames)
        encoded = self.audio_encoder(torch.cat([prefix, features], dim=-1))
        keep = slice(self.config.audio_prefix_latents, None)
        return AudioTokens(encoded.tokens[:, keep], encoded.global_[:, keep])

    def timestep_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, F] -> (e [B, F, dim] for the head, e0 [B, F, 6, dim] for the blocks), float32."""
        features = sinusoidal_embedding(self.config.freq_dim, t).float()
        first = self.time_embedding[0]
        e = self.time_embedding(features.to(first.weight.dtype)).float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape).unflatten(-1, (6, self.config.dim))

    def _patchify(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, F, H, W] -> tokens [B, F·h·w, dim], grid (F, h, w)."""
        x = self.patch_embedding(latents.to(self.device, self.compute_dtype))
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])

    # --- the two forwards ---
    @torch.no_grad()
    def forward_sink(
        self,
        reference_latent: torch.Tensor,
        motion_latents: torch.Tensor,
        text: TextContext,
        cond_cache: CondKVCache,
    ) -> None:
        """Fill `cond_cache` with every layer's K/V of the sink tokens (t = 0, no audio).

        reference_latent [B, 16, 1, H, W]; motion_latents [B, 16, T, H, W] (the last 19 are used).
        The reference latent sits at RoPE frame `ref_frame_position` (30), motion at negative frames.
        """
        cfg = self.config
        cfg.check_latent_size(*reference_latent.shape[-2:])
        ref, (_, h, w) = self._patchify(reference_latent)
        motion = self.frame_packer(motion_latents.to(self.device))
        mask = self.trainable_cond_mask.weight.to(self.compute_dtype)
        x = torch.cat([ref + mask[REFERENCE], motion + mask[MOTION]], dim=1)  # [B, Lc, dim]
        rope = rope_table(cfg, cond_positions(cfg, cfg.ref_frame_position, h, w), self.device)
        _, e0 = self.timestep_embedding(torch.zeros(x.shape[0], 1, device=self.device))
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, e0, rope, text.k[i], text.v[i], context=None, audio=None)
            cond_cache.write(i, k, v)
        cond_cache.length = x.shape[1]

    @torch.no_grad()
    def forward_block(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        frame_index: int,
        sink_distance: int,
        text: TextContext,
        audio: AudioTokens,
        cond_cache: CondKVCache,
        ring_cache: RingKVCache,
        write_cache: bool = True,
        pose_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow prediction for one block of noisy latents [B, 16, F, H, W] at `timestep`.

        frame_index: absolute latent frame of the block's first frame since the job started (RoPE
        position and ring slot). sink_distance: how many frames ahead of the block the reference
        latent is placed (the official code draws randint(4, 30) per forward; seed it).
        ring_cache: this denoising step's cache; with write_cache the block's K/V are stored in it
        (the official model does this on every step's forward: no separate clean pass).
        pose_latents: optional [B, cond_dim, F, H, W]; None means zeros (no pose video).
        Returns float32 [B, out_dim, F, H, W].
        """
        inputs = self.prepare_block(noisy, timestep, frame_index, sink_distance, pose_latents)
        if audio.tokens.shape[1] != inputs.grid[0]:
            raise ValueError(
                f"audio covers {audio.tokens.shape[1]} latent frames, the block has {inputs.grid[0]}"
            )
        audio = audio.to(self.device, self.compute_dtype)
        frames = inputs.grid[0]
        runs = contiguous_runs(*ring_cache.context_ranges(frame_index, frames))

        def layers(x, e0, rope_cos, rope_sin, cond_cos, cond_sin, audio_tokens, audio_global):
            rope, cond_rope = RopeTable(rope_cos, rope_sin), RopeTable(cond_cos, cond_sin)
            audio = AudioTokens(audio_tokens, audio_global)
            ring_cache.prefetch(0, [runs])
            for i, block in enumerate(self.blocks):
                ring_cache.prefetch(i + 1, [runs])  # copied while this layer computes
                ring_k, ring_v = ring_cache.read(i, runs, self.device)
                cond_k, cond_v = cond_cache.read(i, self.device)
                context = SelfContext(ring_k, ring_v, cond_k, cond_v, cond_rope)
                x, k, v = block(x, e0, rope, text.k[i], text.v[i], context, audio)
                if write_cache:
                    ring_cache.write(i, frame_index, k, v)
            return x

        args = [inputs.x, inputs.e0, *inputs.rope, *inputs.cond_rope, audio.tokens, audio.global_]
        if self.graphs is not None and isinstance(ring_cache, RingKVCache) and ring_cache.k.is_cuda:
            slot = ring_cache.first_slot(frame_index, frames)
            baked = (text.k, text.v, cond_cache.k, cond_cache.v, ring_cache.k, ring_cache.v)
            structure = (tuple(len(r) for r in runs), cond_cache.length, write_cache)
            key = (*(t.data_ptr() for t in baked), tuple(runs), slot, structure)
            x = self.graphs.run(key, structure, layers, args)
        else:
            x = layers(*args)
        if write_cache:
            ring_cache.commit(frame_index, frames)
        return self.finish_block(x, inputs)

    @torch.no_grad()
    def forward_sweep(
        self,
        noisy: Sequence[torch.Tensor],
        timestep: torch.Tensor | float,
        *,
        frame_indices: Sequence[int],
        sink_distances: Sequence[int],
        text: TextContext,
        audio: Sequence[AudioTokens],
        cond_cache: CondKVCache,
        ring_cache: RingKVCache,
    ) -> list[torch.Tensor]:
        """`forward_block` of consecutive blocks at one step, layer by layer: every block passes layer l
        before any block enters layer l+1, so each layer's weights are used once per sweep (and, when
        streamed, cross to the device once). Block j at layer l attends to what blocks j-3..j-1 wrote
        into layer l of `ring_cache` (in this sweep, or before it), exactly as in block order; the blocks
        are committed to the ring after the last layer. Returns each block's float32 flow prediction."""
        inputs = [
            self.prepare_block(x, timestep, f, d)
            for x, f, d in zip(noisy, frame_indices, sink_distances, strict=True)
        ]
        frames = inputs[0].grid[0]
        audio = [a.to(self.device, self.compute_dtype) for a in audio]
        plan = [contiguous_runs(*ranges) for ranges in ring_cache.context_plan(list(frame_indices), frames)]
        xs = [block_inputs.x for block_inputs in inputs]
        inputs = [block_inputs._replace(x=None) for block_inputs in inputs]  # one copy of the tokens
        layers = len(self.blocks)
        for i, block in enumerate(self.blocks):
            ring = ring_cache.open_layer(i, i + 1 if i + 1 < layers else None)
            cond_k, cond_v = cond_cache.read(i, self.device)
            for j, (block_inputs, runs) in enumerate(zip(inputs, plan, strict=True)):
                ring_k, ring_v = ring.read(0, runs, self.device)
                context = SelfContext(ring_k, ring_v, cond_k, cond_v, block_inputs.cond_rope)
                xs[j], k, v = block(
                    xs[j], block_inputs.e0, block_inputs.rope, text.k[i], text.v[i], context, audio[j]
                )
                ring.write(0, frame_indices[j], k, v)
            ring_cache.close_layer(i, ring)
        for frame_index in frame_indices:
            ring_cache.commit(frame_index, frames)
        return [self.finish_block(x, block_inputs) for x, block_inputs in zip(xs, inputs, strict=True)]

    def prepare_block(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor | float,
        frame_index: int,
        sink_distance: int,
        pose_latents: torch.Tensor | None = None,
    ) -> BlockInputs:
        """Everything `forward_block` computes before the layers: tokens, RoPE tables, modulation."""
        cfg = self.config
        b, _, frames, lat_h, lat_w = noisy.shape
        cfg.check_latent_size(lat_h, lat_w)
        x, (_, h, w) = self._patchify(noisy)
        if pose_latents is None:  # the official pipeline feeds zeros; conv of zeros is the bias
            x = x + self.cond_encoder.bias
        else:
            pose = self.cond_encoder(pose_latents.to(self.device, self.compute_dtype))
            x = x + pose.flatten(2).transpose(1, 2)
        x = x + self.trainable_cond_mask.weight[NOISY].to(x.dtype)

        rope = self._rope(
            ("block", frame_index, frames, h, w), lambda: block_positions(frame_index, frames, h, w)
        )
        reference_frame = reference_frame_for_block(cfg, frame_index, sink_distance)
        cond_rope = self._rope(
            ("cond", reference_frame, h, w), lambda: cond_positions(cfg, reference_frame, h, w)
        )
        # Timesteps are float32 in the official scheduler (857.7 is 857.7000122…); round like it. A
        # number is filled in on the device (a copy from the host would wait for the GPU).
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(self.device, torch.float32).double()
        else:
            t = torch.full((), timestep, dtype=torch.float32, device=self.device).double()
        t = t if t.ndim == 2 else t.reshape(-1, 1)
        e, e0 = self.timestep_embedding(t.expand(b, frames))  # one timestep per latent frame
        return BlockInputs(x, rope, cond_rope, e, e0, (frames, h, w))

    def _rope(self, key: tuple, positions: Callable[[], np.ndarray]) -> RopeTable:
        """The rotary table of `positions()`, kept on the device for the forwards that repeat it (a
        block's every step; sink positions recur from block to block): the last `ROPE_TABLES_KEPT`."""
        key = (*key, str(self.device))
        table = self._rope_tables.pop(key, None)
        if table is None:
            table = rope_table(self.config, positions(), self.device)
        self._rope_tables[key] = table
        while len(self._rope_tables) > ROPE_TABLES_KEPT:
            self._rope_tables.popitem(last=False)
        return table

    def finish_block(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """Head and unpatchify: tokens after the last layer -> float32 [B, out_dim, F, H, W]."""
        return self._unpatchify(self.head(x, inputs.e), inputs.grid)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, F·h·w, 4·C] -> [B, C, F, 2h, 2w]; each token's channels are ordered (p, q, r, C)."""
        f, h, w = grid
        _, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, ph, pw, self.config.out_dim)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)  # [B, C, F, h, ph, w, pw]
        return x.reshape(x.shape[0], self.config.out_dim, f, h * ph, w * pw)
