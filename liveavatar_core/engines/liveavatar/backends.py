"""Performance backends, applied to a loaded DiT from outside: fp8 linears, weight offload, KV-cache
offload, torch.compile. Each is chosen by name and raises `BackendUnavailable` (never falls back) when
the device cannot run it.

* fp8: the blocks' linear layers (attention q/k/v/o, FFN, audio injectors) become `Fp8Linear`, e4m3
  weights with one float32 scale per output channel, activations in e4m3 with one scale per token
  (quantised by the chain that produces them, `chains.Fp8Rows`, or per call), multiplied by
  `torch._scaled_mm` with row-wise scales. Embeddings, time MLPs, the head and the audio encoder stay as they
  are (as in the reference). Applied after the LoRA merge, since it quantises the merged weights.
* weight offload: every block's weights live in pinned host memory; two GPU slots hold the block being
  computed and the next one, copied on a side stream while the current block runs. An offloaded
  encoder (`visiting`) is copied up from pinned memory for each use and dropped after, never copied back.
* KV offload: the four step rings live in pinned host memory; each layer's context is copied to the GPU
  on a side stream one layer ahead of the compute, and the block's new keys/values go back.
* compile: the blocks' element-wise chains through `torch.compile` (`chains.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from ...errors import LiveAvatarError, OutOfMemory
from .chains import EAGER, FP8, FP8_MAX, Fp8Rows, compiled_chains, row_kernel_chains, use_chains
from .kv_cache import RingKVCache

# Linear layers inside the blocks that fp8 converts, by their last name parts (all 40 blocks).
_FP8_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
    "audio.attn.q", "audio.attn.k", "audio.attn.v", "audio.attn.o", "audio.norm.linear",
)  # fmt: skip


class BackendUnavailable(LiveAvatarError):
    """A requested backend cannot run on this device or torch build."""

    def __init__(self, backend: str, problem: str):
        super().__init__(f"{backend}: {problem}")
        self.backend = backend
        self.problem = problem


# ---------------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------------

_FP8_PROBES: dict[str, str | None] = {}


def _probe_fp8(device: torch.device) -> None:
    """One tiny e4m3 matmul as `Fp8Linear` runs it (row-wise scales, a bias) on `device`; raises
    when it cannot run."""
    a = torch.ones(16, 16, device=device).to(FP8)
    rows, columns = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
    bias = torch.zeros(16, device=device, dtype=torch.bfloat16)
    torch._scaled_mm(
        a, a.t(), scale_a=rows, scale_b=columns, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
    )


def fp8_problem(device: torch.device) -> str | None:
    """Why fp8 linears cannot run on `device` (None when a probe matmul works).

    The verdict is cached per device. Running out of memory during the probe says nothing about the
    GPU: it raises `OutOfMemory` (what the ladder catches) and caches nothing, so a later call with
    memory to spare probes again."""
    key = str(device)
    if key not in _FP8_PROBES:
        try:
            _probe_fp8(device)
            _FP8_PROBES[key] = None
        except torch.OutOfMemoryError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "out of memory"
            raise OutOfMemory(
                f"the fp8 capability probe ran out of device memory on {device}: {message}"
            ) from None
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            _FP8_PROBES[key] = (
                f"torch._scaled_mm with float8_e4m3fn does not run on {name} ({str(exc).splitlines()[0]}); "
                "fp8 needs an fp8 GPU (compute capability 8.9+: H100, H200, L40S, RTX 40xx)"
            )
    return _FP8_PROBES[key]


def offload_problem(device: torch.device) -> str | None:
    """Offload moves data between a CUDA device and pinned host memory; nothing to do elsewhere."""
    if device.type != "cuda":
        return f"offload keeps tensors in host memory away from a CUDA device; this engine runs on {device}"
    return None


def require(backend: str, problem: str | None) -> None:
    if problem is not None:
        raise BackendUnavailable(backend, problem)


# ---------------------------------------------------------------------------------------------------
# fp8 linears
# ---------------------------------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3, one scale per output channel, and x in e4m3, one scale per token.

    x is either a tensor (quantised here) or `Fp8Rows` a chain already stored quantised."""

    chains = EAGER
    takes_fp8_rows = True  # the chains feeding it store their result quantised (`layers.input_dtype`)

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype  # the float linear's dtype: what the layer returns
        self.register_buffer("weight", weight)  # float8_e4m3fn [out, in]
        self.register_buffer("weight_scale", weight_scale)  # float32 [1, out], dequantisation factors
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, work_device: torch.device | None = None) -> Fp8Linear:
        """Quantise `linear` (on `work_device` when given; the result goes back where the weight was)."""
        w = linear.weight.detach()
        q, scale = quantise_weight(w.to(work_device or w.device))
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q.to(w.device), scale.to(w.device), bias, w.dtype)

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> Fp8Linear:
        """Uninitialised buffers of `linear`'s shape on its device (meta, for `checkpoint.build_placed`)."""
        w = linear.weight
        bias = None if linear.bias is None else torch.empty_like(linear.bias)
        scale = torch.empty((1, w.shape[0]), device=w.device)
        return cls(torch.empty(w.shape, dtype=FP8, device=w.device), scale, bias, w.dtype)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        rows = x if isinstance(x, Fp8Rows) else self.chains.quantise_rows(x)
        shape = rows.values.shape
        flat = rows.reshape(-1, self.in_features)
        fused_bias = self.bias is not None and self.out_dtype in (torch.bfloat16, torch.float16)
        out = torch._scaled_mm(
            flat.values,
            self.weight.t(),  # column-major view of the row-major weight, as _scaled_mm wants
            scale_a=flat.scale,
            scale_b=self.weight_scale,
            bias=self.bias.to(self.out_dtype) if fused_bias else None,
            out_dtype=self.out_dtype,
            use_fast_accum=True,
        )
        if self.bias is not None and not fused_bias:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)


def quantise_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 dequantisation scales [1, out]) with one scale per output channel, on
    `w`'s device. One float32 copy of `w` is the only transient (scaled and clamped in place)."""
    scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [out, 1]
    w32 = w.to(torch.float32, copy=True)
    w32.div_(scale).clamp_(-FP8_MAX, FP8_MAX)
    return w32.to(FP8), scale.reshape(1, -1)


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Module names of the DiT's linears that fp8 converts."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and name.endswith(_FP8_LINEARS)
    ]


def apply_fp8(model: nn.Module, work_device: torch.device | None = None) -> int:
    """Replace the blocks' linears by `Fp8Linear`, one at a time (peak: one weight's float32 copy extra).
    Weights in host memory (weight streaming) are quantised on `work_device` and stay on the host.

    Returns the number of bytes freed where the weights live."""
    device = work_device or next(model.parameters()).device
    require("fp8", fp8_problem(device))
    freed = 0
    with torch.no_grad():
        for name in fp8_linear_names(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            freed += linear.weight.numel() * (linear.weight.element_size() - 1)
            setattr(parent, child, Fp8Linear.from_linear(linear, device))
    return freed


def is_fp8(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


# ---------------------------------------------------------------------------------------------------
# weight offload
# ---------------------------------------------------------------------------------------------------


class BlockWeightOffload:
    """The blocks' weights in pinned host memory, streamed to two GPU slots one block ahead.

    Every module inside block i gets a forward pre-hook that makes block i resident, so any path into
    a block (its forward, or `embed_text` calling a block's cross-attention directly) finds its weights.
    Making block i resident also starts copying block i+1 into the other slot on a side stream.

    The weights leave the device before the slots are allocated (a model that fills the device can be
    offloaded); weights already in host memory (loaded there: `checkpoint.Placement.blocks_on_host`)
    are adopted as they are, never copied to the device.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        require("offload_weights", offload_problem(device))
        self.device = device
        self.blocks = list(model.blocks)
        self.entries = [_tensor_entries(block) for block in self.blocks]
        self.host = []
        pin = torch.cuda.is_available()
        for entries in self.entries:
            tensors = [getattr(m, n) for m, _, n in entries]
            on_host = all(t.device.type == "cpu" and (t.is_pinned() or not pin) for t in tensors)
            # Adopted host tensors are detached: pointing a parameter at a slot later must not move
            # the host copy with it.
            pinned = [t.detach() for t in tensors] if on_host else _pinned_copy(tensors, pin)
            _point(entries, pinned)  # this block's device copy (if any) is freed here
            self.host.append(pinned)
        torch.cuda.empty_cache()
        # Slots: one GPU tensor per (entry position, shape, dtype); blocks with and without audio
        # injectors differ. An OOM here leaves the weights on the host, where a retry adopts them.
        self.slots: list[dict[tuple, torch.Tensor]] = [{}, {}]
        for host in self.host:
            for j, tensor in enumerate(host):
                for slot in self.slots:
                    key = (j, tuple(tensor.shape), tensor.dtype)
                    if key not in slot:
                        slot[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        self.owner: list[int | None] = [None, None]
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.current: int | None = None
        self.current_slot = 0
        self.stream = torch.cuda.Stream(device)
        self.hooks = [
            module.register_forward_pre_hook(_resident_hook(self, i))
            for i, block in enumerate(self.blocks)
            for module in block.modules()
        ]

    def slot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self.slots for t in slot.values())

    def ensure(self, i: int) -> None:
        """Make block i's weights resident (waiting for its copy), and start copying block i+1."""
        if self.current == i:
            return
        slot = self.owner.index(i) if i in self.owner else 1 - self.current_slot
        if self.owner[slot] != i:
            self._load(i, slot)
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        _point(self.entries[i], self._slot_tensors(i, slot))
        self.current, self.current_slot = i, slot
        following = (i + 1) % len(self.blocks)
        if following != i and following not in self.owner:
            self._load(following, 1 - slot)

    def _slot_tensors(self, i: int, slot: int) -> list[torch.Tensor]:
        return [self.slots[slot][(j, tuple(t.shape), t.dtype)] for j, t in enumerate(self.host[i])]

    def _load(self, i: int, slot: int) -> None:
        previous = self.owner[slot]
        if previous is not None:
            _point(self.entries[previous], self.host[previous])
            if self.current == previous:
                self.current = None
        # Whatever the compute stream has queued so far (the previous owner's use of this slot) must
        # finish before the copy overwrites it.
        free = torch.cuda.Event()
        free.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(free)
            for dst, src in zip(self._slot_tensors(i, slot), self.host[i], strict=True):
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.owner[slot], self.ready[slot] = i, done

    def remove(self, to_device: bool = True) -> None:
        """Undo the streaming: hooks removed, slots freed. `to_device`: the weights become ordinary
        device tensors again (all copied before any is switched, so an OOM leaves the streaming in
        place); otherwise they stay in host memory (to be converted, or adopted by a new offload)."""
        torch.cuda.synchronize(self.device)
        if to_device:
            placed = [[t.to(self.device) for t in pinned] for pinned in self.host]
        else:
            placed = self.host
        for hook in self.hooks:
            hook.remove()
        for entries, tensors in zip(self.entries, placed, strict=True):
            _point(entries, tensors)
        self.slots = [{}, {}]
        self.host = []


@contextmanager
def visiting(module: nn.Module, device: torch.device) -> Iterator[None]:
    """`module`, kept in host memory, on `device` for the duration (wav2vec2 per audio chunk when the
    encoders are offloaded). Its tensors move once into one pinned buffer, are copied up without
    blocking the host at each visit, and on leaving point back at the pinned copies: inference changes
    no weight, so nothing is copied down. A module already on the device (or a CPU engine) stays put."""
    entries = _tensor_entries(module)
    tensors = [getattr(m, name).detach() for m, _, name in entries]
    if device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
        yield
        return
    if not all(t.is_pinned() for t in tensors):
        tensors = _pinned_copy(tensors)
        _point(entries, tensors)  # kept between visits
    _point(entries, [t.to(device, non_blocking=True) for t in tensors])
    try:
        yield
    finally:
        _point(entries, tensors)


def blocks_on_host(model: nn.Module) -> bool:
    """Whether the DiT's block weights live in host memory (loaded or left there for streaming)."""
    return next(model.blocks[0].parameters()).device.type == "cpu" and (
        next(model.parameters()).device.type != "cpu"
    )


def _resident_hook(offload: BlockWeightOffload, i: int) -> Callable:
    def hook(module, args):
        offload.ensure(i)

    return hook


def pinned_buffer_views(tensors: list[torch.Tensor], pin: bool = True) -> list[torch.Tensor]:
    """Uninitialised host tensors shaped like `tensors` (any device, meta too), views of one (pinned)
    buffer: pinned allocations are rounded up to powers of two, so one per tensor would waste up to
    half the memory."""
    align = 64
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // align) * align
    buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    return [
        buffer[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        for t, offset in zip(tensors, offsets, strict=True)
    ]


def _pinned_copy(tensors: list[torch.Tensor], pin: bool = True) -> list[torch.Tensor]:
    """Copies of `tensors` in one pinned host buffer (`pinned_buffer_views`)."""
    copies = pinned_buffer_views(tensors, pin)
    for view, t in zip(copies, tensors, strict=True):
        view.copy_(t)
    return copies


def _tensor_entries(block: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, 'param' | 'buffer', name) for every tensor a block owns, in a fixed order."""
    entries = []
    for module in block.modules():
        entries += [(module, "param", n) for n, p in module._parameters.items() if p is not None]
        entries += [(module, "buffer", n) for n, b in module._buffers.items() if b is not None]
    return entries


def _point(entries: list[tuple[nn.Module, str, str]], tensors: list[torch.Tensor]) -> None:
    for (module, kind, name), tensor in zip(entries, tensors, strict=True):
        if kind == "param":
            module._parameters[name].data = tensor
        else:
            module._buffers[name] = tensor


# ---------------------------------------------------------------------------------------------------
# KV offload
# ---------------------------------------------------------------------------------------------------


class HostRing:
    """A step's ring cache in pinned host memory, copied to the GPU on a side stream ahead of use.

    It is told what comes next, never guesses: in block order `forward_block` announces each layer's
    reads (`prefetch`) one layer ahead; in sweep order the sweep opens one whole layer at a time
    (`open_layer`, naming the layer it opens next), works on it on the GPU and closes it (the layer goes
    back to host memory). Writes in block order (the block's new keys/values, 3 frames) go to host memory
    on the compute stream.
    """

    def __init__(self, ring: RingKVCache, device: torch.device):
        require("offload_kv_cache", offload_problem(device))
        self.ring = ring
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pending: dict[tuple, tuple[list, list, torch.cuda.Event]] = {}

    @property
    def tokens_per_frame(self) -> int:
        return self.ring.tokens_per_frame

    @property
    def slot_frames(self) -> list[int]:
        return self.ring.slot_frames

    @property
    def capacity_frames(self) -> int:
        return self.ring.capacity_frames

    def reset(self) -> None:
        self.ring.reset()
        self.pending.clear()

    def first_slot(self, frame_index: int, frames: int) -> int:
        return self.ring.first_slot(frame_index, frames)

    def commit(self, frame_index: int, frames: int) -> None:
        self.ring.commit(frame_index, frames)

    def context_ranges(self, frame_index: int, frames: int) -> tuple[list[range], list[range]]:
        return self.ring.context_ranges(frame_index, frames)

    def context_plan(self, frame_indices: list[int], frames: int) -> list[tuple[list[range], list[range]]]:
        return self.ring.context_plan(frame_indices, frames)

    # ----- block order ----------------------------------------------------------------------------

    def prefetch(self, layer: int, ranges: list[list[range]]) -> None:
        """Start copying `layer`'s `ranges` (each list: one later `read`) to the GPU."""
        if layer >= self.ring.k.shape[0]:
            return
        for part in ranges:
            key = (layer, tuple(part))
            if key not in self.pending:
                self.pending[key] = self._copy_in(
                    [self.ring.k[layer, :, r.start : r.stop] for r in part]
                    + [self.ring.v[layer, :, r.start : r.stop] for r in part]
                )

    def read(self, layer: int, ranges: list[range], device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        entry = self.pending.pop((layer, tuple(ranges)), None)
        if entry is None:  # not announced: a plain copy on the compute stream
            return self.ring.read(layer, ranges, self.device)
        tensors = self._arrived(entry)
        return tensors[: len(ranges)], tensors[len(ranges) :]

    def write(self, layer: int, frame_index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.ring.write(layer, frame_index, k, v)

    # ----- sweep order ----------------------------------------------------------------------------

    def open_layer(self, layer: int, following: int | None) -> RingKVCache:
        entry = self.pending.pop(("layer", layer), None)
        if entry is None:
            entry = self._copy_in([self.ring.k[layer : layer + 1], self.ring.v[layer : layer + 1]])
        k, v = self._arrived(entry)
        if following is not None and ("layer", following) not in self.pending:
            self.pending[("layer", following)] = self._copy_in(
                [self.ring.k[following : following + 1], self.ring.v[following : following + 1]]
            )
        return replace(self.ring, k=k, v=v)

    def close_layer(self, layer: int, view: RingKVCache) -> None:
        self.ring.k[layer : layer + 1].copy_(view.k, non_blocking=True)
        self.ring.v[layer : layer + 1].copy_(view.v, non_blocking=True)

    # ----- copies ---------------------------------------------------------------------------------

    def _copy_in(self, sources: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        queued = torch.cuda.Event()  # host writes queued so far must land before we read
        queued.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(queued)
            copies = [t.to(self.device, non_blocking=True) for t in sources]
            done = torch.cuda.Event()
            done.record(self.stream)
        return copies, done

    def _arrived(self, entry: tuple[list[torch.Tensor], torch.cuda.Event]) -> list[torch.Tensor]:
        copies, done = entry
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for t in copies:
            t.record_stream(compute)  # allocated on the side stream, used (and freed) on this one
        return copies


# ---------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------


def compile_problem() -> str | None:
    """Why torch.compile cannot run here (None when it can)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported by this Python/torch build"
    return None


def row_kernels_problem(device: torch.device) -> str | None:
    """Why the one-pass Triton kernels cannot run here (None when they can)."""
    if device.type != "cuda":
        return f"needs a CUDA device, not {device}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs the triton package (torch's CUDA wheels bring it)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return (
            f"needs a GPU of compute capability 8.0 or newer (bf16), not {torch.cuda.get_device_name(device)}"
        )
    return None


def apply_compile(model: nn.Module, row_kernels: bool = False) -> None:
    """Run the model's element-wise chains compiled (`chains.py`), the fp8 ones as one-pass Triton
    kernels if asked (`row_kernels.py`)."""
    require("compile", compile_problem())
    use_chains(model, row_kernel_chains() if row_kernels else compiled_chains())


def remove_compile(model: nn.Module) -> None:
    """Back to eager chains."""
    use_chains(model, EAGER)


__all__ = [
    "FP8_MAX",
    "BackendUnavailable",
    "BlockWeightOffload",
    "Fp8Linear",
    "HostRing",
    "apply_compile",
    "compile_problem",
    "apply_fp8",
    "blocks_on_host",
    "pinned_buffer_views",
    "quantise_weight",
    "remove_compile",
    "row_kernels_problem",
    "fp8_linear_names",
    "fp8_problem",
    "is_fp8",
    "offload_problem",
]
