"""Typed errors survive pickling: they travel from GPU workers to flows through Prefect results."""

import pickle

import pytest

from liveavatar_core.engines.ladder import Attempt, LadderExhausted
from liveavatar_core.errors import AccessDenied, InputError, NotFound, OutOfMemory, TransientStorageError


@pytest.mark.parametrize(
    "error",
    [
        InputError("--audio x.mp3", "no speech found"),
        NotFound("s3://b/k", "no such object"),
        AccessDenied("s3://b", "access denied"),
        TransientStorageError("s3://b/k", "503 after 5 attempts"),
        OutOfMemory("needs 80 GiB", needed_bytes=80, budget_bytes=40),
        LadderExhausted("no rung fits", [Attempt("requested", {"steps": 4}, "oom", 1.0)], needed_bytes=1),
    ],
)
def test_round_trip(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert {k: v for k, v in vars(back).items() if k != "attempts"} == {
        k: v for k, v in vars(error).items() if k != "attempts"
    }
    if isinstance(error, LadderExhausted):
        assert back.attempts[0].rung == "requested"
