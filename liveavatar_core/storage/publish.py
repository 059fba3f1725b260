"""Atomic publish: a destination folder holds a complete set of outputs, or no manifest.json.

`manifest.json` is the completion marker: readers treat a folder without it as not (yet) published.
So publishing (1) removes an older manifest.json first, so a folder being replaced never looks
complete, (2) writes every other file, each atomically (local: hidden temp file + os.replace; S3: one
PUT or one completed multipart upload per object), and (3) writes manifest.json last. If any step
fails, what this call wrote is removed (best effort) and the error is raised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from liveavatar_core.errors import NotFound
from liveavatar_core.storage._local import fsync_dir
from liveavatar_core.storage.files import delete, upload
from liveavatar_core.storage.urls import is_remote, join, local_path

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)

Item = tuple[str, str | os.PathLike[str]]


def publish(files: Sequence[Item], dest_prefix: str | os.PathLike[str]) -> list[str]:
    """Publish local files under `dest_prefix`; returns the URLs written, manifest.json last.

    `files` pairs a relative name under the destination ('video.mp4', 'thumbs/0.jpg') with a local
    path. Exactly one name must be 'manifest.json'; it is written last wherever it appears.
    """
    items = _ordered(files)
    for _, path in items:
        if not Path(path).is_file():
            raise NotFound(str(path), "no such file to publish")
    dest_prefix = os.fspath(dest_prefix)
    delete(join(dest_prefix, MANIFEST))
    written: list[str] = []
    try:
        for name, path in items:
            url = join(dest_prefix, name)
            if name == MANIFEST and not is_remote(dest_prefix):
                _sync_folders(written)  # the other files' renames are durable before the marker's
            written.append(url)  # before the write: a write that landed but then errored is cleaned too
            upload(path, url)
    except BaseException:
        _remove_quietly(written)
        raise
    if not is_remote(dest_prefix):
        _sync_folders(written[-1:])
    log.info("published %d files to %s", len(written), dest_prefix)
    return written


def _ordered(files: Sequence[Item]) -> list[Item]:
    names = [name for name, _ in files]
    for name in names:
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"publish: {name!r} is not a plain relative name like 'video.mp4' or 'a/b.jpg'")
    if len(set(names)) != len(names):
        raise ValueError(f"publish: duplicate names in {names}")
    if names.count(MANIFEST) != 1:
        raise ValueError(f"publish: the files must include exactly one {MANIFEST!r}")
    return [item for item in files if item[0] != MANIFEST] + [item for item in files if item[0] == MANIFEST]


def _sync_folders(urls: list[str]) -> None:
    for folder in {local_path(u).parent for u in urls}:
        fsync_dir(folder)


def _remove_quietly(urls: list[str]) -> None:
    # Newest first, so a manifest that landed goes before anything else.
    for url in reversed(urls):
        try:
            delete(url)
        except Exception:  # noqa: BLE001 - cleanup must not hide the original failure
            log.warning("could not remove %s after a failed publish", url)
