"""Checkpoint loading: official names, tiny round trip, LoRA merge, and errors that name the culprit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from liveavatar_core.engines.liveavatar.checkpoint import (
    INDEX_NAME,
    build_empty,
    load_dit,
    name_table,
    official_state_dict,
    official_to_ours,
    ours_to_official,
    random_init,
)
from liveavatar_core.engines.liveavatar.config import CheckpointError, ConfigError, DiTConfig
from liveavatar_core.engines.liveavatar.dit import FLOAT32_MODULES, LiveAvatarDiT
from liveavatar_core.engines.liveavatar.kv_cache import CondKVCache, RingKVCache
from liveavatar_core.engines.liveavatar.lora import lora_target_modules
from liveavatar_core.engines.liveavatar.tiny import write_tiny_dit_checkpoint


def official_names(cfg: DiTConfig) -> set[str]:
    """The official checkpoint's tensor names, listed from the official model's structure."""
    wb = ("weight", "bias")
    names = {f"{m}.{p}" for m in ("patch_embedding", "cond_encoder") for p in wb}
    names |= {
        f"{m}.{i}.{p}"
        for m, i in [("text_embedding", 0), ("text_embedding", 2), ("time_embedding", 0)]
        for p in wb
    }
    names |= {f"time_embedding.2.{p}" for p in wb} | {f"time_projection.1.{p}" for p in wb}
    names |= {"head.head.weight", "head.head.bias", "head.modulation", "trainable_cond_mask.weight"}
    for i in range(cfg.num_layers):
        for attn in ("self_attn", "cross_attn"):
            names |= {f"blocks.{i}.{attn}.{p}.{x}" for p in "qkvo" for x in wb}
            names |= {f"blocks.{i}.{attn}.norm_q.weight", f"blocks.{i}.{attn}.norm_k.weight"}
        names |= {f"blocks.{i}.norm3.{p}" for p in wb} | {f"blocks.{i}.modulation"}
        names |= {f"blocks.{i}.ffn.{j}.{p}" for j in (0, 2) for p in wb}
    enc = "casual_audio_encoder"
    names |= {f"{enc}.weights", f"{enc}.encoder.padding_tokens"}
    names |= {
        f"{enc}.encoder.{c}.conv.{p}" for c in ("conv1_local", "conv1_global", "conv2", "conv3") for p in wb
    }
    names |= {f"{enc}.encoder.final_linear.{p}" for p in wb}
    for j in range(len(cfg.audio_inject_layers)):
        names |= {f"audio_injector.injector.{j}.{p}.{x}" for p in "qkvo" for x in wb}
        names |= {f"audio_injector.injector.{j}.norm_q.weight", f"audio_injector.injector.{j}.norm_k.weight"}
        names |= {f"audio_injector.injector_adain_layers.{j}.linear.{p}" for p in wb}
    names |= {f"frame_packer.{p}.{x}" for p in ("proj", "proj_2x", "proj_4x") for x in wb}
    return names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dit_checkpoint(tmp_path_factory.mktemp("dit"), DiTConfig.tiny(), seed=1)


def test_name_mapping_is_complete_both_ways_at_full_size():
    cfg = DiTConfig()
    with torch.device("meta"):
        model = LiveAvatarDiT(cfg)
    table = name_table(model)
    assert len(table) == 1260
    assert set(table) == official_names(cfg)
    ours = {n for n, _ in model.named_parameters()}
    assert set(table.values()) == ours
    for name in ours:
        assert official_to_ours(ours_to_official(name, cfg), cfg) == name
    assert official_to_ours("audio_injector.injector.12.q.weight", cfg) is None
    assert official_to_ours("casual_audio_encoder.encoder.nope", cfg) is None
    shapes = {ours_to_official(n, cfg): tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["casual_audio_encoder.weights"] == (1, 25, 1, 1)
    assert shapes["casual_audio_encoder.encoder.conv1_local.conv.weight"] == (5120, 1024, 3)
    assert shapes["casual_audio_encoder.encoder.conv1_global.conv.weight"] == (1280, 1024, 3)
    assert shapes["casual_audio_encoder.encoder.conv2.conv.weight"] == (2560, 1280, 3)
    assert shapes["casual_audio_encoder.encoder.padding_tokens"] == (1, 1, 1, 5120)
    assert shapes["audio_injector.injector_adain_layers.11.linear.weight"] == (10240, 5120)
    assert shapes["frame_packer.proj_4x.weight"] == (5120, 16, 4, 8, 8)
    assert shapes["time_projection.1.weight"] == (30720, 5120)
    assert shapes["head.head.weight"] == (64, 5120)
    assert shapes["trainable_cond_mask.weight"] == (3, 5120)
    # The LoRA's 448 targets are all 2-D official weights (896 LoRA tensors).
    targets = lora_target_modules(cfg)
    assert len(targets) == 448
    assert all(len(shapes[f"{m}.weight"]) == 2 for m in targets)
    assert official_to_ours("audio_injector.injector.1.q.weight", cfg) == "blocks.4.audio.attn.q.weight"


def test_loader_round_trip_float32(tiny):
    model = load_dit(tiny.directory, None, device="cpu", dtype=torch.float32)
    state = official_state_dict(model)
    assert set(state) == set(tiny.state)
    for key, written in tiny.state.items():
        assert torch.equal(state[key], written), key


def test_loader_bf16_keeps_float32_modules(tiny):
    model = load_dit(tiny.directory, None, device="cpu", dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        keep = any(name.startswith(m + ".") for m in FLOAT32_MODULES)
        assert p.dtype == (torch.float32 if keep else torch.bfloat16), name
        assert torch.equal(p, tiny.state[ours_to_official(name, model.config)].to(p.dtype)), name


def test_lora_merge_is_exact_in_float64(tiny):
    model = load_dit(tiny.directory, tiny.lora_path, device="cpu", dtype=torch.float64)
    state = official_state_dict(model)
    targets = {f"{m}.weight": m for m in lora_target_modules(tiny.config)}
    scale = 64.0 / 128.0
    for key, written in tiny.state.items():
        if key in targets:
            a = tiny.lora_state[f"{targets[key]}.lora_A.default.weight"].double()
            b = tiny.lora_state[f"{targets[key]}.lora_B.default.weight"].double()
            expected = written.double() + scale * (b @ a)
            torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-12)
        else:
            assert torch.equal(state[key], written.double()), key


class ExplicitLora(nn.Module):
    """y = base(x) + scale · B(A(x)): the unmerged LoRA forward."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype))


def _run(model: LiveAvatarDiT, seed: int = 0) -> torch.Tensor:
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    text = model.embed_text([torch.randn(5, cfg.text_dim, generator=gen)])
    cond = CondKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=torch.float32)
    model.forward_sink(
        torch.randn(1, 16, 1, 8, 8, generator=gen), torch.randn(1, 16, 19, 8, 8, generator=gen), text, cond
    )
    ring = RingKVCache.allocate(cfg, 1, 8, 8, device="cpu", dtype=torch.float32)
    audio = model.encode_audio(torch.randn(1, cfg.audio_layers, cfg.audio_dim, 12, generator=gen))
    noisy = torch.randn(1, 16, 3, 8, 8, generator=gen)
    return model.forward_block(
        noisy, 700.0, frame_index=0, sink_distance=9, text=text, audio=audio, cond_cache=cond, ring_cache=ring
    )


def test_merged_model_matches_explicit_lora_forward(tiny):
    merged = load_dit(tiny.directory, tiny.lora_path, device="cpu", dtype=torch.float32)
    unmerged = load_dit(tiny.directory, None, device="cpu", dtype=torch.float32)
    cfg = tiny.config
    for module in lora_target_modules(cfg):
        ours = official_to_ours(f"{module}.weight", cfg)
        parent_name, leaf = ours.removesuffix(".weight").rsplit(".", 1)
        parent = unmerged.get_submodule(parent_name)
        a = tiny.lora_state[f"{module}.lora_A.default.weight"]
        b = tiny.lora_state[f"{module}.lora_B.default.weight"]
        setattr(parent, leaf, ExplicitLora(getattr(parent, leaf), a, b, 0.5))
    torch.testing.assert_close(_run(merged), _run(unmerged), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(
        _run(merged), _run(load_dit(tiny.directory, None, dtype=torch.float32)), atol=1e-3
    )


def _copy_checkpoint(tiny, tmp_path):
    for f in tiny.directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_missing_files_are_named(tiny, tmp_path):
    ckpt = _copy_checkpoint(tiny, tmp_path)
    shard = sorted(ckpt.glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_dit(ckpt, None, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="liveavatar-nope.safetensors"):
        load_dit(tiny.directory, tiny.directory / "liveavatar-nope.safetensors", dtype=torch.float32)
    (ckpt / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match=INDEX_NAME):
        load_dit(ckpt, None, dtype=torch.float32)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_dit(ckpt, None, dtype=torch.float32)


def _rewrite(ckpt, key: str, change):
    """Apply `change(tensors, weight_map)` to the shard holding `key` and to the index."""
    index = json.loads((ckpt / INDEX_NAME).read_text())
    shard = ckpt / index["weight_map"][key]
    tensors = load_file(shard)
    change(tensors, index["weight_map"], shard.name)
    save_file(tensors, shard)
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    return shard.name


def test_mismatched_shape_is_named(tiny, tmp_path):
    ckpt = _copy_checkpoint(tiny, tmp_path)
    key = "blocks.1.cross_attn.k.weight"
    shard = _rewrite(ckpt, key, lambda t, wm, s: t.update({key: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"{shard} \[{key}\]: shape \[3, 3\]"):
        load_dit(ckpt, None, dtype=torch.float32)


def test_unexpected_and_missing_tensors_are_named(tiny, tmp_path):
    ckpt = _copy_checkpoint(tiny, tmp_path)
    key = "blocks.0.modulation"

    def add_stray(tensors, weight_map, shard):
        tensors["blocks.0.mystery.weight"] = torch.zeros(2)
        weight_map["blocks.0.mystery.weight"] = shard

    shard = _rewrite(ckpt, key, add_stray)
    with pytest.raises(CheckpointError, match=rf"{shard} \[blocks.0.mystery.weight\]: unexpected"):
        load_dit(ckpt, None, dtype=torch.float32)

    def drop(tensors, weight_map, shard):
        for name in ("blocks.0.mystery.weight", key):
            tensors.pop(name)
            weight_map.pop(name)

    _rewrite(ckpt, key, drop)
    with pytest.raises(CheckpointError, match=rf"\[{key}\]: missing"):
        load_dit(ckpt, None, dtype=torch.float32)


def test_lora_errors_are_named(tiny, tmp_path):
    lora = dict(tiny.lora_state)
    lora.pop("blocks.2.ffn.2.lora_B.default.weight")
    save_file(lora, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial.safetensors \[blocks.2.ffn.2\]: missing lora_B"):
        load_dit(tiny.directory, tmp_path / "partial.safetensors", dtype=torch.float32)
    lora = dict(tiny.lora_state) | {"head.head.lora_A.default.weight": torch.zeros(128, 64)}
    save_file(lora, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"\[head.head\]: LoRA adapts"):
        load_dit(tiny.directory, tmp_path / "extra.safetensors", dtype=torch.float32)
    # peft's own prefix and adapter-less names are accepted.
    renamed = {f"base_model.model.{k.replace('.default', '')}": v for k, v in tiny.lora_state.items()}
    save_file(renamed, tmp_path / "peft.safetensors")
    a = official_state_dict(load_dit(tiny.directory, tmp_path / "peft.safetensors", dtype=torch.float32))
    b = official_state_dict(load_dit(tiny.directory, tiny.lora_path, dtype=torch.float32))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_config_is_named(tiny, tmp_path):
    ckpt = _copy_checkpoint(tiny, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["enable_framepack"] = False
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json: enable_framepack=False"):
        load_dit(ckpt, None, dtype=torch.float32)


def test_config_round_trips_through_official_json():
    for cfg in (DiTConfig(), DiTConfig.tiny(), DiTConfig.tiny(audio_layers=25)):
        assert DiTConfig.from_official(json.loads(json.dumps(cfg.to_official()))) == cfg
    # Fields left out of config.json take the official class defaults (then get validated).
    with pytest.raises(ConfigError, match="enable_adain=False"):
        DiTConfig.from_official({"dim": 64})


def test_random_init_is_seeded_and_finite():
    cfg = DiTConfig.tiny()
    a, b = random_init(cfg, "cpu", torch.float32, seed=5), random_init(cfg, "cpu", torch.float32, seed=5)
    c = random_init(cfg, "cpu", torch.float32, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.ffn.0.weight"], sc["blocks.0.ffn.0.weight"])
    assert all(torch.isfinite(t).all() for t in sa.values())
    empty = build_empty(cfg, "cpu", torch.bfloat16)
    assert empty.time_projection[1].weight.dtype == torch.float32
    assert empty.blocks[0].ffn[0].weight.dtype == torch.bfloat16
