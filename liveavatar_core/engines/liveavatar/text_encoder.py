"""The prompt encoder: umT5-XXL's encoder, from Wan's own checkpoint into transformers' UMT5EncoderModel.

Wan ships `models_t5_umt5-xxl-enc-bf16.pth`, a state dict of its own T5Encoder (t5.py). The network is
umT5's: RMSNorm without mean or bias, unscaled dot-product attention with a *per-layer* bucketed relative
position bias (32 buckets, bidirectional, max distance 128), a gated FFN whose gate is tanh-GELU
(transformers' "gated-gelu" = gelu_new), a final RMSNorm, no embedding scaling. So it maps tensor for
tensor onto UMT5EncoderModel (see `wan_to_hf_key`); 24 layers x 9 tensors + embedding + final norm.

What the DiT reads: the reference tokenizes to 512 tokens (padding + </s>, mask on padding), runs the
encoder, keeps the first `n` rows (n = real tokens including </s>), and the DiT pads them back to 512 rows
*with zeros* before its text embedding and attends to all 512 (no mask; `WanDiT.embed_text` does the
same). Padding keys are masked and the bias depends only on distance, so the first n rows do not depend on
the padding: we run the encoder on the n real tokens only (cheaper) and return those n rows.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .config import CheckpointError, rename_state_dict

TEXT_LEN = 512


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5-XXL encoder dimensions (the defaults); tiny checkpoints are read the same way."""

    vocab_size: int = 256384
    dim: int = 4096
    attn_dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @classmethod
    def from_wan_state_dict(cls, state: dict[str, torch.Tensor], source: str) -> TextEncoderConfig:
        """Dimensions read off the checkpoint's tensors (it carries no config file)."""
        try:
            vocab_size, dim = state["token_embedding.weight"].shape
            num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
            attn_dim = state["blocks.0.attn.q.weight"].shape[0]
            ffn_dim = state["blocks.0.ffn.fc1.weight"].shape[0]
        except KeyError as error:
            raise CheckpointError(
                source, "not a Wan umT5 checkpoint (tensor missing)", error.args[0]
            ) from None
        num_layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return cls(
            vocab_size=int(vocab_size),
            dim=int(dim),
            attn_dim=int(attn_dim),
            ffn_dim=int(ffn_dim),
            num_heads=int(num_heads),
            num_layers=num_layers,
            num_buckets=int(num_buckets),
        )

    def to_hf(self) -> UMT5Config:
        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.dim,
            d_kv=self.attn_dim // self.num_heads,
            d_ff=self.ffn_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            feed_forward_proj="gated-gelu",  # tanh-GELU gate (t5.py's GELU class) times a linear branch
            layer_norm_epsilon=self.eps,
            dropout_rate=0.0,
            is_encoder_decoder=False,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )


# Wan (t5.py) -> transformers (modeling_umt5.py), per encoder block i.
_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # goes through the GELU
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch it multiplies
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_to_hf_key(name: str) -> list[str]:
    """transformers' name(s) for one tensor of Wan's checkpoint (the embedding has two: shared + encoder)."""
    if name == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if name == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        if m[2] in _BLOCK:
            return [f"encoder.block.{m[1]}.{_BLOCK[m[2]]}"]
    raise KeyError(f"unknown umT5 tensor {name!r}")


def convert_wan_state_dict(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Rename every tensor; the result has exactly `expected`'s keys and shapes, else CheckpointError."""
    return rename_state_dict(state, wan_to_hf_key, expected, source=source, model="UMT5EncoderModel")


def load_umt5_encoder(path: str | Path) -> tuple[UMT5EncoderModel, TextEncoderConfig]:
    """Build UMT5EncoderModel on the meta device and give it the checkpoint's memory-mapped tensors.

    No second copy is made: parameters *are* the file's pages (bf16 for the official file) until the
    caller moves the model with `.to(device)`. Eval mode, no grad.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(str(path), "umT5 checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (pre-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    config = TextEncoderConfig.from_wan_state_dict(state, str(path))
    with torch.device("meta"):
        model = UMT5EncoderModel(config.to_hf())
    model.encoder.embed_tokens = model.shared  # one embedding, as in Wan (HF ties them on from_pretrained)
    model.load_state_dict(
        convert_wan_state_dict(state, model.state_dict(), str(path)), strict=True, assign=True
    )
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointError(str(path), "model tensor left uninitialised by the checkpoint", name)
    return model.eval().requires_grad_(False), config


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: ftfy, HTML entities unescaped twice, whitespace collapsed."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Tokenizer + umT5 encoder. Encode once per job, then drop the GPU copy (the CPU one is the file)."""

    def __init__(
        self, model: UMT5EncoderModel, tokenizer, config: TextEncoderConfig, text_len: int = TEXT_LEN
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.text_len = text_len

    @classmethod
    def load(cls, checkpoint: str | Path, tokenizer_dir: str | Path) -> TextEncoder:
        """Official `models_t5_umt5-xxl-enc-bf16.pth` and the `google/umt5-xxl/` folder (local files only)."""
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise CheckpointError(str(tokenizer_dir), "umT5 tokenizer folder not found")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model, config = load_umt5_encoder(checkpoint)
        return cls(model, tokenizer, config)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def token_ids(self, text: str) -> torch.Tensor:
        """int64 [1, n]: the cleaned prompt's tokens plus </s>, truncated to `text_len` (as the reference)."""
        ids = self.tokenizer(
            [clean_prompt(text)],
            add_special_tokens=True,
            truncation=True,
            max_length=self.text_len,
            return_tensors="pt",
        ).input_ids
        return ids

    def count_tokens(self, text: str) -> int:
        return int(self.token_ids(text).shape[1])

    def encode_prompt(self, text: str) -> torch.Tensor:
        """[n, dim] in the model's dtype and device: the prompt's token states, </s> included.

        Exactly what the reference's T5EncoderModel returns per prompt; the DiT zero-pads it to 512 rows.
        """
        ids = self.token_ids(text).to(self.device)
        with torch.no_grad():
            return self.model(input_ids=ids).last_hidden_state[0]


__all__ = [
    "TEXT_LEN",
    "TextEncoder",
    "TextEncoderConfig",
    "clean_prompt",
    "convert_wan_state_dict",
    "load_umt5_encoder",
    "wan_to_hf_key",
]
