"""The trace analysis of benchmarks/profile_clip.py on a hand-made trace whose answer is known: which
host op launched each kernel, and where the GPU sat idle and what the host was doing then."""

from benchmarks.profile_clip import enclosing_ops, gaps, summarise


def op(name, ts, dur, tid=1, cat="cpu_op"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}


def launch(ts, correlation, tid=1, cat="cuda_runtime"):
    return {
        "cat": cat,
        "name": "cudaLaunchKernel" if cat == "cuda_runtime" else "cuLaunchKernelEx",
        "ts": ts,
        "dur": 2,
        "tid": tid,
        "args": {"correlation": correlation},
    }


def kernel(name, ts, dur, correlation):
    return {
        "cat": "kernel",
        "name": name,
        "ts": ts,
        "dur": dur,
        "tid": 7,
        "args": {"correlation": correlation},
    }


def test_gaps_between_overlapping_intervals():
    assert gaps([(0, 10), (5, 12), (20, 30), (30, 31), (40, 41)]) == [(12, 20), (31, 40)]
    assert gaps([]) == []


def test_enclosing_ops_nested_and_after_the_end():
    ops = [op("outer", 0, 100), op("inner", 10, 20), op("later", 50, 10), op("other", 200, 5)]
    assert enclosing_ops(ops, [15, 40, 55, 150, 0]) == [
        ["outer", "inner"],
        ["outer"],
        ["outer", "later"],
        [],
        ["outer"],
    ]


def test_summarise_attributes_kernels_and_idle_time():
    trace = {
        "traceEvents": [
            op("Torch-Compiled Region: 1/0", 0, 100),
            op("aten::mm", 10, 20),
            launch(12, 1),
            kernel("nvjet_sm90_gemm", 20, 300, 1),
            op("aten::item", 400, 1000),  # the host waits on a sync while the GPU has nothing queued
            op("cudaStreamSynchronize", 410, 980, cat="cuda_runtime"),
            op("aten::scaled_dot_product_attention", 1500, 30),
            launch(1510, 2, cat="cuda_driver"),  # cuDNN, cuBLASLt and Triton launch through the driver
            kernel("cudnn_sdpa_fprop", 1515, 485, 2),
            op("python work", 0, 5000, tid=2),  # another thread: not the launching one
        ]
    }
    s = summarise(trace, clips=1, wall=2000e-6)
    assert s["gpu_busy_seconds_per_clip"] == round(785e-6, 4)
    by_op = s["gpu_seconds_per_clip_by_launching_op"]
    assert set(by_op) == {"Torch-Compiled Region: 1/0 > aten::mm", "aten::scaled_dot_product_attention"}
    assert s["gpu_seconds_per_clip_by_kind"]["attention"] == round(485e-6, 4)
    assert s["idle_seconds_per_clip_by_gap_length"]["0.2-2ms"] == round(1195e-6, 4)
    assert list(s["idle_seconds_per_clip_by_host_op"]) == ["aten::item"]
