"""Load the official DiT checkpoint (+ the LiveAvatar LoRA) into `LiveAvatarDiT`, or build random weights.

Official layout (`Wan2.2-S2V-14B/`): `config.json`, `diffusion_pytorch_model.safetensors.index.json`
and the shards it names (`diffusion_pytorch_model-0000{1..4}-of-00004.safetensors`, 1260 tensors).
The model is built on the meta device, allocated where its `Placement` says (on the device, or the
blocks in pinned host memory for weight streaming; the blocks' linears directly as fp8 buffers when
fp8 is asked for) and filled tensor by tensor straight from the shards: each tensor is read, merged
with its LoRA delta in float32, cast to its final dtype (quantised to e4m3 with its per-tensor scale for
an fp8 linear) and copied into place before the next one is read, so at most one tensor's transient
copies exist beyond the model. `random_init` fills the same placed model from a seeded generator, one
tensor at a time, with the values a plain bf16 model would get.

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
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .backends import Fp8Linear, fp8_linear_names, pinned_buffer_views, quantise_weight
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


@dataclass(frozen=True)
class Placement:
    """Where the loaded DiT's weights live and in what form.

    `device`: the compute device (non-block weights, and the blocks unless `blocks_on_host`).
    `fp8`: the blocks' linears are `Fp8Linear` buffers, quantised per tensor as they load.
    `blocks_on_host`: the blocks' weights in host memory (pinned where CUDA is present), one buffer per
    block, never on the device: what weight streaming (`BlockWeightOffload`) reads from."""

    device: torch.device
    dtype: torch.dtype
    fp8: bool = False
    blocks_on_host: bool = False

    @property
    def work_device(self) -> torch.device:
        """Where per-tensor work (LoRA merge, quantisation, random draws) runs: the compute device,
        or the host when that is the meta device (placement tests)."""
        return torch.device("cpu") if self.device.type == "meta" else self.device


def _plain_meta(config: DiTConfig, dtype: torch.dtype) -> LiveAvatarDiT:
    with torch.device("meta"):
        model = LiveAvatarDiT(config)
    model.to(dtype)
    for prefix in FLOAT32_MODULES:
        model.get_submodule(prefix).float()
    return model.requires_grad_(False).eval()


def build_placed(config: DiTConfig, placement: Placement) -> LiveAvatarDiT:
    """The model with uninitialised weights allocated where `placement` says (built on meta first)."""
    model = _plain_meta(config, placement.dtype)
    if placement.fp8:
        for name in fp8_linear_names(model):
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent),
                child,
                Fp8Linear.empty_like(getattr(model.get_submodule(parent), child)),
            )
    for name, child in model.named_children():
        if name != "blocks":
            child.to_empty(device=placement.device)
    for block in model.blocks:
        if placement.blocks_on_host:
            tensors = [t for t in [*block.parameters(), *block.buffers()]]
            views = pinned_buffer_views(tensors, pin=torch.cuda.is_available())
            _assign(block, views)
        else:
            block.to_empty(device=placement.device)
    return model


def _assign(module: torch.nn.Module, tensors: list[torch.Tensor]) -> None:
    """Point `module`'s parameters and buffers (in `parameters(), buffers()` order) at `tensors`."""
    slots = [(m, n, True) for m in module.modules() for n, p in m._parameters.items() if p is not None]
    slots += [(m, n, False) for m in module.modules() for n, b in m._buffers.items() if b is not None]
    for (m, n, is_param), t in zip(slots, tensors, strict=True):
        if is_param:
            m._parameters[n] = torch.nn.Parameter(t, requires_grad=False)
        else:
            m._buffers[n] = t


def build_empty(config: DiTConfig, device: torch.device | str, dtype: torch.dtype) -> LiveAvatarDiT:
    """Allocate the plain model on `device` without initialising it (built on meta: no host copy)."""
    return build_placed(config, Placement(torch.device(device), dtype))


def dit_parameter_bytes(config: DiTConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's weights at `dtype` (float32 modules counted at 4 bytes)."""
    return sum(p.numel() * p.element_size() for p in _plain_meta(config, dtype).parameters())


def put_tensor(model: LiveAvatarDiT, name: str, value: torch.Tensor, placement: Placement) -> None:
    """Store one weight (our name, any dtype/device) in its final form and place: cast to the model's
    dtype, quantised for an fp8 linear. Transient copies: this one tensor's."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    if isinstance(module, Fp8Linear) and leaf == "weight":
        work = value.to(placement.work_device, placement.dtype)  # the bf16 weight a plain load would hold
        quantised, scale = quantise_weight(work)
        module.weight.copy_(quantised)
        module.weight_scale.copy_(scale)
        return
    getattr(module, leaf).copy_(value)


def random_init(
    config: DiTConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    *,
    fp8: bool = False,
    blocks_on_host: bool = False,
) -> LiveAvatarDiT:
    """The full model with seeded random weights, drawn one tensor at a time on the device and stored
    straight in its placement (benchmarks, capacity planning, tiny test checkpoints). The values do not
    depend on the placement: each is drawn at `dtype` on the device, as a plain model's would be.
    Never used as a fallback for a failed load."""
    placement = Placement(torch.device(device), dtype, fp8=fp8, blocks_on_host=blocks_on_host)
    model = build_placed(config, placement)
    generator = torch.Generator(device=placement.work_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in _plain_meta(config, dtype).named_parameters():
            value = torch.empty(p.shape, dtype=p.dtype, device=placement.work_device)
            _init_parameter(name, value, generator)
            put_tensor(model, name, value, placement)
            del value
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
    fp8: bool = False,
    blocks_on_host: bool = False,
) -> LiveAvatarDiT:
    """Load `checkpoint_dir` (official layout) with the LoRA at `lora_path` merged in (None: base model),
    each tensor straight into its `Placement` (fp8 / blocks on host: see the module docstring).

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
    plain = _plain_meta(config, dtype)
    table = name_table(plain)
    _check_names(weight_map, table, checkpoint_dir)
    shapes = {name: (tuple(p.shape), p.dtype) for name, p in plain.named_parameters()}
    del plain
    placement = Placement(torch.device(device), dtype, fp8=fp8, blocks_on_host=blocks_on_host)
    model = build_placed(config, placement)
    lora_keys = {f"{m}.weight": pair for m, pair in lora_file.keys.items()} if lora_file else {}

    with ExitStack() as stack, torch.no_grad():
        lora_reader = (
            stack.enter_context(safe_open(str(lora_file.path), "pt", device="cpu")) if lora_file else None
        )
        for key, tensor in _shard_tensors(checkpoint_dir, shards, weight_map, shapes, table):
            ours = table[key]
            if key in lora_keys:
                a_key, b_key = lora_keys[key]
                a, b = lora_reader.get_tensor(a_key), lora_reader.get_tensor(b_key)
                shape = tuple(tensor.shape)
                if a.shape[1] != shape[1] or b.shape[0] != shape[0]:
                    raise CheckpointError(
                        str(lora_file.path),
                        f"LoRA A {list(a.shape)} / B {list(b.shape)} do not fit {list(shape)}",
                        a_key,
                    )
                tensor = merge_lora(tensor.to(placement.work_device), a, b, lora_file.scale, shapes[ours][1])
            put_tensor(model, ours, tensor, placement)
            del tensor
    return model


def _shard_tensors(
    checkpoint_dir: Path,
    shards: list[str],
    weight_map: dict[str, str],
    shapes: dict[str, tuple],
    table: dict[str, str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor read from the file) one at a time, checked against the index and
    the model's shapes."""
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
                shape = tuple(f.get_slice(key).get_shape())
                want = shapes[table[key]][0]
                if shape != want:
                    raise CheckpointError(
                        str(path), f"shape {list(shape)} does not match the model's {list(want)}", key
                    )
                yield key, f.get_tensor(key)
