"""Which torch op becomes which ONNX op, for `flashfx.rewriter.onnx_export`: the mapping table and its converters.

`_EXACT` maps an FX target (a torch function, an `operator` function, or ``("method", name)`` for a Tensor method;
`_key(node)` gives it) to a converter registered with `@_exact(...)`. A converter emits ONNX nodes through the
exporter (`ex.emit`, `ex.ref`, `ex.const`, ...) only where the mapping is exact in meaning, casting operands to
torch's promoted dtype, and raises `_NotExact` otherwise, after which the exporter rolls back what it emitted and
writes the call as a custom-domain node. `_ONNX_DTYPES` is the torch dtype -> ONNX element type table both use.
The graph walk, naming, size expressions and custom nodes stay in `onnx_export.py`.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import TensorProto

from flashfx.rewriter.cost import node_value

if TYPE_CHECKING:  # annotations only: onnx_export imports this module
    from flashfx.rewriter.onnx_export import _Exporter

_ONNX_DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL, torch.complex64: TensorProto.COMPLEX64, torch.complex128: TensorProto.COMPLEX128,
}
for _name, _proto in (("float8_e4m3fn", "FLOAT8E4M3FN"), ("float8_e5m2", "FLOAT8E5M2")):
    if hasattr(torch, _name) and hasattr(TensorProto, _proto):
        _ONNX_DTYPES[getattr(torch, _name)] = getattr(TensorProto, _proto)


class _NotExact(Exception):
    """Raised by a mapping that cannot express this call exactly; the node is then exported as a custom op."""


def _key(node: fx.Node) -> Any:
    return ("method", node.target) if node.op == "call_method" else node.target


# ---------------------------------------------------------------------------------------------------- exact maps

_EXACT: Dict[Any, Callable[[_Exporter, fx.Node, Any], None]] = {}


def _exact(*targets: Any) -> Callable:
    """Register a mapping for fx targets; a method is named ("method", "name")."""
    def register(fn: Callable) -> Callable:
        for t in targets:
            _EXACT[t] = fn
        return fn
    return register


def _bind(node: fx.Node, names: Sequence[str], **defaults: Any) -> Dict[str, Any]:
    """Arguments by name; an argument the mapping does not know makes it decline."""
    bound = dict(defaults)
    if len(node.args) > len(names):
        raise _NotExact
    bound.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names and key not in defaults:
            raise _NotExact
        bound[key] = value
    return bound


def _tensor(node: Any) -> torch.Tensor:
    val = node_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise _NotExact
    return val


def _static_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _NotExact
    return value


def _dtype_proxy(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        t = _tensor(arg)
        return torch.empty((1,) * min(t.dim(), 1), dtype=t.dtype, device="meta")
    if isinstance(arg, (bool, int, float)):
        return arg
    raise _NotExact


def _operands(ex: _Exporter, node: fx.Node, args: Sequence[Any], dtype: Optional[torch.dtype] = None) -> List[str]:
    """Operands of an elementwise op, each cast to torch's promoted dtype (or `dtype`), scalars as constants."""
    if dtype is None:
        if len(args) != 2:
            raise _NotExact
        dtype = torch.result_type(_dtype_proxy(args[0]), _dtype_proxy(args[1]))
    names = []
    for i, a in enumerate(args):
        if isinstance(a, fx.Node):
            name = ex.ref(a)
            if _tensor(a).dtype != dtype:
                cast = ex.fresh(f"{node.name}/cast{i}")
                ex.emit("Cast", [name], [cast], f"{node.name}/cast{i}", to=_ONNX_DTYPES.get(dtype, 0) or _bad())
                name = cast
            names.append(name)
        elif isinstance(a, (bool, int, float)):
            names.append(ex.const(a, dtype, f"{node.name}/const{i}"))
        else:
            raise _NotExact
    return names


def _bad() -> Any:
    raise _NotExact


_BINARY = {
    operator.add: "Add", torch.add: "Add", ("method", "add"): "Add",
    operator.sub: "Sub", torch.sub: "Sub", ("method", "sub"): "Sub",
    operator.mul: "Mul", torch.mul: "Mul", ("method", "mul"): "Mul",
    operator.truediv: "Div", torch.div: "Div", ("method", "div"): "Div", torch.true_divide: "Div",
    operator.pow: "Pow", torch.pow: "Pow", ("method", "pow"): "Pow",
    operator.eq: "Equal", torch.eq: "Equal", ("method", "eq"): "Equal",
    operator.lt: "Less", torch.lt: "Less", ("method", "lt"): "Less",
    operator.le: "LessOrEqual", torch.le: "LessOrEqual", ("method", "le"): "LessOrEqual",
    operator.gt: "Greater", torch.gt: "Greater", ("method", "gt"): "Greater",
    operator.ge: "GreaterOrEqual", torch.ge: "GreaterOrEqual", ("method", "ge"): "GreaterOrEqual",
    operator.ne: "Equal", torch.ne: "Equal", ("method", "ne"): "Equal",  # then Not
}
_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}


@_exact(*_BINARY)
def _binary(ex: _Exporter, node: fx.Node, out: str) -> None:
    op = _BINARY[_key(node)]
    if len(node.args) != 2 or node.kwargs:  # alpha=, rounding_mode=, out=: not a plain binary op
        raise _NotExact
    result = _tensor(node)
    # Arithmetic computes in the result dtype (int / int casts to float first, as torch does); comparisons in the
    # promoted dtype of their operands.
    dtype = None if op in _COMPARISONS else result.dtype
    if op == "Pow":
        base, exponent = node.args
        names = _operands(ex, node, [base], dtype) + _operands(ex, node, [exponent], dtype)
    else:
        names = _operands(ex, node, node.args, dtype)
    negate = node.target in (operator.ne, torch.ne) or node.target == "ne"
    eq_out = ex.fresh(f"{node.name}/eq") if negate else out
    ex.emit(op, names, [eq_out], node.name)
    if negate:
        ex.emit("Not", [eq_out], [out], f"{node.name}/not")


_UNARY = {
    torch.relu: "Relu", F.relu: "Relu", ("method", "relu"): "Relu",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", ("method", "sigmoid"): "Sigmoid",
    torch.tanh: "Tanh", F.tanh: "Tanh", ("method", "tanh"): "Tanh",
    torch.exp: "Exp", ("method", "exp"): "Exp", torch.log: "Log", ("method", "log"): "Log",
    torch.sqrt: "Sqrt", ("method", "sqrt"): "Sqrt", torch.abs: "Abs", ("method", "abs"): "Abs",
    torch.neg: "Neg", operator.neg: "Neg", ("method", "neg"): "Neg",
    torch.sin: "Sin", ("method", "sin"): "Sin", torch.cos: "Cos", ("method", "cos"): "Cos",
    torch.erf: "Erf", ("method", "erf"): "Erf", torch.reciprocal: "Reciprocal", ("method", "reciprocal"): "Reciprocal",
    torch.floor: "Floor", ("method", "floor"): "Floor", torch.ceil: "Ceil", ("method", "ceil"): "Ceil",
    torch.logical_not: "Not", ("method", "logical_not"): "Not", operator.invert: "Not",
}


@_exact(*_UNARY)
def _unary(ex: _Exporter, node: fx.Node, out: str) -> None:
    if len(node.args) != 1 or node.kwargs:
        raise _NotExact
    op = _UNARY[_key(node)]
    if op == "Not" and _tensor(node.args[0]).dtype != torch.bool:
        raise _NotExact  # ~x on integers is bitwise
    if op != "Not" and not _tensor(node.args[0]).is_floating_point():
        raise _NotExact  # torch promotes integer inputs of exp/sqrt/... to float
    ex.emit(op, [ex.ref(node.args[0])], [out], node.name)


@_exact(torch.rsqrt, ("method", "rsqrt"))
def _rsqrt(ex: _Exporter, node: fx.Node, out: str) -> None:
    x = _bind(node, ["input"])["input"]
    if not _tensor(x).is_floating_point():
        raise _NotExact
    root = ex.fresh(f"{node.name}/sqrt")
    ex.emit("Sqrt", [ex.ref(x)], [root], f"{node.name}/sqrt")
    ex.emit("Reciprocal", [root], [out], node.name)


@_exact(F.silu, ("method", "silu"))
def _silu(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "inplace"], inplace=False)
    x = ex.ref(args["input"])
    gate = ex.fresh(f"{node.name}/sigmoid")
    ex.emit("Sigmoid", [x], [gate], f"{node.name}/sigmoid")
    ex.emit("Mul", [x, gate], [out], node.name)


@_exact(F.gelu, ("method", "gelu"))
def _gelu(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "approximate"], approximate="none")
    if args["approximate"] not in ("none", "tanh"):
        raise _NotExact
    ex.emit("Gelu", [ex.ref(args["input"])], [out], node.name, approximate=args["approximate"])


@_exact(torch.matmul, operator.matmul, ("method", "matmul"), torch.bmm, ("method", "bmm"), torch.mm, ("method", "mm"))
def _matmul(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "other"])
    a, b = _tensor(args["input"]), _tensor(args["other"])
    if a.dtype != b.dtype:
        raise _NotExact
    ex.emit("MatMul", [ex.ref(args["input"]), ex.ref(args["other"])], [out], node.name)


@_exact(F.linear)
def _linear(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "weight", "bias"], bias=None)
    w = _tensor(args["weight"])
    if w.dim() != 2:
        raise _NotExact
    wt = ex.fresh(f"{node.name}/weight_t")
    ex.emit("Transpose", [ex.ref(args["weight"])], [wt], f"{node.name}/weight_t", perm=[1, 0])
    if args["bias"] is None:
        ex.emit("MatMul", [ex.ref(args["input"]), wt], [out], node.name)
        return
    product = ex.fresh(f"{node.name}/matmul")
    ex.emit("MatMul", [ex.ref(args["input"]), wt], [product], f"{node.name}/matmul")
    ex.emit("Add", [product, ex.ref(args["bias"])], [out], node.name)


@_exact(F.softmax, torch.softmax, ("method", "softmax"), F.log_softmax, torch.log_softmax, ("method", "log_softmax"))
def _softmax(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "dim", "_stacklevel", "dtype"], dim=None, _stacklevel=3, dtype=None)
    if args["dim"] is None:
        raise _NotExact
    log = node.target in (F.log_softmax, torch.log_softmax, "log_softmax")
    (x,) = _operands(ex, node, [args["input"]], _tensor(node).dtype)
    ex.emit("LogSoftmax" if log else "Softmax", [x], [out], node.name, axis=_static_int(args["dim"]))


@_exact(F.layer_norm)
def _layer_norm(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "normalized_shape", "weight", "bias", "eps"], weight=None, bias=None, eps=1e-5)
    if args["weight"] is None:
        raise _NotExact  # ONNX needs a Scale input; a ones tensor would be made up data
    inputs = [ex.ref(args["input"]), ex.ref(args["weight"])]
    if args["bias"] is not None:
        inputs.append(ex.ref(args["bias"]))
    ex.emit("LayerNormalization", inputs, [out], node.name, axis=-len(args["normalized_shape"]),
            epsilon=float(args["eps"]))


@_exact(F.embedding)
def _embedding(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"],
                 padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False)
    if args["max_norm"] is not None:
        raise _NotExact  # max_norm renormalises rows in place
    # padding_idx, scale_grad_by_freq and sparse only change the gradient: the forward is a row gather.
    ex.emit("Gather", [ex.ref(args["weight"]), ex.ref(args["input"])], [out], node.name, axis=0)


@_exact(F.dropout, ("method", "dropout"))
def _dropout(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "p", "training", "inplace"], p=0.5, training=True, inplace=False)
    if args["training"] is not False and args["p"] != 0:
        raise _NotExact  # random in training: stays a torch node so the reader sees it
    ex.emit("Identity", [ex.ref(args["input"])], [out], node.name)


_CASTS = {("method", m) for m in ("to", "float", "half", "double", "bfloat16", "int", "long", "bool", "type_as",
                                  "type", "contiguous", "clone", "detach")} | {torch.clone, torch.detach}


@_exact(*_CASTS)
def _cast(ex: _Exporter, node: fx.Node, out: str) -> None:
    # These only change dtype (device, memory format and autograd do not exist in ONNX): read the result's dtype.
    src, dst = _tensor(node.args[0]), _tensor(node)
    if [ex.dim(d) for d in src.shape] != [ex.dim(d) for d in dst.shape]:
        raise _NotExact
    if src.dtype == dst.dtype:
        ex.emit("Identity", [ex.ref(node.args[0])], [out], node.name)
    else:
        ex.emit("Cast", [ex.ref(node.args[0])], [out], node.name, to=_ONNX_DTYPES.get(dst.dtype) or _bad())


@_exact(torch.transpose, ("method", "transpose"), torch.permute, ("method", "permute"), ("method", "t"), torch.t)
def _transpose(ex: _Exporter, node: fx.Node, out: str) -> None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    rank = _tensor(x).dim()
    rest = [a for a in node.args[1:]] + [v for k, v in node.kwargs.items() if k != "input"]
    name = node.target if isinstance(node.target, str) else node.target.__name__
    perm = list(range(rank))
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        perm = [_static_int(d) % rank for d in dims]
    else:
        d0, d1 = (0, 1) if name == "t" else [_static_int(d) % rank for d in rest]
        if rank < 2:
            perm = [0] * rank
        else:
            perm[d0], perm[d1] = perm[d1], perm[d0]
    ex.emit("Transpose", [ex.ref(x)], [out], node.name, perm=perm)


_RESHAPES = {("method", m) for m in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                                     "reshape_as")} | {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                                                        torch.unflatten}


@_exact(*_RESHAPES)
def _reshape(ex: _Exporter, node: fx.Node, out: str) -> None:
    # All of these are row-major reshapes; the target shape is read from the result, with 0 ("keep the input's
    # size") for a symbolic size at the same position and at most one -1 for a symbolic size ONNX must infer.
    src, dst = _tensor(node.args[0]), _tensor(node)
    if node.target in ("view", "view_as") and isinstance(node.args[1] if len(node.args) > 1 else None, torch.dtype):
        raise _NotExact  # view(dtype) reinterprets bits
    shape, inferred = [], 0
    for i, d in enumerate(dst.shape):
        if not isinstance(d, torch.SymInt) or d.node.expr.is_number:
            if int(d) == 0:
                raise _NotExact  # 0 means "copy" in ONNX Reshape
            shape.append(int(d))
        elif i < src.dim() and ex.dim(src.shape[i]) == ex.dim(d):
            shape.append(0)
        else:
            inferred += 1
            shape.append(-1)
    target = ex.ints(shape, f"{node.name}/shape") if inferred <= 1 else ex.shape(dst.shape, f"{node.name}/shape")
    ex.emit("Reshape", [ex.ref(node.args[0]), target], [out], node.name)


@_exact(("method", "masked_fill"), torch.masked_fill)
def _masked_fill(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "mask", "value"])
    x = _tensor(args["input"])
    if _tensor(args["mask"]).dtype != torch.bool:
        raise _NotExact
    (value,) = _operands(ex, node, [args["value"]], x.dtype)
    ex.emit("Where", [ex.ref(args["mask"]), value, ex.ref(args["input"])], [out], node.name)


@_exact(torch.where)
def _where(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["condition", "input", "other"])
    if _tensor(args["condition"]).dtype != torch.bool or not isinstance(args["condition"], fx.Node):
        raise _NotExact
    a, b = _operands(ex, node, [args["input"], args["other"]], _tensor(node).dtype)
    ex.emit("Where", [ex.ref(args["condition"]), a, b], [out], node.name)


_REDUCE = {torch.mean: "ReduceMean", ("method", "mean"): "ReduceMean", torch.sum: "ReduceSum",
           ("method", "sum"): "ReduceSum", torch.amax: "ReduceMax", ("method", "amax"): "ReduceMax",
           torch.amin: "ReduceMin", ("method", "amin"): "ReduceMin"}


@_exact(*_REDUCE)
def _reduce(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "dim", "keepdim"], dim=None, keepdim=False, dtype=None)
    x, result = _tensor(args["input"]), _tensor(node)
    dims = args["dim"]
    if dims is None or dims == []:
        axes = list(range(x.dim()))
    else:
        axes = [_static_int(d) % max(x.dim(), 1) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    (inp,) = _operands(ex, node, [args["input"]], result.dtype)  # sum of int32 is int64; dtype= casts first
    ex.emit(_REDUCE[_key(node)], [inp, ex.ints(axes, f"{node.name}/axes")], [out], node.name,
            keepdims=int(bool(args["keepdim"])))


@_exact(torch.cat, torch.concat, torch.concatenate)
def _cat(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["tensors", "dim"], dim=0)
    tensors = list(args["tensors"])
    rank = _tensor(node).dim()
    names = [n for n in _operands(ex, node, tensors, _tensor(node).dtype)]
    ex.emit("Concat", names, [out], node.name, axis=_static_int(args["dim"]) % rank)



@_exact(torch.split, ("method", "split"), torch.chunk, ("method", "chunk"), torch.tensor_split,
        ("method", "tensor_split"), torch.unbind, ("method", "unbind"))
def _split(ex: _Exporter, node: fx.Node, outs: Any) -> None:
    # Every splitting op is an ONNX Split along one axis with the sizes read from the results (unbind: then a
    # Squeeze of each piece); declines when a piece's size along the axis is symbolic.
    x = _tensor(node.args[0])
    pieces = node_value(node)
    outs = [outs] if isinstance(outs, str) else list(outs)
    if not isinstance(pieces, (list, tuple)) or not pieces or not all(isinstance(p, torch.Tensor) for p in pieces):
        raise _NotExact
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if node.target in (torch.unbind, "unbind"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    axis = _static_int(dim) % x.dim()
    unbind = node.target in (torch.unbind, "unbind")
    sizes = [1 if unbind else ex.dim(p.shape[axis]) for p in pieces]
    if not all(isinstance(s, int) for s in sizes):
        raise _NotExact
    pieces_out = [ex.fresh(f"{o}/piece") for o in outs] if unbind else outs
    ex.emit("Split", [ex.ref(node.args[0]), ex.ints(sizes, f"{node.name}/sizes")], pieces_out, node.name, axis=axis)
    if unbind:
        axes = ex.ints([axis], f"{node.name}/axis")
        for piece, out in zip(pieces_out, outs):
            ex.emit("Squeeze", [piece, axes], [out], out)


@_exact(("method", "expand"), ("method", "expand_as"))
def _expand(ex: _Exporter, node: fx.Node, out: str) -> None:
    # The result's shape is the broadcast of the input to it, which is what ONNX Expand computes.
    ex.emit("Expand", [ex.ref(node.args[0]), ex.shape(_tensor(node).shape, f"{node.name}/shape")], [out], node.name)


@_exact(torch.addmm, ("method", "addmm"))
def _addmm(ex: _Exporter, node: fx.Node, out: str) -> None:
    args = _bind(node, ["input", "mat1", "mat2"], beta=1, alpha=1)
    if _tensor(args["mat1"]).dim() != 2 or _tensor(args["mat2"]).dim() != 2:
        raise _NotExact
    ex.emit("Gemm", [ex.ref(args["mat1"]), ex.ref(args["mat2"]), ex.ref(args["input"])], [out], node.name,
            alpha=float(args["alpha"]), beta=float(args["beta"]))


_LOGICAL = {operator.and_: "And", torch.logical_and: "And", ("method", "logical_and"): "And",
            operator.or_: "Or", torch.logical_or: "Or", ("method", "logical_or"): "Or",
            operator.xor: "Xor", torch.logical_xor: "Xor", ("method", "logical_xor"): "Xor"}


@_exact(*_LOGICAL)
def _logical(ex: _Exporter, node: fx.Node, out: str) -> None:
    # `&`, `|`, `^` are bitwise on integers: only boolean operands are the ONNX logical ops.
    if len(node.args) != 2 or node.kwargs or not all(
            isinstance(a, fx.Node) and _tensor(a).dtype == torch.bool for a in node.args):
        raise _NotExact
    ex.emit(_LOGICAL[_key(node)], [ex.ref(a) for a in node.args], [out], node.name)
