"""Proofs about the masks an attention reads: which masks built in the graph are causal, and which bool masks split.

Used by the attention pass (`flashfx/passes/attention.py`) when it prepares a matched site. A mask built inside the
graph from arange comparisons (as Hugging Face builds them), `tril(ones)`, `triu(full(-inf), 1)` or
`where(causal, 0, finfo.min)` is proven causal by walking its producers, so the site can use `is_causal=True` and
never read the mask; a bool AND-tree (HF's `causal & padding`, expanded to [B, 1, L, S]) is split into its causal
part and its small terms, dropping all-true ones (among them HF 5.2x's packed-sequence term, all true when the
position ids are an arange built in the graph; its position-remapped comparison `pos[b, kv] <= pos[b, q]` is then
`kv <= q`). HF eager's float form of that AND-tree, `where(causal & padding, 0, finfo.min)`, is split the same way
when its fill reads as -inf in the op (`_split_float`). Every proof only reads the graph; one that cannot prove its
claim answers None / False and the mask is passed to the op as it is. Also holds the few constants and predicates the
proofs share with the form readers (`attention_forms.py`): the mask op spellings, VERY_NEGATIVE and `_number`.
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx

from flashfx.rewriter.matcher import arg, is_call, is_number, normalize_dim, same_shape, same_size, tensor

VERY_NEGATIVE = -1e4  # fill values at or below this mask a score exactly (exp underflows), see attention.py's docstring

MASKED_FILL = ((torch.masked_fill,), ("masked_fill",))
WHERE = ((torch.where,), ("where",))


# ------------------------------------------------------------------------------------------- small predicates

def _number(x: Any) -> Optional[float]:
    """A Python constant, or a 0-dim constant tensor made in the graph (`torch.tensor(c)`, `torch.full((), c)`,
    `torch.zeros(())` as HF 5.2x builds its mask's 0)."""
    if is_number(x):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function" and not x.kwargs.get("requires_grad"):
        if x.target is torch.tensor and x.args and is_number(x.args[0]):
            return float(x.args[0])
        if x.target is torch.full and len(x.args) >= 2 and tuple(x.args[0]) == () and is_number(x.args[1]):
            return float(x.args[1])
        if x.target in (torch.zeros, torch.ones) and len(x.args) == 1 and isinstance(x.args[0], (tuple, list)) \
                and tuple(x.args[0]) == ():
            return 0.0 if x.target is torch.zeros else 1.0
    return None


def _last_two(t: torch.Tensor) -> Tuple[Any, Any]:
    return t.shape[-2], t.shape[-1]


# --------------------------------------------------------------------------------------- causal-mask proofs
#
# A mask built inside the graph from aranges / tril / triu is proven causal by walking its producers. Each proof
# returns the mask's meaning in the last two dims: "attend" (True where key j <= query i) or "masked" (True where
# j > i); None when it cannot prove either.

def _index_vector(node: Any, depth: int = 0) -> Optional[Tuple[str, Any, float]]:
    """("row" | "col", length, offset) when every element of `node` is its index on dim -2 (row) or -1 (col) plus
    offset, whatever its other indices: `arange(n) + c` placed by None-indexing, broadcast by `expand`, or gathered
    as `positions[batch_idx, idx]` (HF's position-id remapping) from rows that are each such a vector."""
    if not isinstance(node, fx.Node) or depth > 8:
        return None
    t = tensor(node)
    if t is None or t.dim() < 1:
        return None
    if is_call(node, (torch.arange,)):
        start, end = (0, node.args[0]) if len(node.args) == 1 else node.args[:2]
        if len(node.args) > 2 or node.kwargs.get("step", 1) != 1 or not is_number(start):
            return None
        if t.dtype in (torch.float16, torch.bfloat16):  # consecutive positions stop being distinct past 256 / 2048
            return None
        return ("col", t.shape[0], float(start))
    if is_call(node, methods=("expand",)):  # broadcasts other dims; the indexed dim must keep its length
        inner = _index_vector(node.args[0], depth + 1)
        return inner if inner is not None and _keeps_axis(t, inner) else None
    if is_call(node, (operator.getitem,)) and isinstance(node.args[1], tuple) and len(node.args[1]) == 2 \
            and all(isinstance(i, fx.Node) for i in node.args[1]):
        return _gathered_index(node, depth)
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


def _keeps_axis(t: torch.Tensor, vec: Tuple[str, Any, float]) -> bool:
    """Whether `t` still has `vec`'s indexed dim (-1 for col, -2 for row) at its full length (not broadcast)."""
    axis = -1 if vec[0] == "col" else -2
    return t.dim() >= -axis and same_size(t.shape[axis], vec[1])


def _is_index_dtype(node: Any) -> bool:
    t = tensor(node)
    return t is not None and t.dtype in (torch.int64, torch.int32)  # not bool: a bool index selects, not gathers


def _gathered_index(node: fx.Node, depth: int) -> Optional[Tuple[str, Any, float]]:
    """`rows[b, idx]` where every row of the 2-D `rows` is `arange + c` and idx an index vector with offset >= 0.

    Every row being the same, the batch index b picks nothing (any valid b gives the same values; an invalid one
    raises in eager too), and rows[., i + c0] = i + c0 + c: an index vector along idx's dim. A negative offset is
    refused because negative indices wrap around instead of raising."""
    rows, (batch, idx) = node.args[0], node.args[1]
    row_vec, idx_vec = _index_vector(rows, depth + 1), _index_vector(idx, depth + 1)
    if row_vec is None or idx_vec is None or row_vec[0] != "col" or tensor(rows).dim() != 2:
        return None
    if not (_is_index_dtype(rows) and _is_index_dtype(batch) and _is_index_dtype(idx)) or idx_vec[2] < 0:
        return None
    if not _keeps_axis(tensor(node), idx_vec):
        return None
    return (idx_vec[0], idx_vec[1], idx_vec[2] + row_vec[2])


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
    if is_call(node, *_AND) and len(node.args) == 2:  # AND with provably all-true terms = its one other term
        rest = [term for term in _and_terms(node) if not _all_true(term)]
        if len(rest) != 1 or rest[0] is node or tensor(rest[0]) is None or tensor(rest[0]).dim() < 2 \
                or not same_shape(_last_two(tensor(rest[0])), _last_two(t)):
            return None  # (the last check: an all-true term must not broadcast the causal one's last two dims)
        return _causal_bool(rest[0], depth + 1)
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
    if _constant(node) == 1:  # e.g. HF's packed-sequence term when nothing is packed
        return True
    if is_call(node, methods=("to",)):
        return _all_true(node.args[0])
    return False


# ------------------------------------------------------------------------------------- one-value tensors
#
# Hugging Face (5.2x) ANDs its causal mask with a packed-sequence term `seq[b, q] == seq[b, kv]`, where
# seq = cumsum(diff(positions, prepend=positions[:, :1] - 1) != 1): the index of the packed sequence each token is in.
# When the positions are an arange in every row (built in the graph, not an input), every diff is 1, seq is 0
# everywhere and the term is all true. `_constant` proves such tensors, one rule per op.

def _first_column(index: Any, ndim: int) -> bool:
    """`x[:, :1]` / `x[..., :1]` on an `ndim`-dim x: every row's first element, nothing else."""
    items = index if isinstance(index, tuple) else (index,)
    if not items or not isinstance(items[-1], slice) or items[-1] not in (slice(None, 1), slice(0, 1)):
        return False
    head = items[:-1]
    return head == (Ellipsis,) or (len(head) == ndim - 1 and all(i == slice(None) for i in head))


def _diff_of_positions(node: fx.Node) -> Optional[int]:
    """1 for `diff(p, prepend=p[:, :1] - 1, dim=-1)` with p an integer arange along its last dim (in every row)."""
    p, n, dim = arg(node, 0, "input"), arg(node, 1, "n", 1), arg(node, 2, "dim", -1)
    prepend, append = arg(node, 3, "prepend"), arg(node, 4, "append")
    vec, pt = _index_vector(p), tensor(p)  # its own depth budget: _index_vector is bounded by itself
    if vec is None or vec[0] != "col" or not _is_index_dtype(p) or n != 1 or append is not None \
            or normalize_dim(dim, pt.dim()) != pt.dim() - 1:
        return None
    # prepend = one before each row's first position, so the first diff is 1 as well
    if not (is_call(prepend, (operator.sub, torch.sub), ("sub",)) and len(prepend.args) == 2
            and prepend.args[1] == 1 and not prepend.kwargs):
        return None
    first = prepend.args[0]
    if not (is_call(first, (operator.getitem,)) and first.args[0] is p and _first_column(first.args[1], pt.dim())):
        return None
    return 1


_EQ_NE = {operator.eq: operator.eq, torch.eq: operator.eq, "eq": operator.eq,
          operator.ne: operator.ne, torch.ne: operator.ne, "ne": operator.ne}


def _constant(node: Any, depth: int = 0) -> Optional[int]:
    """The one integer every element of an integer/bool tensor holds (True = 1), when provable; None otherwise."""
    if isinstance(node, (bool, int)):
        return int(node)
    t = tensor(node)
    if not isinstance(node, fx.Node) or depth > 8 or t is None or t.dtype.is_floating_point or t.is_complex():
        return None  # exact integer values only
    if is_call(node, (torch.diff,), ("diff",)):
        return _diff_of_positions(node)
    compare = _EQ_NE.get(node.target) if node.op in ("call_function", "call_method") else None
    if compare is not None and len(node.args) == 2 and not node.kwargs:
        a, b = (_constant(x, depth + 1) for x in node.args)
        return None if a is None or b is None else int(compare(a, b))
    if is_call(node, (torch.cumsum,), ("cumsum",)):  # a running sum of zeros
        return 0 if _constant(node.args[0], depth + 1) == 0 else None
    if is_call(node, (operator.getitem,), ("expand", "contiguous", "clone")):  # any selection of one value
        return _constant(node.args[0], depth + 1)
    if is_call(node, methods=("to",)) and tensor(node.args[0]) is not None and tensor(node.args[0]).dtype == t.dtype:
        return _constant(node.args[0], depth + 1)  # a device move
    return None


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


# ------------------------------------------------------------------------------- float masks split like bool ones
#
# HF eager with a padding mask builds `where(causal & padding, 0, finfo.min)`: the AND-tree the sdpa path passes as
# bool, turned into a float bias. The op reads bias values below OP_NEG_INF as -inf, so such a bias IS the bool
# attend-mask `causal & padding` to the op, exactly (fully masked rows give 0 either way); it is then split by
# `_simplify_attend`, as the bool one is. A finite fill (-1e4, -1e9, fp16's finfo.min) is not -inf to the op: on a
# fully padded row it averages V where the bool mask gives 0, so it is never split.

OP_NEG_INF = -1e38  # bias values strictly below this are -inf to the op (flashfx/codegen/attention.py)


def _reads_as_neg_inf(x: Any, dtype: torch.dtype) -> bool:
    """A constant that, stored in the bias dtype, is below the op's -inf threshold (rounding included)."""
    value = _number(x)
    return value is not None and torch.tensor(value, dtype=dtype).item() < OP_NEG_INF


def _negated_bool(node: Any) -> Optional[fx.Node]:
    """m for `~m` / `logical_not(m)` with m a bool tensor."""
    if is_call(node, (torch.logical_not, operator.invert), ("logical_not", "__invert__", "bitwise_not")) \
            and tensor(node.args[0]) is not None and tensor(node.args[0]).dtype == torch.bool:
        return node.args[0]
    return None


def _float_as_attend(node: Any) -> Optional[fx.Node]:
    """The bool attend-mask m when the float bias `node` is exactly 0 where m and reads as -inf in the op elsewhere:
    `where(m, 0, neg)`, `where(~m, neg, 0)`, `zeros.masked_fill(~m, neg)`. None otherwise."""
    t = tensor(node)
    if t is None or not t.dtype.is_floating_point:
        return None
    if is_call(node, *WHERE) and len(node.args) == 3 and not node.kwargs:
        cond, a, b = node.args
        if tensor(cond) is None or tensor(cond).dtype != torch.bool:
            return None
        if _number(a) == 0.0 and _reads_as_neg_inf(b, t.dtype):
            return cond
        if _number(b) == 0.0 and _reads_as_neg_inf(a, t.dtype):
            return _negated_bool(cond)
        return None
    if is_call(node, *MASKED_FILL) and len(node.args) == 3 and not node.kwargs:
        base, cond, fill = node.args
        bt = tensor(base)  # masked_fill never broadcasts its base: the bias is the zeros' shape
        if bt is not None and _is_zeros(base) and same_shape(tuple(bt.shape), tuple(t.shape)) \
                and _reads_as_neg_inf(fill, t.dtype):
            return _negated_bool(cond)
    return None


def _split_float(mask: Any, L: Any, S: Any, causal_ok: bool) -> Optional[List[Any]]:
    """The key-only padding terms ([B, 1, 1, S]-like bool attend-masks) of a float bias that is, to the op,
    `causal & padding`: the site becomes is_causal AND these terms. None unless the causal part is proven and every
    other term is broadcast over queries (a query-dependent term is not padding; the bias is kept then)."""
    attend = _float_as_attend(mask)
    if attend is None or not causal_ok:
        return None
    simpler = _simplify_attend(attend, L, S, causal_ok)
    if simpler is None or not simpler[0]:
        return None
    terms = simpler[1]
    for term in terms:
        tt = tensor(term)
        if tt is None or tt.dtype != torch.bool or tt.dim() < 2 or not same_size(tt.shape[-2], 1):
            return None
    return terms
