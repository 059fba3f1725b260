"""A block forward's layers captured as CUDA graphs and replayed (issue 12: the DiT's "other work").

One block forward launches about 3,000 kernels (40 layers of norms, fp8 quantisation, matrix products,
attention parts, ring writes). Launched from Python, one at a time, they cost the host about as long as
the GPU takes to run them, so the GPU waits between kernels. A CUDA graph records the whole launch
sequence once and replays it with one call.

A graph bakes in every address it touched: the weights, the prompt's K/V, the cond cache, the step
ring, and which of the ring's slots are read and written. So graphs are keyed by all of these (the
caller passes them as `key`); in steady state a segment needs one graph per step ring and block slot
(4 x 3 at the default 4 steps and 9-frame rings). What changes from block to block (tokens, timestep
modulation, RoPE tables, audio tokens) is copied into static input tensors before a replay, and the
result is copied out of the graph into one static output.

Nothing may compile during a capture, so a graph is captured only once a forward of the same structure
(the same shapes, ring runs of the same lengths) has run eagerly: that compiled the chains and planned
cuDNN's kernels for those shapes. The first forward of each structure runs eagerly; after it, every new
key is captured at first sight (the four step rings share their structure). All graphs share
one memory pool: they replay one at a time, in any order, and keep no tensor of the pool alive between
replays (inputs and output live outside it). The pool holds one block forward's activations for
good, which the memory estimate counts (`memory.estimate_memory`, "graph_pool").

Whoever changes what a graph baked in without changing its key (weights moved, fp8 applied, chains
switched) must drop the graphs: the engine makes a new `BlockGraphs` when its backends change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

GRAPHS_KEPT = 32  # 12 in steady state; a segment's first blocks (a filling ring) add a few


class BlockGraphs:
    """Captured layer loops by key, with the static tensors their replays read and write."""

    def __init__(self, device: torch.device, signature: Hashable = None, kept: int = GRAPHS_KEPT):
        self.device = device
        self.signature = signature  # what the graphs assume of the model (its backends)
        self.kept = kept
        self.pool = torch.cuda.graph_pool_handle()
        self.seen: set[Hashable] = set()
        self.graphs: OrderedDict[Hashable, torch.cuda.CUDAGraph] = OrderedDict()
        self.statics: dict[Hashable, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.captures = 0
        self.replays = 0

    def run(
        self,
        key: Hashable,
        structure: Hashable,
        fn: Callable[..., torch.Tensor],
        args: list[torch.Tensor],
    ) -> torch.Tensor:
        """`fn(*args)`, eagerly or by replaying its graph. `key` names everything the graph bakes in,
        `structure` what decides the shapes inside `fn` besides those of `args`. The result of a replay
        is a static tensor that the next replay overwrites: use it before running another block."""
        shapes = tuple((tuple(a.shape), a.stride(), a.dtype) for a in args)
        key = (key, shapes)
        if key not in self.graphs:
            if (structure, shapes) not in self.seen:
                self.seen.add((structure, shapes))
                return fn(*args)
            self._capture(key, fn, shapes, args)
        inputs, output = self.statics[shapes]
        for static, value in zip(inputs, args, strict=True):
            static.copy_(value)
        self.graphs.move_to_end(key)
        self.graphs[key].replay()
        self.replays += 1
        return output

    def _capture(
        self, key: Hashable, fn: Callable[..., torch.Tensor], shapes: Hashable, args: list[torch.Tensor]
    ) -> None:
        if shapes not in self.statics:
            inputs = [torch.empty_like(a) for a in args]  # same strides: the chains' guards hold
            self.statics[shapes] = (inputs, torch.empty_like(args[0]))
        inputs, output = self.statics[shapes]
        for static, value in zip(inputs, args, strict=True):
            static.copy_(value)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output.copy_(fn(*inputs))
        self.graphs[key] = graph
        self.captures += 1
        while len(self.graphs) > self.kept:
            self.graphs.popitem(last=False)


__all__ = ["GRAPHS_KEPT", "BlockGraphs"]
