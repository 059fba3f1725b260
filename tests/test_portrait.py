"""Portrait stage on the committed sample photo and variants of it built here (real image files)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from liveavatar_core.errors import InputError
from liveavatar_core.portrait import (
    EYE_LINE,
    FRAME_FACE_WIDTHS,
    encode_png,
    load_rgb,
    plan_crop,
    prepare_portrait,
    suppress_overlaps,
)

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "portrait.jpg"
H, W = 704, 384  # the engines' default output (tall)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE).convert("RGB"))


@pytest.fixture(scope="module")
def reference():
    return prepare_portrait(SAMPLE, height=H, width=W)


def save(path: Path, image: np.ndarray | Image.Image, **params) -> Path:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im.save(path, **params)
    return path


def shrink(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def decoded(path: Path) -> np.ndarray:
    return load_rgb(path, str(path), [])


def near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    """Boxes from re-encoded copies of one photo differ by a few pixels of detector jitter."""
    return all(abs(u - v) <= tol for u, v in zip(a, b, strict=True))


def inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return (
        inner[0] >= outer[0]
        and inner[1] >= outer[1]
        and inner[0] + inner[2] <= outer[0] + outer[2]
        and inner[1] + inner[3] <= outer[1] + outer[3]
    )


def test_sample_is_framed_head_and_shoulders(reference):
    p = reference
    assert p.image.shape == (H, W, 3) and p.image.dtype == np.uint8
    assert p.faces_found == 1 and p.warnings == []
    assert p.source_size == (512, 512)
    x, y, w, h = p.face_box
    assert abs(x + w / 2 - W / 2) <= 2  # centred horizontally
    assert w / W == pytest.approx(1 / FRAME_FACE_WIDTHS, abs=0.02)  # face ~40% of a tall frame's width
    cx, cy, cw, ch = p.crop_box
    assert cw / ch == pytest.approx(W / H, abs=0.01)
    assert inside(p.crop_box, (0, 0, 512, 512))
    assert cy == 0  # the face is near the top: the crop was shifted down into the image


def test_eyes_on_upper_third_when_there_is_room(tmp_path, astronaut):
    # Extend the photo by repeating its edge pixels, so the framing never touches the border.
    big = np.pad(astronaut, ((600, 600), (600, 600), (0, 0)), mode="edge")
    p = prepare_portrait(save(tmp_path / "big.png", big), height=H, width=W)
    x, y, w, h = p.face_box
    assert abs(x + w / 2 - W / 2) <= 2
    assert abs(y + EYE_LINE * h - H / 3) <= 3
    assert inside(p.crop_box, (1, 1, big.shape[1] - 2, big.shape[0] - 2))  # not pushed by an edge
    assert p.warnings == []


@pytest.mark.parametrize(("height", "width"), [(384, 704), (512, 512), (720, 400)])
def test_any_output_size(height, width):
    p = prepare_portrait(SAMPLE, height=height, width=width)
    assert p.image.shape == (height, width, 3)
    assert inside(p.face_box, (0, 0, width, height))
    assert p.crop_box[2] / p.crop_box[3] == pytest.approx(width / height, abs=0.01)


def test_exif_orientation_is_applied(tmp_path, astronaut):
    upright = astronaut[:, 56:456]  # 400 wide, 512 tall: the orientation shows in the size
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # pixels lie on their side
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = save(tmp_path / "phone.jpg", stored, quality=95, exif=exif)
    p = prepare_portrait(path, height=H, width=W)
    assert p.source_size == (400, 512)
    assert mean_abs_diff(decoded(path), upright) < 3  # the pixels the detector saw were upright
    plain = prepare_portrait(save(tmp_path / "plain.jpg", upright, quality=95), height=H, width=W)
    assert near(p.face_box, plain.face_box)


def test_largest_of_several_faces_with_a_warning(tmp_path, astronaut):
    canvas = np.full((512, 300 + 512, 3), 200, np.uint8)
    canvas[150:406, 20:276] = shrink(astronaut, 0.5)  # a second, smaller face on the left
    canvas[:, 300:] = astronaut
    p = prepare_portrait(save(tmp_path / "two.png", canvas), height=H, width=W)
    assert p.faces_found == 2
    assert len(p.warnings) == 1 and "2 faces" in p.warnings[0]
    cx, cy, cw, ch = p.crop_box
    assert cx >= 300  # framed on the large face, right of the small one
    assert p.face_box[2] / W == pytest.approx(1 / FRAME_FACE_WIDTHS, abs=0.03)


def test_face_too_small(tmp_path, astronaut):
    path = save(tmp_path / "tiny.png", shrink(astronaut, 220 / 512))  # face ~44 px wide
    with pytest.raises(InputError) as err:
        prepare_portrait(path, height=H, width=W)
    assert err.value.subject == str(path)
    assert "px wide" in err.value.problem and "64 px" in err.value.problem


def test_min_face_px_is_configurable():
    with pytest.raises(InputError, match="under the 120 px"):
        prepare_portrait(SAMPLE, height=H, width=W, min_face_px=120)


def test_soft_upscale_warning(tmp_path, astronaut):
    path = save(tmp_path / "small.png", shrink(astronaut, 0.78))  # face ~72 px: usable, but enlarged
    p = prepare_portrait(path, height=H, width=W)
    assert p.image.shape == (H, W, 3)
    assert any("enlarged" in w for w in p.warnings)


def test_no_face(tmp_path):
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx * 255 // 640, yy * 255 // 480, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    cv2.circle(img, (200, 200), 80, (250, 40, 40), -1)
    cv2.rectangle(img, (350, 100), (550, 300), (30, 30, 240), -1)
    cv2.putText(img, "lecture 7", (60, 420), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (0, 0, 0), 4)
    with pytest.raises(InputError, match="no face found") as err:
        prepare_portrait(save(tmp_path / "shapes.png", img), height=H, width=W, subject="--image shapes")
    assert err.value.subject == "--image shapes"


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("These are lecture notes, not a photo.\n")
    with pytest.raises(InputError, match="not an image"):
        prepare_portrait(path, height=H, width=W)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare_portrait(tmp_path / "absent.jpg", height=H, width=W)
    with pytest.raises(InputError, match="directory"):
        prepare_portrait(tmp_path, height=H, width=W)


def test_truncated_jpeg(tmp_path):
    data = SAMPLE.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="damaged or truncated"):
        prepare_portrait(path, height=H, width=W)


def test_alpha_is_composited_on_white(tmp_path, astronaut):
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:16] = (0, 255, 0, 0)  # a transparent band of pure green at the top (inside the crop)
    p = prepare_portrait(save(tmp_path / "alpha.png", rgba), height=H, width=W)
    assert p.crop_box[1] == 0
    top = p.image[:10].reshape(-1, 3)
    assert (top > 240).all()  # white, not the hidden green
    assert any("transparent" in w for w in p.warnings)


def test_grayscale_and_palette(tmp_path, astronaut, reference):
    gray = prepare_portrait(
        save(tmp_path / "gray.jpg", Image.fromarray(astronaut).convert("L")), height=H, width=W
    )
    assert gray.image.shape == (H, W, 3)
    assert (gray.image[..., 0] == gray.image[..., 1]).all() and (
        gray.image[..., 1] == gray.image[..., 2]
    ).all()
    palette = Image.fromarray(astronaut).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    path = save(tmp_path / "palette.png", palette)
    assert mean_abs_diff(decoded(path), astronaut) < 6
    p = prepare_portrait(path, height=H, width=W)
    assert near(p.face_box, reference.face_box)


def test_cmyk_becomes_rgb(tmp_path, astronaut, reference):
    path = save(tmp_path / "cmyk.jpg", Image.fromarray(astronaut).convert("CMYK"), quality=95)
    assert Image.open(path).mode == "CMYK"
    assert mean_abs_diff(decoded(path), astronaut) < 4  # colours survive (not inverted)
    p = prepare_portrait(path, height=H, width=W)
    assert near(p.face_box, reference.face_box)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path, astronaut):
    gray8 = np.asarray(Image.fromarray(astronaut).convert("L"))
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)  # full 16-bit range
    path = save(tmp_path / "gray16.png", gray16)
    assert Image.open(path).mode.startswith("I")
    p16 = prepare_portrait(path, height=H, width=W)
    p8 = prepare_portrait(save(tmp_path / "gray8.png", gray8), height=H, width=W)
    assert mean_abs_diff(p16.image, p8.image) < 1


def test_bytes_input_matches_path(reference):
    p = prepare_portrait(SAMPLE.read_bytes(), height=H, width=W)
    assert np.array_equal(p.image, reference.image) and p.face_box == reference.face_box


def test_encode_png_is_lossless(reference):
    data = encode_png(reference.image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), reference.image)
    assert encode_png(reference.image.copy()) == data


def test_plan_crop_shifts_inside_the_image():
    box, fraction, padded = plan_crop((1000, 1000), (900, 400, 80, 80), aspect=0.5)
    x, y, w, h = box
    assert x + w == 1000 and not padded and fraction == 1.0
    assert inside((900, 400, 80, 80), box)


def test_plan_crop_shrinks_when_the_photo_is_small():
    box, fraction, padded = plan_crop((300, 220), (100, 40, 80, 80), aspect=W / H)
    x, y, w, h = box
    assert h == 220 and w == round(220 * W / H)  # the largest crop of the aspect that fits
    assert fraction < 1 and not padded
    assert inside((100, 40, 80, 80), box) and inside(box, (0, 0, 300, 220))


def test_plan_crop_pads_only_as_a_last_resort(tmp_path, astronaut):
    box, fraction, padded = plan_crop((120, 110), (15, 9, 90, 90), aspect=W / H)
    # The face (90 px wide) plus margin needs a crop 113 px wide, so 206 px tall at this aspect.
    assert padded and box[3] > 110 and inside((15, 9, 90, 90), box)
    tight = astronaut[60:170, 165:285]  # the face fills this photo
    p = prepare_portrait(save(tmp_path / "tight.png", tight), height=H, width=W)
    assert p.image.shape == (H, W, 3)
    assert any("padded" in w for w in p.warnings)
    assert inside(p.face_box, (0, 0, W, H))


def test_suppress_overlaps_keeps_the_largest_of_nested_boxes():
    boxes = [(10, 10, 100, 100), (30, 30, 40, 40), (300, 10, 60, 60), (15, 12, 96, 96)]
    assert suppress_overlaps(boxes) == [(10, 10, 100, 100), (300, 10, 60, 60)]
