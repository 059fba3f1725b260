"""umT5 text encoder: Wan's checkpoint names -> UMT5EncoderModel, output as the DiT consumes it."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import UMT5EncoderModel

from liveavatar_core.engines.liveavatar.config import CheckpointError
from liveavatar_core.engines.liveavatar.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    clean_prompt,
    convert_wan_state_dict,
    load_umt5_encoder,
)
from liveavatar_core.engines.liveavatar.tiny_encoders import TinyT5Config, wan_t5_layout, write_tiny_t5

PROMPT = "A professor stands at the desk,   speaking clearly &amp; slowly."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"), seed=4)


@pytest.fixture(scope="module")
def encoder(files):
    return TextEncoder.load(*files).to(dtype=torch.float32)


def wan_umt5_forward(state: dict[str, torch.Tensor], ids: torch.Tensor, heads: int) -> torch.Tensor:
    """umT5's encoder written from the model description, on Wan's tensor names (float32, no HF code)."""

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def buckets(n, num_buckets=32, max_distance=128):
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
        half = num_buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (
            torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
        )
        large = large.long().clamp(max=half - 1)
        return out + torch.where(rel < exact, rel, large)

    s = {k: v.float() for k, v in state.items()}
    x = s["token_embedding.weight"][ids[0]]  # [n, d]
    n, d = x.shape
    layers = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, s[p + "norm1.weight"])
        q, k, v = (h @ s[p + f"attn.{name}.weight"].T for name in "qkv")
        q, k, v = (t.view(n, heads, -1).transpose(0, 1) for t in (q, k, v))
        bias = s[p + "pos_embedding.embedding.weight"][buckets(n)].permute(2, 0, 1)  # [heads, n, n]
        attn = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1)  # no 1/sqrt(d) scaling in T5
        x = x + (attn @ v).transpose(0, 1).reshape(n, -1) @ s[p + "attn.o.weight"].T
        h = rms(x, s[p + "norm2.weight"])
        gate = F.gelu(h @ s[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + (gate * (h @ s[p + "ffn.fc1.weight"].T)) @ s[p + "ffn.fc2.weight"].T
    return rms(x, s["norm.weight"])[None]


def test_key_mapping_is_complete_at_full_size():
    xxl = TextEncoderConfig()
    with torch.device("meta"):
        model = UMT5EncoderModel(xxl.to_hf())
    model.encoder.embed_tokens = model.shared
    expected = model.state_dict()
    layout = wan_t5_layout(
        xxl.vocab_size, TinyT5Config(dim=4096, ffn_dim=10240, num_heads=64, num_layers=24, num_buckets=32)
    )
    assert len(layout) == 2 + 24 * 10  # embedding, final norm, 10 tensors per block
    tensors = {name: torch.empty(shape, device="meta") for name, shape in layout.items()}
    converted = convert_wan_state_dict(tensors, expected, "models_t5_umt5-xxl-enc-bf16.pth")
    assert set(converted) == set(expected)
    assert converted["shared.weight"] is converted["encoder.embed_tokens.weight"]


def test_config_is_read_from_the_checkpoint(files):
    model, config = load_umt5_encoder(files[0])
    tiny = TinyT5Config()
    assert (config.dim, config.ffn_dim, config.num_heads, config.num_layers) == (
        tiny.dim,
        tiny.ffn_dim,
        tiny.num_heads,
        tiny.num_layers,
    )
    assert model.encoder.embed_tokens is model.shared
    assert not any(p.is_meta for p in model.parameters())
    assert (
        model.shared.weight.dtype == torch.bfloat16
    )  # the file's dtype; the caller chooses the device/dtype


def test_encoder_matches_umt5_written_from_the_description(files, encoder):
    ids = encoder.token_ids(PROMPT)
    state = torch.load(files[0], weights_only=True)
    expected = wan_umt5_forward(state, ids, heads=TinyT5Config().num_heads)
    with torch.no_grad():
        got = encoder.model(input_ids=ids).last_hidden_state
    assert (got - expected).abs().max().item() < 1e-4


def test_encode_prompt_returns_the_real_tokens_and_ignores_padding(encoder):
    ids = encoder.token_ids(PROMPT)
    n = ids.shape[1]
    out = encoder.encode_prompt(PROMPT)
    assert out.shape == (n, TinyT5Config().dim) and out.dtype == torch.float32
    # The reference's way: pad to 512 with <pad>, mask the padding, keep the first n rows.
    padded = torch.cat([ids, torch.zeros(1, 512 - n, dtype=ids.dtype)], dim=1)
    mask = (torch.arange(512) < n).long()[None]
    with torch.no_grad():
        reference = encoder.model(input_ids=padded, attention_mask=mask).last_hidden_state
    assert (reference[0, :n] - out).abs().max().item() < 1e-5


def test_tokens_clean_like_the_reference_and_end_with_eos(encoder):
    assert clean_prompt("  a\n\tb &amp;amp; c  ") == "a b & c"
    ids = encoder.token_ids(PROMPT)[0].tolist()
    assert ids[-1] == 1 and 0 not in ids  # </s> appended, no padding
    assert encoder.token_ids("a  b").tolist() == encoder.token_ids(" a b ").tolist()
    long = " ".join(["lecture"] * 700)
    assert encoder.count_tokens(long) == 512 and encoder.token_ids(long)[0, -1].item() == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("blocks.1.ffn.fc2.weight"), "encoder.block.1.layer.1.DenseReluDense.wo.weight"),
        (lambda sd: sd.__setitem__("blocks.0.attn.rotary", torch.zeros(1)), "blocks.0.attn.rotary"),
        (lambda sd: sd.__setitem__("norm.weight", torch.ones(3)), r"norm.weight\]: shape \(3,\)"),
    ],
)
def test_bad_checkpoints_are_refused_naming_the_tensor(files, tmp_path, edit, message):
    state = torch.load(files[0], weights_only=True)
    edit(state)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=message) as error:
        load_umt5_encoder(bad)
    assert str(bad) in str(error.value)
