"""The measurements behind picture QC's thresholds (docs/qc.md): identity distances and the lip-sync floor.

Identity: dlib descriptor distance from `examples/portrait.jpg` to variants of the same photo
(scikit-image's astronaut: PNG original, mirrored, cropped, half size, JPEG q30, darker, gray,
rotated) and to 100 other people (scikit-image's LFW subset, 25-px faces enlarged onto a canvas).

Lip sync: on a preview-engine render of the bundled lecture, the proxy's best correlation per 4-s
window with the window's own sound, and with the sound of every other window (chance level).

Tracking (`identity.CHIP_CHANGE`): how far the upper face moves from the first frame through the same
render (a talking, swaying face: should stay tracked), for the photo's variants, and for the 100
other people (should always call for a new descriptor).

    .venv/bin/python benchmarks/qc_calibrate.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import skimage.data as sd
import soundfile as sf

from liveavatar_core.audio import normalize_to_wav
from liveavatar_core.engines.base import GenerationConfig, SegmentRequest
from liveavatar_core.engines.preview import PreviewEngine
from liveavatar_core.portrait import detect_faces, load_rgb, prepare_portrait
from liveavatar_core.qc_picture import identity, lipsync
from liveavatar_core.timebase import SAMPLES_PER_FRAME

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 50  # frames: the shortest lip-sync window QC judges


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    return cv2.imdecode(
        cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_UNCHANGED
    )


def _variants() -> dict[str, np.ndarray]:
    ast = sd.astronaut()
    return {
        "astronaut PNG": ast,
        "mirrored": ast[:, ::-1].copy(),
        "cropped to face and shoulders": ast[0:300, 80:330].copy(),
        "half size": cv2.resize(ast, (256, 256), interpolation=cv2.INTER_AREA),
        "JPEG quality 30": _jpeg(ast, 30),
        "60% brightness": (ast * 0.6).astype(np.uint8),
        "gray": cv2.cvtColor(cv2.cvtColor(ast, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB),
        "rotated 8 degrees": cv2.warpAffine(ast, cv2.getRotationMatrix2D((256, 200), 8, 1), (512, 512)),
    }


def _others(count: int = 100) -> list[np.ndarray]:
    """LFW faces found by both detectors, enlarged onto a plain canvas (RGB)."""
    out = []
    for face in sd.lfw_subset()[:count]:
        big = cv2.resize((face * 255).astype(np.uint8), (200, 200), interpolation=cv2.INTER_CUBIC)
        canvas = np.full((400, 300), int(np.median(big)), np.uint8)
        canvas[80:280, 50:250] = big
        rgb = cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)
        if identity.find_face(rgb) is not None and detect_faces(rgb)[0]:
            out.append(rgb)
    return out


def identity_distances() -> None:
    ref = identity.descriptor(load_rgb(ROOT / "examples/portrait.jpg", "portrait", []))
    print("same person (distance to examples/portrait.jpg):")
    for name, img in _variants().items():
        d = identity.descriptor(img)
        print(f"  {name:32} {'no face' if d is None else f'{identity.distance(ref, d):.3f}'}")
    o = np.array([identity.distance(ref, identity.descriptor(rgb)) for rgb in _others()])
    print(f"other people: {len(o)} LFW faces found; min {o.min():.3f}, 5th percentile {np.percentile(o, 5):.3f}, "
          f"median {np.median(o):.3f}")  # fmt: skip


def _chip(image: np.ndarray) -> np.ndarray:
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return identity.face_chip(gray, identity.landmarks(gray, identity.find_face(gray)))


def chip_changes(grays: list[np.ndarray]) -> None:
    ref = _chip(load_rgb(ROOT / "examples/portrait.jpg", "portrait", []))
    box = identity.find_face(grays[0])
    first = identity.face_chip(grays[0], identity.landmarks(grays[0], box))
    talking = np.array(
        [identity.chip_change(first, identity.face_chip(g, identity.landmarks(g, box))) for g in grays]
    )
    print(f"tracking (CHIP_CHANGE {identity.CHIP_CHANGE}): preview render, {len(grays)} frames against its "
          f"first: median {np.median(talking):.3f}, 99th percentile {np.percentile(talking, 99):.3f}, "
          f"max {talking.max():.3f}")  # fmt: skip
    for name, img in _variants().items():
        print(f"  {name:32} {identity.chip_change(ref, _chip(img)):.3f}")
    o = np.array([identity.chip_change(ref, _chip(rgb)) for rgb in _others()])
    print(f"  other people: {len(o)} LFW faces; min {o.min():.3f}, 5th percentile {np.percentile(o, 5):.3f}, "
          f"median {np.median(o):.3f}")  # fmt: skip


def _preview_render() -> tuple[list[np.ndarray], np.ndarray, int]:
    """The bundled lecture rendered by the preview engine at 384x704: luma frames, audio, frame count."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = normalize_to_wav(ROOT / "examples/lecture.mp3", Path(tmp) / "speech.wav").path
        audio, _ = sf.read(str(wav), dtype="float32")
        frames = len(audio) // SAMPLES_PER_FRAME
        portrait = prepare_portrait(ROOT / "examples/portrait.jpg", height=704, width=384)
        grays: list[np.ndarray] = []

        class Sink:
            def write(self, chunk: np.ndarray) -> None:
                grays.extend(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in chunk)

        request = SegmentRequest(audio=audio[: frames * SAMPLES_PER_FRAME], num_frames=frames, portrait=portrait.image,
                                 prompt="", seed=0, config=GenerationConfig(), face_box=portrait.face_box)  # fmt: skip
        PreviewEngine().generate(request, Sink())
    return grays, audio, frames


def lip_floor(grays: list[np.ndarray], audio: np.ndarray, frames: int) -> None:
    box = identity.find_face(grays[0])
    mouth = np.array(
        [lipsync.mouth_opening(lipsync.mouth_patch(g, identity.landmarks(g, box))) for g in grays]
    )
    env = lipsync.envelope_db(audio, frames)
    starts = range(0, frames - WINDOW + 1, WINDOW)
    own, wrong, wrong_near_0 = [], [], []
    for a in starts:
        for b in starts:
            corrs = lipsync.correlations(mouth[a : a + WINDOW], env[b : b + WINDOW])
            lag, corr = lipsync.best(corrs)
            if corr is None:
                continue
            (own if a == b else wrong).append((lag, corr))
            if a != b:
                wrong_near_0.append(
                    max(corrs.get(k, -1.0) for k in range(-lipsync.MAX_ABS_LAG, lipsync.MAX_ABS_LAG + 1))
                )
    print(
        f"lip-sync proxy, {len(own)} windows of {WINDOW} frames with their own sound: "
        f"lags {sorted({lag for lag, _ in own})}, correlation min {min(c for _, c in own):.3f}"
    )
    w = np.array([c for _, c in wrong])
    print(
        f"with another window's sound ({len(w)} pairs, best lag within ±{lipsync.MAX_LAG}): "
        f"median {np.median(w):.3f}, 95th percentile {np.percentile(w, 95):.3f}, max {w.max():.3f}; "
        f"{np.mean([abs(lag) <= lipsync.MAX_ABS_LAG for lag, _ in wrong]):.0%} of them at |lag| <= {lipsync.MAX_ABS_LAG}"
    )
    n = np.array(wrong_near_0)
    print(f"  their best correlation within |lag| <= {lipsync.MAX_ABS_LAG}: median {np.median(n):.3f}, "
          f"95th percentile {np.percentile(n, 95):.3f}, max {n.max():.3f}")  # fmt: skip


if __name__ == "__main__":
    identity_distances()
    render = _preview_render()
    chip_changes(render[0])
    lip_floor(*render)
