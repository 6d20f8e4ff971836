"""Capture: a model becomes torch-level FX graphs (one per Dynamo frame) whose nodes carry fake-tensor metadata.

`capture()` is what `explain()` and the CLI use: it runs the model once through Dynamo with a recording backend,
with batch and sequence dimensions of the inputs marked dynamic so that sizes stay symbolic (B, S).
The `torch.compile` path gets its graphs from Dynamo directly and only calls `attach_metadata`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from flashfx.rewriter.cost import node_value


@dataclass
class CapturedGraph:
    """One Dynamo frame: the graph, the real example inputs it was called with, and readable size names."""

    gm: fx.GraphModule
    example_inputs: List[Any]
    symbol_names: Dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)


def attach_metadata(gm: fx.GraphModule) -> fx.GraphModule:
    """Give every node `meta['val']` (Dynamo stores the fake value under `example_value`)."""
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
    return gm


def capture(model: torch.nn.Module | Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
            dynamic: bool = True, backend: Optional[Callable[..., Any]] = None,
            return_outputs: bool = False) -> Any:
    """Run `model(*args, **kwargs)` once through Dynamo and return the graphs it produced.

    With `dynamic=True`, dim 0 of every tensor input is marked dynamic (named B) and dim 1 of integer inputs
    of two or more dims (token ids, masks: named S), so costs come out as expressions in B and S.
    `backend`, if given, compiles each graph after it is recorded (the graphs then run compiled);
    with `return_outputs=True` the model's outputs are returned instead of the graphs.
    """
    kwargs = dict(kwargs or {})
    graphs: List[CapturedGraph] = []

    def record(gm: fx.GraphModule, example_inputs: List[Any]):
        attach_metadata(gm)
        graphs.append(CapturedGraph(gm, list(example_inputs)))
        return backend(gm, example_inputs) if backend is not None else gm.forward

    if dynamic:
        for value in [*args, *kwargs.values()]:
            mark_batch_and_sequence(value)
    compiled = torch.compile(model, backend=record, dynamic=None if dynamic else False)
    outputs = compiled(*args, **kwargs)
    for g in graphs:
        g.symbol_names = name_symbols(g.gm)
    return outputs if return_outputs else graphs


def mark_batch_and_sequence(value: Any) -> None:
    """Mark dim 0 (batch) of a tensor input, and dim 1 (sequence) of an integer input, dynamic for Dynamo."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return
    if value.shape[0] > 1:
        torch._dynamo.maybe_mark_dynamic(value, 0)
    if value.dim() >= 2 and not value.is_floating_point() and value.shape[1] > 1:
        torch._dynamo.maybe_mark_dynamic(value, 1)


def name_symbols(gm: fx.GraphModule) -> Dict[sympy.Symbol, sympy.Symbol]:
    """Readable names for size symbols: the first user-input dim where a symbol appears, dim 0 -> B, dim 1 -> S."""
    names: Dict[sympy.Symbol, sympy.Symbol] = {}
    taken = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node_value(node)
        if not isinstance(value, torch.Tensor):
            continue
        for i, d in enumerate(value.shape):
            if not isinstance(d, torch.SymInt):
                continue
            expr = d.node.expr
            if not isinstance(expr, sympy.Symbol) or expr in names:
                continue
            base = {0: "B", 1: "S"}.get(i, f"D{i}")
            name, k = base, 1
            while name in taken:
                k += 1
                name = f"{base}{k}"
            taken.add(name)
            names[expr] = sympy.Symbol(name, positive=True, integer=True)
    return names
