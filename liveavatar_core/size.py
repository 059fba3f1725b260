"""Output size: `auto` (an area budget shaped like the portrait) or an exact `WIDTHxHEIGHT`.

`auto` follows the reference implementation, which reads its `--size 704*384` as an area budget and
gives the video the portrait's aspect ratio: a landscape photo gives 704 wide x 384 high, a portrait
photo 384 wide x 704 high, a square one 512 x 512. Sides are multiples of 64 (LiveAvatar's latent grid)
and the area never exceeds 704 x 384 pixels. `WIDTHxHEIGHT` (width first, as video tools write it)
asks for exactly that size; the portrait is cropped around the face to its shape.
"""

from __future__ import annotations

import math
import os
import re

from PIL import Image, UnidentifiedImageError

AUTO = "auto"
AREA_BUDGET = 704 * 384  # the model's own size, in pixels
AUTO_MULTIPLE = 64  # LiveAvatar's sides are multiples of 64 (VAE stride 8 x patch 2 x 4)
SIDE_MULTIPLE = 16  # the smallest step any engine takes
MIN_SIDE, MAX_SIDE = 64, 2048
LANDSCAPE = 704 / 384  # the shape `auto` takes when no portrait is known yet (a worker's warm-up)

_EXACT = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$", re.IGNORECASE)
# The same check as a JSON-schema pattern (the Prefect form refuses other shapes at submission).
PATTERN = r"^(auto|[0-9]{2,4}[xX][0-9]{2,4})$"


def normalise(text: str) -> str:
    """`auto` or `WIDTHxHEIGHT` in canonical form; ValueError saying what is wrong otherwise."""
    value = str(text).strip().lower()
    if value == AUTO:
        return AUTO
    match = _EXACT.match(value)
    if not match:
        raise ValueError(f"{text!r} is not a size: write auto, or WIDTHxHEIGHT in pixels such as 704x384")
    width, height = int(match.group(1)), int(match.group(2))
    size = f"{width}x{height}"
    for name, side in (("width", width), ("height", height)):
        if side % SIDE_MULTIPLE:
            raise ValueError(
                f"{size} has {name} {side}, not a multiple of {SIDE_MULTIPLE} (try "
                f"{_nearest(width)}x{_nearest(height)}; liveavatar needs multiples of {AUTO_MULTIPLE})"
            )
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"{size} has {name} {side}, outside {MIN_SIDE}-{MAX_SIDE} pixels")
    return size


def resolve(size: str, aspect: float | None = None) -> tuple[int, int]:
    """(width, height) in pixels for a normalised size; `aspect` is the portrait's width / height."""
    if size != AUTO:
        width, height = size.split("x")
        return int(width), int(height)
    return area_shape(AREA_BUDGET, aspect if aspect and aspect > 0 else LANDSCAPE)


def area_shape(area: int, aspect: float, multiple: int = AUTO_MULTIPLE) -> tuple[int, int]:
    """The (width, height), multiples of `multiple`, of at most `area` pixels, nearest to `aspect`.

    Candidates are the multiples just below and above the exact shape (sqrt(area*aspect),
    sqrt(area/aspect)); of those that fit the area, the one whose aspect is nearest (in log ratio)
    wins, the larger one on a tie.
    """
    exact_w, exact_h = math.sqrt(area * aspect), math.sqrt(area / aspect)

    def around(x: float) -> set[int]:
        low = max(multiple, math.floor(x / multiple) * multiple)
        return {min(low, MAX_SIDE), min(low + multiple, MAX_SIDE)}

    fits = [(w, h) for w in around(exact_w) for h in around(exact_h) if w * h <= area]
    if not fits:  # an extreme aspect: the narrow side is already the smallest step
        fits = [(multiple, multiple)]
    return min(fits, key=lambda s: (abs(math.log(s[0] / s[1] / aspect)), -s[0] * s[1]))


def image_aspect(path: str | os.PathLike[str]) -> float | None:
    """Width / height of an image file as it is viewed (EXIF rotation applied); None if unreadable."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # orientation: rotated a quarter turn
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return height / width if turned else width / height


def _nearest(side: int) -> int:
    return min(MAX_SIDE, max(MIN_SIDE, round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE))
