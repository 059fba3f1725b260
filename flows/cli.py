"""The `liveavatar-batch` command line.

`produce` runs the produce_lecture flow: on Prefect's embedded (ephemeral) API by default, or on the
server PREFECT_API_URL names. Exit 0 only when the video is published; bad input prints one line
naming the input and the problem and exits 2.

`course` runs the produce_course flow for a course manifest (here, or with --deployment through the
produce-course deployment on the server's workers) and prints its summary; exit 1 if any lecture
failed. `worker --gpu K` is the long-lived GPU worker for GPU K. `deploy` registers the work pools,
concurrency limits and deployments on the server PREFECT_API_URL names.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from liveavatar_core.course import PROFILES, Precision

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    # No telemetry from Prefect's servers (the CLI's local one too): closed networks, logged errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    code = args.run(args)
    if argv is None and code != EXIT_OK:
        _silence_the_rest()
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveavatar-batch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_produce(commands)
    _add_course(commands)
    _add_worker(commands)
    _add_deploy(commands)
    _add_qc(commands)
    return parser


def _add_produce(commands) -> None:
    p = commands.add_parser(
        "produce", help="produce one lecture video", description="Produce one lecture video."
    )
    p.add_argument("--audio", required=True, metavar="SRC", help="lecture audio: path, file:// or s3:// URL")
    p.add_argument("--image", required=True, metavar="SRC", help="portrait: path, file:// or s3:// URL")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="who, doing what, where, in what style")
    p.add_argument(
        "--out", required=True, metavar="DEST", help="destination: directory, file:// or s3:// prefix"
    )
    p.add_argument("--title", help="lecture title for the report (default: the audio file's name)")
    p.add_argument("--engine", default="auto", choices=["auto", "preview", "liveavatar"])
    p.add_argument(
        "--size", default="auto", metavar="WxH",
        help="output WIDTHxHEIGHT in pixels, or auto: 704x384's area shaped like the portrait (default)",
    )  # fmt: skip
    p.add_argument(
        "--precision", default="bf16", choices=get_args(Precision),
        help="fp8: LiveAvatar's linears in e4m3, about 1.3x faster on fp8 GPUs (H100, L40S), slightly different pictures",
    )  # fmt: skip
    p.add_argument("--memory-budget-gb", type=float, metavar="N", help="per-segment memory budget in GiB")
    p.add_argument(
        "--segment-seconds", type=float, default=30.0, metavar="T", help="target segment length (30)"
    )
    p.add_argument(
        "--max-segment-seconds", type=float, default=40.0, metavar="M", help="maximum segment length (40)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--allow-qc-fail", action="store_true", help="publish even when quality checks fail")
    p.add_argument("--work", metavar="URL", help="work store: directory or s3:// prefix ($LIVEAVATAR_WORK)")
    p.add_argument(
        "--checkpoint-dir", metavar="DIR", help="LiveAvatar checkpoints ($LIVEAVATAR_CHECKPOINT_DIR)"
    )
    p.add_argument(
        "--random-weights", action="store_true", help="LiveAvatar with random full-size weights (benchmarks)"
    )
    p.set_defaults(run=_run_produce)


def _run_produce(args: argparse.Namespace) -> int:
    work = args.work or os.environ.get("LIVEAVATAR_WORK")
    problem = _preflight(
        [("--audio", args.audio), ("--image", args.image)],
        [("--out", args.out), *([("--work", work)] if work else [])],
    ) or _engine_problem(args.engine, args.checkpoint_dir, args.random_weights)
    if problem:
        return _fail(EXIT_BAD_INPUT, problem)
    from flows.lecture import LectureParams

    try:
        params = LectureParams(
            audio=args.audio,
            image=args.image,
            prompt=args.prompt,
            title=args.title,
            out=args.out,
            engine=args.engine,
            size=args.size,
            precision=args.precision,
            segment_seconds=args.segment_seconds,
            max_segment_seconds=args.max_segment_seconds,
            seed=args.seed,
            memory_budget_gb=args.memory_budget_gb,
            allow_qc_fail=args.allow_qc_fail,
            work=args.work,
            checkpoint_dir=args.checkpoint_dir,
            random_weights=args.random_weights,
        )
    except ValidationError as exc:
        return _fail(EXIT_BAD_INPUT, _validation_line(exc))
    return run_flow(lambda: _produce(params))


def _produce(params) -> int:
    from flows.lecture import produce_lecture

    published = produce_lecture(params)
    for name in ("video.mp4", "manifest.json", "qc.json", "report.html"):
        print(f"{name:14} {published[name]}")
    return EXIT_OK


def _add_course(commands) -> None:
    p = commands.add_parser(
        "course",
        help="produce every lecture of a course manifest not already published",
        description="Produce every lecture of a course manifest (YAML) that is not already published with "
        "identical inputs, and print the course summary. Exit 1 if any lecture failed.",
    )
    p.add_argument("course", metavar="COURSE", help="course manifest: path, file:// or s3:// URL")
    p.add_argument("--work", metavar="URL", help="work store: directory or s3:// prefix ($LIVEAVATAR_WORK)")
    p.add_argument(
        "--dispatch",
        default="auto",
        choices=["auto", "in-process", "gpu-workers"],
        help="where segments are generated; auto: on the GPU workers when PREFECT_API_URL is set, else here",
    )
    p.add_argument(
        "--deployment",
        nargs="?",
        const=COURSE_DEPLOYMENT,
        metavar="NAME",
        help=f"run through a deployment on the server's workers (default name {COURSE_DEPLOYMENT}) "
        "instead of in this process; the manifest and its inputs must be readable there",
    )
    p.add_argument(
        "--worker-wait",
        type=float,
        metavar="S",
        help="gpu-workers dispatch: fail a lecture whose segment finds no GPU worker for S seconds "
        "($LIVEAVATAR_WORKER_WAIT_S, default 600)",
    )
    p.add_argument("--max-parallel", type=int, default=8, metavar="N", help="lectures in flight at once (8)")
    p.add_argument(
        "--size", metavar="WxH", help="override every lecture's profile size (WIDTHxHEIGHT or auto)"
    )
    p.add_argument("--segment-seconds", type=float, metavar="T", help="override the profiles' segment target")
    p.add_argument(
        "--max-segment-seconds", type=float, metavar="M", help="override the profiles' segment maximum"
    )
    p.add_argument("--memory-budget-gb", type=float, metavar="N", help="per-segment memory budget in GiB")
    p.add_argument("--allow-qc-fail", action="store_true", help="publish lectures even when QC fails")
    p.add_argument(
        "--checkpoint-dir", metavar="DIR", help="LiveAvatar checkpoints ($LIVEAVATAR_CHECKPOINT_DIR)"
    )
    p.add_argument(
        "--random-weights", action="store_true", help="LiveAvatar with random full-size weights (benchmarks)"
    )
    p.add_argument("--force", action="store_true", help="produce every lecture, even those already published")
    p.set_defaults(run=_run_course)


COURSE_DEPLOYMENT = "produce_course/produce-course"


def _run_course(args: argparse.Namespace) -> int:
    source = args.course
    if problem := _preflight([("COURSE", source)], [("--work", args.work)] if args.work else []):
        return _fail(EXIT_BAD_INPUT, problem)
    from flows.course import CourseParams, read_course
    from flows.dispatch import WORKER_WAIT_ENV
    from liveavatar_core import storage
    from liveavatar_core.errors import LiveAvatarError

    if args.deployment and not storage.is_remote(source):
        source = os.path.abspath(source.removeprefix("file://"))  # the flow run's directory is elsewhere
    try:
        course = read_course(source)  # bad manifests fail here, in one line, before any run starts
    except LiveAvatarError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    server = bool(os.environ.get("PREFECT_API_URL"))
    dispatch = args.dispatch if args.dispatch != "auto" else ("gpu-workers" if server else "in-process")
    if args.worker_wait is not None and args.worker_wait <= 0:
        return _fail(
            EXIT_BAD_INPUT, f"--worker-wait {args.worker_wait:g}: must be a positive number of seconds"
        )
    if (args.deployment or dispatch == "gpu-workers") and not server:
        flag = "--deployment" if args.deployment else "--dispatch gpu-workers"
        return _fail(EXIT_BAD_INPUT, f"{flag}: needs a Prefect server: set PREFECT_API_URL")
    try:
        params = CourseParams(
            course=source,
            work=args.work,
            dispatch=dispatch,
            max_parallel=args.max_parallel,
            size=args.size,
            segment_seconds=args.segment_seconds,
            max_segment_seconds=args.max_segment_seconds,
            memory_budget_gb=args.memory_budget_gb,
            allow_qc_fail=args.allow_qc_fail,
            checkpoint_dir=args.checkpoint_dir,
            random_weights=args.random_weights,
            force=args.force,
        )
    except ValidationError as exc:
        return _fail(EXIT_BAD_INPUT, _validation_line(exc))
    env = {WORKER_WAIT_ENV: f"{args.worker_wait:g}"} if args.worker_wait else {}
    if args.deployment:
        return run_flow(lambda: _course_via_deployment(args.deployment, params, course.summary_url, env))
    os.environ.update(env)
    return run_flow(lambda: _course_here(params, course.summary_url))


def _course_here(params, summary_url: str) -> int:
    from flows.course import CourseFailed, produce_course, summary_table
    from liveavatar_core import storage

    try:
        summary = produce_course(params)
    except CourseFailed as exc:
        print(summary_table(storage.read_json(summary_url)))
        return _fail(EXIT_FAILED, str(exc))
    print(summary_table(summary))
    return EXIT_OK


def _course_via_deployment(name: str, params, summary_url: str, env: dict[str, str]) -> int:
    from prefect.deployments import run_deployment

    from flows.course import summary_table
    from liveavatar_core import storage

    run = run_deployment(
        name,
        parameters={"params": params.model_dump(mode="json")},
        job_variables={"env": env} if env else None,
        timeout=None,
        poll_interval=2,
    )
    state = run.state
    print(f"flow run {run.name} ({run.id}): {state.name if state else '?'}", file=sys.stderr)
    summary = storage.read_json(summary_url) if storage.exists(summary_url) else None
    if summary and summary.get("flow_run_id") == str(run.id):
        print(summary_table(summary))
    if state is not None and state.is_completed():
        return EXIT_OK
    message = ((state.message or state.name) if state else "") or "the course run failed"
    # Prefect's wording around the flow's own one-line error: "Flow run encountered an exception: Kind: ..."
    message = message.strip().splitlines()[0].removeprefix("Flow run encountered an exception: ")
    return _fail(EXIT_FAILED, message.removeprefix("CourseFailed: "))


def _add_worker(commands) -> None:
    p = commands.add_parser(
        "worker",
        help="serve segment generation on one GPU (long-lived; one per GPU)",
        description="A long-lived GPU worker: loads the engine once and serves generate-segment runs from "
        "the Prefect server PREFECT_API_URL names, one at a time, under the GPU's strict concurrency limit "
        "gpu-<host>-<K>. Stop it with SIGTERM or Ctrl-C.",
    )
    p.add_argument("--gpu", type=int, required=True, metavar="K", help="the GPU's index on this host")
    p.add_argument(
        "--engine", default="auto", choices=["auto", "preview", "liveavatar"], help="engine to load"
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="LiveAvatar checkpoints on this host ($LIVEAVATAR_CHECKPOINT_DIR)",
    )
    p.add_argument("--random-weights", action="store_true", help="LiveAvatar with random full-size weights")
    p.add_argument("--work", metavar="URL", help="work store shared with the flows ($LIVEAVATAR_WORK)")
    p.add_argument(
        "--host-id", metavar="NAME", help="this host's name in the GPU limits ($LIVEAVATAR_HOST_ID)"
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="CPU threads for torch, OpenCV and the encoder (default: this host's cores / its GPUs)",
    )
    p.add_argument(
        "--warmup",
        default="standard",
        choices=[*PROFILES, "none"],
        help="before serving, run two short throwaway segments at this course profile's size and "
        "precision, so the first lecture's first segment does not pay for compiling (default standard)",
    )
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        metavar="N",
        help="cap the engine's GPU memory at N GiB from loading on (default: the whole GPU)",
    )
    p.set_defaults(run=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from flows.worker import WorkerOptions, serve_gpu
    from liveavatar_core.errors import InputError, LiveAvatarError

    if args.gpu < 0:
        return _fail(EXIT_BAD_INPUT, f"--gpu {args.gpu}: must be a GPU index (0, 1, ...)")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        return _fail(EXIT_BAD_INPUT, f"--cpu-threads {args.cpu_threads}: must be at least 1")
    # Our own logger, not the root: Prefect configures the root logger (at WARNING) when it loads, which
    # may be before this runs.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    for name in ("liveavatar", "liveavatar_core"):
        ours = logging.getLogger(name)
        ours.setLevel(logging.INFO)
        ours.addHandler(handler)
        ours.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
    options = WorkerOptions(
        gpu=args.gpu,
        engine=args.engine,
        checkpoint_dir=args.checkpoint_dir,
        random_weights=args.random_weights,
        work=args.work,
        host=args.host_id,
        cpu_threads=args.cpu_threads,
        warmup=None if args.warmup == "none" else args.warmup,
        memory_budget_gb=args.memory_budget_gb,
    )
    try:
        serve_gpu(options)
    except InputError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except LiveAvatarError as exc:
        return _fail(EXIT_FAILED, str(exc))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _add_deploy(commands) -> None:
    p = commands.add_parser(
        "deploy",
        help="register work pools, GPU limits and deployments on the Prefect server",
        description="Create the work pools cpu-pool and gpu-pool, optionally the per-GPU concurrency limits, "
        "and register every deployment in deployments/prefect.yaml on the server PREFECT_API_URL names.",
    )
    p.add_argument("--prefect-file", metavar="PATH", help="deployments file (deployments/prefect.yaml)")
    p.add_argument(
        "--project-dir",
        metavar="DIR",
        help="the checkout's path on the workers ($LIVEAVATAR_PROJECT_DIR, else this one)",
    )
    p.add_argument("--gpu-host", metavar="NAME", help="create the GPU limits of this host (with --gpus)")
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="number of GPUs on --gpu-host")
    p.add_argument(
        "--notify-webhook",
        metavar="URL",
        help="POST (JSON: run, state, message) to URL when a run of these deployments ends",
    )
    p.set_defaults(run=_run_deploy)


def _run_deploy(args: argparse.Namespace) -> int:
    from flows import deploy

    if not os.environ.get("PREFECT_API_URL"):
        return _fail(EXIT_BAD_INPUT, "deploy: needs a Prefect server: set PREFECT_API_URL")
    if args.gpus and not args.gpu_host:
        return _fail(EXIT_BAD_INPUT, "--gpus: needs --gpu-host (the host whose GPUs these are)")
    prefect_file = Path(args.prefect_file).resolve() if args.prefect_file else deploy.PREFECT_FILE
    if not prefect_file.is_file():
        return _fail(EXIT_BAD_INPUT, f"--prefect-file {prefect_file}: no such file")
    hook = args.notify_webhook
    if hook and not hook.startswith(("http://", "https://")):
        return _fail(EXIT_BAD_INPUT, f"--notify-webhook {hook}: not an http(s):// URL")
    try:
        for pool, what in deploy.ensure_pools().items():
            print(f"work pool {pool}: {what}")
        if args.gpus:
            for limit, what in deploy.ensure_gpu_limits(args.gpu_host, args.gpus).items():
                print(f"concurrency limit {limit}: {what}")
        deploy.deploy_all(prefect_file, args.project_dir)
    except RuntimeError as exc:
        return _fail(EXIT_FAILED, str(exc))
    with _client() as client:
        deployments = client.read_deployments()
    for d in deployments:
        print(f"deployment {d.name}: pool {d.work_pool_name}, entrypoint {d.entrypoint}")
    if hook:
        from flows.notify import ensure_webhook, host_of

        ours = [f"prefect.deployment.{d.id}" for d in deployments if "liveavatar" in d.tags]
        related = {"prefect.resource.id": ours}
        ensure_webhook("liveavatar deployments done", hook, related=related)
        print(f"automation: the end of every run of these deployments is POSTed to {host_of(hook)}")
    return EXIT_OK


def _add_qc(commands) -> None:
    p = commands.add_parser(
        "qc",
        help="check any lecture video (container, sound, picture); exit 1 if a gate fails",
        description="Run every quality check (container, sound, identity, lip-sync proxy, motion) on a video "
        "made here or elsewhere, against its lecture audio and portrait; write qc.json and report.html to "
        "DIR. Exit 0 when every gate passes, 1 when one fails, 2 for bad input.",
    )
    p.add_argument("--video", required=True, metavar="V", help="the lecture video (mp4)")
    p.add_argument("--audio", required=True, metavar="A", help="the lecture audio it was made from")
    p.add_argument("--image", required=True, metavar="I", help="the portrait it was made from")
    p.add_argument("--out", required=True, metavar="DIR", help="local directory for qc.json and report.html")
    p.add_argument(
        "--manifest",
        metavar="M",
        help="its manifest.json: judge per segment and at each cut (else 30-s stretches)",
    )
    p.add_argument(
        "--no-face",
        metavar="WHY",
        help="the video shows no face (e.g. random weights): skip the picture gates",
    )
    p.set_defaults(run=_run_qc)


def _run_qc(args: argparse.Namespace) -> int:
    from liveavatar_core.errors import InputError, LiveAvatarError
    from liveavatar_core.qc_video import check_video

    try:
        report = check_video(args.video, args.audio, args.image, args.out, args.manifest, args.no_face)
    except InputError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except LiveAvatarError as exc:
        return _fail(EXIT_FAILED, str(exc))
    for check in report.checks:
        print(f"{'pass' if check.passed else 'FAIL':4} {check.name:18} {check.detail}")
    if report.failures:
        return _fail(EXIT_FAILED, f"{args.video} failed QC: {', '.join(c.name for c in report.failures)}")
    return EXIT_OK


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def run_flow(body) -> int:
    """Run a flow-calling function with one-line errors: known errors print a line, not a traceback."""
    from liveavatar_core.errors import InputError, LiveAvatarError

    _quiet_prefect_errors()
    try:
        with _api_server():
            return body()
    except InputError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except LiveAvatarError as exc:
        return _fail(EXIT_FAILED, str(exc))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted; finished segments are kept and reused by the next run")


def _preflight(inputs: list[tuple[str, str]], destinations: list[tuple[str, str]]) -> str | None:
    """The first problem the quick checks find (missing files, bad URLs, S3 unreachable), or None."""
    from liveavatar_core.errors import InputError
    from liveavatar_core.storage.checks import preflight

    try:
        preflight(inputs, destinations)
    except InputError as exc:
        return str(exc)
    return None


def _engine_problem(engine: str, checkpoint_dir: str | None, random_weights: bool) -> str | None:
    """Why `--engine liveavatar` cannot run in this process, or None (other engines, GPU workers)."""
    if engine != "liveavatar" or os.environ.get("LIVEAVATAR_DISPATCH") == "gpu-workers":
        return None
    import torch

    checkpoint = checkpoint_dir or os.environ.get("LIVEAVATAR_CHECKPOINT_DIR")
    # Without a GPU only a checkpoint the user points at can run (the small test models do, on CPU).
    if not torch.cuda.is_available() and (random_weights or not checkpoint):
        return (
            "--engine liveavatar: this machine has no CUDA GPU, which the 14B LiveAvatar model needs; "
            "use --engine preview for a draft on CPU, or run on a GPU host"
        )
    if not (random_weights or checkpoint):
        return (
            "--checkpoint-dir: the liveavatar engine needs the official checkpoints (Wan2.2-S2V-14B/ and "
            "LiveAvatar/); give --checkpoint-dir DIR or set $LIVEAVATAR_CHECKPOINT_DIR"
        )
    return None


@contextmanager
def _api_server() -> Iterator[None]:
    """The Prefect API for this command: PREFECT_API_URL's (environment, profile, test harness), else
    the long-lived local server (`flows/local_server.py`), started on first use."""
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows import local_server

    settings = get_current_settings()
    if settings.api.url:
        yield
        return
    url, started = local_server.ensure(Path(settings.home), prefect.__version__)
    if started:
        print(
            f"started a local Prefect server at {url.removesuffix('/api')} for this and later runs "
            f"(it stops after {local_server.idle_seconds() / 60:.0f} min idle)",
            file=sys.stderr,
        )
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _silence_the_rest() -> None:
    """After the one-line error, nothing may reach the screen: Prefect's exit handlers (flushing events
    and logs, stopping a temporary server) can print tracebacks while the process winds down."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _validation_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "input"
    message = err["msg"].removeprefix("Value error, ")
    # A validator that names its flag itself ("--size '700x380' must be ...") keeps its own wording.
    return message if message.startswith(f"{field} ") else f"{field}: {message}"


class _DropFailureEchoes(logging.Filter):
    """Prefect's engine logs a failed run's exception (with traceback) at ERROR; the CLI reports it
    itself. Only records made by Prefect's own code are dropped: our tasks' errors (a failed QC check)
    stay on screen, above the one-line error."""

    def __init__(self) -> None:
        super().__init__()
        import prefect

        self.prefect_dir = os.path.dirname(prefect.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.ERROR
            and record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
            and record.pathname.startswith(self.prefect_dir)
        )


def _quiet_prefect_errors() -> None:
    """Filter the console handlers only: the API handlers still send every record to the Prefect UI."""
    import prefect.main  # noqa: F401  (importing it configures Prefect's logging)

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropFailureEchoes) for f in handler.filters):
            handler.addFilter(_DropFailureEchoes())


if __name__ == "__main__":
    sys.exit(main())
