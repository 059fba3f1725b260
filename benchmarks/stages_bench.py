"""Wall time and peak memory of every stage but generation, for lectures of several lengths.

Runs the production tasks' own functions (`task.fn`) inside one Prefect flow, in stage order, with a
sampler thread reading the resident memory of this process and its children (ffmpeg) every 20 ms.
Generation runs too (the preview engine at the real output size, so assembly and QC see real
segments) but is reported apart: the target concerns everything else.

    .venv/bin/python benchmarks/stages_bench.py --minutes 10 60 --out benchmarks/results

Target (issue 2): everything but generation under 3% of the lecture's duration, memory flat in length.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import platform
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
from prefect import flow

from flows.lecture import LectureParams, choose_engine
from liveavatar_core import media
from liveavatar_core.keys import segment_key
from tasks.finish import assemble, encode_audio_track, probe_output, publish, quality_check, render_report
from tasks.generate import generate_segment
from tasks.models import SegmentJob
from tasks.prepare import plan_segments, prepare_audio, prepare_portrait, prepare_prompt
from tasks.size import choose_size
from tasks.stage import check_destination, stage_input

ROOT = Path(__file__).resolve().parents[1]


class TreeMemory:
    """Peak RSS (bytes) of this process plus its live children, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.02):
        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> None:
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.peak = max(self.peak, total)

    def reset(self) -> None:
        self.peak = 0
        self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def make_lecture(minutes: float, dst: Path) -> Path:
    """A lecture of `minutes` by looping the bundled sample (44.1 kHz stereo MP3, like an upload)."""
    loops = int(minutes * 60 / 26.9) + 1
    subprocess.run(
        [media.ffmpeg_exe(), "-v", "error", "-y", "-stream_loop", str(loops), "-i", str(ROOT / "examples/lecture.mp3"),
         "-t", str(minutes * 60), "-ac", "2", "-ar", "44100", "-b:a", "128k", str(dst)],
        check=True,
    )  # fmt: skip
    return dst


@flow(name="stages-benchmark")
def run_stages(audio: str, work: str, out: str, size: str) -> dict:
    memory = TreeMemory()
    rows: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(name: str):
        memory.reset()
        start = time.perf_counter()
        yield
        rows[name] = {"seconds": time.perf_counter() - start, "peak_rss_mb": memory.peak / 2**20}

    params = LectureParams(audio=audio, image=str(ROOT / "examples/portrait.jpg"), out=out, engine="preview",
                           prompt=(ROOT / "examples/prompt.txt").read_text(), size=size, work=work)  # fmt: skip
    with stage("stage inputs"):
        check_destination.fn(out)
        audio_in = stage_input.fn(params.audio, "--audio", work)
        image_in = stage_input.fn(params.image, "--image", work)
    engine = choose_engine(params)
    with stage("audio: decode, loudness, VAD"):
        prep = prepare_audio.fn(audio_in, work)
    with stage("segment plan + audio slices"):
        plan = plan_segments.fn(prep, params.segment_seconds, params.max_segment_seconds)
    with stage("portrait"):
        config = choose_size.fn(image_in, params.size, params.precision)
        face = prepare_portrait.fn(image_in, config.height, config.width, work)
    with stage("prompt"):
        text = prepare_prompt.fn(params.prompt, engine)
    outputs, previous = [], None
    # As in the flow, the AAC track is encoded while segments are generated (off the critical path).
    track: dict[str, object] = {}

    def encode_track() -> None:
        start = time.perf_counter()
        track["url"] = encode_audio_track.fn(prep)
        track["seconds"] = time.perf_counter() - start

    # The flow's context goes with it (the task logs through it, as it does when the flow submits it).
    encoder = threading.Thread(target=contextvars.copy_context().run, args=(encode_track,))
    encoder.start()
    with stage("generate (preview engine; excluded)"):
        for seg in plan:
            key = segment_key(audio_sha=seg.audio_sha256, portrait_sha=face.sha256, prompt=text.text, engine=engine.name,
                              engine_version=engine.version, weights=engine.weights, config=config.to_dict(),
                              seed=0, handoff_sha=previous.key if previous else None)  # fmt: skip
            job = SegmentJob(key=key, index=seg.index, audio_url=seg.audio_url, frames=seg.frames, portrait_url=face.url,
                             face_box=face.face_box, prompt=text.text, engine=engine, config=config.to_dict(), seed=0,
                             handoff_url=previous.handoff_url if previous else None, memory_budget_bytes=None,
                             work=work)  # fmt: skip
            previous = generate_segment.fn(job)
            outputs.append(previous)
        encoder.join()
    rows["audio track: AAC (overlaps generation; excluded)"] = {
        "seconds": track["seconds"],
        "peak_rss_mb": 0.0,
    }
    with stage("assemble (concat + mux)"):
        video = assemble.fn(outputs, track["url"], work, "bench")
    with stage("quality check"):
        qc = quality_check.fn(video, prep, [p.frames for p in plan], face, engine)
        probe_output.fn(video)
    with stage("report"):
        html = render_report.fn(video, {"segments": [o.model_dump() for o in outputs]}, qc)
    with stage("publish"):
        publish.fn(out, video, json.dumps(qc), html, json.dumps({"bench": True}))
    memory.stop()
    return {"rows": rows, "segments": len(plan), "duration_s": prep.duration_s, "qc_failed": qc["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--size", default="704x384")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--keep", type=Path, help="publish each lecture to KEEP/<minutes>min (video, qc.json, report)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "runs": {}}
    for minutes in args.minutes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            audio = make_lecture(minutes, tmp / "lecture.mp3")
            out = args.keep / f"{minutes:g}min" if args.keep else tmp / "out"
            results["runs"][f"{minutes:g}"] = run_stages(str(audio), str(tmp / "work"), str(out), args.size)
    (args.out / "stages.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()}  # fmt: skip


def _cell(row: dict) -> str:
    return (
        f"{row['seconds']:.1f} / {row['peak_rss_mb']:.0f}"
        if row["peak_rss_mb"]
        else f"{row['seconds']:.1f} / –"
    )


def table(results: dict) -> str:
    runs = results["runs"]
    names = list(next(iter(runs.values()))["rows"])
    head = "| stage | " + " | ".join(f"{m} min: s / peak MB" for m in runs) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    for name in names:
        cells = [_cell(r["rows"][name]) for r in runs.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = []
    for r in runs.values():
        total = sum(v["seconds"] for k, v in r["rows"].items() if "excluded" not in k)
        totals.append(
            f"**{total:.1f} s = {100 * total / r['duration_s']:.2f}%** of {r['duration_s'] / 60:.0f} min"
        )
    lines.append("| all but generation | " + " | ".join(totals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
