"""Tiny, seeded stand-ins for the encoder checkpoints, written in the official layouts.

No real weights can be downloaded here, so tests (and a `random_weights` engine) load these instead:

* `models_t5_umt5-xxl-enc-bf16.pth`: a torch state dict with Wan's own T5 key names (t5.py's T5Encoder,
  per-layer relative position embeddings), plus `google/umt5-xxl/`, a tokenizer folder with a tiny
  Unigram vocabulary in umT5's special-token layout (<pad>=0, </s>=1, <unk>=2; </s> appended).
* `Wan2.1_VAE.pth`: a state dict with the original vae2_1.py key names, Wan2.1's structure (4 levels,
  2 residual blocks, temporal downsampling in levels 2 and 3, z=16) at a small base width.
* `wav2vec2-large-xlsr-53-english/`: an HF folder (config, weights, preprocessor_config.json and the
  CTC tokenizer files Wav2Vec2Processor wants), same conv strides as the real model (16 kHz -> 50 Hz),
  layer-norm feature extractor and stable layer norm like xlsr-53, tiny widths.

The layouts are enumerated here from reading the reference modules, independently of the loaders'
renaming rules, so loading these checks the rules rather than repeating them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"

# ---------------------------------------------------------------------------------------------------------
# umT5 encoder (Wan key names) + tokenizer
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyT5Config:
    dim: int = 32
    ffn_dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    num_buckets: int = 32  # as umT5-XXL, so the bucketing is exercised as in the real model


def tiny_vocabulary() -> list[tuple[str, float]]:
    """A small Unigram vocabulary: specials, then '▁'-prefixed words, single characters, a few pieces."""
    words = (
        "a an the is are and of in on with to for at by as it his her their person man woman speaking "
        "talking lecture professor teacher stands sits desk room office light warm bright camera looks "
        "smiles hands explains slowly clearly natural background wall window books face eyes hair"
    ).split()
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-&"
    pieces = ["ing", "ed", "er", "ly", "es", "s", "tion"]
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -5.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [(p, -7.0 - 0.01 * i) for i, p in enumerate(pieces)]
    vocab += [(c, -9.0 - 0.001 * i) for i, c in enumerate(chars)]
    vocab += [(f"▁{c}", -9.5 - 0.001 * i) for i, c in enumerate(chars)]
    return vocab


def write_tiny_t5_tokenizer(folder: Path) -> Path:
    """Save a T5 (Unigram, Metaspace) tokenizer with the tiny vocabulary to `folder`."""
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = T5Tokenizer(vocab=tiny_vocabulary(), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    # The official folder's config predates transformers 5; write that form so older releases (the
    # reference pins 4.51) read the folder too. tokenizer.json carries the vocabulary and templates.
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return folder


def wan_t5_layout(vocab_size: int, config: TinyT5Config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of Wan's umT5 encoder (t5.py: T5Encoder with shared_pos=False)."""
    d, f, h = config.dim, config.ffn_dim, config.num_heads
    layout: dict[str, tuple[int, ...]] = {"token_embedding.weight": (vocab_size, d)}
    for i in range(config.num_layers):
        b = f"blocks.{i}"
        layout[f"{b}.norm1.weight"] = (d,)
        for proj in "qkv":
            layout[f"{b}.attn.{proj}.weight"] = (d, d)  # dim_attn == dim in umT5-XXL
        layout[f"{b}.attn.o.weight"] = (d, d)
        layout[f"{b}.norm2.weight"] = (d,)
        layout[f"{b}.ffn.gate.0.weight"] = (f, d)  # gate: Linear then tanh-GELU
        layout[f"{b}.ffn.fc1.weight"] = (f, d)
        layout[f"{b}.ffn.fc2.weight"] = (d, f)
        layout[f"{b}.pos_embedding.embedding.weight"] = (config.num_buckets, h)
    layout["norm.weight"] = (d,)
    return layout


def write_tiny_t5(
    folder: Path, *, seed: int = 0, config: TinyT5Config = TinyT5Config(), dtype: torch.dtype = torch.bfloat16
) -> tuple[Path, Path]:
    """Write the tiny Wan-format umT5 checkpoint and its tokenizer folder; returns (checkpoint, tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tiny_t5_tokenizer(folder / T5_TOKENIZER_DIR)
    vocab_size = len(tiny_vocabulary())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in wan_t5_layout(vocab_size, config).items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "token_embedding.weight" or "pos_embedding" in name:
            value = torch.randn(shape, generator=generator)
        else:  # linear [out, in]: unit-variance outputs
            value = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        state[name] = value.to(dtype)
    checkpoint = folder / T5_CHECKPOINT
    torch.save(state, checkpoint)
    return checkpoint, tokenizer_dir


# ---------------------------------------------------------------------------------------------------------
# Wan2.1 VAE (original key names)
# ---------------------------------------------------------------------------------------------------------


def _residual(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    layout = {
        f"{prefix}.residual.0.gamma": (cin, 1, 1, 1),
        f"{prefix}.residual.2.weight": (cout, cin, 3, 3, 3),
        f"{prefix}.residual.2.bias": (cout,),
        f"{prefix}.residual.3.gamma": (cout, 1, 1, 1),
        f"{prefix}.residual.6.weight": (cout, cout, 3, 3, 3),
        f"{prefix}.residual.6.bias": (cout,),
    }
    if cin != cout:
        layout[f"{prefix}.shortcut.weight"] = (cout, cin, 1, 1, 1)
        layout[f"{prefix}.shortcut.bias"] = (cout,)
    return layout


def _attention(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm.gamma": (dim, 1, 1),
        f"{prefix}.to_qkv.weight": (3 * dim, dim, 1, 1),
        f"{prefix}.to_qkv.bias": (3 * dim,),
        f"{prefix}.proj.weight": (dim, dim, 1, 1),
        f"{prefix}.proj.bias": (dim,),
    }


def wan21_vae_layout(base_dim: int = 96, z_dim: int = 16) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of vae2_1.py's WanVAE_ (dim_mult 1,2,4,4; 2 res blocks; no attn_scales)."""
    mult = (1, 2, 4, 4)
    temporal_down = (False, True, True)
    layout: dict[str, tuple[int, ...]] = {}
    # encoder: conv1, flat `downsamples` (2 residual blocks per level + Resample between levels), middle, head
    dims = [base_dim * m for m in (1, *mult)]
    layout["encoder.conv1.weight"] = (dims[0], 3, 3, 3, 3)
    layout["encoder.conv1.bias"] = (dims[0],)
    k = 0
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(2):
            layout.update(_residual(f"encoder.downsamples.{k}", cin, cout))
            cin, k = cout, k + 1
        if level != len(mult) - 1:
            layout[f"encoder.downsamples.{k}.resample.1.weight"] = (cout, cout, 3, 3)
            layout[f"encoder.downsamples.{k}.resample.1.bias"] = (cout,)
            if temporal_down[level]:
                layout[f"encoder.downsamples.{k}.time_conv.weight"] = (cout, cout, 3, 1, 1)
                layout[f"encoder.downsamples.{k}.time_conv.bias"] = (cout,)
            k += 1
    top = dims[-1]
    layout.update(_residual("encoder.middle.0", top, top))
    layout.update(_attention("encoder.middle.1", top))
    layout.update(_residual("encoder.middle.2", top, top))
    layout["encoder.head.0.gamma"] = (top, 1, 1, 1)
    layout["encoder.head.2.weight"] = (2 * z_dim, top, 3, 3, 3)
    layout["encoder.head.2.bias"] = (2 * z_dim,)
    layout["conv1.weight"] = (2 * z_dim, 2 * z_dim, 1, 1, 1)
    layout["conv1.bias"] = (2 * z_dim,)
    layout["conv2.weight"] = (z_dim, z_dim, 1, 1, 1)
    layout["conv2.bias"] = (z_dim,)
    # decoder: conv1, middle, flat `upsamples` (3 residual blocks per level + Resample between levels), head
    dims = [base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_up = temporal_down[::-1]
    layout["decoder.conv1.weight"] = (dims[0], z_dim, 3, 3, 3)
    layout["decoder.conv1.bias"] = (dims[0],)
    layout.update(_residual("decoder.middle.0", dims[0], dims[0]))
    layout.update(_attention("decoder.middle.1", dims[0]))
    layout.update(_residual("decoder.middle.2", dims[0], dims[0]))
    k = 0
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if level > 0:
            cin //= 2  # each upsampler halves the channels
        for _ in range(3):
            layout.update(_residual(f"decoder.upsamples.{k}", cin, cout))
            cin, k = cout, k + 1
        if level != len(mult) - 1:
            layout[f"decoder.upsamples.{k}.resample.1.weight"] = (cout // 2, cout, 3, 3)
            layout[f"decoder.upsamples.{k}.resample.1.bias"] = (cout // 2,)
            if temporal_up[level]:
                layout[f"decoder.upsamples.{k}.time_conv.weight"] = (2 * cout, cout, 3, 1, 1)
                layout[f"decoder.upsamples.{k}.time_conv.bias"] = (2 * cout,)
            k += 1
    layout["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    layout["decoder.head.2.weight"] = (3, dims[-1], 3, 3, 3)
    layout["decoder.head.2.bias"] = (3,)
    return layout


def write_tiny_vae(path: Path, *, seed: int = 0, base_dim: int = 8) -> Path:
    """Write a float32 Wan2.1 VAE checkpoint with original key names and seeded random weights."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in wan21_vae_layout(base_dim).items():
        if name.endswith("gamma"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("bias"):
            value = 0.05 * torch.randn(shape, generator=generator)
        else:  # conv weight [out, in, *kernel]: keep activations near unit scale
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[name] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# wav2vec2 (HF folder)
# ---------------------------------------------------------------------------------------------------------

CTC_VOCAB = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "<unk>": 3,
    "|": 4,
    **{c: 5 + i for i, c in enumerate("ETAOINSHRDLU")},
}


def tiny_wav2vec2_config():
    """xlsr-53's architecture choices (conv strides, layer norms, gelu) at tiny widths, eval-ready."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        vocab_size=len(CTC_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_proj_dropout=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.05,
        pad_token_id=0,
        ctc_loss_reduction="mean",
        architectures=["Wav2Vec2ForCTC"],
    )


def write_tiny_wav2vec2(folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny Wav2Vec2ForCTC folder in the official layout (weights, configs, CTC tokenizer)."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(tiny_wav2vec2_config())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF's init leaves norms at 1/0 and biases at 0: perturb so every tensor matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("layer_norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(CTC_VOCAB))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Wav2Vec2CTCTokenizer",
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "word_delimiter_token": "|",
                "do_lower_case": False,
            }
        )
    )
    return folder


def write_tiny_encoders(root: Path, *, seed: int = 0) -> Path:
    """All three in one checkpoint folder, laid out like the official Wan2.2-S2V-14B directory."""
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_t5(root, seed=seed)
    write_tiny_vae(root / VAE_CHECKPOINT, seed=seed + 1)
    write_tiny_wav2vec2(root / WAV2VEC2_DIR, seed=seed + 2)
    return root


__all__ = [
    "T5_CHECKPOINT",
    "T5_TOKENIZER_DIR",
    "VAE_CHECKPOINT",
    "WAV2VEC2_DIR",
    "TinyT5Config",
    "tiny_vocabulary",
    "tiny_wav2vec2_config",
    "wan21_vae_layout",
    "wan_t5_layout",
    "write_tiny_encoders",
    "write_tiny_t5",
    "write_tiny_t5_tokenizer",
    "write_tiny_vae",
    "write_tiny_wav2vec2",
]
