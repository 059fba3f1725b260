"""Choose the output size: an exact WIDTHxHEIGHT as asked, or "auto" shaped like the portrait."""

from __future__ import annotations

from prefect import task

from liveavatar_core import size as output_size
from liveavatar_core import storage
from liveavatar_core.engines import GenerationConfig

from .common import TRANSIENT_RETRIES
from .models import StagedFile


@task(name="choose-size", **TRANSIENT_RETRIES)
def choose_size(image: StagedFile, size: str, precision: str) -> GenerationConfig:
    """The generation config for `size` ("auto" follows the portrait's aspect ratio) and `precision`."""
    aspect = None
    if size == output_size.AUTO:
        with storage.local_file(image.url) as path:
            aspect = output_size.image_aspect(path)
    return GenerationConfig.for_output(size, precision, aspect)
