"""Proofs about the masks an attention reads: which masks built in the graph are causal, and which bool masks split.

Used by the attention pass (`flashfx/passes/attention.py`) when it prepares a matched site. A mask built inside the
graph from arange comparisons (as Hugging Face builds them), `tril(ones)`, `triu(full(-inf), 1)` or
`where(causal, 0, finfo.min)` is proven causal by walking its producers, so the site can use `is_causal=True` and
never read the mask; a bool AND-tree (HF's `causal & padding`, expanded to [B, 1, L, S]) is split into its causal
part and its small terms, dropping all-true ones. Every proof only reads the graph; one that cannot prove its claim
answers None / False and the mask is passed to the op as it is. Also holds the few constants and predicates the
proofs share with the form readers (`attention_forms.py`): the mask op spellings, VERY_NEGATIVE and `_number`.
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx

from flashfx.rewriter.matcher import arg, is_call, is_number, same_shape, same_size, tensor

VERY_NEGATIVE = -1e4  # fill values at or below this mask a score exactly (exp underflows), see attention.py's docstring

MASKED_FILL = ((torch.masked_fill,), ("masked_fill",))
WHERE = ((torch.where,), ("where",))


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


def _last_two(t: torch.Tensor) -> Tuple[Any, Any]:
    return t.shape[-2], t.shape[-1]


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
