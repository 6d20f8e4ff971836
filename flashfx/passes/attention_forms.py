"""The form readers of the attention pass: each turns the anchor node of one attention form into a match.

The FORMS table in `flashfx/passes/attention.py` names each form's anchor and its reader here: `_match_explicit`
walks `q @ kᵀ` → scale → masks → softmax → dropout → `@ v` (the ops between come from the SCORE_OPS and PROB_OPS
tables), `_match_sdpa` reads `F.scaled_dot_product_attention`'s arguments, and `_match_mha` binds and checks those
of `F.multi_head_attention_forward`. A reader returns a `Site` (or, for MHA, the bound arguments), None when the
node is not attention at all, or raises `Decline` for a near miss. Readers only read the graph; shape/dtype checks,
mask proofs (`attention_masks.py`) and emitting are done by the pass once a reader has matched.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from flashfx.passes.attention_masks import MASKED_FILL, VERY_NEGATIVE, WHERE, _number
from flashfx.rewriter.matcher import (arg, depends_on, is_call, is_dtype_cast, is_number, normalize_dim, same_size,
                                      tensor)

SDPA_FUNCTIONS = (F.scaled_dot_product_attention,)
MHA_FUNCTIONS = (F.multi_head_attention_forward,)
DROPOUT_FUNCTIONS = (F.dropout, torch.dropout)
ADD = ((operator.add, torch.add), ("add", "__add__"))
SCALE = ((operator.mul, torch.mul), ("mul",))
DIV = ((operator.truediv, torch.div), ("div",))


class Decline(Exception):
    """A near miss: raised inside matching, turned into `ctx.decline(...)` at the site's node."""

    def __init__(self, node: Any, reason: str) -> None:
        super().__init__(reason)
        self.node, self.reason = node, reason


@dataclass
class Site:
    """One attention the pass will replace."""

    form: str
    out: fx.Node  # the node whose value the op replaces
    q: fx.Node
    k: Any  # a node, or ("permuted", src, dims): kᵀ = permute(src, dims); emitting makes k as a view of src
    v: fx.Node
    masks: List[Tuple[str, Any]] = field(default_factory=list)  # (kind, node): "float" | "attend" | "masked"
    is_causal: bool = False
    scale: Optional[float] = None
    dropout_p: float = 0.0
    nodes: List[fx.Node] = field(default_factory=list)  # matched nodes, erased once dead
    notes: List[str] = field(default_factory=list)
    cache_copies_skipped: int = 0  # K/V concatenated onto an empty cache, read directly


# ------------------------------------------------------------------------------------------- small predicates

def _is_matmul(node: Any) -> bool:
    return is_call(node, (torch.matmul, operator.matmul), ("matmul",)) and len(node.args) == 2


def _scalar_factor(node: fx.Node) -> Optional[Tuple[fx.Node, float]]:
    """(x, c) for `x * c` / `x / c` with c a number (canonical form is `operator.mul(x, c)`)."""
    if is_call(node, *SCALE) and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and is_number(b):
            return a, float(b)
        if isinstance(b, fx.Node) and is_number(a):
            return b, float(a)
    if is_call(node, *DIV) and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and is_number(node.args[1]):
        if node.args[1] != 0 and not node.kwargs:
            return node.args[0], 1.0 / float(node.args[1])
    return None


def _dropout(node: fx.Node) -> Optional[Tuple[fx.Node, float, bool, bool]]:
    """(input, p, training, inplace) of `F.dropout` / `torch.dropout`."""
    if not is_call(node, DROPOUT_FUNCTIONS):
        return None
    x = arg(node, 0, "input")
    if node.target is torch.dropout:
        return x, arg(node, 1, "p"), arg(node, 2, "train"), False
    return x, arg(node, 1, "p", 0.5), arg(node, 2, "training", True), arg(node, 3, "inplace", False)


# ------------------------------------------------------------------------------------- the explicit pattern

# Ops between the softmax and `@ v`: name -> (recognise(node, prev) -> input or None).
def _prob_cast(node: fx.Node, prev: fx.Node) -> bool:
    return is_dtype_cast(node) and node.args[0] is prev


def _prob_dropout(node: fx.Node, prev: fx.Node) -> bool:
    found = _dropout(node)
    return found is not None and found[0] is prev


def _is_copy(node: Any) -> bool:
    """`x.contiguous()` / `x.clone()`: the same values (only the layout may change)."""
    return is_call(node, (torch.clone,), ("contiguous", "clone")) and len(node.args) == 1


def _prob_copy(node: fx.Node, prev: fx.Node) -> bool:
    return _is_copy(node) and node.args[0] is prev


PROB_OPS: Dict[str, Callable[[fx.Node, fx.Node], bool]] = {
    "cast": _prob_cast, "dropout": _prob_dropout, "copy": _prob_copy,
}


def _find_pv(softmax: fx.Node) -> Optional[List[fx.Node]]:
    """The chain softmax → (casts, dropout)* → matmul(·, v) as a list, if the softmax's value reaches one."""
    stack = [[softmax]]
    while stack:
        path = stack.pop()
        for user in path[-1].users:
            if _is_matmul(user) and user.args[0] is path[-1] and user.args[1] is not path[-1]:
                return path + [user]
            if len(path) < 6 and any(rec(user, path[-1]) for rec in PROB_OPS.values()):
                stack.append(path + [user])
    return None


# Ops between the scores matmul and the softmax, walked upwards from the softmax's input. Each returns the node
# to continue with (the scores operand) and records what it means in the site being built.
@dataclass
class _Walk:
    scale: float = 1.0
    masks: List[Tuple[str, Any, fx.Node, Optional[float]]] = field(default_factory=list)  # kind, mask, node, fill
    nodes: List[fx.Node] = field(default_factory=list)
    seen_scale_below_mask: bool = False


def _score_scale(node: fx.Node, walk: _Walk) -> Optional[fx.Node]:
    found = _scalar_factor(node)
    if found is None:
        return None
    walk.scale *= found[1]
    walk.seen_scale_below_mask = True
    return found[0]


def _score_cast(node: fx.Node, walk: _Walk) -> Optional[fx.Node]:
    return node.args[0] if is_dtype_cast(node) or _is_copy(node) else None


def _score_add(node: fx.Node, walk: _Walk) -> Optional[fx.Node]:
    if not (is_call(node, *ADD) and len(node.args) == 2) or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    scores, mask = (a, b) if _reaches_matmul(a) else (b, a)
    if not isinstance(mask, fx.Node):
        raise Decline(node, f"adds a constant ({mask!r}) to the scores")
    if not isinstance(scores, fx.Node) or tensor(mask) is None or not tensor(mask).dtype.is_floating_point:
        raise Decline(node, "the added mask is not a float tensor")
    _check_mask_order(node, walk)
    walk.masks.append(("float", mask, node, None))
    return scores


def _score_masked_fill(node: fx.Node, walk: _Walk) -> Optional[fx.Node]:
    if not (is_call(node, *MASKED_FILL) and len(node.args) == 3):
        return None
    scores, mask, fill = node.args
    _check_mask_order(node, walk)
    walk.masks.append(("masked", mask, node, _number(fill)))
    return scores


def _score_where(node: fx.Node, walk: _Walk) -> Optional[fx.Node]:
    if not (is_call(node, *WHERE) and len(node.args) == 3):
        return None
    cond, a, b = node.args
    if _reaches_matmul(a) and _number(b) is not None:
        walk.masks.append(("attend", cond, node, _number(b)))
        scores = a
    elif _reaches_matmul(b) and _number(a) is not None:
        walk.masks.append(("masked", cond, node, _number(a)))
        scores = b
    else:
        raise Decline(node, "where() between the scores and the softmax does not fill with a constant")
    _check_mask_order(node, walk)
    return scores


def _check_mask_order(node: fx.Node, walk: _Walk) -> None:
    if walk.seen_scale_below_mask:
        raise Decline(node, "the mask is applied before the scale, so the op would not scale it; "
                            "move the scale before the mask")


SCORE_OPS: Dict[str, Callable[[fx.Node, _Walk], Optional[fx.Node]]] = {
    "scale": _score_scale, "cast": _score_cast, "bias": _score_add, "masked_fill": _score_masked_fill,
    "where": _score_where,
}


def _reaches_matmul(node: Any, depth: int = 0) -> bool:
    """Whether `node` is the scores (a matmul) seen through the score ops' first operands."""
    if not isinstance(node, fx.Node) or depth > 16:
        return False
    if _is_matmul(node):
        return True
    if _scalar_factor(node) is not None:
        return _reaches_matmul(_scalar_factor(node)[0], depth + 1)
    if is_dtype_cast(node) or _is_copy(node) or (is_call(node, *MASKED_FILL) and len(node.args) == 3):
        return _reaches_matmul(node.args[0], depth + 1)
    if is_call(node, *ADD) and len(node.args) == 2:
        return any(_reaches_matmul(a, depth + 1) for a in node.args)
    if is_call(node, *WHERE) and len(node.args) == 3:
        return any(_reaches_matmul(a, depth + 1) for a in node.args[1:])
    return False


def _reads_dtype_only(user: fx.Node, node: fx.Node, chain: List[fx.Node]) -> bool:
    """`p.type_as(s)` in the matched chain reads only s's dtype (and goes away with the chain)."""
    return user in chain and is_call(user, methods=("type_as",)) and user.args[0] is not node


def _check_single_use(node: fx.Node, successor: fx.Node, softmax: fx.Node, chain: List[fx.Node]) -> None:
    """Scores feed only the next score op; say which rule a second user breaks."""
    others = [u for u in node.users if u is not successor and not _reads_dtype_only(u, node, chain)]
    if not others:
        return
    if any(depends_on(softmax, u) for u in others):
        raise Decline(node, f"a mask computed from the scores ({', '.join(u.name for u in others)}) feeds the "
                            "softmax")
    raise Decline(node, f"the scores are also used by {', '.join(u.name for u in others)}; the fused op never "
                        "materialises them")


def _match_explicit(softmax: fx.Node) -> Optional[Site]:
    chain = _find_pv(softmax)
    if chain is None:
        return None  # a softmax that does not feed `@ v` is not attention (a classifier head, ...)
    pv = chain[-1]
    for node in chain[:-1]:
        if len(node.users) != 1:
            others = ", ".join(u.name for u in node.users if u not in chain)
            raise Decline(node, f"the attention probabilities are also used by {others or 'the graph output'}; "
                                "the fused op never materialises them")
    x = softmax.args[0]
    t = tensor(x)
    dim = normalize_dim(softmax.args[1], t.dim()) if t is not None else None
    if dim is None or dim != t.dim() - 1:
        raise Decline(softmax, f"softmax over dim {softmax.args[1]}, not the last (key) dim")
    site = Site("explicit", pv, q=None, k=None, v=pv.args[1], nodes=list(chain))  # type: ignore[arg-type]
    dropouts = [_dropout(n) for n in chain if _dropout(n) is not None]
    if len(dropouts) > 1:
        raise Decline(chain[0], "several dropouts on the attention probabilities")
    dropout = dropouts[0] if dropouts else None
    if dropout is not None:
        _, p, training, inplace = dropout
        if not is_number(p) or not isinstance(training, bool):
            raise Decline(chain[0], "dropout probability or training flag is not a constant")
        if training and p > 0:
            if inplace:
                raise Decline(chain[0], "in-place dropout on the probabilities in training")
            site.dropout_p = float(p)
            site.notes.append(f"dropout p={p} on the attention probabilities kept (the op draws its own random "
                              "stream, so results match the model only in distribution)")

    walk = _Walk()
    node, prev = x, softmax
    while not _is_matmul(node):
        if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
            raise Decline(softmax, f"the softmax input comes from {getattr(node, 'name', node)}, not from q @ kᵀ "
                                   "computed in this graph")
        _check_single_use(node, prev, softmax, chain)
        walk.nodes.append(node)
        nxt = None
        for handler in SCORE_OPS.values():
            nxt = handler(node, walk)
            if nxt is not None:
                break
        if nxt is None:
            raise Decline(node, f"unsupported op {node.format_node()} between the scores matmul and the softmax")
        node, prev = nxt, node
    scores = node
    _check_single_use(scores, prev, softmax, chain)
    site.nodes += walk.nodes + [scores]
    site.scale = walk.scale
    for kind, mask, at, fill in walk.masks:
        if depends_on(mask, scores):
            raise Decline(at, f"the mask {mask.name} is computed from the scores")
        if kind != "float":
            if tensor(mask) is None or tensor(mask).dtype != torch.bool:
                raise Decline(at, f"the mask {getattr(mask, 'name', mask)} is not a bool tensor")
            if fill is None or not (fill == -math.inf or fill <= VERY_NEGATIVE):
                raise Decline(at, f"fills masked scores with {fill!r}, not -inf or a very negative constant")
        site.masks.append((kind if kind == "float" else kind + ("" if fill == -math.inf else "_finite"), mask))

    q, k_t = scores.args
    if not isinstance(q, fx.Node) or not isinstance(k_t, fx.Node) or tensor(k_t) is None:
        raise Decline(scores, "q or kᵀ is not a tensor of the graph")
    # kᵀ = permute(k_src, dims): the op gets k = permute(k_src, dims ∘ swap-last-two), a view
    n = tensor(k_t).dim()
    k_src, dims = k_t, tuple(range(n))
    if is_call(k_t, (torch.permute,)) and len(k_t.users) == 1:
        k_src, dims = k_t.args[0], tuple(k_t.args[1])
        site.nodes.append(k_t)
    # a scale folded into q or k (`q * d ** -0.5`): use the unscaled tensor when nothing else needs the scaled one
    for side in ("q", "k"):
        operand = q if side == "q" else k_src
        folded = _scalar_factor(operand)
        if folded is not None and len(operand.users) == 1 and tensor(folded[0]) is not None:
            site.scale *= folded[1]
            site.nodes.append(operand)
            if side == "q":
                q = folded[0]
            else:
                k_src = folded[0]
    if depends_on(site.v, scores):
        raise Decline(pv, "v is computed from the scores")
    site.q, site.k = q, ("permuted", k_src, dims)
    return site


# ------------------------------------------------------------------------------------------- the sdpa form

def _match_sdpa(node: fx.Node) -> Optional[Site]:
    if not is_call(node, SDPA_FUNCTIONS):
        return None
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout_p, is_causal = arg(node, 4, "dropout_p", 0.0), arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    enable_gqa = arg(node, 7, "enable_gqa", False)
    for name, val in (("dropout_p", dropout_p), ("is_causal", is_causal), ("scale", scale), ("enable_gqa", enable_gqa)):
        if isinstance(val, fx.Node):
            raise Decline(node, f"{name} is computed in the graph, not a constant")
    if mask is not None and is_causal:
        raise Decline(node, "attn_mask together with is_causal=True (SDPA rejects it)")
    site = Site("sdpa", node, q, k, v, is_causal=bool(is_causal), scale=scale, nodes=[node])
    if mask is not None:
        m = tensor(mask)
        if m is None:
            raise Decline(node, "attn_mask is not a tensor")
        site.masks.append(("attend" if m.dtype == torch.bool else "float", mask))
    if dropout_p:
        site.dropout_p = float(dropout_p)
        site.notes.append(f"SDPA dropout_p={dropout_p} kept (the op draws its own random stream)")
    qt, kt = tensor(q), tensor(k)
    if qt is not None and kt is not None and qt.dim() == kt.dim() and qt.dim() >= 3:
        if not enable_gqa and not same_size(qt.shape[-3], kt.shape[-3]):
            raise Decline(node, "query and key head counts differ without enable_gqa")
    return site


# -------------------------------------------------------------------------------------- nn.MultiheadAttention

_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
             "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                 "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                 "is_causal": False}


def _match_mha(node: fx.Node) -> Optional[Dict[str, Any]]:
    """The bound arguments of an `F.multi_head_attention_forward` call the pass can prove, else Decline."""
    if not is_call(node, MHA_FUNCTIONS):
        return None
    a = dict(_MHA_DEFAULTS)
    a.update(zip(_MHA_ARGS, node.args))
    a.update(node.kwargs)
    for user in node.users:
        if not (is_call(user, (operator.getitem,)) and user.args[1] in (0, 1)):
            raise Decline(node, f"multi_head_attention_forward result used as a whole by {user.name}")
        if user.args[1] == 1 and user.users:
            raise Decline(node, "the attention weights (need_weights=True) are used; the fused op never makes them")
    unsupported = [name for name in ("bias_k", "bias_v", "static_k", "static_v") if a[name] is not None]
    unsupported += [name for name in ("add_zero_attn",) if a[name]]
    if unsupported:
        raise Decline(node, f"nn.MultiheadAttention with {', '.join(unsupported)} is not rewritten")
    for name in ("key_padding_mask", "attn_mask"):
        m = a[name]
        if m is not None and (tensor(m) is None or tensor(m).dim() not in ((2, 3) if name == "attn_mask" else (2,))):
            raise Decline(node, f"{name} is not a tensor of a supported rank")
        if m is not None and tensor(m).dtype != torch.bool and not tensor(m).dtype.is_floating_point:
            raise Decline(node, f"{name} of dtype {tensor(m).dtype} (bool or float expected)")
    if a["is_causal"] and a["attn_mask"] is None:
        raise Decline(node, "is_causal=True without attn_mask (multi_head_attention_forward rejects it)")
    q, k, v = a["query"], a["key"], a["value"]
    qt = tensor(q)
    if qt is None or qt.dim() != 3 or tensor(k) is None or tensor(v) is None or tensor(k).dim() != 3:
        raise Decline(node, "multi_head_attention_forward on unbatched or unknown inputs")
    if not all(isinstance(a[n], (int, float, bool)) for n in ("num_heads", "dropout_p", "training")):
        raise Decline(node, "num_heads, dropout_p or training is not a constant")
    weights = ("q_proj_weight", "k_proj_weight", "v_proj_weight") if a["use_separate_proj_weight"] else \
        ("in_proj_weight",)
    if not all(isinstance(a[w], fx.Node) for w in weights):
        raise Decline(node, f"projection weights {', '.join(weights)} are not graph values")
    return a
