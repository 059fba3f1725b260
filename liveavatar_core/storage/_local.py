"""Local files: atomic writes (hidden temp file + os.replace in the same folder) and typed errors."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from liveavatar_core.errors import AccessDenied, NotFound, StorageError

COPY_BUFFER = 1024 * 1024
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def temp_name(path: Path) -> Path:
    """A hidden, unique sibling of `path`: os.replace from it is atomic (same filesystem)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def is_temp_name(name: str) -> bool:
    """True for a name made by `temp_name` (a write in progress, or left by a crash)."""
    return bool(_TEMP_NAME.match(name))


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write` writes; readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    # os.open with 0o666 lets the umask decide the mode, as a plain open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` atomically."""
    with open(src, "rb") as source:
        atomic_write(dest, lambda fh: shutil.copyfileobj(source, fh, COPY_BUFFER))


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def local_errors(url: str) -> Iterator[None]:
    """Re-raise OS errors inside the block as typed storage errors about `url`."""
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFound(url, "no such file or folder") from exc
    except PermissionError as exc:
        raise AccessDenied(url, "permission denied") from exc
    except IsADirectoryError as exc:
        raise StorageError(url, "is a folder; expected a file") from exc
    except NotADirectoryError as exc:
        raise StorageError(url, "a parent of this path is a file, not a folder") from exc
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise AccessDenied(url, "read-only filesystem") from exc
        raise StorageError(url, exc.strerror or str(exc)) from exc
