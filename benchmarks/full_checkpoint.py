"""Write a full-size LiveAvatar checkpoint in the official layout from seeded random weights.

For measuring the real-checkpoint loader at full size (`engine_bench.py --checkpoint-dir`) where the
released weights cannot be downloaded. The layout and tensor names are the official ones:

    ROOT/Wan2.2-S2V-14B/  config.json, 4 DiT shards + index (bf16, 1260 tensors),
                          models_t5_umt5-xxl-enc-bf16.pth (umT5-XXL, Wan names, bf16),
                          Wan2.1_VAE.pth (float32, original names), wav2vec2-large-xlsr-53-english/
                          (HF folder, float32), google/umt5-xxl/ (a small stand-in tokenizer: the real
                          vocabulary is not available offline; token ids stay inside umT5's vocabulary)
    ROOT/LiveAvatar/liveavatar.safetensors   (LoRA, rank 128, bf16, 896 tensors)

About 47 GB. Tensors are drawn on the GPU and written shard by shard (host memory holds one shard).

    PYTHONPATH=. python benchmarks/full_checkpoint.py /tmp/ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from liveavatar_core.engines.liveavatar.checkpoint import (  # noqa: E402
    CONFIG_NAME,
    INDEX_NAME,
    LORA_NAME,
    official_state_dict,
    random_init,
    shard_name,
)
from liveavatar_core.engines.liveavatar.components import LORA_DIR, WAN_DIR, _xlsr53_config, random_fill  # noqa: E402
from liveavatar_core.engines.liveavatar.config import DiTConfig, LoraConfig  # noqa: E402
from liveavatar_core.engines.liveavatar.lora import lora_target_modules  # noqa: E402
from liveavatar_core.engines.liveavatar.tiny_encoders import (  # noqa: E402
    T5_CHECKPOINT,
    T5_TOKENIZER_DIR,
    VAE_CHECKPOINT,
    WAV2VEC2_DIR,
    TinyT5Config,
    wan21_vae_layout,
    wan_t5_layout,
    write_tiny_t5_tokenizer,
)

UMT5_XXL = TinyT5Config(dim=4096, ffn_dim=10240, num_heads=64, num_layers=24, num_buckets=32)
UMT5_VOCAB = 256384


def _draw(shape: tuple[int, ...], std: float, g: torch.Generator, dtype: torch.dtype, mean: float = 0.0):
    return torch.empty(shape, device=g.device).normal_(mean, std, generator=g).to(dtype)


def write_dit(wan: Path, device: torch.device, seed: int, shards: int = 4) -> None:
    config = DiTConfig()
    model = random_init(config, device, torch.bfloat16, seed=seed)
    state = official_state_dict(model)
    names = sorted(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    weight_map, chunk, size, index = {}, [], 0, 1
    for i, name in enumerate(names):
        chunk.append(name)
        size += state[name].numel() * state[name].element_size()
        if size >= total / shards and index < shards or i == len(names) - 1:
            filename = shard_name(index, shards)
            save_file({k: state[k].cpu() for k in chunk}, str(wan / filename), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, filename))
            chunk, size, index = [], 0, index + 1
    (wan / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (wan / CONFIG_NAME).write_text(json.dumps(config.to_official(), indent=2))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    del model, state
    torch.cuda.empty_cache()
    lora = LoraConfig()
    g = torch.Generator(device=device).manual_seed(seed + 1)
    lora_state = {}
    for module in lora_target_modules(config):
        out_features, in_features = shapes[f"{module}.weight"]
        lora_state[f"{module}.lora_A.default.weight"] = _draw(
            (lora.rank, in_features), in_features**-0.5, g, torch.bfloat16
        ).cpu()
        lora_state[f"{module}.lora_B.default.weight"] = _draw(
            (out_features, lora.rank), 0.01 * lora.rank**-0.5, g, torch.bfloat16
        ).cpu()
    (wan.parent / LORA_DIR).mkdir(parents=True, exist_ok=True)
    save_file(lora_state, str(wan.parent / LORA_DIR / LORA_NAME), metadata={"format": "pt"})


def write_umt5(wan: Path, device: torch.device, seed: int) -> None:
    write_tiny_t5_tokenizer(wan / T5_TOKENIZER_DIR)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in wan_t5_layout(UMT5_VOCAB, UMT5_XXL).items():
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            state[name] = _draw(shape, 0.1, g, torch.bfloat16, mean=1.0).cpu()
        elif name == "token_embedding.weight" or "pos_embedding" in name:
            state[name] = _draw(shape, 1.0, g, torch.bfloat16).cpu()
        else:
            state[name] = _draw(shape, shape[1] ** -0.5, g, torch.bfloat16).cpu()
    torch.save(state, wan / T5_CHECKPOINT)


def write_vae(wan: Path, device: torch.device, seed: int) -> None:
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in wan21_vae_layout(96).items():
        if name.endswith("gamma"):
            state[name] = _draw(shape, 0.1, g, torch.float32, mean=1.0).cpu()
        elif name.endswith("bias"):
            state[name] = _draw(shape, 0.05, g, torch.float32).cpu()
        else:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            state[name] = _draw(shape, fan_in**-0.5, g, torch.float32).cpu()
    torch.save(state, wan / VAE_CHECKPOINT)


def write_wav2vec2(wan: Path, device: torch.device, seed: int) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    with torch.device("meta"):
        model = Wav2Vec2Model(_xlsr53_config(Wav2Vec2Config, DiTConfig()))
    model.to_empty(device=device)
    random_fill(model, seed)
    folder = wan / WAV2VEC2_DIR
    model.save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(str(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    wan = args.root / WAN_DIR
    wan.mkdir(parents=True, exist_ok=True)
    for part, write in (
        ("DiT + LoRA", write_dit),
        ("umT5", write_umt5),
        ("VAE", write_vae),
        ("wav2vec2", write_wav2vec2),
    ):
        start = time.perf_counter()
        write(wan, device, args.seed)
        print(f"{part}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
