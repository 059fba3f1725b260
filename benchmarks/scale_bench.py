"""Scale benchmark: finished lecture-minutes per hour against the number of GPUs, one GPU worker per GPU.

For each GPU count G in --gpus (e.g. 1,2,4) the benchmark starts G long-lived GPU workers
(`liveavatar-batch worker --gpu k`, k < G) against one Prefect server, runs one course of
L x G lectures (`liveavatar-batch course --dispatch gpu-workers`, L = --lectures-per-gpu, 2G+1 lectures
in flight, a fresh work store per G so nothing is cached across counts, a different seed per lecture so
no segment is shared), and reads the course's own wall time from its summary.json. Throughput is
published lecture-minutes per hour of that wall time; efficiency(G) = throughput(G) / (G x
throughput(1)); the target is >= 0.95. The course grows with G (weak scaling) so that its fixed start
and tail (the first lecture's preparation, the last one's assembly and QC) weigh the same at every
count, as they do in a long production; what is left to lower efficiency is contention (server, CPU,
storage). Engine load and warm-up are not measured: workers load the engine and warm it up at the
standard profile (compiling its kernels) before they start serving, as long-lived workers do.

    # GPU machine, LiveAvatar with random full-size weights, 4 GPUs:
    python benchmarks/scale_bench.py --gpus 1,2,4 --engine liveavatar --random-weights --out out/scale
    # CPU dry run (preview engine; --simulate-gpu adds sleep per frame so GPU time is not CPU time):
    python benchmarks/scale_bench.py --gpus 1,2 --engine preview --lectures-per-gpu 2 --size 256x144 \\
        --simulate-gpu 0.02 --out /tmp/scale

Prints a markdown table and writes `results.json` and `results.md` to --out (plus every process's log).
By default it starts its own `prefect server` (loopback, a free port; SQLite in a temporary PREFECT_HOME,
or the PostgreSQL database --database-url names) and uses a local work store under --out; --api-url uses
a running server instead, --work an s3:// work store (then the AWS_* environment must reach it).

Dependencies: only the project's own (prefect, the liveavatar_core stack). On a machine without them
(the GPU benchmark hosts have torch, transformers, accelerate, peft, safetensors), install the project
from wheels brought along: see the "GPU machine" section of the report / docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_EFFICIENCY = 0.95
HOST_ID = "bench"


@dataclass
class Run:
    gpus: int
    lectures: int
    failed: int
    wall_s: float
    lecture_minutes: float
    lecture_minutes_per_hour: float
    gpu_seconds: float
    gpu_busy: float  # generation seconds / (gpus x wall): how much of the GPUs' time went to generation
    # Generation seconds per lecture (median, max): rising with G means the workers slow each other down
    # (the host's CPUs, memory or PCIe), not that the orchestration leaves GPUs idle.
    lecture_gpu_s_median: float
    lecture_gpu_s_max: float
    # What the host and GPUs did meanwhile (HostSampler): which of them is short when generation slows.
    load_avg_max: float = 0.0
    gpu_util_mean: float | None = None  # nvidia-smi utilisation, %, over the course's wall time
    sm_clock_busy_mhz: float | None = None  # mean SM clock while a GPU was over 50% busy
    speedup: float = 0.0  # vs the smallest GPU count, per GPU-count ratio
    efficiency: float = 0.0  # throughput / (ratio x throughput of the smallest count)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "_worker":
        return _worker(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    counts = sorted({int(g) for g in args.gpus.split(",")})
    env = _base_env(args, out)
    if args.audio_seconds:
        args.audio = _cut_audio(args.audio, args.audio_seconds, out)
    server = None if args.api_url else _start_server(out, env, args.database_url)
    runs: list[Run] = []
    try:
        for gpus in counts:  # results are rewritten after each count: a cut-off run keeps what it measured
            runs.append(_run_count(args, env, out, gpus, args.lectures_per_gpu * gpus))
            _score(runs)
            report = _report(args, runs)
            (out / "results.json").write_text(json.dumps(report, indent=2))
            table = markdown(report)
            (out / "results.md").write_text(table + "\n")
    finally:
        if server is not None:
            _stop(server)
    print(table)
    return 0 if report["passed"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_worker"]:  # internal: a GPU worker with simulated GPU time
        ns = argparse.Namespace(command="_worker", simulate_gpu=float(argv[1]), worker_argv=argv[2:])
        return ns
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2,4", help="GPU counts to measure, e.g. 1,2,4 (one worker per GPU)")
    p.add_argument("--lectures-per-gpu", type=int, default=2, help="the course has this many x G lectures")
    p.add_argument("--audio", default=str(ROOT / "examples" / "lecture.mp3"), help="each lecture's audio")
    p.add_argument("--audio-seconds", type=float, help="use only the first S seconds of --audio")
    p.add_argument("--image", default=str(ROOT / "examples" / "portrait.jpg"), help="the portrait")
    p.add_argument("--engine", default="auto", choices=["auto", "preview", "liveavatar"])
    p.add_argument("--random-weights", action="store_true", help="LiveAvatar with random full-size weights")
    p.add_argument("--checkpoint-dir", help="LiveAvatar checkpoints ($LIVEAVATAR_CHECKPOINT_DIR)")
    p.add_argument(
        "--size", default=None, help="output WIDTHxHEIGHT (default: the standard profile's 704x384)"
    )
    p.add_argument("--segment-seconds", type=float, default=None)
    p.add_argument("--max-segment-seconds", type=float, default=None)
    p.add_argument("--simulate-gpu", type=float, default=0.0, metavar="S",
                   help="preview engine only: S more seconds (sleep) per frame, for CPU dry runs")  # fmt: skip
    p.add_argument("--max-parallel", type=int, help="lectures in flight (default 2 x GPUs + 1: enough to keep "
                   "every GPU fed while finished lectures assemble and new ones prepare)")  # fmt: skip
    p.add_argument("--api-url", help="use this Prefect server instead of starting one")
    p.add_argument(
        "--database-url",
        help="the started server's database, e.g. postgresql+asyncpg://user@host/db "
        "(default: SQLite, whose slot releases can lag; docs/benchmarks.md)",
    )
    p.add_argument("--work", help="work store root (default: under --out); a fresh folder per GPU count")
    p.add_argument("--out", default="out/scale-bench", help="results and logs")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds allowed per GPU count")
    ns = p.parse_args(argv)
    ns.command = "bench"
    return ns


# --- one GPU count ---------------------------------------------------------------------------------------


def _run_count(args: argparse.Namespace, env: dict[str, str], out: Path, gpus: int, lectures: int) -> Run:
    tag = f"g{gpus}-{int(time.time())}"
    work = f"{args.work.rstrip('/')}/{tag}" if args.work else str(out / "work" / tag)
    run_env = dict(env, LIVEAVATAR_WORK=work)
    course = _write_course(args, out / f"course-{tag}", lectures, tag, out)
    workers = [_start_worker(args, run_env, out, tag, k) for k in range(gpus)]
    try:
        _wait_serving(workers, timeout_s=1800)
        command = [*_cli("liveavatar-batch"), "course", str(course), "--dispatch", "gpu-workers"]
        parallel = args.max_parallel or 2 * gpus + 1
        command += ["--work", work, "--max-parallel", str(min(parallel, lectures))]
        for flag in ("size", "segment_seconds", "max_segment_seconds", "checkpoint_dir"):
            if getattr(args, flag):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.random_weights:
            command.append("--random-weights")
        print(f"[{gpus} GPU] {lectures} lectures ...", file=sys.stderr, flush=True)
        with open(out / f"course-{tag}.log", "w") as log, HostSampler(out / f"host-{tag}.csv", gpus) as host:
            subprocess.run(
                command, cwd=ROOT, env=run_env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            )
    finally:
        for w in workers:
            _stop(w)
    summary = json.loads((out / "published" / tag / "summary.json").read_text())
    wall = summary["wall_s"]
    minutes = summary["lecture_minutes_published"]
    per_lecture = sorted(o["gpu_seconds"] for o in summary["lectures"] if o["status"] == "produced") or [0.0]
    run = Run(
        gpus=gpus,
        lectures=lectures,
        failed=summary["counts"]["failed"],
        wall_s=wall,
        lecture_minutes=minutes,
        lecture_minutes_per_hour=round(minutes / (wall / 3600), 2),
        gpu_seconds=summary["gpu_seconds"],
        gpu_busy=round(summary["gpu_seconds"] / (gpus * wall), 3),
        lecture_gpu_s_median=round(statistics.median(per_lecture), 2),
        lecture_gpu_s_max=round(per_lecture[-1], 2),
        **host.summary(),
    )
    print(f"[{gpus} GPU] {asdict(run)}", file=sys.stderr, flush=True)
    return run


class HostSampler:
    """Every second while a course runs: the host's 1-minute load average and, where nvidia-smi exists,
    each used GPU's utilisation, SM clock and power, written to a CSV. Slower generation with a busy host
    and busy, full-clock GPUs points at the host; with lower clocks, at the GPUs' power or heat."""

    FIELDS = "utilization.gpu,clocks.sm,power.draw"

    def __init__(self, path: Path, gpus: int):
        self.path, self.gpus = path, gpus
        self.rows: list[tuple[float, float, list[tuple[float, float, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._smi = shutil.which("nvidia-smi")

    def __enter__(self) -> HostSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with open(self.path, "w") as f:
            f.write(
                "t,load1," + ",".join(f"gpu{k}_util,gpu{k}_sm_mhz,gpu{k}_w" for k in range(self.gpus)) + "\n"
            )
            for t, load, per_gpu in self.rows:
                f.write(f"{t:.1f},{load:.2f}," + ",".join(f"{u:g},{c:g},{w:g}" for u, c, w in per_gpu) + "\n")

    def _sample(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(1.0):
            self.rows.append((time.monotonic() - start, os.getloadavg()[0], self._gpus()))

    def _gpus(self) -> list[tuple[float, float, float]]:
        if not self._smi:
            return []
        query = [self._smi, f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits"]
        try:
            lines = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.splitlines()
            return [tuple(float(v) for v in line.split(",")) for line in lines[: self.gpus]]  # type: ignore[misc]
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return []

    def summary(self) -> dict[str, float | None]:
        samples = [g for _, _, per_gpu in self.rows for g in per_gpu]
        busy = [clock for util, clock, _ in samples if util > 50]
        return {
            "load_avg_max": round(max((load for _, load, _ in self.rows), default=0.0), 1),
            "gpu_util_mean": round(statistics.fmean(u for u, _, _ in samples), 1) if samples else None,
            "sm_clock_busy_mhz": round(statistics.fmean(busy)) if busy else None,
        }


def _write_course(args: argparse.Namespace, folder: Path, lectures: int, tag: str, out: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"id: bench-{tag}",
        f"output_prefix: {out / 'published' / tag}",
        "defaults:",
        f"  portrait: {Path(args.image).resolve()}",
        "  prompt: A friendly lecturer in a bright office speaks to the camera, natural head movement, "
        "soft daylight, realistic style.",
        f"  engine: {args.engine}",
        "lectures:",
    ]
    audio = Path(args.audio).resolve()
    lines += [f"  - {{id: lecture-{i:03d}, audio: {audio}, seed: {i}}}" for i in range(lectures)]
    path = folder / "course.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _score(runs: list[Run]) -> None:
    base = runs[0]
    for r in runs:
        ratio = r.gpus / base.gpus
        if not base.lecture_minutes_per_hour:  # nothing published at the base count: nothing to compare
            continue
        r.speedup = round(r.lecture_minutes_per_hour / base.lecture_minutes_per_hour, 3)
        r.efficiency = round(r.speedup / ratio, 3)


def _report(args: argparse.Namespace, runs: list[Run]) -> dict:
    engine = args.engine + (" (random full-size weights)" if args.random_weights else "")
    if args.simulate_gpu:
        engine += f" + simulated GPU time {args.simulate_gpu} s/frame"
    return {
        "benchmark": "scale",
        "host": platform.node(),
        "engine": engine,
        "size": args.size or "704x384 (standard profile)",
        "audio": args.audio,
        "lectures_per_gpu": args.lectures_per_gpu,
        "target_efficiency": TARGET_EFFICIENCY,
        "runs": [asdict(r) for r in runs],
        "passed": all(r.failed == 0 and r.efficiency >= TARGET_EFFICIENCY for r in runs),
    }


def markdown(report: dict) -> str:
    """The results as a markdown table (what docs/benchmarks.md shows)."""
    lines = [
        f"Scale benchmark on {report['host']}: {report['lectures_per_gpu']} lectures per GPU, "
        f"engine {report['engine']}, size {report['size']}; target efficiency >= {report['target_efficiency']}.",
        "",
        "| GPUs | lectures | wall (s) | lecture-min | lecture-min / hour | speedup | efficiency | GPU busy "
        "| GPU s / lecture (median, max) | load max | GPU util | SM MHz busy | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['gpus']} | {r['lectures']} | {r['wall_s']:.1f} | {r['lecture_minutes']:.2f} | "
            f"{r['lecture_minutes_per_hour']:.1f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | "
            f"{r['gpu_busy']:.0%} | {r['lecture_gpu_s_median']:.1f}, {r['lecture_gpu_s_max']:.1f} | "
            f"{r['load_avg_max']:.1f} | {_opt(r['gpu_util_mean'], '%')} | {_opt(r['sm_clock_busy_mhz'], '')} | "
            f"{r['failed']} |"
        )
    lines.append("")
    lines.append("target met" if report["passed"] else "target NOT met")
    return "\n".join(lines)


def _opt(value: float | None, unit: str) -> str:
    return "–" if value is None else f"{value:g}{unit}"


# --- processes -------------------------------------------------------------------------------------------


def _cli(name: str) -> list[str]:
    """A console script beside this Python, else its module run by this Python (a PYTHONPATH install
    on a GPU host has no scripts)."""
    path = Path(sys.executable).with_name(name)
    module = {"liveavatar-batch": "flows.cli", "prefect": "prefect"}[name]
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def _cut_audio(audio: str, seconds: float, out: Path) -> str:
    """The first `seconds` of `audio` as a WAV under `out` (stream copy is not exact for MP3)."""
    from liveavatar_core.media import ffmpeg_exe

    cut = out / f"lecture-{seconds:g}s.wav"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", audio, "-t", f"{seconds}", str(cut)], check=True)
    return str(cut)


def _base_env(args: argparse.Namespace, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["LIVEAVATAR_HOST_ID"] = HOST_ID
    if args.api_url:
        env["PREFECT_API_URL"] = args.api_url
    else:
        env["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-", dir=out)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    return env


def _start_server(out: Path, env: dict[str, str], database_url: str | None) -> subprocess.Popen:
    url = env["PREFECT_API_URL"]
    port = url.rsplit(":", 1)[1].split("/")[0]
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    from flows.worker import SLOT_RETRY_SERVER_ENV

    server_env.update({k: os.environ.get(k, v) for k, v in SLOT_RETRY_SERVER_ENV.items()})
    if database_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    command = [*_cli("prefect"), "server", "start", "--host", "127.0.0.1", "--port", port]
    proc = _spawn(command, out / "server.log", server_env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    _stop(proc)
    raise SystemExit(f"prefect server did not start; see {out / 'server.log'}")


def _start_worker(
    args: argparse.Namespace, env: dict[str, str], out: Path, tag: str, gpu: int
) -> subprocess.Popen:
    worker = ["worker", "--gpu", str(gpu), "--engine", args.engine]
    if args.random_weights:
        worker.append("--random-weights")
    if args.checkpoint_dir:
        worker += ["--checkpoint-dir", args.checkpoint_dir]
    if args.simulate_gpu:
        command = [sys.executable, str(Path(__file__).resolve()), "_worker", str(args.simulate_gpu), *worker]
    else:
        command = [*_cli("liveavatar-batch"), *worker]
    proc = _spawn(command, out / f"worker-{tag}-{gpu}.log", env)
    proc.log_path = out / f"worker-{tag}-{gpu}.log"  # type: ignore[attr-defined]
    return proc


def _wait_serving(workers: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = [w.log_path.read_text(errors="replace") for w in workers]  # type: ignore[attr-defined]
        if all("Subscribing to runs" in text for text in logs):
            return
        for w, text in zip(workers, logs, strict=True):
            if w.poll() is not None:
                raise SystemExit(f"a GPU worker exited before serving:\n{text[-2000:]}")
        time.sleep(0.5)
    raise SystemExit("GPU workers did not start serving in time")


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    handle = open(log, "ab")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _worker(args: argparse.Namespace) -> int:
    """A GPU worker whose preview engine takes `simulate_gpu` more seconds per frame (sleep, not CPU).

    The sleep is inside the engine's generate call, so it counts as generation time in the manifests
    (and in "GPU busy"), as real GPU time would. For CPU dry runs only: the real engine is not touched.
    """
    sys.path.insert(0, str(ROOT))
    from flows.cli import main as cli
    from liveavatar_core.engines.preview import PreviewEngine

    generate = PreviewEngine._generate

    def slow(self, request, sink):
        time.sleep(request.num_frames * args.simulate_gpu)
        return generate(self, request, sink)

    PreviewEngine._generate = slow  # type: ignore[method-assign]
    return cli(args.worker_argv)


if __name__ == "__main__":
    sys.exit(main())
