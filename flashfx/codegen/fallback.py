"""The ATen subgraph a generated kernel replaces, kept as a callable: if the kernel fails to compile or launch on
its first call (a Triton version or device the generator was not tested on), the group runs as the ATen ops it
was, with a warning, instead of failing the model."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.fx as fx

from flashfx import _compat


def extract(members: Sequence[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node],
            aliases: Dict[fx.Node, fx.Node] = {}) -> Optional[fx.GraphModule]:
    """A GraphModule computing `outputs` from `inputs` (one placeholder per position) with copies of `members`;
    `aliases` maps other nodes the members read to the input that holds the same tensor. None if incomplete."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        p = graph.placeholder(f"in{i}")
        p.meta = dict(node.meta)
        env.setdefault(node, p)
    for other, same in aliases.items():
        if same in env:
            env.setdefault(other, env[same])
    try:
        for node in members:
            env[node] = graph.node_copy(node, lambda n: env[n])
    except KeyError:
        return None
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(torch.nn.Module(), graph)


class Fallback:
    """Holds the reference; `run(fn, *args)` calls `fn` and switches to the reference for good if it raises."""

    def __init__(self, name: str, reference: Optional[fx.GraphModule], n_inputs: int) -> None:
        self.name = name
        self.reference = reference
        self.n_inputs = n_inputs
        self.active = False
        self.error = ""  # why the kernel was given up, once active (the report lists it)
        self.on_fallback: Callable[[Sequence[Any]], tuple] = self  # how the kernel's callers want the outputs

    def __call__(self, args: Sequence[Any]) -> tuple:
        return tuple(self.reference(*args[:self.n_inputs]))

    def guard(self, fn: Callable[[], tuple], args: Sequence[Any]) -> tuple:
        if self.active:
            return self.on_fallback(args)
        try:
            return fn()
        except Exception as e:  # the kernel, not the model, is at fault: keep the model running
            # no reference, or under the interpreter (tests): the failure itself is what must be seen
            if self.reference is None or _compat.triton_interpreting():
                raise
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"flashfx: generated kernel {self.name} failed ({self.error}); running its ATen ops instead")
            self.active = True
            return self.on_fallback(args)
