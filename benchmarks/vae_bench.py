"""VAE decode per 48-frame clip: diffusers' per-latent loop (today's) against the faster paths.

A seeded random full-size Wan2.1 VAE (base width 96) in bf16 decodes, for each variant, a stream as the
engine does: primed with 7 latents, then `--clips` clips of 12 latents in pipeline blocks of 3 latents
(`decode_uint8` per block, so the uint8 conversion and the copy to the host are in), after one warm-up
clip. Every variant decodes the same latents; reported: seconds per clip (median over clips), peak GPU
memory, and the uint8 frames' difference to today's (largest, and the share of values that differ by
more than one level). Variants are `vae_decode.DecodeOptions`; `+benchmark` rows also turn on
`torch.backends.cudnn.benchmark` (they run last: it is a process-wide switch); `whole clip` rows decode
each clip's 12 latents in one call; the `biases unfolded` row adds the residual blocks' conv biases
in passes of their own, as rounds 3-6 did, the "before" of round 7's folded biases (`--only "compiled,
channels-last"` puts today's fast path first, so the frame columns compare the two). Round 6's row
against round 5's norm (channels dynamic) ran in round 7: docs/benchmarks.md.

    PYTHONPATH=. python benchmarks/vae_bench.py OUT [--size 704x384] [--clips 3]
    PYTHONPATH=. python benchmarks/vae_bench.py OUT --tiny --size 64x64 --clips 1   # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from diffusers import AutoencoderKLWan  # noqa: E402

from liveavatar_core.engines.liveavatar.vae import WanVideoVAE  # noqa: E402
from liveavatar_core.engines.liveavatar.vae_decode import DecodeOptions  # noqa: E402

PRIME_LATENTS = 7
LATENTS_PER_CLIP = 12
BLOCK_LATENTS = 3

FUSED_CL = DecodeOptions(chunk=4, fused=True, channels_last=True)
FAST = DecodeOptions(chunk=4, fused=True, compiled=True, channels_last=True)
VARIANTS: list[tuple[str, DecodeOptions, bool, int]] = [  # name, options, cudnn.benchmark, latents per call
    ("today: diffusers, 1 latent a call", DecodeOptions(), False, BLOCK_LATENTS),
    ("diffusers, a block a call", DecodeOptions(chunk=4), False, BLOCK_LATENTS),
    ("fused, a block a call", DecodeOptions(chunk=4, fused=True), False, BLOCK_LATENTS),
    ("fused, channels-last", FUSED_CL, False, BLOCK_LATENTS),
    ("fused, compiled, channels-last", FAST, False, BLOCK_LATENTS),
    ("fused, compiled, channels-last, whole clip", DecodeOptions(**{**asdict(FAST), "chunk": 12}), False, 12),
    ("fused, compiled, channels-last +benchmark", FAST, True, BLOCK_LATENTS),
    ("fused, compiled, channels-last, biases unfolded (round 6)", FAST, False, BLOCK_LATENTS),
]


def random_vae(base_dim: int, device: torch.device, dtype: torch.dtype) -> WanVideoVAE:
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16).eval().requires_grad_(False)
    return WanVideoVAE(model).to(device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_variant(
    vae: WanVideoVAE, latents: torch.Tensor, clips: int, per_call: int, name: str
) -> tuple[list, list]:
    """Prime, one warm-up clip, then `clips` timed ones; returns (seconds per timed clip, uint8 frames)."""
    device = vae.device
    stream = vae.decoder_stream()
    if "biases unfolded" in name:
        stream.fused.fold_biases = False
    stream.decode(latents[:, :, :PRIME_LATENTS])
    seconds, frames = [], []
    for c in range(clips + 1):
        start = PRIME_LATENTS + c * LATENTS_PER_CLIP
        sync(device)
        t0 = time.perf_counter()
        clip = [
            stream.decode_uint8(latents[:, :, i : i + per_call])
            for i in range(start, start + LATENTS_PER_CLIP, per_call)
        ]
        sync(device)
        if c:
            seconds.append(time.perf_counter() - t0)
        frames.append(np.concatenate(clip))
    return seconds, frames


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    height, width = (int(v) for v in args.size.split("x"))
    vae = random_vae(8 if args.tiny else 96, device, dtype)
    total = PRIME_LATENTS + (args.clips + 1) * LATENTS_PER_CLIP
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, total, height // 8, width // 8, generator=gen).to(device)
    rows, today = [], None
    for name, options, benchmark, per_call in VARIANTS:
        if args.only and not any(word in name for word in args.only):
            continue
        torch.backends.cudnn.benchmark = benchmark
        vae.decode_options = options
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        seconds, frames = decode_variant(vae, latents, args.clips, per_call, name)
        first = time.perf_counter() - t0 - sum(seconds)
        row = {
            "variant": name,
            "options": asdict(options),
            "cudnn_benchmark": benchmark,
            "latents_per_call": per_call,
            "s_per_clip": float(np.median(seconds)),
            "s_per_clip_all": seconds,
            "s_prime_and_warmup_clip": first,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        if today is None:
            today = frames
        diff = np.concatenate([np.abs(a.astype(np.int16) - b) for a, b in zip(frames, today, strict=True)])
        row["max_level_diff"] = int(diff.max())
        row["share_over_1_level"] = float((diff > 1).mean())
        row["share_saturated"] = float(np.isin(np.concatenate(frames), (0, 255)).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    torch.backends.cudnn.benchmark = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "size": args.size, "clips": args.clips, "dtype": str(dtype), "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"VAE decode per 48-frame clip at {result['size']} ({result['device']}, {result['dtype']}, "
        f"median of {result['clips']} clips)",
        "",
        "| variant | latents a call | s per clip | peak GiB | max level diff to today's | share > 1 level |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['latents_per_call']} | {r['s_per_clip']:.3f} | {peak} | "
            f"{r['max_level_diff']} | {r['share_over_1_level']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="704x384", help="HxW in pixels (multiples of 8)")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="base width 8 instead of 96 (a CPU check)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--only", nargs="*", help="run the variants whose names contain one of these")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "vae_bench.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "vae_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
