"""The CLI as a person runs it: mistakes are refused before anything heavy, in one line, last on screen.

Every command here runs `python -m flows.cli` as a subprocess with no PREFECT_API_URL and a PREFECT_HOME
of its own, so a check that waited for a Prefect server would start one: the tests assert none was.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from flows import local_server

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "examples" / "lecture.mp3"
IMAGE = ROOT / "examples" / "portrait.jpg"


@pytest.fixture
def home(tmp_path) -> Iterator[Path]:
    home = tmp_path / "prefect-home"
    yield home
    local_server.stop(home)  # one a failing check let start


def cli(home: Path, *argv: str, env: dict[str, str] | None = None, timeout: float = 300):
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1", **(env or {}))
    base = {k: v for k, v in base.items() if v is not None}  # None: unset it
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def produce(home: Path, tmp_path: Path, *extra: str, audio=AUDIO, image=IMAGE, out=None, env=None):
    out = str(out if out is not None else tmp_path / "out")
    argv = ["produce", "--audio", str(audio), "--image", str(image), "--prompt", "a teacher"]
    argv += ["--out", out, "--engine", "preview", "--size", "144x256", "--work", str(tmp_path / "work")]
    return cli(home, *argv, *extra, env=env)


def refused(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The one error line, checked: exit 2, last line on screen, no traceback anywhere."""
    screen = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    last = screen[-1]
    assert last.startswith("error: "), screen
    assert sum(line.startswith("error:") for line in screen) == 1, screen
    for needle in needles:
        assert needle in last, last
    return last


def no_server_started(home: Path) -> None:
    assert not (home / local_server.STATE_FILE).exists(), "a Prefect server was started for a bad input"


def test_a_misspelt_audio_path_is_refused_before_any_server(home, tmp_path):
    missing = tmp_path / "lecture-typo.mp3"
    line = refused(produce(home, tmp_path, audio=missing), "--audio", str(missing), "no such file")
    assert line.count("--audio") == 1
    no_server_started(home)
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_the_portrait_is_refused(home, tmp_path):
    refused(produce(home, tmp_path, image=tmp_path), "--image", "folder")
    no_server_started(home)


def test_an_unsupported_url_scheme_is_refused(home, tmp_path):
    refused(produce(home, tmp_path, audio="https://example.org/lecture.mp3"), "--audio", "https://")
    no_server_started(home)


def test_an_s3_input_without_credentials_is_refused(home, tmp_path):
    env = {
        k: None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    }
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",  # never ask an instance-metadata address for a role
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
    )
    refused(produce(home, tmp_path, audio="s3://lectures/week1.mp3", env=env), "--audio", "credentials")
    no_server_started(home)
    env["AWS_PROFILE"] = "course-team"  # a profile that is not there: named, not a traceback
    refused(produce(home, tmp_path, audio="s3://lectures/week1.mp3", env=env), "--audio", "course-team")


def test_an_s3_endpoint_that_does_not_answer_is_refused_quickly(home, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_MAX_ATTEMPTS="5",
    )
    line = refused(produce(home, tmp_path, out="s3://published/lecture1", env=env), "--out", "did not answer")
    assert f"127.0.0.1:{port}" in line
    no_server_started(home)


def test_a_missing_s3_object_is_refused_before_any_server(home, tmp_path, s3_server):
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    s3_server.client().create_bucket(Bucket="early-inputs")
    done = produce(home, tmp_path, image="s3://early-inputs/portraits/none.jpg", env=env)
    refused(done, "--image", "s3://early-inputs/portraits/none.jpg", "no such object")
    no_server_started(home)


def test_an_unwritable_destination_is_refused_before_any_server(home, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(produce(home, tmp_path, out=blocker / "out"), "--out", "is a file")
    no_server_started(home)


def test_the_size_error_names_the_flag_once(home, tmp_path):
    line = refused(produce(home, tmp_path, "--size", "700x380"), "--size", "700x380")
    assert line.count("--size") == 1, line
    no_server_started(home)


def test_a_misspelt_course_field_is_named(home, tmp_path):
    course = tmp_path / "course.yaml"
    course.write_text(
        "id: physics-101\n"
        "title: Physics\n"
        f"output_prefix: {tmp_path / 'published'}\n"
        f"defaults:\n  portrait: {IMAGE}\n  prompt: a teacher in a studio\n"
        "lectures:\n"
        f"  - id: week-1\n    audo: {AUDIO}\n"
    )
    line = refused(cli(home, "course", str(course)), "audo", "unknown field", "did you mean 'audio'")
    assert f"{course}:9" in line, line  # the line of the typo
    no_server_started(home)


def test_liveavatar_on_a_machine_without_a_gpu_points_a_course_team_to_the_preview(home, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["produce", "--audio", str(AUDIO), "--image", str(IMAGE), "--prompt", "a teacher"]
    done = cli(home, *argv, "--out", str(tmp_path / "out"), "--engine", "liveavatar")
    refused(done, "--engine liveavatar", "no CUDA GPU", "--engine preview")
    assert "--random-weights" not in done.stdout + done.stderr
    no_server_started(home)


@pytest.mark.slow
def test_a_refusal_inside_the_flow_is_the_last_line_and_the_next_command_reuses_the_server(home, tmp_path):
    """No PREFECT_API_URL: the first command starts the local server, the refusal (a face too small,
    found only when the portrait is prepared) is still the last line, and the next command reuses it."""
    small = tmp_path / "small.jpg"
    with Image.open(IMAGE) as img:
        img.resize((img.width // 10, img.height // 10)).save(small)
    env = {local_server.IDLE_ENV: "120"}
    first = produce(home, tmp_path, image=small, env=env)
    refused(first, "--image", "face")
    assert "started a local Prefect server" in first.stderr
    second = produce(home, tmp_path, image=small, env=env)
    refused(second, "--image", "face")
    assert "started a local Prefect server" not in second.stderr
    assert "Beginning flow run" in second.stdout + second.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_qc_lines_stay_on_screen_while_prefects_failure_echoes_go():
    """The console filter drops what Prefect's engine logs at ERROR about a failed run (the CLI prints
    its own line), never an error our tasks log: "qc identity: FAIL (...)" must reach the screen."""
    import logging

    import prefect.task_engine

    from flows import cli as cli_module
    from tasks import finish

    keep = cli_module._DropFailureEchoes()

    def record(name: str, module_file: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, module_file, 1, "message", None, None)

    assert keep.filter(record("prefect.task_runs", finish.__file__))
    assert not keep.filter(record("prefect.task_runs", prefect.task_engine.__file__))
    assert not keep.filter(record("prefect.flow_runs", prefect.task_engine.__file__))
    assert keep.filter(record("prefect.server", prefect.task_engine.__file__))  # not a run's echo
