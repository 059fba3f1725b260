"""Shared pytest configuration. Fixture modules live in tests/fixtures/ and are registered here."""

import os

# Prefect must never phone home or share state with a developer's profile during tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Tiny models on a 2-core CI machine: one intra-op thread avoids oversubscription (it was ~50x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread count, which torch reads as it loads)

# Without a GPU the engine's Triton kernels run in Triton's interpreter; triton reads this once, so it
# is set before anything (inductor included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.media",
    "tests.fixtures.speech",
    "tests.fixtures.prefect",
    "tests.fixtures.liveavatar",
    "tests.fixtures.prefect_server",
]
