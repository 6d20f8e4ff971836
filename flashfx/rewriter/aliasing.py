"""Which ATen graph nodes share their input's storage, and which node owns a view's memory.

Used wherever a pass reasons about memory: the copies pass (is a buffer private?), the remat peak model (views cost
nothing), the CUDA-graph safety check (does an output alias an input?).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._ops import OpOverload

aten = torch.ops.aten


def shares_storage(node: fx.Node) -> bool:
    """The node's result is (part of) its first input's storage: an op whose schema marks its return as an alias
    (view, permute, split, expand, and in-place ops), `_unsafe_view` (unannotated, but it does), or an element of such
    an op's tuple result."""
    if node.op != "call_function":
        return False
    if node.target is aten._unsafe_view.default:
        return True
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and shares_storage(node.args[0])
    if not isinstance(node.target, OpOverload):
        return False
    return any(r.alias_info is not None for r in node.target._schema.returns)


def storage_owner(node: fx.Node) -> fx.Node:
    """The node whose memory `node` uses: storage-sharing ops followed back to their source."""
    while shares_storage(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node
