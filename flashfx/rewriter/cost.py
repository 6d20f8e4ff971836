"""The cost model: FLOPs and HBM bytes of every node and every graph, as sympy expressions of the symbolic
sizes and as numbers for the example inputs.

Conventions (the model is exact for what it says it counts):
- bytes = bytes of each distinct tensor input read once + bytes of each output written once; views move nothing.
- matmul-like ops count 2·M·N·K FLOPs per matrix product; attention counts its two products, 4·B·H·L·S·D
  (causal: half of it, the diagonal tiles counted in full elsewhere is a stated approximation).
- pointwise ops count 1 FLOP per output element, whatever the function (exp counts as 1).
- reductions count 1 FLOP per input element; softmax / log-softmax 5; layer norm 8; RMS norm 4 (per element).
- embedding and gather read only the rows they touch (plus the indices).
- anything else: inputs + outputs bytes and one FLOP per output element, and it is flagged `exact=False`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import sympy
import torch
import torch.fx as fx

Expr = sympy.Expr
ZERO = sympy.Integer(0)


@dataclass
class NodeCost:
    flops: Expr = ZERO
    read_bytes: Expr = ZERO
    write_bytes: Expr = ZERO
    exact: bool = True

    @property
    def hbm_bytes(self) -> Expr:
        return self.read_bytes + self.write_bytes


@dataclass
class GraphCost:
    """Totals over a graph: what running every node as its own kernel costs, and the lower bound."""

    flops: Expr
    hbm_bytes: Expr
    lower_bound_bytes: Expr
    hints: Dict[sympy.Symbol, int] = field(default_factory=dict)
    approximate_nodes: List[str] = field(default_factory=list)

    def value(self, expr: Expr) -> int:
        return int(sympy.sympify(expr).subs(self.hints)) if expr.free_symbols <= set(self.hints) else -1

    @property
    def flops_value(self) -> int:
        return self.value(self.flops)

    @property
    def bytes_value(self) -> int:
        return self.value(self.hbm_bytes)

    @property
    def lower_bound_value(self) -> int:
        return self.value(self.lower_bound_bytes)


# ---------------------------------------------------------------------------------------------------- metadata

def node_value(node: fx.Node) -> Any:
    """The fake value a node computes (`meta['val']` after make_fx / our capture, `example_value` from Dynamo)."""
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def size_expr(d: Any) -> Expr:
    """A size (int or SymInt) as a sympy expression."""
    if isinstance(d, torch.SymInt):
        return sympy.sympify(d.node.expr)
    return sympy.Integer(int(d))


def numel(t: torch.Tensor) -> Expr:
    return sympy.Mul(*[size_expr(d) for d in t.shape]) if t.dim() else sympy.Integer(1)


def tensor_bytes(t: torch.Tensor) -> Expr:
    return numel(t) * t.element_size()


def _tensors(value: Any) -> List[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(value)
    return [v for v in flat if isinstance(v, torch.Tensor)]


def size_hint(value: Any) -> Optional[int]:
    """An int, or a SymInt's example value without adding a guard (`int()` on a SymInt would specialise it for the
    whole graph); None when the SymInt has no example value."""
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else None
    return int(value)


def size_hints(value: Any, into: Dict[sympy.Symbol, int]) -> None:
    """Collect the example value of every size symbol found in `value`."""
    for t in _tensors(value):
        for d in t.shape:
            if isinstance(d, torch.SymInt):
                expr = d.node.expr
                known = _backed_values(d.node.shape_env)
                for sym in expr.free_symbols:
                    if sym not in into and sym in known:
                        into[sym] = int(known[sym])


def _backed_values(shape_env: Any) -> Dict[sympy.Symbol, Any]:
    # torch 2.13 renamed var_to_val to backed_var_to_val (the old name warns)
    values = getattr(shape_env, "backed_var_to_val", None)
    return values if values is not None else shape_env.var_to_val


# ---------------------------------------------------------------------------------------------- op classification

def op_name(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> str:
    """A short name for what a node computes: 'mm', 'softmax', 'add', 'linear', ... (no namespace, no overload)."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_module" and gm is not None:
        return type(gm.get_submodule(str(target))).__name__.lower()
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target)).lstrip("_")


VIEW_OPS = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "flatten",
    "unflatten", "getitem", "select", "slice", "alias", "detach", "as_strided", "view_as", "expand_as", "split",
    "chunk", "unbind", "narrow", "size", "dim", "contiguous_view", "numel", "sym_size", "sym_numel", "sym_stride",
    "mT", "type_as_noop", "lift_fresh_copy", "dropout_eval",
}
MATMUL_OPS = {"mm", "bmm", "matmul", "addmm", "baddbmm", "linear", "addbmm", "addmv", "mv", "dot"}
SOFTMAX_OPS = {"softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax", "_softmax_backward_data",
               "_log_softmax_backward_data"}
REDUCTION_OPS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "argmax", "argmin", "logsumexp",
                 "norm", "var_mean", "all", "any", "cumsum"}
NORM_OPS = {"layer_norm": 8, "native_layer_norm": 8, "rms_norm": 4, "_fused_rms_norm": 4, "group_norm": 8,
            "native_layer_norm_backward": 12, "native_group_norm": 8, "batch_norm": 8}
GATHER_OPS = {"embedding", "index_select", "gather", "index", "take_along_dim"}
ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu"}
POINTWISE_OPS = {
    "add", "sub", "mul", "div", "truediv", "floordiv", "neg", "pow", "exp", "log", "sqrt", "rsqrt", "tanh",
    "sigmoid", "relu", "gelu", "silu", "erf", "sin", "cos", "abs", "where", "masked_fill", "clamp", "clamp_min",
    "clamp_max", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bitwise_and",
    "bitwise_or", "bitwise_not", "to", "type", "float", "half", "bfloat16", "_to_copy", "clone", "contiguous",
    "copy", "copy_", "reciprocal", "maximum", "minimum", "tril", "triu", "dropout", "native_dropout", "sign",
    "exp2", "log1p", "expm1", "gelu_backward", "silu_backward", "threshold_backward", "sigmoid_backward",
    "tanh_backward", "fill", "zeros_like", "ones_like", "full_like", "rand_like", "addcmul", "lerp", "square",
    "iadd", "imul", "isub", "itruediv", "mod", "remainder", "native_dropout_backward", "scalar_tensor",
    "pointwise",
}
CREATION_OPS = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "empty_strided",
                "new_zeros", "new_ones", "new_empty", "new_full", "tensor", "scalar_tensor"}

# Cost functions that other modules (flashfx's own ops) register for their targets.
CostFn = Callable[[fx.Node, List[Any], Any], NodeCost]
_REGISTERED: Dict[Any, CostFn] = {}


def register_cost(target: Any) -> Callable[[CostFn], CostFn]:
    """Register the cost function of a custom op: `fn(node, input_values, output_value) -> NodeCost`."""

    def wrap(fn: CostFn) -> CostFn:
        _REGISTERED[target] = fn
        return fn

    return wrap


def _input_values(node: fx.Node) -> List[Any]:
    values: List[Any] = []
    seen = set()
    for arg in node.all_input_nodes:
        if arg in seen:
            continue
        seen.add(arg)
        values.append(node_value(arg))
    return values


def _io_bytes(inputs: Iterable[Any], output: Any) -> tuple[Expr, Expr]:
    read = sum((tensor_bytes(t) for v in inputs for t in _tensors(v)), ZERO)
    write = sum((tensor_bytes(t) for t in _tensors(output)), ZERO)
    return read, write


def _matmul_flops(name: str, node: fx.Node, out: torch.Tensor) -> Expr:
    args = [a for a in node.args if isinstance(a, fx.Node)]
    vals = [node_value(a) for a in args]
    if name in ("addmm", "baddbmm", "addbmm"):
        a = vals[1]
        extra = numel(out)
    else:
        a = vals[0]
        extra = ZERO
    if name == "linear" and len(vals) > 2:
        extra = numel(out)
    if not isinstance(a, torch.Tensor) or a.dim() == 0:
        return numel(out)
    k = size_expr(a.shape[-1])
    if name == "addbmm":
        k = k * size_expr(a.shape[0])
    return 2 * numel(out) * k + extra


def argument(node: fx.Node, name: str, position: int, default: Any = None) -> Any:
    """An argument by keyword, else by its position in the op's schema (ATen) or `position` (torch functions)."""
    if name in node.kwargs:
        return node.kwargs[name]
    if isinstance(node.target, torch._ops.OpOverload):
        names = [a.name for a in node.target._schema.arguments]
        position = names.index(name) if name in names else len(node.args)
    return node.args[position] if position < len(node.args) else default


def bound_arguments(node: fx.Node) -> Dict[str, Any]:
    """Every argument of an OpOverload call by schema name, defaults filled in."""
    schema = node.target._schema
    named = {a.name: a.default_value for a in schema.arguments}
    named.update(zip((a.name for a in schema.arguments), node.args))
    named.update(node.kwargs)
    return named


def arg_value(arg: Any) -> Any:
    """The fake value of a node argument; a constant argument as it is."""
    return node_value(arg) if isinstance(arg, fx.Node) else arg


def _attention_flops(node: fx.Node, out: torch.Tensor) -> Expr:
    q, k = (node_value(a) for a in node.args[:2])
    causal = argument(node, "is_causal", 5, False) is True
    # out: [..., L, Dv]; q: [..., L, D]; k: [..., S, D]
    flops = 2 * numel(q) * size_expr(k.shape[-2]) + 2 * numel(out) * size_expr(k.shape[-2])
    return flops / 2 if causal else flops


def node_cost(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> NodeCost:
    """FLOPs and HBM bytes of one node, run as its own kernel."""
    if node.op in ("placeholder", "output", "get_attr"):
        return NodeCost()
    out = node_value(node)
    if node.target in _REGISTERED:
        return _REGISTERED[node.target](node, _input_values(node), out)
    name = op_name(node, gm)
    if name in VIEW_OPS or name.startswith("sym_") or not _tensors(out):
        return NodeCost()
    inputs = _input_values(node)
    read, write = _io_bytes(inputs, out)
    first_out = _tensors(out)[0]
    if name in CREATION_OPS:
        return NodeCost(ZERO, ZERO, write)
    if name in MATMUL_OPS or node.target is operator.matmul:
        return NodeCost(_matmul_flops(name, node, first_out), read, write)
    if name in ATTENTION_OPS:
        return NodeCost(_attention_flops(node, first_out), read, write)
    if name in SOFTMAX_OPS:
        return NodeCost(5 * numel(first_out), read, write)
    if name in NORM_OPS:
        return NodeCost(NORM_OPS[name] * numel(first_out), read, write)
    if name in REDUCTION_OPS:
        src = next((t for v in inputs for t in _tensors(v)), first_out)
        return NodeCost(numel(src), read, write)
    if name in GATHER_OPS:
        index_bytes = sum((tensor_bytes(t) for v in inputs for t in _tensors(v) if not t.is_floating_point()), ZERO)
        return NodeCost(ZERO, write + index_bytes, write)
    if name in POINTWISE_OPS or getattr(operator, name, None) is node.target:
        return NodeCost(numel(first_out), read, write)
    return NodeCost(numel(first_out), read, write, exact=False)


def graph_cost(gm: fx.GraphModule) -> GraphCost:
    """Totals over `gm`: each node run as its own kernel, and the lower bound (inputs read once, outputs written once)."""
    flops, moved, lower, hints, approximate = [], [], [], {}, []
    for node in gm.graph.nodes:
        value = node_value(node)
        size_hints(value, hints)
        if node.op == "placeholder":
            lower.append(_input_bytes_needed(node, gm))
            continue
        if node.op == "output":
            lower.append(_output_bytes_written(node, gm))
            continue
        c = node_cost(node, gm)
        flops.append(c.flops)
        moved.append(c.hbm_bytes)
        if not c.exact:
            approximate.append(node.name)
    # one Add of all the terms: adding them one at a time re-canonicalises a growing sum (quadratic in the nodes)
    return GraphCost(*(sympy.Add(*terms) for terms in (flops, moved, lower)), hints, approximate)


def _output_bytes_written(output: fx.Node, gm: fx.GraphModule) -> Expr:
    """Bytes the graph must write for its outputs: each distinct tensor once; views of one tensor count once (the
    largest), and views of a graph input write nothing."""
    written: Dict[fx.Node, Expr] = {}
    for arg in output.all_input_nodes:
        base = arg
        while base.op == "call_function" and op_name(base, gm) in VIEW_OPS and base.all_input_nodes:
            base = base.all_input_nodes[0]
        if base.op == "placeholder":
            continue
        size = sum((tensor_bytes(t) for t in _tensors(node_value(arg))), ZERO)
        written[base] = sympy.Max(written[base], size) if base in written else size
    return sum(written.values(), ZERO)


def _input_bytes_needed(node: fx.Node, gm: fx.GraphModule) -> Expr:
    """Bytes of a graph input (or a view of one) that must be read: all of it, unless every user only slices it
    or gathers rows from it (a causal-mask buffer sliced to S x S, a position table indexed by S positions)."""
    value = node_value(node)
    full = sum((tensor_bytes(t) for t in _tensors(value)), ZERO)
    is_table = isinstance(value, torch.Tensor) and value.is_floating_point()
    partial = ZERO
    for user in node.users:
        name = op_name(user, gm)
        out = _tensors(node_value(user))
        if name in GATHER_OPS and out and is_table:
            partial += tensor_bytes(out[0])  # the rows an embedding / index_select touches
        elif name in {"slice", "select", "narrow", "getitem"} and out:
            partial += _input_bytes_needed(user, gm)
        else:
            return full
    return sympy.Min(full, partial) if node.users else ZERO


def format_bytes(n: float) -> str:
    if n < 0:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


def format_flops(n: float) -> str:
    if n < 0:
        return "?"
    exp = int(math.log10(n)) // 3 * 3 if n >= 1000 else 0
    unit = {0: "", 3: "K", 6: "M", 9: "G", 12: "T", 15: "P"}.get(exp, f"e{exp}")
    return f"{n / 10 ** exp:.2f} {unit}FLOP"
