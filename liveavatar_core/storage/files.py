"""Read, write, copy, hash, list and delete by URL (local path, file:// or s3://)."""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from liveavatar_core.errors import InputError, NotFound, StorageError
from liveavatar_core.storage import s3
from liveavatar_core.storage._local import (
    COPY_BUFFER,
    atomic_copy,
    atomic_write,
    is_temp_name,
    local_errors,
    temp_name,
)
from liveavatar_core.storage.urls import S3Location, is_remote, join, local_path, parse_s3

PathLike = str | os.PathLike[str]


def object_location(url: str) -> S3Location:
    """Bucket and key of an S3 URL that names an object (not a bucket or a folder)."""
    loc = parse_s3(url)
    if not loc.key or loc.key.endswith("/"):
        raise InputError(url, "names a folder (prefix); expected an object such as s3://bucket/dir/file")
    return loc


def _extra_args(key: str) -> dict[str, str]:
    kind, _ = mimetypes.guess_type(key)
    return {"ContentType": kind or "application/octet-stream"}


def _head(url: str) -> dict[str, Any] | None:
    """HeadObject's answer, or None when the object does not exist."""
    loc = object_location(url)
    try:
        with s3.translated(url):
            return s3.client().head_object(Bucket=loc.bucket, Key=loc.key)
    except NotFound:
        return None


def exists(url: PathLike) -> bool:
    """True when a file (local) or an object (S3) is at `url`; folders and prefixes are not files."""
    url = os.fspath(url)
    if is_remote(url):
        return _head(url) is not None
    return local_path(url).is_file()


def size(url: PathLike) -> int:
    """Size in bytes of the file or object at `url`."""
    url = os.fspath(url)
    if is_remote(url):
        head = _head(url)
        if head is None:
            raise NotFound(url, "no such object")
        return int(head["ContentLength"])
    with local_errors(url):
        path = local_path(url)
        if path.is_dir():
            raise IsADirectoryError(str(path))
        return path.stat().st_size


def read_bytes(url: PathLike) -> bytes:
    """The whole content of `url` (meant for small files: JSON, text, thumbnails)."""
    url = os.fspath(url)
    if is_remote(url):
        loc = object_location(url)
        with s3.translated(url):
            body = s3.client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            with body:
                return body.read()
    with local_errors(url):
        return local_path(url).read_bytes()


def write_bytes(url: PathLike, data: bytes) -> None:
    """Create or replace `url` atomically: readers see the old content or the new, never a part."""
    url = os.fspath(url)
    if is_remote(url):
        loc = object_location(url)
        s = s3.settings()
        with s3.translated(url):
            s3.client(s).upload_fileobj(
                io.BytesIO(data),
                loc.bucket,
                loc.key,
                ExtraArgs=_extra_args(loc.key),
                Config=s3.transfer_config(s),
            )
        return
    with local_errors(url):
        atomic_write(local_path(url), lambda fh: fh.write(data))


def read_text(url: PathLike) -> str:
    """The content of `url` decoded as UTF-8."""
    raw = read_bytes(url)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(os.fspath(url), f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def write_text(url: PathLike, text: str) -> None:
    """Write `text` as UTF-8, atomically."""
    write_bytes(url, text.encode("utf-8"))


def read_json(url: PathLike) -> Any:
    """Parse the JSON document at `url`."""
    text = read_text(url)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(os.fspath(url), f"is not valid JSON ({exc.msg}, line {exc.lineno})") from exc


def write_json(url: PathLike, value: Any, *, indent: int = 2) -> None:
    """Write `value` as UTF-8 JSON (keys in insertion order, trailing newline), atomically."""
    write_text(url, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def download(url: PathLike, dest: PathLike) -> Path:
    """Copy `url` to the local file `dest` (made atomically, parents created); returns `dest`."""
    url = os.fspath(url)
    target = Path(dest)
    if not is_remote(url):
        with local_errors(url):
            atomic_copy(local_path(url), target)
        return target
    loc = object_location(url)
    s = s3.settings()
    tmp = temp_name(target)
    try:
        with local_errors(str(target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            with s3.translated(url):
                s3.client(s).download_file(loc.bucket, loc.key, str(tmp), Config=s3.transfer_config(s))
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def upload(src: PathLike, url: PathLike) -> None:
    """Copy the local file `src` to `url`: one PUT, or a multipart upload above the threshold."""
    url = os.fspath(url)
    source = Path(src)
    if not source.is_file():
        raise NotFound(str(source), "no such file to upload" if not source.exists() else "is not a file")
    if not is_remote(url):
        with local_errors(url):
            atomic_copy(source, local_path(url))
        return
    loc = object_location(url)
    s = s3.settings()
    with local_errors(str(source)), s3.translated(url):
        s3.client(s).upload_file(
            str(source), loc.bucket, loc.key, ExtraArgs=_extra_args(loc.key), Config=s3.transfer_config(s)
        )


@contextmanager
def local_file(url: PathLike) -> Iterator[Path]:
    """A local path to read `url` from: the file itself, or a temporary download removed afterwards."""
    url = os.fspath(url)
    if not is_remote(url):
        path = local_path(url)
        if path.is_dir():
            raise StorageError(url, "is a folder; expected a file")
        if not path.exists():
            raise NotFound(url, "no such file")
        if not path.is_file():
            raise StorageError(url, "is not a regular file")
        yield path
        return
    name = Path(object_location(url).key).name
    with tempfile.TemporaryDirectory(prefix="liveavatar-") as tmp:
        yield download(url, Path(tmp) / name)


def sha256(url: PathLike) -> str:
    """Hex SHA-256 of the content at `url`, read in a stream (never whole in memory)."""
    url = os.fspath(url)
    digest = hashlib.sha256()
    if is_remote(url):
        loc = object_location(url)
        with s3.translated(url):
            body = s3.client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            with body:
                for chunk in body.iter_chunks(COPY_BUFFER):
                    digest.update(chunk)
        return digest.hexdigest()
    with local_errors(url), open(local_path(url), "rb") as fh:
        while chunk := fh.read(COPY_BUFFER):
            digest.update(chunk)
    return digest.hexdigest()


def list_prefix(url: PathLike) -> list[str]:
    """URLs of every file under the folder or prefix `url`, recursively, sorted; [] when there is none.

    Local listings leave out the hidden temporary files of writes in progress.
    """
    url = os.fspath(url)
    if is_remote(url):
        loc = parse_s3(url)
        prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
        found: list[str] = []
        with s3.translated(url):
            pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
            for page in pages:
                found.extend(f"s3://{loc.bucket}/{item['Key']}" for item in page.get("Contents", []))
        return sorted(found)
    root = local_path(url)
    if not root.is_dir():
        return []
    with local_errors(url):
        rel = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not is_temp_name(p.name)
        )
    return [join(url, r) for r in rel]


def delete(url: PathLike) -> None:
    """Remove the file or object at `url`; a missing one is not an error (delete is idempotent)."""
    url = os.fspath(url)
    if is_remote(url):
        loc = object_location(url)
        with s3.translated(url):
            s3.client().delete_object(Bucket=loc.bucket, Key=loc.key)
        return
    with local_errors(url):
        local_path(url).unlink(missing_ok=True)


__all__ = [
    "delete",
    "download",
    "exists",
    "list_prefix",
    "local_file",
    "object_location",
    "read_bytes",
    "read_json",
    "read_text",
    "sha256",
    "size",
    "upload",
    "write_bytes",
    "write_json",
    "write_text",
]
