"""Composite ATen ops -> the primitive pointwise ops and reductions the generator writes.

AOTAutograd keeps `_softmax`, `native_layer_norm` and their backwards as single nodes. Written out here (in fp32
for fp16/bf16 inputs, as the ATen kernels compute), they fuse with their neighbours: a residual add before a
norm, a cast after a softmax, the weight-gradient reduction of a norm's backward. New nodes get `meta['val']` by
running the op on the fake values, so symbolic sizes stay symbolic.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from flashfx.codegen.pointwise import LOW_PRECISION

aten = torch.ops.aten


def _val(x: Any) -> Any:
    return x.meta["val"] if isinstance(x, fx.Node) else x


class _Builder:
    """Adds nodes before `anchor`, each with the fake value its op computes."""

    def __init__(self, graph: fx.Graph, origin: str) -> None:
        self.graph = graph
        self.origin = origin

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        vargs, vkwargs = tree_map(_val, (args, kwargs))
        mode = torch._guards.detect_fake_mode([a for a in vargs if isinstance(a, torch.Tensor)])
        if mode is not None:
            with mode:
                node.meta["val"] = target(*vargs, **vkwargs)
        else:
            node.meta["val"] = target(*vargs, **vkwargs)
        node.meta["flashfx_origin"] = self.origin
        return node

    def cast(self, x: fx.Node, dtype: torch.dtype) -> fx.Node:
        return x if _val(x).dtype == dtype else self(aten._to_copy.default, x, dtype=dtype)

    def upcast(self, x: fx.Node) -> fx.Node:
        return self.cast(x, torch.float32) if _val(x).dtype in LOW_PRECISION else x


def _softmax(b: _Builder, node: fx.Node, log: bool) -> Optional[List[fx.Node]]:
    x, dim, half_to_float = node.args[:3]
    if half_to_float:
        x = b.cast(x, torch.float32)
    m = b(aten.amax.default, x, [dim], True)
    shifted = b(aten.sub.Tensor, x, m)
    e = b(aten.exp.default, shifted)
    z = b(aten.sum.dim_IntList, e, [dim], True)
    out = b(aten.sub.Tensor, shifted, b(aten.log.default, z)) if log else b(aten.div.Tensor, e, z)
    return [b.cast(out, _val(node).dtype)]


def _softmax_backward(b: _Builder, node: fx.Node, log: bool) -> Optional[List[fx.Node]]:
    g, y, dim = node.args[:3]
    if log:
        s = b(aten.sum.dim_IntList, g, [dim], True)
        out = b(aten.sub.Tensor, g, b(aten.mul.Tensor, b(aten.exp.default, y), s))
    else:
        gy = b(aten.mul.Tensor, g, y)
        s = b(aten.sum.dim_IntList, gy, [dim], True)
        out = b(aten.sub.Tensor, gy, b(aten.mul.Tensor, y, s))
    return [b.cast(out, _val(node).dtype)]


def _static_numel(shape: Sequence[Any]) -> Optional[int]:
    if any(isinstance(s, torch.SymInt) for s in shape):
        return None
    return int(math.prod(int(s) for s in shape))


def _layer_norm(b: _Builder, node: fx.Node) -> Optional[List[fx.Node]]:
    x, shape, w, bias, eps = node.args[:5]
    xv = _val(x)
    dims = list(range(xv.dim() - len(shape), xv.dim()))
    if _static_numel(shape) is None:
        return None
    xf = b.upcast(x)
    mean = b(aten.mean.dim, xf, dims, True)
    xc = b(aten.sub.Tensor, xf, mean)
    var = b(aten.mean.dim, b(aten.mul.Tensor, xc, xc), dims, True)
    rstd = b(aten.rsqrt.default, b(aten.add.Tensor, var, eps))
    y = b(aten.mul.Tensor, xc, rstd)
    if w is not None:
        y = b(aten.mul.Tensor, y, w)
    if bias is not None:
        y = b(aten.add.Tensor, y, bias)
    outs = _val(node)
    if _val(mean).shape != outs[1].shape:
        return None
    return [b.cast(y, outs[0].dtype), b.cast(mean, outs[1].dtype), b.cast(rstd, outs[2].dtype)]


def _layer_norm_backward(b: _Builder, node: fx.Node) -> Optional[List[fx.Node]]:
    go, x, shape, mean, rstd, w, bias, mask = node.args[:8]
    n = _static_numel(shape)
    if n is None:
        return None
    xv = _val(x)
    dims = list(range(xv.dim() - len(shape), xv.dim()))
    batch = list(range(xv.dim() - len(shape)))
    outs = _val(node)
    gof, xf = b.upcast(go), b.upcast(x)
    xhat = b(aten.mul.Tensor, b(aten.sub.Tensor, xf, mean), rstd)
    result: List[Optional[fx.Node]] = [None, None, None]
    if mask[0]:
        gxhat = b(aten.mul.Tensor, gof, w) if w is not None else gof
        a = b(aten.sum.dim_IntList, gxhat, dims, True)
        c = b(aten.sum.dim_IntList, b(aten.mul.Tensor, gxhat, xhat), dims, True)
        inner = b(aten.sub.Tensor, b(aten.sub.Tensor, b(aten.mul.Tensor, gxhat, float(n)), a),
                  b(aten.mul.Tensor, xhat, c))
        gi = b(aten.mul.Tensor, b(aten.mul.Tensor, rstd, 1.0 / n), inner)
        result[0] = b.cast(gi, outs[0].dtype)
    if len(mask) > 1 and mask[1] and w is not None:
        gw = b(aten.sum.dim_IntList, b(aten.mul.Tensor, gof, xhat), batch, False) if batch else \
            b(aten.mul.Tensor, gof, xhat)
        result[1] = b.cast(gw, outs[1].dtype)
    if len(mask) > 2 and mask[2] and bias is not None:
        gb = b(aten.sum.dim_IntList, gof, batch, False) if batch else b(aten.mul.Tensor, gof, 1.0)
        result[2] = b.cast(gb, outs[2].dtype)
    return result


DECOMPOSITIONS: Dict[Any, Callable[[_Builder, fx.Node], Optional[List[Optional[fx.Node]]]]] = {
    aten._softmax.default: lambda b, n: _softmax(b, n, log=False),
    aten._log_softmax.default: lambda b, n: _softmax(b, n, log=True),
    aten._softmax_backward_data.default: lambda b, n: _softmax_backward(b, n, log=False),
    aten._log_softmax_backward_data.default: lambda b, n: _softmax_backward(b, n, log=True),
    aten.native_layer_norm.default: _layer_norm,
    aten.native_layer_norm_backward.default: _layer_norm_backward,
}
NAMES = {aten._softmax.default: "softmax", aten._log_softmax.default: "log_softmax",
         aten._softmax_backward_data.default: "softmax_bwd", aten._log_softmax_backward_data.default: "log_softmax_bwd",
         aten.native_layer_norm.default: "layernorm", aten.native_layer_norm_backward.default: "layernorm_bwd"}


def decompose(gm: fx.GraphModule, accept: Callable[[fx.Node], bool]) -> int:
    """Write out every composite node that `accept`s; returns how many were decomposed."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        fn = DECOMPOSITIONS.get(node.target)
        if fn is None or not accept(node) or "val" not in node.meta:
            continue
        multi = isinstance(node.meta["val"], (tuple, list))
        users = list(node.users)
        if multi and not all(u.target is __import__("operator").getitem for u in users):
            continue
        with graph.inserting_before(node):
            results = fn(_Builder(graph, NAMES[node.target]), node)
        needed = {u.args[1] for u in users} if multi else {0}
        if results is None or any(results[i] is None for i in needed):
            continue  # nodes added for nothing are dead code; the graph's DCE removes them
        if multi:
            for u in users:
                u.replace_all_uses_with(results[u.args[1]])
                graph.erase_node(u)
        else:
            node.replace_all_uses_with(results[0])
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    return count
