"""flashfx::attention: the Triton kernels (through the interpreter on CPU) and the ATen reference path, against a
float64 reference: outputs and every gradient, over causal / masks / biases / GQA / dropout / odd sizes / strides."""
import math
from unittest import mock

import pytest
import torch

import flashfx.codegen.attention as A
from flashfx._compat import triton_runs_on

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def ref64(q, k, v, bias=None, causal=False, scale=None, keep=None, p=0.0):
    """float64 attention; GQA by repeat; fully masked rows give 0; `keep` is a dropout mask [B, Hq, L, S]."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.double()
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    # softmax that is 0, with 0 gradient, on rows with no visible key (torch.softmax would give NaN there)
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isneginf(m), torch.zeros_like(m), m))
    d = e.sum(-1, keepdim=True)
    probs = e / torch.where(d == 0, torch.ones_like(d), d)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return probs @ v


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def make(B, Hq, Hkv, L, S, D, dtype, transposed=True):
    """q (and k) from a transpose of [B, seq, H, D], as a model's projections give them: non-contiguous."""
    q = torch.randn(B, L, Hq, D, dtype=dtype).transpose(1, 2) if transposed else torch.randn(B, Hq, L, D, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, dtype=dtype).transpose(1, 2) if transposed else torch.randn(B, Hkv, S, D, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def make_bias(kind, B, Hq, L, S, dtype):
    if kind == "float":  # ALiBi-like: per head and position, broadcast over batch
        return (torch.randn(1, Hq, L, S, dtype=dtype) * 2).requires_grad_()
    if kind == "float2d":  # [L, S] additive mask with -inf entries, with a gradient
        b = torch.randn(L, S, dtype=dtype)
        b[:, : S // 3] = float("-inf")
        return b.requires_grad_()
    if kind == "bool":  # key padding mask [B, 1, 1, S]
        m = torch.rand(B, 1, 1, S) > 0.3
        m[..., 0] = True
        return m
    return None


def check_against_ref(q, k, v, bias, causal, scale=None):
    wrt = [q, k, v] + ([bias] if bias is not None and bias.is_floating_point() else [])
    out = torch.ops.flashfx.attention(q, k, v, bias, causal, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, wrt, dout)
    leaves = [t.detach().double().requires_grad_() for t in wrt]
    ref_bias = leaves[3] if len(leaves) == 4 else bias
    ref = ref64(*leaves[:3], ref_bias, causal, scale)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    tol = TOL[q.dtype]
    assert rel(out, ref) < tol, ("out", rel(out, ref))
    for name, g, rg in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == wrt[["dq", "dk", "dv", "dbias"].index(name)].dtype
        assert torch.isfinite(g).all(), name
        assert rel(g, rg) < tol, (name, rel(g, rg))


CASES = [  # B, Hq, Hkv, L, S, D, causal, bias
    (2, 4, 4, 17, 17, 64, False, None),
    (1, 4, 2, 129, 33, 40, True, None),       # GQA, L > S, causal
    (1, 2, 1, 1, 129, 80, False, None),       # MQA, a single query
    (2, 2, 2, 33, 17, 96, True, "float"),     # bias gradient reduced over the batch
    (2, 4, 2, 20, 31, 64, False, "bool"),     # padding mask, GQA
    (1, 2, 2, 17, 40, 32, True, "float2d"),   # [L, S] bias with -inf, L != S
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[3]}x{c[4]}-d{c[5]}-h{c[1]}/{c[2]}-c{int(c[6])}-{c[7]}"
                                             for c in CASES])
def test_kernels_match_float64_fp32(case):
    B, Hq, Hkv, L, S, D, causal, kind = case
    q, k, v = make(B, Hq, Hkv, L, S, D, torch.float32)
    bias = make_bias(kind, B, Hq, L, S, torch.float32)
    with mock.patch.object(A, "_launch_forward", wraps=A._launch_forward) as fwd, \
         mock.patch.object(A, "_launch_backward", wraps=A._launch_backward) as bwd:
        check_against_ref(q, k, v, bias, causal)
    if triton_runs_on(q.device):  # the kernels ran, not the reference
        assert fwd.call_count == 1 and bwd.call_count == 1


@pytest.mark.parametrize("case", [(2, 2, 2, 37, 45, 64, True, None), (1, 4, 2, 24, 17, 80, False, "float")])
def test_kernels_match_float64_fp16(case):
    B, Hq, Hkv, L, S, D, causal, kind = case
    q, k, v = make(B, Hq, Hkv, L, S, D, torch.float16)
    check_against_ref(q, k, v, make_bias(kind, B, Hq, L, S, torch.float16), causal)


@pytest.mark.parametrize("loop,bwd", [("single", "atomic"), ("split", "atomic"), ("single", "split")])
def test_kernel_variants(monkeypatch, loop, bwd):
    """The non-default loop / backward variants (chosen by FLASHFX_ATTENTION_LOOP / _BWD) compute the same."""
    monkeypatch.setenv("FLASHFX_ATTENTION_LOOP", loop)
    monkeypatch.setenv("FLASHFX_ATTENTION_BWD", bwd)
    q, k, v = make(1, 4, 2, 33, 40, 40, torch.float32)
    check_against_ref(q, k, v, make_bias("bool", 1, 4, 33, 40, torch.float32), True, scale=0.3)


@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="the persistent grid is a kernel variant")
@pytest.mark.parametrize("case", CASES, ids=[f"{c[3]}x{c[4]}-d{c[5]}-h{c[1]}/{c[2]}-c{int(c[6])}-{c[7]}"
                                             for c in CASES])
def test_persistent_forward_matches_float64(monkeypatch, case):
    """FLASHFX_ATTENTION_FWD=persistent: a few programs (3 on the interpreter) stride over every query tile of every
    head, causal ones last-first; out, LSE and the backward on top of them as with one program per tile."""
    monkeypatch.setenv("FLASHFX_ATTENTION_FWD", "persistent")
    B, Hq, Hkv, L, S, D, causal, kind = case
    q, k, v = make(B, Hq, Hkv, L, S, D, torch.float32)
    before = A.FORWARD_LAUNCHES["persistent"]
    check_against_ref(q, k, v, make_bias(kind, B, Hq, L, S, torch.float32), causal)
    assert A.FORWARD_LAUNCHES["persistent"] == before + 1


@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="the persistent grid is a kernel variant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_persistent_forward_computes_each_tile_as_the_pointer_grid_does(monkeypatch, dtype):
    """Same tiles, same arithmetic, another order: equal outputs, with a bias and dropout (its mask is keyed on the
    row, column and head, not on the program)."""
    q, k, v = make(2, 4, 2, 45, 37, 64, dtype)
    bias = make_bias("float", 2, 4, 45, 37, dtype)
    outs = {}
    for variant in ("pointer", "persistent"):
        monkeypatch.setenv("FLASHFX_ATTENTION_FWD", variant)
        torch.manual_seed(1)  # the same dropout seed for both
        out, lse, _ = torch.ops.flashfx.attention_fwd(q, k, v, bias, True, None, 0.3)
        outs[variant] = out, lse
    torch.testing.assert_close(outs["persistent"], outs["pointer"], rtol=0, atol=0)


class ReplayedLaunch:
    """Stands in for a `launch.BoundCall` on the CPU: relaunches through Triton (the interpreter) with the bound
    call's arguments and the tensors it is given, so a plan that put a tensor in the wrong slot, or was reused for a
    call it does not fit, gives a wrong answer here."""

    replays = 0

    def __init__(self, run, grid, args, kwargs):
        self.run, self.grid, self.args, self.kwargs = run, grid, list(args), kwargs or {}
        self.slots = [i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)]

    def launch(self, tensors, device, stream):
        args = list(self.args)
        for i, t in zip(self.slots, tensors, strict=True):
            args[i] = t
        self.run(self.grid, args, self.kwargs)
        ReplayedLaunch.replays += 1
        return True


@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="replays through the CPU interpreter; the GPU "
                    "test below binds real kernels")
def test_launch_plans_replay_only_the_calls_they_fit(monkeypatch):
    # On the GPU a repeated call shape (no bias, no dropout) launches from a plan of bound kernels; here the plans
    # replay through the interpreter. Shapes, strides, causal, scale and GQA vary between calls that share nothing
    # but the kernels; each call is checked against float64.
    from flashfx.codegen import launch

    def bind(self, grid, args, kwargs=None):
        self(grid, args, kwargs)
        return ReplayedLaunch(self, grid, args, kwargs)

    monkeypatch.setattr(launch.Launcher, "bind", bind)
    monkeypatch.setattr(launch, "direct_stream", lambda: (0, 0))
    monkeypatch.setattr(A, "_plans_apply", lambda q, bias, dropout_p: bias is None and not dropout_p)
    monkeypatch.setattr(A, "_PLANS", type(A._PLANS)())
    calls = [((1, 2, 2, 17, 17, 32), True, None, True), ((1, 4, 2, 24, 40, 40), False, 0.3, False),
             ((2, 2, 1, 9, 33, 32), False, None, True), ((1, 2, 2, 17, 17, 32), True, None, False)]
    for _ in range(3):  # (at most) autotune, bind, replay
        ReplayedLaunch.replays = 0
        for shape, causal, scale, transposed in calls:
            q, k, v = make(*shape, torch.float32, transposed=transposed)
            check_against_ref(q, k, v, None, causal, scale=scale)
    assert len(A._PLANS) == 2 * len(calls)  # a forward and a backward plan per call shape
    assert ReplayedLaunch.replays == len(calls) * 4  # the third round: 1 forward + 3 backward launches each
    q, k, v = make(1, 2, 2, 17, 17, 32, torch.float32)
    check_against_ref(q, k, v, make_bias("bool", 1, 2, 17, 17, torch.float32), True)  # a mask: no plan
    assert len(A._PLANS) == 2 * len(calls) and ReplayedLaunch.replays == len(calls) * 4


def test_reference_path_matches_float64():
    """Where Triton cannot run, the ATen reference answers, with the same semantics and gradients."""
    q, k, v = make(2, 4, 2, 19, 23, 48, torch.float32)
    with mock.patch.object(A, "_use_kernels", return_value=False), \
         mock.patch.object(A, "_launch_forward") as fwd:
        check_against_ref(q, k, v, make_bias("float", 2, 4, 19, 23, torch.float32), True)
        q, k, v = make(1, 2, 2, 9, 9, 32, torch.float16)
        check_against_ref(q, k, v, make_bias("bool", 1, 2, 9, 9, torch.float16), False)
    assert fwd.call_count == 0


def test_bf16_on_cpu_runs_the_reference():
    """The interpreter gets bf16 wrong on the CPU, so bf16 CPU tensors take the ATen reference there."""
    q, k, v = make(1, 2, 1, 21, 19, 64, torch.bfloat16)
    with mock.patch.object(A, "_launch_forward") as fwd:
        out = torch.ops.flashfx.attention(q, k, v, None, True)
    assert fwd.call_count == 0 and out.dtype == torch.bfloat16
    assert rel(out, ref64(q, k, v, None, True)) < 1e-2


@pytest.mark.parametrize("use_kernels", [True, False])
def test_fully_masked_rows_give_zero_output_and_gradient(use_kernels):
    B, H, L, S, D = 1, 2, 12, 20, 32
    q, k, v = make(B, H, H, L, S, D, torch.float32)
    mask = torch.rand(B, H, L, S) > 0.5
    mask[:, :, 3] = False  # row 3 sees no key
    bias = torch.randn(B, H, L, S)
    bias[:, 1, 7] = float("-inf")  # row 7 of head 1 too, through -inf
    bias.requires_grad_()
    with mock.patch.object(A, "_use_kernels", return_value=use_kernels and triton_runs_on(q.device)):
        for b in (mask, bias):
            out = torch.ops.flashfx.attention(q, k, v, b)
            grads = torch.autograd.grad(out, [q, k, v] + ([b] if b.is_floating_point() else []), torch.randn_like(out))
            assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
            row = (slice(None), slice(None), 3) if b is mask else (slice(None), 1, 7)
            assert (out[row] == 0).all() and (grads[0][row] == 0).all()
            assert rel(out, ref64(q, k, v, b)) < 1e-5


@pytest.mark.parametrize("use_kernels", [True, False])
def test_finfo_min_bias_counts_as_masked(use_kernels):
    """Hugging Face-style masks (finfo.min, not -inf): partially masked rows as eager; fully masked rows give 0."""
    q, k, v = make(1, 2, 2, 10, 14, 32, torch.float32)
    bias = torch.zeros(1, 1, 10, 14)
    bias[..., 9:] = torch.finfo(torch.float32).min
    bias[..., 4, :] = torch.finfo(torch.float32).min  # row 4 sees nothing
    with mock.patch.object(A, "_use_kernels", return_value=use_kernels and triton_runs_on(q.device)):
        out = torch.ops.flashfx.attention(q, k, v, bias)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[:, :, 4] == 0).all() and (grads[0][:, :, 4] == 0).all()
    eager = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32) + bias, -1) @ v
    rows = [i for i in range(10) if i != 4]
    assert rel(out[:, :, rows], eager[:, :, rows]) < 1e-5


def _dropout_case():
    torch.manual_seed(11)
    B, H, L, S, D = 2, 2, 24, 24, 32
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, S, D)
    return q, k, torch.eye(S, D).expand(B, H, S, D)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_dropout_reproducible_keep_rate_and_same_mask_in_backward(use_kernels):
    p = 0.3
    q, k, eye = _dropout_case()
    with mock.patch.object(A, "_use_kernels", return_value=use_kernels and triton_runs_on(q.device)):
        torch.manual_seed(5)
        a = torch.ops.flashfx.attention(q, k, eye, None, False, None, p)
        b = torch.ops.flashfx.attention(q, k, eye, None, False, None, p)  # a new seed: a different mask
        torch.manual_seed(5)
        c = torch.ops.flashfx.attention(q, k, eye, None, False, None, p)
        assert torch.equal(a, c) and not torch.equal(a, b)
        # v = identity reads the mask back: out[..., j] = P[..., j] * keep[..., j] / (1 - p)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        ratio = a[..., : k.shape[2]] / (probs / (1 - p))
        keep = ratio > 0.5
        assert ((ratio - keep.float()).abs() < 1e-4).all()  # exactly 0 or 1/(1-p) scaling
        assert abs(keep.float().mean().item() - (1 - p)) < 0.05
        # the same seed with a random v: forward and every gradient match the reference under that mask
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, torch.randn_like(eye)))
        torch.manual_seed(5)
        out = torch.ops.flashfx.attention(qq, kk, vv, None, False, None, p)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (qq, kk, vv), dout)
        leaves = [t.detach().double().requires_grad_() for t in (qq, kk, vv)]
        ref = ref64(*leaves, keep=keep.double(), p=p)
        ref_grads = torch.autograd.grad(ref, leaves, dout.double())
        assert rel(out, ref) < 1e-5
        for g, rg in zip(grads, ref_grads):
            assert rel(g, rg) < 1e-5


def test_under_torch_compile_one_node_each_graph_dynamic_shapes():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = {"dynamo": [], "fw": [], "bw": []}

    def name(t):  # OpOverloadPacket and OpOverload alike: "namespace::op"
        return t.name() if isinstance(t, torch._ops.OpOverload) else getattr(t, "_qualified_op_name", str(t))

    def targets(gm):
        return [name(n.target) for n in gm.graph.nodes if n.op == "call_function"]

    def record(kind):
        def compiler(gm, example_inputs):
            seen[kind].append(targets(gm))
            return make_boxed_func(gm.forward)
        return compiler

    inner = aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))

    def backend(gm, example_inputs):
        seen["dynamo"].append(targets(gm))
        return inner(gm, example_inputs)

    def f(q, k, v, mask):
        return torch.ops.flashfx.attention(q, k, v, mask, is_causal=True).sum(dim=-1)

    compiled = torch.compile(f, backend=backend, dynamic=True)
    for L in (17, 29):
        q, k, v = make(2, 4, 2, L, L + 3, 32, torch.float32)
        mask = torch.rand(2, 1, 1, L + 3) > 0.2
        out = compiled(q, k, v, mask)
        ref = f(q, k, v, mask)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        rg = torch.autograd.grad(ref.sum(), (q, k, v))
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(g, rg))
    assert len(seen["dynamo"]) == 1, "a new length must reuse the dynamic graph"
    assert seen["dynamo"][0].count("flashfx::attention") == 1, seen["dynamo"]
    assert seen["fw"][0].count("flashfx::attention_fwd") == 1, seen["fw"]
    assert seen["bw"][0].count("flashfx::attention_bwd") == 1, seen["bw"]


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_eager_calls_and_the_registered_ops_compute_the_same(p):
    """Plain tensors take `_EagerAttention` (less host time per call); traced code the ops with their registered
    autograd. Both run the same launches: outputs and gradients (with a float bias's, and the dropout mask drawn
    from the same seed) are bitwise equal."""
    q, k, v = make(2, 4, 2, 19, 23, 40, torch.float32)
    bias = make_bias("float", 2, 4, 19, 23, torch.float32)
    dout = torch.randn(2, 4, 19, 40)
    results = []
    for untraced in (True, False):
        with mock.patch.object(A, "_untraced", return_value=untraced), \
             mock.patch.object(A._EagerAttention, "apply", wraps=A._EagerAttention.apply) as eager:
            torch.manual_seed(3)
            out = torch.ops.flashfx.attention(q, k, v, bias, True, None, p)
            results.append((out, *torch.autograd.grad(out, (q, k, v, bias), dout)))
        assert eager.call_count == int(untraced)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_plain_tensors_take_the_eager_path_and_traced_ones_the_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q = torch.randn(1, 2, 4, 8)
    assert A._untraced(q, q, q, None)
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        assert not A._untraced(fq, fq, fq, None)
    assert not A._untraced(q, torch.nn.Parameter(q), q, None)  # a subclass: keep the op


def test_the_eager_path_refuses_a_second_derivative():
    q, k, v = make(1, 2, 2, 5, 5, 8, torch.float32)
    out = torch.ops.flashfx.attention(q, k, v)
    dout = torch.randn_like(out, requires_grad=True)  # so the first derivative is part of a graph
    (dq,) = torch.autograd.grad(out, q, dout, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice|double"):
        dq.sum().backward()


@pytest.mark.parametrize("args,kwargs,err,words", [
    ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)), {}, ValueError, "head dims"),
    ((torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), {}, ValueError, "multiple"),
    ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).half(), torch.randn(1, 2, 4, 8)), {}, TypeError, "dtype"),
    ((torch.ones(1, 2, 4, 8, dtype=torch.int32),) * 3, {}, TypeError, "float16"),
    ((torch.randn(2, 4, 8),) * 3, {}, ValueError, "4-D"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"bias": torch.randn(3, 4, 4)}, ValueError, "broadcast"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"bias": torch.ones(4, 4, dtype=torch.int64)}, TypeError, "bool"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"dropout_p": 1.0}, ValueError, "dropout_p"),
])
def test_bad_inputs_raise_clear_errors(args, kwargs, err, words):
    with pytest.raises(err, match=words):
        torch.ops.flashfx.attention(*args, **kwargs)


def test_cost_registration():
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashfx.rewriter.cost import node_cost

    B, H, Hkv, L, S, D = 2, 8, 2, 64, 96, 32
    with FakeTensorMode():
        q, k, v = torch.empty(B, H, L, D), torch.empty(B, Hkv, S, D), torch.empty(B, Hkv, S, D)
        bias = torch.empty(1, 1, 1, S)
        out = torch.ops.flashfx.attention(q, k, v, bias, is_causal=True)
    g = fx.Graph()
    nodes = []
    for name, val in zip("qkvb", (q, k, v, bias)):
        nodes.append(g.placeholder(name))
        nodes[-1].meta["val"] = val
    node = g.call_function(torch.ops.flashfx.attention.default, tuple(nodes), {"is_causal": True})
    node.meta["val"] = out
    c = node_cost(node)
    assert int(c.flops) == 4 * B * H * L * S * D // 2
    assert int(c.read_bytes) == 4 * (B * H * L * D + 2 * B * Hkv * S * D + S)
    assert int(c.write_bytes) == 4 * B * H * L * D


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_float64_like_sdpa(dtype, causal):
    """On the GPU (compiled kernels, autotuned): as close to float64 as SDPA is, outputs and gradients."""
    torch.manual_seed(0)
    q = torch.randn(2, 500, 8, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 2, 700, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in "kv")
    out = torch.ops.flashfx.attention(q, k, v, None, causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ref64(*leaves, None, causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert rel(out, ref) < 1e-2
    assert all(rel(g, rg) < 1e-2 for g, rg in zip(grads, ref_grads))


@pytest.mark.gpu
def test_gpu_launch_plans_bind_and_compute_what_triton_s_launch_does(monkeypatch):
    """On the GPU repeated call shapes launch from plans of bound kernels: interleaved shapes, strides and causal
    flags each match float64, and equal bitwise what Triton's own launch (FLASHFX_FAST_LAUNCH=0) computes."""
    monkeypatch.setenv("FLASHFX_ATTENTION_TUNE", "0")  # one config per kernel: no autotuning time
    monkeypatch.setattr(A, "_PLANS", type(A._PLANS)())
    torch.manual_seed(0)
    calls = [((2, 8, 8, 300, 300, 64), True, True), ((1, 8, 2, 257, 513, 128), False, False),
             ((2, 8, 8, 300, 300, 64), True, False), ((1, 4, 4, 64, 64, 96), False, True)]

    def run(shape, causal, transposed):
        q, k, v = (t.detach().cuda().requires_grad_() for t in make(*shape, torch.float16, transposed=transposed))
        dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
        out = torch.ops.flashfx.attention(q, k, v, None, causal)
        return (q, k, v, dout), (out, *torch.autograd.grad(out, (q, k, v), dout))

    results = {}
    for _ in range(3):
        for i, (shape, causal, transposed) in enumerate(calls):
            torch.manual_seed(i)
            results[i] = run(shape, causal, transposed)
    assert len(A._PLANS) == 2 * len(calls)
    monkeypatch.setenv("FLASHFX_FAST_LAUNCH", "0")
    for i, (shape, causal, transposed) in enumerate(calls):
        torch.manual_seed(i)
        (q, k, v, dout), got = results[i]
        _, expected = run(shape, causal, transposed)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), shape
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = ref64(*leaves, None, causal)
        ref_grads = torch.autograd.grad(ref, leaves, dout.double())
        assert all(rel(g, r) < 1e-2 for g, r in zip(got, (ref, *ref_grads))), shape
