"""A course through the whole line, with real components: Prefect server on PostgreSQL, deployments from
deployments/prefect.yaml, a process worker on cpu-pool, two long-lived GPU workers (preview engine, made
slow enough to be killed mid-segment), moto's S3 server as the only place files are handed over.

`liveavatar-batch course s3://.../course.yaml --deployment` runs exactly as a user would run it. The
tests run in order and share the line (module fixture `prefect_line`): produce, re-run (nothing is
generated again), a course whose every segment fails on the GPU workers, then a GPU worker is killed
mid-course and restarted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LECTURES = ("l1", "l2", "l3")

pytestmark = pytest.mark.slow

COURSE = """\
id: {id}
title: Line test course
output_prefix: s3://{bucket}/published/{id}
defaults:
  portrait: portrait.jpg
  prompt: A friendly lecturer in a bright office speaks to the camera, realistic style.
  engine: preview
  profile: draft
lectures:
  - {{id: l1, audio: lecture.mp3, seed: {seed}}}
  - {{id: l2, audio: lecture.mp3, seed: {seed_2}}}
  - {{id: l3, audio: lecture.mp3, seed: {seed_3}}}
"""


def put_course(line, course_id: str, seed: int) -> str:
    """Upload the course's inputs and manifest to S3 (no shared disk: the workers read them there)."""
    client = line.s3.client()
    prefix = f"courses/{course_id}"
    for name in ("lecture.mp3", "portrait.jpg"):
        client.upload_file(str(EXAMPLES / name), line.bucket, f"{prefix}/{name}")
    text = COURSE.format(id=course_id, bucket=line.bucket, seed=seed, seed_2=seed + 1, seed_3=seed + 2)
    client.put_object(Bucket=line.bucket, Key=f"{prefix}/course.yaml", Body=text.encode())
    return line.url(f"{prefix}/course.yaml")


def segment_videos(line) -> dict[str, dict]:
    return {k: v for k, v in line.objects("work/segments/").items() if k.endswith(".mp4")}


@pytest.fixture(scope="module")
def first_run(prefect_line):
    course = put_course(prefect_line, "course-a", seed=0)
    start = time.monotonic()
    result = prefect_line.course(course)
    return course, result, time.monotonic() - start


def test_course_publishes_every_lecture_and_the_summary_to_s3(prefect_line, first_run):
    line = prefect_line
    _, result, _ = first_run
    assert result.returncode == 0, result.stderr[-3000:] + line.cpu_worker_log()[-3000:]
    for gpu, proc in line.gpu_workers.items():
        log = proc.log_path.read_text()
        assert f"GPU {gpu}: 2 CPU threads" in log
        # warmed up before serving: the warm-up line comes before the subscription
        assert log.index("warmed up at 704x384 bf16 (profile standard)") < log.index("Subscribing to runs")
    for lecture in LECTURES:
        keys = line.objects(f"published/course-a/{lecture}/")
        names = sorted(k.rsplit("/", 1)[1] for k in keys)
        assert names == ["manifest.json", "qc.json", "report.html", "video.mp4"], lecture
        manifest = line.read_json(f"published/course-a/{lecture}/manifest.json")
        assert manifest["qc"]["passed"] and manifest["engine"]["name"] == "preview"
        assert len(manifest["segments"]) >= 3 and not any(s["cached"] for s in manifest["segments"])
    summary = line.read_json("published/course-a/summary.json")
    assert summary["counts"] == {"produced": 3, "skipped": 0, "failed": 0}
    assert [o["lecture"] for o in summary["lectures"]] == list(LECTURES)
    assert all(o["gpu_seconds"] > 0 and o["qc"] == "pass" for o in summary["lectures"])
    # The summary table is printed; the course ran as a deployment on the CPU worker.
    assert "3 produced, 0 skipped, 0 failed" in result.stdout
    assert "produce_course" in line.cpu_worker_log()
    # Every segment went to a GPU worker once, and both GPU workers took some.
    generations = line.generations()
    keys = [g.key for g in generations]
    assert len(keys) == len(set(keys)) == len(segment_videos(line))
    assert all(g.finished for g in generations)
    assert len({g.pid for g in generations}) == 2


def test_rerun_regenerates_nothing(prefect_line, first_run):
    line = prefect_line
    course, first, _ = first_run
    assert first.returncode == 0
    before_objects = segment_videos(line)
    before_generations = len(line.generations())
    before_manifests = {lec: line.objects(f"published/course-a/{lec}/manifest.json") for lec in LECTURES}

    result = line.course(course)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = line.read_json("published/course-a/summary.json")
    assert summary["counts"] == {"produced": 0, "skipped": 3, "failed": 0}
    assert summary["gpu_seconds"] == 0
    assert "0 produced, 3 skipped, 0 failed" in result.stdout
    assert len(line.generations()) == before_generations
    assert segment_videos(line) == before_objects
    for lecture in LECTURES:  # skipped means untouched
        assert line.objects(f"published/course-a/{lecture}/manifest.json") == before_manifests[lecture]


def test_failing_segment_fails_its_lecture_and_the_gpu_workers_go_on(prefect_line):
    """A budget below every rung fails generation on the GPU worker: the course reports it and fails."""
    line = prefect_line
    course = put_course(line, "course-oom", seed=50)
    result = line.course(course, "--memory-budget-gb", "0.000001")
    assert result.returncode == 1
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "3 of 3 lectures failed" in errors[0] and "memory budget" in errors[0]
    summary = line.read_json("published/course-oom/summary.json")
    assert summary["counts"] == {"produced": 0, "skipped": 0, "failed": 3}
    assert all("memory budget" in o["error"] for o in summary["lectures"])
    assert not line.objects("published/course-oom/l1/")
    assert all(proc.poll() is None for proc in line.gpu_workers.values())  # and the next test uses them


def test_killed_gpu_worker_loses_only_its_segment(prefect_line):
    """SIGKILL a GPU worker mid-segment and restart it: the course completes, nothing finished runs twice."""
    line = prefect_line
    course = put_course(line, "course-b", seed=100)  # new seeds: every segment is new work
    known = {g.key for g in line.generations()}
    proc = __import__("subprocess").Popen(line.course_command(course), **_popen_kwargs(line))
    try:
        victim = _wait_for_generation_in_flight(line, known, proc)
        time.sleep(0.3)
        gpu = line.kill_gpu_worker_running(victim.pid)
        restarted = line.start_gpu_worker(gpu)
        line.wait_serving([restarted])
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:] + line.cpu_worker_log()[-3000:]

    summary = line.read_json("published/course-b/summary.json")
    assert summary["counts"] == {"produced": 3, "skipped": 0, "failed": 0}
    for lecture in LECTURES:
        assert line.objects(f"published/course-b/{lecture}/video.mp4")
        manifest = line.read_json(f"published/course-b/{lecture}/manifest.json")
        assert manifest["qc"]["passed"] and not any(s["cached"] for s in manifest["segments"])

    new = [g for g in line.generations() if g.key not in known]
    finished = [g.key for g in new if g.finished]
    assert len(finished) == len(set(finished)), "a finished segment was generated twice"
    killed = [g for g in new if not g.finished]
    assert [g.key for g in killed] == [victim.key] and victim.key in finished  # lost once, redone once
    assert "its GPU worker stopped" in line.cpu_worker_log()


def _popen_kwargs(line) -> dict:
    import subprocess

    return {"cwd": ROOT, "env": line.env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def _wait_for_generation_in_flight(line, known: set[str], proc, timeout_s: float = 240):
    """The first generation of this course that a GPU worker has started and not finished."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = [g for g in line.generations() if g.key not in known and g.started and not g.finished]
        if running:
            return running[0]
        assert proc.poll() is None, "the course ended before a GPU worker could be killed"
        time.sleep(0.05)
    raise AssertionError("no generation started in time")
