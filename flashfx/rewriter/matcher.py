"""Small helpers for matching and rewriting torch-level FX graphs (Dynamo spelling).

Generic: they know about nodes, arguments, users, fake values and dead code, never about a particular pass.
A pass combines them into its pattern; every helper returns None / False instead of raising on a graph it does
not understand, so a pass can decline cleanly.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, List, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from flashfx.rewriter.cost import node_value

__all__ = [
    "value", "tensor", "is_call", "arg", "is_number", "single_user", "depends_on", "fake_value", "insert_node",
    "erase_dead", "same_size", "same_shape", "normalize_dim", "is_dtype_cast", "is_inplace", "written_in_place",
    "walk_up",
]


def value(node: Any) -> Any:
    """The fake value a node computes (or the constant itself for a non-node argument)."""
    return node_value(node) if isinstance(node, fx.Node) else node


def tensor(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor a node computes, or None if it computes something else (or has no metadata)."""
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def is_call(node: Any, functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> bool:
    """Whether `node` calls one of `functions` (call_function) or one of the tensor `methods` (call_method)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    if node.op == "call_method":
        return node.target in methods
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` (positional) or `name` (keyword) of a call, else `default`.

    For call_method nodes index 0 is the tensor itself, as in `torch.Tensor.method(self, ...)`.
    """
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def is_number(x: Any) -> bool:
    """A Python int/float constant (bools excluded: `x * True` is not a scale)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def single_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that uses `node`, or None when it has zero or several users."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def depends_on(node: Any, ancestor: fx.Node) -> bool:
    """Whether `ancestor` is among the transitive inputs of `node` (or is `node`)."""
    if not isinstance(node, fx.Node):
        return False
    order = {n: i for i, n in enumerate(ancestor.graph.nodes)}
    limit = order[ancestor]
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen or order.get(n, -1) < limit:  # nodes before the ancestor cannot depend on it
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _fake_mode(values: Sequence[Any]) -> Any:
    """The fake mode the values were made in. Not `detect_fake_mode`: inside a torch.compile backend the tracing
    context holds a different mode than the one Dynamo's example values belong to, and mixing them fails."""
    from torch._subclasses.fake_tensor import FakeTensor

    flat, _ = torch.utils._pytree.tree_flatten(list(values))
    for v in flat:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def fake_value(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """What `target(*args, **kwargs)` computes on the fake values of its node arguments (None if unknown)."""
    fake_args = fx.node.map_arg(args, value)
    fake_kwargs = fx.node.map_arg(kwargs, value)
    mode = _fake_mode([fake_args, fake_kwargs])
    if mode is None:
        return None
    with mode:
        if op == "call_method":
            self_, *rest = fake_args
            return getattr(self_, target)(*rest, **fake_kwargs)
        return target(*fake_args, **fake_kwargs)


def insert_node(graph: fx.Graph, op: str, target: Any, args: tuple, kwargs: Optional[dict] = None,
                meta_from: Optional[fx.Node] = None, val: Any = None) -> fx.Node:
    """Create a node at the graph's insertion point with `meta['val']` set.

    The value is `val` when given, else computed by fake propagation; provenance (stack trace, module stack) is
    copied from `meta_from` so the report can point at the user's source line.
    """
    kwargs = dict(kwargs or {})
    node = graph.create_node(op, target, args, kwargs)
    if meta_from is not None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in meta_from.meta:
                node.meta[key] = meta_from.meta[key]
    if val is None:
        val = fake_value(op, target, args, kwargs)
    if val is not None:
        node.meta["val"] = val
        node.meta["example_value"] = val
    return node


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
                      operator.ilshift, operator.irshift, operator.setitem}


def is_inplace(node: fx.Node) -> bool:
    """Whether a node may mutate one of its inputs (`x.add_()`, `x += y`, `x[i] = y`, `out=`)."""
    if node.target in _INPLACE_OPERATORS or "out" in node.kwargs:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


# torch-level calls whose result shares its first argument's memory
VIEW_FUNCTIONS = (torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
                  operator.getitem)
VIEW_METHODS = ("view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "flatten", "view_as")


def written_in_place(node: fx.Node) -> bool:
    """Whether any node that may share `node`'s memory (its base through views, and every view of that base) has a
    user that writes in place."""
    base = node
    while is_call(base, VIEW_FUNCTIONS, VIEW_METHODS) and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    seen, stack = set(), [base]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if is_inplace(u):
                return True
            if is_call(u, VIEW_FUNCTIONS, VIEW_METHODS) and u.args and u.args[0] is n:
                stack.append(u)
    return False


def erase_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> int:
    """Erase `nodes` that have no users, then their inputs that became unused, transitively.

    Only pure calls are erased: placeholders, attributes, in-place ops and side-effecting calls stay.
    Returns how many nodes were erased.
    """
    erased = 0
    stack: List[fx.Node] = list(nodes)
    while stack:
        node = stack.pop()
        if getattr(node, "_erased", False) or node.graph is not graph or node.users:
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        if node.is_impure() or is_inplace(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def _expr(d: Any) -> Any:
    if isinstance(d, torch.SymInt):
        return d.node.expr
    return sympy.Integer(int(d))


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are provably equal (ints, or SymInts with the same expression) — adds no guards."""
    try:
        return bool(sympy.simplify(_expr(a) - _expr(b)) == 0)
    except (TypeError, ValueError):
        return False


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def normalize_dim(dim: Any, ndim: int) -> Optional[int]:
    """`dim` as a non-negative int (None if it is not an int in range)."""
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < max(ndim, 1):
        return None
    return dim % ndim if ndim else 0


_CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "type_as"}


def is_dtype_cast(node: Any) -> bool:
    """A call that only converts between floating dtypes (same shape, same device): `.to(dtype)`, `.float()`, ..."""
    if not is_call(node, methods=_CAST_METHODS) or node.kwargs.get("copy") or node.kwargs.get("memory_format"):
        return False
    src, out = tensor(node.args[0]), tensor(node)
    if src is None or out is None:
        return False
    return (src.dtype.is_floating_point and out.dtype.is_floating_point and src.device == out.device
            and same_shape(src.shape, out.shape))


def walk_up(node: fx.Node, step: Callable[[fx.Node], Optional[fx.Node]]) -> fx.Node:
    """Follow `step` (returns the producer to continue with, or None to stop) from `node` upwards."""
    seen = set()
    while node not in seen:
        seen.add(node)
        nxt = step(node)
        if nxt is None:
            return node
        node = nxt
    return node
