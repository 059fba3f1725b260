"""`liveavatar-batch deploy`: work pools, per-GPU concurrency limits and the deployments, on the server.

Against the server PREFECT_API_URL names:

1. the work pools `cpu-pool` and `gpu-pool` (type process, Prefect's default job template), unless
   they exist;
2. with `--gpu-host H --gpus N`, the strict concurrency limits `gpu-H-0` … `gpu-H-{N-1}` (limit 1),
   unless they exist (each GPU worker also creates its own when it starts);
3. every deployment in `deployments/prefect.yaml`, through `prefect deploy --all` (Prefect's own tool,
   so the YAML stays the one description of the deployments), with LIVEAVATAR_PROJECT_DIR set to the
   checkout the workers run the flows from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
POOLS = ("cpu-pool", "gpu-pool")


def ensure_pools(names: tuple[str, ...] = POOLS) -> dict[str, str]:
    """Create each process work pool that does not exist; returns {pool: 'created' | 'exists'}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    done: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
                done[name] = "exists"
            except ObjectNotFound:
                template = ProcessWorker.get_default_base_job_template()
                client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
                done[name] = "created"
    return done


def ensure_gpu_limits(host: str, gpus: int) -> dict[str, str]:
    """The strict limit (limit 1) of each of `host`'s GPUs; a limit in use is left as it is."""
    from flows.worker import ensure_gpu_limit, gpu_slot, host_id

    return {
        gpu_slot(host_id(host), k): ensure_gpu_limit(gpu_slot(host_id(host), k), reclaim=False)
        for k in range(gpus)
    }


def deploy_all(prefect_file: Path = PREFECT_FILE, project_dir: str | None = None) -> str:
    """`prefect deploy --all` from the repository root; returns its output. Raises RuntimeError on failure."""
    env = dict(os.environ)
    env["LIVEAVATAR_PROJECT_DIR"] = project_dir or os.environ.get("LIVEAVATAR_PROJECT_DIR") or str(ROOT)
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all"]
    command += ["--prefect-file", str(prefect_file)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"prefect deploy failed (exit {result.returncode}): {last[0].strip()}")
    return output
