"""Storage URLs: parse, classify and join (pure functions, no I/O).

A URL is one of: a local path (`out/video.mp4`, `/data/in.mp3`), a `file://` URL
(`file:///data/in.mp3`) or an S3 URL (`s3://bucket/key`). S3 keys are taken literally (no
percent-decoding, as the AWS CLI does); `file://` paths are percent-decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from liveavatar_core.errors import InputError

S3_SCHEME = "s3"
FILE_SCHEME = "file"


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (the key may be empty or end with '/' for a prefix)."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def scheme(url: str) -> str:
    """'s3', 'file', or '' for a plain path; raises InputError for any other scheme."""
    head, sep, _ = str(url).partition("://")
    if not sep:
        return ""
    name = head.lower()
    if name in (S3_SCHEME, FILE_SCHEME):
        return name
    raise InputError(str(url), f"unsupported URL scheme '{head}://'; use a local path, file:// or s3://")


def is_remote(url: str | os.PathLike[str]) -> bool:
    """True for an S3 URL, False for a local path or file:// URL."""
    return scheme(os.fspath(url)) == S3_SCHEME


def parse_s3(url: str) -> S3Location:
    """Split `s3://bucket/key` into bucket and key; raises InputError when there is no bucket."""
    if scheme(url) != S3_SCHEME:
        raise InputError(url, "not an s3:// URL")
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(url, "S3 URL has no bucket; expected s3://bucket/key")
    return S3Location(bucket, key)


def local_path(url: str | os.PathLike[str]) -> Path:
    """The filesystem path of a local path or file:// URL (`~` expanded)."""
    text = os.fspath(url)
    kind = scheme(text)
    if kind == S3_SCHEME:
        raise InputError(text, "expected a local path, got an s3:// URL")
    if kind == FILE_SCHEME:
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise InputError(text, f"file:// URLs on another host ('{parts.netloc}') are not supported")
        return Path(unquote(parts.path))
    return Path(text).expanduser()


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Append path parts to a URL, keeping its kind: `join("s3://b/out", "a.mp4")` is `s3://b/out/a.mp4`.

    Parts may contain '/', but not '..' components and not start with '/'.
    """
    text = os.fspath(base)
    clean = [_clean_part(p) for p in parts]
    clean = [p for p in clean if p]
    if not clean:
        return text
    kind = scheme(text)
    if kind == S3_SCHEME:
        parse_s3(text)  # validates the bucket
        return text.rstrip("/") + "/" + "/".join(clean)
    if kind == FILE_SCHEME:
        return text.rstrip("/") + "/" + "/".join(quote(p) for p in clean)
    return os.path.join(text, *clean)


def _clean_part(part: str) -> str:
    if part.startswith("/"):
        raise ValueError(f"join: part {part!r} is absolute; parts must be relative")
    pieces = [p for p in part.split("/") if p not in ("", ".")]
    if ".." in pieces:
        raise ValueError(f"join: part {part!r} contains '..'")
    return "/".join(pieces)
