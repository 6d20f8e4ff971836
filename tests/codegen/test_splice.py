"""splice.topological_sort: after a group's kernel is spliced in at its last member, the graph is put back in order
moving as little as possible."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from flashfx.codegen import splice

aten = torch.ops.aten


def _names(graph: fx.Graph) -> list:
    return [n.name for n in graph.nodes if n.op == "call_function"]


def test_a_kernel_read_early_moves_up_to_its_reader_and_nothing_else_moves():
    # `kernel` stands for a fused group inserted after its last member; `early` reads it but sits before it, and
    # `later_1`, `later_2` (another layer's recompute: ready from the start) sit between them.
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")
    early = graph.call_function(aten.neg.default, (x,), name="early")
    later_1 = graph.call_function(aten.sin.default, (y,), name="later_1")
    later_2 = graph.call_function(aten.cos.default, (later_1,), name="later_2")
    kernel = graph.call_function(aten.exp.default, (x,), name="kernel")
    item = graph.call_function(operator.getitem, ((kernel,), 0), name="item")
    early.args = (item,)
    out = graph.call_function(aten.add.Tensor, (early, later_2), name="out")
    graph.output((out,))
    splice.topological_sort(graph)
    # before the fix, everything ready (later_1, later_2) ran ahead of the kernel its reader waited for
    assert _names(graph) == ["kernel", "item", "early", "later_1", "later_2", "out"]
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x", "y"]
    graph.lint()


def test_an_ordered_graph_is_left_as_it_is():
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(aten.sin.default, (x,), name="a")
    b = graph.call_function(aten.cos.default, (x,), name="b")
    c = graph.call_function(aten.add.Tensor, (a, b), name="c")
    graph.output((c,))
    before = list(graph.nodes)
    splice.topological_sort(graph)
    assert list(graph.nodes) == before
