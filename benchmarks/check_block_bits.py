"""GPU check that the block forward's overhead removals kept the bits: one full-size DiT block (bf16,
random weights, 704x384 token counts) through today's code and through the earlier formulation
(float32 copies, three-kernel norms, stacked RoPE), compared with torch.equal. Also compares the fp8
linear's activation quantisation with the earlier abs/amax/clamp formulation.

PYTHONPATH=. python benchmarks/check_block_bits.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from liveavatar_core.engines.liveavatar.backends import FP8, FP8_MAX, Fp8Linear  # noqa: E402
from liveavatar_core.engines.liveavatar.config import DiTConfig  # noqa: E402
from liveavatar_core.engines.liveavatar.dit import DiTBlock, SelfContext  # noqa: E402
from liveavatar_core.engines.liveavatar.dit_audio import AudioTokens  # noqa: E402
from liveavatar_core.engines.liveavatar.layers import attend, attend_parts  # noqa: E402
from liveavatar_core.engines.liveavatar.rope import block_positions, cond_positions, rope_table  # noqa: E402


def old_rope(x, table):
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = table.cos[None, :, None, :], table.sin[None, :, None, :]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def old_ln(norm, x):
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


def old_rms(norm, x):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm.eps)).to(x.dtype) * norm.weight


def old_q(attn, x):
    return old_rms(attn.norm_q, attn.q(x)).unflatten(-1, (attn.num_heads, -1))


def old_kv(attn, x):
    return old_rms(attn.norm_k, attn.k(x)).unflatten(-1, (attn.num_heads, -1)), attn.v(x).unflatten(
        -1, (attn.num_heads, -1)
    )


def old_block(block, x, t_mod, rope, text_k, text_v, ctx, audio):
    b, n, dim = x.shape
    groups = t_mod.shape[1]
    mod = (block.modulation.float().unsqueeze(0) + t_mod).unsqueeze(3)
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)

    def grouped(t):
        return t.reshape(b, groups, n // groups, dim)

    h = (grouped(old_ln(block.norm1, x)).float() * (1 + scale1) + shift1).reshape(b, n, dim).to(x.dtype)
    q = old_q(block.self_attn, h)
    k_raw, v = old_kv(block.self_attn, h)
    q = old_rope(q, rope).to(x.dtype)
    k = old_rope(k_raw, rope).to(x.dtype)
    cond_k = old_rope(ctx.cond_k, ctx.cond_rope).to(x.dtype)
    parts = [*zip(ctx.ring_k, ctx.ring_v, strict=True), (k, v), (cond_k, ctx.cond_v)]
    y = block.self_attn.out(attend_parts(q, parts))
    x32 = x.float() + (grouped(y).float() * gate1).reshape(b, n, dim)
    q = old_q(block.cross_attn, old_ln(block.norm3, x32.to(x.dtype)))
    x32 = x32 + block.cross_attn.out(attend(q, text_k, text_v)).float()
    h = grouped(old_ln(block.norm2, x32)) * (1 + scale2) + shift2
    y = block.ffn(h.reshape(b, n, dim).to(x.dtype))
    x = (x32 + (grouped(y).float() * gate2).reshape(b, n, dim)).to(x.dtype)
    # the audio injector, as before
    inj = block.audio
    frames = audio.tokens.shape[1]
    per_frame = x.reshape(b * frames, n // frames, dim)
    hh = inj.norm(per_frame, audio.global_.reshape(b * frames, dim)).to(x.dtype)
    qa = old_q(inj.attn, hh)
    ka, va = old_kv(inj.attn, audio.tokens.flatten(0, 1))
    return x + inj.attn.out(attend(qa, ka, va)).reshape(b, n, dim), k, v


def main() -> None:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    cfg = DiTConfig()
    h, w = 24, 44  # 704x384 -> latent 48x88 -> 24x44 tokens per frame
    fsl = h * w
    block = DiTBlock(cfg, with_audio=True).to(dev, dt).eval()
    with torch.no_grad():
        block.modulation.normal_(0, 0.1)
        block.norm3.weight.normal_(1, 0.1)
        block.norm3.bias.normal_(0, 0.1)
        for m in block.modules():
            if hasattr(m, "norm_q"):
                m.norm_q.weight.normal_(1, 0.1)
                m.norm_k.weight.normal_(1, 0.1)

        def r(*s, dtype=dt):
            return torch.randn(*s, device=dev, dtype=dtype)

        x = r(1, 3 * fsl, cfg.dim)
        t_mod = r(1, 3, 6, cfg.dim, dtype=torch.float32) * 0.1
        rope = rope_table(cfg, block_positions(9, 3, h, w), dev)
        cond_pos = cond_positions(cfg, 40, h, w)
        cond_rope = rope_table(cfg, cond_pos, dev)
        lc = cond_pos.shape[0]
        hd = (cfg.num_heads, cfg.head_dim)
        ctx = SelfContext(
            [r(1, 6 * fsl, *hd), r(1, 3 * fsl, *hd)],
            [r(1, 6 * fsl, *hd), r(1, 3 * fsl, *hd)],
            r(1, lc, *hd),
            r(1, lc, *hd),
            cond_rope,
        )
        text_k, text_v = r(1, 512, *hd), r(1, 512, *hd)
        audio = AudioTokens(r(1, 3, 5, cfg.dim), r(1, 3, cfg.dim))
        new = block(x, t_mod, rope, text_k, text_v, ctx, audio)
        old = old_block(block, x, t_mod, rope, text_k, text_v, ctx, audio)
        for name, a, b in zip(("x", "k", "v"), new, old, strict=True):
            diff = (a.float() - b.float()).abs().max().item()
            print(f"block {name}: bit-identical={torch.equal(a, b)} max|diff|={diff:.3g}")

        lin = torch.nn.Linear(cfg.dim, cfg.dim).to(dev, dt)
        fp8 = Fp8Linear.from_linear(lin)
        a = r(3 * fsl, cfg.dim) * 3
        scale = a.abs().amax().float().clamp(min=1e-12) / FP8_MAX
        xq_old = (a / scale.to(a.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        amax = torch.linalg.vector_norm(a, ord=float("inf"))
        xq_new = (a / (amax.float().clamp(min=1e-12) / FP8_MAX).to(a.dtype)).to(FP8)
        print(
            f"fp8 activation quantisation bit-identical={torch.equal(xq_old.view(torch.uint8), xq_new.view(torch.uint8))}"
        )
        print(f"fp8 linear runs: {tuple(fp8(a).shape)}")


if __name__ == "__main__":
    main()
