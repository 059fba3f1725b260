"""Picture QC on real videos made by the preview engine: identity, the lip-sync proxy, motion, `qc`.

Each lecture is the bundled speech (normalised to -16 LUFS) rendered by the preview engine from a
real portrait in 10-s segments and assembled with the line's own code; defects are made the way they
happen: the sound muxed late, another person, a stuck picture, a segment that starts elsewhere.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
from skimage.data import lfw_subset

from flows.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from liveavatar_core.audio import normalize_to_wav
from liveavatar_core.engines.base import GenerationConfig, SegmentRequest
from liveavatar_core.engines.preview import PreviewEngine
from liveavatar_core.media import VideoWriter, assemble, ffmpeg_exe
from liveavatar_core.portrait import Portrait, load_rgb, prepare_portrait
from liveavatar_core.qc import run_qc, without_images
from liveavatar_core.qc_picture import MIN_SIDE, lipsync, motion
from liveavatar_core.timebase import SAMPLES_PER_FRAME
from liveavatar_core.vad import detect_speech

HEIGHT, WIDTH = 704, 384
SEG_FRAMES = 250
PORTRAIT = Path(__file__).resolve().parents[1] / "examples" / "portrait.jpg"
PICTURE_CHECKS = ["identity", "lip_sync", "no_frozen_speech", "no_jump_at_cuts"]


class _Edit:
    """A frame sink that rewrites frames on their way to the writer (frame index within the segment)."""

    def __init__(self, writer: VideoWriter, edit: Callable[[int, np.ndarray], np.ndarray] | None):
        self.writer, self.edit, self.index = writer, edit, 0

    def write(self, frames: np.ndarray) -> None:
        out = frames.copy()
        for k in range(len(out)):
            if self.edit is not None:
                out[k] = self.edit(self.index + k, out[k])
        self.index += len(out)
        self.writer.write(out)


class Speech:
    def __init__(self, folder: Path):
        norm = normalize_to_wav(PORTRAIT.parent / "lecture.mp3", folder / "speech.wav")
        self.wav = norm.path
        self.samples = norm.samples
        self.frames = -(-self.samples // SAMPLES_PER_FRAME)
        self.spans = detect_speech(self.wav)
        cuts = [*range(0, self.frames, SEG_FRAMES), self.frames]
        self.segments = list(zip(cuts, cuts[1:], strict=False))


def _render(folder: Path, speech: Speech, portraits: list[Portrait], edits=None, handoff=True) -> list[Path]:
    """Segment files rendered by the preview engine (portraits[k] for segment k, its handoff carried)."""
    folder.mkdir(parents=True, exist_ok=True)
    audio, _ = sf.read(str(speech.wav), dtype="float32")
    engine, config = PreviewEngine(), GenerationConfig(height=HEIGHT, width=WIDTH)
    paths, state = [], None
    for k, (a, b) in enumerate(speech.segments):
        p = portraits[k]
        path = folder / f"seg{k}.mp4"
        with VideoWriter(path, WIDTH, HEIGHT) as writer:
            request = SegmentRequest(
                audio=audio[a * SAMPLES_PER_FRAME : b * SAMPLES_PER_FRAME], num_frames=b - a,
                portrait=p.image, prompt="", seed=0, config=config, face_box=p.face_box,
                handoff=state if handoff else None,
            )  # fmt: skip
            state = engine.generate(request, _Edit(writer, (edits or {}).get(k))).handoff
        paths.append(path)
    return paths


def _lecture(paths: list[Path], wav: Path, out: Path) -> Path:
    assemble(paths, wav, out)
    return out


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Speech:
    return Speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def astronaut() -> Portrait:
    return prepare_portrait(PORTRAIT, height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="module")
def good_segments(tmp_path_factory, speech, astronaut) -> list[Path]:
    return _render(tmp_path_factory.mktemp("good"), speech, [astronaut] * len(speech.segments))


@pytest.fixture(scope="module")
def good(good_segments, speech) -> Path:
    return _lecture(good_segments, speech.wav, good_segments[0].parent / "lecture.mp4")


@pytest.fixture(scope="module")
def shifted(good_segments, speech) -> Path:
    """The good picture with its sound muxed 4 frames (160 ms) late."""
    audio, sr = sf.read(str(speech.wav), dtype="float32")
    late = 4 * SAMPLES_PER_FRAME
    wav = good_segments[0].parent / "late.wav"
    sf.write(str(wav), np.concatenate([np.zeros(late, np.float32), audio[:-late]]), sr, subtype="PCM_16")
    return _lecture(good_segments, wav, good_segments[0].parent / "late.mp4")


def _qc(path: Path, speech: Speech, **kw):
    args = {
        "expected_frames": speech.frames,
        "audio_duration_s": speech.samples / 16_000,
        "speech_spans": speech.spans,
        "portrait": load_rgb(PORTRAIT, "portrait", []),
        "segments": speech.segments,
    }
    return run_qc(path, **(args | kw))


def _seg(report, name: str) -> list:
    return [s[name] for s in report.picture["segments"]]


def test_preview_lecture_passes_every_check_with_lip_sync_at_lag_0(good, speech):
    report = _qc(good, speech)
    assert [c.name for c in report.checks][-4:] == PICTURE_CHECKS
    assert report.passed, [c.detail for c in report.failures]
    lip = report.picture["lip_sync"]
    assert lip["lag_frames"] == 0 and lip["correlation"] > 0.8
    assert all(abs(s["lag_frames"]) <= 1 and s["passed"] for s in _seg(report, "lip_sync"))
    ident = _seg(report, "identity")
    assert all(i["passed"] and i["faces_missing"] == 0 and i["worst"] < 0.4 for i in ident)
    # Every keyframe (1 s apart) and the last frame; one descriptor per segment, the rest tracked.
    assert [len(i["samples"]) for i in ident] == [11, 11, 8]
    assert [i["measured"] for i in ident] == [1, 1, 1]
    assert report.picture["frozen"] == []
    assert [c["at_s"] for c in report.picture["cuts"]] == [10.0, 20.0]
    assert all(c["ratio"] < motion.JUMP_RATIO for c in report.picture["cuts"])
    data = report.to_dict()
    assert data["failed"] == [] and data["picture"]["face_expected"] is True
    images = data["picture"]["images"]
    assert len(images["cuts"]) == 2 and images["cuts"][0]["before"].startswith("data:image/jpeg;base64,")
    assert "images" not in without_images(data)["picture"]
    json.dumps(without_images(data))


def test_the_smallest_video_judged_still_shows_its_face(good, speech, tmp_path):
    # Scaled to MIN_SIDE (128 px) wide, the face is about 60 px: under what dlib's detector finds unaided.
    small = tmp_path / "small.mp4"
    scale = ["-vf", f"scale={MIN_SIDE}:-2", "-c:v", "libx264", "-g", "25", "-c:a", "copy"]
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(good), *scale, str(small)], check=True)
    report = _qc(small, speech)
    assert report.check("identity").passed and report.check("lip_sync").passed, report.failures
    assert all(i["faces_missing"] == 0 for i in _seg(report, "identity"))


def test_one_segment_out_of_sync_fails_lip_sync_and_is_named(good_segments, speech):
    # Only segment 1's sound is 6 frames late; the lecture pooled over all windows can still look fine.
    audio, sr = sf.read(str(speech.wav), dtype="float32")
    late, (a, b) = 6 * SAMPLES_PER_FRAME, speech.segments[1]
    part = audio[a * SAMPLES_PER_FRAME : b * SAMPLES_PER_FRAME].copy()
    audio[a * SAMPLES_PER_FRAME : b * SAMPLES_PER_FRAME] = np.concatenate(
        [np.zeros(late, np.float32), part[:-late]]
    )
    wav = good_segments[0].parent / "one_late.wav"
    sf.write(str(wav), audio, sr, subtype="PCM_16")
    report = _qc(_lecture(good_segments, wav, good_segments[0].parent / "one_late.mp4"), speech)
    assert report.to_dict()["failed"] == ["lip_sync"]
    verdicts = [s["passed"] for s in _seg(report, "lip_sync")]
    assert verdicts == [True, False, True]
    assert report.picture["lip_sync"]["passed"]  # pooled, the lecture alone would have passed
    assert "1 of 3 measured segments out of sync" in report.check("lip_sync").detail
    assert "segment 1: lag " in report.check("lip_sync").detail


def test_sound_4_frames_late_fails_lip_sync_with_lag_4(shifted, speech):
    report = _qc(shifted, speech)
    assert report.to_dict()["failed"] == ["lip_sync"]
    check = report.check("lip_sync")
    assert check.value == 4 and check.limit == 1
    segments = _seg(report, "lip_sync")
    assert all(abs(s["lag_frames"] - 4) <= 1 and s["passed"] is False for s in segments), segments
    assert "lecture lag 4 frames" in check.detail and check.detail.startswith("proxy")


def _other_person(folder: Path) -> Portrait:
    """A second real person: a face from scikit-image's LFW subset, enlarged onto a plain canvas."""
    face = cv2.resize((lfw_subset()[0] * 255).astype(np.uint8), (200, 200), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((400, 300), int(np.median(face)), np.uint8)
    canvas[80:280, 50:250] = face
    cv2.imwrite(str(folder / "other.png"), canvas)
    return prepare_portrait(folder / "other.png", height=HEIGHT, width=WIDTH)


def test_another_person_in_the_second_half_fails_identity_in_those_segments(tmp_path, speech, astronaut):
    other = _other_person(tmp_path)
    paths = _render(tmp_path, speech, [astronaut, other, other], handoff=False)
    report = _qc(_lecture(paths, speech.wav, tmp_path / "lecture.mp4"), speech)
    check = report.check("identity")
    assert not check.passed and check.value > 0.6
    assert [i["passed"] for i in _seg(report, "identity")] == [True, False, False]
    assert "segment 1: distance" in check.detail and "segment 0" not in check.detail
    worst = report.picture["images"]["worst"]
    assert worst[0]["segment"] in (1, 2) and worst[0]["distance"] > 0.6


def test_a_face_that_changes_inside_a_segment_is_measured_where_it_changes(tmp_path, speech, astronaut):
    # From 16 s (frame 150 of segment 1) another person is on screen: tracking must notice the change
    # and measure it, not carry the segment's first measurement on.
    other = _other_person(tmp_path).image
    paths = _render(tmp_path, speech, [astronaut] * 3, edits={1: lambda i, f: other if i >= 150 else f})
    report = _qc(_lecture(paths, speech.wav, tmp_path / "lecture.mp4"), speech)
    ident = _seg(report, "identity")
    assert [i["passed"] for i in ident] == [True, False, True]
    assert ident[1]["measured"] >= 2 and ident[1]["worst"] > 0.6 and ident[1]["worst_at_s"] == 16.0
    before = [d for t, d, _ in ident[1]["samples"] if t < 16.0]
    assert before and max(before) < 0.4  # the astronaut's samples before the change stay hers


def test_frozen_stretch_during_speech_is_found(tmp_path, speech, astronaut):
    # Segment 1 (10-20 s) shows one frame from 12.0 s to 14.0 s, while the voice goes on.
    stuck: dict[str, np.ndarray] = {}

    def freeze(i: int, frame: np.ndarray) -> np.ndarray:
        if i == 50:
            stuck["frame"] = frame.copy()
        return stuck["frame"] if 50 <= i < 100 else frame

    paths = _render(tmp_path, speech, [astronaut] * 3, edits={1: freeze})
    report = _qc(_lecture(paths, speech.wav, tmp_path / "lecture.mp4"), speech)
    assert report.to_dict()["failed"] == ["no_frozen_speech"]
    [stretch] = report.picture["frozen"]
    assert stretch["segment"] == 1 and 12.0 <= stretch["start_s"] and stretch["end_s"] <= 14.1
    assert stretch["end_s"] - stretch["start_s"] >= 1.0


def test_jump_at_a_cut_is_found(tmp_path, speech, astronaut):
    # Segment 2 starts with the picture moved 40 px left: same person, same sound, a visible jump.
    paths = _render(tmp_path, speech, [astronaut] * 3, edits={2: lambda i, f: np.roll(f, -40, axis=1)})
    report = _qc(_lecture(paths, speech.wav, tmp_path / "lecture.mp4"), speech)
    assert report.to_dict()["failed"] == ["no_jump_at_cuts"]
    first, second = report.picture["cuts"]
    assert first["ratio"] < motion.JUMP_RATIO < second["ratio"] and second["at_s"] == 20.0
    assert "20.00 s" in report.check("no_jump_at_cuts").detail


def _faceless(tmp_path: Path, speech: Speech, astronaut: Portrait) -> Path:
    """What random weights give: moving smooth noise, no face (the engine's frames are replaced)."""
    noise = cv2.GaussianBlur(
        np.random.default_rng(5).integers(0, 255, (HEIGHT, WIDTH, 3), np.uint8), (0, 0), 9
    )
    paths = _render(
        tmp_path, speech, [astronaut] * 3, edits=dict.fromkeys(range(3), lambda i, f: np.roll(noise, i, 0))
    )
    return _lecture(paths, speech.wav, tmp_path / "lecture.mp4")


def test_no_face_fails_identity_and_lip_sync(tmp_path, speech, astronaut):
    report = _qc(_faceless(tmp_path, speech, astronaut), speech)
    assert {"identity", "lip_sync"} <= set(report.to_dict()["failed"])
    assert all(i["faces_missing"] == len(i["samples"]) for i in _seg(report, "identity"))
    # Searched on each segment's first keyframe, then again after MEASURE_GAP_S (5 s): 10-s segments.
    assert "no face in 2 of 2 samples" in report.check("identity").detail
    assert "no face found" in report.check("identity").detail


def test_random_weights_skip_the_picture_gates_and_say_so(tmp_path, speech, astronaut):
    reason = "random weights: the video shows no face"
    report = _qc(_faceless(tmp_path, speech, astronaut), speech, portrait=None, skip_picture=reason)
    data = report.to_dict()
    assert data["picture"]["face_expected"] is False and data["picture"]["skipped"] == reason
    for name in PICTURE_CHECKS:
        check = report.check(name)
        assert check.passed and check.detail.startswith(f"skipped: {reason}")
    assert data["picture"]["lip_sync"] is None


def test_lag_sign_and_value_on_plain_signals():
    rng = np.random.default_rng(1)
    mouth = np.convolve(rng.random(200), np.ones(4) / 4, mode="same")
    late = np.concatenate([np.zeros(3), mouth[:-3]])  # the sound 3 frames after the mouth
    assert lipsync.best(lipsync.correlations(mouth, late))[0] == 3
    assert lipsync.best(lipsync.correlations(late, mouth))[0] == -3
    assert motion.frozen_runs([(i, 0.0 if 10 <= i < 30 else 3.0) for i in range(1, 50)]) == [(9, 29)]


def test_report_shows_the_picture_section(good, speech):
    from liveavatar_core.report import render_report

    report = _qc(good, speech)
    html = render_report(good, {}, report.to_dict(), thumbnails=1)
    section = html[html.index('<section id="qc-picture">') :]
    assert "Lip-sync <strong>proxy</strong>" in section and "best lag <strong>0</strong>" in section
    assert section.count("<svg") == 1 and section.count("<circle") == 3  # identity samples over time
    assert section.count('alt="last frame before the cut') == 2
    assert "Worst identity samples" in section


def _cli(*args: str) -> int:
    return main(["qc", *args])


def test_qc_command_exit_codes_and_files(tmp_path, good, shifted, speech, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"segments": [{"frames": b - a} for a, b in speech.segments]}))
    common = [
        "--audio",
        str(PORTRAIT.parent / "lecture.mp3"),
        "--image",
        str(PORTRAIT),
        "--manifest",
        str(manifest),
    ]
    assert _cli("--video", str(good), "--out", str(tmp_path / "good"), *common) == EXIT_OK
    data = json.loads((tmp_path / "good" / "qc.json").read_text())
    assert (
        data["passed"] is True and len(data["picture"]["segments"]) == 3 and "images" not in data["picture"]
    )
    assert 'id="qc-picture"' in (tmp_path / "good" / "report.html").read_text()

    assert _cli("--video", str(shifted), "--out", str(tmp_path / "late"), *common) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {shifted} failed QC: lip_sync"
    assert json.loads((tmp_path / "late" / "qc.json").read_text())["picture"]["lip_sync"]["lag_frames"] == 4

    missing = tmp_path / "nope.mp4"
    assert _cli("--video", str(missing), "--out", str(tmp_path / "bad"), *common) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --video {missing}: no such file"
    faceless = tmp_path / "blank.png"
    cv2.imwrite(str(faceless), np.full((300, 300, 3), 128, np.uint8))
    args = [
        "--video",
        str(good),
        "--out",
        str(tmp_path / "bad"),
        "--audio",
        common[1],
        "--image",
        str(faceless),
    ]
    assert _cli(*args) == EXIT_BAD_INPUT
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"error: --image {faceless}: no face found")
    )
    assert not (tmp_path / "bad").exists()


def test_flow_task_checks_per_segment_and_publishes_the_table_artifact(prefect_api, good, speech, astronaut):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from liveavatar_core.portrait import encode_png
    from tasks.finish import quality_check
    from tasks.models import AudioPrep, EngineChoice, PortraitPrep, SpeechSpanRecord, StagedFile
    from tasks.qc import picture_artifact

    crop = good.parent / "crop.png"
    crop.write_bytes(encode_png(astronaut.image))
    staged = StagedFile(source=str(speech.wav), url=str(speech.wav), sha256="0")
    prep = AudioPrep(
        source=staged, wav_url=str(speech.wav), samples=speech.samples, duration_s=speech.samples / 16_000, sample_rate=16_000,
        channels=1, codec="pcm_s16le", loudness_in={}, loudness_out={},
        speech=[SpeechSpanRecord(start_s=s.start_s, end_s=s.end_s) for s in speech.spans],
    )  # fmt: skip
    face = PortraitPrep(url=str(crop), sha256="0", face_box=astronaut.face_box, faces_found=1, warnings=[])
    frames = [b - a for a, b in speech.segments]

    def engine(weights: str) -> EngineChoice:
        return EngineChoice(name="liveavatar", version="1", weights=weights, reason="test")

    @flow
    def check() -> tuple[dict, dict]:
        real = quality_check(str(good), prep, frames, face, engine("checkpoint"))
        picture_artifact(real, "0123456789abcdef0123")
        return real, quality_check(str(good), prep, frames, face, engine("random"))

    real, random = check()
    assert real["passed"] and [s["identity"]["passed"] for s in real["picture"]["segments"]] == [True] * 3
    assert random["picture"]["skipped"] == "random weights: the video shows no face"
    assert all(c["detail"].startswith("skipped: random weights") for c in random["checks"][-4:])
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["picture-qc-0123456789abcdef"]))
        )
    rows = json.loads(artifact.data)
    assert [r["segment"] for r in rows] == [0, 1, 2] and all(r["lip sync"] for r in rows)
    assert rows[0]["lip-sync proxy lag"] in (-1, 0, 1) and artifact.type == "table"


def test_a_mouth_that_moves_in_a_still_frame_is_not_frozen(astronaut):
    # Only a mouth-sized patch changes (30x12 px of a 384x704 frame, by 60 levels): the mean step of the
    # thumbnails stays under 0.2 levels, which a mean-based rule took for a frozen picture.
    gray = cv2.cvtColor(astronaut.image, cv2.COLOR_RGB2GRAY)
    frames = []
    for i in range(40):
        frame = gray.copy()
        mouth = frame[250:262, 340:370].astype(int)
        frame[250:262, 340:370] = np.clip(mouth + (60 if i % 2 else -60), 0, 255)
        frames.append(motion.small(frame))
    steps = [(i, motion.largest_change(a, b)) for i, (a, b) in enumerate(pairwise(frames), start=1)]
    assert max(motion.difference(a, b) for a, b in pairwise(frames)) < 0.2
    assert motion.frozen_runs(steps) == []
    still = [(i, motion.largest_change(frames[0], frames[0])) for i in range(1, 40)]
    assert motion.frozen_runs(still) == [(0, 39)]
