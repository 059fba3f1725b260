"""wav2vec2 features per video frame: the reference's states, interpolation and indexing; chunking."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from liveavatar_core.engines.liveavatar.audio_features import (
    AudioFeatureExtractor,
    ChunkPlan,
    video_frame_rows,
)
from liveavatar_core.engines.liveavatar.config import CheckpointError
from liveavatar_core.engines.liveavatar.tiny_encoders import tiny_wav2vec2_config, write_tiny_wav2vec2
from liveavatar_core.errors import InputError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_wav2vec2(tmp_path_factory.mktemp("w2v") / "wav2vec2-large-xlsr-53-english", seed=5)


@pytest.fixture(scope="module")
def extractor(folder):
    return AudioFeatureExtractor.load(folder)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    envelope = 0.5 + 0.5 * np.sin(np.arange(n) / 16000 * 2 * np.pi * 3)
    return (0.1 * rng.standard_normal(n) * envelope + 0.02).astype(np.float32)


def one_shot_reference(extractor: AudioFeatureExtractor, audio: np.ndarray, num_frames: int) -> torch.Tensor:
    """The reference's path with torch's own ops: normalise, all states, F.interpolate, index or zero."""
    x = torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))
    states = extractor.hidden_states(x)  # [L, T, H]
    total = states.shape[1]
    rows = int(total / 50.0 * 30)
    resampled = F.interpolate(states.transpose(1, 2), size=rows, mode="linear", align_corners=True).transpose(
        1, 2
    )
    out = torch.zeros(num_frames, states.shape[0], states.shape[2])
    for k in range(num_frames):
        row = round(k * 30 / 25)
        if row < rows:
            out[k] = resampled[:, row]
    return out


def test_states_follow_transformers_4_order(extractor):
    x = torch.from_numpy(speech(1.0))
    states = extractor.hidden_states(x)
    assert states.shape == (tiny_wav2vec2_config().num_hidden_layers + 1, 49, 32)  # (16000 - 400) // 320 + 1
    with torch.no_grad():
        out = extractor.model(x[None], output_hidden_states=True)
    layers = len(out.hidden_states) - 1
    for i in range(layers):  # the input of every layer, as transformers returns them
        assert torch.allclose(states[i], out.hidden_states[i][0], atol=1e-6)
    # The last state is the final LayerNorm's output (transformers 4.x, the reference); transformers 5
    # returns the last layer's raw output there instead, so we do not rely on output_hidden_states.
    assert torch.allclose(states[-1], out.last_hidden_state[0], atol=1e-6)
    assert not torch.allclose(states[-1], out.hidden_states[-1][0], atol=1e-3)


def test_video_frames_take_round_k_times_1_2():
    n = 200_000
    # The reference: linspace(0, n / 25, n, endpoint=False) seconds, times 30 fps, np.round.
    reference = np.round(np.linspace(0, n / 25, n, endpoint=False) * 30).astype(int)
    assert np.array_equal(video_frame_rows(n), reference)


def test_features_equal_the_reference_path(extractor):
    audio = speech(3.3, seed=1)
    frames = -(-len(audio) // 640)
    got = extractor.features(audio)
    assert got.shape == (frames, 3, 32) and got.dtype == torch.float32
    expected = one_shot_reference(extractor, audio, frames)
    assert (got - expected).abs().max().item() < 1e-5
    assert torch.count_nonzero(got[-1]) == 0  # past the last 30 Hz row: zeros, as in the reference
    assert torch.count_nonzero(got[-3]) > 0


def test_chunks_are_exact_when_the_model_is_local(folder):
    # With attention values zeroed every output frame depends only on nearby audio (conv receptive
    # fields), so a chunked pass with enough context must equal the one-shot pass everywhere.
    extractor = AudioFeatureExtractor.load(folder)
    with torch.no_grad():
        for layer in extractor.model.encoder.layers:
            layer.attention.v_proj.weight.zero_()
    audio = speech(6.0, seed=2)
    one_shot = AudioFeatureExtractor(extractor.model, plan=ChunkPlan(chunk_frames=10_000, context_frames=0))
    chunked = AudioFeatureExtractor(extractor.model, plan=ChunkPlan(chunk_frames=37, context_frames=12))
    a = one_shot.features(audio)
    blocks = list(chunked.iter_features(audio, frames_per_chunk=11))
    assert {len(block) for block in blocks[:-1]} == {11}
    b = torch.cat(blocks)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-5


def test_chunks_stay_close_with_global_attention(extractor):
    audio = speech(6.0, seed=3)
    one_shot = AudioFeatureExtractor(extractor.model, plan=ChunkPlan(chunk_frames=10_000, context_frames=0))
    chunked = AudioFeatureExtractor(extractor.model, plan=ChunkPlan(chunk_frames=100, context_frames=50))
    a, b = one_shot.features(audio), chunked.features(audio)
    # A random model attends everywhere, unlike speech models; still, 1 s of context keeps it close.
    assert (a - b).abs().mean().item() < 0.01 * a.abs().mean().item()


def test_lengths_stats_and_errors(extractor):
    audio = speech(2.0, seed=4)
    assert extractor.features(audio, num_frames=60).shape[0] == 60  # more frames than audio: zero rows
    assert torch.count_nonzero(extractor.features(audio, num_frames=60)[55:]) == 0
    assert extractor.features(audio[:300]).shape == (1, 3, 32)  # shorter than one wav2vec2 frame
    own = extractor.features(audio)
    stats = (float(audio.mean()), float(np.sqrt(audio.var() + 1e-7)))
    assert (extractor.features(audio, norm_stats=stats) - own).abs().max().item() < 1e-4
    assert (extractor.features(audio * 3.0) - own).abs().max().item() < 1e-4  # normalised input
    with pytest.raises(InputError, match="mono"):
        extractor.features(np.zeros((2, 100), np.float32))


def test_a_folder_missing_a_tensor_is_refused(folder, tmp_path):
    broken = tmp_path / "w2v"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["wav2vec2.encoder.layers.1.attention.k_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="k_proj") as error:
        AudioFeatureExtractor.load(broken)
    assert str(broken) in str(error.value)
