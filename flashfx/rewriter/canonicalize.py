"""Canonicalization: the many spellings of one operation become one form, so each pattern is written once.

| spellings (Dynamo torch-level graph)                                        | canonical form                      |
|-----------------------------------------------------------------------------|-------------------------------------|
| `a @ b`, `torch.matmul`, `Tensor.matmul`, `bmm`, `mm`, matmul-like `einsum` | `torch.matmul(a, b)`                |
| `baddbmm(input, a, b, beta=β, alpha=α)`                                     | `matmul(a, b) * α + input * β`      |
| `x / c`, `torch.div(x, c)`, `x.div(c)`, `true_divide` (c a Python number)   | `operator.mul(x, 1 / c)`            |
| `c * x`, `torch.mul(x, c)`, `x.mul(c)`                                      | `operator.mul(x, c)`                |
| `F.softmax`, `Tensor.softmax`, `torch.softmax`                              | `torch.softmax(x, dim[, dtype=])`   |
| `transpose`, `swapaxes`, `swapdims`, `permute`, `t`, `.T`, `.mT`            | `torch.permute(x, dims)`            |

dims are non-negative ints; a permute of a permute is composed into one. Every node created carries
`meta['val']` (fake propagation) and the provenance of the node it replaces. Only rewrites that compute exactly the
same values are made, with one stated exception: `x / c` → `x * (1 / c)` may differ in the last bit.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from flashfx.rewriter.matcher import arg, erase_dead, insert_node, is_call, is_number, normalize_dim, tensor
from flashfx.rewriter.pass_manager import PassContext, PassResult

MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm, torch.mm)
MATMUL_METHODS = ("matmul", "bmm", "mm", "__matmul__")
DIV_FUNCTIONS = (operator.truediv, torch.div, torch.true_divide, torch.divide)
DIV_METHODS = ("div", "true_divide", "divide", "__truediv__")
MUL_FUNCTIONS = (operator.mul, torch.mul, torch.multiply)
MUL_METHODS = ("mul", "multiply", "__mul__", "__rmul__")
SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax, torch.special.softmax)
SOFTMAX_METHODS = ("softmax",)
TRANSPOSE_FUNCTIONS = (torch.transpose, torch.swapaxes, torch.swapdims)
TRANSPOSE_METHODS = ("transpose", "swapaxes", "swapdims")

# What a rule returns: (op, target, args, kwargs) of the canonical call, or None to leave the node alone.
Call = Tuple[str, Any, tuple, dict]


def _matmul(node: fx.Node) -> Optional[Call]:
    if not is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS) or len(node.args) != 2 or node.kwargs:
        return None
    if node.op == "call_function" and node.target is torch.matmul:
        return None  # already canonical
    # bmm / mm take exactly the operands matmul takes for them (3-D / 2-D, same batch) and compute the same.
    return ("call_function", torch.matmul, tuple(node.args), {})


def _scalar_mul(node: fx.Node) -> Optional[Call]:
    if is_call(node, DIV_FUNCTIONS, DIV_METHODS):
        if len(node.args) != 2 or node.kwargs.get("rounding_mode") is not None or set(node.kwargs) - {"rounding_mode"}:
            return None
        x, c = node.args
        if not _float_tensor(x) or not is_number(c) or c == 0 or c != c or abs(c) == float("inf"):
            return None
        return ("call_function", operator.mul, (x, 1.0 / c), {})
    if is_call(node, MUL_FUNCTIONS, MUL_METHODS):
        if len(node.args) != 2 or node.kwargs:
            return None
        a, b = node.args
        if is_number(a) and _float_tensor(b):
            a, b = b, a
        elif not (is_number(b) and _float_tensor(a)):
            return None
        if node.op == "call_function" and node.target is operator.mul and node.args[0] is a:
            return None  # already canonical
        return ("call_function", operator.mul, (a, b), {})
    return None


def _float_tensor(x: Any) -> bool:
    t = tensor(x)
    return t is not None and t.dtype.is_floating_point


def _softmax(node: fx.Node) -> Optional[Call]:
    if not is_call(node, SOFTMAX_FUNCTIONS, SOFTMAX_METHODS):
        return None
    x = node.args[0] if node.args else node.kwargs.get("input")
    dim = arg(node, 1, "dim")
    # F.softmax(input, dim, _stacklevel, dtype); torch.softmax / Tensor.softmax(input, dim, dtype)
    dtype = arg(node, 3, "dtype") if node.target is F.softmax else arg(node, 2, "dtype")
    t = tensor(x)
    if t is None or dim is None:  # dim=None is the deprecated implicit-dim softmax: leave it as written
        return None
    d = normalize_dim(dim, t.dim())
    if d is None:
        return None
    call = ("call_function", torch.softmax, (x, d), {"dtype": dtype} if dtype is not None else {})
    if node.op == "call_function" and node.target is torch.softmax and node.args == call[2] and node.kwargs == call[3]:
        return None
    return call


def _permute_dims(node: fx.Node) -> Optional[Tuple[fx.Node, Tuple[int, ...]]]:
    """(input, dims) when `node` is any spelling of a permutation of dims."""
    x = node.args[0] if node.args else None
    t = tensor(x)
    if t is None:
        return None
    n = t.dim()
    if is_call(node, TRANSPOSE_FUNCTIONS, TRANSPOSE_METHODS):
        if len(node.args) != 3 or node.kwargs:
            return None
        a, b = (normalize_dim(d, n) for d in node.args[1:])
        if a is None or b is None:
            return None
        dims = list(range(n))
        dims[a], dims[b] = dims[b], dims[a]
        return x, tuple(dims)
    if is_call(node, (torch.permute,), ("permute",)):
        raw = node.args[1:] if node.op == "call_method" else node.args[1:2]
        raw = raw or (node.kwargs.get("dims"),)
        if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
            raw = tuple(raw[0])
        dims = tuple(normalize_dim(d, n) for d in raw)
        if len(dims) != n or None in dims or sorted(dims) != list(range(n)):
            return None
        return x, dims  # type: ignore[return-value]
    if is_call(node, (torch.t,), ("t",)) and n <= 2 and len(node.args) == 1:
        return x, tuple(reversed(range(n)))
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        if node.args[1] == "mT" and n >= 2:
            return x, (*range(n - 2), n - 1, n - 2)
        if node.args[1] == "T":  # reverses every dim (deprecated for n != 2, but that is what it computes)
            return x, tuple(reversed(range(n)))
    return None


def _permute(node: fx.Node) -> Optional[Call]:
    found = _permute_dims(node)
    if found is None:
        return None
    x, dims = found
    inner = _permute_dims(x) if isinstance(x, fx.Node) and _is_canonical_permute(x) else None
    if inner is not None:  # permute(permute(y, a), b) == permute(y, a[b])
        x, dims = inner[0], tuple(inner[1][d] for d in dims)
    if _is_canonical_permute(node) and x is node.args[0] and node.args[1:] == (dims,) and not node.kwargs:
        return None
    return ("call_function", torch.permute, (x, dims), {})


def _is_canonical_permute(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.permute


_EINSUM_TERM = re.compile(r"^[a-zA-Z]+$")


def _einsum(node: fx.Node) -> Optional[Tuple[bool, bool]]:
    """For `einsum("<batch>ij,<batch>jk-><batch>ik", a, b)` and its variants with an operand stored transposed
    (`<batch>ji`, `<batch>kj`): whether a and b need their last two dims swapped to become matmul operands."""
    if not is_call(node, (torch.einsum,)) or node.kwargs or len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    if tensor(node.args[1]) is None or tensor(node.args[2]) is None:
        return None
    ins, arrow, out = node.args[0].replace(" ", "").partition("->")
    terms = ins.split(",")
    if all(t.startswith("...") for t in (*terms, out)):  # leading broadcast dims: matmul broadcasts them the same
        terms, out = [t[3:] for t in terms], out[3:]
    if not arrow or len(terms) != 2 or not all(_EINSUM_TERM.match(t) for t in (*terms, out)):
        return None
    ta, tb = terms
    if any(len(set(t)) != len(t) for t in (ta, tb, out)) or len(ta) < 2 or len(ta) != len(tb) or len(out) != len(ta):
        return None
    if tensor(node.args[1]).dim() != tensor(node.args[2]).dim():  # with "...", operands of different ranks
        return None
    batch, i, k = out[:-2], out[-2], out[-1]
    contracted = (set(ta) & set(tb)) - set(out)
    if len(contracted) != 1 or ta[:-2] != batch or tb[:-2] != batch:
        return None
    (j,) = contracted
    if set(ta[-2:]) != {i, j} or set(tb[-2:]) != {j, k}:
        return None
    return ta[-2:] != i + j, tb[-2:] != j + k


RULES: Dict[str, Callable[[fx.Node], Optional[Call]]] = {
    "matmul": _matmul,
    "scalar_mul": _scalar_mul,
    "softmax": _softmax,
    "permute": _permute,
}


def _rewrite_baddbmm(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    """`baddbmm(input, b1, b2, beta=, alpha=)` = beta·input + alpha·(b1 @ b2) → matmul, then the scale, then the add
    (beta=0 drops input, as baddbmm ignores it then). Diffusers writes attention scores this way; the fusion pass
    puts the scale and the add back into the matmul's epilogue."""
    if not is_call(node, (torch.baddbmm,), ("baddbmm",)) or len(node.args) not in (3, 5):
        return None
    if set(node.kwargs) - {"beta", "alpha"}:
        return None
    inp, b1, b2 = node.args[:3]
    beta = node.args[3] if len(node.args) == 5 else node.kwargs.get("beta", 1)
    alpha = node.args[4] if len(node.args) == 5 else node.kwargs.get("alpha", 1)
    if not (is_number(beta) and is_number(alpha)) or not _float_tensor(b1):
        return None
    with graph.inserting_after(node):
        out = insert_node(graph, "call_function", torch.matmul, (b1, b2), meta_from=node)
    if alpha != 1:
        with graph.inserting_after(out):
            out = insert_node(graph, "call_function", operator.mul, (out, float(alpha)), meta_from=node)
    if beta != 0:
        if beta != 1:
            with graph.inserting_after(out):
                inp = insert_node(graph, "call_function", operator.mul, (inp, float(beta)), meta_from=node)
                out_prev = out
            with graph.inserting_after(inp):
                out = insert_node(graph, "call_function", operator.add, (out_prev, inp), meta_from=node)
        else:
            with graph.inserting_after(out):
                out = insert_node(graph, "call_function", operator.add, (out, inp), meta_from=node)
    return out


def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite every spelling in the table above into its canonical form (counted as `canonicalize.<rule>`)."""
    graph = gm.graph
    replaced: List[fx.Node] = []
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        new = _rewrite_einsum(graph, node)
        rule_name = "einsum"
        if new is None:
            new, rule_name = _rewrite_baddbmm(graph, node), "baddbmm"
        if new is None:
            for rule_name, rule in RULES.items():
                call = rule(node)
                if call is not None:
                    new = _emit(graph, node, call)
                    break
        if new is None:
            continue
        node.replace_all_uses_with(new)
        replaced.append(node)
        ctx.count(f"canonicalize.{rule_name}")
    if not replaced:
        return PassResult(gm, False)
    erase_dead(graph, replaced)
    graph.lint()
    gm.recompile()
    return PassResult(gm, True)


def _emit(graph: fx.Graph, node: fx.Node, call: Call) -> Optional[fx.Node]:
    op, target, args, kwargs = call
    with graph.inserting_after(node):
        new = insert_node(graph, op, target, args, kwargs, meta_from=node)
    if "val" not in new.meta:  # no fake mode to propagate with: the canonical op computes exactly node's value
        for key in ("val", "example_value"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
    return new


def _rewrite_einsum(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    found = _einsum(node)
    if found is None:
        return None
    operands = list(node.args[1:])
    cursor = node
    for idx, swap_last in enumerate(found):
        if swap_last:
            n = tensor(operands[idx]).dim()
            with graph.inserting_after(cursor):
                cursor = insert_node(graph, "call_function", torch.permute,
                                     (operands[idx], (*range(n - 2), n - 1, n - 2)), meta_from=node)
            operands[idx] = cursor
    with graph.inserting_after(cursor):
        return insert_node(graph, "call_function", torch.matmul, tuple(operands), meta_from=node)
