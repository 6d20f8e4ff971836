"""The attention pass: every attention it can prove equivalent becomes one `torch.ops.flashfx.attention` node.

Runs on the canonical torch-level graph (after `flashfx.rewriter.canonicalize`). Recognised forms (the FORMS table):

- explicit: `q @ kᵀ` → scale (a constant multiply before/after the matmul, or folded into q or k) → masks
  (additive float bias, `masked_fill(m, -inf)`, `where(c, s, -inf)`; causal masks built in the graph become
  `is_causal=True`) → softmax over the last dim (optionally upcast to float32 and cast back) → dropout (vanishes
  in eval or at p=0) → `@ v`. The score ops between the matmul and the softmax come from the SCORE_OPS table, the
  probability ops between the softmax and `@ v` from the PROB_OPS table: one pattern, variants from tables.
- sdpa: `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`.
- mha: `F.multi_head_attention_forward` as Dynamo records `nn.MultiheadAttention` / `nn.TransformerEncoderLayer`
  (packed or separate in-projections, cross-attention, key_padding_mask / attn_mask / is_causal, dropout; not
  bias_k/bias_v, add_zero_attn, or used attention weights): split into projections + the op + out-projection.

K/V repeated for grouped-query attention (`repeat_kv`: unsqueeze → expand → reshape / flatten, or
`repeat_interleave` on the head dim) are passed un-repeated: the op reads kv head h // (Hq // Hkv), never
materialising the repeat. Masks are made cheap to read: a causal mask built in the graph (arange comparisons,
tril/triu) becomes `is_causal=True`, and a bool AND-tree (HF's `causal & padding`, expanded to [B, 1, L, S]) becomes
is_causal plus its small terms ([B, 1, 1, S]); all-true terms are dropped.

Decisions (also in flashfx/passes/README.md):
- Rows whose every key is masked: the op outputs 0. Eager softmax gives NaN there with -inf masks (SDPA gives 0),
  so -inf masks are rewritten and the site gets a note. A *finite* fill (`masked_fill(m, -1e9)`) makes eager
  average V on such rows, so it is rewritten only when the mask is proven causal (no row is fully masked),
  otherwise declined. Fill values at or below -1e4 count as "masked" (their exp underflows to 0 next to any
  score within ~1e4 of the row max). A float additive bias is passed through unchanged; the op reads values
  below -1e38 (HF's fp32/bf16 finfo.min masks) as -inf, so a row masked that way everywhere (left padding) gives
  0 where eager averages V, as HF's own sdpa path does: rewritten, with a note.
- Dropout in training (p > 0) becomes the op's dropout_p: the same distribution, a different random stream.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from flashfx.rewriter import cost as cost_model
from flashfx.rewriter.capture import name_symbols
from flashfx.rewriter.matcher import (arg, depends_on, erase_dead, insert_node, is_call, is_dtype_cast, is_number,
                                      normalize_dim, same_shape, same_size, tensor)
from flashfx.rewriter.pass_manager import PassContext, PassResult

PASS = "attention"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
VERY_NEGATIVE = -1e4  # fill values at or below this mask a score exactly (exp underflows), see the module docstring

SDPA_FUNCTIONS = (F.scaled_dot_product_attention,)
MHA_FUNCTIONS = (F.multi_head_attention_forward,)
DROPOUT_FUNCTIONS = (F.dropout, torch.dropout)
MASKED_FILL = ((torch.masked_fill,), ("masked_fill",))
WHERE = ((torch.where,), ("where",))
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


# ------------------------------------------------------------------------------------------- small predicates

def _number(x: Any) -> Optional[float]:
    """A Python constant, or a 0-dim constant tensor made in the graph (`torch.tensor(c)`, `torch.full((), c)`)."""
    if is_number(x):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function" and not x.kwargs.get("requires_grad"):
        if x.target is torch.tensor and x.args and is_number(x.args[0]):
            return float(x.args[0])
        if x.target is torch.full and len(x.args) >= 2 and tuple(x.args[0]) == () and is_number(x.args[1]):
            return float(x.args[1])
    return None


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


def _last_two(t: torch.Tensor) -> Tuple[Any, Any]:
    return t.shape[-2], t.shape[-1]


def _broadcastable(mask: torch.Tensor, target: torch.Size) -> bool:
    if mask.dim() > len(target):
        return False
    return all(same_size(m, 1) or same_size(m, t) for m, t in zip(reversed(mask.shape), reversed(target)))


# --------------------------------------------------------------------------------------- causal-mask proofs
#
# A mask built inside the graph from aranges / tril / triu is proven causal by walking its producers. Each proof
# returns the mask's meaning in the last two dims: "attend" (True where key j <= query i) or "masked" (True where
# j > i); None when it cannot prove either.

def _index_vector(node: Any, depth: int = 0) -> Optional[Tuple[str, Any, float]]:
    """("row" | "col", length, offset) for `arange(n) + c` placed on dim -2 (row) or -1 (col) by None-indexing."""
    if not isinstance(node, fx.Node) or depth > 8:
        return None
    t = tensor(node)
    if t is None or t.dim() < 1:
        return None
    if is_call(node, (torch.arange,)):
        start, end = (0, node.args[0]) if len(node.args) == 1 else node.args[:2]
        if len(node.args) > 2 or node.kwargs.get("step", 1) != 1 or not is_number(start):
            return None
        return ("col", t.shape[0], float(start))
    if (is_call(node, (operator.add, torch.add), ("add",)) and len(node.args) == 2 and is_number(node.args[1])
            and not node.kwargs):
        inner = _index_vector(node.args[0], depth + 1)
        return None if inner is None else (inner[0], inner[1], inner[2] + node.args[1])
    if is_call(node, (operator.getitem,)) or is_call(node, (torch.unsqueeze,), ("unsqueeze", "view", "reshape")):
        inner = _index_vector(node.args[0], depth + 1)
        src = tensor(node.args[0])
        if inner is None or src is None or src.dim() != 1:
            return None
        if is_call(node, (operator.getitem,)) and not _only_new_dims(node.args[1]):
            return None  # a tensor index or a slice could reorder or drop positions
        sizes = list(t.shape)
        full = [i for i, d in enumerate(sizes) if not same_size(d, 1)]
        if len(full) > 1 or (full and not same_size(sizes[full[0]], inner[1])):
            return None
        pos = (full[0] if full else None)
        if pos == t.dim() - 1:
            return ("col", inner[1], inner[2])
        if pos == t.dim() - 2:
            return ("row", inner[1], inner[2])
        return None
    return None


_COMPARE = {operator.le: "le", torch.le: "le", operator.ge: "ge", torch.ge: "ge", operator.lt: "lt", torch.lt: "lt",
            operator.gt: "gt", torch.gt: "gt"}
_COMPARE_METHODS = {"le": "le", "ge": "ge", "lt": "lt", "gt": "gt", "__le__": "le", "__ge__": "ge"}
_FLIP = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt"}


def _causal_bool(node: Any, depth: int = 0) -> Optional[str]:
    """The meaning of a bool (or 0/1) mask node, "attend" or "masked", when provably causal."""
    if not isinstance(node, fx.Node) or depth > 12:
        return None
    t = tensor(node)
    if t is None or t.dim() < 2:
        return None
    op = None
    if node.op == "call_function" and node.target in _COMPARE:
        op = _COMPARE[node.target]
    elif node.op == "call_method" and node.target in _COMPARE_METHODS:
        op = _COMPARE_METHODS[node.target]
    if op is not None and len(node.args) == 2:
        a, b = _index_vector(node.args[0]), _index_vector(node.args[1])
        if a is None or b is None or a[2] != b[2] or {a[0], b[0]} != {"row", "col"}:
            return None
        if a[0] == "row":  # write it as col <op> row
            op = _FLIP[op]
        if not same_size(a[1], b[1]):
            return None
        return {"le": "attend", "gt": "masked"}.get(op)
    if is_call(node, (torch.logical_not, operator.invert), ("logical_not", "__invert__", "bitwise_not")):
        inner = _causal_bool(node.args[0], depth + 1)
        return None if inner is None else ("masked" if inner == "attend" else "attend")
    if is_call(node, (operator.eq, torch.eq), ("eq",)) and len(node.args) == 2 and node.args[1] == 0:
        inner = _causal_bool(node.args[0], depth + 1)
        return None if inner is None else ("masked" if inner == "attend" else "attend")
    if is_call(node, (torch.tril, torch.triu), ("tril", "triu")):
        diagonal = arg(node, 1, "diagonal", 0)
        if not _all_ones(node.args[0]) or not same_size(t.shape[-1], t.shape[-2]):
            return None
        lower = node.target in (torch.tril, "tril")
        if lower and diagonal == 0:
            return "attend"
        if not lower and diagonal == 1:
            return "masked"
        return None
    # value-preserving ops on the mask: casts to bool/0-1 floats, leading broadcast dims, expand
    if is_call(node, (torch.Tensor.bool,), ("bool", "to", "float", "expand", "view", "reshape", "unsqueeze",
                                              "contiguous")) or is_call(node, (operator.getitem, torch.unsqueeze)):
        src = tensor(node.args[0])
        if src is None or src.dim() < 2 or not same_shape(_last_two(src), _last_two(t)):
            return None
        if is_call(node, (operator.getitem,)) and not _leading_none_index(node.args[1], src.dim()):
            return None
        return _causal_bool(node.args[0], depth + 1)
    return None


def _only_new_dims(index: Any) -> bool:
    """An index that only inserts dims (None) and keeps every element (`:` and `...`)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in items)


def _leading_none_index(index: Any, ndim: int) -> bool:
    """`x[None, None]`, `x[None, :, :]`, `x[(None, None, Ellipsis)]`: only new leading dims, nothing sliced."""
    items = index if isinstance(index, tuple) else (index,)
    rest = [i for i in items if i is not None]
    head = items[: len(items) - len(rest)]
    return all(i is None for i in head) and all(i is Ellipsis or i == slice(None) for i in rest)


def _all_ones(node: Any) -> bool:
    if is_call(node, (torch.ones, torch.ones_like), ("new_ones",)):
        return True
    if is_call(node, (torch.full,), ("new_full",)) and len(node.args) >= 2:
        return node.args[1] in (1, True)
    return False


def _causal_float(node: Any) -> bool:
    """An additive float mask that is 0 where j <= i and -inf (or very negative) where j > i."""
    if is_call(node, *WHERE) and len(node.args) == 3:
        cond, a, b = node.args
        kind = _causal_bool(cond)
        zero, neg = (a, b) if kind == "attend" else (b, a)
        return kind is not None and _number(zero) == 0.0 and (_number(neg) or 0.0) <= VERY_NEGATIVE
    if is_call(node, *MASKED_FILL) and len(node.args) == 3:
        base, cond, fill = node.args
        return (_causal_bool(cond) == "masked" and _is_zeros(base) and (_number(fill) or 0.0) <= VERY_NEGATIVE)
    if is_call(node, (torch.triu,), ("triu",)) and arg(node, 1, "diagonal", 0) == 1:
        src = node.args[0]
        return is_call(src, (torch.full,), ("new_full",)) and (_number(src.args[1]) or 0.0) <= VERY_NEGATIVE
    if is_call(node, (operator.getitem,), ("expand", "view", "unsqueeze", "to")) and isinstance(node.args[0], fx.Node):
        src, t = tensor(node.args[0]), tensor(node)
        if src is None or t is None or src.dim() < 2 or not same_shape(_last_two(src), _last_two(t)):
            return False
        if is_call(node, (operator.getitem,)) and not _leading_none_index(node.args[1], src.dim()):
            return False
        return _causal_float(node.args[0])
    return False


def _is_zeros(node: Any) -> bool:
    if is_call(node, (torch.zeros, torch.zeros_like), ("new_zeros",)):
        return True
    return is_call(node, (torch.full,), ("new_full",)) and len(node.args) >= 2 and _number(node.args[1]) == 0.0


_AND = ((operator.and_, torch.logical_and, torch.bitwise_and), ("logical_and", "bitwise_and", "__and__"))


def _and_terms(node: Any, depth: int = 0) -> List[Any]:
    """The leaves of a bool AND tree (`a & b & c`, through broadcasts and same-device `.to`), or [node]."""
    if depth < 8 and isinstance(node, fx.Node) and tensor(node) is not None and tensor(node).dtype == torch.bool:
        if is_call(node, *_AND) and len(node.args) == 2:
            return [t for a in node.args for t in _and_terms(a, depth + 1)]
        if is_call(node, methods=("expand", "to")) and tensor(node.args[0]) is not None and \
                tensor(node.args[0]).dtype == torch.bool:
            return _and_terms(node.args[0], depth + 1)  # broadcasting the AND = AND of the broadcasts
    return [node]


def _all_true(node: Any) -> bool:
    """`new_ones(..., dtype=bool)`, `ones(...)`, or `arange(...) + c >= 0` with c >= 0 (HF's q_indices >= 0)."""
    t = tensor(node)
    if t is None or t.dtype != torch.bool:
        return False
    if is_call(node, (torch.ones,), ("new_ones",)):
        return True
    if is_call(node, (operator.ge, torch.ge), ("ge",)) and len(node.args) == 2 and node.args[1] == 0:
        vec = _index_vector(node.args[0])
        return vec is not None and vec[2] >= 0
    if is_call(node, methods=("to",)):
        return _all_true(node.args[0])
    return False


def _simplify_attend(mask: Any, L: Any, S: Any, causal_ok: bool) -> Optional[Tuple[bool, List[Any]]]:
    """A bool attend-mask as (is_causal, smaller terms to AND): all-true terms dropped, broadcasts not
    materialised, and a proven-causal term (when `causal_ok`, i.e. L == S) turned into is_causal. None when
    nothing gets simpler. The op computes is_causal AND every term: the same bool semantics."""
    terms = _and_terms(mask)
    if terms == [mask]:
        return None
    causal = None
    if causal_ok:
        causal = next((t for t in terms
                       if _causal_bool(t) == "attend" and same_shape(_last_two(tensor(t)), (L, S))), None)
    return causal is not None, [t for t in terms if t is not causal and not _all_true(t)]


def _is_causal_mask(kind: str, node: Any) -> bool:
    if kind == "float":
        return _causal_float(node)
    meaning = _causal_bool(node)
    return meaning is not None and meaning == kind


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


def _emit_mha(graph: fx.Graph, node: fx.Node, a: Dict[str, Any], op: Any) -> Tuple[fx.Node, Site]:
    """query [L, N, E] → packed projections → [N, H, L, hd] → op → [L, N, E] → out projection.

    Masks follow multi_head_attention_forward: bool masks are True where attention is *not* allowed, float masks
    are added; key_padding_mask is [N, S], attn_mask [L, S] or [N * H, L, S]. With is_causal, no key padding mask
    and need_weights=False it runs SDPA with is_causal=True and ignores attn_mask's contents: so does the rewrite.
    """
    qt = tensor(a["query"])
    E = qt.shape[-1]
    H = int(a["num_heads"])
    if not isinstance(E, int) or E % H:
        raise Decline(node, f"embed dim {E} is not a static multiple of num_heads {H}")
    if qt.dtype not in SUPPORTED_DTYPES:
        raise Decline(node, f"query dtype {qt.dtype} is not float16/bfloat16/float32")
    hd = E // H
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0

    def call(target: Any, *args: Any, method: bool = False, **kwargs: Any) -> fx.Node:
        return insert_node(graph, "call_method" if method else "call_function", target, args, kwargs, meta_from=node)

    with graph.inserting_before(node):
        if a["use_separate_proj_weight"]:  # nn.MultiheadAttention(kdim=..., vdim=...)
            ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
        else:
            w_chunks = call(torch.chunk, a["in_proj_weight"], 3)
            ws = [call(operator.getitem, w_chunks, i) for i in range(3)]
        b_chunks = call(torch.chunk, a["in_proj_bias"], 3) if a["in_proj_bias"] is not None else None
        heads = []
        for i, x in enumerate((a["query"], a["key"], a["value"])):
            w = ws[i]
            b = call(operator.getitem, b_chunks, i) if b_chunks is not None else None
            proj = call(torch._C._nn.linear, x, w, b)  # [T, N, E]
            split = call(torch.unflatten, proj, -1, (H, hd))  # [T, N, H, hd]; no symbolic sizes in the graph
            heads.append(call(torch.permute, split, (1, 2, 0, 3)))  # [N, H, T, hd]
        q, k, v = heads
        site = Site("mha", node, q, k, v, scale=None, dropout_p=dropout_p, nodes=[node])
        kpm, mask = a["key_padding_mask"], a["attn_mask"]
        if a["is_causal"] and kpm is None and not a["need_weights"]:
            site.is_causal, mask = True, None
        if kpm is not None:  # [N, S] -> [N, 1, 1, S], a view
            view = call(operator.getitem, kpm, (slice(None), None, None, slice(None)))
            site.masks.append(("masked" if tensor(kpm).dtype == torch.bool else "float", view))
        if mask is not None:
            if tensor(mask).dim() == 3:  # [N * H, L, S] -> [N, H, L, S]
                mask = call(torch.unflatten, mask, 0, (-1, H))
            site.masks.append(("masked" if tensor(mask).dtype == torch.bool else "float", mask))
        _check_and_prepare(site)
        out = _emit(graph, site, op)  # [N, H, L, hd]
        merged = call(torch.flatten, call(torch.permute, out, (2, 0, 1, 3)), 2)  # [L, N, E]
        result = call(torch._C._nn.linear, merged, a["out_proj_weight"], a["out_proj_bias"])
    if dropout_p:
        site.notes.append(f"nn.MultiheadAttention dropout p={dropout_p} kept (the op draws its own random stream)")
    return result, site


# ------------------------------------------------------------------------------------------- K/V un-repeat

def _unrepeat(node: Any) -> Optional[Tuple[fx.Node, int, List[fx.Node]]]:
    """(kv, n_rep, nodes) when `node` is kv [B, Hkv, S, D] repeated n_rep times per head on dim 1 (repeat_kv order)."""
    t = tensor(node)
    if t is None or t.dim() != 4:
        return None
    if is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        src, reps, dim = arg(node, 0, "input"), arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(reps, int) and normalize_dim(dim, 4) == 1 and tensor(src) is not None and tensor(src).dim() == 4:
            return src, reps, [node]
        return None
    if is_call(node, (torch.flatten,), ("flatten",)):
        dims = (arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1))
        if tuple(normalize_dim(d, 5) for d in dims) != (1, 2):
            return None
    elif not is_call(node, (torch.reshape,), ("reshape", "view")):
        return None
    expanded = node.args[0]
    if not is_call(expanded, (), ("expand",)) or tensor(expanded) is None or tensor(expanded).dim() != 5:
        return None
    unsq = expanded.args[0]
    u = tensor(unsq)
    if u is None or u.dim() != 5 or not same_size(u.shape[2], 1):
        return None
    if is_call(unsq, (operator.getitem,)):  # x[:, :, None], x[:, :, None, :, :], x[:, :, None, ...]
        index = unsq.args[1]
        ok = (isinstance(index, tuple) and len(index) >= 3 and index[:3] == (slice(None), slice(None), None)
              and _only_new_dims(index[3:]) and None not in index[3:])
    else:
        ok = is_call(unsq, (torch.unsqueeze,), ("unsqueeze",)) and normalize_dim(unsq.args[1], 5) == 2
    src = unsq.args[0]
    s, e = tensor(src), tensor(expanded)
    if not ok or s is None or s.dim() != 4:
        return None
    n_rep = e.shape[2]
    if not isinstance(n_rep, int):
        return None
    kept = [e.shape[i] for i in (0, 1, 3, 4)]
    merged = [s.shape[0], s.shape[1] * n_rep, s.shape[2], s.shape[3]]
    if not same_shape(kept, s.shape) or not same_shape(t.shape, merged):  # exactly dims 1 and 2 merged
        return None
    return src, n_rep, [node, expanded, unsq]


# ----------------------------------------------------------------------------------------------- emitting

def _attention_op() -> Any:
    import flashfx.ops  # noqa: F401  (registers torch.ops.flashfx.*)

    ns = torch.ops.flashfx
    return ns.attention.default if hasattr(ns, "attention") else None


def _check_and_prepare(site: Site) -> None:
    """Shapes, dtypes, GQA and masks of a matched site (proven-causal masks become is_causal), else Decline."""
    qt, vt = tensor(site.q), tensor(site.v)
    kt = tensor(site.k[1] if isinstance(site.k, tuple) else site.k)
    if qt is None or kt is None or vt is None:
        raise Decline(site.out, "q, k or v has no shape metadata")
    if isinstance(site.k, tuple):  # k = kᵀ with its last two dims swapped
        dims = site.k[2]
        if len(dims) != kt.dim():
            raise Decline(site.out, "kᵀ is not a permutation of k")
        k_t_shape = [kt.shape[d] for d in dims]
        k_shape = (*k_t_shape[:-2], k_t_shape[-1], k_t_shape[-2])
    else:
        k_shape = tuple(kt.shape)
    if qt.dtype not in SUPPORTED_DTYPES or not (qt.dtype == kt.dtype == vt.dtype):
        raise Decline(site.out, f"q/k/v dtypes {qt.dtype}/{kt.dtype}/{vt.dtype}: the op needs one of "
                                f"float16/bfloat16/float32 for all three")
    out = tensor(site.out) if site.form != "mha" else None
    if out is not None and out.dtype != qt.dtype:
        raise Decline(site.out, f"the attention output is {out.dtype} but q is {qt.dtype}")
    if not (qt.dim() == len(k_shape) == vt.dim()) or qt.dim() not in (2, 3, 4):
        raise Decline(site.out, f"q/k/v of ranks {qt.dim()}/{len(k_shape)}/{vt.dim()}: the op takes "
                                "[B, H, L, D] (or [B, L, D], [L, D])")
    if not same_size(qt.shape[-1], k_shape[-1]) or not same_size(vt.shape[-1], qt.shape[-1]):
        raise Decline(site.out, "q, k and v head dims differ")
    if not same_size(k_shape[-2], vt.shape[-2]):
        raise Decline(site.out, "k and v sequence lengths differ")
    if qt.dim() > 2 and (not same_size(qt.shape[0], k_shape[0]) or not same_size(qt.shape[0], vt.shape[0])):
        raise Decline(site.out, "q and k/v batch sizes differ (broadcast batch dims are not supported)")
    if qt.dim() == 4:
        hq, hk, hv = qt.shape[1], k_shape[1], vt.shape[1]
        if not same_size(hk, hv) or not isinstance(hq, int) or not isinstance(hk, int) or hk == 0 or hq % hk:
            raise Decline(site.out, f"head counts q={hq} k={hk} v={hv} are not grouped-query compatible")
    L, S = qt.shape[-2], k_shape[-2]
    target = torch.Size([*qt.shape[:-2], L, S])
    site.masks = [_undo_negation(kind, mask) for kind, mask in site.masks]
    for kind, mask in site.masks:
        m = tensor(mask)
        if m is None or not _broadcastable(m, target):
            raise Decline(site.out, f"mask {getattr(mask, 'name', mask)} of shape "
                                    f"{tuple(m.shape) if m is not None else '?'} does not broadcast to the scores")
    # causal masks built in the graph become is_causal (saves reading the mask, and the kernel skips tiles)
    if same_size(L, S):
        kept = []
        for kind, mask in site.masks:
            full = tensor(mask) is not None and same_shape(_last_two(tensor(mask)), (L, S))
            if not site.is_causal and full and _is_causal_mask(kind.replace("_finite", ""), mask):
                site.is_causal = True
                site.notes.append(f"mask {mask.name} proven causal: is_causal=True, the mask is not read")
            else:
                kept.append((kind, mask))
        site.masks = kept
    # bool AND-trees (HF: causal & padding, expanded to [B, 1, L, S]): read only the small terms
    kept = []
    for kind, mask in site.masks:
        simpler = _simplify_attend(mask, L, S, same_size(L, S) and not site.is_causal) if kind == "attend" else None
        if simpler is None or not all(tensor(t) is not None and _broadcastable(tensor(t), target)
                                      for t in simpler[1]):
            kept.append((kind, mask))
            continue
        causal, terms = simpler
        site.is_causal = site.is_causal or causal
        kept += [("attend", t) for t in terms]
        site.notes.append(f"mask {mask.name} = {'causal & ' if causal else ''}{len(terms)} smaller term(s): the kernel "
                          f"reads {', '.join(t.name for t in terms) or 'no mask'}")
    site.masks = kept
    for kind, mask in site.masks:
        if kind.endswith("_finite"):
            raise Decline(site.out, f"mask {mask.name} fills with a finite value: rows with every key masked would "
                                    "average V in eager but give 0 in the fused op, and no row is proven unmasked")
        if kind in ("masked", "attend") and site.form == "explicit":
            site.notes.append(f"mask {mask.name}: rows with every key masked give 0 (eager gives NaN with -inf)")
        if kind == "float" and site.form == "explicit":
            site.notes.append(f"bias {mask.name}: a row whose every bias value is below -1e38 (finfo.min masks) "
                              "gives 0, where eager averages V (HF's sdpa path gives 0 too)")


def _undo_negation(kind: str, mask: Any) -> Tuple[str, Any]:
    """("masked", ~m) is ("attend", m): the op wants True = attend, and m may simplify further."""
    negated = is_call(mask, (torch.logical_not, operator.invert), ("logical_not", "__invert__"))
    if kind.startswith("masked") and negated and tensor(mask.args[0]) is not None \
            and tensor(mask.args[0]).dtype == torch.bool:
        return kind.replace("masked", "attend"), mask.args[0]
    return kind, mask


def _emit(graph: fx.Graph, site: Site, op: Any) -> fx.Node:
    def call(target: Any, *args: Any, method: bool = False, **kwargs: Any) -> fx.Node:
        return insert_node(graph, "call_method" if method else "call_function", target, args, kwargs,
                           meta_from=site.out)

    with graph.inserting_before(site.out):
        q, v = site.q, site.v
        if isinstance(site.k, tuple):  # k = permute(src, dims ∘ swap): one view, none at all when it is identity
            _, src, dims = site.k
            n = len(dims)
            swap = (*range(n - 2), n - 1, n - 2)
            k_dims = tuple(dims[d] for d in swap)
            k = src if k_dims == tuple(range(n)) else call(torch.permute, src, k_dims)
        else:
            k = site.k
        ku, vu = _unrepeat(k), _unrepeat(v)
        if ku is not None and vu is not None and ku[1] == vu[1] and same_shape(tensor(ku[0]).shape,
                                                                                 tensor(vu[0]).shape):
            k, v = ku[0], vu[0]
            site.nodes += ku[2] + vu[2]
            site.notes.append(f"grouped-query attention: K/V repeated {ku[1]}x are read un-repeated")
        bias = _combine_masks(site, call)
        rank = tensor(q).dim()
        if rank == 3:  # [B, L, D] -> [B, 1, L, D], views
            q, k, v = (call(torch.unsqueeze, x, 1) for x in (q, k, v))
            if bias is not None and tensor(bias).dim() == 3:
                bias = call(torch.unsqueeze, bias, 1)
        elif rank == 2:  # [L, D] -> [1, 1, L, D]; a bias of rank <= 2 broadcasts as it is
            q, k, v = (call(torch.unsqueeze, call(torch.unsqueeze, x, 0), 0) for x in (q, k, v))
        out = call(op, q, k, v, bias, site.is_causal, site.scale, site.dropout_p)
        if rank < 4:
            out = call(torch.squeeze, out, 1) if rank == 3 else call(torch.squeeze, out, (0, 1))
    return out


def _combine_masks(site: Site, call: Callable[..., fx.Node]) -> Optional[fx.Node]:
    """One op bias from the site's masks: a float additive bias, or a bool attend-mask."""
    if site.masks and all(kind == "attend" for kind, _ in site.masks):  # several bool masks: one AND
        total = site.masks[0][1]
        for _, mask in site.masks[1:]:
            total = call(torch.logical_and, total, mask)
        return total
    terms = []
    for kind, mask in site.masks:
        kind = kind.replace("_finite", "")
        if kind == "masked":  # the op wants True = attend (a `~m` was already undone when preparing)
            mask = call(torch.logical_not, mask)
            kind = "attend"
        terms.append((kind, mask))
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0][1]
    # several masks: sum them as float biases (this materialises their broadcast; noted)
    total = None
    for kind, mask in terms:
        if kind == "attend":
            mask = call(torch.where, mask, 0.0, float("-inf"))
        total = mask if total is None else call(operator.add, total, mask)
    site.notes.append(f"{len(terms)} masks summed into one float bias (materialised at their broadcast shape)")
    return total


# ----------------------------------------------------------------------------------------------- the pass

# form -> (the functions its anchor node calls, matcher(anchor) -> Site | MHA arguments | None, or raises Decline)
FORMS: Dict[str, Tuple[Tuple[Any, ...], Callable[[fx.Node], Any]]] = {
    "explicit": ((torch.softmax,), _match_explicit),
    "sdpa": (SDPA_FUNCTIONS, _match_sdpa),
    "mha": (MHA_FUNCTIONS, _match_mha),
}


def attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace every provable attention in `gm` by `torch.ops.flashfx.attention` (counts `attention.replaced`)."""
    if getattr(ctx.config, "attention", "exact") == "off":
        return PassResult(gm, False)
    graph = gm.graph
    op = None
    changed = False
    totals = [sympy.Integer(0), sympy.Integer(0)]  # HBM bytes of the replaced sites before / after
    sites = 0
    for node in list(graph.nodes):
        if getattr(node, "_erased", False) or node.op not in ("call_function", "call_method"):
            continue
        form = next((name for name, (anchor, _) in FORMS.items() if is_call(node, anchor)), None)
        if form is None:
            continue
        try:
            site = FORMS[form][1](node)
            if site is None:
                continue
            op = op or _attention_op()
            if op is None:
                raise Decline(node, "torch.ops.flashfx.attention is not registered (flashfx.ops failed to import)")
            before = _bytes(gm, site.nodes if isinstance(site, Site) else [node])
            if isinstance(site, Site):
                _check_and_prepare(site)
            existing = set(graph.nodes)
            try:
                if isinstance(site, dict):  # nn.MultiheadAttention: rebuilt from its arguments
                    new, site = _emit_mha(graph, node, site, op)
                else:
                    new = _emit(graph, site, op)
            except Exception:
                _erase_new(graph, existing)  # leave the graph exactly as it was
                raise
            if site.form == "mha":
                for user in list(node.users):
                    if user.args[1] == 0:
                        user.replace_all_uses_with(new)
                    graph.erase_node(user)
            else:
                site.out.replace_all_uses_with(new)
        except Decline as d:
            ctx.decline(PASS, d.node if isinstance(d.node, fx.Node) else node, d.reason)
            continue
        except Exception as e:  # a graph the matcher does not understand: never crash the compile
            ctx.decline(PASS, node, f"could not rewrite ({type(e).__name__}: {e})")
            continue
        erase_dead(graph, [site.out, *site.nodes])
        changed = True
        ctx.count(f"{PASS}.replaced")
        ctx.count(f"{PASS}.{site.form}")
        after = _bytes(gm, [new])
        totals[0] += before
        totals[1] += after
        sites += 1
        names = name_symbols(gm)
        ctx.notes.append(f"{new.name} ({site.form}{', causal' if site.is_causal else ''}): HBM bytes "
                         f"{before.subs(names)} -> {after.subs(names)}" + "".join(f"; {n}" for n in site.notes))
    if changed:
        names = name_symbols(gm)
        ctx.notes.insert(0, f"attention: {sites} site(s), HBM bytes "
                            f"{sympy.simplify(totals[0]).subs(names)} -> {sympy.simplify(totals[1]).subs(names)} "
                            "(each node of the matched chains run as its own kernel, vs the fused op)")
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def _erase_new(graph: fx.Graph, existing: set) -> None:
    for n in reversed(list(graph.nodes)):
        if n not in existing and not n.users:
            graph.erase_node(n)


def _bytes(gm: fx.GraphModule, nodes: List[fx.Node]) -> Any:
    """HBM bytes of running `nodes` each as its own kernel (the cost model), a sympy expression."""
    total = sympy.Integer(0)
    for n in nodes:
        if n.graph is gm.graph:
            total += cost_model.node_cost(n, gm).hbm_bytes
    return sympy.simplify(total)
