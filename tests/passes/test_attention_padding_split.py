"""HF eager's combined causal + padding FLOAT mask: `where(causal & padding, 0, finfo.min)` (transformers 5.17 Llama /
GPT-2 eager with an `attention_mask`) becomes is_causal=True plus the [B, 1, 1, S] padding term, as the bool mask of
the sdpa path does. The op reads bias values below -1e38 as -inf, so that bias is the bool mask `causal & padding` to
the op, exactly; a finite fill (-1e4) or an unproven causal part keeps the full bias.

The plain-PyTorch masks below reproduce HF's construction node for node (arange indices, `new_ones` &
`kv <= q` & `padding[b, kv]`, expand, where with `torch.tensor(0.0)`)."""
import operator

import pytest
import torch

from attention_rewrite import OP, rewrite


B, H, S, D = 3, 2, 8, 8
NEG = torch.finfo(torch.float32).min


def padding_mask():
    """Batch 0 left-padded (3 keys: its first 3 query rows have every key masked), batch 1 right-padded (2 keys),
    batch 2 fully padded (every row fully masked)."""
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, :3] = 0
    pad[1, -2:] = 0
    pad[2] = 0
    return pad


def hf_allowed(q, pad, positions=None, pad_by_query=False):
    """HF 5.17's bool attend-mask [B, 1, S, S]: new_ones & kv <= q & padding[b, kv]."""
    batch, length = q.shape[0], q.shape[2]
    pad = pad.to(device=q.device, dtype=torch.bool)
    b = torch.arange(batch)[:, None, None, None]
    qi = (torch.arange(length) + 0)[None, None, :, None]
    kvi = (torch.arange(length) + 0)[None, None, None, :]
    result = qi.new_ones((), dtype=torch.bool)
    if positions is None:
        result = result & operator.le(kvi, qi).to(q.device)
    else:  # positions given as a graph input: the comparison cannot be proven causal
        pos = positions.expand(batch, -1)
        result = result & operator.le(pos[b, kvi], pos[b, qi]).to(q.device)
    result = result & pad[b, qi if pad_by_query else kvi].to(q.device)
    return result.expand(batch, -1, length, length)


def where_mask(allowed, fill=NEG):
    return torch.where(allowed, torch.tensor(0.0, dtype=torch.float32), fill)


def where_negated(allowed, fill=NEG):
    return torch.where(~allowed, fill, torch.tensor(0.0, dtype=torch.float32))


def masked_fill_mask(allowed, fill=NEG):
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, fill)


def eager(q, k, v, mask):
    """HF's eager_attention_forward: additive mask, fp32 softmax."""
    scores = q @ k.transpose(2, 3) * D ** -0.5 + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


# name -> (attention(q, k, v, pad, positions) -> out, whether the site splits into is_causal + [B, 1, 1, S])
CASES = {
    "where": (lambda q, k, v, pad, pos: eager(q, k, v, where_mask(hf_allowed(q, pad))), True),
    "where_negated": (lambda q, k, v, pad, pos: eager(q, k, v, where_negated(hf_allowed(q, pad))), True),
    "masked_fill": (lambda q, k, v, pad, pos: eager(q, k, v, masked_fill_mask(hf_allowed(q, pad))), True),
    "where_minus_inf": (lambda q, k, v, pad, pos: eager(q, k, v, where_mask(hf_allowed(q, pad), float("-inf"))),
                        True),
    # must keep the bias
    "padding_by_query": (lambda q, k, v, pad, pos: eager(q, k, v, where_mask(hf_allowed(q, pad, pad_by_query=True))),
                         False),
    "finite_fill": (lambda q, k, v, pad, pos: eager(q, k, v, where_mask(hf_allowed(q, pad), -1e4)), False),
    "finite_fill_masked_fill": (lambda q, k, v, pad, pos: eager(q, k, v, masked_fill_mask(hf_allowed(q, pad), -1e9)),
                                False),
    "position_ids_input": (lambda q, k, v, pad, pos: eager(q, k, v, where_mask(hf_allowed(q, pad, positions=pos))),
                           False),
}


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@pytest.mark.parametrize("name", list(CASES))
def test_float_causal_padding_mask(name):
    fn, split = CASES[name]
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    pad, pos = padding_mask(), torch.arange(S)[None]
    ctx, (node,), before, after = rewrite(fn, q, k, v, pad, pos)
    assert ctx.counters.get("attention.replaced") == 1 and not ctx.counters.get("attention.declined")
    bias = node.args[3].meta["val"]
    if split:
        assert node.args[4] is True and tuple(bias.shape) == (B, 1, 1, S) and bias.dtype == torch.bool
    else:
        assert node.args[4] is False and bias.dtype == torch.float32 and tuple(bias.shape)[-2:] == (S, S)
    after, before = first(after), first(before)
    # the original graph as the op reads it: its full float bias (values below -1e38 are -inf, masked rows give 0)
    mask = {"where": where_mask, "where_negated": where_negated, "masked_fill": masked_fill_mask}
    if split:
        fill = float("-inf") if name == "where_minus_inf" else NEG
        reference = OP(q, k, v, mask.get(name, where_mask)(hf_allowed(q, pad), fill), False, D ** -0.5, 0.0)
        torch.testing.assert_close(after, reference, rtol=1e-5, atol=2e-6)
    # rows with at least one key: equal to eager; rows with none (batch 0's first 3, all of batch 2): 0 when split
    allowed = hf_allowed(q, pad, pad_by_query=name == "padding_by_query")
    live = allowed.any(-1, keepdim=True).expand_as(after)
    torch.testing.assert_close(after[live], before[live], rtol=1e-5, atol=2e-6)
    if split:
        assert (~live).sum() == H * (3 + S) * D and after[~live].abs().max() == 0


def test_hf_llama_eager_with_padding():
    """A real transformers Llama (eager) with a padded `attention_mask`: both layers split, logits equal eager's on
    every position that has a key (the left-padded positions have none: eager averages V there, the op gives 0)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models import hf_model

    model, inputs = hf_model("LlamaForCausalLM", attn_implementation="eager")
    pad = torch.ones_like(inputs["input_ids"])
    pad[0, :5] = 0  # left padding: positions 0..4 of sequence 0 see no key
    pad[1, -3:] = 0  # right padding
    inputs["attention_mask"] = pad
    ctx, nodes, before, after = rewrite(model, **inputs)
    before, after = first(before), first(after)
    assert ctx.counters.get("attention.replaced") == 2 and not ctx.counters.get("attention.declined")
    for node in nodes:
        bias = node.args[3].meta["val"]
        assert node.args[4] is True and bias.dtype == torch.bool
        assert [bias.shape[i] for i in (1, 2)] == [1, 1] and bias.dim() == 4
    torch.testing.assert_close(after[0, 5:], before[0, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-5)
