"""Where Prefect keeps task results and cache records: inside the work store (local or S3).

Prefect requires result storage to be a block saved on the API, so each work store gets a block
named after a hash of its URL (saved once per process, overwritten idempotently). A course's lectures
run in threads and reach this at about the same time: one of them saves, the others wait for it.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from prefect.filesystems import LocalFileSystem, WritableFileSystem

from liveavatar_core import storage
from liveavatar_core.keys import sha256_bytes

_SAVING = threading.Lock()


def result_storage(work: str) -> WritableFileSystem:
    """The saved result-storage block for `{work}/prefect-results` (S3Bucket for s3:// work stores)."""
    with _SAVING:
        return _saved(work)


@cache
def _saved(work: str) -> WritableFileSystem:
    block = _local_block(work) if not storage.is_remote(work) else _s3_block(work)
    block.save(f"liveavatar-results-{sha256_bytes(work.encode())[:16]}", overwrite=True)
    return block


def _local_block(work: str) -> LocalFileSystem:
    path = storage.local_path(work) / "prefect-results"
    Path(path).mkdir(parents=True, exist_ok=True)
    return LocalFileSystem(basepath=str(path))


def _s3_block(work: str) -> WritableFileSystem:
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    location = storage.parse_s3(work)
    # Neither keys nor the endpoint are stored in the block: every process (flow runs, GPU workers on
    # other hosts) saves and loads this same block, and boto3 takes both from that process's own
    # environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). A stored endpoint
    # would be whichever host saved the block last, and the control host may reach the store by
    # another name (http://minio:9000) than the GPU hosts do.
    credentials = AwsCredentials(aws_client_parameters=AwsClientParameters())
    folder = f"{location.key.strip('/')}/prefect-results".lstrip("/")
    return S3Bucket(bucket_name=location.bucket, bucket_folder=folder, credentials=credentials)
