"""Load the official DiT checkpoint (+ the LiveAvatar LoRA) into `LiveAvatarDiT`, or build random weights.

Official layout (`Wan2.2-S2V-14B/`): `config.json`, `diffusion_pytorch_model.safetensors.index.json`
and the shards it names (`diffusion_pytorch_model-0000{1..4}-of-00004.safetensors`, 1260 tensors).
The model is built on the meta device, allocated once on the target device, and filled tensor by
tensor straight from the shards (host memory holds one tensor at a time). LoRA deltas are merged in
float32 into each adapted weight as it streams by, before any cast to the target dtype (and so before
any fp8 conversion, which is applied to the loaded model from outside).

Name mapping (official -> ours), complete and checked both ways at load:

| official                                                 | ours                                   |
|----------------------------------------------------------|----------------------------------------|
| `casual_audio_encoder.weights`                           | `audio_encoder.layer_weights`          |
| `casual_audio_encoder.encoder.{conv1_local,conv1_global,conv2,conv3}.conv.*` | `audio_encoder.{…}.*` |
| `casual_audio_encoder.encoder.final_linear.*`            | `audio_encoder.global_proj.*`          |
| `casual_audio_encoder.encoder.padding_tokens`            | `audio_encoder.padding_token`          |
| `audio_injector.injector.J.*`                            | `blocks.L.audio.attn.*` (L = audio_inject_layers[J]) |
| `audio_injector.injector_adain_layers.J.linear.*`        | `blocks.L.audio.norm.linear.*`         |
| everything else (`patch_embedding`, `blocks.N.*`, `head.*`, `frame_packer.*`, …) | same name  |
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, DiTConfig, LoraConfig
from .dit import FLOAT32_MODULES, LiveAvatarDiT
from .lora import merge_lora, read_lora_file

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LORA_NAME = "liveavatar.safetensors"


def shard_name(i: int, n: int) -> str:
    return f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"


# --- names ---------------------------------------------------------------------------------------

_AUDIO_ENCODER = {  # ours (after "audio_encoder.") <-> official (after "casual_audio_encoder.")
    "layer_weights": "weights",
    "global_proj.weight": "encoder.final_linear.weight",
    "global_proj.bias": "encoder.final_linear.bias",
    "padding_token": "encoder.padding_tokens",
    **{
        f"{c}.{p}": f"encoder.{c}.conv.{p}"
        for c in ("conv1_local", "conv1_global", "conv2", "conv3")
        for p in ("weight", "bias")
    },
}
_AUDIO_ENCODER_BACK = {v: k for k, v in _AUDIO_ENCODER.items()}


def ours_to_official(name: str, config: DiTConfig) -> str:
    """Official tensor name of one of our parameter names."""
    if name.startswith("audio_encoder."):
        return "casual_audio_encoder." + _AUDIO_ENCODER[name.removeprefix("audio_encoder.")]
    match = re.fullmatch(r"blocks\.(\d+)\.audio\.(attn|norm)\.(.+)", name)
    if match:
        j = config.audio_inject_layers.index(int(match[1]))
        if match[2] == "attn":
            return f"audio_injector.injector.{j}.{match[3]}"
        return f"audio_injector.injector_adain_layers.{j}.{match[3]}"
    return name


def official_to_ours(name: str, config: DiTConfig) -> str | None:
    """Our parameter name for an official tensor name, or None when the official name is unknown."""
    if name.startswith("casual_audio_encoder."):
        rest = _AUDIO_ENCODER_BACK.get(name.removeprefix("casual_audio_encoder."))
        return None if rest is None else "audio_encoder." + rest
    match = re.fullmatch(r"audio_injector\.(injector|injector_adain_layers)\.(\d+)\.(.+)", name)
    if match:
        j = int(match[2])
        if j >= len(config.audio_inject_layers):
            return None
        part = "attn" if match[1] == "injector" else "norm"
        return f"blocks.{config.audio_inject_layers[j]}.audio.{part}.{match[3]}"
    return name


def name_table(model: LiveAvatarDiT) -> dict[str, str]:
    """Every official tensor name -> our parameter name."""
    return {ours_to_official(name, model.config): name for name, _ in model.named_parameters()}


def official_state_dict(model: LiveAvatarDiT) -> dict[str, torch.Tensor]:
    """Our weights under the official names (for writing checkpoints and for parity harnesses)."""
    return {ours_to_official(n, model.config): p.detach() for n, p in model.named_parameters()}


# --- building ------------------------------------------------------------------------------------


def build_empty(config: DiTConfig, device: torch.device | str, dtype: torch.dtype) -> LiveAvatarDiT:
    """Allocate the model on `device` without initialising it (built on meta: no host copy)."""
    with torch.device("meta"):
        model = LiveAvatarDiT(config)
    model.to(dtype)
    for prefix in FLOAT32_MODULES:
        model.get_submodule(prefix).float()
    model.to_empty(device=device)
    model.requires_grad_(False)
    return model.eval()


def dit_parameter_bytes(config: DiTConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's weights at `dtype` (float32 modules counted at 4 bytes)."""
    with torch.device("meta"):
        model = LiveAvatarDiT(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        keep32 = any(name == m or name.startswith(m + ".") for m in FLOAT32_MODULES)
        total += p.numel() * (4 if keep32 else itemsize)
    return total


def random_init(
    config: DiTConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> LiveAvatarDiT:
    """The full model with seeded random weights made directly on `device` (benchmarks, capacity
    planning, tiny test checkpoints). Never used as a fallback for a failed load."""
    model = build_empty(config, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _init_parameter(name, p, generator)
    return model


def _init_parameter(name: str, p: torch.Tensor, g: torch.Generator) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "modulation":
        p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
    elif leaf == "layer_weights":
        p.normal_(1.0, 0.3, generator=g)  # positive: their SiLU is normalised by its sum
    elif name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
        p.normal_(1.0, 0.1, generator=g)
    elif leaf == "bias":
        p.normal_(0.0, 0.02, generator=g)
    elif leaf in ("padding_token",) or name.startswith("trainable_cond_mask"):
        p.normal_(0.0, 0.5, generator=g)
    else:  # linear / conv weights: unit-variance outputs
        p.normal_(0.0, p[0].numel() ** -0.5, generator=g)


# --- loading -------------------------------------------------------------------------------------


def _read_index(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(str(path), "checkpoint index not found")
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(str(path), f"not a safetensors index with a weight_map ({exc})") from exc
    return dict(weight_map)


def _check_names(weight_map: dict[str, str], table: dict[str, str], checkpoint_dir: Path) -> None:
    unexpected = sorted(set(weight_map) - set(table))
    if unexpected:
        key = unexpected[0]
        raise CheckpointError(
            str(checkpoint_dir / weight_map[key]), "unexpected tensor (no place in the model)", key
        )
    missing = sorted(set(table) - set(weight_map))
    if missing:
        raise CheckpointError(
            str(checkpoint_dir / INDEX_NAME), "missing tensor (not in the index)", missing[0]
        )


def load_dit(
    checkpoint_dir: str | Path,
    lora_path: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    lora: LoraConfig | None = None,
) -> LiveAvatarDiT:
    """Load `checkpoint_dir` (official layout) with the LoRA at `lora_path` merged in (None: base model).

    Every index entry must map onto a parameter and every parameter must be in the index, with the
    same shape; otherwise CheckpointError names the first offending file and tensor.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = DiTConfig.from_json_file(checkpoint_dir / CONFIG_NAME)
    weight_map = _read_index(checkpoint_dir / INDEX_NAME)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (checkpoint_dir / shard).is_file():
            raise CheckpointError(
                str(checkpoint_dir / shard), "checkpoint shard not found (named in the index)"
            )
    lora_file = read_lora_file(lora_path, config, lora or LoraConfig()) if lora_path is not None else None

    model = build_empty(config, device, dtype)
    table = name_table(model)
    _check_names(weight_map, table, checkpoint_dir)
    params = dict(model.named_parameters())
    lora_keys = {f"{m}.weight": pair for m, pair in lora_file.keys.items()} if lora_file else {}

    with ExitStack() as stack, torch.no_grad():
        lora_reader = (
            stack.enter_context(safe_open(str(lora_file.path), "pt", device="cpu")) if lora_file else None
        )
        for shard in shards:
            path = checkpoint_dir / shard
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                listed = sorted(k for k, s in weight_map.items() if s == shard)
                stray = sorted(present - set(listed))
                if stray:
                    raise CheckpointError(str(path), "tensor in the shard but not in the index", stray[0])
                for key in listed:
                    if key not in present:
                        raise CheckpointError(
                            str(path), "tensor named in the index is absent from the shard", key
                        )
                    param = params[table[key]]
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(param.shape):
                        raise CheckpointError(
                            str(path),
                            f"shape {list(shape)} does not match the model's {list(param.shape)}",
                            key,
                        )
                    tensor = f.get_tensor(key)
                    if key in lora_keys:
                        a_key, b_key = lora_keys[key]
                        a, b = lora_reader.get_tensor(a_key), lora_reader.get_tensor(b_key)
                        if a.shape[1] != shape[1] or b.shape[0] != shape[0]:
                            raise CheckpointError(
                                str(lora_file.path),
                                f"LoRA A {list(a.shape)} / B {list(b.shape)} do not fit {list(shape)}",
                                a_key,
                            )
                        tensor = merge_lora(tensor.to(param.device), a, b, lora_file.scale, param.dtype)
                    param.copy_(tensor)
    return model
