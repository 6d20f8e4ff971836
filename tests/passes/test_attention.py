"""The attention pass: exact counts of replaced sites per form, near misses declined with a reason, and the
rewritten graph's outputs against the original graph's (fp32, tight tolerance; the op runs its Triton kernels
through the interpreter on CPU)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfx.ops  # noqa: F401  (registers torch.ops.flashfx.attention)
from flashfx.config import Config
from flashfx.passes.attention import attention
from flashfx.rewriter.canonicalize import canonicalize
from flashfx.rewriter.capture import capture
from flashfx.rewriter.pass_manager import PassContext

B, H, L, D = 2, 2, 8, 8
OP = torch.ops.flashfx.attention.default


def _real(x):
    return x.node.hint if isinstance(x, torch.SymInt) else x


def rewrite(fn, *args, **kwargs):
    """Capture `fn`, run canonicalize + attention on every graph; returns (ctx, op nodes, before, after)."""
    ctx = PassContext(Config())
    graphs = capture(fn, args, kwargs)
    before, after, ops = [], [], []
    for g in graphs:
        inputs = [_real(x) for x in g.example_inputs]
        torch.manual_seed(1)
        before.append(g.gm(*inputs))
        original = set(g.gm.graph.nodes)
        gm = attention(canonicalize(g.gm, ctx).graph_module, ctx).graph_module
        gm.graph.lint()
        for n in gm.graph.nodes:
            if n not in original:  # every node the passes created carries its fake value
                assert "val" in n.meta, f"{n.format_node()} has no meta['val']"
        ops += [n for n in gm.graph.nodes if n.target is OP]
        torch.manual_seed(1)
        after.append(gm(*inputs))
    return ctx, ops, before, after


def assert_close(before, after, rtol=1e-5, atol=2e-6):
    flat_b, _ = torch.utils._pytree.tree_flatten(before)
    flat_a, _ = torch.utils._pytree.tree_flatten(after)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_b, flat_a):
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol, equal_nan=True)


def qkv(heads_kv=H, dtype=torch.float32, length=L):
    q = torch.randn(B, H, length, D, dtype=dtype)
    k = torch.randn(B, heads_kv, length, D, dtype=dtype)
    v = torch.randn(B, heads_kv, length, D, dtype=dtype)
    return q, k, v


def counts(ctx):
    return ctx.counters.get("attention.replaced", 0), ctx.counters.get("attention.declined", 0)


# ------------------------------------------------------------------------------------------ explicit forms

def plain_div(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v


def matmul_mul_after(q, k, v):
    s = torch.matmul(q, k.permute(0, 1, 3, 2)) * D ** -0.5
    return torch.matmul(F.softmax(s, dim=-1), v)


def scale_folded_into_q(q, k, v):
    return ((q * D ** -0.5) @ k.mT).softmax(-1) @ v


def einsum_form(q, k, v):
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).div(math.sqrt(D)).softmax(dim=3)
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def bmm_3d(q, k, v):
    q3, k3, v3 = (x.reshape(B * H, L, D) for x in (q, k, v))
    p = torch.bmm(q3, k3.transpose(1, 2)).mul(0.3).softmax(-1)
    return torch.bmm(p, v3)


def no_scale(q, k, v):
    return (q @ k.transpose(2, 3)).softmax(-1) @ v


def diffusers_baddbmm(q, k, v):  # diffusers' get_attention_scores on [B*H, L, D]
    q3, k3, v3 = (x.reshape(B * H, L, D) for x in (q, k, v))
    empty = torch.empty(B * H, L, L, dtype=q.dtype)
    scores = torch.baddbmm(empty, q3, k3.transpose(-1, -2), beta=0, alpha=0.25)
    return torch.bmm(scores.softmax(dim=-1), v3)


def causal_tril_masked_fill(q, k, v):
    keep = torch.ones(L, L, dtype=torch.bool).tril()
    s = (q @ k.transpose(-2, -1)) * 0.25
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def causal_triu_additive(q, k, v):
    bias = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, -1) @ v


def causal_arange_where(q, k, v):
    i = torch.arange(L)
    keep = i[None, :] <= i[:, None]
    mask = torch.where(keep, torch.tensor(0.0), torch.finfo(torch.float32).min)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, -1) @ v


def padding_mask_masked_fill(q, k, v, pad):  # pad: [B, S] bool, True = padding
    s = q @ k.transpose(-2, -1) * 0.25
    return s.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1) @ v


def alibi_bias(q, k, v, slopes):
    pos = torch.arange(L)
    bias = slopes[None, :, None, None] * (pos[None, :] - pos[:, None])  # [1, H, L, S]
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, -1) @ v


def upcast_and_back(q, k, v):
    s = (q @ k.transpose(-2, -1)) * 0.25
    return torch.softmax(s.float(), dim=-1, dtype=torch.float32).to(q.dtype) @ v


def contiguous_copies(q, k, v):
    s = (q @ k.transpose(-2, -1)).contiguous() * 0.25
    return torch.softmax(s, -1).contiguous().clone() @ v


def dropout_eval(q, k, v):
    p = F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1), p=0.1, training=False)
    return p @ v


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def gqa_repeat_kv(q, k, v):
    k, v = repeat_kv(k, H // 1), repeat_kv(v, H // 1)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v


def gqa_expand_flatten(q, k, v):
    k, v = (x[:, :, None].expand(B, 1, H, L, D).flatten(1, 2) for x in (k, v))
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v


def gqa_repeat_interleave(q, k, v):
    k, v = k.repeat_interleave(H, dim=1), v.repeat_interleave(H, dim=1)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v


def two_sites(q, k, v):
    a = torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v
    return torch.softmax(a @ k.transpose(-2, -1) * 0.5, -1) @ v


EXPLICIT = {
    # name: (fn, extra args, kv heads, expected is_causal, expected scale)
    "plain_div": (plain_div, (), H, False, 1 / math.sqrt(D)),
    "matmul_mul_after": (matmul_mul_after, (), H, False, D ** -0.5),
    "scale_folded_into_q": (scale_folded_into_q, (), H, False, D ** -0.5),
    "einsum": (einsum_form, (), H, False, 1 / math.sqrt(D)),
    "bmm_3d": (bmm_3d, (), H, False, 0.3),
    "no_scale": (no_scale, (), H, False, 1.0),
    "diffusers_baddbmm": (diffusers_baddbmm, (), H, False, 0.25),
    "causal_tril_masked_fill": (causal_tril_masked_fill, (), H, True, 0.25),
    "causal_triu_additive": (causal_triu_additive, (), H, True, 0.25),
    "causal_arange_where": (causal_arange_where, (), H, True, 0.25),
    "padding_mask": (padding_mask_masked_fill, ("pad",), H, False, 0.25),
    "alibi_bias": (alibi_bias, ("slopes",), H, False, 0.25),
    "upcast_and_back": (upcast_and_back, (), H, False, 0.25),
    "dropout_eval": (dropout_eval, (), H, False, 0.25),
    "contiguous_copies": (contiguous_copies, (), H, False, 0.25),
    "gqa_repeat_kv": (gqa_repeat_kv, (), 1, False, 0.25),
    "gqa_repeat_interleave": (gqa_repeat_interleave, (), 1, False, 0.25),
    "gqa_expand_flatten": (gqa_expand_flatten, (), 1, False, 0.25),
}


def _extra(name):
    if name == "pad":
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[1, -3:] = True  # second sequence has 3 padding keys; no row is fully masked
        return pad
    return torch.tensor([0.5, 0.25])  # ALiBi slopes


@pytest.mark.parametrize("name", list(EXPLICIT))
def test_explicit_forms(name):
    fn, extra, kv_heads, causal, scale = EXPLICIT[name]
    ctx, ops, before, after = rewrite(fn, *qkv(kv_heads), *(_extra(e) for e in extra))
    assert counts(ctx) == (1, 0), ctx.declined
    (node,) = ops
    q, k, v, bias, is_causal, op_scale, dropout_p = node.args
    assert is_causal is causal
    assert op_scale == pytest.approx(scale, rel=1e-12)
    assert dropout_p == 0.0
    assert node.meta["val"].shape[-1] == D
    if kv_heads != H:  # K/V passed un-repeated: the op reads them with native GQA
        assert k.meta["val"].shape[1] == kv_heads and v.meta["val"].shape[1] == kv_heads
    if causal:
        assert bias is None  # the proven-causal mask is dropped, not read
    assert_close(before, after)


QK = {  # spellings of q @ kᵀ
    "matmul_transpose": lambda q, k: torch.matmul(q, k.transpose(-2, -1)),
    "at_mT": lambda q, k: q @ k.mT,
    "einsum": lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k),
    "method_permute": lambda q, k: q.matmul(k.permute(0, 1, 3, 2)),
}
SCALED = {  # where the scale goes
    "div_after": lambda qk, q, k: qk(q, k) / math.sqrt(D),
    "mul_before_q": lambda qk, q, k: qk(q * D ** -0.5, k),
    "split_q_k": lambda qk, q, k: qk(q * D ** -0.25, k * D ** -0.25),
}
SOFTMAX = {
    "F": lambda s: F.softmax(s, dim=-1),
    "method_upcast": lambda s: s.float().softmax(-1).type_as(s),
}


def test_spelling_combinations():
    """Every combination of the spellings above is one site with the same scale (the pattern is written once)."""
    for qk_name, qk in QK.items():
        for scale_name, scaled in SCALED.items():
            for sm_name, softmax in SOFTMAX.items():
                torch._dynamo.reset()

                def fn(q, k, v):
                    return softmax(scaled(qk, q, k)) @ v

                ctx, ops, before, after = rewrite(fn, *qkv())
                label = f"{qk_name}/{scale_name}/{sm_name}"
                assert counts(ctx) == (1, 0), (label, ctx.declined)
                assert ops[0].args[5] == pytest.approx(D ** -0.5, rel=1e-9), label
                assert_close(before, after)


def test_padding_mask_becomes_attend_mask():
    ctx, ops, before, after = rewrite(padding_mask_masked_fill, *qkv(), _extra("pad"))
    bias = ops[0].args[3]
    assert bias.target is torch.logical_not and bias.meta["val"].dtype == torch.bool
    assert tuple(bias.meta["val"].shape) == (B, 1, 1, L)  # broadcast stays broadcast: no [B, H, L, S] copy
    assert_close(before, after)


def test_negated_causal_and_padding_mask():
    """masked_fill(~(causal & keep), -inf): the negation is undone, then is_causal + the [B, 1, 1, S] padding."""
    def fn(q, k, v, keep):
        i = torch.arange(L)
        allowed = (i[None, :] <= i[:, None]) & keep[:, None, None, :]
        s = q @ k.transpose(-2, -1) * 0.25
        return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v

    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, -2:] = False  # right padding: every row keeps key 0
    ctx, (node,), before, after = rewrite(fn, *qkv(), keep)
    assert node.args[4] is True
    assert tuple(node.args[3].meta["val"].shape) == (B, 1, 1, L)
    assert_close(before, after)


def test_fp16_upcast_softmax():
    ctx, ops, before, after = rewrite(upcast_and_back, *qkv(dtype=torch.float16))
    assert counts(ctx) == (1, 0)
    assert_close(before, after, rtol=1e-2, atol=1e-2)


def test_two_sites_in_one_graph():
    ctx, ops, before, after = rewrite(two_sites, *qkv())
    assert counts(ctx) == (2, 0) and len(ops) == 2
    assert_close(before, after)


def test_dead_nodes_removed():
    ctx = PassContext(Config())
    (g,) = capture(causal_tril_masked_fill, qkv())
    gm = attention(canonicalize(g.gm, ctx).graph_module, ctx).graph_module
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    for gone in (torch.softmax, torch.matmul, "masked_fill", torch.tril, "tril", torch.ones, operator_mul()):
        assert gone not in targets, gone


def empty_cache_update(q, k, v):  # a Hugging Face KV cache's first update, as in every training forward
    k, v = k * 1.0, v * 1.0
    keys = torch.cat([torch.tensor([], dtype=k.dtype), k], dim=-2)
    values = torch.cat([torch.tensor([], dtype=v.dtype), v], dim=-2)
    return F.scaled_dot_product_attention(q, keys, values, is_causal=True)


def empty_cache_update_then_written(q, k, v):
    k, v = k * 1.0, v * 1.0
    keys = torch.cat([torch.tensor([], dtype=k.dtype), k], dim=-2)
    values = torch.cat([torch.tensor([], dtype=v.dtype), v], dim=-2)
    k.mul_(2.0)  # the cat's copy holds the old keys: the op must read the copy
    return F.scaled_dot_product_attention(q, keys, values, is_causal=True), k


def test_kv_concatenated_onto_an_empty_cache_is_read_without_the_copy():
    ctx, ops, before, after = rewrite(empty_cache_update, *qkv())
    assert counts(ctx) == (1, 0) and ctx.counters.get("attention.cache_copies_skipped") == 2
    assert_close(before, after)
    (g,) = capture(empty_cache_update, qkv())
    gm = attention(canonicalize(g.gm, PassContext(Config())).graph_module, PassContext(Config())).graph_module
    assert not [n for n in gm.graph.nodes if n.target is torch.cat]


def test_kv_cache_copy_kept_when_the_tensor_is_written_in_place():
    ctx, ops, before, after = rewrite(empty_cache_update_then_written, *qkv())
    assert counts(ctx) == (1, 0) and "attention.cache_copies_skipped" not in ctx.counters
    assert_close(before, after)


def operator_mul():
    import operator

    return operator.mul


def test_dropout_in_training_is_kept_as_dropout_p():
    def fn(q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1), p=0.1, training=True) @ v

    ctx = PassContext(Config())
    (g,) = capture(fn, qkv())
    gm = attention(canonicalize(g.gm, ctx).graph_module, ctx).graph_module
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert node.args[6] == 0.1 and counts(ctx) == (1, 0)
    assert any("dropout p=0.1" in note for note in ctx.notes)


# -------------------------------------------------------------------------------------------- near misses

def probs_returned(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1)
    return p @ v, p


def softmax_other_dim(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-2) @ v


def mask_from_scores(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    return s.masked_fill(s < 0, float("-inf")).softmax(-1) @ v


def finite_fill_padding(q, k, v, pad):
    s = q @ k.transpose(-2, -1) * 0.25
    return s.masked_fill(pad[:, None, None, :], -1e9).softmax(-1) @ v


def scale_after_mask(q, k, v, slopes):
    pos = torch.arange(L)
    bias = slopes[None, :, None, None] * (pos[None, :] - pos[:, None])
    return torch.softmax((q @ k.transpose(-2, -1) + bias) * 0.25, -1) @ v


def scores_reused(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    return torch.softmax(s, -1) @ v, s.sum()


NEAR_MISSES = {
    "probs_returned": (probs_returned, (), "probabilities are also used"),
    "softmax_other_dim": (softmax_other_dim, (), "not the last (key) dim"),
    "mask_from_scores": (mask_from_scores, (), "computed from the scores"),
    "finite_fill_padding": (finite_fill_padding, ("pad",), "finite value"),
    "scale_after_mask": (scale_after_mask, ("slopes",), "before the scale"),
    "scores_reused": (scores_reused, (), "scores are also used"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses_decline(name):
    fn, extra, reason = NEAR_MISSES[name]
    ctx, ops, before, after = rewrite(fn, *qkv(), *(_extra(e) for e in extra))
    assert counts(ctx) == (0, 1) and not ops
    (declined,) = ctx.declined
    assert reason in declined.reason, declined.reason
    assert_close(before, after, rtol=0, atol=0)  # the graph was left as it was


def test_softmax_not_feeding_attention_is_ignored():
    def classifier(x, w):
        return torch.softmax(x @ w, dim=-1)

    ctx, ops, _, _ = rewrite(classifier, torch.randn(4, 8), torch.randn(8, 3))
    assert counts(ctx) == (0, 0)


def test_attention_off_leaves_graph():
    ctx = PassContext(Config(attention="off"))
    (g,) = capture(plain_div, qkv())
    assert not attention(g.gm, ctx).modified and counts(ctx) == (0, 0)


# ---------------------------------------------------------------------------------------------- sdpa form

SDPA = {
    # name: (kwargs builder, kv heads, expected is_causal, expected bias kind)
    "plain": (lambda: {}, H, False, None),
    "is_causal": (lambda: {"is_causal": True}, H, True, None),
    "scale": (lambda: {"scale": 0.3}, H, False, None),
    "bool_mask": (lambda: {"attn_mask": torch.rand(B, 1, L, L) > 0.2}, H, False, torch.bool),
    "float_mask": (lambda: {"attn_mask": torch.randn(1, H, L, L)}, H, False, torch.float32),
    "enable_gqa": (lambda: {"enable_gqa": True}, 1, False, None),
}


@pytest.mark.parametrize("name", list(SDPA))
def test_sdpa_forms(name):
    make, kv_heads, causal, bias_dtype = SDPA[name]
    kwargs = make()
    if name == "bool_mask":
        kwargs["attn_mask"][..., 0] = True  # no row fully masked

    def fn(q, k, v, **kw):
        return F.scaled_dot_product_attention(q, k, v, **kw)

    ctx, ops, before, after = rewrite(fn, *qkv(kv_heads), **kwargs)
    assert counts(ctx) == (1, 0), ctx.declined
    (node,) = ops
    assert node.args[4] is causal
    bias = node.args[3]
    assert (bias is None) if bias_dtype is None else bias.meta["val"].dtype == bias_dtype
    assert_close(before, after)


def test_sdpa_gqa_repeat_kv_unrepeated():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H), is_causal=True)

    ctx, ops, before, after = rewrite(fn, *qkv(1))
    (node,) = ops
    assert node.args[1].meta["val"].shape[1] == 1
    assert not any(n.op == "call_method" and n.target == "expand" for n in node.graph.nodes)
    assert_close(before, after)


def test_sdpa_causal_and_padding_reads_only_the_padding():
    """HF builds (causal & padding).expand(B, 1, L, S): the op gets is_causal and the [B, 1, 1, S] padding only."""
    def fn(q, k, v, keep):  # keep: [B, S], True = a real token
        i = torch.arange(L)
        allowed = (i[None, None, None, :] <= i[None, None, :, None]) & keep[:, None, None, :]
        mask = (torch.ones((), dtype=torch.bool) & allowed).expand(B, 1, L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, :3] = False  # left padding: rows 0-2 of the second sequence see no key (0 in SDPA and in the op)
    ctx, ops, before, after = rewrite(fn, *qkv(), keep)
    (node,) = ops
    assert node.args[4] is True
    assert tuple(node.args[3].meta["val"].shape) == (B, 1, 1, L) and node.args[3].meta["val"].dtype == torch.bool
    assert_close(before, after)


def test_sdpa_dropout_kept():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)

    ctx = PassContext(Config())
    (g,) = capture(fn, qkv())
    gm = attention(canonicalize(g.gm, ctx).graph_module, ctx).graph_module
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert node.args[6] == 0.2


# -------------------------------------------------------------------------------------- nn.MultiheadAttention

class MHA(nn.Module):
    def __init__(self, return_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.return_weights = return_weights

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.return_weights)
        return (out, weights) if self.return_weights else out


def test_multihead_attention():
    ctx, ops, before, after = rewrite(MHA().eval(), torch.randn(B, L, 16))
    assert counts(ctx) == (1, 0), ctx.declined
    assert ops[0].meta["val"].shape == (B, 4, L, 4)
    assert_close(before, after)


class MHAMasked(nn.Module):
    def __init__(self, mask_kind):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mask_kind = mask_kind

    def forward(self, x, kpm):
        kw = {}
        if "kpm" in self.mask_kind:  # float with a float attn_mask: mixed types graph-break in MHA's warning
            kw["key_padding_mask"] = kpm if self.mask_kind == "kpm" else torch.zeros(kpm.shape).masked_fill(
                kpm, float("-inf"))
        if "causal" in self.mask_kind:
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            kw["is_causal"] = "hint" in self.mask_kind
        if "bool3d" in self.mask_kind:
            kw["attn_mask"] = torch.ones(x.shape[0] * 4, x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        return self.attn(x, x, x, need_weights=False, **kw)[0]


@pytest.mark.parametrize("mask_kind", ["kpm", "causal", "causal_hint", "kpm_causal", "bool3d"])
def test_multihead_attention_masks(mask_kind):
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -3:] = True
    ctx, ops, before, after = rewrite(MHAMasked(mask_kind).eval(), torch.randn(B, L, 16), kpm)
    assert counts(ctx) == (1, 0), ctx.declined
    if mask_kind in ("causal", "causal_hint"):  # generate_square_subsequent_mask is proven causal in the graph
        assert ops[0].args[4] is True and ops[0].args[3] is None
    assert_close(before, after)


def test_multihead_cross_attention_with_kdim_vdim():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, batch_first=True)

        def forward(self, x, mem_k, mem_v):
            return self.attn(x, mem_k, mem_v, need_weights=False)[0]

    ctx, ops, before, after = rewrite(Cross().eval(), torch.randn(B, L, 16), torch.randn(B, 6, 12),
                                      torch.randn(B, 6, 10))
    assert counts(ctx) == (1, 0), ctx.declined
    assert tuple(ops[0].args[1].meta["val"].shape) == (B, 4, 6, 4)
    assert_close(before, after)


def test_transformer_encoder_layer_with_padding():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -2:] = True
    ctx, ops, before, after = rewrite(layer, torch.randn(B, L, 16), src_key_padding_mask=kpm)
    assert counts(ctx) == (1, 0), ctx.declined
    assert ops[0].args[3] is not None  # the padding mask, as a [B, 1, 1, S] float bias
    assert_close(before, after)


def test_multihead_attention_weights_used_declines():
    ctx, ops, before, after = rewrite(MHA(return_weights=True).eval(), torch.randn(B, L, 16))
    assert counts(ctx) == (0, 1) and "attention weights" in ctx.declined[0].reason


# ------------------------------------------------------------------------------------------ Hugging Face

transformers = pytest.importorskip("transformers")


def _hf(name, impl, layers=2):
    T = transformers
    common = dict(num_hidden_layers=layers, num_attention_heads=4)
    if name == "llama":
        cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                            max_position_embeddings=64, **common)
        model = T.LlamaForCausalLM
    elif name == "mistral":
        cfg = T.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                              max_position_embeddings=64, sliding_window=None, **common)
        model = T.MistralForCausalLM
    elif name == "gpt2":
        cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
        model = T.GPT2LMHeadModel
    elif name == "bert":
        cfg = T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=64, **common)
        model = T.BertModel
    else:
        cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, **common)
        model = T.ViTModel
    cfg._attn_implementation = impl
    m = model(cfg).eval()
    if name == "vit":
        return m, {"pixel_values": torch.randn(2, 3, 16, 16)}
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    if name == "bert":
        inputs["attention_mask"] = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    return m, inputs


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2", "bert", "vit"])
def test_hugging_face_models(name, impl):
    model, inputs = _hf(name, impl)
    ctx, ops, before, after = rewrite(model, **inputs)
    assert counts(ctx) == (2, 0), ctx.declined  # every layer's attention replaced
    if name in ("llama", "mistral"):
        for node in ops:
            assert node.args[4] is True and node.args[3] is None  # causal mask proven, not read
            assert node.args[1].meta["val"].shape[1] == 2  # K/V not repeated (2 KV heads for 4 query heads)
    if name == "gpt2":
        assert all(node.args[4] is True for node in ops)
    if name == "bert":
        assert all(node.args[3] is not None for node in ops)  # the padding mask is kept
    assert_close(before, after, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- inside a torch.compile backend

@pytest.mark.parametrize("fn", [causal_arange_where, gqa_repeat_kv], ids=["causal", "gqa"])
def test_inside_torch_compile_backend_with_gradients(fn):
    """The passes run inside a Dynamo backend (another fake mode is active there); gradients flow through the op."""
    contexts = []

    def backend(gm, example_inputs):
        ctx = PassContext(Config())
        attention(canonicalize(gm, ctx).graph_module, ctx)
        contexts.append(ctx)
        return gm.forward

    kv_heads = 1 if fn is gqa_repeat_kv else H
    inputs = [t.requires_grad_() for t in qkv(kv_heads)]
    expected = fn(*inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    got = torch.compile(fn, backend=backend)(*inputs)
    got_grads = torch.autograd.grad(got.square().sum(), inputs)
    assert sum(counts(c)[0] for c in contexts) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_odd_graphs_never_crash():
    """Graphs near the pattern but outside it: the pass declines or ignores them, and outputs stay the same."""
    def fn(x, w, q, k, v):
        a = torch.softmax(x, 0) @ w  # softmax of an input, not of scores
        b = torch.softmax(q[0, 0] @ k[0, 0].T, -1) @ v[0, 0]  # 2-D attention (no batch / head dims)
        c = torch.softmax(q @ k.transpose(-2, -1) * torch.tensor(0.5), -1) @ v  # scale is a tensor
        d = torch.softmax(q @ k.transpose(-2, -1), -1) @ v.transpose(-2, -1)  # "v" is [.., D, S]: shapes differ
        e = torch.softmax((q @ k.transpose(-2, -1)).tanh(), -1) @ v  # soft-capping: unsupported score op
        return a, b, c, d, e

    q, k, v = qkv(length=D)  # L == D so the transposed v still multiplies
    ctx, ops, before, after = rewrite(fn, torch.randn(5), torch.randn(5, 3), q, k, v)
    assert counts(ctx) == (2, 3)  # b (2-D) and d are attention; a, c, e are declined with a reason
    reasons = " | ".join(d.reason for d in ctx.declined)
    for expected in ("not from q @ kᵀ", "unsupported op %mul", "unsupported op %tanh"):
        assert expected in reasons
    assert_close(before, after)


def test_hugging_face_output_attentions_declines():
    model, inputs = _hf("llama", "eager", layers=1)
    ctx, ops, before, after = rewrite(model, **inputs, output_attentions=True)
    assert counts(ctx) == (0, 1)
    assert "probabilities are also used" in ctx.declined[0].reason


def test_row_fully_masked_by_finfo_min_gives_zero():
    """The op reads bias values below -1e38 (HF's finfo.min masks) as -inf: a row masked that way everywhere gives
    0 (as SDPA and HF's sdpa path do) where eager averages V; every other row matches eager, and the site says so."""
    def fn(q, k, v, mask):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, -1) @ v

    mask = torch.zeros(B, 1, L, L)
    mask[1, :, 0, :] = torch.finfo(torch.float32).min  # row 0 of the second sequence sees no key
    mask[0, :, :, -2:] = torch.finfo(torch.float32).min  # partly masked rows behave exactly as in eager
    ctx, ops, [(before,)], [(after,)] = rewrite(fn, *qkv(), mask)
    assert counts(ctx) == (1, 0)
    assert any("finfo.min" in note for note in ctx.notes)
    assert torch.equal(after[1, :, 0], torch.zeros_like(after[1, :, 0]))
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(after[1, :, 1:], before[1, :, 1:], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["causal_arange_where", "padding_mask", "gqa_repeat_kv", "bmm_3d"])
def test_reference_path_numerics(name, monkeypatch):
    """The same rewrites checked through the op's ATen reference path (no Triton interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn, extra, kv_heads, _, _ = EXPLICIT[name]
    ctx, ops, before, after = rewrite(fn, *qkv(kv_heads), *(_extra(e) for e in extra))
    assert counts(ctx) == (1, 0)
    assert_close(before, after)
