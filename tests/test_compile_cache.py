"""torch.compile's cache across worker restarts: $LIVEAVATAR_COMPILE_CACHE reaches a fresh process before
it compiles, the first process fills the directory, the next one compiles from it; the worker applies it
at start and refuses an unusable directory in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.fixtures.prefect_server import BIN, ROOT

# A restarted worker in miniature: the setting, then a compile (CPU: Inductor's C++ backend).
COMPILING_PROCESS = """
import json, os
from liveavatar_core.engines.warmup import use_compile_cache
cache = use_compile_cache()
import torch
from torch._dynamo.utils import counters
scale = torch.compile(lambda x: torch.sin(x) * 3.0 + x.square(), fullgraph=True, dynamic=False)
y = scale(torch.arange(12, dtype=torch.float32))
assert torch.allclose(y, torch.sin(torch.arange(12.0)) * 3.0 + torch.arange(12.0) ** 2)
print(json.dumps({"cache": str(cache), "env": os.environ["TORCHINDUCTOR_CACHE_DIR"],
                  "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_CACHE"))}
    return {**env, **extra}


def test_a_restarted_process_compiles_from_the_cache_the_previous_one_filled(tmp_path):
    cache = tmp_path / "volume" / "compile-cache"
    env = _env(LIVEAVATAR_COMPILE_CACHE=str(cache), PYTHONPATH=str(ROOT))
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", COMPILING_PROCESS],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["cache"] == first["env"] == str(cache)
    assert (first["hit"], first["miss"]) == (0, 1)  # compiled, and stored under the directory
    assert any(p.is_file() for p in (cache / "fxgraph").rglob("*"))
    assert (second["hit"], second["miss"]) == (1, 0)  # the restart found it


def test_the_worker_refuses_an_unusable_compile_cache_in_one_line(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    env = _env(LIVEAVATAR_COMPILE_CACHE=str(blocker / "cache"))
    command = [str(BIN / "liveavatar-batch"), "worker", "--gpu", "0", "--warmup", "none"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: LIVEAVATAR_COMPILE_CACHE: {blocker / 'cache'}: compile cache not writable"
    )
