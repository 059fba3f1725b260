"""Loading within the budget: each weight goes straight to its final dtype and place, one at a time.

Host memory is measured, not inferred: `LiveBytes` follows every tensor storage torch allocates while it
is active (a dispatch mode sees each op's outputs; a finaliser on the storage sees it freed), so the
peak of live bytes during a load is what the load held at once."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from liveavatar_core.engines.base import GenerationConfig, GiB, SegmentRequest
from liveavatar_core.engines.ladder import generate_with_ladder
from liveavatar_core.engines.liveavatar import backends
from liveavatar_core.engines.liveavatar.backends import Fp8Linear, apply_fp8, fp8_linear_names
from liveavatar_core.engines.liveavatar.checkpoint import load_dit, random_init
from liveavatar_core.engines.liveavatar.components import random_components
from liveavatar_core.engines.liveavatar.config import DiTConfig
from liveavatar_core.engines.liveavatar.engine import LiveAvatarEngine
from liveavatar_core.engines.liveavatar.memory import ModelSizes, estimate_memory
from liveavatar_core.engines.liveavatar.rungs import degrade_ladder, first_fitting
from liveavatar_core.engines.liveavatar.tiny import write_tiny_dit_checkpoint
from liveavatar_core.errors import OutOfMemory
from liveavatar_core.timebase import SAMPLES_PER_FRAME

# Wide enough that the block linears (what fp8 halves) outweigh one tensor's transients many times.
CONFIG = DiTConfig.tiny(dim=256, ffn_dim=1024, num_layers=8, audio_inject_layers=(0, 3, 7))


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the CPU storages created while active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage.data_ptr()
        if key in self.tracked or storage.nbytes() == 0:
            return
        self.tracked.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes


def model_bytes(*modules: torch.nn.Module) -> int:
    storages = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu":
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def one_tensor_allowance(config: DiTConfig) -> int:
    """Transients of the largest single weight: the FFN weight LoRA-merged in float32, cast to bf16 and
    quantised through a float32 copy (10 bytes an element), its LoRA pair in float32, and the largest
    weight of all (time_projection) read in float32."""
    ffn = config.ffn_dim * config.dim
    lora = 128 * (config.dim + config.ffn_dim) * 4
    return ffn * 10 + lora + 6 * config.dim * config.dim * 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_dit_checkpoint(tmp_path_factory.mktemp("dit"), CONFIG, seed=3)


def test_fp8_load_holds_no_more_than_one_tensor_beyond_the_model(checkpoint):
    with LiveBytes() as measured:
        model = load_dit(checkpoint.directory, checkpoint.lora_path, dtype=torch.bfloat16, fp8=True)
    final = model_bytes(model)
    assert len(fp8_linear_names(model)) == 0 and any(isinstance(m, Fp8Linear) for m in model.modules())
    assert measured.peak - final <= one_tensor_allowance(CONFIG), (measured.peak, final)
    # The same measurement sees what loading the whole bf16 model first (then fp8) holds.
    with LiveBytes() as before:
        apply_fp8(load_dit(checkpoint.directory, checkpoint.lora_path, dtype=torch.bfloat16))
    assert before.peak - final > one_tensor_allowance(CONFIG)


def test_fp8_at_load_equals_fp8_after_a_plain_load(checkpoint):
    direct = load_dit(checkpoint.directory, checkpoint.lora_path, dtype=torch.bfloat16, fp8=True)
    after = load_dit(checkpoint.directory, checkpoint.lora_path, dtype=torch.bfloat16)
    apply_fp8(after)
    a, b = direct.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key].float(), b[key].float()), key


def test_random_init_fp8_holds_one_tensor_and_equals_the_plain_draw():
    with LiveBytes() as measured:
        model = random_init(CONFIG, "cpu", torch.bfloat16, seed=5, fp8=True)
    assert measured.peak - model_bytes(model) <= one_tensor_allowance(CONFIG)
    plain = random_init(CONFIG, "cpu", torch.bfloat16, seed=5)
    apply_fp8(plain)
    for (name, x), (_, y) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(x.float(), y.float()), name


def test_random_encoders_are_drawn_straight_into_their_dtype_on_the_host():
    with LiveBytes() as measured:
        parts = random_components(torch.device("cpu"), torch.bfloat16, seed=2, tiny=True)
    encoders = (parts.text.model, parts.audio.model, parts.vae.model)
    for module in encoders:
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    largest = max(p.numel() for m in encoders for p in m.parameters())
    held = measured.peak - model_bytes(parts.dit, *encoders)
    # One float32 draw (and its bf16 cast) beyond the models; casting whole float32 encoders held more.
    assert held <= 6 * largest + one_tensor_allowance(parts.dit.config), held


def test_blocks_on_host_never_reach_the_device(checkpoint):
    # The meta device stands in for the GPU: whatever is placed there has no data at all.
    placed = load_dit(
        checkpoint.directory, checkpoint.lora_path, device="meta", dtype=torch.bfloat16, blocks_on_host=True
    )
    plain = load_dit(checkpoint.directory, checkpoint.lora_path, dtype=torch.bfloat16)
    expected = dict(plain.named_parameters())
    for name, p in placed.named_parameters():
        if name.startswith("blocks."):
            assert p.device.type == "cpu" and torch.equal(p, expected[name]), name
        else:
            assert p.is_meta, name
    # One host buffer per block (what weight streaming copies from), not one per tensor.
    for block in placed.blocks:
        assert len({p.untyped_storage().data_ptr() for p in block.parameters()}) == 1


def test_an_oom_in_the_fp8_probe_is_out_of_memory_and_is_not_cached(monkeypatch):
    device = torch.device("cpu")
    monkeypatch.setattr(backends, "_FP8_PROBES", {})

    def oom(device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(backends, "_probe_fp8", oom)
    with pytest.raises(OutOfMemory, match="fp8 capability probe ran out of device memory"):
        backends.fp8_problem(device)
    assert backends._FP8_PROBES == {}
    monkeypatch.undo()
    monkeypatch.setattr(backends, "_FP8_PROBES", {})
    assert backends.fp8_problem(device) is None  # probed again, with memory: the GPU's real verdict


def test_a_probe_oom_reaches_the_ladder_as_out_of_memory(monkeypatch):
    engine = LiveAvatarEngine(random_weights=True, device="cpu", tiny=True)
    monkeypatch.setattr(backends, "_FP8_PROBES", {})
    real, calls = backends._probe_fp8, []

    def probe(device):  # out of memory for the ladder's look and the first attempt, then fine
        calls.append(device)
        if len(calls) <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        real(device)

    monkeypatch.setattr(backends, "_probe_fp8", probe)
    config = GenerationConfig(height=64, width=64, fp8=True, compile=False)
    frames = 12
    request = SegmentRequest(
        audio=torch.zeros(frames * SAMPLES_PER_FRAME).numpy(),
        num_frames=frames,
        portrait=torch.full((64, 64, 3), 120, dtype=torch.uint8).numpy(),
        prompt="a person speaks",
        seed=0,
        config=config,
    )

    class Sink:
        def write(self, frames):
            pass

        def close(self):
            pass

        def abort(self):
            pass

    outcome = generate_with_ladder(engine, request, Sink)
    first, second = outcome.attempts
    assert first.rung == "requested" and "fp8 capability probe ran out of device memory" in first.error
    assert second.error is None and second.config["fp8"]
    assert backends._FP8_PROBES == {"cpu": None}
    engine.close()


def test_the_ladder_costs_speed_before_quality_and_loads_for_the_rung_that_fits():
    dit = DiTConfig()
    sizes = ModelSizes.from_shapes(dit)

    def estimate(config):
        return estimate_memory(config, dit, sizes).total

    def ladder(precision):
        return degrade_ladder(
            GenerationConfig.for_output("704x384", precision),
            fp8_available=True,
            offload_available=True,
            estimate=estimate,
        )

    bf16 = ladder("bf16")
    costs = [r.costs for r in bf16]
    assert costs == sorted(costs, key=["nothing", "speed", "quality"].index)
    names = [r.name for r in bf16]
    assert names[:5] == ["requested", "encoders-off-gpu", "kv-cache-offload", "weight-offload", "fp8"]
    assert names.index("fp8") < names.index("area-3/4")
    # What a 24 GiB and a 48 GiB card load for (the loader places the weights for that rung).
    assert first_fitting(bf16, estimate, 24 * GiB).name == "weight-offload"
    assert first_fitting(bf16, estimate, 48 * GiB).name == "kv-cache-offload"
    fp8 = ladder("fp8")
    assert "fp8" not in [r.name for r in fp8]  # asked for: not a rung
    assert first_fitting(fp8, estimate, 24 * GiB).name == "kv-cache-offload"
    # Loading's transient is inside the estimate.
    assert estimate_memory(bf16[0].config, dit, sizes).parts["transient"] >= dit.ffn_dim * dit.dim * 10


def test_the_budget_caps_the_allocator_before_anything_loads(monkeypatch):
    """CPU-only CI has no CUDA allocator to cap; what is checked is the call torch makes (the fraction
    of the device) and that the engine makes it before its first weight exists."""
    from liveavatar_core.engines.liveavatar import engine as engine_module
    from liveavatar_core.engines.liveavatar.memory import cap_device_memory

    calls = []

    class Properties:
        total_memory = 80 * GiB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, device: calls.append(("cap", f))
    )
    cuda = torch.device("cuda", 0)
    assert cap_device_memory(cuda, 24 * GiB) == pytest.approx(0.3) and calls == [("cap", 0.3)]
    assert cap_device_memory(cuda, None) == 1.0 and calls[-1] == ("cap", 1.0)
    assert cap_device_memory(cuda, 200 * GiB) == 1.0
    assert cap_device_memory(torch.device("cpu"), 24 * GiB) is None

    calls.clear()
    real = engine_module.random_components
    monkeypatch.setattr(
        engine_module, "cap_device_memory", lambda device, budget: calls.append(("cap", budget))
    )
    monkeypatch.setattr(
        engine_module,
        "random_components",
        lambda *a, **k: calls.append(("load", None)) or real(*a, **k),
    )
    engine = LiveAvatarEngine(random_weights=True, device="cpu", tiny=True, memory_budget_bytes=5 * GiB)
    assert calls[:2] == [("cap", 5 * GiB), ("load", None)]
    assert engine.budget(8 * GiB) == 5 * GiB and engine.budget(2 * GiB) == 2 * GiB
    engine.close()


class _FakeStreams:
    """torch.cuda's stream and event API as no-ops, so weight streaming's bookkeeping (which tensors
    the blocks point at, what is copied where) runs on a CPU that stands in for the device. Ordering
    between streams is what the GPU benchmark checks; this checks the pointers."""

    class Event:
        def record(self, stream=None):
            pass

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_event(self, event):
            pass

    @staticmethod
    def install(monkeypatch):
        import contextlib

        monkeypatch.setattr(backends, "offload_problem", lambda device: None)
        monkeypatch.setattr(torch.cuda, "Event", _FakeStreams.Event)
        monkeypatch.setattr(torch.cuda, "Stream", _FakeStreams.Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStreams.Stream())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


@pytest.mark.parametrize("placed_on_host", [False, True])
def test_weight_streaming_keeps_every_blocks_own_weights_across_forwards(monkeypatch, placed_on_host):
    """Streaming (blocks moved to the host, or loaded there and adopted) gives the plain model's
    outputs forward after forward: each block's host copy stays its own while slots are reused."""
    from tests.engine_liveavatar.test_dit import _block, _inputs, _ring, _sink

    _FakeStreams.install(monkeypatch)
    cfg = DiTConfig.tiny()
    plain = random_init(cfg, "cpu", torch.float32, seed=4)
    streamed = random_init(cfg, "cpu", torch.float32, seed=4, blocks_on_host=placed_on_host)
    offload = backends.BlockWeightOffload(streamed, torch.device("cpu"))
    host = [[t.data_ptr() for t in block] for block in offload.host]
    inp = _inputs(cfg, seed=6)
    outputs = []
    for model in (plain, streamed):
        text, cond = _sink(model, inp)
        ring = _ring(cfg)
        outputs.append(torch.stack([_block(model, inp, text, cond, ring, b) for b in range(3)]))
    assert torch.equal(outputs[0], outputs[1])
    assert [[t.data_ptr() for t in block] for block in offload.host] == host
    offload.remove(to_device=False)  # leaving streaming for an fp8 change: weights stay on the host
    for name, p in streamed.named_parameters():
        assert torch.equal(p, dict(plain.named_parameters())[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a visit to the device needs a CUDA GPU")
def test_an_offloaded_encoder_visits_from_pinned_memory_and_is_not_copied_back():
    """wav2vec2 with `offload_encoders`: on the device during a visit, the same outputs as on the host,
    and afterwards the very same pinned host tensors (pinned once, never copied down)."""
    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.BatchNorm1d(48)).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = module(x)
    cuda = torch.device("cuda")
    seen = []
    for _ in range(2):
        with torch.no_grad(), backends.visiting(module, cuda):
            assert all(t.device.type == "cuda" for t in [*module.parameters(), *module.buffers()])
            torch.testing.assert_close(module(x.to(cuda)).cpu(), expected, rtol=1e-4, atol=1e-4)
        tensors = [*module.parameters(), *module.buffers()]
        assert all(t.device.type == "cpu" and t.is_pinned() for t in tensors)
        seen.append([t.data_ptr() for t in tensors])
    assert seen[0] == seen[1]
    with torch.no_grad():
        assert torch.equal(module(x), expected)
    with backends.visiting(module, torch.device("cpu")):  # a CPU engine: nothing moves
        assert [t.data_ptr() for t in [*module.parameters(), *module.buffers()]] == seen[0]
