"""Inputs as course teams have them, each through `produce` with the preview engine (docs/inputs.md).

Every class either publishes a video whose audio and video agree and whose QC passes, or is refused
with one line naming the input and the problem (exit 2, nothing at the destination). The flow runs
in-process against the session's Prefect test server; two refusals also run the installed CLI as a
subprocess, to see the line is the last thing on screen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from liveavatar_core import media
from liveavatar_core.portrait import prepare_portrait
from tests.fixtures.voices import speech_spans, voice_lecture

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "examples" / "lecture.mp3"
IMAGE = ROOT / "examples" / "portrait.jpg"
PROMPT = "A teacher explains heat in a bright classroom, photographic, soft lighting."
SMALL = ["--size", "144x256"]


@pytest.fixture(autouse=True)
def _api(prefect_api):
    return prefect_api


def produce(tmp_path: Path, capsys, *, audio=AUDIO, image=IMAGE, prompt=PROMPT, extra=()):
    out = tmp_path / "out"
    argv = ["produce", "--audio", str(audio), "--image", str(image), "--prompt", prompt, "--out", str(out)]
    argv += ["--engine", "preview", "--work", str(tmp_path / "work"), *SMALL, *extra]
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, err, out


def published(code: int, err: list[str], out: Path) -> dict:
    """The promises of a published lecture; returns its manifest."""
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    qc = json.loads((out / "qc.json").read_text())
    assert qc["passed"], [c for c in qc["checks"] if not c["passed"]]
    info = media.probe(out / "video.mp4")
    assert abs(info.video.duration_s - info.audio.duration_s) <= 0.04  # in sync, to a frame
    assert info.video.frames == sum(s["frames"] for s in manifest["segments"])
    return manifest


def refused(code: int, err: list[str], out: Path, *needles: str) -> None:
    assert code == 2, err
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists() or not any(out.iterdir())


def crop_of(tmp_path: Path) -> np.ndarray:
    """The portrait crop the flow stored in the work store (one per run here)."""
    (png,) = (tmp_path / "work" / "portraits").glob("*.png")
    return np.asarray(Image.open(png).convert("RGB"))


def cuts_s(manifest: dict) -> list[float]:
    return [s["start_s"] for s in manifest["segments"][1:]]


def outside(t: float, spans: list[tuple[float, float]]) -> bool:
    return all(not a < t < b for a, b in spans)


# ---------------------------------------------------------------------------------------------
# audio


def screen_recording(dst: Path, audio: Path) -> Path:
    """A screen or camera recording: a test-pattern video stream with the lecture as its audio."""
    codecs = {
        ".mp4": ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"],
        ".mov": ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"],
        ".mkv": ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "libopus"],
        ".webm": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-c:a", "libopus"],
    }[dst.suffix]
    subprocess.run(
        [media.ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=s=320x240:r=25",
         "-i", str(audio), "-shortest", *codecs, str(dst)],
        check=True,
    )  # fmt: skip
    return dst


@pytest.mark.parametrize("kind", ["normal", "loudnorm16"])
def test_ordinary_speech_at_minus_23_and_minus_16_lufs_publishes(tmp_path, capsys, kind):
    """The reported failure: a 44.1 kHz stereo MP3 at -23 (or already -16) LUFS came out near -17.4."""
    src = voice_lecture(tmp_path / f"{kind}.mp3", kind, bitrate="128k")
    code, err, out = produce(tmp_path, capsys, audio=src)
    published(code, err, out)
    loudness = {c["name"]: c for c in json.loads((out / "qc.json").read_text())["checks"]}["loudness"]
    assert abs(loudness["value"] + 16.0) <= 0.35, loudness
    audio = media.probe(out / "video.mp4").audio
    assert (audio.codec, audio.sample_rate, audio.channels) == ("aac", 44100, 2)


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv", ".webm"])
def test_audio_inside_a_video_file(tmp_path, capsys, suffix):
    wav = voice_lecture(tmp_path / "voice.wav", "normal")
    video = screen_recording(tmp_path / f"screen{suffix}", wav)
    manifest = published(*produce(tmp_path, capsys, audio=video))
    assert manifest["inputs"]["audio"]["duration_s"] == pytest.approx(
        media.probe(wav).audio.duration_s, abs=0.05
    )


def test_a_video_without_audio_is_refused(tmp_path, capsys):
    video = tmp_path / "silent-screen.mp4"
    subprocess.run(
        [media.ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=5",
         "-c:v", "libx264", "-preset", "ultrafast", str(video)],
        check=True,
    )  # fmt: skip
    refused(*produce(tmp_path, capsys, audio=video), "--audio", str(video), "no audio stream")


@pytest.mark.parametrize("codec", ["pcm_mulaw", "pcm_alaw"])
def test_telephone_rate_audio_is_cut_in_pauses(tmp_path, capsys, codec):
    src = voice_lecture(tmp_path / f"phone-{codec}.wav", "normal", sample_rate=8000, channels=1,
                        codec=["-c:a", codec])  # fmt: skip
    manifest = published(
        *produce(tmp_path, capsys, audio=src, extra=["--segment-seconds", "8", "--max-segment-seconds", "12"])
    )
    cuts = cuts_s(manifest)
    assert len(cuts) >= 2, manifest["segments"]
    assert all(outside(t, speech_spans("normal")) for t in cuts), (cuts, speech_spans("normal"))
    audio = media.probe(tmp_path / "out" / "video.mp4").audio
    assert (audio.sample_rate, audio.channels) == (16000, 1)  # AAC's lowest rate used here


@pytest.mark.parametrize(
    ("name", "rate", "codec"),
    [
        ("s24-96k.wav", 96000, ["-c:a", "pcm_s24le"]),
        ("s32-192k.wav", 192000, ["-c:a", "pcm_s32le"]),
        ("f32-96k.wav", 96000, ["-c:a", "pcm_f32le"]),
        ("s24-192k.flac", 192000, ["-c:a", "flac", "-sample_fmt", "s32"]),
    ],
)
def test_high_rate_audio(tmp_path, capsys, name, rate, codec):
    src = voice_lecture(tmp_path / name, "normal", sample_rate=rate, codec=codec)
    published(*produce(tmp_path, capsys, audio=src))
    audio = media.probe(tmp_path / "out" / "video.mp4").audio
    assert (audio.sample_rate, audio.channels) == (48000, 2)


def test_a_break_of_minutes_with_leading_and_trailing_silence(tmp_path, capsys):
    talk = voice_lecture(tmp_path / "talk.wav", "break", break_s=120)
    src = tmp_path / "padded.flac"
    subprocess.run(
        [media.ffmpeg_exe(), "-v", "error", "-i", str(talk), "-af", "adelay=20s:all=1,apad=pad_dur=25",
         str(src)],
        check=True,
    )  # fmt: skip
    manifest = published(*produce(tmp_path, capsys, audio=src))
    spans = [(a + 20.0, b + 20.0) for a, b in speech_spans("break", break_s=120)]
    assert all(outside(t, spans) for t in cuts_s(manifest))
    assert manifest["segments"][-1]["end_s"] == pytest.approx(media.probe(src).audio.duration_s, abs=0.05)


# ---------------------------------------------------------------------------------------------
# portraits


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.asarray(Image.open(IMAGE).convert("RGB"))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The crop the flow makes of the sample portrait at the test size."""
    return prepare_portrait(IMAGE, height=256, width=144).image


def coarse_mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean difference of two crops' grey 9x16 thumbnails: colour conversions and a few pixels of
    framing jitter hardly move it; another face, framing or orientation does."""

    def thumb(x: np.ndarray) -> np.ndarray:
        return cv2.resize(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), (9, 16), interpolation=cv2.INTER_AREA)

    return float(np.abs(thumb(a).astype(np.int16) - thumb(b).astype(np.int16)).mean())


def _exif_rotated(path: Path, rgb: np.ndarray) -> Path:
    """Pixels stored turned 90 degrees anticlockwise, with the EXIF tag (6) that tells viewers to turn them back."""
    im = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)
    return path


def _alpha(path: Path, rgb: np.ndarray) -> Path:
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, : rgb.shape[1] // 10, 3] = 0  # a transparent strip at the left
    Image.fromarray(rgba).save(path)  # 4 channels of uint8: RGBA
    return path


def _cmyk(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    return path


def _grey(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).convert("L").save(path, quality=95)
    return path


def _png16(path: Path, rgb: np.ndarray) -> Path:
    bgr16 = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
    cv2.imwrite(str(path), bgr16)
    return path


def _large(path: Path, rgb: np.ndarray) -> Path:
    h, w = rgb.shape[:2]
    scale = 6400 / max(h, w)
    big = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(big).save(path, quality=90)
    return path


def _pillow(fmt: str):
    def save(path: Path, rgb: np.ndarray) -> Path:
        if fmt == "HEIF":
            import pillow_heif

            pillow_heif.register_heif_opener()
        Image.fromarray(rgb).save(path, format=fmt, quality=90)
        return path

    return save


PORTRAITS = {  # file name: how to make it from the sample's pixels
    "exif-rotated.jpg": _exif_rotated,
    "alpha.png": _alpha,
    "cmyk.jpg": _cmyk,
    "grey.jpg": _grey,
    "sixteen-bit.png": _png16,
    "large-6400px.jpg": _large,
    "photo.webp": _pillow("WEBP"),
    "photo.avif": _pillow("AVIF"),
    "photo.heic": _pillow("HEIF"),
}


@pytest.mark.parametrize("name", sorted(PORTRAITS))
def test_portrait_classes_publish_upright(tmp_path, capsys, astronaut, reference, name):
    image = PORTRAITS[name](tmp_path / name, astronaut)
    published(*produce(tmp_path, capsys, image=image))
    crop = crop_of(tmp_path)
    assert crop.shape == reference.shape
    # The same framing of the same upright face (the cascades find no face in a sideways photo at all).
    assert coarse_mad(crop, reference) < 20, coarse_mad(crop, reference)  # turned or mirrored: 32-83


def test_two_faces_use_the_largest_with_a_warning(tmp_path, capsys, astronaut):
    h, w = astronaut.shape[:2]
    small = cv2.resize(astronaut, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    canvas = np.full((h, w + w // 2, 3), 200, np.uint8)
    canvas[:, :w] = astronaut
    canvas[h // 4 : h // 4 + h // 2, w:] = small
    path = tmp_path / "two-people.jpg"
    Image.fromarray(canvas).save(path, quality=95)
    manifest = published(*produce(tmp_path, capsys, image=path))
    assert any("found 2 faces; used the largest" in w for w in manifest["warnings"]), manifest["warnings"]


# ---------------------------------------------------------------------------------------------
# prompts


def test_long_prompt_in_other_scripts_with_emoji(tmp_path, capsys):
    prompt = (
        "一位物理老师在明亮的教室里讲解热传导，📚🔥 自然光，写实风格。" * 20
        + " مدرّسة تشرح انتقال الحرارة في استوديو، إضاءة ناعمة 🎓 " * 10
        + " शिक्षिका कक्षा में ऊष्मा समझाती हैं 🌡️ " * 10
    )
    manifest = published(*produce(tmp_path, capsys, prompt=prompt))
    seen = manifest["inputs"]["prompt"]
    assert seen["truncated"] and seen["tokens"] <= 512
    assert seen["text"] and prompt.startswith(seen["text"][:40])
    assert "📚" in seen["text"]


# ---------------------------------------------------------------------------------------------
# the installed CLI: the refusal is the last line on screen


@pytest.mark.parametrize("case", ["video-without-audio", "image-not-a-photo"])
def test_cli_refusal_is_the_last_line(cli_env, tmp_path, case):
    audio, image = AUDIO, IMAGE
    if case == "video-without-audio":
        audio = tmp_path / "silent-screen.mov"
        subprocess.run(
            [media.ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=160x120:r=25:d=3",
             "-c:v", "libx264", "-preset", "ultrafast", str(audio)],
            check=True,
        )  # fmt: skip
        needle = "no audio stream"
    else:
        image = tmp_path / "slides.heic"
        _pillow("HEIF")(image, np.full((400, 300, 3), 240, np.uint8))
        needle = "no face found"
    argv = [sys.executable, "-m", "flows.cli", "produce", "--audio", str(audio), "--image", str(image)]
    argv += ["--prompt", PROMPT, "--out", str(tmp_path / "out"), "--engine", "preview", *SMALL]
    done = subprocess.run(argv, env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, lines[-5:]
    named = audio if case == "video-without-audio" else image
    assert lines[-1].startswith("error: ") and needle in lines[-1] and str(named) in lines[-1], lines[-5:]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
