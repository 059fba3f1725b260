"""Storage by URL: local paths, file:// and s3:// (moto over real HTTP, faults from a real proxy)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from liveavatar_core import storage
from liveavatar_core.errors import AccessDenied, InputError, NotFound, StorageError, TransientStorageError
from liveavatar_core.storage import s3
from liveavatar_core.storage._local import atomic_write
from tests.fixtures.s3 import FaultProxy, MotoS3

MiB = 1024 * 1024


def _random_bytes(n: int, seed: int = 0) -> bytes:
    # Deterministic and incompressible enough; os.urandom would make failures unrepeatable.
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


@pytest.fixture(params=["path", "file", "s3"])
def base_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A destination folder URL of each kind (the S3 one in a fresh bucket)."""
    if request.param == "path":
        return str(tmp_path / "out")
    if request.param == "file":
        return (tmp_path / "out dir").as_uri()  # a space: file:// URLs are percent-encoded
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/out"


@pytest.fixture
def small_multipart(monkeypatch: pytest.MonkeyPatch) -> int:
    """Lower the multipart threshold to S3's minimum part size (5 MiB) for one test."""
    monkeypatch.setenv("LIVEAVATAR_S3_MULTIPART_THRESHOLD", str(5 * MiB))
    monkeypatch.setenv("LIVEAVATAR_S3_MULTIPART_CHUNKSIZE", str(5 * MiB))
    return 5 * MiB


# --- URLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b/out", ("a", "v.mp4"), "s3://b/out/a/v.mp4"),
        ("s3://b/out/", ("a/b.json",), "s3://b/out/a/b.json"),
        ("s3://b", ("x",), "s3://b/x"),
        ("/data/out", ("x.json",), "/data/out/x.json"),
        ("out", ("./x", "y/"), "out/x/y"),
        ("file:///data/out", ("a b.txt",), "file:///data/out/a%20b.txt"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


@pytest.mark.parametrize("part", ["../x", "a/../../x", "/etc/passwd"])
def test_join_refuses_escaping_parts(part: str) -> None:
    with pytest.raises(ValueError):
        storage.join("s3://b/out", part)


def test_url_kinds() -> None:
    assert storage.is_remote("s3://b/k") and storage.is_remote("S3://b/k")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.local_path("file:///tmp/a%20b.mp3") == Path("/tmp/a b.mp3")
    assert storage.parse_s3("s3://bucket/dir/k%20ey") == storage.S3Location("bucket", "dir/k%20ey")
    with pytest.raises(InputError, match="unsupported URL scheme"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(InputError, match="no bucket"):
        storage.parse_s3("s3:///key")
    with pytest.raises(InputError, match="another host"):
        storage.local_path("file://server/share/x")


# --- round trips -----------------------------------------------------------------------------------


def test_bytes_and_json_round_trip(base_url: str) -> None:
    data = _random_bytes(70_000)
    blob = storage.join(base_url, "sub", "blob.bin")
    doc = storage.join(base_url, "manifest.json")
    assert not storage.exists(blob)

    storage.write_bytes(blob, data)
    storage.write_json(doc, {"title": "Über Audio", "n": [1, 2]})

    assert storage.read_bytes(blob) == data
    assert storage.read_json(doc) == {"title": "Über Audio", "n": [1, 2]}
    assert storage.exists(blob) and storage.size(blob) == len(data)
    assert storage.sha256(blob) == hashlib.sha256(data).hexdigest()
    assert storage.list_prefix(base_url) == [doc, blob]

    storage.write_bytes(blob, b"replaced")
    assert storage.read_bytes(blob) == b"replaced"
    storage.delete(blob)
    storage.delete(blob)  # idempotent
    assert not storage.exists(blob)
    assert storage.list_prefix(base_url) == [doc]


def test_upload_download_and_local_file(base_url: str, tmp_path: Path) -> None:
    src = tmp_path / "in" / "lecture.mp3"
    src.parent.mkdir()
    src.write_bytes(_random_bytes(200_000, seed=1))
    url = storage.join(base_url, "lecture.mp3")

    storage.upload(src, url)
    got = storage.download(url, tmp_path / "back" / "copy.mp3")
    assert got.read_bytes() == src.read_bytes()

    with storage.local_file(url) as path:
        assert path.name == "lecture.mp3"
        assert path.read_bytes() == src.read_bytes()
    if storage.is_remote(url):
        assert not path.exists(), "the temporary download is removed after the block"
    else:
        assert path == storage.local_path(url) and path.exists()


def test_multipart_upload_and_download(
    s3_bucket: str, small_multipart: int, tmp_path: Path, s3_server: MotoS3
) -> None:
    src = tmp_path / "video.mp4"
    src.write_bytes(_random_bytes(2 * small_multipart + 123_456, seed=2))
    url = f"s3://{s3_bucket}/big/video.mp4"

    storage.upload(src, url)
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="big/video.mp4")
    assert head["ETag"].strip('"').endswith("-3"), "three parts: a multipart upload"
    assert head["ContentType"] == "video/mp4"

    back = storage.download(url, tmp_path / "back.mp4")
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == expected
    assert storage.sha256(url) == expected

    storage.write_bytes(f"s3://{s3_bucket}/big/blob", src.read_bytes())
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="big/blob")
    assert head["ETag"].strip('"').endswith("-3")


def test_list_prefix_is_a_folder_not_a_string_prefix(s3_bucket: str, tmp_path: Path) -> None:
    for key in ("out/a.json", "out/deep/b.json", "out2/c.json", "outer.json"):
        storage.write_bytes(f"s3://{s3_bucket}/{key}", b"{}")
    assert storage.list_prefix(f"s3://{s3_bucket}/out") == [
        f"s3://{s3_bucket}/out/a.json",
        f"s3://{s3_bucket}/out/deep/b.json",
    ]
    assert len(storage.list_prefix(f"s3://{s3_bucket}")) == 4
    assert storage.list_prefix(str(tmp_path / "missing")) == []


def test_local_write_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    storage.write_bytes(str(target), b"old")

    def fails_halfway(fh) -> None:
        fh.write(b"new, but only half")
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, fails_halfway)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"], "no temp file left behind"
    (tmp_path / ".report.html.0123456789ab.tmp").write_bytes(b"a write in progress")
    assert storage.list_prefix(str(tmp_path)) == [str(target)]

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


# --- missing things and typed errors ---------------------------------------------------------------


def test_missing_object_and_file(s3_bucket: str, tmp_path: Path) -> None:
    for url in (f"s3://{s3_bucket}/nope.json", str(tmp_path / "nope.json")):
        assert not storage.exists(url)
        for call in (storage.read_bytes, storage.size, storage.sha256):
            with pytest.raises(NotFound):
                call(url)
        with pytest.raises(NotFound):
            storage.download(url, tmp_path / "dl" / "x")
        with pytest.raises(NotFound), storage.local_file(url):
            pytest.fail("no file to read")
    assert not (tmp_path / "dl" / "x").exists()


def test_missing_bucket(s3_server: MotoS3) -> None:
    url = "s3://no-such-bucket-liveavatar/out"
    with pytest.raises(NotFound, match="bucket 'no-such-bucket-liveavatar' does not exist"):
        storage.list_prefix(url)
    with pytest.raises(InputError, match="does not exist") as info:
        storage.check_destination(url, "--out " + url)
    assert info.value.subject == "--out " + url
    with pytest.raises(InputError, match="does not exist"):
        storage.check_readable(url + "/a.mp3", "--audio")
    buckets = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert "no-such-bucket-liveavatar" not in buckets, "the check created nothing"


def test_access_denied_never_shows_credentials(s3_bucket: str, s3_server: MotoS3, monkeypatch) -> None:
    key_id, secret = "AKIALEAKCHECK0000001", "sEcReT/do-not-leak+0123456789abcdefghijkl"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    url = f"s3://{s3_bucket}/a.json"
    with s3_server.auth_enforced():
        with pytest.raises(AccessDenied) as denied:
            storage.read_bytes(url)
        with pytest.raises(InputError, match="access denied") as bad_dest:
            storage.check_destination(f"s3://{s3_bucket}/out", "--out")
        with pytest.raises(InputError, match="access denied"):
            storage.check_readable(url, "--audio")
    for err in (denied.value, bad_dest.value):
        assert key_id not in str(err) and secret not in str(err)
        assert "AWS_ACCESS_KEY_ID" in str(err), "the message says what to check"


def test_no_credentials_is_access_denied(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    with pytest.raises(AccessDenied, match="no usable AWS credentials"):
        storage.read_bytes(f"s3://{s3_bucket}/a.json")


# --- retries and transient faults ------------------------------------------------------------------


def test_transient_faults_are_retried(s3_bucket: str, s3_fault_proxy: FaultProxy) -> None:
    url = f"s3://{s3_bucket}/retry.json"
    s3_fault_proxy.fail_first = 2
    storage.write_json(url, {"ok": True})
    assert s3_fault_proxy.faults == 2
    s3_fault_proxy.fail_first = 2
    assert storage.read_json(url) == {"ok": True}
    assert s3_fault_proxy.faults == 4
    assert all(status in (200, 503) for *_, status in s3_fault_proxy.log)


def test_persistent_fault_is_transient_error_in_bounded_time(
    s3_bucket: str, s3_fault_proxy: FaultProxy
) -> None:
    s3_fault_proxy.fail_when = lambda method, path: True
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match="ServiceUnavailable") as info:
        storage.read_bytes(f"s3://{s3_bucket}/a.json")
    assert time.monotonic() - started < 15
    assert s3_fault_proxy.faults == 3, "AWS_MAX_ATTEMPTS=3: three tries, then give up"
    assert "retry" in str(info.value)
    # A network fault is not the user's input: the checks let it through for the caller to retry.
    with pytest.raises(TransientStorageError):
        storage.check_destination(f"s3://{s3_bucket}/out", "--out")


def test_unreachable_endpoint_is_transient(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:pw@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("LIVEAVATAR_S3_CONNECT_TIMEOUT", "1")
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match=f"127.0.0.1:{port}") as info:
        storage.exists(f"s3://{s3_bucket}/a.json")
    assert time.monotonic() - started < 10
    assert "pw" not in str(info.value)


# --- the client ------------------------------------------------------------------------------------


def test_client_is_shared_per_process_and_follows_the_endpoint(
    s3_bucket: str, s3_fault_proxy: FaultProxy, s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: s3.client(), range(32)))
        urls = [f"s3://{s3_bucket}/t/{i}.bin" for i in range(32)]
        list(pool.map(lambda u: storage.write_bytes(u, u.encode()), urls))
    assert all(c is clients[0] for c in clients)
    assert len(s3_fault_proxy.log) >= 32, "the writes went through the proxy's endpoint"

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    assert s3.client() is not clients[0], "a new endpoint gets a new client"
    seen = len(s3_fault_proxy.log)
    assert [storage.read_bytes(u) for u in urls] == [u.encode() for u in urls]
    assert len(s3_fault_proxy.log) == seen


def test_settings_from_env() -> None:
    plain = s3.S3Settings.from_env({})
    assert (plain.endpoint_url, plain.addressing_style, plain.checksums) == (None, "auto", None)
    custom = s3.S3Settings.from_env(
        {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ENDPOINT_URL_S3": "https://k:s@s3.example:9443/x"}
    )
    assert custom.endpoint_url == "https://k:s@s3.example:9443/x"
    assert custom.endpoint_label == "https://s3.example:9443/x"
    assert (custom.addressing_style, custom.region, custom.checksums) == (
        "path",
        "us-east-1",
        "when_required",
    )
    assert s3.S3Settings.from_env({"AWS_SECRET_ACCESS_KEY": "a"}) != s3.S3Settings.from_env(
        {"AWS_SECRET_ACCESS_KEY": "b"}
    )
    assert "s3cr3t" not in repr(s3.S3Settings.from_env({"AWS_SECRET_ACCESS_KEY": "s3cr3t"}))
    with pytest.raises(InputError, match="LIVEAVATAR_S3_READ_TIMEOUT"):
        s3.S3Settings.from_env({"LIVEAVATAR_S3_READ_TIMEOUT": "soon"})
    with pytest.raises(InputError, match="ADDRESSING_STYLE"):
        s3.S3Settings.from_env({"LIVEAVATAR_S3_ADDRESSING_STYLE": "sideways"})


def test_subprocess_inherits_the_endpoint(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/from-parent.txt"
    storage.write_bytes(url, b"hello child")
    code = "import sys; from liveavatar_core import storage; sys.stdout.write(storage.read_text(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "hello child"


# --- checks ----------------------------------------------------------------------------------------


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder this process may not write to (chmod for users; `chattr +i` for root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without immutable folders: cannot make one unwritable")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_check_readable_local(tmp_path: Path) -> None:
    good = tmp_path / "portrait.jpg"
    good.write_bytes(b"\xff\xd8")
    storage.check_readable(str(good), "--image")
    storage.check_readable(good.as_uri(), "--image")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = {
        str(tmp_path / "missing.jpg"): "no such file",
        str(tmp_path): "is a folder",
        str(fifo): "not a regular file",
    }
    for url, problem in cases.items():
        with pytest.raises(InputError, match=problem) as info:
            storage.check_readable(url, f"--image {url}")
        assert info.value.subject == f"--image {url}"


def test_check_readable_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file: permission bits cannot make one unreadable")
    secret = tmp_path / "secret.mp3"
    secret.write_bytes(b"x")
    secret.chmod(0)
    with pytest.raises(InputError, match="not readable"):
        storage.check_readable(str(secret), "--audio")


def test_check_readable_s3(s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/in/lecture.mp3", b"ID3")
    storage.check_readable(f"s3://{s3_bucket}/in/lecture.mp3", "--audio")
    for url, problem in {
        f"s3://{s3_bucket}/in/missing.mp3": "no such object",
        f"s3://{s3_bucket}/in": "is a folder",
        f"s3://{s3_bucket}/in/": "names a folder",
        f"s3://{s3_bucket}": "names a folder",
    }.items():
        with pytest.raises(InputError, match=problem) as info:
            storage.check_readable(url, f"--audio {url}")
        assert info.value.subject == f"--audio {url}"


def test_check_destination_local(tmp_path: Path) -> None:
    storage.check_destination(str(tmp_path), "--out")
    deep = tmp_path / "a" / "b" / "c"
    storage.check_destination(str(deep), "--out")
    storage.check_destination(deep.as_uri(), "--out")
    assert not (tmp_path / "a").exists(), "checking creates nothing"

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        storage.check_destination(str(a_file), "--out")
    with pytest.raises(InputError, match="is a file, not a folder"):
        storage.check_destination(str(a_file / "sub"), "--out")


def test_check_destination_not_writable(unwritable_dir: Path) -> None:
    with pytest.raises(InputError, match="not writable"):
        storage.check_destination(str(unwritable_dir), "--out")
    with pytest.raises(InputError, match=f"cannot create it: {unwritable_dir} is not writable"):
        storage.check_destination(str(unwritable_dir / "new" / "out"), "--out")


def test_check_destination_s3(s3_bucket: str) -> None:
    storage.check_destination(f"s3://{s3_bucket}/runs/out", "--out")
    storage.check_destination(f"s3://{s3_bucket}", "--out")
    assert storage.list_prefix(f"s3://{s3_bucket}") == [], "checking creates nothing"


# --- publish ---------------------------------------------------------------------------------------


def _outputs(folder: Path, video_bytes: int = 50_000) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "video.mp4": _random_bytes(video_bytes, seed=3),
        "qc.json": b'{"passed": true}',
        "thumbs/0.jpg": b"\xff\xd8thumb",
        "manifest.json": b'{"version": 2}',
    }
    items = []
    for name, data in contents.items():
        path = folder / name.replace("/", "_")
        path.write_bytes(data)
        items.append((name, path))
    return items


def test_publish_local(tmp_path: Path) -> None:
    dest = tmp_path / "pub"
    items = _outputs(tmp_path / "work")
    # manifest.json is written last wherever it appears in the list
    written = storage.publish([items[-1], *items[:-1]], str(dest))
    assert written[-1] == str(dest / "manifest.json")
    for name, path in items:
        assert (dest / name).read_bytes() == path.read_bytes()
    assert not [p for p in dest.rglob(".*")], "no temp files left"


def test_publish_local_failure_leaves_no_manifest(tmp_path: Path) -> None:
    dest = tmp_path / "pub"
    storage.publish(_outputs(tmp_path / "old"), str(dest))
    assert (dest / "manifest.json").exists()
    (dest / "qc.json").unlink()
    (dest / "qc.json").mkdir()  # a real obstacle: a folder where the new qc.json must land
    (dest / "qc.json" / "keep").write_text("x")

    with pytest.raises(StorageError, match="qc.json"):
        storage.publish(_outputs(tmp_path / "new"), str(dest))
    assert not (dest / "manifest.json").exists(), "a half-replaced folder must not look complete"
    assert not (dest / "video.mp4").exists(), "what the failed publish wrote is removed"


def test_publish_s3_order_and_multipart(
    s3_bucket: str, s3_fault_proxy: FaultProxy, small_multipart: int, tmp_path
) -> None:
    dest = f"s3://{s3_bucket}/courses/c1/lecture-01"
    storage.write_json(storage.join(dest, "manifest.json"), {"version": 1})
    s3_fault_proxy.log.clear()

    items = _outputs(tmp_path / "work", video_bytes=small_multipart + 1000)
    written = storage.publish(items, dest)

    writes = [(m, p.split("?")[0]) for m, p, _ in s3_fault_proxy.log if m in ("PUT", "POST", "DELETE")]
    prefix = f"/{s3_bucket}/courses/c1/lecture-01"
    assert writes[0] == ("DELETE", f"{prefix}/manifest.json"), "the old manifest goes first"
    assert writes[-1] == ("PUT", f"{prefix}/manifest.json"), "the new manifest comes last"
    assert sum(1 for m, p in writes if m == "PUT" and p.endswith("/video.mp4")) == 2, "video in 2 parts"
    assert written == [
        storage.join(dest, name) for name in ("video.mp4", "qc.json", "thumbs/0.jpg", "manifest.json")
    ]
    for name, path in items:
        assert storage.read_bytes(storage.join(dest, name)) == path.read_bytes()


def test_publish_s3_failure_halfway(
    s3_bucket: str, s3_fault_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # retries are tested elsewhere; here only the outcome
    dest = f"s3://{s3_bucket}/out"
    storage.publish(_outputs(tmp_path / "old"), dest)
    s3_fault_proxy.log.clear()
    s3_fault_proxy.fail_when = lambda method, path: method == "PUT" and "/qc.json" in path

    with pytest.raises(TransientStorageError, match="qc.json"):
        storage.publish(_outputs(tmp_path / "new"), dest)
    s3_fault_proxy.fail_when = None
    left = storage.list_prefix(dest)
    assert storage.join(dest, "manifest.json") not in left
    assert storage.join(dest, "video.mp4") not in left, "what the failed publish wrote is removed"
    assert not any(m == "PUT" and p.endswith("/manifest.json") for m, p, _ in s3_fault_proxy.log)


def test_publish_checks_its_inputs_before_touching_dest(tmp_path: Path) -> None:
    dest = tmp_path / "pub"
    storage.publish(_outputs(tmp_path / "old"), str(dest))
    items = _outputs(tmp_path / "new")
    with pytest.raises(NotFound):
        storage.publish([("video.mp4", tmp_path / "gone.mp4"), *items[1:]], str(dest))
    assert json.loads((dest / "manifest.json").read_text()) == {"version": 2}, "old publish untouched"
    for bad in (items[:-1], [*items, items[0]], [("../x", items[0][1]), *items]):
        with pytest.raises(ValueError):
            storage.publish(bad, str(dest))


def test_concurrent_threads_publish_separate_lectures(s3_bucket: str, tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            storage.publish(_outputs(tmp_path / f"w{i}"), f"s3://{s3_bucket}/lec-{i}")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(storage.list_prefix(f"s3://{s3_bucket}")) == 6 * 4
