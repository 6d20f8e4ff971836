"""Matmul + generated epilogue: linear + bias + activation + residual + cast, SwiGLU as one dual-GEMM kernel,
odd sizes (K not a multiple of the tile), forward and backward through AOTAutograd."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusion_helpers import assert_close, check_fwd_bwd, fuse_function

ACTIVATIONS = {
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "gelu_erf": F.gelu, "silu": F.silu, "relu": F.relu,
}


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_bias_activation_residual_cast(tmp_path, act, dtype):
    def fn(x, w, b, r):
        return (ACTIVATIONS[act](F.linear(x, w, b)) + r).to(torch.float16)

    torch.manual_seed(3)
    xs = [torch.randn(3, 7, 40, dtype=dtype), torch.randn(37, 40, dtype=dtype) / 6, torch.randn(37, dtype=dtype),
          torch.randn(3, 7, 37, dtype=dtype)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.matmul_epilogues"] == 1 and ctx.counters["fusion.groups"] == 1
    [(name, source)] = ctx.artifacts["kernels"]
    assert name.startswith("fused_mm_") and "tl.dot(" in source
    assert not any(n.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) for n in gm.graph.nodes)
    expected = fn(*[t.double() for t in xs])
    got = gm(*xs)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-2, atol=1e-2)


def test_swiglu_is_one_dual_gemm_kernel(tmp_path):
    def fn(x, wg, wu):
        return F.silu(x @ wg.t()) * (x @ wu.t())

    xs = [torch.randn(5, 9, 24), torch.randn(50, 24) / 5, torch.randn(50, 24) / 5]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.matmul_epilogues"] == 1
    [k] = [n.target for n in gm.graph.nodes if type(n.target).__name__ == "MatmulKernel"]
    assert len(k.plan.bs) == 2
    assert_close(gm(*xs), fn(*xs), dtype=torch.float16)  # tl.dot may use tf32-like sums: loose tolerance


class SwiGLUMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate, self.up = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d, bias=False)
        self.down = nn.Linear(3 * d, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)) + x


def test_swiglu_mlp_forward_backward(tmp_path):
    torch.manual_seed(4)
    backend = check_fwd_bwd(SwiGLUMLP(24), torch.randn(2, 11, 24), tmp_path, tol=(1e-4, 1e-4))
    assert backend.counter("forward", "fusion.matmul_epilogues") == 2  # gate+up+silu*mul; down+bias+residual
    assert backend.counter("backward", "fusion.matmul_epilogues") >= 1


def test_matmul_feeding_a_reduction_is_left_to_aten(tmp_path):
    def fn(x, w):
        return (x @ w).sum(-1)

    xs = [torch.randn(6, 8), torch.randn(8, 5)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters.get("fusion.matmul_epilogues", 0) == 0
    assert torch.ops.aten.mm.default in [n.target for n in gm.graph.nodes]
    assert_close(gm(*xs), fn(*xs))


def test_bmm_with_scale_bias_and_cast(tmp_path):
    def fn(q, k, bias):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.125 + bias  # [B*H, S, S] scores with an additive bias
        return torch.tanh(s).to(torch.float16), s.view(2, 3, 9, 9)

    xs = [torch.randn(6, 9, 20), torch.randn(6, 9, 20), torch.randn(9, 9)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.matmul_epilogues"] == 1 and ctx.counters["fusion.groups"] == 1
    assert torch.ops.aten.bmm.default not in [n.target for n in gm.graph.nodes]  # bias [S, S] per batch, in-kernel
    expected = fn(*[t.double() for t in xs])
    for g, e in zip(gm(*xs), expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g.double(), e.double().to(g.dtype).double(), rtol=1e-2, atol=1e-2)
