"""Wan2.1 VAE: official key names -> diffusers, streaming == one-shot, handoff state, portrait latents."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from liveavatar_core.engines.liveavatar.config import CheckpointError
from liveavatar_core.engines.liveavatar.tiny_encoders import wan21_vae_layout, write_tiny_vae
from liveavatar_core.engines.liveavatar.vae import (
    DECODER_CONTEXT_LATENTS,
    LATENTS_MEAN,
    LATENTS_STD,
    WanVideoVAE,
    _same_cache,
    convert_original_state_dict,
    decoder_state_nbytes,
    image_to_tensor,
    load_vae,
    original_to_diffusers_key,
    to_uint8,
)
from liveavatar_core.engines.liveavatar.vae_decode import (
    DecodeOptions,
    add_bias_residual,
    compiled_add_bias_residual,
    compiled_rms_act,
    rms_act,
    upsample_nearest_2x,
)
from liveavatar_core.errors import InputError

H, W = 16, 24  # pixels; latents 2 x 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth", seed=1)


@pytest.fixture(scope="module")
def vae(checkpoint):
    return WanVideoVAE.load(checkpoint)


def latents(t, seed=0):
    return torch.randn(1, 16, t, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def video(t, seed=0):
    return torch.rand(1, 3, t, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def portrait(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def test_key_mapping_is_complete_both_ways_at_full_size():
    with torch.device("meta"):
        model = AutoencoderKLWan()  # diffusers' default config is Wan2.1's VAE
    expected = model.state_dict()
    layout = wan21_vae_layout(base_dim=96)
    mapped = {original_to_diffusers_key(name): name for name in layout}
    assert len(mapped) == len(layout) == len(expected) == 194  # injective, onto
    assert set(mapped) == set(expected)
    for new, old in mapped.items():
        assert tuple(expected[new].shape) == layout[old], old
    tensors = {name: torch.empty(shape, device="meta") for name, shape in layout.items()}
    assert set(convert_original_state_dict(tensors, expected, "Wan2.1_VAE.pth")) == set(expected)


def test_normalisation_constants_are_diffusers_defaults():
    with torch.device("meta"):
        model = AutoencoderKLWan()
    assert tuple(model.config.latents_mean) == LATENTS_MEAN
    assert tuple(model.config.latents_std) == LATENTS_STD


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.pop("decoder.head.2.bias"),
            r"decoder.conv_out.bias\]: 1 AutoencoderKLWan tensors missing",
        ),
        (lambda sd: sd.__setitem__("decoder.upsamples.99.residual.0.gamma", torch.ones(1)), "upsamples.99"),
        (
            lambda sd: sd.__setitem__("encoder.conv1.bias", torch.ones(3)),
            r"encoder.conv1.bias\]: shape \(3,\)",
        ),
    ],
)
def test_bad_checkpoints_are_refused_naming_the_tensor(checkpoint, tmp_path, edit, message):
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=message) as error:
        load_vae(bad)
    assert str(bad) in str(error.value)


def test_loaded_model_is_materialised_and_eval(vae):
    assert not any(p.is_meta for p in vae.model.parameters())
    assert not vae.model.training
    assert vae.dtype == torch.float32


def test_streaming_decode_equals_diffusers_one_shot_decode(vae):
    z = latents(7)
    with torch.no_grad():
        one_shot = vae.model.decode(vae.denormalize(z)).sample  # diffusers' own loop, fresh cache
    stream = vae.decoder_stream()
    blocks = [stream.decode(z[:, :, :1]), stream.decode(z[:, :, 1:4]), stream.decode(z[:, :, 4:7])]
    assert [b.shape[2] for b in blocks] == [1, 12, 12]  # first latent -> 1 frame, later ones -> 4
    streamed = torch.cat(blocks, dim=2)
    assert streamed.shape == one_shot.shape == (1, 3, 25, H, W)
    # Same arithmetic, different conv input lengths: oneDNN may pick another kernel (fp32 rounding).
    assert (streamed - one_shot).abs().max().item() < 1e-5


def test_streaming_encode_equals_diffusers_one_shot_encode(vae):
    x = video(13)
    with torch.no_grad():
        mu = vae.model.encode(x).latent_dist.mode()
    expected = (mu - vae.mean) / vae.std
    stream = vae.encoder_stream()
    pieces = [stream.push(x[:, :, :3]), stream.push(x[:, :, 3:10]), stream.push(x[:, :, 10:])]
    assert [p.shape[2] for p in pieces] == [1, 2, 1]  # chunks of 1, 4, 4, 4 complete as frames arrive
    got = torch.cat(pieces, dim=2)
    assert got.shape == (1, 16, 4, H // 8, W // 8)
    assert (got - expected).abs().max().item() < 1e-5
    assert (vae.encode(x) - got).abs().max().item() < 1e-5


def test_decoder_state_survives_serialisation(vae):
    z = latents(6, seed=2)
    continuous = vae.decoder_stream()
    expected = continuous.decode(z)[:, :, 1 + 4 * 2 :]
    first = vae.decoder_stream()
    first.decode(z[:, :, :3])
    data = first.state_bytes()
    assert len(data) > first.state_nbytes() > 0
    resumed = vae.decoder_stream()
    resumed.load_state_bytes(data)
    assert torch.equal(resumed.decode(z[:, :, 3:]), expected)
    resumed.reset()
    assert resumed.latents_in == 0 and all(entry is None for entry in resumed.cache)


def test_last_context_latents_rebuild_the_decoder_state_exactly(vae):
    n = DECODER_CONTEXT_LATENTS + 6
    z = latents(n + 3, seed=3)
    continuous = vae.decoder_stream()
    continuous.decode(z[:, :, :n])
    rebuilt = vae.decoder_stream()
    rebuilt.prime(z[:, :, :n])  # decodes only the last DECODER_CONTEXT_LATENTS
    assert rebuilt.latents_in == n
    assert _same_cache(continuous.cache, rebuilt.cache)
    assert torch.equal(rebuilt.decode(z[:, :, n:]), continuous.decode(z[:, :, n:]))


def test_state_size_from_shapes_matches_a_real_stream(vae):
    stream = vae.decoder_stream()
    stream.decode(latents(3))
    assert decoder_state_nbytes(H, W, torch.float32, base_dim=8) == stream.state_nbytes()


def test_reference_latent_is_the_second_latent_of_a_five_frame_still(vae):
    image = portrait()
    still = image_to_tensor(image).expand(-1, -1, 5, -1, -1)
    expected = vae.encode(still)[:, :, 1:2]
    assert torch.equal(vae.encode_reference(image), expected)


def test_motion_buffer_shortcut_equals_the_365_frame_encode_and_decode(vae):
    image = portrait(1)
    motion = vae.encode_motion(image)
    assert motion.length == 92 and motion.head.shape[2] < 40  # the encoder's fixed point comes early
    brute = vae.encode(image_to_tensor(image).expand(-1, -1, 365, -1, -1))
    assert torch.equal(motion.full(), brute)
    assert torch.equal(motion.last(19), brute[:, :, -19:])
    # Priming a decoder with the whole buffer, the cheap way, leaves the same state as decoding it.
    cheap, full = vae.decoder_stream(), vae.decoder_stream()
    cheap.prime_constant_clip(motion)
    full.decode(brute)
    assert cheap.latents_in == full.latents_in == 92
    assert _same_cache(cheap.cache, full.cache)


def test_pixels_and_uint8(vae):
    assert to_uint8(
        torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    ).reshape(5, 3)[:, 0].tolist() == [0, 64, 128, 255, 255]
    frames = vae.decoder_stream().decode_uint8(latents(2))
    assert frames.shape == (5, H, W, 3) and frames.dtype == np.uint8
    with pytest.raises(InputError, match="multiples of 8"):
        image_to_tensor(np.zeros((20, 24, 3), np.uint8))
    x = image_to_tensor(np.full((8, 8, 3), 255, np.uint8))
    assert x.shape == (1, 3, 1, 8, 8) and x.max().item() == 1.0


# ----- the faster decode path (vae_decode.py) ------------------------------------------------------------


def _decode_blocks(vae, options, z, cuts=(1, 4, 7, 10)):
    """A fresh stream with `options` decoding z in the pipeline's way (a first piece, then blocks)."""
    vae.decode_options = options
    try:
        stream = vae.decoder_stream()
        edges = [0, *cuts, z.shape[2]]
        frames = [stream.decode(z[:, :, a:b]) for a, b in zip(edges, edges[1:], strict=False) if b > a]
        return torch.cat(frames, dim=2), stream
    finally:
        vae.decode_options = DecodeOptions()


@pytest.mark.parametrize(
    "options",
    [
        DecodeOptions(chunk=4),
        DecodeOptions(fused=True),
        DecodeOptions(chunk=3, fused=True),
        DecodeOptions(chunk=4, fused=True, channels_last=True),
    ],
    ids=["chunked", "fused", "fused-chunked", "fused-chunked-channels-last"],
)
def test_fast_decode_equals_the_diffusers_loop_and_shares_its_state(vae, options):
    z = latents(13, seed=4)
    today, reference = _decode_blocks(vae, DecodeOptions(), z)
    fast, stream = _decode_blocks(vae, options, z, cuts=(1, 2, 6, 9))
    assert fast.shape == today.shape == (1, 3, 49, H, W)
    # float32: the same function up to the convs' rounding (far below a level of 255: 1 level = 0.0078)
    assert (fast - today).abs().max().item() < 1e-5
    for a, b in zip(stream.cache, reference.cache, strict=True):
        assert type(a) is type(b)  # same slots, same "Rep" marker
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # activations, up to ~10
    # Either path continues the other's stream.
    more = latents(3, seed=5)
    vae.decode_options = options
    crossed = vae.decoder_stream()
    vae.decode_options = DecodeOptions()
    crossed.cache, crossed.latents_in = list(reference.cache), reference.latents_in
    assert (crossed.decode(more) - reference.decode(more)).abs().max().item() < 1e-5


def test_fused_decode_rounds_like_diffusers_in_bfloat16(checkpoint):
    """One latent a call in bf16: the fused forward gives diffusers' frames bit for bit on this CPU."""
    vae = WanVideoVAE.load(checkpoint).to(dtype=torch.bfloat16)
    z = latents(5, seed=6)
    today, _ = _decode_blocks(vae, DecodeOptions(), z, cuts=(1, 3))
    fused, _ = _decode_blocks(vae, DecodeOptions(fused=True), z, cuts=(1, 3))
    assert torch.equal(fused, today)


def _decode_folded(vae, options, z, fold: bool):
    """`_decode_blocks` with the residual blocks' conv biases folded into the next chains, or not."""
    vae.decode_options = options
    try:
        stream = vae.decoder_stream()
        stream.fused.fold_biases = fold
        return torch.cat([stream.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 4), (4, 7))], dim=2)
    finally:
        vae.decode_options = DecodeOptions()


def test_folded_conv_biases_give_the_same_frames(vae):
    """In float32 folding the biases into the following chains is the same function (on a GPU it
    saves the bias pass cuDNN's 3-D convolutions take in PyTorch; there the values are the same bits,
    test_folded_conv_biases_give_the_same_bits_on_a_gpu)."""
    z = latents(7, seed=11)
    options = DecodeOptions(chunk=3, fused=True, channels_last=True)
    folded, plain = (_decode_folded(vae, options, z, fold) for fold in (True, False))
    assert folded.shape == plain.shape == (1, 3, 25, H, W)
    assert (folded - plain).abs().max().item() < 1e-5 and not torch.equal(folded, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the separate bias pass is cuDNN's, on a GPU")
def test_folded_conv_biases_give_the_same_bits_on_a_gpu(checkpoint):
    vae = WanVideoVAE.load(checkpoint).to("cuda", torch.bfloat16)
    z = latents(7, seed=12).to("cuda", torch.bfloat16)
    options = DecodeOptions(chunk=3, fused=True, compiled=True, channels_last=True)
    folded, plain = (_decode_folded(vae, options, z, fold) for fold in (True, False))
    assert torch.equal(folded, plain)


def test_bias_chains_round_where_a_bias_pass_rounds():
    g = torch.Generator().manual_seed(10)
    x, h = (torch.randn(1, 8, 2, 4, 6, generator=g).to(torch.bfloat16) for _ in range(2))
    bias = torch.randn(8, generator=g).to(torch.bfloat16)
    gamma = torch.rand(1, 8, 1, 1, 1, generator=g).to(torch.bfloat16) + 0.5
    added = x + bias.view(1, -1, 1, 1, 1)  # a bf16 add: rounded once
    assert torch.equal(rms_act(x, gamma, 2.0, True, bias), rms_act(added, gamma, 2.0, True))
    assert torch.equal(add_bias_residual(x, bias, h), added + h)
    compiled = compiled_add_bias_residual()(x.contiguous(memory_format=torch.channels_last_3d), bias, h)
    assert torch.equal(compiled, added + h)
    with_bias = compiled_rms_act()(x, gamma, 2.0, True, bias)
    want = rms_act(added, gamma, 2.0, True)
    assert ((with_bias.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()


def test_compiled_norm_chain_equals_the_eager_one():
    x = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    gamma = torch.rand(1, 16, 1, 1, 1, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16) + 0.5
    eager = rms_act(x, gamma, 4.0, True)
    compiled = compiled_rms_act()(x, gamma, 4.0, True)
    # Rounded where eager rounds; only the norm's float32 sum may be ordered differently (one bf16 step).
    assert ((compiled.float() - eager.float()).abs() <= eager.float().abs() * 2**-7).all()
    assert (compiled != eager).float().mean().item() < 0.01
    channels_last = compiled_rms_act()(x.contiguous(memory_format=torch.channels_last_3d), gamma, 4.0, False)
    plain = rms_act(x, gamma, 4.0, False)
    assert ((channels_last.float() - plain.float()).abs() <= plain.float().abs() * 2**-7).all()


def test_compiled_norm_chain_serves_every_channel_count_and_clip_length(monkeypatch):
    """The channels are static in the compiled norm (one kernel per count), the rest dynamic: the
    decoder's levels, clip lengths and layouts all get the eager chain's values, with more graphs than
    dynamo's default limit of 8 allows (a decode in a process that compiles nothing else)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    compiled_rms_act.cache_clear()
    g = torch.Generator().manual_seed(9)
    layouts = (torch.channels_last_3d, torch.contiguous_format)
    for channels, layout in itertools.product((8, 24, 16, 40), layouts):
        gamma = torch.rand(1, channels, 1, 1, 1, generator=g).to(torch.bfloat16) + 0.5
        for frames, side in ((1, 4), (3, 8), (4, 6)):
            x = torch.randn(1, channels, frames, side, side + 2, generator=g).to(torch.bfloat16)
            x = x.contiguous(memory_format=layout)
            eager = rms_act(x, gamma, channels**0.5, True)
            compiled = compiled_rms_act()(x, gamma, channels**0.5, True)
            assert ((compiled.float() - eager.float()).abs() <= eager.float().abs() * 2**-7).all()


def test_decode_options_refuse_nonsense():
    with pytest.raises(ValueError, match="chunk"):
        DecodeOptions(chunk=0)
    with pytest.raises(ValueError, match="fused"):
        DecodeOptions(compiled=True)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_nearest_upsample_is_interpolate_in_the_same_layout(layout):
    x = torch.randn(1, 6, 3, 5, 7).to(torch.bfloat16).contiguous(memory_format=layout)
    want = torch.nn.functional.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    got = upsample_nearest_2x(x)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=layout)
