"""Bad input: one line naming the input and the problem, a non-zero exit, nothing at DEST."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "examples" / "lecture.mp3"
IMAGE = ROOT / "examples" / "portrait.jpg"


def run(tmp_path, capsys, *, audio=AUDIO, image=IMAGE, out=None, extra=()):
    out = out if out is not None else tmp_path / "out"
    argv = [
        "produce",
        "--audio",
        str(audio),
        "--image",
        str(image),
        "--prompt",
        "a teacher explaining in a studio",
    ]
    argv += [
        "--out",
        str(out),
        "--engine",
        "preview",
        "--work",
        str(tmp_path / "work"),
        "--size",
        "144x256",
        *extra,
    ]
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, err, out


def assert_one_line(code, err, out, *needles):
    assert code == 2, err
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    if isinstance(out, Path):
        assert not out.exists() or not any(out.iterdir())


def wav(path, samples, rate=16000):
    sf.write(path, samples.astype(np.float32), rate)
    return path


@pytest.fixture(autouse=True)
def _api(prefect_api):
    return prefect_api


def test_missing_audio(tmp_path, capsys):
    missing = tmp_path / "nope.mp3"
    assert_one_line(*run(tmp_path, capsys, audio=missing), "--audio", str(missing))


def test_unreadable_audio_a_directory(tmp_path, capsys):
    folder = tmp_path / "folder.mp3"
    folder.mkdir()
    assert_one_line(*run(tmp_path, capsys, audio=folder), "--audio", str(folder))


def test_corrupt_audio(tmp_path, capsys):
    bad = tmp_path / "corrupt.mp3"
    bad.write_bytes(os.urandom(20000))
    assert_one_line(*run(tmp_path, capsys, audio=bad), "--audio", str(bad))


def test_audio_without_speech(tmp_path, capsys):
    t = np.arange(16000 * 5) / 16000
    tone = wav(tmp_path / "tone.wav", 0.05 * np.sin(2 * np.pi * 440 * t))
    code, err, out = run(tmp_path, capsys, audio=tone)
    assert_one_line(code, err, out, "--audio", "no speech")


def test_audio_shorter_than_one_second(tmp_path, capsys):
    short = wav(tmp_path / "short.wav", np.random.default_rng(0).standard_normal(8000) * 0.1)
    code, err, out = run(tmp_path, capsys, audio=short)
    assert_one_line(code, err, out, "--audio", "second")


def test_not_an_image(tmp_path, capsys):
    fake = tmp_path / "portrait.jpg"
    fake.write_text("not an image at all")
    assert_one_line(*run(tmp_path, capsys, image=fake), "--image", str(fake))


def test_image_without_a_face(tmp_path, capsys):
    scene = tmp_path / "scene.png"
    gradient = np.linspace(0, 255, 512 * 512 * 3).reshape(512, 512, 3).astype(np.uint8)
    Image.fromarray(gradient).save(scene)
    code, err, out = run(tmp_path, capsys, image=scene)
    assert_one_line(code, err, out, "--image", "face")


def test_face_too_small(tmp_path, capsys):
    small = tmp_path / "small.jpg"
    with Image.open(IMAGE) as img:
        img.resize((img.width // 10, img.height // 10)).save(small)
    code, err, out = run(tmp_path, capsys, image=small)
    assert_one_line(code, err, out, "--image", "small")


def test_destination_not_writable(tmp_path, capsys):
    code, err, _ = run(tmp_path, capsys, out="/proc/liveavatar-out")
    assert_one_line(code, err, None, "--out", "/proc/liveavatar-out")
    assert not Path("/proc/liveavatar-out").exists()


def test_destination_inside_a_file(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, err, _ = run(tmp_path, capsys, out=blocker / "out")
    assert_one_line(code, err, None, "--out")


def test_s3_bucket_that_does_not_exist(tmp_path, capsys, s3_server):
    code, err, _ = run(tmp_path, capsys, out="s3://no-such-bucket-here/lecture")
    assert_one_line(code, err, None, "--out", "no-such-bucket-here")


def test_bad_size_flag(tmp_path, capsys):
    code, err, out = run(tmp_path, capsys, extra=["--size", "700x385"])
    assert_one_line(code, err, out, "--size")


def test_over_long_prompt_is_truncated_with_a_warning_not_an_error(tmp_path, capsys):
    long_prompt = " ".join(["a lecturer explaining physics in a bright studio, realistic style."] * 120)
    argv = ["produce", "--audio", str(AUDIO), "--image", str(IMAGE), "--prompt", long_prompt]
    argv += ["--out", str(tmp_path / "out"), "--engine", "preview", "--work", str(tmp_path / "work")]
    argv += ["--size", "144x256", "--segment-seconds", "20", "--max-segment-seconds", "30"]
    assert main(argv) == 0
    import json

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["prompt"]["truncated"] and manifest["inputs"]["prompt"]["tokens"] <= 512
    assert any("512" in w for w in manifest["warnings"])


def test_cli_subprocess_exit_code_and_single_line(cli_env, tmp_path):
    """The installed entry point: exit 2 and exactly one line on stderr for a missing input."""
    missing = tmp_path / "missing.wav"
    argv = [sys.executable, "-m", "flows.cli", "produce", "--audio", str(missing), "--image", str(IMAGE)]
    argv += ["--prompt", "p", "--out", str(tmp_path / "out"), "--engine", "preview"]
    done = subprocess.run(argv, env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: --audio") and str(missing) in errors[-1]
    assert sum("Traceback" in line for line in errors) == 0
    assert not (tmp_path / "out").exists()
