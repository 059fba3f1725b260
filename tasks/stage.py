"""Stage: check the destination, then copy inputs into the work store under their content hash."""

from __future__ import annotations

from pathlib import PurePosixPath

from prefect import task

from liveavatar_core import storage
from liveavatar_core.keys import sha256_file

from .common import TRANSIENT_RETRIES
from .models import StagedFile


@task(name="check-destination", **TRANSIENT_RETRIES)
def check_destination(out: str) -> None:
    """Fail before any work if DEST cannot be written (nothing is created there)."""
    storage.check_destination(out, subject=f"--out {out}")


@task(name="stage-input", **TRANSIENT_RETRIES)
def stage_input(source: str, flag: str, work: str) -> StagedFile:
    """Copy `source` to `{work}/inputs/{sha256}{ext}` (once: the copy is content-addressed)."""
    subject = f"{flag} {source}"
    storage.check_readable(source, subject=subject)
    suffix = PurePosixPath(source.split("?")[0]).suffix.lower()
    with storage.local_file(source) as path:
        sha = sha256_file(path)
        url = storage.join(work, "inputs", f"{sha}{suffix}")
        if not storage.exists(url):
            storage.upload(path, url)
    return StagedFile(source=source, url=url, sha256=sha)
