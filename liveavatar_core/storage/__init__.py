"""Storage by URL: every input and output is a local path, a `file://` URL or `s3://bucket/key`.

    from liveavatar_core import storage
    storage.check_readable(audio_url, "--audio " + audio_url)
    with storage.local_file(audio_url) as path: ...
    storage.publish([("video.mp4", video), ("manifest.json", manifest)], out_url)

S3 settings (endpoint, retries, timeouts, multipart) come from the environment; see `storage.s3`.
Failures raise the typed errors of `liveavatar_core.errors`: NotFound, AccessDenied,
TransientStorageError (all StorageError), and InputError from the `check_*` functions.
"""

from liveavatar_core.storage.checks import check_destination, check_readable
from liveavatar_core.storage.files import (
    delete,
    download,
    exists,
    list_prefix,
    local_file,
    read_bytes,
    read_json,
    read_text,
    sha256,
    size,
    upload,
    write_bytes,
    write_json,
    write_text,
)
from liveavatar_core.storage.publish import MANIFEST, publish
from liveavatar_core.storage.urls import S3Location, is_remote, join, local_path, parse_s3

__all__ = [
    "MANIFEST",
    "S3Location",
    "check_destination",
    "check_readable",
    "delete",
    "download",
    "exists",
    "is_remote",
    "join",
    "list_prefix",
    "local_file",
    "local_path",
    "parse_s3",
    "publish",
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
