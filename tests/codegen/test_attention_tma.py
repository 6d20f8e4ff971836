"""The attention forward through tensor descriptors (flashfx/codegen/attention_tma.py), forced on the CPU interpreter
with FLASHFX_ATTENTION_FWD=tma: out and LSE against the pointer kernel and a float64 reference, the backward on top
of its outputs, the inputs it must leave to the pointer kernel, and the knobs' errors."""
import contextvars
import math

import pytest
import torch

import flashfx.codegen.attention as A
from flashfx._compat import triton_runs_on

pytestmark = pytest.mark.skipif(not triton_runs_on(torch.device("cpu")),
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def ref64(q, k, v, causal, scale=None):
    """float64 (out, lse): GQA by repeat, top-left causal mask."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def make(B, Hq, Hkv, L, S, D, dtype):
    """q from a transpose of [B, L, H, D] (a model's projection: non-contiguous, unit last stride); k, v contiguous."""
    q = torch.randn(B, L, Hq, D, dtype=dtype).transpose(1, 2)
    k, v = torch.randn(B, Hkv, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype)
    return q, k, v


def forward(monkeypatch, variant, q, k, v, causal, bias=None, dropout_p=0.0):
    """(out, lse, {variant: launches}) of the kernel forward under FLASHFX_ATTENTION_FWD=variant."""
    monkeypatch.setenv("FLASHFX_ATTENTION_FWD", variant)
    before = dict(A.FORWARD_LAUNCHES)
    out, lse, _ = torch.ops.flashfx.attention_fwd(q, k, v, bias, causal, None, dropout_p)
    ran = {name: A.FORWARD_LAUNCHES[name] - before.get(name, 0) for name in ("pointer", "tma")}
    return out, lse, ran


CASES = [  # B, Hq, Hkv, L, S, D, causal, dtype
    (2, 4, 2, 17, 33, 64, False, torch.float32),   # GQA, L != S, neither a multiple of the block
    (2, 4, 2, 17, 33, 64, True, torch.float32),
    (1, 4, 2, 33, 17, 64, True, torch.float32),    # L > S causal: the rows past S see every key
    (1, 4, 2, 1, 33, 64, False, torch.float32),    # a single query
    (1, 4, 4, 1, 33, 64, True, torch.float32),
    (1, 4, 2, 37, 45, 64, True, torch.float16),
    (1, 2, 1, 24, 20, 128, False, torch.float16),  # head dim 128, MQA
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[3]}x{c[4]}-d{c[5]}-h{c[1]}/{c[2]}-c{int(c[6])}-{str(c[7])[6:]}"
                                             for c in CASES])
def test_tma_matches_pointer_kernel_and_float64(monkeypatch, case):
    B, Hq, Hkv, L, S, D, causal, dtype = case
    q, k, v = make(B, Hq, Hkv, L, S, D, dtype)
    out, lse, ran = forward(monkeypatch, "tma", q, k, v, causal)
    assert ran == {"pointer": 0, "tma": 1}
    p_out, p_lse, p_ran = forward(monkeypatch, "pointer", q, k, v, causal)
    assert p_ran == {"pointer": 1, "tma": 0}
    # the backward reads out and lse from either kernel: same layout, values equal to rounding
    assert out.shape == p_out.shape and out.stride() == p_out.stride() and out.dtype == dtype
    assert lse.shape == p_lse.shape == (B, Hq, L) and lse.dtype == torch.float32
    assert rel(out, p_out) < (1e-6 if dtype == torch.float32 else 1e-3)
    assert rel(lse, p_lse) < 1e-6
    ref_out, ref_lse = ref64(q, k, v, causal)
    assert rel(out, ref_out) < TOL[dtype], rel(out, ref_out)
    assert rel(lse, ref_lse) < 1e-5, rel(lse, ref_lse)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
def test_tma_block_ratios(monkeypatch, blocks):
    """The causal split for either tile larger than the other (the GPU space has 64 x 128 and 128 x 64)."""
    from flashfx.codegen import attention_tma

    monkeypatch.setattr(attention_tma, "_INTERPRETER_BLOCKS", blocks)
    q, k, v = make(1, 2, 1, 45, 70, 64, torch.float32)
    for causal in (True, False):
        out, lse, ran = forward(monkeypatch, "tma", q, k, v, causal)
        assert ran["tma"] == 1
        ref_out, ref_lse = ref64(q, k, v, causal)
        assert rel(out, ref_out) < 1e-5 and rel(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_backward_after_tma_forward_matches_float64(monkeypatch, causal):
    """attention_fwd's autograd: the backward kernels consume the descriptor kernel's out and lse unchanged."""
    monkeypatch.setenv("FLASHFX_ATTENTION_FWD", "tma")
    q, k, v = (t.requires_grad_() for t in make(2, 4, 2, 19, 27, 64, torch.float32))
    before = A.FORWARD_LAUNCHES["tma"]
    out, _, _ = torch.ops.flashfx.attention_fwd(q, k, v, None, causal, None, 0.0)
    assert A.FORWARD_LAUNCHES["tma"] == before + 1
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = ref64(*leaves, causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert rel(out, ref) < 1e-5
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == rg.shape and rel(g, rg) < 1e-5, (name, rel(g, rg))


def _misaligned(B, H, L, D):
    """A [B, H, L, D] fp32 tensor whose data starts 4 bytes past a 16-byte boundary."""
    return torch.randn(B * H * L * D + 1)[1:].view(B, H, L, D)


INELIGIBLE = {  # name: (q, k, v, bias, dropout_p) -> the pointer kernel, under FLASHFX_ATTENTION_FWD=tma
    "bias": lambda q, k, v: (q, k, v, torch.rand(1, 1, 1, k.shape[2]) > 0.3, 0.0),
    "dropout": lambda q, k, v: (q, k, v, None, 0.2),
    "head-dim-40": lambda q, k, v: (q[..., :40].contiguous(), k[..., :40].contiguous(), v[..., :40].contiguous(),
                                    None, 0.0),
    "last-stride": lambda q, k, v: (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None, 0.0),
    "misaligned": lambda q, k, v: (q, k, _misaligned(*v.shape).copy_(v), None, 0.0),
}


@pytest.mark.parametrize("name", list(INELIGIBLE))
def test_ineligible_inputs_run_the_pointer_kernel(monkeypatch, name):
    from flashfx.codegen import attention_tma

    q, k, v = make(1, 4, 2, 18, 21, 64, torch.float32)
    _, _, ran0 = forward(monkeypatch, "tma", q, k, v, True)
    assert ran0 == {"pointer": 0, "tma": 1}  # the same inputs without the defect take the descriptor kernel
    q, k, v, bias, p = INELIGIBLE[name](q, k, v)
    assert attention_tma.ineligible(q, k, v, A._empty_out(q), bias, p) is not None
    assert A._forward_variant(q, k, v, A._empty_out(q), bias, p) == "pointer"
    out, _, ran = forward(monkeypatch, "tma", q, k, v, True, bias, p)
    assert ran == {"pointer": 1, "tma": 0}
    if bias is None and p == 0.0:
        assert rel(out, ref64(q, k, v, True)[0]) < 1e-5


def test_default_and_auto_keep_the_pointer_kernel_off_hopper(monkeypatch):
    """Unset: the pointer kernel (until measured on the GPU); auto: the descriptor kernel only on sm_90+ GPUs."""
    from flashfx.codegen import attention_tma

    q, k, v = make(1, 2, 2, 9, 12, 64, torch.float32)
    out = A._empty_out(q)
    monkeypatch.delenv("FLASHFX_ATTENTION_FWD", raising=False)
    assert A._forward_variant(q, k, v, out, None, 0.0) == "pointer"
    monkeypatch.setenv("FLASHFX_ATTENTION_FWD", "auto")
    assert A._forward_variant(q, k, v, out, None, 0.0) == "pointer"  # a CPU tensor: no TMA hardware
    monkeypatch.setattr(attention_tma, "tma_hardware", lambda device: True)
    assert A._forward_variant(q, k, v, out, None, 0.0) == "tma"
    assert A._forward_variant(q, k, v, out, None, 0.1) == "pointer"
    monkeypatch.setenv("FLASHFX_ATTENTION_FWD", "pointer")
    assert A._forward_variant(q, k, v, out, None, 0.0) == "pointer"


@pytest.mark.parametrize("var,value", [("FLASHFX_ATTENTION_FWD", "hopper"), ("FLASHFX_ATTENTION_WS", "yes"),
                                       ("FLASHFX_ATTENTION_TUNE", "no"), ("FLASHFX_ATTENTION_CONFIG", "first")])
def test_bad_knob_values_raise_clear_errors(monkeypatch, var, value):
    monkeypatch.setenv("FLASHFX_ATTENTION_FWD", "tma")
    monkeypatch.setenv(var, value)
    q, k, v = make(1, 2, 2, 5, 5, 64, torch.float32)
    with pytest.raises(ValueError, match=f"{var}='{value}'"):
        torch.ops.flashfx.attention(q, k, v)


def test_allocator_set_once_per_context_and_never_over_the_callers():
    import triton
    from triton.runtime import _allocation

    from flashfx._compat import triton_allocator_missing
    from flashfx.codegen import attention_tma

    def fresh():  # a context as a new thread starts with: no allocator
        assert triton_allocator_missing()
        attention_tma.ensure_allocator()
        assert not triton_allocator_missing() and _allocation._allocator.get() is attention_tma._torch_scratch

    def callers():
        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        triton.set_allocator(mine)
        attention_tma.ensure_allocator()
        assert _allocation._allocator.get() is mine

    contextvars.Context().run(fresh)
    contextvars.Context().run(callers)


def test_config_space():
    """The defaults fit the space's own limits; fp32 (twice the shared memory) falls back to the small config."""
    from flashfx.codegen import attention_tma as T

    for d in T.TMA_HEAD_DIMS:
        assert T._tma_keep(*T._DEFAULT[d], d, 2)
        kept = [(m, n, w, st) for m in (64, 128) for n in (64, 128) for w in (4, 8) for st in (2, 3, 4)
                if T._tma_keep(m, n, w, st, d, 2)]
        assert len(kept) >= 10 and all(w == 4 or m == 128 for m, n, w, st in kept)
    assert not T._tma_keep(*T._DEFAULT[128], 128, 4) and T._tma_keep(*T._SMALL, 128, 4)
    assert not T._tma_keep(128, 128, 4, 2, 128, 2)  # 4 warps for 128 x 128 scores + accumulator: spills
