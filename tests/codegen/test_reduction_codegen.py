"""Reductions with their prologue and epilogue in one generated kernel: softmax / log-softmax, LayerNorm and
RMSNorm forward and backward through AOTAutograd, residual + norm, reductions over any dim, the looped variant
for rows too long for registers, and dynamic sizes that do not recompile."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flashfx.codegen import autotune
from fusion_helpers import AOTFusion, assert_close, check_fwd_bwd, fuse_function, kernel_nodes


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class ResidualNorms(nn.Module):
    """Zoo-style block pieces around the matmuls: RMSNorm, residual add + LayerNorm, softmax, log-softmax."""

    def __init__(self, d):
        super().__init__()
        self.rms = RMSNorm(d)
        self.ln = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(self.proj(self.rms(x)) + x)
        return torch.softmax(h, -1) * 2.0 + torch.log_softmax(h * 0.5, -1)


class MLPBlock(nn.Module):
    """Llama-style: RMSNorm -> SwiGLU MLP -> residual, GELU(tanh) head."""

    def __init__(self, d):
        super().__init__()
        self.norm = RMSNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, 3 * d), nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, x):
        h = self.norm(x)
        return F.gelu(self.down(F.silu(self.gate(h)) * self.up(h)) + x, approximate="tanh")


@pytest.mark.parametrize("module_cls", [ResidualNorms, MLPBlock])
def test_blocks_forward_backward_through_aot(tmp_path, module_cls):
    torch.manual_seed(1)
    module = module_cls(41)
    backend = check_fwd_bwd(module, torch.randn(3, 5, 41), tmp_path)
    assert backend.counter("forward", "fusion.groups") >= 2
    assert backend.counter("backward", "fusion.groups") >= 2


def test_norm_groups_are_single_kernels(tmp_path):
    def fn(x, r, w, b):
        h = x + r  # residual add fuses into the norm's kernel
        return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h

    xs = [torch.randn(4, 7, 33), torch.randn(4, 7, 33), torch.randn(33), torch.randn(33)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.decomposed"] == 1
    assert ctx.counters["fusion.groups"] == 1
    [(name, source)] = ctx.artifacts["kernels"]
    assert name.startswith("fused_layernorm") and "persistent" in source
    assert_close(gm(*xs), fn(*xs))


def test_fp16_softmax_and_rmsnorm(tmp_path):
    def fn(x, w):
        y = torch.softmax(x.float(), -1).half()
        z = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).half() * w
        return y, z

    xs = [torch.randn(6, 70, dtype=torch.float16) * 3, torch.randn(70, dtype=torch.float16)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.groups"] == 2  # siblings reading the same x are not merged (no horizontal fusion)
    assert_close(gm(*xs), fn(*xs))


@pytest.mark.parametrize("dims,keepdim", [((0,), False), ((1,), True), ((0, 2), False), ((2,), False)])
def test_reduction_over_any_dims(tmp_path, dims, keepdim):
    def fn(x, y):
        s = (x * y).sum(dims, keepdim=keepdim)
        return s * 2.0 + 1.0, torch.amax(torch.exp(x), dims, keepdim=True) - 0.5

    xs = [torch.randn(5, 6, 9), torch.randn(6, 9)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.groups"] >= 1
    assert_close(gm(*xs), fn(*xs))


def test_looped_variant_for_long_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "PERSISTENT_MAX_RBLOCK", 32)  # rows of 100 no longer fit "registers"

    def fn(x, w, b):
        return torch.softmax(x, -1), F.layer_norm(x, (100,), w, b), torch.log_softmax(x, -1).sum(-1)

    xs = [torch.randn(9, 100), torch.randn(100), torch.randn(100)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert_close(gm(*xs), fn(*xs))
    kernels = [n.target for n in kernel_nodes(gm)]
    assert len(kernels) == 3  # softmax, layer norm, log-softmax + sum: independent groups
    assert all(sig.mode == "looped" for k in kernels for sig in k._variants if sig.mode != "persistent")
    assert all(any(sig.mode == "looped" for sig in k._variants) for k in kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_looped_softmax_finds_max_and_sum_in_one_pass(tmp_path, monkeypatch, dtype):
    # online softmax: a running max and a rescaled sum per lane, so softmax / log-softmax read a long row twice
    monkeypatch.setattr(autotune, "PERSISTENT_MAX_RBLOCK", 32)

    def fn(x):
        return torch.softmax(x, -1), torch.log_softmax(x.float(), -1).to(x.dtype)

    torch.manual_seed(3)
    x = (torch.randn(7, 150) * 4).to(dtype)
    x[1, :40] = float("-inf")           # masked entries, whole chunks of them
    x[2, :] = float("-inf")
    x[2, 149] = 2.0                     # one live entry, in the last chunk
    x[3, 77] = float("nan")             # NaN anywhere makes the row NaN, as in ATen
    x[4] = x[4] * 1000 if dtype == torch.float32 else x[4] * 10   # exp of the row's raw values overflows
    x[5] = torch.arange(150, dtype=dtype) * 0.1      # max grows at every element
    x[6] = torch.arange(150, 0, -1, dtype=dtype) * 0.1  # max found first, then never again
    gm, ctx = fuse_function(fn, [x], tmp_path)
    got, want = gm(x), fn(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    sources = [src for _, src in ctx.artifacts["kernels"]]
    assert len(sources) == 2
    # max + sum in one loop, then the output loop: two passes over the row where there were three
    assert all(src.count("for roffset") == 2 and "(online, with" in src for src in sources)


@pytest.mark.parametrize("index_bits", [32, 64])
def test_persistent_rows_in_a_pipelined_loop(tmp_path, monkeypatch, index_bits):
    # Without column sums, a persistent kernel may run fewer programs than row blocks, each walking its blocks in a
    # loop Triton pipelines (the next block's loads in flight during this one's math): same results, rows of every
    # program (and a partial last block) covered, in 32- and 64-bit offsets.
    from flashfx.codegen.kernel import FusedKernel

    monkeypatch.setattr(autotune, "ROW_STAGES", (3,))
    monkeypatch.setattr(FusedKernel, "row_loop_programs", staticmethod(lambda device: 3))
    if index_bits == 64:
        import flashfx.codegen.kernel as kernel_module
        monkeypatch.setattr(kernel_module, "INT32_REACH", 0)

    def fn(x, w, b):
        return torch.softmax(x, -1), F.layer_norm(x, (40,), w, b)

    xs = [torch.randn(61, 40), torch.randn(40), torch.randn(40)]  # 8 row blocks of 8 for 3 programs
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert_close(gm(*xs), fn(*xs))
    assert_close(gm(*xs), fn(*xs))  # the launch fast path
    for k in (n.target for n in kernel_nodes(gm)):
        [fast] = k._fast.values()
        assert fast.grid == (3,) and ran_variant_of(k) == "pipelined"
        [src] = [src.source for sig, (src, _) in k._variants.items() if sig.row_stages]
        assert "tl.range(" in src and "num_stages=3" in src
        assert ("tl.int64" in src) == (index_bits == 64)


def ran_variant_of(k) -> str:
    [config] = k._configs.values()
    return "pipelined" if config.get("row_stages") else config["mode"]


def test_dynamic_sequence_length_reuses_the_kernel(tmp_path):
    torch.manual_seed(2)
    module = RMSNorm(24)
    backend = AOTFusion(tmp_path)
    compiled = torch.compile(module, backend=backend, dynamic=True)
    for seq in (9, 5, 17):
        x = torch.randn(2, seq, 24, requires_grad=True)
        out = compiled(x)
        out.backward(torch.ones_like(out))
        x2 = x.detach().clone().requires_grad_()
        ref = module(x2)
        ref.backward(torch.ones_like(ref))
        assert_close(out.detach(), ref.detach())
        assert_close(x.grad, x2.grad)
    assert [c.stage for c in backend.contexts] == ["forward", "backward"]  # compiled once for every length
    kernels = [s for c in backend.contexts for _, s in c.artifacts["kernels"]]
    assert kernels and all("xnumel" in s for s in kernels)


def use_variant(monkeypatch, variant):
    """Make a kernel with column sums run as `variant`: "persistent", "prefetch" (persistent, loading its next row
    block ahead), "pipelined" (persistent, its row loop software-pipelined by Triton) or "looped"."""
    if variant == "looped":
        monkeypatch.setattr(autotune, "PERSISTENT_MAX_RBLOCK", 16)
    monkeypatch.setattr(autotune, "COLUMN_PREFETCH", (variant == "prefetch",))
    monkeypatch.setattr(autotune, "ROW_STAGES", (3 if variant == "pipelined" else 0,))


def ran_variant(gm) -> str:
    [k] = [n.target for n in kernel_nodes(gm)]
    [config] = k._configs.values()
    return "prefetch" if config.get("prefetch") else "pipelined" if config.get("row_stages") else config["mode"]


VARIANTS = ["persistent", "prefetch", "pipelined", "looped"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_norm_backward_with_weight_gradients_in_one_kernel(tmp_path, monkeypatch, variant):
    use_variant(monkeypatch, variant)

    def fn(x, w, b, g):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return torch.autograd.grad(F.layer_norm(h, (h.shape[-1],), w, b), (x, w, b), g)

    xs = [torch.randn(3, 11, 40), torch.randn(40), torch.randn(40), torch.randn(3, 11, 40)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.groups"] == 1  # forward recompute, dx and the three weight / bias gradients
    [k] = [n.target for n in kernel_nodes(gm)]
    assert sum(o.kind == "col" for o in k.plan.outputs) == 3
    # the bias gradient sums an input the kernel reads anyway (g): it joins as a column sum, g is read once
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
    assert_close(gm(*xs), fn(*xs))
    assert_close(gm(*xs), fn(*xs))  # the launch fast path zeroes the partials too
    assert ran_variant(gm) == variant


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_sum_of_what_a_row_group_reads_joins_it_only_over_its_rows(tmp_path, dtype):
    # dy.sum over the rows (a bias gradient) beside a row group that reads dy joins it as a column sum; a sum that
    # keeps the rows (over the reduced dim, or over part of the rows) is another kind of reduction and stays ATen.
    def fn(x, dy):
        return (torch.softmax(x * dy, -1), dy.sum((0, 1)), dy.sum(-1), dy.sum(0))

    xs = [torch.randn(3, 19, 40, dtype=dtype), torch.randn(3, 19, 40, dtype=dtype)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    [k] = [n.target for n in kernel_nodes(gm)]
    assert [o.kind for o in k.plan.outputs].count("col") == 1
    sums = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
    assert sorted(tuple(n.args[1]) for n in sums) == [(-1,), (0,)]
    assert_close(gm(*xs), fn(*xs), dtype)
    assert_close(gm(*xs), fn(*xs), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_column_sums_run_on_the_program_count_chosen(tmp_path, monkeypatch, variant):
    # The program count of a kernel with column sums is part of its config (timed on a GPU): a saved choice is
    # followed, clamped to the rows of the partials (a choice saved on a bigger GPU), and the results are the same,
    # with several row blocks per program (the persistent kernel sums them in registers, the looped one in memory).
    import json

    from flashfx.codegen.kernel import FusedKernel

    use_variant(monkeypatch, variant)
    monkeypatch.setattr(FusedKernel, "column_programs", staticmethod(lambda device: [3, 5]))

    def fn(x, w, g):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        return torch.autograd.grad(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, (x, w), g)

    xs = [torch.randn(50, 40), torch.randn(40), torch.randn(50, 40)]  # 7 row blocks of 8 in the interpreter

    def partial_rows(gm):
        [k] = [n.target for n in kernel_nodes(gm)]
        [fast] = k._fast.values()
        specs = fast.out_specs
        assert {o.kind for o in k.plan.outputs} == {"col", "full"}
        return {spec[0][0] for spec, o in zip(specs, k.plan.outputs) if o.kind == "col"}

    gm, _ = fuse_function(fn, xs, tmp_path)
    assert_close(gm(*xs), fn(*xs))
    assert partial_rows(gm) == {3}  # the default, the first count
    [choices_file] = (tmp_path / "autotune").glob("*.json")
    for saved, used in ((4, 4), (1000, 5)):
        choices = json.loads(choices_file.read_text())
        choices = {bucket: dict(c, programs=saved) for bucket, c in choices.items()}
        choices_file.write_text(json.dumps(choices))
        gm, _ = fuse_function(fn, xs, tmp_path)
        assert_close(gm(*xs), fn(*xs))
        assert_close(gm(*xs), fn(*xs))  # the fast path too
        assert partial_rows(gm) == {used}
        assert ran_variant(gm) == variant


def test_a_stored_16bit_value_is_rounded_before_the_group_reuses_it(tmp_path):
    # s = a + b is an output in fp16 and the input of the statistics: mean and variance must be those of the
    # stored (rounded) s, as a backward that recomputes x_hat from the saved s and the saved statistics assumes.
    # Near 300 fp16's step is 0.25, so the unrounded sum's statistics differ from the stored tensor's by ~1e-2.
    def fn(a, b):
        s = a + b
        m = s.float().mean(-1, keepdim=True)
        return s, m, (s.float() - m).pow(2).mean(-1, keepdim=True)

    a = (300.0 + torch.randn(6, 40)).half()
    b = (torch.randn(6, 40) * 0.1).half()
    gm, ctx = fuse_function(fn, [a, b], tmp_path)
    assert ctx.counters["fusion.groups"] == 1
    s, m, var = gm(a, b)
    stored = s.float()
    torch.testing.assert_close(s, a + b, rtol=0, atol=0)
    torch.testing.assert_close(m, stored.mean(-1, keepdim=True), rtol=0, atol=1e-4)
    torch.testing.assert_close(var, (stored - stored.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True),
                               rtol=1e-4, atol=1e-4)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROLOGUE = [lambda x: x * 1.5 - 0.25, torch.sigmoid, lambda x: torch.exp(x.clamp(max=3)), torch.tanh,
            lambda x: x * x]
EPILOGUE = [lambda h, r: h - r, lambda h, r: h * torch.rsqrt(r.abs() + 1.0), lambda h, r: torch.exp(h - r),
            lambda h, r: (h > r).float() * h]
REDUCE = {"sum": lambda t, d: t.sum(d, keepdim=True), "mean": lambda t, d: t.mean(d, keepdim=True),
          "amax": lambda t, d: t.amax(d, keepdim=True)}


@st.composite
def reduction_programs(draw):
    shape = draw(st.sampled_from([(5, 37), (3, 6, 11), (2, 3, 5, 7), (9, 1, 13)]))
    dims = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape) - 1))))
    pro = draw(st.lists(st.integers(0, len(PROLOGUE) - 1), min_size=0, max_size=3))
    red = draw(st.sampled_from(sorted(REDUCE)))
    epi = draw(st.integers(0, len(EPILOGUE) - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    looped = draw(st.booleans())
    return shape, dims, pro, red, epi, dtype, looped


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(reduction_programs())
def test_random_reduction_programs_match_aten(tmp_path_factory, monkeypatch, program):
    shape, dims, pro, red, epi, dtype, looped = program
    monkeypatch.setattr(autotune, "PERSISTENT_MAX_RBLOCK", 8 if looped else 8192)

    def fn(x, y):
        h = x.float() if x.dtype == torch.float16 else x
        for i in pro:
            h = PROLOGUE[i](h)
        r = REDUCE[red](h * y, dims)
        return EPILOGUE[epi](h, r).to(x.dtype), r

    torch.manual_seed(len(pro) + epi)
    xs = [torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype)]
    gm, ctx = fuse_function(fn, xs, tmp_path_factory.mktemp("cache"))
    assert ctx.counters.get("fusion.groups", 0) >= 1
    assert_close(gm(*xs), fn(*xs), dtype=torch.float16 if dtype == torch.float16 else torch.float32)
