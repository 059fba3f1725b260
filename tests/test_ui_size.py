"""Output size: `auto` is 704x384's area shaped like the portrait; `WIDTHxHEIGHT` is exact, width first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main
from liveavatar_core import media
from liveavatar_core import size as output_size
from liveavatar_core.engines import GenerationConfig
from tests.fixtures.media import write_speechlike_wav

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "portrait.jpg"  # 512 x 512


def _framed(path: Path, width: int, height: int, *, exif_turn: bool = False) -> Path:
    """The sample face on a grey canvas of width x height (optionally stored sideways with EXIF)."""
    canvas = Image.new("RGB", (width, height), (128, 128, 128))
    face = Image.open(SAMPLE)
    scale = min(width, height) / 512
    face = face.resize((round(512 * scale), round(512 * scale)))
    canvas.paste(face, ((width - face.width) // 2, (height - face.height) // 2))
    if exif_turn:  # stored rotated a quarter turn; orientation 6 says "turn it back clockwise to view"
        exif = Image.Exif()
        exif[0x0112] = 6
        canvas.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    else:
        canvas.save(path)
    return path


@pytest.mark.parametrize(
    ("aspect", "shape"),
    [(16 / 9, (704, 384)), (704 / 384, (704, 384)), (4 / 3, (576, 448)), (1.0, (512, 512)),
     (3 / 4, (448, 576)), (9 / 16, (384, 704)), (5.0, (1152, 192)), (0.01, (64, 2048))],
)  # fmt: skip
def test_auto_keeps_the_area_and_follows_the_aspect(aspect, shape):
    width, height = output_size.resolve("auto", aspect)
    assert (width, height) == shape
    assert width * height <= 704 * 384 and width % 64 == 0 and height % 64 == 0


def test_exact_size_is_width_by_height_and_auto_without_a_portrait_is_landscape():
    assert output_size.resolve("1280x720", 9 / 16) == (1280, 720)
    config = GenerationConfig.for_output("1280x720", "fp8")
    assert (config.width, config.height, config.fp8, config.size) == (1280, 720, True, "1280x720")
    auto = GenerationConfig.for_output("auto")
    assert (auto.width, auto.height, auto.size) == (704, 384, "704x384")
    tall = GenerationConfig.for_output("auto", aspect=3 / 4)
    assert (tall.width, tall.height) == (448, 576)


def test_image_aspect_reads_the_viewed_orientation(tmp_path):
    assert output_size.image_aspect(_framed(tmp_path / "wide.png", 960, 540)) == pytest.approx(16 / 9)
    assert output_size.image_aspect(_framed(tmp_path / "tall.png", 540, 960)) == pytest.approx(9 / 16)
    turned = _framed(tmp_path / "turned.jpg", 960, 540, exif_turn=True)
    assert Image.open(turned).size == (540, 960)  # stored tall, viewed wide
    assert output_size.image_aspect(turned) == pytest.approx(16 / 9)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert output_size.image_aspect(tmp_path / "junk.jpg") is None


@pytest.mark.parametrize(("canvas", "video"), [((960, 540), (704, 384)), ((540, 960), (384, 704))])
def test_produced_video_follows_the_portrait_and_every_record_agrees(prefect_api, tmp_path, canvas, video):
    image = _framed(tmp_path / "portrait.png", *canvas)
    audio = write_speechlike_wav(tmp_path / "talk.wav", 2.5, seed=3).path
    out = tmp_path / "out"
    argv = ["produce", "--audio", str(audio), "--image", str(image), "--prompt", "A teacher"]
    argv += ["--out", str(out), "--engine", "preview", "--work", str(tmp_path / "work")]
    assert main(argv) == 0  # --size left at its default: auto
    info = media.probe(out / "video.mp4").video
    assert (info.width, info.height) == video
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["size"] == "auto"
    assert (manifest["output"]["width"], manifest["output"]["height"]) == video
    assert f"{video[0]}×{video[1]}" in (out / "report.html").read_text()
