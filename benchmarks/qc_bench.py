"""Cost of QC with and without the picture checks on an hour-long preview-engine lecture.

The lecture: a unit of `--unit-minutes` (the bundled sample looped with pauses, normalised like the line
does) rendered by the preview engine at 704x384 in 30-s segments with its handoff carried, then the
unit's segments repeated (no re-encode) and muxed with the unit's audio repeated, up to `--minutes`.
Speech spans come from the line's VAD on that audio (not timed). QC then runs twice on the same file:
the container and sound checks alone, and with the picture checks (identity, lip-sync proxy, motion).

    .venv/bin/python benchmarks/qc_bench.py --minutes 60 --out benchmarks/results

Reports wall seconds and CPU seconds, split between this process (decoding, picture checks) and its
children that run beside it (ffmpeg's loudness meter, the identity helper process): on a shared
machine the wall time moves with the load, the CPU time much less; on two free cores the stage takes
about the larger of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from liveavatar_core import media
from liveavatar_core.audio import normalize_to_wav
from liveavatar_core.engines.base import GenerationConfig, SegmentRequest
from liveavatar_core.engines.preview import PreviewEngine
from liveavatar_core.portrait import load_rgb, prepare_portrait
from liveavatar_core.qc import run_qc
from liveavatar_core.timebase import AUDIO_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME
from liveavatar_core.vad import detect_speech
from tests.fixtures.speech import build_lecture

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 704, 384
SEGMENT_FRAMES = 30 * FPS


def render_unit(work: Path, minutes: float) -> tuple[list[Path], Path]:
    """Segment files of a `minutes` preview lecture and its normalised 16 kHz WAV."""
    wav = normalize_to_wav(build_lecture(work / "unit.wav", minutes * 60), work / "unit16k.wav").path
    audio, _ = sf.read(str(wav), dtype="float32")
    frames = len(audio) // SAMPLES_PER_FRAME  # whole frames only, so the units join exactly
    portrait = prepare_portrait(ROOT / "examples/portrait.jpg", height=HEIGHT, width=WIDTH)
    engine, config = PreviewEngine(), GenerationConfig(height=HEIGHT, width=WIDTH)
    paths, state = [], None
    for k, a in enumerate(range(0, frames, SEGMENT_FRAMES)):
        b = min(a + SEGMENT_FRAMES, frames)
        path = work / f"seg{k:03d}.mp4"
        with media.VideoWriter(path, WIDTH, HEIGHT) as writer:
            request = SegmentRequest(
                audio=audio[a * SAMPLES_PER_FRAME : b * SAMPLES_PER_FRAME], num_frames=b - a,
                portrait=portrait.image, prompt="", seed=0, config=config, face_box=portrait.face_box,
                handoff=state,
            )  # fmt: skip
            state = engine.generate(request, writer).handoff
        paths.append(path)
    sf.write(str(wav), audio[: frames * SAMPLES_PER_FRAME], AUDIO_SAMPLE_RATE, subtype="PCM_16")
    return paths, wav


def repeat(paths: list[Path], wav: Path, times: int, work: Path) -> tuple[Path, Path, list[tuple[int, int]]]:
    """The unit `times` over: one video, its WAV and its segments' frame ranges."""
    long_wav = work / "lecture16k.wav"
    audio, _ = sf.read(str(wav), dtype="int16")
    with sf.SoundFile(str(long_wav), "w", AUDIO_SAMPLE_RATE, 1, subtype="PCM_16") as out:
        for _ in range(times):
            out.write(audio)
    video = work / "lecture.mp4"
    media.assemble(paths * times, long_wav, video)
    lengths = [media.probe(p).video.frames for p in paths] * times
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return video, long_wav, [(int(a), int(a + n)) for a, n in zip(starts, lengths, strict=True)]


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process, and of its finished children (ffmpeg's loudness meter, the
    identity helper process)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def timed(**kwargs) -> dict:
    wall, (own, kids) = time.perf_counter(), cpu_seconds()
    report = run_qc(**kwargs)
    own_after, kids_after = cpu_seconds()
    return {
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(own_after - own + kids_after - kids, 1),
        "cpu_python_s": round(own_after - own, 1),
        "cpu_children_s": round(kids_after - kids, 1),
        "failed": report.to_dict()["failed"],
        "picture": None
        if report.picture is None
        else {
            "lip_sync": report.picture["lip_sync"],
            "identity_samples": sum(len(s["identity"]["samples"]) for s in report.picture["segments"]),
            "worst_identity": max(s["identity"].get("worst", 0) for s in report.picture["segments"]),
            "jumps_at_s": [c["at_s"] for c in report.picture["cuts"] if c.get("ratio", 0) > 4.0],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--unit-minutes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep", type=Path, help="build the lecture here and keep it (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if args.keep and (work / "lecture.mp4").exists():  # built by an earlier run with --keep
            video, wav = work / "lecture.mp4", work / "lecture16k.wav"
            lengths = [media.probe(p).video.frames for p in sorted(work.glob("seg*.mp4"))]
            lengths *= args.minutes // args.unit_minutes
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            segments = [(int(a), int(a + n)) for a, n in zip(starts, lengths, strict=True)]
        else:
            paths, unit_wav = render_unit(work, args.unit_minutes)
            video, wav, segments = repeat(paths, unit_wav, args.minutes // args.unit_minutes, work)
        spans = detect_speech(wav)
        print(
            f"built {video.stat().st_size / 2**20:.0f} MB, {len(segments)} segments in {time.perf_counter() - t:.0f} s"
        )
        frames = segments[-1][1]
        common = {
            "video_path": video,
            "expected_frames": frames,
            "audio_duration_s": frames / FPS,
            "speech_spans": spans,
        }
        result = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "load_average_before": os.getloadavg(),
            "minutes": args.minutes,
            "segments": len(segments),
            "without_picture": timed(**common),
            "with_picture": timed(**common, portrait=load_rgb(ROOT / "examples/portrait.jpg", "portrait", []), segments=segments),
            "load_average_after": os.getloadavg(),
        }  # fmt: skip
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"qc_bench_{args.minutes}min.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
