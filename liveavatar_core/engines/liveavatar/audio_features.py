"""Audio features for the DiT: wav2vec2 hidden states, resampled to 30 Hz, one row per 25 fps video frame.

What the reference does (s2v/audio_encoder.py and the causal pipeline's `encode_audio`):

1. Wav2Vec2Processor: the whole waveform (16 kHz) is normalised to zero mean, unit variance
   ((x - mean) / sqrt(var + 1e-7), preprocessor_config `do_normalize`).
2. wav2vec2-large-xlsr-53-english with `output_hidden_states`: 25 states at 50 Hz (one per 320 samples,
   each seeing 400), in transformers 4.x's order for the stable-layer-norm encoder: the input of each of
   the 24 layers, then the final LayerNorm of the last layer's output.
3. `linear_interpolation`: F.interpolate(mode='linear', align_corners=True) from T frames to
   L = int(T / 50 * 30) frames, i.e. sample positions j * (T - 1) / (L - 1), not j * 50 / 30.
4. `get_audio_embed_bucket_fps(fps=25, m=0)`: video frame k takes row round(k * 30 / 25) of that, or
   zeros when that row is past the end (the last frame or two of a file).

Here the 50 Hz states are computed in bounded chunks: each chunk of output frames runs wav2vec2 on its
own audio plus `context_frames` of audio each side, and keeps only its own frames. The convolutional
parts (feature encoder, 400 samples; positional conv, +-64 frames in xlsr-53) are then exact; the 24
self-attention layers see every frame of the input, so away from the chunk's own edges the result matches
a one-shot pass only as far as attention to audio seconds away is negligible. The interpolation positions
and frame indices are computed from the whole input's length, as in one shot. Memory is bounded by the
chunk, whatever the length of the audio.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2Model

from ...errors import InputError
from ...timebase import AUDIO_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME
from .config import CheckpointError, ConfigError

WAV2VEC2_RATE = 50  # wav2vec2 frames per second at 16 kHz (stride 320)
FEATURE_RATE = 30  # the reference's intermediate rate ("video_rate" in its AudioEncoder)


@dataclass(frozen=True)
class ChunkPlan:
    """How the 50 Hz states are computed: `chunk_frames` kept per forward, `context_frames` each side."""

    chunk_frames: int = 1000  # 20 s of audio kept per wav2vec2 forward
    context_frames: int = 250  # 5 s of audio each side, computed and dropped


class AudioFeatureExtractor:
    """wav2vec2 (HF format) -> per-video-frame features [frames, layers + 1, hidden] (25 x 1024 full size)."""

    def __init__(self, model: Wav2Vec2Model, *, do_normalize: bool = True, plan: ChunkPlan = ChunkPlan()):
        config = model.config
        if config.feat_extract_norm != "layer":
            # group norm in the feature encoder normalises over time: chunks would not be exact.
            raise ConfigError("wav2vec2 config.json", "feat_extract_norm must be 'layer' (as in xlsr-53)")
        self.model = model.eval().requires_grad_(False)
        self.do_normalize = do_normalize
        self.plan = plan
        # The feature encoder's valid convolutions: frame j sees samples [stride*j, stride*j + field).
        self.stride = int(np.prod(config.conv_stride))
        field = 1
        for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride), strict=True):
            field = (field - 1) * stride + kernel
        self.field = field
        if self.stride * WAV2VEC2_RATE != AUDIO_SAMPLE_RATE:
            raise ConfigError(
                "wav2vec2 config.json", f"conv strides give {self.stride} samples per frame, not 320"
            )

    @classmethod
    def load(cls, folder: str | Path, plan: ChunkPlan = ChunkPlan()) -> AudioFeatureExtractor:
        """The official `wav2vec2-large-xlsr-53-english/` folder (local files; any CTC head is ignored)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(str(folder), "wav2vec2 folder not found (no config.json)")
        do_normalize = True
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.is_file():
            settings = json.loads(preprocessor.read_text())
            do_normalize = bool(settings.get("do_normalize", True))
            rate = settings.get("sampling_rate", AUDIO_SAMPLE_RATE)
            if rate != AUDIO_SAMPLE_RATE:
                raise ConfigError(str(preprocessor), f"sampling_rate {rate}, expected {AUDIO_SAMPLE_RATE}")
        model, info = Wav2Vec2Model.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
        # A CTC checkpoint also holds `lm_head.*` (unused here); a tensor the model lacks is an error.
        bad = sorted(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
        if bad:
            raise CheckpointError(str(folder), f"{len(bad)} wav2vec2 tensors missing or misshaped", bad[0])
        return cls(model, do_normalize=do_normalize, plan=plan)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    # ----- the 50 Hz states -------------------------------------------------------------------------

    def num_wav2vec2_frames(self, samples: int) -> int:
        return 0 if samples < self.field else (samples - self.field) // self.stride + 1

    def hidden_states(self, waveform: torch.Tensor) -> torch.Tensor:
        """Normalised waveform [n] -> all hidden states [layers + 1, frames, hidden] (transformers 4.x order)."""
        model = self.model
        x = waveform.to(self.device, self.dtype)[None]
        with torch.no_grad():
            features = model.feature_extractor(x).transpose(1, 2)  # [1, frames, conv_dim]
            hidden, _ = model.feature_projection(features)  # [1, frames, hidden]
            encoder = model.encoder
            hidden = hidden + encoder.pos_conv_embed(hidden)
            if not model.config.do_stable_layer_norm:
                hidden = encoder.layer_norm(hidden)  # post-norm variant normalises before the layers
            states = [hidden]
            last = len(encoder.layers) - 1
            for i, layer in enumerate(encoder.layers):
                hidden = layer(hidden, attention_mask=None)
                if i == last and model.config.do_stable_layer_norm:
                    hidden = encoder.layer_norm(hidden)  # the last state is the final LayerNorm's output
                states.append(hidden)
        return torch.cat(states)  # [layers + 1, frames, hidden]

    # ----- per video frame ----------------------------------------------------------------------------

    def iter_features(
        self,
        audio: np.ndarray,
        num_frames: int | None = None,
        *,
        frames_per_chunk: int | None = None,
        norm_stats: tuple[float, float] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield float32 [n, layers + 1, hidden] blocks for video frames 0..num_frames-1, in order.

        audio: float32 [samples] at 16 kHz. num_frames defaults to the frames the audio covers (25 fps).
        norm_stats: (mean, std) to normalise with instead of the audio's own (e.g. a whole lecture's).
        frames_per_chunk: video frames per yielded block (default: one wav2vec2 chunk's worth). Small
        blocks (e.g. 48) cost nothing extra: wav2vec2 still runs on whole chunks, split for yielding.
        """
        if audio.ndim != 1:
            raise InputError("audio", f"expected mono samples [n], got shape {audio.shape}")
        samples = len(audio)
        if num_frames is None:
            num_frames = -(-samples // SAMPLES_PER_FRAME)
        waveform = self._normalised(audio, norm_stats)
        if samples < self.field:  # shorter than one wav2vec2 frame: pad with silence (reference would fail)
            waveform = torch.cat([waveform, torch.zeros(self.field - samples)])
        total = self.num_wav2vec2_frames(len(waveform))  # T
        rows = int(total / float(WAV2VEC2_RATE) * FEATURE_RATE)  # L, the reference's 30 Hz length
        # Computed per block of video frames whose 50 Hz span (+2 for interpolation) fits one forward,
        # rounded to a multiple of the yielded block.
        per_forward = max(1, (self.plan.chunk_frames - 2) * FPS // WAV2VEC2_RATE)
        step = frames_per_chunk or per_forward
        block = step * max(1, per_forward // step)
        for k0 in range(0, num_frames, block):
            features = self._block(waveform, total, rows, k0, min(num_frames, k0 + block))
            yield from features.split(step)

    def features(self, audio: np.ndarray, num_frames: int | None = None, **kwargs) -> torch.Tensor:
        """All frames at once: float32 [num_frames, layers + 1, hidden] (a segment; lectures: iterate)."""
        return torch.cat(list(self.iter_features(audio, num_frames, **kwargs)))

    def _normalised(self, audio: np.ndarray, norm_stats: tuple[float, float] | None) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(audio, dtype=np.float32))
        if not self.do_normalize:
            return x
        if norm_stats is None:
            x64 = x.double()
            mean, var = float(x64.mean()), float(x64.var(unbiased=False))
            norm_stats = (mean, float(np.sqrt(var + 1e-7)))
        mean, std = norm_stats
        return (x - mean) / std

    def _block(self, waveform: torch.Tensor, total: int, rows: int, k0: int, k1: int) -> torch.Tensor:
        """Features of video frames [k0, k1): interpolate the 50 Hz states at the reference's positions."""
        out = torch.zeros(k1 - k0, self.num_states, self.model.config.hidden_size, device=self.device)
        k = torch.arange(k0, k1)
        row = (12 * k + 5) // 10  # round(1.2 k); 1.2 k is never a tie, so this is exact
        valid = row < rows
        if not valid.any():
            return out
        # F.interpolate(linear, align_corners=True) in float32: source = row * (T - 1) / (L - 1).
        scale = torch.tensor((total - 1) / (rows - 1) if rows > 1 else 0.0, dtype=torch.float32)
        source = scale * row[valid].to(torch.float32)
        i0 = torch.clamp(torch.floor(source).long(), max=total - 1)
        weight = torch.clamp(source - i0.to(torch.float32), 0.0, 1.0)
        i1 = i0 + (i0 < total - 1).long()
        first, last = int(i0.min()), int(i1.max())
        states, offset = self._states_for(waveform, total, first, last + 1)
        a = states[:, (i0 - offset).to(states.device)].float()  # [layers + 1, n, hidden]
        b = states[:, (i1 - offset).to(states.device)].float()
        w = weight.to(a.device)[None, :, None]
        out[valid.to(out.device)] = (a * (1.0 - w) + b * w).transpose(0, 1).to(out.device)
        return out

    def _states_for(
        self, waveform: torch.Tensor, total: int, start: int, stop: int
    ) -> tuple[torch.Tensor, int]:
        """States of 50 Hz frames [start, stop), in chunks with context; returns (states, start)."""
        plan = self.plan
        count = -(-(stop - start) // plan.chunk_frames)  # forwards needed; split the span evenly
        size = -(-(stop - start) // count)
        pieces = []
        for a in range(start, stop, size):
            b = min(stop, a + size)
            lo = max(0, a - plan.context_frames)
            hi = min(total, b + plan.context_frames)
            audio = waveform[lo * self.stride : (hi - 1) * self.stride + self.field]
            pieces.append(self.hidden_states(audio)[:, a - lo : b - lo])
        return torch.cat(pieces, dim=1), start


def video_frame_rows(num_frames: int) -> np.ndarray:
    """The 30 Hz row each video frame reads: round(k * 30 / 25) (before the past-the-end check)."""
    k = np.arange(num_frames)
    return (12 * k + 5) // 10


__all__ = ["FEATURE_RATE", "WAV2VEC2_RATE", "AudioFeatureExtractor", "ChunkPlan", "video_frame_rows"]
