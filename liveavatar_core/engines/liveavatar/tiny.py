"""Write a tiny DiT checkpoint in the official layout, for tests that go through the real loader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_NAME, INDEX_NAME, LORA_NAME, official_state_dict, random_init, shard_name
from .config import DiTConfig, LoraConfig
from .lora import lora_target_modules


@dataclass(frozen=True)
class TinyCheckpoint:
    """What was written: paths, and the tensors under their official names (for round-trip checks)."""

    directory: Path
    lora_path: Path
    config: DiTConfig
    lora: LoraConfig
    state: dict[str, torch.Tensor]  # official name -> tensor, as written
    lora_state: dict[str, torch.Tensor]  # LoRA key -> tensor, as written


def write_tiny_dit_checkpoint(
    directory: str | Path,
    config: DiTConfig | None = None,
    *,
    seed: int = 0,
    shards: int = 2,
    lora: LoraConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> TinyCheckpoint:
    """Seeded random weights as `config.json` + `shards` safetensors shards + index, and a LoRA file
    `liveavatar.safetensors` with the official LoRA key names, all under `directory`.

    The LoRA keeps the official rank 128 / alpha 64 (rank above the tiny width is fine), so the
    loader's default LoraConfig applies to tiny and full checkpoints alike."""
    config = config or DiTConfig.tiny()
    lora = lora or LoraConfig()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = random_init(config, "cpu", dtype, seed=seed)
    state = {k: v.to(dtype).contiguous() for k, v in official_state_dict(model).items()}

    # Shards: official names in sorted order, split into `shards` runs of about equal size.
    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        chunk = names[i * per_shard : (i + 1) * per_shard]
        filename = shard_name(i + 1, shards)
        save_file({k: state[k] for k in chunk}, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_official(), indent=2))

    # LoRA: A [r, in] ~ N(0, 1/in), B [out, r] ~ N(0, 1/r) (non-zero, unlike a fresh peft init).
    generator = torch.Generator().manual_seed(seed + 1)
    lora_state = {}
    for module in lora_target_modules(config):
        out_features, in_features = state[f"{module}.weight"].shape
        a = torch.randn(lora.rank, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, lora.rank, generator=generator) / lora.rank**0.5
        lora_state[f"{module}.lora_A.default.weight"] = a.to(dtype)
        lora_state[f"{module}.lora_B.default.weight"] = b.to(dtype)
    save_file(lora_state, str(directory / LORA_NAME), metadata={"format": "pt"})
    return TinyCheckpoint(directory, directory / LORA_NAME, config, lora, state, lora_state)
