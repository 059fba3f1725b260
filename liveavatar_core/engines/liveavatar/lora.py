"""The LiveAvatar LoRA (`liveavatar.safetensors`): which weights it adapts and how it is merged.

The official code wraps the DiT with peft (`target_modules="q,k,v,o,ffn.0,ffn.2"`, r = 128,
lora_alpha = 64, no rsLoRA) and merges at load: W <- W + (alpha / r) · B @ A, with A [r, in] and
B [out, r]. peft's suffix match hits q/k/v/o of self- and cross-attention and ffn.0/ffn.2 of all 40
blocks, and q/k/v/o of the 12 audio injectors: 448 modules, 896 tensors.

File keys are peft state-dict names, `<module>.lora_A.default.weight` (DiffSynth-style, as the
official loader expects), optionally prefixed `base_model.model.`; we also accept peft's
`<module>.lora_A.weight`. Module names are official names (`audio_injector.injector.3.q`, …).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, DiTConfig, LoraConfig

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<half>[AB])(?:\.default)?\.weight$")


def lora_target_modules(config: DiTConfig) -> list[str]:
    """Official names of the Linear modules the LoRA adapts."""
    names = []
    for i in range(config.num_layers):
        for attn in ("self_attn", "cross_attn"):
            names += [f"blocks.{i}.{attn}.{p}" for p in "qkvo"]
        names += [f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"]
    for j in range(len(config.audio_inject_layers)):
        names += [f"audio_injector.injector.{j}.{p}" for p in "qkvo"]
    return names


@dataclass(frozen=True)
class LoraFile:
    """An opened-for-reading LoRA: official module name -> (A key, B key) in `path`."""

    path: Path
    keys: dict[str, tuple[str, str]]
    rank: int
    scale: float


def read_lora_file(path: str | Path, config: DiTConfig, lora: LoraConfig | None = None) -> LoraFile:
    """Index a LoRA file and check it adapts exactly the expected modules at the expected rank."""
    lora = lora or LoraConfig()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(str(path), "LoRA file not found")
    halves: dict[str, dict[str, str]] = {}
    shapes: dict[str, list[int]] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            match = _KEY.match(key)
            if match is None:
                raise CheckpointError(str(path), "not a LoRA A/B weight name", tensor=key)
            halves.setdefault(match["module"], {})[match["half"]] = key
            shapes[key] = list(f.get_slice(key).get_shape())

    targets = lora_target_modules(config)
    unexpected = sorted(set(halves) - set(targets))
    if unexpected:
        raise CheckpointError(
            str(path), "LoRA adapts a module the model has no LoRA target for", unexpected[0]
        )
    keys = {}
    for module in targets:
        pair = halves.get(module, {})
        if set(pair) != {"A", "B"}:
            missing = "lora_A and lora_B" if not pair else f"lora_{'B' if 'A' in pair else 'A'}"
            raise CheckpointError(str(path), f"missing {missing} of this module", tensor=module)
        a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != lora.rank or b_shape[1] != lora.rank:
            raise CheckpointError(
                str(path),
                f"LoRA shapes A {a_shape}, B {b_shape} are not [r, in], [out, r] with r = {lora.rank}",
                pair["A"],
            )
        keys[module] = (pair["A"], pair["B"])
    return LoraFile(path, keys, lora.rank, lora.scale)


def merge_lora(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W + scale · B @ A on W's device, computed in `dtype` promoted to at least float32."""
    dtype = torch.promote_types(dtype, torch.float32)
    a = a.to(weight.device, dtype)
    b = b.to(weight.device, dtype)
    return weight.to(dtype, copy=True).addmm_(b, a, alpha=scale)  # one float32 copy of W, no second
