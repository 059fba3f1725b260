"""Liveness of a segment being generated on a GPU worker, through the work store.

A Prefect task run whose worker process is killed stays "Running" on the server forever: Prefect (3.9
too) has heartbeats for flow runs, not task runs, and the GPU slot's lease, which the server does free
when its holder dies, says nothing about which run it was. So while a GPU worker runs a segment it
rewrites a small object,
`{work}/heartbeats/{task_run_id}.json`, every `interval()` seconds. The flow that waits for the
segment watches that object's beat counter on its own clock (no clock skew between hosts): when it
stops changing for `stale_after()` seconds the worker is gone and the flow hands the segment to
another worker (`flows/dispatch.py`).

The interval is `$LIVEAVATAR_HEARTBEAT_SECONDS` (default 10 s); stale after 6 intervals.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from types import TracebackType

from liveavatar_core import storage
from liveavatar_core.envnum import positive_seconds

HEARTBEAT_ENV = "LIVEAVATAR_HEARTBEAT_SECONDS"
DEFAULT_INTERVAL_S = 10.0
STALE_INTERVALS = 6

_log = logging.getLogger(__name__)


def interval() -> float:
    """Seconds between two beats."""
    return positive_seconds(HEARTBEAT_ENV, DEFAULT_INTERVAL_S)


def stale_after() -> float:
    """Seconds without a new beat after which a running segment's worker is presumed gone."""
    return STALE_INTERVALS * interval()


def heartbeat_url(work: str, task_run_id: str) -> str:
    return storage.join(work, "heartbeats", f"{task_run_id}.json")


def read_beat(url: str) -> int | None:
    """The beat counter at `url`, or None when there is none (not started, finished, or unreadable)."""
    try:
        return int(json.loads(storage.read_bytes(url))["beat"])
    except Exception:  # any failure reads as "no beat"; staleness decides
        return None


class Heartbeat:
    """Context manager: beat at `url` every `interval()` s from a daemon thread; delete it on exit."""

    def __init__(self, url: str, **info: str):
        self.url = url
        self.info = {"host": socket.gethostname(), "pid": str(os.getpid()), **info}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segment-heartbeat", daemon=True)
        self._beat = 0

    def __enter__(self) -> Heartbeat:
        self._write()  # the first beat before any work, so the waiting flow sees it at once
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            storage.delete(self.url)
        except Exception:  # a leftover beat is harmless: it never changes again
            _log.debug("could not delete heartbeat %s", self.url, exc_info=True)

    def _run(self) -> None:
        period = interval()
        while not self._stop.wait(period):
            self._write()

    def _write(self) -> None:
        self._beat += 1
        body = {"beat": self._beat, "time": time.time(), **self.info}
        try:
            storage.write_bytes(self.url, json.dumps(body).encode())
        except Exception:  # one lost beat is not fatal; many make the flow reschedule
            _log.warning("heartbeat %s: write failed", self.url, exc_info=True)
