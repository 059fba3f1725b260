"""A local Prefect server that outlives one command, so the next `produce` starts in seconds.

Without PREFECT_API_URL, Prefect starts a temporary server for every command and stops it at exit:
20-30 s of start-up on a small machine, every time. Instead the CLI starts this one once, detached
(`python -m flows.local_server PORT`), on Prefect's SQLite database in PREFECT_HOME (migrated once,
kept between runs), with the services an ephemeral server runs (no UI, no scheduler), and every later
command finds it through `$PREFECT_HOME/liveavatar-server.json` and reuses it. It stops by itself
after `$LIVEAVATAR_LOCAL_SERVER_IDLE_S` seconds (default 900) with no request and no open connection
(a running flow keeps its event stream open). Its output goes to `$PREFECT_HOME/liveavatar-server.log`,
never to the terminal. A long-lived server of your own (PREFECT_API_URL) replaces all of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from liveavatar_core.envnum import positive_seconds
from liveavatar_core.errors import LiveAvatarError

IDLE_ENV = "LIVEAVATAR_LOCAL_SERVER_IDLE_S"
DEFAULT_IDLE_S = 900.0
STARTUP_TIMEOUT_S = 180.0  # the first start migrates a new database: slow on a small, busy machine
STATE_FILE = "liveavatar-server.json"


def ensure(home: Path, version: str) -> tuple[str, bool]:
    """The API URL of this home's running local server, started if needed; and whether it was started.
    LiveAvatarError if it does not start."""
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / "liveavatar-server.lock"):
        state = _read_state(home)
        if state and state.get("version") == version and healthy(state["url"]):
            return state["url"], False
        port = _free_port()
        log = open(home / "liveavatar-server.log", "ab")  # noqa: SIM115 - the server process owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.local_server", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal stops the command, not the server
            cwd=Path(__file__).resolve().parents[1],
        )
        log.close()
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise LiveAvatarError(
                    f"the local Prefect server did not start within {STARTUP_TIMEOUT_S:.0f} s; see "
                    f"{home / 'liveavatar-server.log'}, or set PREFECT_API_URL to a running server"
                )
            time.sleep(0.2)
        state = {"url": url, "pid": proc.pid, "version": version}
        (home / STATE_FILE).write_text(json.dumps(state))
        return url, True


def healthy(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def stop(home: Path) -> bool:
    """Stop this home's local server (SIGTERM); whether one was running."""
    state = _read_state(home)
    if not state:
        return False
    (home / STATE_FILE).unlink(missing_ok=True)
    try:
        os.kill(int(state["pid"]), 15)
    except ProcessLookupError:
        return False
    return True


def idle_seconds() -> float:
    return positive_seconds(IDLE_ENV, DEFAULT_IDLE_S)


def _read_state(home: Path) -> dict | None:
    try:
        return json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One command at a time checks for, or starts, the server (two starting at once would both start)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Activity:
    """ASGI wrapper that tracks open connections and when the last one ended."""

    def __init__(self, app):
        self.app = app
        self.open = 0
        self.last = time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.open += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()


async def _serve(port: int, idle_s: float) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    activity = _Activity(create_app(ephemeral=True, final=True))
    server = uvicorn.Server(
        uvicorn.Config(activity, host="127.0.0.1", port=port, log_level="error", lifespan="on")
    )

    async def stop_when_idle() -> None:
        while not server.should_exit:
            await asyncio.sleep(min(5.0, idle_s))
            if activity.open == 0 and time.monotonic() - activity.last > idle_s:
                print(f"idle for {idle_s:.0f} s: stopping", flush=True)
                server.should_exit = True

    watcher = asyncio.create_task(stop_when_idle())
    await server.serve()
    watcher.cancel()


if __name__ == "__main__":
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    asyncio.run(_serve(int(sys.argv[1]), idle_seconds()))
