"""Find speech in a 16 kHz mono WAV with Silero VAD (its model ships inside the silero-vad package).

The package's batched ONNX model (`silero_vad_16k_sequence.onnx`, one onnxruntime call per block of
frames instead of one per 32 ms frame) scores the audio block by block as it streams in (from a
WAV on disk, or from `audio.normalize_to_wav` while it writes one), carrying the recurrent state and
the 64-sample context from block to block, so memory stays flat in the lecture's length: only one
probability per 32 ms is kept (about 450 KB an hour). The package's
own `get_speech_timestamps_from_probs` turns the probabilities into spans. Audio is read with
soundfile; silero's `read_audio` would need torchaudio, which has no CPU build here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .errors import InputError
from .timebase import AUDIO_SAMPLE_RATE

FRAME = 512  # samples the model scores at once at 16 kHz (32 ms)
CONTEXT = 64  # trailing samples of the previous frame the model sees with each frame
NO_SPEECH = "no speech found (the voice activity detector heard none); is this the lecture's audio?"
BLOCK_FRAMES = 1024  # frames per onnxruntime call (~33 s of audio, ~2.4 MB of input)


@dataclass(frozen=True)
class SpeechSpan:
    """A stretch of speech, in seconds from the start of the WAV (sample-exact at 16 kHz)."""

    start_s: float
    end_s: float

    @property
    def start_sample(self) -> int:
        return round(self.start_s * AUDIO_SAMPLE_RATE)

    @property
    def end_sample(self) -> int:
        return round(self.end_s * AUDIO_SAMPLE_RATE)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class SpeechDetector:
    """Streaming voice activity detection: `feed` consecutive blocks of any size, then `spans`.

    Blocks are float32 16 kHz mono samples. Memory: one block of model input plus one probability
    per 32 ms. Usable as `audio.normalize_to_wav(..., tap=detector)`, which feeds it while the
    normalised WAV is written.
    """

    def __init__(self, *, block_frames: int = BLOCK_FRAMES):
        self.block_frames = block_frames
        self.reset()

    def reset(self) -> None:
        """Start over, as if nothing had been fed."""
        self._hidden = np.zeros((1, 1, 128), np.float32)  # LSTM state carried across blocks
        self._cell = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending: list[np.ndarray] = []  # fed samples not yet scored (under one block)
        self._pending_len = 0
        self._probs: list[np.ndarray] = []
        self._total = 0
        self._done = False

    @property
    def samples(self) -> int:
        """Samples fed so far."""
        return self._total

    def feed(self, block: np.ndarray) -> None:
        """The next samples (float32 [n], 16 kHz mono)."""
        if self._done:
            raise RuntimeError("SpeechDetector.feed after probabilities()/spans(); call reset() first")
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        if block.size == 0:
            return
        self._pending.append(block)
        self._pending_len += block.size
        self._total += block.size
        size = self.block_frames * FRAME
        if self._pending_len >= size:
            data = np.concatenate(self._pending)
            whole = len(data) // size * size
            for i in range(0, whole, size):
                self._score(data[i : i + size])
            rest = data[whole:]
            self._pending = [rest] if rest.size else []
            self._pending_len = rest.size

    def probabilities(self) -> np.ndarray:
        """Per-frame (512 samples, 32 ms) speech probabilities, float32 [ceil(samples / 512)].

        Scores what is still pending (the last frame zero-padded); feeding ends here.
        """
        if not self._done:
            if self._pending_len:
                self._score(np.concatenate(self._pending))
            self._pending, self._pending_len, self._done = [], 0, True
        return np.concatenate(self._probs) if self._probs else np.zeros(0, np.float32)

    def spans(
        self,
        *,
        threshold: float = 0.5,
        min_speech_s: float = 0.25,
        min_silence_s: float = 0.1,
        pad_s: float = 0.03,
        subject: str = "audio",
    ) -> list[SpeechSpan]:
        """Speech spans of everything fed, in order, not overlapping.

        threshold: speech probability that starts speech (it ends below threshold - 0.15);
        min_speech_s: shorter bursts are dropped; min_silence_s: shorter pauses do not split speech;
        pad_s: each span is widened by this much on both sides (never past a neighbour).
        Raises InputError naming `subject` when there is no speech at all.
        """
        probs = self.probabilities()
        found = _timestamps_from_probs()(
            probs.tolist(),
            sampling_rate=AUDIO_SAMPLE_RATE,
            threshold=threshold,
            min_speech_duration_ms=round(min_speech_s * 1000),
            min_silence_duration_ms=round(min_silence_s * 1000),
            speech_pad_ms=round(pad_s * 1000),
            audio_length_samples=self._total,
        )
        if not found:
            raise InputError(
                subject,
                "no speech found (the voice activity detector heard none); is this the lecture's audio?",
            )
        return [SpeechSpan(s["start"] / AUDIO_SAMPLE_RATE, s["end"] / AUDIO_SAMPLE_RATE) for s in found]

    def _score(self, block: np.ndarray) -> None:
        n = -(-len(block) // FRAME)
        frames = np.zeros((n, FRAME), np.float32)  # [frames, 512]; a short last frame is zero-padded
        frames.reshape(-1)[: len(block)] = block
        contexts = np.empty((n, CONTEXT), np.float32)  # [frames, 64]: the tail of the frame before
        contexts[0] = self._context
        contexts[1:] = frames[:-1, -CONTEXT:]
        self._context = frames[-1, -CONTEXT:].copy()
        probs, self._hidden, self._cell = _session().run(
            ["speech_probs", "hn", "cn"],
            {"input": np.concatenate([contexts, frames], axis=1), "h": self._hidden, "c": self._cell},
        )
        self._probs.append(np.asarray(probs, np.float32).reshape(-1))


def detect_speech(
    wav_path: str | os.PathLike[str],
    *,
    threshold: float = 0.5,
    min_speech_s: float = 0.25,
    min_silence_s: float = 0.1,
    pad_s: float = 0.03,
    subject: str | None = None,
) -> list[SpeechSpan]:
    """Speech spans of a 16 kHz mono WAV (streamed from disk); see `SpeechDetector.spans`.

    Raises InputError naming `subject` (default: the path) when there is no speech at all.
    """
    path = Path(wav_path)
    detector = SpeechDetector()
    for block in _wav_blocks(path, detector.block_frames * FRAME):
        detector.feed(block)
    return detector.spans(
        threshold=threshold,
        min_speech_s=min_speech_s,
        min_silence_s=min_silence_s,
        pad_s=pad_s,
        subject=subject or str(path),
    )


def speech_probabilities(
    wav_path: str | os.PathLike[str], *, block_frames: int = BLOCK_FRAMES
) -> tuple[np.ndarray, int]:
    """Per-frame (512 samples, 32 ms) speech probabilities of a 16 kHz mono WAV, and its length."""
    detector = SpeechDetector(block_frames=block_frames)
    for block in _wav_blocks(Path(wav_path), block_frames * FRAME):
        detector.feed(block)
    return detector.probabilities(), detector.samples


def _wav_blocks(path: Path, size: int):
    with sf.SoundFile(str(path)) as f:
        if f.samplerate != AUDIO_SAMPLE_RATE or f.channels != 1:
            raise ValueError(
                f"{path}: voice detection needs 16 kHz mono (normalize_to_wav makes it), "
                f"not {f.samplerate} Hz with {f.channels} channels"
            )
        yield from f.blocks(blocksize=size, dtype="float32")


@functools.cache
def _session() -> Any:
    """The batched Silero ONNX model, loaded once per process (one thread: the line has two cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        str(_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )


def _model_path() -> Path:
    """Where the silero-vad package keeps its batched 16 kHz model (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed (it ships the voice detector's model)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad_16k_sequence.onnx"
    if not path.is_file():
        raise RuntimeError(f"silero-vad has no batched model at {path}; it needs silero-vad 6.2 or newer")
    return path


@functools.cache
def _timestamps_from_probs() -> Any:
    """silero-vad's probabilities-to-spans state machine.

    Importing silero_vad imports torch and pins torch to one thread for the whole process; the
    thread count is put back so that other stages (engines) keep theirs.
    """
    import torch

    threads = torch.get_num_threads()
    from silero_vad import get_speech_timestamps_from_probs

    torch.set_num_threads(threads)
    return get_speech_timestamps_from_probs
