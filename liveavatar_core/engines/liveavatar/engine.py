"""The LiveAvatar engine: loaded once per worker, then asked for segment after segment.

`LiveAvatarEngine(checkpoint_dir=..., random_weights=..., device=...)` loads the DiT (LoRA merged),
the umT5 text encoder, wav2vec2 and the Wan2.1 VAE. `generate(request, sink)` runs one segment
(`pipeline.SegmentRun`) with the backends its config asks for (fp8, offload, compile: `backends`),
and returns the handoff bytes the next segment continues from (`handoff`). `estimate_memory` and
`ladder` come from `memory` and `rungs`. A CUDA out-of-memory error frees what the attempt allocated
and becomes our `OutOfMemory`, so the ladder can retry on the next rung with the model still loaded.

Memory: with a `memory_budget_bytes`, the process's CUDA allocator is capped at the budget before
anything loads (`memory.cap_device_memory`), and the weights load straight into the placement of the
first rung of `prepare_for`'s ladder whose estimate fits (fp8 linears, blocks in host memory for
weight streaming): loading never needs more than the segment it prepares for. A request's own budget
caps the allocator for that segment.

After a segment the engine keeps its step rings (where they were: on the device, or in host memory on
the KV-offload rung) under the handoff's `state_id`. The next segment of the same lecture, if it comes
to this engine with that handoff, continues from them exactly ("kept state"); otherwise they are
dropped and the rings are rebuilt by replaying the handoff's last blocks ("replay", the approximate
fallback). The result's details say which (`continuation`), and the manifest records it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ...errors import InputError, OutOfMemory
from ...timebase import SAMPLES_PER_FRAME
from ..base import Engine, FrameSink, GenerationConfig, GiB, Rung, SegmentRequest, SegmentResult
from . import VERSION
from .backends import (
    BackendUnavailable,
    BlockWeightOffload,
    HostRing,
    apply_compile,
    apply_fp8,
    blocks_on_host,
    compile_problem,
    fp8_problem,
    is_fp8,
    offload_problem,
    remove_compile,
    require,
    row_kernels_problem,
    visiting,
)
from .checkpoint import Placement, load_dit, random_init
from .components import (
    CheckpointLayout,
    load_components,
    random_components,
)
from .config import DiTConfig
from .dit import TextContext
from .graphs import BlockGraphs
from .handoff import Handoff
from .kv_cache import CondKVCache
from .memory import ModelSizes, cap_device_memory, estimate_memory, saving_memory
from .order import make_order
from .pipeline import (
    Caches,
    FeatureStream,
    PortraitState,
    SegmentRun,
    StreamSettings,
    Timings,
    prepare_portrait,
)
from .ring import WindowRing, ring_capacity_frames
from .rungs import SIDE_MULTIPLE, degrade_ladder, first_fitting
from .text_encoder import TEXT_LEN
from .vae import TEMPORAL_STRIDE, StreamingDecoder
from .vae_decode import decode_options

_PORTRAITS_KEPT = 2  # portrait states cached per engine (a worker serves one or two lectures at a time)


@dataclass
class KeptState:
    """The step rings and decoder stream a segment ended with, kept for the segment that continues its
    handoff (so it neither replays the rings nor re-primes the decoder)."""

    state_id: str
    key: tuple  # (latent h, latent w, steps, rings on the host): what they fit
    rings: list
    decoder: StreamingDecoder


class LiveAvatarEngine(Engine):
    """LiveAvatar (Wan2.2-S2V-14B + LiveAvatar LoRA), streaming, one GPU."""

    name = "liveavatar"
    version = VERSION

    def __init__(
        self,
        checkpoint_dir: str | None = None,
        random_weights: bool = False,
        device: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        tiny: bool = False,
        settings: StreamSettings | None = None,
        memory_budget_bytes: int | None = None,
        prepare_for: GenerationConfig | None = None,
    ):
        """Load every model once. `random_weights` builds full-size (with `tiny`: test-size) seeded random
        weights instead of reading a checkpoint: for benchmarks and capacity planning, never a fallback.

        `memory_budget_bytes` caps this process's device memory from now on (None: the whole device);
        `prepare_for` (default: `default_config()`) is the config the weights are placed for: its first
        rung that fits the budget decides fp8 and weight streaming at load."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.settings = settings or StreamSettings()
        self.seed = seed
        self.memory_budget_bytes = memory_budget_bytes
        cap_device_memory(self.device, memory_budget_bytes)
        self._fp8_probe()  # before any weight is resident: the verdict is about the GPU, not its memory
        # Set by the placement choice, once the encoders are loaded and every model's size is known.
        self.dit_config: DiTConfig | None = None
        self.sizes: ModelSizes | None = None
        self.prepare_for = prepare_for or self.default_config()
        if random_weights:
            self.layout = None
            self.parts = random_components(self.device, self.dtype, seed, tiny=tiny, choose=self._placement)
        elif checkpoint_dir is None:
            raise InputError(
                "--checkpoint-dir",
                "the liveavatar engine needs the official checkpoints (Wan2.2-S2V-14B/ and LiveAvatar/); "
                "pass --random-weights to run it with random weights for timing",
            )
        else:
            self.layout = CheckpointLayout(Path(checkpoint_dir))
            self.parts = load_components(self.layout, self.device, self.dtype, choose=self._placement)
        dit = self.parts.dit
        self.signature = _signature(dit.config, self.parts.weights)
        for encoder in self.parts.encoders():
            encoder.to("cpu")
        self._encoders_resident: bool | None = False
        self._weight_offload: BlockWeightOffload | None = None
        if blocks_on_host(dit) and self.device.type == "cuda":
            self._weight_offload = BlockWeightOffload(dit, self.device)  # adopts the host weights
        self._text: tuple[str, TextContext] | None = None
        self._portraits: OrderedDict[tuple, PortraitState] = OrderedDict()
        self._host_rings: dict[tuple, list[WindowRing]] = {}
        self._side_stream: torch.cuda.Stream | None = None  # decodes overlapping the DiT (overlap_decode)
        self._kept: KeptState | None = None

    # ----- the Engine contract ------------------------------------------------------------------------

    def default_config(self) -> GenerationConfig:
        return GenerationConfig()

    def estimate_memory(self, config: GenerationConfig, num_frames: int | None = None) -> int:
        return sum(self.memory_parts(config, num_frames).values())

    def memory_parts(self, config: GenerationConfig, num_frames: int | None = None) -> dict[str, int]:
        """The estimate by part (for reports and the benchmark)."""
        blocks = None if num_frames is None else self._blocks(num_frames)
        config = config.replace(
            compile=self._compiles(config),
            cuda_graphs=self._graphs(config),
            overlap_decode=self._overlaps(config),
        )
        return estimate_memory(config, self.dit_config, self.sizes, self.dtype, blocks).parts

    def _blocks(self, num_frames: int) -> int:
        """Blocks a segment of `num_frames` denoises (a block: 3 latent frames, 12 video frames)."""
        return -(-num_frames // (self.dit_config.block_frames * TEMPORAL_STRIDE))

    def ladder(self, config: GenerationConfig) -> list[Rung]:
        return degrade_ladder(
            config,
            fp8_available=self._fp8_probe(),
            offload_available=offload_problem(self.device) is None,
            estimate=self.estimate_memory,
        )

    def _fp8_probe(self) -> bool:
        """Whether fp8 may run here. A probe that ran out of memory leaves the question open: the rung
        stays on the ladder and its attempt probes again (an OOM there is that rung's OutOfMemory)."""
        try:
            return fp8_problem(self.device) is None
        except OutOfMemory:
            return True

    def budget(self, request_budget: int | None = None) -> int | None:
        """The device memory a segment may use: the smaller of the request's and the engine's budgets,
        else the device's free memory (None off CUDA)."""
        given = [b for b in (request_budget, self.memory_budget_bytes) if b is not None]
        return min(given) if given else self._device_capacity()

    def _placement(self, config: DiTConfig, sizes: ModelSizes) -> Placement:
        """Where the DiT loads: as the first rung of `prepare_for`'s ladder whose estimate fits the
        budget wants it (the last rung's placement if none fits: loading then fails honestly, or the
        smallest segment does)."""
        self.dit_config, self.sizes = config, sizes
        rungs = self.ladder(self.prepare_for)
        chosen = first_fitting(rungs, self.estimate_memory, self.budget()).config
        streamed = chosen.offload_weights and offload_problem(self.device) is None
        fp8 = chosen.fp8 and self._fp8_probe()
        return Placement(self.device, self.dtype, fp8=fp8, blocks_on_host=streamed)

    def close(self) -> None:
        if self._weight_offload is not None:
            self._weight_offload = None
        self._text = None
        self._portraits.clear()
        self._host_rings.clear()
        self._kept = None
        self.parts = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----- one segment --------------------------------------------------------------------------------

    def _generate(self, request: SegmentRequest, sink: FrameSink) -> SegmentResult:
        config = request.config
        self._check_config(config)
        estimate = self.estimate_memory(config, request.num_frames)
        # The budget is a limit, not a number: the allocator is capped at it for this segment.
        capacity = self.budget(request.memory_budget_bytes)
        limited = request.memory_budget_bytes is not None or self.memory_budget_bytes is not None
        cap_device_memory(self.device, capacity if limited else None)
        if capacity is not None and estimate > capacity:
            raise OutOfMemory(
                f"{self.name} at {config.size}, {config.steps} steps needs about {estimate / GiB:.1f} GiB, "
                f"more than the {capacity / GiB:.1f} GiB this GPU allows it",
                needed_bytes=estimate,
                budget_bytes=capacity,
            )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            result = self._run(request, sink)
        except torch.OutOfMemoryError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "out of memory"
            traceback.clear_frames(exc.__traceback__)  # the attempt's tensors die with its frames
            exc = None
            self._release_caches()
            raise OutOfMemory(
                f"{self.name} ran out of device memory at {config.size}, {config.steps} steps "
                f"(estimate {estimate / GiB:.1f} GiB): {message}",
                needed_bytes=estimate,
                budget_bytes=capacity,
            ) from None
        result.details["estimate_bytes"] = estimate
        return result

    def _run(self, request: SegmentRequest, sink: FrameSink) -> SegmentResult:
        config = request.config
        self._apply_backends(config)
        timings = Timings()
        text = self._text_context(request.prompt, config, timings)
        handoff, status, replay = self._read_handoff(request)
        dit = self.parts.dit
        h, w = config.height // 8, config.width // 8
        portrait = None
        if handoff is None:
            portrait = self._portrait(request.portrait, config, timings)
        caches, continuation = self._caches(config, h, w, handoff, replay)
        blocks = self._blocks(request.num_frames)
        order = make_order(config.order, config.sweep_blocks)
        features = self._features(request, handoff, blocks * dit.config.block_frames * TEMPORAL_STRIDE)
        run = SegmentRun(
            self.parts,
            request,
            sink,
            settings=self.settings,
            text=text,
            features=features,
            portrait=portrait,
            handoff=handoff,
            continuation=continuation,
            caches=caches,
            order=order,
            model_signature=self.signature,
            timings=timings,
            decode_stream=self._decode_stream() if self._overlaps(config) else None,
        )
        frames, state = run.run()
        state = replace(state, state_id=uuid.uuid4().hex)
        self._kept = KeptState(state.state_id, _rings_key(config, h, w), caches.rings, run.decoder)
        payload = state.to_bytes()
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        details = {
            "weights": self.parts.weights,
            "blocks": blocks,
            "handoff_in": status,
            "continuation": continuation,
            "order": order.name,
            "replayed_blocks": len(handoff.replay) if continuation == "replay" else 0,
            "handoff_bytes": len(payload),
            "next_frame": state.next_frame,
            "timings": timings.as_dict(),
            "chains": dit.blocks[0].chains.name,  # what ran: eager or compiled
            # block forwards replayed as CUDA graphs, and graphs captured, so far in this process
            "graph_replays": dit.graphs.replays if dit.graphs is not None else 0,
            "graph_captures": dit.graphs.captures if dit.graphs is not None else 0,
            "peak_measured": self.device.type == "cuda",
        }
        return SegmentResult(frames, payload, 0.0, peak, details)

    # ----- checks and placement -----------------------------------------------------------------------

    def _check_config(self, config: GenerationConfig) -> None:
        for side, value in (("height", config.height), ("width", config.width)):
            if value < SIDE_MULTIPLE or value % SIDE_MULTIPLE:
                raise InputError(
                    f"liveavatar {side}",
                    f"{value} px: must be a positive multiple of {SIDE_MULTIPLE} (e.g. 704x384)",
                )
        if not 1 <= config.steps <= 8:
            raise InputError(
                "liveavatar steps", f"{config.steps}: the distilled model runs 1..8 steps (4 is its own)"
            )

    def _device_capacity(self) -> int | None:
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device)

    def _apply_backends(self, config: GenerationConfig) -> None:
        """Bring the weights and encoders into the state `config` asks for (cheap when they are)."""
        if config.offload_weights or config.offload_kv_cache:
            require("offload", offload_problem(self.device))
        if config.fp8:
            require("fp8", fp8_problem(self.device))  # an OOM in the probe is this attempt's OutOfMemory
        if self.parts.dit is None:  # a reload an OOM interrupted: load again, placed for this config
            self._reload_dit(config)
        dit = self.parts.dit
        # Weights never come to the device unless this config keeps them there: leaving streaming for
        # an fp8 change keeps them on the host (quantised there, then streamed again).
        if self._weight_offload is not None and (not config.offload_weights or config.fp8 != is_fp8(dit)):
            self._weight_offload.remove(to_device=not config.offload_weights)
            self._weight_offload = None
        if config.fp8 and not is_fp8(dit):
            apply_fp8(dit, self.device)
        elif not config.fp8 and is_fp8(dit):
            self._reload_dit(config)
            dit = self.parts.dit
        if config.offload_weights and self._weight_offload is None:
            self._weight_offload = BlockWeightOffload(dit, self.device)
        elif not config.offload_weights and blocks_on_host(dit):
            offload = BlockWeightOffload(dit, self.device)  # adopts the host weights, then places
            offload.remove(to_device=True)  # them on the device, all or none
        # After fp8, whose new linears start with eager chains.
        row_kernels = self._row_kernels(config)  # refused by name where they cannot run
        if self._compiles(config):
            apply_compile(dit, row_kernels=row_kernels)
        else:
            remove_compile(dit)
        # Graphs bake in the weights' addresses and the chains that ran: new ones when either changes.
        signature = (is_fp8(dit), dit.blocks[0].chains.name)
        if not self._graphs(config):
            dit.graphs = None
        elif dit.graphs is None or dit.graphs.signature != signature:
            dit.graphs = BlockGraphs(self.device, signature)
        # The VAE decoder's fast path (vae_decode.py) goes with compiling (rounding-level differences),
        # one latent a call on the rungs that save memory.
        self.parts.vae.decode_options = decode_options(self._compiles(config), saving_memory(config))
        # Encoders: text runs on the host when offloaded, wav2vec2 visits the device per chunk. The flag
        # is None while a move is under way, so a move an OOM interrupted is redone.
        if config.offload_encoders and self._encoders_resident is not False:
            self._encoders_resident = None
            for encoder in self.parts.encoders():
                encoder.to("cpu")
            self._encoders_resident = False
        elif not config.offload_encoders and self._encoders_resident is not True:
            self._encoders_resident = None
            for encoder in self.parts.encoders():
                encoder.to(self.device)
            self._encoders_resident = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _compiles(self, config: GenerationConfig) -> bool:
        """compile=None: compiled chains on CUDA where dynamo runs (1.2x faster bf16, 1.4x fp8 at 704x384
        on an H100, docs/benchmarks.md), eager elsewhere (on a CPU, compiling costs more than it saves)."""
        if config.compile is not None:
            return config.compile
        return self.device.type == "cuda" and compile_problem() is None

    def _row_kernels(self, config: GenerationConfig) -> bool:
        """One-pass Triton kernels in place of compiled chains: where asked (refused by name where they
        cannot run), and by default wherever they can."""
        problem = row_kernels_problem(self.device)
        if config.row_kernels:
            require("row_kernels", problem)
        wanted = problem is None if config.row_kernels is None else config.row_kernels
        return wanted and self._compiles(config)

    def _graphs(self, config: GenerationConfig) -> bool:
        """CUDA graphs of the block forwards, where asked: only with weights and rings on the GPU (streamed
        ones are copied in by host-side hooks and side streams, which a graph cannot replay)."""
        return self._cuda_only("cuda_graphs", config.cuda_graphs, config)

    def _overlaps(self, config: GenerationConfig) -> bool:
        """Decode on a second stream, where asked: not on the rungs that save memory (the overlap holds
        the DiT's and the decoder's working memory at once)."""
        return self._cuda_only("overlap_decode", config.overlap_decode, config)

    def _cuda_only(self, name: str, asked: bool, config: GenerationConfig) -> bool:
        if asked and self.device.type != "cuda":
            raise BackendUnavailable(name, f"needs a CUDA device, not {self.device}")
        return asked and not saving_memory(config)

    def _decode_stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def _reload_dit(self, config: GenerationConfig) -> None:
        """Back from fp8 to the model dtype: the bf16 weights are gone, so read them again, placed as
        `config` wants (blocks on the host for weight streaming). If this runs out of memory the DiT
        stays unloaded and the next attempt loads it for its own config."""
        self.parts.dit = None  # type: ignore[assignment]
        self._weight_offload = None
        self._text = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        host = config.offload_weights and offload_problem(self.device) is None
        fp8 = config.fp8 and self._fp8_probe()
        if self.layout is None:
            dit = random_init(
                self.dit_config, self.device, self.dtype, seed=self.seed, fp8=fp8, blocks_on_host=host
            )
        else:
            dit = load_dit(
                self.layout.wan,
                self.layout.lora,
                device=self.device,
                dtype=self.dtype,
                fp8=fp8,
                blocks_on_host=host,
            )
        self.parts.dit = dit

    # ----- conditioning ---------------------------------------------------------------------------------

    def _text_context(self, prompt: str, config: GenerationConfig, timings: Timings) -> TextContext:
        """The prompt's cross-attention K/V for every layer: encoded once, kept while the prompt repeats."""
        if self._text is not None and self._text[0] == prompt:
            return self._text[1]
        self._text = None
        start = _clock(self.device)
        # Resident: on the device. Offloaded: on the host CPU, once per prompt (umT5-XXL is 11 GB; the
        # prompt is a few dozen tokens), so the text encoder never takes device memory.
        states = self.parts.text.encode_prompt(prompt)  # [n tokens, text_dim]
        context = self.parts.dit.embed_text([states.to(self.device, self.dtype)])
        self._text = (prompt, context)
        timings.text += _clock(self.device) - start
        return context

    def _portrait(self, image: np.ndarray, config: GenerationConfig, timings: Timings) -> PortraitState:
        key = (
            hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(),
            image.shape,
            config.height,
            config.width,
        )
        if key in self._portraits:
            self._portraits.move_to_end(key)
            return self._portraits[key]
        start = _clock(self.device)
        state = prepare_portrait(
            self.parts,
            image,
            config.height,
            config.width,
            self.parts.dit.config.motion_latent_frames,
            self.settings.decoder_prime_latents,
        )
        timings.prepare += _clock(self.device) - start
        self._portraits[key] = state
        while len(self._portraits) > _PORTRAITS_KEPT:
            self._portraits.popitem(last=False)
        return state

    def _read_handoff(self, request: SegmentRequest) -> tuple[Handoff | None, str, bool]:
        """(state, what became of it, whether its rings are replayed). An area/model mismatch starts the
        segment fresh; a step-count mismatch keeps the sink and decoder but not the rings. Both are
        recorded in the result's details (the manifest shows them)."""
        if request.handoff is None:
            return None, "none", False
        state = Handoff.from_bytes(request.handoff)
        cfg = request.config
        problem = state.mismatch(cfg.height, cfg.width, cfg.steps, self.signature)
        if problem is None:
            return state, "continued", True
        if state.steps != cfg.steps and problem.startswith("it was made with"):
            return state, f"continued without KV replay: {problem}", False
        return None, f"ignored (independent start): {problem}", False

    def _caches(
        self, config: GenerationConfig, h: int, w: int, handoff: Handoff | None, rings_fit: bool
    ) -> tuple[Caches, str]:
        """This attempt's cond cache and step rings, and how the segment continues: "independent" (no
        usable handoff), "no rings" (a handoff without its rings: another step count), "kept state"
        (the rings `handoff` was made with, kept here) or "replay" (rings to be rebuilt from `handoff`).

        Kept rings are taken out whatever happens: an attempt that fails leaves none behind half-written.
        Host rings are allocated once and reused (pinning 40 GB is slow)."""
        kept, self._kept = self._kept, None
        dit_cfg = self.parts.dit.config
        frames = ring_capacity_frames(dit_cfg)
        cond = CondKVCache.allocate(dit_cfg, 1, h, w, device=self.device, dtype=self.dtype)
        if handoff is None:
            continuation = "independent"
        elif not rings_fit:
            continuation = "no rings"
        elif kept is not None and handoff.state_id == kept.state_id and kept.key == _rings_key(config, h, w):
            return Caches(cond, kept.rings, kept.decoder), "kept state"
        else:
            continuation = "replay"
        del kept  # its device rings are free before new ones are allocated
        return self._fresh_caches(config, h, w, cond, frames), continuation

    def _fresh_caches(
        self, config: GenerationConfig, h: int, w: int, cond: CondKVCache, frames: int
    ) -> Caches:
        dit_cfg = self.parts.dit.config
        if not config.offload_kv_cache:
            rings = [
                WindowRing.allocate(
                    dit_cfg, 1, h, w, device=self.device, dtype=self.dtype, capacity_frames=frames
                )
                for _ in range(config.steps)
            ]
            return Caches(cond, rings)
        key = (h, w, config.steps)
        if key not in self._host_rings:
            self._host_rings.clear()
            self._host_rings[key] = [
                WindowRing.allocate(
                    dit_cfg, 1, h, w, device="cpu", dtype=self.dtype, capacity_frames=frames, pin_memory=True
                )
                for _ in range(config.steps)
            ]
        rings = []
        for ring in self._host_rings[key]:
            ring.reset()
            rings.append(HostRing(ring, self.device))
        return Caches(cond, rings)

    def _features(self, request: SegmentRequest, handoff: Handoff | None, frames: int) -> FeatureStream:
        """wav2vec2 features for the segment's blocks, after the previous segment's audio as left context."""
        tail = handoff.audio_tail if handoff is not None else np.zeros(0, np.float32)
        skip = len(tail) // SAMPLES_PER_FRAME
        audio = np.concatenate([tail, request.audio]).astype(np.float32, copy=False)
        chunks = self.parts.audio.iter_features(audio, skip + frames)
        return FeatureStream(self._placed(chunks, self.parts.audio.model), skip)

    def _placed(self, chunks: Iterator[torch.Tensor], encoder: torch.nn.Module) -> Iterator[torch.Tensor]:
        """Pull each chunk with the encoder on the device (an offloaded one visits from host memory)."""
        while True:
            with visiting(encoder, self.device):
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def _release_caches(self) -> None:
        """After an OOM: drop the prompt's K/V (the next rung may place the encoders differently). The
        portrait states stay: they are a few latents on the device and the decoder cache on the host."""
        self._text = None
        self._kept = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _rings_key(config: GenerationConfig, h: int, w: int) -> tuple:
    return (h, w, config.steps, config.offload_kv_cache)


def _signature(config: DiTConfig, weights: str) -> str:
    digest = hashlib.sha256(json.dumps(config.to_official(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{weights}-{digest}"


def _clock(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


__all__ = ["LiveAvatarEngine", "TEXT_LEN"]
