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


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_an_epilogue_reads_a_stored_16bit_product_rounded(tmp_path, monkeypatch, backend):
    # h is returned (stored in fp16) and also read by the epilogue: h - 300 must be that of the stored h, as the
    # unfused graph computes it. Near 300 fp16's step is 0.25, so reading the fp32 accumulator differs visibly.
    monkeypatch.setenv("FLASHFX_MATMUL_BACKEND", backend)

    def fn(x, w, b):
        h = F.linear(x, w, b)
        return h, h - 300.0

    torch.manual_seed(4)
    xs = [torch.randn(6, 40, dtype=torch.float16), (torch.randn(24, 40) / 6).half(),
          torch.full((24,), 300.0, dtype=torch.float16)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.matmul_epilogues"] == 1
    h, shifted = gm(*xs)
    torch.testing.assert_close(shifted, h - 300.0, rtol=0, atol=0)


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


# ---------------------------------------------------------------- FLASHFX_MATMUL_BACKEND: ATen's matmul + epilogue

def _matmul_kernels(gm):
    return [n.target for n in gm.graph.nodes if type(n.target).__name__ == "MatmulKernel"]


ATEN_CASES = {  # name -> (fn, input shapes): odd M, N, K everywhere
    "bias_gelu_residual": (lambda x, w, b, r: F.gelu(F.linear(x, w, b)) + r, [(3, 7, 40), (37, 40), (37,), (3, 7, 37)]),
    "silu_cast": (lambda x, w: F.silu(x @ w.t()).to(torch.float16), [(2, 9, 24), (41, 24)]),
    "swiglu": (lambda x, wg, wu: F.silu(x @ wg.t()) * (x @ wu.t()), [(5, 9, 24), (50, 24), (50, 24)]),
    "bmm_scale_bias": (lambda q, k, b: torch.tanh(torch.bmm(q, k.transpose(1, 2)) * 0.125 + b),
                       [(6, 9, 20), (6, 11, 20), (9, 11)]),
}


@pytest.mark.parametrize("case", sorted(ATEN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aten_backend_matches_the_unfused_graph(tmp_path, monkeypatch, case, dtype):
    monkeypatch.setenv("FLASHFX_MATMUL_BACKEND", "aten")
    fn, shapes = ATEN_CASES[case]
    xs = [torch.randn(*s, dtype=dtype) / (s[-1] ** 0.5 if i else 1) for i, s in enumerate(shapes)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.matmul_aten"] == 1 and "fusion.matmul_triton" not in ctx.counters
    [kernel] = _matmul_kernels(gm)
    got = gm(*xs)
    assert list(kernel.choices.values()) == ["aten"]
    [(_, dumped)] = ctx.artifacts["kernels"]  # the epilogue kernel that runs after ATen's matmul
    assert "tl.dot(" not in dumped and "tl.load(p0_ptr" in dumped and "the matmul by ATen" in dumped
    expected = fn(*[t.double() for t in xs])
    assert got.shape == expected.shape and got.dtype == fn(*xs).dtype
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 and got.dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(got.double(), expected.to(got.dtype).double(), rtol=rtol, atol=atol)


def test_aten_backend_forward_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_MATMUL_BACKEND", "aten")
    torch.manual_seed(5)
    backend = check_fwd_bwd(SwiGLUMLP(24), torch.randn(2, 11, 24), tmp_path)  # fp32 tolerance: cuBLAS/ATen sums
    assert backend.counter("forward", "fusion.matmul_aten") == 2
    assert backend.counter("backward", "fusion.matmul_aten") >= 1
    assert backend.counter("forward", "fusion.matmul_triton") == 0


def test_default_backend_on_cpu_is_the_triton_kernel(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHFX_MATMUL_BACKEND", raising=False)
    xs = [torch.randn(6, 8), torch.randn(8, 5), torch.randn(5)]
    gm, ctx = fuse_function(lambda x, w, b: F.relu(x @ w + b), xs, tmp_path)
    assert ctx.counters["fusion.matmul_triton"] == 1 and "fusion.matmul_aten" not in ctx.counters
    [kernel] = _matmul_kernels(gm)
    assert_close(gm(*xs), F.relu(xs[0] @ xs[1] + xs[2]))
    assert list(kernel.choices.values()) == ["triton"]


def test_unknown_backend_is_a_value_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHFX_MATMUL_BACKEND", "cublas")
    with pytest.raises(ValueError, match="FLASHFX_MATMUL_BACKEND='cublas'.*auto, aten, triton, race"):
        fuse_function(lambda x, w: F.relu(x @ w), [torch.randn(6, 8), torch.randn(8, 5)], tmp_path)


def test_race_candidates_time_both_and_a_cached_choice_is_reused(tmp_path):
    from flashfx.codegen import autotune, kernel_cache
    from flashfx.codegen.matmul_epilogue import candidates

    raced = candidates(4096, 4096, 2, interpreting=False, backend="race")
    assert {c.get("backend", "triton") for c in raced} == {"triton", "aten"}
    assert all("BLOCK_K" not in c for c in raced if c.get("backend") == "aten")
    # a choice another process cached for this source and bucket is used as is: no timing, the ATen path runs
    xs = [torch.randn(6, 8), torch.randn(8, 5)]
    gm, _ = fuse_function(lambda x, w: F.relu(x @ w), xs, tmp_path)
    [kernel] = _matmul_kernels(gm)
    kernel.backend = "race"
    src, _ = kernel.source(ieee=True)
    [aten_config] = candidates(6, 5, 1, interpreting=True, backend="aten")
    bucket = f"race:mm:b1:m{autotune.next_pow2(6)}:n5:k8"
    kernel_cache.save_choice(str(tmp_path), kernel_cache.cache_key(src), bucket, aten_config)
    assert_close(gm(*xs), F.relu(xs[0] @ xs[1]))
    assert kernel.choices == {bucket: "aten"}
