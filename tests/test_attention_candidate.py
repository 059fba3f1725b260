"""The low-precision attention candidate (benchmarks/triton_fp8_attention.py) computes the attention of
its quantised inputs, in Triton's interpreter (conftest.py sets it where there is no GPU)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's check, for a CPU")


def test_the_candidate_attends_its_quantised_inputs_over_one_to_three_parts():
    from benchmarks.triton_fp8_attention import check_algorithm

    errors = check_algorithm()
    assert len(errors) == 3 and max(errors) < 2e-3, errors
