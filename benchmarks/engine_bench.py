"""Benchmark the LiveAvatar engine with seeded random full-size weights on one GPU.

For each precision (bf16, fp8), area (704x384, 384x256) and way of running (`--chains`: eager or
compiled element-wise chains, `chains.py`; rows: compiled, the chains that feed fp8 linears as
one-pass Triton kernels, `row_kernels.py`; graphs: compiled, block forwards replayed as CUDA graphs,
`graphs.py`; overlap: graphs, each block decoded on a second stream): a warm-up segment (one clip: the prompt
encode, the portrait encode and first-call costs, reported as "cold"), then a timed segment of
`--clips` 48-frame clips from the same portrait (steady state), then a one-clip segment continued from
the timed one's handoff (the cost of starting from a handoff: on the same engine the kept rings and
decoder, so only the sink forward; elsewhere ring replay and decoder re-prime).
Reported per clip: seconds end to end and FPS (audio features, DiT, VAE decode included), and each of
those three separately; peak GPU memory (torch.cuda.max_memory_allocated) against the engine's estimate;
for compiled rows, how far the timed segment's last frame is from the eager row's (uint8 levels), and
for fp8 rows, from the bf16 row's.

`--orders` measures the denoising orders instead (`order.py`), at the first area, eager chains: per
precision a warm-up clip, then the same `--clips`-clip segment in block order, in sweep order, in
sweep order with the DiT weights streamed from host memory (`offload_weights`), and in block order
with streamed weights (one clip: the old weight-offload rung); the frames' largest difference from the
block order; and the start of a one-clip segment continued from the block-order segment's handoff,
first from the rings the engine kept ("kept state"), then by replay (the kept rings are used up).
A switch of weight placement gets its own untimed one-clip warm-up.

Every segment goes down the engine's degrade ladder (`generate_with_ladder`), so a capped run reports
the rung it took, and its estimate is that rung's. `--cap-gib N` caps this process's device memory at
N GiB before anything loads (the engine's `memory_budget_bytes`: `set_per_process_memory_fraction`)
and the weights load placed for the first rung that fits; `--checkpoint-dir` loads an official-layout
checkpoint (e.g. one `benchmarks/full_checkpoint.py` wrote) instead of random weights. The load's
peak device memory and seconds are reported beside the segments'.

Writes OUT/engine_bench.json and OUT/engine_bench.md (OUT/order_bench.json and .md with `--orders`).
`--tiny` runs test-size random models (CPU is fine) to check the script end to end; `--check-backends`
compares every backend (KV offload, weight offload, fp8, compile) against the plain run on a tiny model (offloads must be bit-identical).

    PYTHONPATH=. python benchmarks/engine_bench.py out/bench                # GPU, full size
    PYTHONPATH=. python benchmarks/engine_bench.py out/bench-tiny --tiny --sizes 64x64 --clips 1
    PYTHONPATH=. python benchmarks/engine_bench.py out/b24 --cap-gib 24 --checkpoint-dir /ckpt \
        --precisions fp8 --sizes 704x384 --chains eager
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from liveavatar_core.engines.base import GenerationConfig, GiB, SegmentRequest  # noqa: E402
from liveavatar_core.engines.ladder import LadderExhausted, generate_with_ladder  # noqa: E402
from liveavatar_core.engines.liveavatar.engine import LiveAvatarEngine  # noqa: E402
from liveavatar_core.errors import LiveAvatarError, OutOfMemory  # noqa: E402
from liveavatar_core.timebase import SAMPLES_PER_FRAME  # noqa: E402

FRAMES_PER_CLIP = 48
PROMPT = "A lecturer in a grey blazer explaining statistics in a bright studio, realistic photo style"


class CountingSink:
    """Keeps only the count and the last frame (the engine's own buffers are what is measured)."""

    def __init__(self):
        self.frames = 0
        self.last: np.ndarray | None = None

    def write(self, frames: np.ndarray) -> None:
        self.frames += len(frames)
        self.last = frames[-1]

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.frames, self.last = 0, None


class KeepingSink(CountingSink):
    def __init__(self):
        super().__init__()
        self.kept: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        super().write(frames)
        self.kept.extend(f.copy() for f in frames)

    def abort(self) -> None:
        super().abort()
        self.kept.clear()


def level_diff(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|frames - reference| per value, in uint8 levels (both uint8 frames of the same shape)."""
    return np.abs(frames.astype(np.int16) - reference)


def speech(frames: int, seed: int) -> np.ndarray:
    """Noise in syllable-like bursts at 16 kHz (the model's weights are random: content is irrelevant)."""
    rng = np.random.default_rng(seed)
    n = frames * SAMPLES_PER_FRAME
    envelope = (np.sin(np.arange(n) / 16000 * 2 * np.pi * 3) > 0).astype(np.float32)
    return (rng.standard_normal(n) * 0.2 * envelope).astype(np.float32)


def portrait(height: int, width: int) -> np.ndarray:
    return (np.random.default_rng(1).random((height, width, 3)) * 255).astype(np.uint8)


def request(
    config: GenerationConfig,
    frames: int,
    seed: int = 0,
    handoff: bytes | None = None,
    budget: int | None = None,
) -> SegmentRequest:
    return SegmentRequest(
        audio=speech(frames, seed),
        num_frames=frames,
        portrait=portrait(config.height, config.width),
        prompt=PROMPT,
        seed=seed,
        config=config,
        handoff=handoff,
        memory_budget_bytes=budget,
    )


@dataclass
class Row:
    size: str
    precision: str
    chains: str
    clips: int
    status: str = "ok"
    weights: str = "random"
    cap_gib: float | None = None  # device memory cap set at process start (None: uncapped)
    rung: str = ""  # the ladder rung the timed segment ran on
    load_seconds: float = 0.0
    load_peak_gib: float = 0.0
    seconds_per_clip: float = 0.0
    fps: float = 0.0
    dit_seconds_per_clip: float = 0.0
    vae_seconds_per_clip: float = 0.0
    audio_seconds_per_clip: float = 0.0
    cold_first_clip_seconds: float = 0.0
    cold_timings: dict | None = None
    continue_overhead_seconds: float = 0.0
    continuation: str = ""  # how the continued segment started: "kept state" or "replay"
    peak_gib: float = 0.0
    estimate_gib: float = 0.0
    estimate_error: float = 0.0  # (estimate - measured) / measured
    estimate_parts_gib: dict | None = None
    handoff_mib: float = 0.0
    max_diff_vs_eager: int | None = None  # last frame of the timed segment, uint8 levels
    max_diff_vs_compiled: int | None = None  # graphs/overlap rows: the same against the compiled row
    # fp8 rows: the same frame against the bf16 row of the same area and chains (max, mean levels)
    max_diff_vs_bf16: int | None = None
    mean_diff_vs_bf16: float | None = None
    # --segments N: the timed segment, then N - 1 more of as many clips, each continued from the one
    # before (a lecture's segments on one worker): per segment its rung, continuation, s, FPS, peak
    chain: list[dict] | None = None
    error: str = ""


def bench(
    engine: LiveAvatarEngine,
    config: GenerationConfig,
    chains: str,
    clips: int,
    budget: int | None = None,
    continued_segment: bool = True,
    segments: int = 1,
) -> tuple[Row, np.ndarray | None]:
    """One row (`chains`: how `run_config` made `config`), and the timed segment's last frame. Each
    segment goes down the ladder."""
    precision = "fp8" if config.fp8 else str(engine.dtype).removeprefix("torch.")
    row = Row(config.size, precision, chains, clips)
    last = CountingSink()

    def run(frames: int, seed: int, sink: CountingSink, handoff: bytes | None = None):
        outcome = generate_with_ladder(engine, request(config, frames, seed, handoff, budget), lambda: sink)
        return outcome.result, outcome.attempts[-1]

    try:
        cold, _ = run(FRAMES_PER_CLIP, 1, CountingSink())
        row.cold_first_clip_seconds = cold.seconds
        row.cold_timings = cold.details["timings"]
        timed, attempt = run(clips * FRAMES_PER_CLIP, 2, last)
        taken = GenerationConfig.from_dict(attempt.config)
        row.rung = attempt.rung
        frames = clips * FRAMES_PER_CLIP
        row.estimate_gib = engine.estimate_memory(taken, frames) / GiB
        row.estimate_parts_gib = {k: round(v / GiB, 3) for k, v in engine.memory_parts(taken, frames).items()}
        t = timed.details["timings"]
        row.seconds_per_clip = timed.seconds / clips
        row.fps = clips * FRAMES_PER_CLIP / timed.seconds
        row.dit_seconds_per_clip = t["dit"] / clips
        row.vae_seconds_per_clip = t["vae"] / clips
        row.audio_seconds_per_clip = t["audio"] / clips
        row.peak_gib = timed.peak_memory_bytes / GiB
        row.handoff_mib = len(timed.handoff) / 2**20
        row.peak_gib = max(row.peak_gib, cold.peak_memory_bytes / GiB)
        if segments > 1:
            row.chain = [chain_entry(timed, attempt, clips)]
            handoff = timed.handoff
            for k in range(1, segments):
                segment, step = run(clips * FRAMES_PER_CLIP, 2 + k, CountingSink(), handoff)
                row.chain.append(chain_entry(segment, step, clips))
                row.peak_gib = max(row.peak_gib, segment.peak_memory_bytes / GiB)
                handoff = segment.handoff
        if continued_segment:
            continued, _ = run(FRAMES_PER_CLIP, 2, CountingSink(), timed.handoff)
            row.continue_overhead_seconds = continued.details["timings"]["prepare"]
            row.continuation = continued.details["continuation"]
            row.peak_gib = max(row.peak_gib, continued.peak_memory_bytes / GiB)
        if row.peak_gib:
            row.estimate_error = (row.estimate_gib - row.peak_gib) / row.peak_gib
    except (LadderExhausted, OutOfMemory) as exc:
        row.status, row.error = "out of memory", str(exc)
    except LiveAvatarError as exc:
        row.status, row.error = "unavailable", str(exc)
    return row, last.last


def chain_entry(result, attempt, clips: int) -> dict:
    return {
        "rung": attempt.rung,
        "continuation": result.details["continuation"],
        "seconds": round(result.seconds, 2),
        "fps": round(clips * FRAMES_PER_CLIP / result.seconds, 2),
        "peak_gib": round(result.peak_memory_bytes / GiB, 2),
    }


@dataclass
class OrderRow:
    precision: str
    order: str
    streamed_weights: bool
    clips: int
    status: str = "ok"
    seconds_per_clip: float = 0.0
    fps: float = 0.0
    dit_seconds_per_clip: float = 0.0
    peak_gib: float = 0.0
    estimate_gib: float = 0.0
    max_diff_vs_block: int | None = None  # every frame of the segment, uint8 levels
    error: str = ""


def bench_orders(
    engine: LiveAvatarEngine, size: str, precision: str, clips: int, report
) -> tuple[list[OrderRow], dict]:
    """The order rows of one precision, and the segment-start costs (see the module docstring)."""
    base = GenerationConfig.for_output(size, precision).replace(offload_encoders=True, compile=False)
    engine.generate(request(base, FRAMES_PER_CLIP, seed=1), CountingSink())  # warm-up
    variants = [
        ("block", False, clips),
        ("sweep", False, clips),
        ("sweep", True, clips),
        ("block", True, 1),
    ]
    rows, starts, reference = [], {"precision": precision}, None
    placement = False
    for order, streamed, n in variants:
        config = base.replace(order=order, offload_weights=streamed)
        row = OrderRow(precision, order, streamed, n, estimate_gib=engine.estimate_memory(config) / GiB)
        sink = KeepingSink()
        try:
            if streamed != placement:  # the switch to streamed weights (pinning them) is not timed
                engine.generate(request(config, FRAMES_PER_CLIP, seed=1), CountingSink())
                placement = streamed
            result = engine.generate(request(config, n * FRAMES_PER_CLIP, seed=2), sink)
            row.seconds_per_clip = result.seconds / n
            row.fps = n * FRAMES_PER_CLIP / result.seconds
            row.dit_seconds_per_clip = result.details["timings"]["dit"] / n
            row.peak_gib = result.peak_memory_bytes / GiB
            frames = np.stack(sink.kept)
            if reference is None:
                reference = frames
            if len(frames) == len(reference):  # a shorter segment hears other wav2vec2 windows
                row.max_diff_vs_block = int(level_diff(frames, reference).max())
            if order == "block" and not streamed:
                for how in ("kept state", "replay"):  # the second use finds the kept rings used up
                    started = engine.generate(
                        request(config, FRAMES_PER_CLIP, seed=3, handoff=result.handoff), CountingSink()
                    )
                    assert started.details["continuation"] == how, started.details["continuation"]
                    starts[how] = {
                        "prepare_seconds": started.details["timings"]["prepare"],
                        "segment_seconds": started.seconds,
                    }
        except OutOfMemory as exc:
            row.status, row.error = "out of memory", str(exc)
        except LiveAvatarError as exc:
            row.status, row.error = "unavailable", str(exc)
        rows.append(row)
        report(row)
    return rows, starts


def orders_markdown(rows: list[OrderRow], starts: list[dict], device: str, size: str) -> str:
    lines = [
        f"Denoising orders, LiveAvatar random weights, {device}, {size}, 4 steps, eager chains, "
        "encoders off the GPU; s / clip end to end (audio, DiT, VAE).",
        "",
        "| precision | order | weights | clips | s / clip | FPS | DiT s / clip | peak GiB | estimate GiB "
        "| max diff vs block (uint8) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        weights = "streamed" if r.streamed_weights else "resident"
        if r.status != "ok":
            lines.append(f"| {r.precision} | {r.order} | {weights} | {r.clips} | {r.status} |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r.precision} | {r.order} | {weights} | {r.clips} | {r.seconds_per_clip:.2f} | {r.fps:.1f} "
            f"| {r.dit_seconds_per_clip:.2f} | {r.peak_gib:.1f} | {r.estimate_gib:.1f} | {r.max_diff_vs_block} |"
        )
    lines += ["", "Start of a continued one-clip segment (block order):", ""]
    lines += [
        "| precision | kept state: prepare s | replay: prepare s | kept: segment s | replay: segment s |"
    ]
    lines += ["|---|---|---|---|---|"]
    for s in starts:
        if "replay" in s:
            lines.append(
                f"| {s['precision']} | {s['kept state']['prepare_seconds']:.2f} | {s['replay']['prepare_seconds']:.2f} "
                f"| {s['kept state']['segment_seconds']:.2f} | {s['replay']['segment_seconds']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def run_orders(args, engine: LiveAvatarEngine, device_name: str) -> int:
    size = args.sizes.split(",")[0].strip()
    rows: list[OrderRow] = []
    starts: list[dict] = []

    def save(row: OrderRow | None = None) -> None:  # after every row: a run cut short keeps what it had
        if row is not None:
            rows.append(row)
            print(json.dumps(asdict(row)), flush=True)
        report = {
            "device": device_name,
            "torch": torch.__version__,
            "size": size,
            "rows": [asdict(r) for r in rows],
        }
        report["starts"] = starts
        (args.out / "order_bench.json").write_text(json.dumps(report, indent=2))
        (args.out / "order_bench.md").write_text(orders_markdown(rows, starts, device_name, size))

    for precision in [p.strip() for p in args.precisions.split(",")]:  # bf16 before fp8: fp8 is one-way
        _, start = bench_orders(engine, size, precision, args.clips, save)
        starts.append(start)
        save()
    print((args.out / "order_bench.md").read_text())
    return 0 if all(r.status == "ok" for r in rows) else 1


def run_config(size: str, precision: str, chains: str, resident_encoders: bool) -> GenerationConfig:
    """A row's config: `chains` is eager, compiled, rows (compiled, the fp8 chains as one-pass Triton
    kernels), graphs (compiled chains replayed as CUDA graphs) or overlap (graphs, the decode on a
    second stream)."""
    if chains not in ("eager", "compiled", "rows", "graphs", "overlap"):
        raise SystemExit(
            f"engine_bench: --chains {chains!r}: expected eager, compiled, rows, graphs or overlap"
        )
    return GenerationConfig.for_output(size, precision).replace(
        offload_encoders=not resident_encoders,
        compile=chains != "eager",
        row_kernels=chains == "rows",
        cuda_graphs=chains in ("graphs", "overlap"),
        overlap_decode=chains == "overlap",
    )


def check_backends(device: str | None) -> list[dict]:
    """Every backend against the plain run, tiny random model: offloads exact, fp8/compile close."""
    engine = LiveAvatarEngine(random_weights=True, device=device, tiny=True)
    # eager: offloads, CUDA graphs and the overlapped decode must match it bit for bit
    base = GenerationConfig(height=64, width=64, compile=False)
    variants = {
        "plain": base,
        "offload_encoders": base.replace(offload_encoders=True),
        "offload_kv_cache": base.replace(offload_kv_cache=True),
        "offload_weights": base.replace(offload_weights=True),
        "offload_all": base.replace(offload_encoders=True, offload_kv_cache=True, offload_weights=True),
        "fp8": base.replace(fp8=True),
        "fp8_offload_weights": base.replace(fp8=True, offload_weights=True),
        "compile": base.replace(compile=True),
        "compile_offload_weights": base.replace(compile=True, offload_weights=True),
        "cuda_graphs": base.replace(cuda_graphs=True),
        "overlap_decode": base.replace(overlap_decode=True),
        "compile_cuda_graphs_overlap_decode": base.replace(
            compile=True, cuda_graphs=True, overlap_decode=True
        ),
        "sweep": base.replace(order="sweep"),
        "sweep_offload_kv_cache": base.replace(order="sweep", offload_kv_cache=True),
        "sweep_offload_weights": base.replace(order="sweep", offload_weights=True),
        "sweep_offload_all": base.replace(
            order="sweep", offload_encoders=True, offload_kv_cache=True, offload_weights=True
        ),
    }
    results, reference = [], None
    for name, config in variants.items():
        sink = KeepingSink()
        entry = {"backend": name}
        try:
            first = engine.generate(request(config, 24, seed=3), sink)
            second = engine.generate(request(config, 24, seed=3, handoff=first.handoff), sink)
            frames = np.stack(sink.kept)
            if reference is None:
                reference = frames
            entry["max_abs_diff_vs_plain"] = int(level_diff(frames, reference).max())
            entry["handoff"] = f"{second.details['handoff_in']}, {second.details['continuation']}"
        except LiveAvatarError as exc:
            entry["error"] = str(exc)
        results.append(entry)
    engine.close()
    return results


def markdown(rows: list[Row], device: str, checks: list[dict] | None) -> str:
    lines = [
        f"LiveAvatar engine, {device}; steady state over {rows[0].clips if rows else 0} clips of 48 frames "
        "(audio features, DiT and VAE decode included; each also shown alone).",
        "",
        "| weights | cap GiB | area | precision | chains | rung | load s | load peak GiB | s / clip | FPS "
        "| DiT s / clip | VAE s / clip | cold 1st clip s | continue overhead s | continuation | peak GiB "
        "| estimate GiB | estimate error | max diff vs eager | max diff vs compiled | diff vs bf16 max / mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = (
            f"| {r.weights} | {'-' if r.cap_gib is None else f'{r.cap_gib:g}'} | {r.size} | {r.precision} "
            f"| {r.chains} | {r.rung} | {r.load_seconds:.0f} | {r.load_peak_gib:.1f} "
        )
        if r.status != "ok":
            lines.append(head + f"| {r.status} |  |  |  |  |  |  |  |  |  |  |  |")
            continue
        lines.append(
            head + f"| {r.seconds_per_clip:.2f} | {r.fps:.1f} | {r.dit_seconds_per_clip:.2f} "
            f"| {r.vae_seconds_per_clip:.2f} | {r.cold_first_clip_seconds:.1f} "
            f"| {r.continue_overhead_seconds:.2f} | {r.continuation} | {r.peak_gib:.1f} | {r.estimate_gib:.1f} "
            f"| {100 * r.estimate_error:+.1f}% "
            f"| {'' if r.max_diff_vs_eager is None else r.max_diff_vs_eager} "
            f"| {'' if r.max_diff_vs_compiled is None else r.max_diff_vs_compiled} "
            f"| {'' if r.max_diff_vs_bf16 is None else f'{r.max_diff_vs_bf16} / {r.mean_diff_vs_bf16}'} |"
        )
    for r in rows:
        if r.chain:
            lines += [
                "",
                f"Consecutive segments, {r.precision}, cap {r.cap_gib or '-'} GiB, {r.clips} clips each:",
                "",
            ]
            lines += ["| segment | rung | continuation | s | FPS | peak GiB |", "|---|---|---|---|---|---|"]
            lines += [
                f"| {k} | {c['rung']} | {c['continuation']} | {c['seconds']} | {c['fps']} | {c['peak_gib']} |"
                for k, c in enumerate(r.chain)
            ]
    if checks:
        lines += ["", "Backends against the plain run (tiny model, 2 segments through a handoff):", ""]
        lines += ["| backend | max abs diff (uint8) | note |", "|---|---|---|"]
        for c in checks:
            lines.append(
                f"| {c['backend']} | {c.get('max_abs_diff_vs_plain', '')} | {c.get('error', c.get('handoff', ''))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output directory for engine_bench.json and engine_bench.md")
    parser.add_argument(
        "--tiny", action="store_true", help="test-size random models (checks the script on CPU)"
    )
    parser.add_argument("--sizes", default="704x384,384x256", help="comma-separated HxW areas")
    parser.add_argument("--precisions", default="bf16,fp8", help="comma-separated: bf16 (model dtype), fp8")
    parser.add_argument("--clips", type=int, default=4, help="48-frame clips in the timed segment")
    parser.add_argument("--resident-encoders", action="store_true", help="keep umT5 and wav2vec2 on the GPU")
    parser.add_argument(
        "--chains",
        default="eager,compiled",
        help="comma-separated ways to run: eager, compiled (torch.compile of the chains), rows (compiled, "
        "the fp8 chains as one-pass Triton kernels), graphs (compiled chains, block forwards replayed as "
        "CUDA graphs), overlap (graphs, and each block decoded on a second stream while the next "
        "block's DiT runs)",
    )
    parser.add_argument(
        "--orders", action="store_true", help="block vs sweep order, streamed weights, starts"
    )
    parser.add_argument("--check-backends", action="store_true", help="compare every backend on a tiny model")
    parser.add_argument("--check-backends-only", action="store_true", help="only the backend comparison")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument(
        "--cap-gib",
        type=float,
        default=None,
        help="cap this process's device memory at N GiB before loading (the engine's memory budget)",
    )
    parser.add_argument(
        "--checkpoint-dir", default=None, help="load this official-layout checkpoint, not random weights"
    )
    parser.add_argument(
        "--no-continue", action="store_true", help="skip the segment continued from the timed one's handoff"
    )
    parser.add_argument(
        "--segments",
        type=int,
        default=1,
        help="N segments of --clips clips, each continued from the one before (the first is the timed one)",
    )
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.check_backends_only:
        checks = check_backends(args.device)
        (args.out / "backend_checks.json").write_text(json.dumps(checks, indent=2))
        print(markdown([], args.device or "default device", checks))
        return 0 if all("error" not in c for c in checks) else 1
    precisions = [p.strip() for p in args.precisions.split(",")]
    sizes = [s.strip() for s in args.sizes.split(",")]
    chains_list = [c.strip() for c in args.chains.split(",")]
    budget = None if args.cap_gib is None else int(args.cap_gib * GiB)
    first = run_config(sizes[0], precisions[0], chains_list[0], args.resident_encoders)
    start = time.perf_counter()
    engine = LiveAvatarEngine(
        checkpoint_dir=args.checkpoint_dir,
        random_weights=args.checkpoint_dir is None,
        device=args.device,
        tiny=args.tiny,
        memory_budget_bytes=budget,
        prepare_for=first,
    )
    load_seconds = time.perf_counter() - start
    device = engine.device
    load_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    if args.orders:
        return run_orders(args, engine, device_name)
    rows: list[Row] = []
    bf16_frames: dict[tuple[str, str], np.ndarray] = {}
    for precision in precisions:  # bf16 before fp8: going back from fp8 reloads
        for size in sizes:
            eager_frame = compiled_frame = None
            for chains in chains_list:
                config = run_config(size, precision, chains, args.resident_encoders)
                row, frame = bench(
                    engine, config, chains, args.clips, budget, not args.no_continue, args.segments
                )
                row.weights = engine.parts.weights
                row.cap_gib = args.cap_gib
                row.load_seconds = round(load_seconds, 2)
                row.load_peak_gib = load_peak / GiB
                if chains == "eager":
                    eager_frame = frame
                elif frame is not None and eager_frame is not None:
                    row.max_diff_vs_eager = int(level_diff(frame, eager_frame).max())
                if chains == "compiled":
                    compiled_frame = frame
                elif (
                    chains in ("rows", "graphs", "overlap")
                    and frame is not None
                    and compiled_frame is not None
                ):
                    row.max_diff_vs_compiled = int(level_diff(frame, compiled_frame).max())
                if precision == "bf16" and frame is not None:
                    bf16_frames[size, chains] = frame
                elif frame is not None and (size, chains) in bf16_frames:
                    diff = level_diff(frame, bf16_frames[size, chains])
                    row.max_diff_vs_bf16, row.mean_diff_vs_bf16 = (
                        int(diff.max()),
                        round(float(diff.mean()), 3),
                    )
                rows.append(row)
                print(json.dumps(asdict(row)), flush=True)
    engine_weights = f"{engine.parts.weights} (full size)"
    placement = str(engine.parts.placement)
    engine.close()
    checks = check_backends(args.device) if args.check_backends else None
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "weights": "random (tiny)" if args.tiny else engine_weights,
        "cap_gib": args.cap_gib,
        "load_seconds": round(load_seconds, 2),
        "load_peak_gib": round(load_peak / GiB, 3),
        "load_placement": placement,
        "offload_encoders": not args.resident_encoders,
        "chains": args.chains,
        "rows": [asdict(r) for r in rows],
        "backend_checks": checks,
    }
    (args.out / "engine_bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "engine_bench.md").write_text(markdown(rows, device_name, checks))
    print((args.out / "engine_bench.md").read_text())
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
