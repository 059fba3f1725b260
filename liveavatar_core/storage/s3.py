"""S3 access: one client per process, retries and timeouts set once, typed errors.

Settings come from the environment when a client is first needed (never at import):

* `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`: an S3-compatible endpoint (MinIO, moto, Ceph, ...). With
  an endpoint set, addressing is path-style and checksums are sent only when an operation requires
  them, which third-party stores accept.
* `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` / `AWS_PROFILE`, `AWS_REGION` /
  `AWS_DEFAULT_REGION`: as boto3 reads them.
* `AWS_MAX_ATTEMPTS` (default 5) and `AWS_RETRY_MODE` (default `standard`: exponential backoff with
  jitter on throttling, 5xx and connection errors).
* `LIVEAVATAR_S3_CONNECT_TIMEOUT` / `LIVEAVATAR_S3_READ_TIMEOUT` (seconds, default 10 / 60),
  `LIVEAVATAR_S3_ADDRESSING_STYLE` (`auto`, `path`, `virtual`),
  `LIVEAVATAR_S3_MULTIPART_THRESHOLD` / `LIVEAVATAR_S3_MULTIPART_CHUNKSIZE` (bytes, default 16 MiB),
  `LIVEAVATAR_S3_MAX_CONCURRENCY` (parallel parts per transfer, default 8).

Clients are cached per process, keyed on these settings and a fingerprint of the credentials, so a
changed endpoint or credential (as in tests) gets a fresh client. boto3 clients are thread-safe.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.exceptions as bce
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from liveavatar_core.errors import (
    AccessDenied,
    InputError,
    LiveAvatarError,
    NotFound,
    StorageError,
    TransientStorageError,
)

MiB = 1024 * 1024

_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@dataclass(frozen=True)
class S3Settings:
    """Everything that shapes an S3 client; read from the environment by `from_env`."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    max_attempts: int = 5
    retry_mode: str = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8
    # "when_required" for third-party endpoints; None leaves botocore's default (and its env vars).
    checksums: str | None = None
    # A hash of the credential variables: the cache notices new credentials without holding them.
    credentials_fingerprint: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        """Settings from `env` (default: os.environ); raises InputError for a malformed value."""
        env = os.environ if env is None else env
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        style = env.get("LIVEAVATAR_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
        if style not in ("auto", "path", "virtual"):
            raise InputError(
                "LIVEAVATAR_S3_ADDRESSING_STYLE", f"must be auto, path or virtual, not {style!r}"
            )
        explicit_checksums = "AWS_REQUEST_CHECKSUM_CALCULATION" in env
        fingerprint = hashlib.sha256("\0".join(env.get(v, "") for v in _CREDENTIAL_VARS).encode()).hexdigest()
        return cls(
            endpoint_url=endpoint,
            region=region or ("us-east-1" if endpoint else None),
            addressing_style=style,
            max_attempts=_positive(env, "AWS_MAX_ATTEMPTS", 5, int),
            retry_mode=env.get("AWS_RETRY_MODE") or "standard",
            connect_timeout=_positive(env, "LIVEAVATAR_S3_CONNECT_TIMEOUT", 10.0, float),
            read_timeout=_positive(env, "LIVEAVATAR_S3_READ_TIMEOUT", 60.0, float),
            multipart_threshold=_positive(env, "LIVEAVATAR_S3_MULTIPART_THRESHOLD", 16 * MiB, int),
            multipart_chunksize=_positive(env, "LIVEAVATAR_S3_MULTIPART_CHUNKSIZE", 16 * MiB, int),
            max_concurrency=_positive(env, "LIVEAVATAR_S3_MAX_CONCURRENCY", 8, int),
            checksums="when_required" if endpoint and not explicit_checksums else None,
            credentials_fingerprint=fingerprint,
        )

    @property
    def endpoint_label(self) -> str:
        """The endpoint for messages, without any user:password part."""
        if not self.endpoint_url:
            return "AWS S3"
        parts = urlsplit(self.endpoint_url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _positive(env: Mapping[str, str], name: str, default: Any, kind: type) -> Any:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(name, f"must be a positive {kind.__name__}, not {raw!r}")
    return value


_lock = threading.Lock()
_clients: dict[tuple[S3Settings, int], Any] = {}


_override: ContextVar[S3Settings | None] = ContextVar("s3_settings_override", default=None)


def settings() -> S3Settings:
    """The current S3 settings (read from the environment now, unless `overridden`)."""
    return _override.get() or S3Settings.from_env()


@contextmanager
def overridden(current: S3Settings) -> Iterator[None]:
    """Use `current` instead of the environment's settings inside the block (this thread only)."""
    token = _override.set(current)
    try:
        yield
    finally:
        _override.reset(token)


def has_credentials(current: S3Settings | None = None) -> bool:
    """Whether boto3 finds credentials (environment, profile, or the host's role) for `current`."""
    current = current or settings()
    return boto3.session.Session(region_name=current.region).get_credentials() is not None


def client(current: S3Settings | None = None) -> Any:
    """The process's S3 client for the current settings; made once, then shared (thread-safe)."""
    current = current or settings()
    # A client must not cross a fork: its connection pool belongs to the parent.
    key = (current, os.getpid())
    made = _clients.get(key)
    if made is not None:
        return made
    with _lock:
        made = _clients.get(key)
        if made is None:
            made = _make_client(current)
            _clients[key] = made
        return made


def _make_client(s: S3Settings) -> Any:
    options: dict[str, Any] = {
        # total_max_attempts counts the first try, as AWS_MAX_ATTEMPTS does (max_attempts would not).
        "retries": {"total_max_attempts": s.max_attempts, "mode": s.retry_mode},
        "connect_timeout": s.connect_timeout,
        "read_timeout": s.read_timeout,
        "s3": {"addressing_style": s.addressing_style},
        "max_pool_connections": max(10, s.max_concurrency * 2),
    }
    if s.checksums:
        options["request_checksum_calculation"] = s.checksums
        options["response_checksum_validation"] = s.checksums
    # A session per client: boto3 sessions are not thread-safe, clients are.
    session = boto3.session.Session(region_name=s.region)
    return session.client("s3", endpoint_url=s.endpoint_url, config=Config(**options))


def transfer_config(current: S3Settings | None = None) -> TransferConfig:
    """Multipart thresholds and concurrency for upload_file/download_file."""
    s = current or settings()
    return TransferConfig(
        multipart_threshold=s.multipart_threshold,
        multipart_chunksize=s.multipart_chunksize,
        max_concurrency=s.max_concurrency,
        use_threads=True,
    )


# --- errors ----------------------------------------------------------------------------------------

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"}
_DENIED_CODES = {
    "AccessDenied",
    "Forbidden",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
_NETWORK_ERRORS = (
    bce.EndpointConnectionError,
    bce.ConnectionError,
    bce.HTTPClientError,
    bce.ConnectTimeoutError,
    bce.ReadTimeoutError,
    bce.IncompleteReadError,
    bce.ResponseStreamingError,
)
_CREDENTIAL_ERRORS = (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)


def error_code(exc: bce.ClientError) -> tuple[str, int]:
    """The S3 error code and HTTP status of a ClientError."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code or str(status), status


def translate(url: str, exc: BaseException) -> StorageError | None:
    """The typed storage error for a boto3/botocore failure on `url`, or None if it is not one.

    Wrapped failures (boto3's S3UploadFailedError and RetriesExceededError) are unwrapped. Messages
    never contain credentials.
    """
    s = settings()
    for cause in _chain(exc):
        if isinstance(cause, bce.ClientError):
            return _from_client_error(url, cause, s)
        if isinstance(cause, _CREDENTIAL_ERRORS):
            return AccessDenied(
                url,
                "no usable AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
            )
        if isinstance(cause, _NETWORK_ERRORS):
            return TransientStorageError(
                url,
                f"could not talk to {s.endpoint_label} ({type(cause).__name__}) after "
                f"{s.max_attempts} attempts; check the endpoint and network, then retry",
            )
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        last = getattr(current, "last_exception", None)  # boto3/s3transfer RetriesExceededError
        current = last if isinstance(last, BaseException) else (current.__cause__ or current.__context__)


def _from_client_error(url: str, exc: bce.ClientError, s: S3Settings) -> StorageError:
    code, status = error_code(exc)
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if code in _NOT_FOUND_CODES or status == 404:
        if code == "NoSuchBucket":
            return NotFound(url, f"bucket '{bucket}' does not exist at {s.endpoint_label}")
        return NotFound(url, "no such object")
    if code in _DENIED_CODES or status == 403:
        return AccessDenied(
            url,
            f"access denied ({code}); check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE) "
            f"and that they may use bucket '{bucket}'",
        )
    if code in _TRANSIENT_CODES or status >= 500:
        return TransientStorageError(
            url,
            f"{s.endpoint_label} kept failing ({code}, HTTP {status}) through {s.max_attempts} attempts; "
            "retry later",
        )
    message = str(exc.response.get("Error", {}).get("Message", "")).strip()
    return StorageError(
        url, f"S3 refused the request ({code}, HTTP {status})" + (f": {message}" if message else "")
    )


@contextmanager
def translated(url: str) -> Iterator[None]:
    """Re-raise boto3/botocore failures inside the block as typed storage errors about `url`."""
    try:
        yield
    except LiveAvatarError:
        raise
    except Exception as exc:
        typed = translate(url, exc)
        if typed is None:
            raise
        raise typed from exc
