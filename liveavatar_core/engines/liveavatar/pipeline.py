"""One segment: the causal generation loop of LiveAvatar with bounded memory.

Phases of `SegmentRun.run`:

1. **conditioning**: the prompt's cross-attention K/V (cached by prompt, once per job), the audio
   features (wav2vec2 in bounded chunks, pulled as blocks need them), and the sink inputs: from the
   portrait for an independent segment (cached per portrait), else from the handoff.
2. **state**: the cond (sink) K/V cache from one sink forward; the step rings and the VAE decoder
   stream as the previous segment left them (kept by the engine), else empty rings refilled by replaying
   the handoff's last blocks and a fresh decoder stream primed with the latents it had seen.
3. **blocks**: for each 3-latent-frame block (12 video frames): `steps` DiT forwards over only the
   block's tokens, each against its own step's ring, with Euler steps in float32 between them, in the
   order `order.py` runs them (block after block, or step-major sweeps); then, in block order, each
   block is decoded (3 latents in, 12 frames out, no context re-decoded) and written to the sink,
   the last block trimmed to the segment's frame count. Video frame k of the segment shows audio frame
   k: nothing is dropped (the reference drops 3 frames of its first clip while its audio starts at 0).
   With a `decode_stream` a block is decoded on that second CUDA stream while the next block's DiT
   runs, and its frames are written once the next block's latents are out (one block later).
4. **handoff**: the state the next segment starts from.

Randomness is keyed by (seed, clip index): a clip's noise and its sink distances (the reference draws
randint(4, 30) unseeded on every forward) are the same whether its segment started at this clip or
earlier, so splitting a lecture differently changes no random draw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ...timebase import FPS, SAMPLES_PER_FRAME
from ..base import FrameSink, SegmentRequest
from .components import Components
from .dit import TextContext
from .handoff import Handoff, ReplayBlock
from .kv_cache import CondKVCache
from .order import BlockWork, DenoisingOrder
from .scheduler import FlowMatchSchedule
from .vae import TEMPORAL_STRIDE, StreamingDecoder, uint8_frames


@dataclass(frozen=True)
class StreamSettings:
    """Constants of the streaming loop; latent and block counts follow from these and the DiT config."""

    frames_per_clip: int = 48  # video frames per clip: the unit of noise and sink-distance draws
    sink_distance: tuple[int, int] = (4, 30)  # inclusive range, as the reference's randint(4, 30)
    rolling_sink: bool = True  # from clip 1 on the sink is the first generated latent (reference TPP)
    audio_context_seconds: float = 5.0  # audio carried to the next segment as wav2vec2 left context
    decoder_prime_latents: int = 7  # motion latents the decoder sees before the first block (reference TPP)

    def latent_frames_per_clip(self) -> int:
        return self.frames_per_clip // TEMPORAL_STRIDE

    def audio_context_frames(self) -> int:
        return round(self.audio_context_seconds * FPS)


@dataclass
class Timings:
    """Seconds per phase (device-synchronised at phase ends)."""

    text: float = 0.0
    audio: float = 0.0
    prepare: float = 0.0  # portrait encode / decoder priming / replay / sink forwards
    dit: float = 0.0
    vae: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class PortraitState:
    """What an independent segment derives from its portrait, kept per portrait by the engine."""

    reference: torch.Tensor  # [1, 16, 1, h, w] float32 on the device
    motion: torch.Tensor  # [1, 16, motion, h, w] float32 on the device
    primer: torch.Tensor  # [1, 16, k, h, w]: the latents the decoder was primed with
    decoder_cache: list  # decoder state after priming with the motion buffer (host tensors / markers)
    decoder_latents_in: int


@dataclass
class Caches:
    """Per-attempt device state: the cond cache and one ring per step (rings may live on the host), and
    the decoder stream the previous segment ended with when its state was kept (else None)."""

    cond: CondKVCache
    rings: list = field(default_factory=list)
    decoder: StreamingDecoder | None = None


def decoder_context_latents(decoder: torch.nn.Module) -> int:
    """Latents of temporal receptive field of a causal Wan decoder (38 for Wan2.1).

    Each causal conv of temporal kernel k looks k-1 steps back at its own rate; the rate doubles after
    every temporal upsampler (a `time_conv`). A fresh decoder fed the last this-many latents of a stream
    ends with exactly the stream's cache."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    rate, field_ = 1.0, 0.0
    for name, module in decoder.named_modules():
        if isinstance(module, WanCausalConv3d):
            field_ += (module.kernel_size[0] - 1) / rate
            if name.endswith("time_conv"):
                rate *= 2
    return int(np.ceil(field_))


def draw_seed(seed: int, clip: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (request seed, clip index, what is drawn)."""
    entropy = [seed % 2**64 & 0xFFFFFFFF, seed % 2**64 >> 32, clip, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class FeatureStream:
    """Per-video-frame audio features pulled block by block from a chunked extractor (bounded memory)."""

    def __init__(self, chunks: Iterator[torch.Tensor], skip: int):
        self.chunks = chunks
        self.buffer: torch.Tensor | None = None
        self.skip = skip  # leading frames that are left context only

    def take(self, n: int) -> torch.Tensor:
        """The next n frames' features, float32 [n, layers, hidden] on the CPU."""
        while self.buffer is None or self.buffer.shape[0] < self.skip + n:
            chunk = next(self.chunks).float().cpu()
            self.buffer = chunk if self.buffer is None else torch.cat([self.buffer, chunk])
        out = self.buffer[self.skip : self.skip + n]
        self.buffer = self.buffer[self.skip + n :]
        self.skip = 0
        return out


class SegmentRun:
    """Generate one segment; see the module docstring for the phases."""

    def __init__(
        self,
        parts: Components,
        request: SegmentRequest,
        sink: FrameSink,
        *,
        settings: StreamSettings,
        text: TextContext,
        features: FeatureStream,
        portrait: PortraitState | None,
        handoff: Handoff | None,
        continuation: str,
        caches: Caches,
        order: DenoisingOrder,
        model_signature: str,
        timings: Timings,
        decode_stream: torch.cuda.Stream | None = None,
    ):
        self.parts = parts
        self.dit = parts.dit
        self.request = request
        self.sink = sink
        self.settings = settings
        self.text = text
        self.features = features
        self.caches = caches
        self.order = order
        self.timings = timings
        self.signature = model_signature
        self.decode_stream = decode_stream
        cfg = request.config
        self.schedule = FlowMatchSchedule.distilled(cfg.steps)
        self.block_frames = self.dit.config.block_frames
        self.frames_per_block = self.block_frames * TEMPORAL_STRIDE
        self.ring_blocks = self.dit.config.ring_frames // self.block_frames
        self.clip_latents = settings.latent_frames_per_clip()
        self.decoder = parts.vae.decoder_stream()
        self.decoder_context = decoder_context_latents(parts.vae.model.decoder)
        self.portrait, self.handoff, self.continuation = portrait, handoff, continuation
        self.cond_sink: str | None = None  # which sink the cond cache holds: "reference" | "rolled"
        self._noise: dict[int, torch.Tensor] = {}
        self._distances: dict[int, np.ndarray] = {}

    # ----- randomness keyed by clip ----------------------------------------------------------------

    def noise(self, frame_index: int) -> torch.Tensor:
        """The block's slice of its clip's noise, float32 [1, 16, block_frames, h, w] on the device."""
        clip, offset = divmod(frame_index, self.clip_latents)
        if clip not in self._noise:
            self._noise = {}  # one clip at a time
            h, w = self.request.config.height // 8, self.request.config.width // 8
            g = torch.Generator().manual_seed(draw_seed(self.request.seed, clip, 0))
            self._noise[clip] = torch.randn(1, 16, self.clip_latents, h, w, generator=g).to(self.dit.device)
        return self._noise[clip][:, :, offset : offset + self.block_frames]

    def sink_distances(self, frame_index: int) -> tuple[int, ...]:
        clip, offset = divmod(frame_index, self.clip_latents)
        if clip not in self._distances:
            rng = np.random.default_rng(draw_seed(self.request.seed, clip, 1))
            low, high = self.settings.sink_distance
            self._distances = {
                clip: rng.integers(
                    low, high + 1, size=(self.clip_latents // self.block_frames, self.schedule.steps)
                )
            }
        return tuple(int(d) for d in self._distances[clip][offset // self.block_frames])

    # ----- state ----------------------------------------------------------------------------------

    def _sink_for(self, frame_index: int) -> str:
        rolled = (
            self.settings.rolling_sink and frame_index >= self.clip_latents and self.sink_latent is not None
        )
        return "rolled" if rolled else "reference"

    def _start_state(self) -> None:
        """Sink inputs, VAE decoder and rings as the previous segment left them (or fresh)."""
        device = self.dit.device
        if self.handoff is None:
            p = self.portrait
            self.reference, self.motion, self.sink_latent = p.reference, p.motion, None
            self.decoder.cache = [
                t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in p.decoder_cache
            ]
            self.decoder.latents_in = p.decoder_latents_in
            self.history = p.primer[:, :, -self.decoder_context :].to(device)
            self.next_frame = 0
            self.window: list[ReplayBlock] = []
            return
        s = self.handoff
        self.reference = s.reference_latent.to(device)
        self.motion = s.motion_latents.to(device)
        self.sink_latent = None if s.sink_latent is None else s.sink_latent.to(device)
        self.history = s.decoder_latents.to(device)
        kept, self.caches.decoder = self.caches.decoder, None
        if self.continuation == "kept state" and kept is not None and kept.options == self.decoder.options:
            self.decoder = kept  # as the previous segment left it: the same state, no re-prime
        else:
            del kept
            self.decoder.prime(self.history)
        self.next_frame = s.next_frame
        rings_continue = self.continuation in ("replay", "kept state")
        self.window = list(s.replay) if rings_continue else []
        if self.continuation == "replay":  # else the rings are as the previous segment left them, or empty
            self.order.replay(self, self.window)

    # ----- the loop ---------------------------------------------------------------------------------

    def run(self) -> tuple[int, Handoff]:
        t0 = _now(self.dit.device)
        self._start_state()
        self.timings.prepare += _now(self.dit.device) - t0
        frames_left = self.request.num_frames
        blocks = -(-frames_left // self.frames_per_block)
        frame_indices = [self.next_frame + b * self.block_frames for b in range(blocks)]
        pending: Callable[[], np.ndarray] | None = None  # the block decoding on the side stream
        for latents in self.order.denoise(self, frame_indices):
            decoded = self._decode(latents)
            self.history = torch.cat([self.history, latents], dim=2)[:, :, -self.decoder_context :]
            if pending is not None:
                frames_left = self._write(pending(), frames_left)
            pending = decoded
        if pending is not None:
            self._write(pending(), frames_left)
        self.next_frame += blocks * self.block_frames
        return self.request.num_frames, self._handoff()

    def _decode(self, latents: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start decoding a block; the returned call gives its uint8 frames [12, H, W, 3] on the host.
        Without a decode stream that is now; with one the decode is queued behind the block's DiT on
        the side stream (frames copied into pinned memory) and the call waits for it."""
        t0 = _now(self.dit.device)
        stream = self.decode_stream
        if stream is None:
            frames = self.decoder.decode_uint8(latents)
            self.timings.vae += time.perf_counter() - t0
            return lambda: frames
        stream.wait_stream(torch.cuda.current_stream(self.dit.device))
        # Tensors made on the compute stream and read on the side stream: not to be reused before.
        for t in [latents, *self.decoder.cache]:
            if isinstance(t, torch.Tensor):
                t.record_stream(stream)
        with torch.cuda.stream(stream):
            pixels = uint8_frames(self.decoder.decode(latents))
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self.timings.vae += time.perf_counter() - t0

        def frames() -> np.ndarray:
            t1 = time.perf_counter()
            done.synchronize()
            self.timings.vae += time.perf_counter() - t1
            return host.numpy()

        return frames

    def _write(self, frames: np.ndarray, frames_left: int) -> int:
        """Write a block's frames, the segment's last block trimmed; returns the frames still to come."""
        n = min(frames_left, frames.shape[0])
        self.sink.write(frames[:n])
        return frames_left - n

    # ----- what the denoising order (`order.py`) asks of the segment --------------------------------

    def begin_block(self, frame_index: int) -> BlockWork:
        """The block's audio (features taken in block order), sink distances and noise."""
        t0 = time.perf_counter()
        features = self.features.take(self.frames_per_block)  # [12, layers, hidden]
        audio_input = features.permute(1, 2, 0)[None].to(self.dit.device)  # [1, layers, hidden, 12]
        self.timings.audio += _now(self.dit.device) - t0
        with self.timed_dit():
            audio = self.dit.encode_audio(audio_input)
        return BlockWork(
            frame_index, self.noise(frame_index), audio, audio_input, self.sink_distances(frame_index)
        )

    def end_block(self, work: BlockWork) -> None:
        """A block is clean: keep the rolling sink, slide the replay window."""
        if work.frame_index == 0:
            self.sink_latent = work.x[:, :, :1].clone()  # the rolling sink: the first generated latent
        block = ReplayBlock(work.frame_index, work.distances, torch.stack(work.inputs), work.audio_input)
        self.window = [*self.window, block][-self.ring_blocks :]  # host copies at handoff

    @contextmanager
    def timed_dit(self) -> Iterator[None]:
        t0 = _now(self.dit.device)
        yield
        self.timings.dit += _now(self.dit.device) - t0

    def ensure_cond(self, frame_index: int) -> None:
        """The cond cache holds the sink this block attends to (the portrait, or the rolled sink)."""
        which = self._sink_for(frame_index)
        if which != self.cond_sink:
            latent = self.sink_latent if which == "rolled" else self.reference
            self.dit.forward_sink(latent, self.motion, self.text, self.caches.cond)
            self.cond_sink = which

    def _handoff(self) -> Handoff:
        cfg = self.request.config
        return Handoff(
            height=cfg.height,
            width=cfg.width,
            steps=cfg.steps,
            next_frame=self.next_frame,
            model=self.signature,
            reference_latent=self.reference.float().cpu(),
            sink_latent=None if self.sink_latent is None else self.sink_latent.float().cpu(),
            motion_latents=self.motion.float().cpu(),
            decoder_latents=self.history.float().cpu(),
            replay=tuple(_on_host(block) for block in self.window),
            audio_tail=audio_tail(self.handoff, self.request.audio, self.settings.audio_context_frames()),
        )


def audio_tail(previous: Handoff | None, audio: np.ndarray, frames: int) -> np.ndarray:
    """The last `frames` whole video frames of audio (this segment's, preceded by the previous tail)."""
    before = previous.audio_tail if previous is not None else np.zeros(0, np.float32)
    padded = np.zeros(-(-len(audio) // SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME, np.float32)
    padded[: len(audio)] = audio  # the segment's last partial frame is completed with silence
    joined = np.concatenate([before, padded])
    return joined[-frames * SAMPLES_PER_FRAME :].copy() if frames else np.zeros(0, np.float32)


def fit_portrait(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale to cover height x width keeping the aspect ratio, then crop the centre (the reference's
    Resize(shorter side) + CenterCrop). Antialiased bicubic, on the CPU, uint8 [height, width, 3]."""
    h0, w0 = image.shape[:2]
    scale = max(height / h0, width / w0)
    h1, w1 = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if (h1, w1) != (h0, w0):
        x = torch.nn.functional.interpolate(
            x, size=(h1, w1), mode="bicubic", antialias=True, align_corners=False
        )
    top, left = (h1 - height) // 2, (w1 - width) // 2
    x = x[0, :, top : top + height, left : left + width].round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def prepare_portrait(
    parts: Components, image: np.ndarray, height: int, width: int, motion_latents: int, prime_latents: int
) -> PortraitState:
    """Encode the portrait as the reference does (5-frame still: the sink latent; 365-frame still: the
    motion buffer) and prime a decoder with the buffer's first `prime_latents` latents, as the
    reference's streaming decoder does, so the first block decodes to 12 frames."""
    vae = parts.vae
    pixels = fit_portrait(image, height, width)
    clip = vae.encode_motion(pixels)
    reference = vae.encode_reference(pixels).float()
    primer = clip.full()[:, :, :prime_latents].float()
    decoder: StreamingDecoder = vae.decoder_stream()
    decoder.prime(primer)
    return PortraitState(
        reference=reference,
        motion=clip.last(motion_latents).float(),
        primer=primer,
        decoder_cache=[_kept_on_host(t) if isinstance(t, torch.Tensor) else t for t in decoder.cache],
        decoder_latents_in=decoder.latents_in,
    )


def _kept_on_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of t, pinned when t is on a GPU: the primed decoder state (1.2 GB at 704x384) goes
    back up at every segment that starts from the portrait, so without blocking and at pinned speed.
    (Round 7's profile found 0.18 s of pageable copies at such a segment's start, which its size fits;
    docs/engine-speed.md.)"""
    if not t.is_cuda:
        return t.cpu()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def _on_host(block: ReplayBlock) -> ReplayBlock:
    """A replay block with its tensors on the host: the window keeps them on the GPU while the segment
    runs (no device-to-host copy and sync per block), the handoff carries host copies."""
    return replace(block, inputs=block.inputs.cpu(), audio=block.audio.cpu())


def _now(device: torch.device) -> float:
    """The time once the compute stream is done (a decode on the side stream keeps running)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()


__all__ = [
    "Caches",
    "FeatureStream",
    "PortraitState",
    "SegmentRun",
    "StreamSettings",
    "Timings",
    "audio_tail",
    "decoder_context_latents",
    "draw_seed",
    "fit_portrait",
    "prepare_portrait",
]
