"""Compiled graphs take their inputs boxed and drop each one after its last use (memory of saved activations)."""
import weakref

import torch
import torch.fx as fx

from flashfx._compat import boxed_graph_module


def test_boxed_graph_module_frees_an_input_after_its_last_use():
    seen = {}

    def probe(t):  # runs after x's last use: x must be gone by now
        seen["x_alive"] = x_ref() is not None
        return t + 1

    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    a = g.call_function(torch.sin, (x,))
    b = g.call_function(probe, (y,))
    g.output((a, b))
    gm = boxed_graph_module(fx.GraphModule({}, g))
    x_t, y_t = torch.randn(5), torch.randn(5)
    x_ref = weakref.ref(x_t)
    expected = (torch.sin(x_t), y_t + 1)
    args = [x_t, y_t]
    del x_t
    out = gm(args)
    assert args == []  # the caller's list is emptied: the graph holds the only references
    assert seen["x_alive"] is False
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], expected[1])
