"""Portrait stage: one photo in, one RGB crop around the face at the engine's output size out.

Steps: decode (Pillow), apply the EXIF orientation, convert any colour mode to 8-bit sRGB, find faces
with OpenCV's Haar cascades, plan a head-and-shoulders crop of the output's aspect ratio around the
largest face, crop (padding by reflection only when nothing else fits) and resize. docs/inputs.md
explains the framing rules and every warning and error.
"""

from __future__ import annotations

import io
import math
import os
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from .errors import InputError

# Phones save HEIC; Pillow reads it through pillow-heif (libheif). AVIF and WebP are Pillow's own.
register_heif_opener()

# Framing. A Haar face box spans roughly brows to lower lip, and the eyes sit about 38% down it.
EYE_LINE = 0.38
# Head-and-shoulders: the crop is the smallest of the output's aspect that is at least this many face
# heights tall (eyes on the upper third leave ~1 face height above them for hair, ~2 below for chin,
# neck and shoulders) and this many face widths wide (room for the shoulders).
FRAME_FACE_HEIGHTS = 3.2
FRAME_FACE_WIDTHS = 2.5
# When the photo is too small for that framing, the crop may shrink down to the face box plus this
# margin; below that the crop is padded by edge reflection. Shrinking below SHRUNK_WARN of the
# framing's size is worth a warning (the face then fills visibly more of the frame).
MIN_FACE_MARGIN = 1.25
SHRUNK_WARN = 0.8
# Upscaling the crop more than this to reach the output size gives visibly soft frames: warn.
MAX_UPSCALE = 2.0

# Detection runs on a copy whose long side is at most this (time grows with pixels; ~1 s at 1024 px).
DETECT_MAX_SIDE = 1024
# Smallest face the cascades can report, in detection pixels (their training window is 20-24 px).
DETECT_MIN_PX = 24
# Cascades in order of precision. A later one is consulted only when the earlier ones found nothing:
# each adds misses' recall but also false positives on textured backgrounds (flags, foliage).
_CASCADES = (
    ("haarcascade_frontalface_alt2.xml", 4, False),
    ("haarcascade_frontalface_default.xml", 6, False),
    ("haarcascade_profileface.xml", 5, True),  # trained on one side; run mirrored too
)

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class Portrait:
    """A prepared portrait. Geometry is in the upright (EXIF-applied) source or in output pixels."""

    image: np.ndarray  # uint8 [height, width, 3] RGB
    face_box: Box  # the face in output pixels
    faces_found: int
    source_size: tuple[int, int]  # (w, h) of the upright source image
    crop_box: Box  # the crop in source pixels; it reaches outside the image only when padded
    warnings: list[str] = field(default_factory=list)


class CropPlan(NamedTuple):
    box: Box  # x, y, w, h in source pixels
    fraction: float  # crop size / head-and-shoulders framing size (< 1: the photo is too small for it)
    padded: bool  # reaches outside the image (edge reflection fills the rest)


def prepare_portrait(
    path: str | os.PathLike[str] | bytes,
    *,
    height: int,
    width: int,
    subject: str | None = None,
    min_face_px: int = 64,
) -> Portrait:
    """Find the largest face in the photo at `path` (or in encoded image bytes) and crop around it.

    Raises InputError naming `subject` (default: the path) when the file is missing or unreadable,
    is not an image, shows no face, or its face is under `min_face_px` source pixels wide.
    """
    if height < 1 or width < 1:
        raise InputError("portrait size", f"height and width must be positive, got {height}x{width}")
    subject = subject or ("image bytes" if isinstance(path, bytes) else os.fsdecode(path))
    warnings: list[str] = []
    rgb = load_rgb(path, subject, warnings)
    src_h, src_w = rgb.shape[:2]

    faces, min_visible = detect_faces(rgb)
    if not faces:
        raise InputError(
            subject,
            f"no face found; use a well-lit, front-facing photo in which the face is at least "
            f"{max(min_face_px, min_visible)} px wide",
        )
    face = max(faces, key=lambda b: b[2] * b[3])
    if len(faces) > 1:
        x, y, w, h = face
        warnings.append(f"found {len(faces)} faces; used the largest ({w}x{h} px at x={x}, y={y})")
    if face[2] < min_face_px:
        raise InputError(
            subject,
            f"the face is {face[2]} px wide, under the {min_face_px} px needed to animate the lips; "
            f"use a higher-resolution photo",
        )

    plan = plan_crop((src_w, src_h), face, aspect=width / height)
    scale = width / plan.box[2]  # output px per source px (the crop has the output's aspect)
    warnings += _framing_warnings(plan, scale, width, height)
    # INTER_AREA averages when shrinking (no aliasing); cubic interpolates when enlarging.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    image = cv2.resize(_cut(rgb, plan.box), (width, height), interpolation=interp)
    return Portrait(
        image=np.ascontiguousarray(image),
        face_box=_to_output(face, plan.box, width, height),
        faces_found=len(faces),
        source_size=(src_w, src_h),
        crop_box=plan.box,
        warnings=warnings,
    )


def _framing_warnings(plan: CropPlan, scale: float, width: int, height: int) -> list[str]:
    warnings = []
    if plan.padded:
        warnings.append("the photo is too tight around the face; the crop was padded by mirroring its edges")
    elif plan.fraction < SHRUNK_WARN:
        warnings.append("the photo is too small for a head-and-shoulders framing; the face fills more of it")
    if scale > MAX_UPSCALE:
        cw, ch = plan.box[2:]
        warnings.append(
            f"the {cw}x{ch} px crop is enlarged {scale:.1f}x to {width}x{height}; frames will look soft "
            f"(use a higher-resolution photo)"
        )
    return warnings


def _to_output(face: Box, crop: Box, width: int, height: int) -> Box:
    """A source box in output pixels of `crop` resized to width x height, clipped to the frame."""
    sx, sy = width / crop[2], height / crop[3]
    x0 = max(0, round((face[0] - crop[0]) * sx))
    y0 = max(0, round((face[1] - crop[1]) * sy))
    x1 = min(width, round((face[0] + face[2] - crop[0]) * sx))
    y1 = min(height, round((face[1] + face[3] - crop[1]) * sy))
    return x0, y0, x1 - x0, y1 - y0


def load_rgb(path: str | os.PathLike[str] | bytes, subject: str, warnings: list[str]) -> np.ndarray:
    """Decode an image file to upright uint8 RGB [H, W, 3]; notes what it changed in `warnings`."""
    try:
        source = io.BytesIO(path) if isinstance(path, bytes) else path
        with Image.open(source) as im:
            frames = getattr(im, "n_frames", 1)
            im.load()
            upright = _upright(im, warnings)
            rgb = _to_rgb(upright, subject, warnings)
    except FileNotFoundError:
        raise InputError(subject, "does not exist") from None
    except IsADirectoryError:
        raise InputError(subject, "is a directory, not an image file") from None
    except PermissionError:
        raise InputError(subject, "cannot be read (permission denied)") from None
    except UnidentifiedImageError:
        raise InputError(
            subject, "is not an image Pillow can read (use JPEG, PNG, WebP, HEIC or AVIF)"
        ) from None
    except Image.DecompressionBombError:
        raise InputError(
            subject, "has more pixels than Pillow's safety limit allows; resize it under 50 megapixels"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        raise InputError(subject, f"is damaged or truncated ({exc})") from None
    if frames > 1:
        warnings.append(f"the image has {frames} frames; the first was used")
    return rgb


def _upright(im: Image.Image, warnings: list[str]) -> Image.Image:
    """Apply the EXIF Orientation tag (phones store pixels sideways and set the tag)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # EXIF parsers raise many types on malformed tags; the pixels are still fine
        warnings.append("the EXIF orientation could not be read; the image was used as stored")
        return im


def _to_rgb(im: Image.Image, subject: str, warnings: list[str]) -> np.ndarray:
    """Any Pillow mode to 8-bit sRGB: ICC profiles applied, alpha composited on white, 16-bit scaled."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # High bit-depth grayscale: Pillow's own convert clips at 255, so scale by the type's range.
        values = np.asarray(im, dtype=np.float64)
        peak = values.max(initial=0.0)
        top = 1.0 if im.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
        gray = np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))

    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            warnings.append("the image has transparent areas; they were filled with white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))

    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "CMYK", "L"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return np.asarray(ImageCms.profileToProfile(im, profile, srgb, outputMode="RGB"))
        except (ImageCms.PyCMSError, OSError, ValueError):
            warnings.append("the embedded colour profile could not be applied; colours may be off")
    try:
        return np.asarray(im.convert("RGB"))
    except ValueError:
        raise InputError(subject, f"has colour mode {im.mode}, which cannot be converted to RGB") from None


def detect_faces(rgb: np.ndarray) -> tuple[list[Box], int]:
    """Faces in an RGB image as (x, y, w, h) source boxes, and the smallest face width findable.

    Runs the cascades in `_CASCADES` order on a downscaled, histogram-equalised gray copy and stops at
    the first that finds anything; overlapping boxes are merged (non-maximum suppression).
    """
    h, w = rgb.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    min_visible = math.ceil(DETECT_MIN_PX / scale)
    for cascade, neighbours, mirrored in _CASCADES:
        boxes = _run_cascade(_classifier(cascade), gray, neighbours, mirrored)
        if boxes:
            return [_to_source(b, scale, w, h) for b in suppress_overlaps(boxes)], min_visible
    return [], min_visible


def _run_cascade(clf: cv2.CascadeClassifier, gray: np.ndarray, neighbours: int, mirrored: bool) -> list[Box]:
    found = _detect(clf, gray, neighbours)
    if mirrored:
        gw = gray.shape[1]
        found += [(gw - x - bw, y, bw, bh) for x, y, bw, bh in _detect(clf, cv2.flip(gray, 1), neighbours)]
    return found


def _detect(clf: cv2.CascadeClassifier, gray: np.ndarray, neighbours: int) -> list[Box]:
    boxes = clf.detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=neighbours, minSize=(DETECT_MIN_PX, DETECT_MIN_PX)
    )
    return [(int(x), int(y), int(w), int(h)) for x, y, w, h in boxes]


def suppress_overlaps(boxes: list[Box], threshold: float = 0.5) -> list[Box]:
    """Keep the largest of boxes that overlap: drop a box when over `threshold` of the smaller one's
    area lies inside a kept box (nested detections of one face, or a face found twice)."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[2] * b[3], reverse=True):
        if all(_overlap(box, k) <= threshold * box[2] * box[3] for k in kept):
            kept.append(box)
    return kept


def _overlap(a: Box, b: Box) -> int:
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, dx) * max(0, dy)


def _to_source(box: Box, scale: float, w: int, h: int) -> Box:
    x, y, bw, bh = (round(v / scale) for v in box)
    x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
    return x, y, min(bw, w - x), min(bh, h - y)


_local = threading.local()  # CascadeClassifier is not thread-safe: one set per thread


def _classifier(name: str) -> cv2.CascadeClassifier:
    cache: dict[str, cv2.CascadeClassifier] = _local.__dict__.setdefault("cascades", {})
    if name not in cache:
        if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 dropped the Haar API
            raise RuntimeError(
                f"OpenCV {cv2.__version__} has no Haar cascades; install opencv-python-headless 4.x"
            )
        clf = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, name))
        if clf.empty():
            raise RuntimeError(f"OpenCV cascade {name} is missing; install opencv-python-headless 4.x")
        cache[name] = clf
    return cache[name]


def plan_crop(image_size: tuple[int, int], face: Box, *, aspect: float) -> CropPlan:
    """The crop (x, y, w, h) of width/height `aspect` around `face` in an image of (w, h) pixels.

    Head-and-shoulders framing, face centred horizontally, eyes on the upper third; shifted to stay
    inside the image; shrunk (keeping the face plus margin) when the image is too small; padded only
    when even the face plus margin does not fit.
    """
    img_w, img_h = image_size
    fx, fy, fw, fh = face
    framing = max(FRAME_FACE_HEIGHTS * fh, FRAME_FACE_WIDTHS * fw / aspect)  # crop height
    fit = min(1.0, img_w / (framing * aspect), img_h / framing)
    ch = max(framing * fit, MIN_FACE_MARGIN * fh, MIN_FACE_MARGIN * fw / aspect)
    cw = ch * aspect
    w, h = max(1, round(cw)), max(1, round(ch))
    # Centre the face horizontally and put the eyes on the upper third, then shift inside the image.
    # Where the crop is larger than the image (padding), it covers the whole image in that direction.
    x = _clamp(round(fx + fw / 2 - w / 2), img_w - w)
    y = _clamp(round(fy + EYE_LINE * fh - h / 3), img_h - h)
    padded = w > img_w or h > img_h
    return CropPlan((x, y, w, h), ch / framing, padded)


def _clamp(start: int, slack: int) -> int:
    """Keep [start, start+size) inside [0, image) when slack = image - size >= 0, else cover it."""
    return min(max(start, min(0, slack)), max(0, slack))


def _cut(rgb: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of `box`, mirroring the image's edges where the box reaches outside it."""
    x, y, w, h = box
    img_h, img_w = rgb.shape[:2]
    pad = (max(0, -y), max(0, y + h - img_h), max(0, -x), max(0, x + w - img_w))
    if any(pad):
        top, bottom, left, right = pad
        # numpy's "reflect" repeats the mirror when the pad is wider than the image.
        rgb = np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="reflect")
        x, y = x + left, y + top
    return rgb[y : y + h, x : x + w]


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 [H, W, 3] RGB image (deterministic for equal pixels)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
