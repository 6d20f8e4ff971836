"""flashfx::linear_cross_entropy against F.cross_entropy(F.linear(...)) in float64, on the Triton interpreter (CPU)
or the GPU; the ATen fallback path; input errors; AOTAutograd; cost registration."""
import pytest
import torch
import torch.nn.functional as F

from flashfx.codegen import cross_entropy as ce
from flashfx.codegen.cross_entropy import chunk_rows_for, linear_cross_entropy

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative ‖err‖/‖ref‖
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(h, w, b, y, ignore_index=-100, smoothing=0.0, reduction="mean", z_loss=0.0):
    """float64: PyTorch's cross-entropy of the logits rounded to the input dtype (as eager does), plus the z-loss."""
    logits = F.linear(h, w, b).double() if h.dtype != torch.float32 else F.linear(h.double(), w.double(),
                                                                                     None if b is None else b.double())
    rows = F.cross_entropy(logits, y, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    valid = y != ignore_index
    rows = rows + z_loss * torch.where(valid, torch.logsumexp(logits, 1) ** 2, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    return rows.sum() / valid.sum() if reduction == "mean" else rows.sum()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(N, H, V, dtype, bias, ignore_every=5):
    h = (torch.randn(N, H, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, device=DEVICE) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), device=DEVICE)
    y[::ignore_every] = -100
    return h, w, b, y


@pytest.fixture
def small_chunks(monkeypatch):
    # 41 rows become chunks of 16, 16, 9: chunk boundaries and a partial last chunk are exercised
    monkeypatch.setattr(ce, "CHUNK_BYTES", 16 * 341 * 4)


DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-2)])
def test_matches_pytorch(small_chunks, dtype, reduction, bias, smoothing, z_loss):
    N, H, V = 41, 24, 341  # V not a multiple of the block (256 on the interpreter) nor of 16
    h, w, b, y = make(N, H, V, dtype, bias)
    assert chunk_rows_for(N, V, h.element_size()) < N
    loss = linear_cross_entropy(h, w, b, y, -100, smoothing, reduction, z_loss)
    assert loss.dtype == torch.float32
    grad_out = torch.rand_like(loss) + 0.5
    params = [h, w] + ([b] if bias else [])
    grads = torch.autograd.grad(loss, params, grad_out)
    ref_params = [p.detach().double().requires_grad_() for p in params] if dtype == torch.float32 else \
        [p.detach().clone().requires_grad_() for p in params]
    rb = ref_params[2] if bias else None
    ref = reference(ref_params[0], ref_params[1], rb, y, -100, smoothing, reduction, z_loss)
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out.double())
    tol = TOL[dtype]
    assert rel(loss, ref) < tol, (rel(loss, ref), tol)
    for name, g, r in zip(["h", "w", "b"], grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert rel(g, r) < tol * 3, (name, rel(g, r))


@pytest.mark.parametrize("wgrad_fp32", [False, True], ids=["weight-dtype-sum", "fp32-sum"])
def test_weight_grad_accumulation_across_chunks(small_chunks, monkeypatch, wgrad_fp32):
    monkeypatch.setattr(ce, "WGRAD_FP32", wgrad_fp32)
    h, w, b, y = make(41, 24, 341, torch.float16, bias=True)
    loss = linear_cross_entropy(h, w, b, y)
    gw = torch.autograd.grad(loss, [w])[0]
    rw = torch.autograd.grad(reference(h.double(), w.double(), b.double(), y), [w])[0]
    assert gw.dtype == torch.float16 and rel(gw, rw) < 3e-2


def test_mean_recompute_path_matches():
    # the backward op (used by reduction="none" and by forwards run without autograd) for "mean" and "sum"
    h, w, b, y = make(29, 16, 133, torch.float32, bias=True)
    for reduction in ("mean", "sum"):
        g = torch.tensor(2.5)
        dh, dw, db = torch.ops.flashfx.linear_cross_entropy_bwd(g, h.detach(), w.detach(), b.detach(), y, -100, 0.05,
                                                               reduction, 1e-3)
        ref = reference(h, w, b, y, -100, 0.05, reduction, 1e-3)
        rh, rw, rb = torch.autograd.grad(ref, [h, w, b], g)
        assert max(rel(dh, rh), rel(dw, rw), rel(db, rb)) < 1e-5


def test_no_autograd_computes_no_gradients():
    h, w, b, y = make(20, 8, 50, torch.float32, bias=False)
    out = torch.ops.flashfx.linear_cross_entropy_fwd(h.detach(), w.detach(), None, y, -100, 0.0, "mean", 0.0, False)
    assert [t.numel() for t in out[1:]] == [0, 0, 0]
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, None, y)
    assert not loss.requires_grad
    assert rel(loss, reference(h.detach(), w.detach(), None, y)) < 1e-5


def test_every_row_ignored_gives_nan_mean_like_pytorch():
    h, w, _, y = make(8, 8, 30, torch.float32, bias=False)
    y.fill_(-100)
    loss = linear_cross_entropy(h, w, None, y)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ w.T, y))
    assert linear_cross_entropy(h, w, None, y, reduction="sum").item() == 0.0
    gh, = torch.autograd.grad(linear_cross_entropy(h, w, None, y, reduction="sum"), [h])
    assert torch.count_nonzero(gh) == 0


def test_custom_ignore_index_and_out_of_range_target():
    h, w, _, y = make(12, 8, 30, torch.float32, bias=False, ignore_every=100)
    y[0] = 1  # -100 is an ordinary (out-of-range) target once ignore_index is 7
    y[3] = 7
    loss = linear_cross_entropy(h, w, None, y, ignore_index=7)
    assert rel(loss, reference(h.detach(), w.detach(), None, y, ignore_index=7)) < 1e-5
    y[4] = 30  # not a class and not ignored: NaN, never a silent number
    assert torch.isnan(linear_cross_entropy(h.detach(), w.detach(), None, y, ignore_index=7))


def test_leading_dims_and_int32_targets():
    h = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(19, 8, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 19, (2, 5), device=DEVICE)
    loss = linear_cross_entropy(h, w, None, y.int(), reduction="none")
    assert loss.shape == (2, 5)
    ref = F.cross_entropy((h @ w.T).view(-1, 19), y.view(-1), reduction="none").view(2, 5)
    assert rel(loss, ref) < 1e-5
    g1 = torch.autograd.grad(loss.sum(), [h])[0]
    g2 = torch.autograd.grad(ref.sum(), [h])[0]
    assert rel(g1, g2) < 1e-5


def test_aten_fallback_matches(monkeypatch, small_chunks):
    monkeypatch.setattr(ce, "triton_runs_on", lambda device: False)
    h, w, b, y = make(41, 24, 341, torch.float32, bias=True)
    loss = linear_cross_entropy(h, w, b, y, -100, 0.1, "mean", 1e-2)
    grads = torch.autograd.grad(loss, [h, w, b])
    ref = reference(h, w, b, y, -100, 0.1, "mean", 1e-2)
    ref_grads = torch.autograd.grad(ref, [h, w, b])
    assert rel(loss, ref) < 1e-5
    assert all(rel(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("call,error,match", [
    (lambda h, w, y: linear_cross_entropy(h, w, None, y, reduction="avg"), ValueError, "reduction='avg'"),
    (lambda h, w, y: linear_cross_entropy(h, w, None, y.float()), TypeError, "int64"),
    (lambda h, w, y: linear_cross_entropy(h, w[:, :4], None, y), ValueError, "weight"),
    (lambda h, w, y: linear_cross_entropy(h, w, None, y[:3]), ValueError, "target shape"),
    (lambda h, w, y: linear_cross_entropy(h, w.double(), None, y), TypeError, "one dtype"),
    (lambda h, w, y: linear_cross_entropy(h, w, torch.zeros(5), y), ValueError, "bias must have shape"),
    (lambda h, w, y: linear_cross_entropy(h, w, None, y, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda h, w, y: linear_cross_entropy(h, w, None, y, z_loss=-1.0), ValueError, "z_loss"),
    (lambda h, w, y: linear_cross_entropy(h.long(), w, None, y), TypeError, "float16, bfloat16 or float32"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    h, w, y = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    with pytest.raises(error, match=match):
        call(h, w, y)


def test_aot_autograd_forward_holds_gradients_backward_scales():
    from functorch.compile import aot_function, make_boxed_func

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def f(h, w, y):
        return torch.ops.flashfx.linear_cross_entropy(h, w, None, y, -100, 0.0, "mean", 0.0) * 3.0

    h, w, _, y = make(10, 8, 37, torch.float32, bias=False)
    loss = aot_function(f, keep("fw"), keep("bw"))(h, w, y)
    gh, gw = torch.autograd.grad(loss, [h, w])
    rh, rw = torch.autograd.grad(reference(h, w, None, y) * 3.0, [h, w])
    assert rel(gh, rh) < 1e-5 and rel(gw, rw) < 1e-5
    fw_targets = [n.target for n in graphs["fw"].graph.nodes if n.op == "call_function"]
    bw_targets = [n.target for n in graphs["bw"].graph.nodes if n.op == "call_function"]
    assert torch.ops.flashfx.linear_cross_entropy_fwd.default in fw_targets
    assert torch.ops.flashfx.linear_cross_entropy_bwd.default not in bw_targets  # grads were made in the forward


def test_chunk_rows_bound_the_buffer():
    # the ANCHORS Llama head: 8192 tokens x vocab 128256 in bf16 -> chunks of at most CHUNK_BYTES of logits
    rows = chunk_rows_for(8192, 128256, 2)
    assert rows % 16 == 0 and rows * 128256 * 2 <= ce.CHUNK_BYTES
    assert chunk_rows_for(10, 128256, 2) == 10
    assert chunk_rows_for(4096, 10**9, 4) == 16  # never below one matmul tile


@pytest.mark.parametrize("dtype,vocab,padded", [(torch.bfloat16, 50257, 50304), (torch.float32, 50257, 50304),
                                                (torch.float32, 50260, 50260), (torch.float16, 128256, 128256)])
def test_padded_vocab_only_where_rows_are_not_16_byte_words(dtype, vocab, padded):
    assert ce.padded_vocab(vocab, dtype) == padded


def test_chunk_gemms_run_at_the_padded_vocab(monkeypatch):
    # V=341 in fp16 is padded to 384: every chunk GEMM sees the aligned extent, and the grads keep V rows
    seen = []
    mm = torch.mm

    def spy(a, b, out=None):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return mm(a, b, out=out)
    monkeypatch.setattr(torch, "mm", spy)
    h, w, _, y = make(20, 24, 341, torch.float16, bias=False)
    loss = linear_cross_entropy(h, w, None, y)
    gw, = torch.autograd.grad(loss, [w])
    assert (20, 24) in [s[0] for s in seen] and (24, 384) in [s[1] for s in seen]  # logits = x @ W_padded.T
    assert (20, 384) in [s[0] for s in seen]  # d input = dlogits_padded @ W_padded
    assert gw.shape == (341, 24) and gw.untyped_storage().nbytes() == 341 * 24 * 2


def test_cost_is_registered_forward_one_matmul_fwd_with_grads_three():
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashfx.rewriter.cost import node_cost

    N, V, H = 64, 1000, 32
    with FakeTensorMode():
        vals = (torch.empty(N, H), torch.empty(V, H), torch.empty(N, dtype=torch.int64))
        public = torch.ops.flashfx.linear_cross_entropy(*vals[:2], None, vals[2])
        fwd = torch.ops.flashfx.linear_cross_entropy_fwd(*vals[:2], None, vals[2], -100, 0.0, "mean", 0.0, True)
    g = fx.Graph()
    nodes = [g.placeholder(n) for n in "hwy"]
    for n, v in zip(nodes, vals):
        n.meta["val"] = v
    args = (nodes[0], nodes[1], None, nodes[2])
    c1 = g.call_function(torch.ops.flashfx.linear_cross_entropy.default, args)
    c1.meta["val"] = public
    c3 = g.call_function(torch.ops.flashfx.linear_cross_entropy_fwd.default, args + (-100, 0.0, "mean", 0.0, True))
    c3.meta["val"] = fwd
    one, three = node_cost(c1), node_cost(c3)
    assert int(one.flops) == 2 * N * V * H + 8 * N * V
    assert int(three.flops) == 3 * 2 * N * V * H + 8 * N * V
    assert int(one.write_bytes) == N * 4  # the [N, V] logits are never written whole: only chunk traffic is read
    assert int(one.read_bytes) == (N * H + V * H) * 4 + N * 8 + 2 * N * V * 4
    assert int(three.write_bytes) == N * 4 + (N * H + V * H) * 4


def test_cost_counts_the_weight_once_more_per_further_chunk(monkeypatch):
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashfx.codegen import cross_entropy as ce
    from flashfx.rewriter.cost import node_cost

    N, V, H = 512, 1000, 32
    with FakeTensorMode():
        vals = (torch.empty(N, H), torch.empty(V, H), torch.empty(N, dtype=torch.int64))
        fwd = torch.ops.flashfx.linear_cross_entropy_fwd(*vals[:2], None, vals[2], -100, 0.0, "mean", 0.0, True)
    g = fx.Graph()
    nodes = [g.placeholder(n) for n in "hwy"]
    for n, v in zip(nodes, vals):
        n.meta["val"] = v
    call = g.call_function(torch.ops.flashfx.linear_cross_entropy_fwd.default,
                           (nodes[0], nodes[1], None, nodes[2], -100, 0.0, "mean", 0.0, True))
    call.meta["val"] = fwd
    one_chunk = node_cost(call).read_bytes
    monkeypatch.setattr(ce, "CHUNK_BYTES", 128 * V * 4)  # 128 rows per chunk: 4 chunks
    assert ce.chunk_rows_for(N, V, 4) == 128
    # each of the 3 further chunks reads W in the logits and d-input matmuls, and reads + writes dW
    assert int(node_cost(call).read_bytes - one_chunk) == 3 * 4 * V * H * 4


@pytest.mark.gpu
def test_bf16_large_vocab_on_gpu():
    h, w, b, y = make(300, 256, 50257, torch.bfloat16, bias=False)
    loss = linear_cross_entropy(h, w, None, y)
    gh, gw = torch.autograd.grad(loss, [h, w])
    ref = reference(h, w, None, y)
    rh, rw = torch.autograd.grad(ref, [h, w])
    assert rel(loss, ref) < 1e-2 and rel(gh, rh) < 2e-2 and rel(gw, rw) < 2e-2
