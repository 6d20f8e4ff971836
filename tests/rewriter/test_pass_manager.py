"""The pass manager: order, lint, counters, timing, error context and debug bisection."""
import operator

import pytest
import torch
import torch.fx as fx

import flashfx
from flashfx.config import Config
from flashfx.rewriter.pass_manager import PassDivergence, PassManager, PassResult


class Small(torch.nn.Module):
    def forward(self, x, y):
        return torch.relu(x + y) * 2.0


def _gm():
    return fx.symbolic_trace(Small())


def _inputs():
    return [torch.randn(3, 5), torch.randn(3, 5)]


def keep(gm, ctx):
    ctx.count("keep.looked")
    return PassResult(gm, False)


def add_to_sub(gm, ctx):
    """Deliberately broken: rewrites x + y into x - y."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.add:
            node.target = operator.sub
            ctx.count("add_to_sub.rewritten")
    return PassResult(gm, True)


def relu_to_clamp(gm, ctx):
    """Sound: relu(x) == clamp_min(x, 0)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.relu:
            node.target = torch.clamp_min
            node.args = (node.args[0], 0.0)
            ctx.count("relu_to_clamp.rewritten")
        elif node.op == "call_function" and node.target is operator.mul:
            ctx.decline("relu_to_clamp", node, "not a relu")
    return PassResult(gm, True)


def test_runs_in_order_and_records_counters_time_and_declines():
    pm = PassManager([("keep", keep), ("relu_to_clamp", relu_to_clamp)], Config())
    gm = pm.run(_gm(), _inputs())
    assert [r.name for r in pm.records] == ["keep", "relu_to_clamp"]
    assert pm.records[0].changed is False and pm.records[1].changed is True
    assert pm.records[0].counters == {"keep.looked": 1}
    assert pm.records[1].counters == {"relu_to_clamp.rewritten": 1, "relu_to_clamp.declined": 1}
    assert "not a relu" in pm.records[1].declined[0].reason
    assert all(r.seconds >= 0 for r in pm.records)
    x, y = _inputs()
    assert torch.equal(gm(x, y), Small()(x, y))


def test_debug_names_the_first_pass_that_diverges():
    pm = PassManager([("relu_to_clamp", relu_to_clamp), ("add_to_sub", add_to_sub), ("keep", keep)],
                     Config(debug=True))
    with pytest.raises(PassDivergence, match="'add_to_sub'"):
        pm.run(_gm(), _inputs())
    assert [r.name for r in pm.records] == ["relu_to_clamp"]


def test_without_debug_a_broken_pass_is_not_checked():
    pm = PassManager([("add_to_sub", add_to_sub)], Config(debug=False))
    pm.run(_gm(), _inputs())
    assert pm.records[0].changed


def test_a_crashing_pass_is_named():
    def boom(gm, ctx):
        raise KeyError("no such node")

    with pytest.raises(RuntimeError, match="pass 'boom' failed"):
        PassManager([("boom", boom)], Config()).run(_gm(), _inputs())


def test_lint_catches_a_malformed_graph():
    def dangling(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.target is torch.relu)
        node.args = (torch.fx.Node(gm.graph, "ghost", "placeholder", "ghost", (), {}),)
        return PassResult(gm, True)

    with pytest.raises(RuntimeError):
        PassManager([("dangling", dangling)], Config()).run(_gm(), _inputs())


def test_debug_bisection_through_the_backend(monkeypatch):
    """A broken torch-level pass wired into the compiler is named by debug mode."""
    from flashfx import compiler

    monkeypatch.setattr(compiler, "torch_passes", lambda config: [("keep", keep), ("add_to_sub", add_to_sub)])
    fast = flashfx.optimize(Small(), config=Config(debug=True, fusion=False))
    with pytest.raises(Exception, match="add_to_sub"):
        fast(*_inputs())


def test_debug_does_not_compare_graphs_that_draw_random_numbers():
    class WithDropout(torch.nn.Module):
        def forward(self, x, y):
            return torch.nn.functional.dropout(torch.relu(x + y), 0.5, True)

    pm = PassManager([("relu_to_clamp", relu_to_clamp)], Config(debug=True))
    pm.run(fx.symbolic_trace(WithDropout()), _inputs())
    assert any("draws random numbers" in note for note in pm.records[0].notes)


def test_debug_still_compares_dropout_in_eval():
    class EvalDropout(torch.nn.Module):
        def forward(self, x, y):
            return torch.nn.functional.dropout(x + y, 0.5, False)

    pm = PassManager([("add_to_sub", add_to_sub)], Config(debug=True))
    with pytest.raises(PassDivergence, match="add_to_sub"):
        pm.run(fx.symbolic_trace(EvalDropout()), _inputs())
