"""Canonicalization: every spelling becomes the one canonical call, values (and meta['val']) stay the same."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from flashfx.config import Config
from flashfx.rewriter.canonicalize import canonicalize
from flashfx.rewriter.capture import capture
from flashfx.rewriter.pass_manager import PassContext


def _real(x):
    return x.node.hint if isinstance(x, torch.SymInt) else x


def run(fn, *args):
    """Capture fn, canonicalize; returns (ctx, gm, outputs before, outputs after)."""
    (g,) = capture(fn, args)
    inputs = [_real(x) for x in g.example_inputs]
    before = g.gm(*inputs)
    original = set(g.gm.graph.nodes)
    ctx = PassContext(Config())
    result = canonicalize(g.gm, ctx)
    gm = result.graph_module
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n not in original:
            val = n.meta.get("val")
            assert isinstance(val, torch.Tensor), f"{n.format_node()} has no fake value"
    for a, b in zip(before, gm(*inputs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    return ctx, gm, result.modified


def calls(gm: fx.GraphModule):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def targets(gm):
    return [n.target for n in calls(gm)]


x4 = lambda: torch.randn(2, 3, 4, 5)  # noqa: E731
y4 = lambda: torch.randn(2, 3, 5, 6)  # noqa: E731

MATMULS = {
    "operator": lambda a, b: a @ b,
    "torch.matmul": lambda a, b: torch.matmul(a, b),
    "Tensor.matmul": lambda a, b: a.matmul(b),
    "bmm": lambda a, b: torch.bmm(a[0], b[0]),
    "Tensor.bmm": lambda a, b: a[0].bmm(b[0]),
    "mm": lambda a, b: torch.mm(a[0, 0], b[0, 0]),
    "einsum": lambda a, b: torch.einsum("bhqd,bhdk->bhqk", a, b),
    "einsum_ellipsis": lambda a, b: torch.einsum("...qd,...dk->...qk", a, b),
}


@pytest.mark.parametrize("name", list(MATMULS))
def test_matmul_spellings(name):
    ctx, gm, _ = run(lambda a, b: (MATMULS[name](a, b),), x4(), y4())
    assert targets(gm).count(torch.matmul) == 1
    assert not any(t in targets(gm) for t in (operator.matmul, torch.bmm, torch.mm, torch.einsum, "matmul", "bmm"))


def test_einsum_qk_transposed_operand():
    q, k = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 7, 5)
    ctx, gm, _ = run(lambda q, k: (torch.einsum("bhqd,bhkd->bhqk", q, k),), q, k)
    (mm,) = [n for n in calls(gm) if n.target is torch.matmul]
    perm = mm.args[1]
    assert perm.target is torch.permute and perm.args[1] == (0, 1, 3, 2)
    assert ctx.counters["canonicalize.einsum"] == 1


def test_einsum_not_a_matmul_is_left_alone():
    ctx, gm, modified = run(lambda a: (torch.einsum("bhqd->bqhd", a), torch.einsum("ij,ij->i", a[0, 0], a[0, 0])),
                            x4())
    assert targets(gm).count(torch.einsum) == 2 and not modified


DIVS = {
    "operator": lambda s: s / 4.0,
    "torch.div": lambda s: torch.div(s, 4),
    "Tensor.div": lambda s: s.div(4.0),
    "true_divide": lambda s: torch.true_divide(s, 4),
    "mul_left": lambda s: 0.25 * s,
    "torch.mul": lambda s: torch.mul(s, 0.25),
    "Tensor.mul": lambda s: s.mul(0.25),
}


@pytest.mark.parametrize("name", list(DIVS))
def test_scalar_scale_spellings(name):
    ctx, gm, _ = run(lambda s: (DIVS[name](s),), x4())
    (node,) = calls(gm)
    assert node.target is operator.mul and isinstance(node.args[0], fx.Node) and node.args[1] == 0.25


def test_division_left_alone_when_not_a_float_constant():
    def fn(s, t):
        ints = torch.ones(3, dtype=torch.long)
        return s // 2, torch.div(s, 3, rounding_mode="floor"), s / t, 2.0 / s, torch.div(ints, 2)

    ctx, gm, _ = run(fn, x4(), x4())
    assert operator.mul not in targets(gm)


SOFTMAXES = {
    "F.softmax": lambda s: F.softmax(s, dim=-1),
    "F.softmax_positional": lambda s: F.softmax(s, -1),
    "Tensor.softmax": lambda s: s.softmax(-1),
    "torch.softmax": lambda s: torch.softmax(s, 3),
    "F.softmax_dtype": lambda s: F.softmax(s, dim=-1, dtype=torch.float64),
    "Tensor.softmax_dtype": lambda s: s.softmax(-1, dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_spellings(name):
    ctx, gm, _ = run(lambda s: (SOFTMAXES[name](s),), x4())
    (node,) = calls(gm)
    assert node.target is torch.softmax and node.args[1:] == (3,)
    assert node.kwargs == ({"dtype": torch.float64} if name.endswith("dtype") else {})


PERMUTES = {
    "transpose": (lambda t: t.transpose(-2, -1), (0, 1, 3, 2)),
    "torch.transpose": (lambda t: torch.transpose(t, 1, 2), (0, 2, 1, 3)),
    "swapaxes": (lambda t: t.swapaxes(0, 3), (3, 1, 2, 0)),
    "swapdims": (lambda t: torch.swapdims(t, 1, 2), (0, 2, 1, 3)),
    "permute_varargs": (lambda t: t.permute(0, 2, 3, 1), (0, 2, 3, 1)),
    "permute_tuple": (lambda t: torch.permute(t, (0, -1, 1, 2)), (0, 3, 1, 2)),
    "mT": (lambda t: t.mT, (0, 1, 3, 2)),
    "composed": (lambda t: t.transpose(1, 2).transpose(-1, -2), (0, 2, 3, 1)),
}


@pytest.mark.parametrize("name", list(PERMUTES))
def test_permute_spellings(name):
    fn, dims = PERMUTES[name]
    ctx, gm, _ = run(lambda t: (fn(t),), x4())
    (node,) = calls(gm)
    assert node.target is torch.permute and node.args[1] == dims


def test_t_and_T_on_matrices():
    ctx, gm, _ = run(lambda m: (m.t(), m.T), torch.randn(3, 4))
    assert [n.target for n in calls(gm)] == [torch.permute, torch.permute]
    assert all(n.args[1] == (1, 0) for n in calls(gm))


def test_attention_spelling_becomes_canonical_chain():
    def fn(q, k, v):
        return (F.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / 8.0, dim=-1).matmul(v),)

    q = torch.randn(2, 3, 4, 8)
    ctx, gm, _ = run(fn, q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8))
    assert targets(gm) == [torch.permute, torch.matmul, operator.mul, torch.softmax, torch.matmul]


def test_canonical_graph_is_a_fixed_point():
    def fn(q, k):
        return (torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.5, -1),)

    (g,) = capture(fn, (torch.randn(2, 4, 8), torch.randn(2, 5, 8)))
    ctx = PassContext(Config())
    assert canonicalize(g.gm, ctx).modified
    again = PassContext(Config())
    assert not canonicalize(g.gm, again).modified and not again.counters


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_STEPS = {
    "transpose": lambda t, a, b: t.transpose(a, b),
    "swapaxes": lambda t, a, b: torch.swapaxes(t, a, b),
    "mT": lambda t, a, b: t.mT,
    "permute_roll": lambda t, a, b: t.permute(*[(i + a) % t.dim() for i in range(t.dim())]),
}


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(sorted(_STEPS)), st.integers(-4, 3), st.integers(-4, 3)),
                           min_size=1, max_size=4))
def test_chains_of_permutations_become_one_permute(steps):
    torch._dynamo.reset()

    def fn(t):
        for name, a, b in steps:
            t = _STEPS[name](t, a, b)
        return (t * 2.0,)

    ctx, gm, _ = run(fn, torch.randn(2, 3, 4, 5))
    perms = [n for n in calls(gm) if n.target is torch.permute]
    assert len(perms) <= 1  # the whole chain composed into one view
    assert all(n.target in (torch.permute, operator.mul) for n in calls(gm))


@pytest.mark.parametrize("beta,alpha", [(0.0, 0.125), (1.0, 0.5), (2.0, 1.0)])
def test_baddbmm_expands(beta, alpha):
    def fn(inp, a, b):
        return (torch.baddbmm(inp, a, b, beta=beta, alpha=alpha),)

    ctx, gm, _ = run(fn, torch.randn(6, 4, 7), torch.randn(6, 4, 5), torch.randn(6, 5, 7))
    assert torch.baddbmm not in targets(gm) and torch.matmul in targets(gm)
    assert (operator.add in targets(gm)) == (beta != 0)
