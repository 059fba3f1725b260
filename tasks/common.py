"""Retry policy shared by tasks: retry only transient storage faults, never bad input or OOM."""

from __future__ import annotations

from liveavatar_core.errors import TransientStorageError


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: True only when the task failed on a transient storage fault."""
    try:
        state.result()
    except TransientStorageError:
        return True
    except Exception:
        return False
    return False


TRANSIENT_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": retry_transient}
