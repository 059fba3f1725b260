"""Up-front checks of inputs and destinations, so a run fails in seconds, not after the GPU work.

`check_readable` and `check_destination` raise InputError(subject, problem) for a problem the user
must fix, and let TransientStorageError through (a network fault is not the user's input; the caller
may retry). `preflight` runs them before anything heavy starts (the CLI, before any Prefect server):
quick, one try with a short timeout, and an S3 endpoint it cannot reach is the user's to fix. None
creates anything.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from liveavatar_core.errors import AccessDenied, InputError, NotFound, StorageError, TransientStorageError
from liveavatar_core.storage import s3
from liveavatar_core.storage.files import object_location
from liveavatar_core.storage.urls import is_remote, local_path, parse_s3

PREFLIGHT_TIMEOUT_S = 3.0  # connect and read timeout of the up-front S3 checks (one attempt each)


def preflight(inputs: Sequence[tuple[str, str]], destinations: Sequence[tuple[str, str]]) -> None:
    """Check `(flag, url)` inputs are readable files and destinations writable, in a second or two.

    Raises InputError naming the flag and URL of the first problem: a missing or unreadable file, a
    malformed URL, no S3 credentials, an S3 endpoint that does not answer within PREFLIGHT_TIMEOUT_S.
    """
    quick = None
    for flag, url in [*inputs, *destinations]:
        with _named(f"{flag} {url}"):
            remote = is_remote(url) and bool(parse_s3(url))
        if remote and quick is None:
            quick = _quick_s3_settings(f"{flag} {url}")
    with _quick_s3(quick):
        for flag, url in inputs:
            _preflight_one(check_readable, url, f"{flag} {url}")
        for flag, url in destinations:
            _preflight_one(check_destination, url, f"{flag} {url}")


def _preflight_one(check, url: str, subject: str) -> None:
    try:
        check(url, subject)
    except TransientStorageError:
        s = s3.settings()
        raise InputError(
            subject,
            f"{s.endpoint_label} did not answer within {PREFLIGHT_TIMEOUT_S:.0f} s; check the endpoint "
            "(AWS_ENDPOINT_URL) and the network",
        ) from None


def _quick_s3_settings(subject: str) -> s3.S3Settings:
    """The environment's S3 settings with one attempt and short timeouts; InputError without credentials."""
    current = s3.settings()
    try:
        found = s3.has_credentials(current)
    except Exception as exc:  # botocore's own wording: a missing profile, a malformed config file
        raise InputError(subject, f"AWS credentials: {exc}") from None
    if not found:
        raise InputError(
            subject,
            "no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
        )
    return dataclasses.replace(
        current, max_attempts=1, connect_timeout=PREFLIGHT_TIMEOUT_S, read_timeout=PREFLIGHT_TIMEOUT_S
    )


@contextmanager
def _quick_s3(settings: s3.S3Settings | None) -> Iterator[None]:
    """Inside the block, `s3.client()` and error messages use `settings` (when given)."""
    if settings is None:
        yield
        return
    with s3.overridden(settings):
        yield


def check_readable(url: str | os.PathLike[str], subject: str) -> None:
    """Raise InputError unless `url` is an existing, readable file or object."""
    url = os.fspath(url)
    with _named(subject):
        if is_remote(url):
            _check_s3_readable(url)
        else:
            _check_local_readable(local_path(url))


def check_destination(url: str | os.PathLike[str], subject: str) -> None:
    """Raise InputError unless outputs can be written under the folder or prefix `url`.

    Local: the folder, or its nearest existing ancestor, takes a probe file (created and removed at once).
    S3: the bucket exists and the credentials may list it (S3 write permission shows only on writing).
    """
    url = os.fspath(url)
    with _named(subject):
        if is_remote(url):
            _check_s3_destination(url)
        else:
            _check_local_destination(local_path(url))


@contextmanager
def _named(subject: str) -> Iterator[None]:
    """A storage problem with a user input becomes InputError(subject); transient faults pass through."""
    try:
        yield
    except TransientStorageError:
        raise
    except StorageError as err:
        raise InputError(subject, err.problem) from None
    except InputError as err:
        raise err.relabel(subject) from None


def _check_local_readable(path: Path) -> None:
    label = str(path)
    if not path.exists():
        raise NotFound(label, f"no such file: {path}")
    if path.is_dir():
        raise StorageError(label, "is a folder; expected a file")
    if not path.is_file():
        raise StorageError(label, "is not a regular file (a device, pipe or socket?)")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise AccessDenied(label, "the file is not readable (permission denied)") from None
    except OSError as exc:
        raise StorageError(label, f"the file cannot be read: {exc.strerror or exc}") from None


def _check_local_destination(path: Path) -> None:
    label = str(path)
    if path.exists():
        if not path.is_dir():
            raise StorageError(label, "is a file; expected a folder for the outputs")
        if not os.access(path, os.W_OK | os.X_OK) or not _can_create_in(path):
            raise AccessDenied(label, f"the folder {path} is not writable")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StorageError(label, f"cannot create it: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK) or not _can_create_in(ancestor):
        raise AccessDenied(label, f"cannot create it: {ancestor} is not writable")


def _can_create_in(folder: Path) -> bool:
    """Really try: permission bits say nothing for root, read-only mounts or pseudo filesystems."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".liveavatar-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _check_s3_readable(url: str) -> None:
    loc = object_location(url)
    client = s3.client()
    try:
        with s3.translated(url):
            client.head_object(Bucket=loc.bucket, Key=loc.key)
        return
    except AccessDenied as err:
        # Without s3:ListBucket, S3 answers 403 for a missing object too.
        raise AccessDenied(
            url, err.problem + " (or the object does not exist and they may not list it)"
        ) from None
    except NotFound:
        pass
    # HeadObject's 404 does not say whether the bucket or the object is missing: ask.
    with s3.translated(url):
        listing = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key.rstrip("/") + "/", MaxKeys=1)
    if listing.get("KeyCount", 0):
        raise StorageError(url, "is a folder (prefix); expected an object")
    raise NotFound(url, "no such object")


def _check_s3_destination(url: str) -> None:
    loc = parse_s3(url)
    with s3.translated(url):
        s3.client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1)
