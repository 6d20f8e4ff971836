"""The cross_entropy pass: structure (exact counts on HF LlamaForCausalLM / GPT2LMHeadModel loss graphs and on
hand-written heads), numerics of the rewritten graph (loss and every gradient vs eager, also through AOTAutograd),
and the cases where it must decline."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from flashfx.config import Config
from flashfx.passes.cross_entropy import cross_entropy
from flashfx.rewriter.canonicalize import canonicalize
from flashfx.rewriter.capture import attach_metadata, capture
from flashfx.rewriter.pass_manager import PassContext

V = 101
OP = torch.ops.flashfx.linear_cross_entropy.default


class LossOnly(nn.Module):
    """What a training loop compiles: the model call, keeping only the loss (so the logits are not returned)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs).loss


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(loss_type="ForCausalLM"):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    # GPT2LMHeadModel has no loss_type: HF then logs a warning inside forward, which breaks the Dynamo graph
    # between lm_head and the loss; naming the loss keeps them in one graph
    model.loss_type = loss_type
    return model


def run_pass(gm, config=None, stage="torch"):
    ctx = PassContext(config or Config(), stage=stage)
    gm = canonicalize(gm, ctx).graph_module
    result = cross_entropy(gm, ctx)
    return result, ctx


def counts(ctx):
    return ctx.counters.get("cross_entropy.replaced", 0), ctx.counters.get("cross_entropy.declined", 0)


def inputs(batch=2, seq=9):
    ids = torch.randint(0, V, (batch, seq))
    labels = ids.clone()
    labels[0, :3] = -100
    return dict(input_ids=ids, labels=labels, use_cache=False)


# --------------------------------------------------------------------------------------------- structure (HF)

@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_fires_once_on_hf_loss_graph_when_logits_are_not_returned(make):
    graphs = capture(LossOnly(make()), kwargs=inputs())  # dynamic batch / sequence, as the compiler sees it
    assert len(graphs) == 1
    result, ctx = run_pass(graphs[0].gm)
    assert counts(ctx) == (1, 0)
    gm = result.graph_module
    assert [n.target for n in gm.graph.nodes].count(OP) == 1
    assert not any(n.target is F.cross_entropy for n in gm.graph.nodes)
    op = next(n for n in gm.graph.nodes if n.target is OP)
    assert op.meta["val"].dtype == torch.float32 and op.meta["val"].dim() == 0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_declines_when_hf_model_returns_logits(make):
    graphs = capture(make(), kwargs=inputs())
    contexts = [run_pass(g.gm)[1] for g in graphs]
    assert sum(counts(c)[0] for c in contexts) == 0
    assert sum(counts(c)[1] for c in contexts) == 1
    reason = next(d.reason for c in contexts for d in c.declined)
    assert "returned by the graph" in reason and ".loss" in reason


def test_declines_across_a_graph_break_and_says_why():
    graphs = capture(LossOnly(tiny_gpt2(loss_type=None)), kwargs=inputs(), dynamic=False)
    assert len(graphs) == 2  # HF's warning for an unknown loss_type breaks the graph before the loss
    contexts = [run_pass(g.gm)[1] for g in graphs]
    assert [counts(c) for c in contexts] == [(0, 0), (0, 1)]
    assert "graph break" in contexts[1].declined[0].reason


# ---------------------------------------------------------------------------------------------- numerics (HF)

def passes_backend(contexts, aot=False):
    def backend(gm, example_inputs):
        attach_metadata(gm)
        gm, ctx = run_pass(gm)
        contexts.append(ctx)
        gm = gm.graph_module
        if aot:
            return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)
        return gm.forward
    return backend


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("aot", [False, True], ids=["eager-graph", "aot-autograd"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_rewritten_hf_graph_matches_eager_loss_and_every_gradient(make, aot):
    model = make()
    kw = inputs()
    ref_loss, ref_grads = grads_of(model, LossOnly(model)(**kw))
    contexts = []
    compiled = torch.compile(LossOnly(model), backend=passes_backend(contexts, aot), dynamic=False)
    loss, got_grads = grads_of(model, compiled(**kw))
    assert sum(counts(c)[0] for c in contexts) == 1
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_hf_num_items_in_batch_sum_reduction_fires_and_matches():
    # Trainer passes num_items_in_batch: HF then sums the loss and divides; the division stays after the op
    model = tiny_llama()
    kw = {**inputs(), "num_items_in_batch": torch.tensor(11)}
    ref = LossOnly(model)(**kw)
    contexts = []
    out = torch.compile(LossOnly(model), backend=passes_backend(contexts), dynamic=False)(**kw)
    assert sum(counts(c)[0] for c in contexts) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- hand-written heads

class Head(nn.Module):
    """A trunk, a vocab head spelled `spelling`, the causal shift on the logits, and a loss."""

    def __init__(self, spelling="linear", bias=False, H=16, reduction="mean", smoothing=0.0, ignore_index=-100):
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.weight = nn.Parameter(torch.randn(V, H) * 0.3)
        self.bias = nn.Parameter(torch.randn(V) * 0.3) if bias else None
        self.weight_hv = nn.Parameter(torch.randn(H, V) * 0.3) if spelling == "matmul_HV" else None
        self.spelling, self.reduction, self.smoothing, self.ignore_index = spelling, reduction, smoothing, ignore_index

    def logits(self, h):
        if self.spelling == "linear":
            return F.linear(h, self.weight, self.bias)
        if self.spelling == "matmul_HV":  # a head stored [H, V]: the op gets its transposed view as the weight
            out = h @ self.weight_hv
        else:
            out = h @ self.weight.t() if self.spelling == "matmul_t" else torch.matmul(h, self.weight.T)
        return out + self.bias if self.bias is not None else out

    def forward(self, x, labels):
        logits = self.logits(torch.tanh(self.proj(x)))
        shift_logits = logits[..., :-1, :].contiguous().float()
        shift_labels = labels[..., 1:].contiguous()
        return F.cross_entropy(shift_logits.view(-1, V), shift_labels.view(-1), ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.smoothing)


@pytest.mark.parametrize("spelling,bias,reduction,smoothing", [
    ("linear", False, "mean", 0.0),
    ("linear", True, "sum", 0.1),
    ("matmul_t", True, "none", 0.0),
    ("matmul_T", False, "mean", 0.2),
    ("matmul_HV", True, "mean", 0.0),
])
def test_head_spellings_fire_and_match(spelling, bias, reduction, smoothing):
    model = Head(spelling, bias, reduction=reduction, smoothing=smoothing, ignore_index=3)
    x = torch.randn(3, 7, 16, requires_grad=True)
    labels = torch.randint(0, V, (3, 7))
    labels[1, 2:5] = 3
    ref = model(x, labels)
    ref_grads = torch.autograd.grad(ref.sum(), [x, *model.parameters()], allow_unused=True)
    contexts = []
    compiled = torch.compile(model, backend=passes_backend(contexts, aot=spelling == "matmul_HV"), dynamic=False)
    out = compiled(x, labels)
    got_grads = torch.autograd.grad(out.sum(), [x, *model.parameters()], allow_unused=True)
    assert [counts(c) for c in contexts] == [(1, 0)]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        if r is None:  # the [V, H] weight of the matmul_HV head is unused
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_16bit_loss_without_upcast_keeps_its_dtype_and_notes_it():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, V, bias=False).half()

        def forward(self, h, y):
            return F.cross_entropy(self.head(h).view(-1, V), y.view(-1))

    graphs = capture(Half(), args=(torch.randn(2, 5, 16).half(), torch.randint(0, V, (2, 5))), dynamic=False)
    result, ctx = run_pass(graphs[0].gm)
    assert counts(ctx) == (1, 0)
    assert any("float16 logits" in n for n in ctx.notes)
    out = next(n for n in result.graph_module.graph.nodes if n.op == "output").args[0][0]
    assert out.meta["val"].dtype == torch.float16  # the loss is cast back to what the graph returned


class Autocast(nn.Module):
    """HF Trainer's bf16 mode: fp32 weights, the forward under autocast (the head's product runs in bf16)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x, labels)


@pytest.mark.parametrize("aot", [False, True], ids=["eager-graph", "aot-autograd"])
def test_autocast_casts_are_made_explicit_and_match(monkeypatch, aot):
    import flashfx.codegen.cross_entropy as op
    monkeypatch.setattr(op, "triton_runs_on", lambda device: False)  # the CPU interpreter gets bf16 wrong
    model = Autocast(Head("linear", bias=True))
    x, labels = torch.randn(3, 7, 16, requires_grad=True), torch.randint(0, V, (3, 7))
    ref = model(x, labels)
    ref_grads = torch.autograd.grad(ref, [x, *model.parameters()])
    contexts = []
    out = torch.compile(model, backend=passes_backend(contexts, aot=aot), dynamic=False)(x, labels)
    got_grads = torch.autograd.grad(out, [x, *model.parameters()])
    assert [counts(c) for c in contexts] == [(1, 0)]
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == r.dtype and (g - r).norm() / r.norm() < 2e-2


# ------------------------------------------------------------------------------------------- must not fire

class Variant(Head):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.register_buffer("class_weight", torch.rand(V))

    def forward(self, x, labels):
        logits = self.logits(torch.tanh(self.proj(x)))
        flat = logits.view(-1, V)
        y = labels.view(-1)
        if self.kind == "class_weights":
            return F.cross_entropy(flat, y, weight=self.class_weight)
        if self.kind == "logits_used_elsewhere":
            return F.cross_entropy(flat, y) + flat.argmax(-1).float().mean()
        if self.kind == "downcast":
            return F.cross_entropy(flat.half().float(), y)
        if self.kind == "reshape_then_slice":
            return F.cross_entropy(flat[:-1], y[1:])
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind,reason", [
    ("class_weights", "class weights"),
    ("logits_used_elsewhere", "other users"),
    ("downcast", "cast torch.float32 -> torch.float16"),
    ("reshape_then_slice", "reshaped before they are sliced"),
])
def test_declines_with_a_reason(kind, reason):
    graphs = capture(Variant(kind), args=(torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))), dynamic=False)
    before = graphs[0].gm.code
    result, ctx = run_pass(graphs[0].gm)
    assert counts(ctx) == (0, 1)
    assert reason in ctx.declined[0].reason
    assert not result.modified
    assert not any(n.target is OP for n in result.graph_module.graph.nodes)
    assert before.count("cross_entropy") == result.graph_module.code.count("cross_entropy")


def test_off_by_config_and_on_aten_graphs():
    graphs = capture(Head(), args=(torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))), dynamic=False)
    for config, stage in ((Config(cross_entropy=False), "torch"), (Config(), "forward")):
        result, ctx = run_pass(graphs[0].gm, config, stage)
        assert not result.modified and counts(ctx) == (0, 0)
