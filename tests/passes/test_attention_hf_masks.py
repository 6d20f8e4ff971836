"""Causal masks as transformers 5.2x builds them (packed-sequence aware), in plain PyTorch: the attention pass proves
them causal only when the position ids are an arange built in the graph, and keeps the mask as a bias otherwise.

HF 5.23 (eager, no padding mask) ANDs three terms and broadcasts them to [B, 1, S, S]:
  all-true `new_ones` & packed[b, q] == packed[b, kv] & positions[b, kv] <= positions[b, q]
with packed = cumsum(diff(positions, prepend=positions[:, :1] - 1) != 1) (Llama, Mistral and GPT-2 build the
same graph). The functions below reproduce that graph node for node, so these tests need no transformers."""
import operator

import pytest
import torch

from attention_rewrite import rewrite
import torch.nn.functional as F


B, H, S, D = 2, 2, 8, 8


def hf_mask(q, position_ids, q_offset=0, kv_offset=0, prepend_minus=1, compare=operator.le):
    """HF 5.23's `create_causal_mask` with `packed_sequence_mask` set: a bool attend-mask [B, 1, S, S]."""
    batch, length = q.shape[0], q.shape[2]
    positions = position_ids.expand(batch, -1)
    first_dummy_value = positions[:, :1] - prepend_minus
    position_diff = torch.diff(positions, prepend=first_dummy_value, dim=-1)
    packed = (position_diff != 1).cumsum(-1)
    expanded = position_ids.expand(batch, -1)
    b = torch.arange(batch)[:, None, None, None]
    qi = (torch.arange(length) + q_offset)[None, None, :, None]
    kvi = (torch.arange(length) + kv_offset)[None, None, None, :]
    result = qi.new_ones((), dtype=torch.bool)
    result = result & (packed[b, qi] == packed[b, kvi]).to(q.device)
    result = result & compare(expanded[b, kvi], expanded[b, qi]).to(q.device)
    return result.expand(batch, -1, length, length)


def eager_attention(q, k, v, allowed):
    """HF's eager_attention_forward: finfo.min additive mask from `torch.zeros(())`, fp32 softmax."""
    mask = torch.where(allowed, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
    scores = q @ k.transpose(2, 3) * D ** -0.5 + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def arange_positions(q):  # Llama / Mistral / GPT-2 without position_ids: cache_position.unsqueeze(0)
    return (torch.arange(q.shape[2]) + 0).unsqueeze(0)


# name -> (attention(q, k, v, pos_input) -> out, whether the mask is provably causal). pos_input is a graph input
# holding arange positions, used only by the cases that read it.
CASES = {
    "llama_eager": (lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(q, arange_positions(q))), True),
    "positions_offset": (lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(q, arange_positions(q) + 3)), True),
    "gpt2_positions_also_embedded": (  # GPT-2 also reads the positions for its position embedding
        lambda q, k, v, pos: (lambda p: eager_attention(q + p[..., None].float(), k, v, hf_mask(q, p)))(
            arange_positions(q)), True),
    "sdpa_bool_mask": (lambda q, k, v, pos: F.scaled_dot_product_attention(q, k, v, hf_mask(q, arange_positions(q))),
                       True),
    # must not be proven
    "position_ids_input": (lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(q, pos)), False),
    "packed_reset": (  # two sequences packed in each row: positions 0..3, 0..3
        lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(q, torch.arange(S).remainder(S // 2)[None])), False),
    "packed_by_cat": (
        lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(
            q, torch.cat([torch.arange(S // 2), torch.arange(S - S // 2)])[None])), False),
    "anti_causal": (lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(q, arange_positions(q), compare=operator.ge)),
                    False),
    "negative_index_wraps": (  # q/kv index -1 reads the last position: row 0 attends every key
        lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(q, arange_positions(q), -1, -1)), False),
    "prepend_not_first_minus_one": (  # the packed term is unproven: the mask is kept even though it is causal
        lambda q, k, v, pos: eager_attention(q, k, v, hf_mask(q, arange_positions(q), prepend_minus=2)), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hf_packed_sequence_masks(name):
    fn, causal = CASES[name]
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    pos = torch.arange(S)[None]
    ctx, (node,), before, after = rewrite(fn, q, k, v, pos)
    assert ctx.counters.get("attention.replaced") == 1 and not ctx.counters.get("attention.declined")
    if causal:
        assert node.args[4] is True and node.args[3] is None  # proven: is_causal, the mask is never read
    else:
        assert node.args[4] is False and node.args[3] is not None  # kept as a bias / bool mask
    torch.testing.assert_close(after[0] if isinstance(after, (tuple, list)) else after,
                               before[0] if isinstance(before, (tuple, list)) else before, rtol=1e-5, atol=2e-6)


def test_position_ids_input_with_a_reset_keeps_the_packing():
    """Positions given as an input, packed (0..3, 0..5): the block-diagonal mask is read and the outputs match."""
    fn, _ = CASES["position_ids_input"]
    q, k, v = (torch.randn(B, H, 10, D) for _ in range(3))
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]
    ctx, (node,), before, after = rewrite(fn, q, k, v, pos)
    assert node.args[4] is False and node.args[3] is not None
    first = after[0] if isinstance(after, (tuple, list)) else after
    torch.testing.assert_close(first, before[0] if isinstance(before, (tuple, list)) else before,
                               rtol=1e-5, atol=2e-6)
    # and the packing is real: the second sequence does not see the first (differs from a plain causal mask)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(first[:, :, 4:], causal[:, :, 4:], atol=1e-3)
