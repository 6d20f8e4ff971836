"""Splicing generated kernels into an ATen graph: a group's nodes become one call of its kernel (plus `getitem`s
and, for matmul groups, views back to each output's shape), the kernel's cost is registered with the cost model,
and the graph is put back in topological order."""
from __future__ import annotations

import heapq
import operator
from typing import Any, List

import sympy
import torch
import torch.fx as fx

from flashfx.rewriter import cost as cost_model

aten = torch.ops.aten


def topological_sort(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the original order wherever it is free."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    indeg = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(index[n], n.name) for n in nodes if indeg[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        n = by_name[name]
        order.append(n)
        for u in n.users:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, (index[u], u.name))
    assert len(order) == len(nodes), "fusion created a cycle"
    if order != nodes:
        for a, b in zip(order, order[1:]):
            a.append(b)


def replace_group(gm: fx.GraphModule, members: List[fx.Node], plan: Any, kernel: Any) -> None:
    graph = gm.graph
    args = tuple(t.node for t in plan.inputs) + tuple(plan.scalars)
    with graph.inserting_after(members[-1]):
        call = graph.call_function(kernel, args)
    call.meta["val"] = tuple(o.node.meta["val"] for o in plan.outputs)
    prev = call
    for i, o in enumerate(plan.outputs):
        with graph.inserting_after(prev):
            item = graph.call_function(operator.getitem, (call, i))
        item.meta["val"] = o.node.meta["val"]
        o.node.replace_all_uses_with(item, delete_user_cb=lambda u: u is not item)
        prev = item
    for m in reversed(members):
        graph.erase_node(m)


def replace_matmul_group(gm: fx.GraphModule, kernel: Any) -> None:
    plan = kernel.plan
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    members = sorted(set(plan.mms) | set(plan.members), key=order.get)
    template = plan.mms[0].meta["val"]
    with graph.inserting_after(members[-1]):
        call = graph.call_function(kernel, (plan.a, *plan.bs, *plan.inputs, *plan.scalars))
    call.meta["val"] = tuple(template.new_empty(template.shape, dtype=n.meta["val"].dtype) for _, n in plan.outputs)
    prev = call
    for i, (_, node) in enumerate(plan.outputs):
        with graph.inserting_after(prev):
            item = graph.call_function(operator.getitem, (call, i))
        item.meta["val"] = call.meta["val"][i]
        result = item
        if tuple(node.meta["val"].shape) != tuple(template.shape):  # to the node's shape, with the graph's own sizes
            with graph.inserting_after(item):
                result = graph.call_function(aten.view.default, (item, list(plan.view_shape)))
            result.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(result, delete_user_cb=lambda u, keep=(item, result): u not in keep)
        prev = result
    for m in reversed(members):
        graph.erase_node(m)


def register_kernel_cost(kernel: Any, members: List[fx.Node]) -> None:
    """The fused node's cost: its members' FLOPs, and its own inputs read and outputs written once."""
    flops = sum((cost_model.node_cost(m).flops for m in members), sympy.Integer(0))

    @cost_model.register_cost(kernel)
    def _cost(node: fx.Node, inputs: List[Any], output: Any) -> cost_model.NodeCost:
        read = sum((cost_model.tensor_bytes(t) for v in inputs for t in cost_model._tensors(v)), sympy.Integer(0))
        write = sum((cost_model.tensor_bytes(t) for t in cost_model._tensors(output)), sympy.Integer(0))
        return cost_model.NodeCost(flops, read, write)
