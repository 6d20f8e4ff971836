"""The pointwise op table: how each ATen pointwise op is written in Triton.

Each entry turns the op's operands (Triton expressions, already upcast to the compute dtype) and its constant
arguments into one Triton expression. fp16/bf16 values are computed in fp32; only an explicit cast in the graph
rounds. Math the Triton interpreter lacks (libdevice) is written with core `tl` functions through small
`@triton.jit` helpers that the generated module defines only when a kernel uses them.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

aten = torch.ops.aten

# torch dtype -> Triton dtype name
TL_DTYPES = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64", torch.int64: "tl.int64", torch.int32: "tl.int32", torch.int16: "tl.int16",
    torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of `dtype` is computed in inside a kernel."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


# Helpers the generated module defines on demand (name -> source). Written with core tl ops only, so that the
# same source runs compiled on CUDA and in the CPU interpreter.
HELPERS: Dict[str, str] = {
    "_tanh": (
        "@triton.jit\n"
        "def _tanh(x):\n"
        "    # tanh(|x|) = (1 - e) / (1 + e), e = exp(-2|x|): never overflows\n"
        "    e = tl.exp(-2.0 * tl.abs(x))\n"
        "    t = (1.0 - e) / (1.0 + e)\n"
        "    return tl.where(x < 0, -t, t)\n"
    ),
    "_pow": (
        "@triton.jit\n"
        "def _pow(x, y):\n"
        "    # x ** y for float y; negative x only for integral y (as torch, else nan)\n"
        "    mag = tl.exp2(y * tl.log2(tl.abs(x)))\n"
        "    y_int = tl.floor(y) == y\n"
        "    odd = y_int & ((tl.abs(y) % 2.0) == 1.0)\n"
        "    neg = tl.where(odd, -mag, mag)\n"
        "    res = tl.where(x < 0, tl.where(y_int, neg, float('nan')), mag)\n"
        "    return tl.where(y == 0.0, 1.0, tl.where(x == 0.0, tl.where(y > 0, 0.0, float('inf')), res))\n"
    ),
    "_sign": (
        "@triton.jit\n"
        "def _sign(x):\n"
        "    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)\n"
    ),
    "_trunc": (
        "@triton.jit\n"
        "def _trunc(x):\n"
        "    return tl.where(x < 0, tl.ceil(x), tl.floor(x))\n"
    ),
}


def literal(value: Any) -> str:
    """A Python constant as Triton source."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "float('nan')"
        if math.isinf(value):
            return "float('inf')" if value > 0 else "float('-inf')"
        return repr(value)
    raise TypeError(f"no Triton literal for {value!r}")


class Operand:
    """One argument of an op as the emitter hands it over: its Triton expression and dtype (None for a constant)."""

    def __init__(self, expr: str, dtype: Optional[torch.dtype], value: Any = None) -> None:
        self.expr = expr
        self.dtype = dtype
        self.value = value  # the Python value of a constant operand

    def __str__(self) -> str:
        return self.expr


Rule = Callable[[List[Operand], Dict[str, Any], List[str]], str]
POINTWISE: Dict[Any, Rule] = {}


def rule(*packets: Any) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for p in packets:
            POINTWISE[p] = fn
        return fn

    return wrap


def _alpha(b: Operand, kw: Dict[str, Any]) -> str:
    alpha = kw.get("alpha", 1)
    return f"{b}" if alpha == 1 else f"({b} * {literal(alpha)})"


@rule(aten.add)
def _add(a, kw, h):
    return f"{a[0]} + {_alpha(a[1], kw)}"


@rule(aten.sub)
def _sub(a, kw, h):
    return f"{a[0]} - {_alpha(a[1], kw)}"


@rule(aten.rsub)
def _rsub(a, kw, h):
    return f"{a[1]} - {_alpha(a[0], kw)}"


@rule(aten.mul)
def _mul(a, kw, h):
    return f"{a[0]} * {a[1]}"


@rule(aten.div)
def _div(a, kw, h):
    mode = kw.get("rounding_mode")
    if mode == "floor":
        return f"tl.floor({a[0]} / {a[1]})"
    if mode == "trunc":
        h.append("_trunc")
        return f"_trunc({a[0]} / {a[1]})"
    return f"{a[0]} / {a[1]}"


def _unary(fmt: str, helper: Optional[str] = None) -> Rule:
    def fn(a, kw, h):
        if helper:
            h.append(helper)
        return fmt.format(x=a[0])

    return fn


for _packet, _fmt, _helper in [
    (aten.neg, "-{x}", None), (aten.exp, "tl.exp({x})", None), (aten.exp2, "tl.exp2({x})", None),
    (aten.expm1, "(tl.exp({x}) - 1.0)", None), (aten.log, "tl.log({x})", None), (aten.log2, "tl.log2({x})", None),
    (aten.log1p, "tl.log(1.0 + {x})", None), (aten.sqrt, "tl.sqrt({x})", None), (aten.rsqrt, "tl.rsqrt({x})", None),
    (aten.sin, "tl.sin({x})", None), (aten.cos, "tl.cos({x})", None), (aten.tanh, "_tanh({x})", "_tanh"),
    (aten.sigmoid, "tl.sigmoid({x})", None), (aten.erf, "tl.erf({x})", None), (aten.abs, "tl.abs({x})", None),
    (aten.reciprocal, "(1.0 / {x})", None), (aten.relu, "tl.maximum({x}, 0)", None),
    (aten.silu, "({x} * tl.sigmoid({x}))", None), (aten.floor, "tl.floor({x})", None),
    (aten.ceil, "tl.ceil({x})", None), (aten.trunc, "_trunc({x})", "_trunc"), (aten.sign, "_sign({x})", "_sign"),
    (aten.square, "({x} * {x})", None), (aten.logical_not, "({x} == 0)", None), (aten.isnan, "({x} != {x})", None),
]:
    rule(_packet)(_unary(_fmt, _helper))


@rule(aten.bitwise_not)
def _bitwise_not(a, kw, h):
    return f"({a[0]} == 0)" if a[0].dtype == torch.bool else f"(~{a[0]})"


# Identity-like ops: the kernel writes a fresh buffer anyway.
@rule(aten.clone, aten.alias, aten.lift_fresh_copy)
def _identity(a, kw, h):
    return f"{a[0]}"


@rule(aten._to_copy, torch.ops.prims.convert_element_type)
def _to_copy(a, kw, h):
    return f"{a[0]}"  # the emitter casts to the node's dtype


@rule(aten.copy)
def _copy(a, kw, h):
    return f"{a[1]}"  # copy(dst, src): the values of src, broadcast to dst's shape and dtype


@rule(aten.pow)
def _pow(a, kw, h):
    base, exp = a[0], a[1]
    if exp.dtype is None:  # Tensor_Scalar: specialise the common exponents
        e = float(exp.value)
        special = {1.0: "{x}", 2.0: "({x} * {x})", 3.0: "({x} * {x} * {x})", 0.5: "tl.sqrt({x})",
                   -0.5: "tl.rsqrt({x})", -1.0: "(1.0 / {x})", 0.0: "({x} * 0 + 1)"}
        if e in special:
            return special[e].format(x=base)
    if base.dtype is None and base.value is not None and float(base.value) > 0:  # Scalar ** Tensor
        return f"tl.exp2({exp} * {math.log2(float(base.value))!r})"
    return _fallback_pow(a, h)


def _fallback_pow(a, h):
    h.append("_pow")
    return f"_pow({a[0]}.to(tl.float32), ({a[1]} + 0.0))" if a[0].dtype is not None else \
        f"_pow(({a[0]} + 0.0), {a[1]}.to(tl.float32))"


@rule(aten.maximum)
def _maximum(a, kw, h):
    return f"tl.maximum({a[0]}, {a[1]})"


@rule(aten.minimum)
def _minimum(a, kw, h):
    return f"tl.minimum({a[0]}, {a[1]})"


@rule(aten.clamp)
def _clamp(a, kw, h):
    x = f"{a[0]}"
    lo = a[1] if len(a) > 1 else kw.get("min")
    hi = a[2] if len(a) > 2 else kw.get("max")
    if lo is not None and str(lo) != "None":
        x = f"tl.maximum({x}, {lo})"
    if hi is not None and str(hi) != "None":
        x = f"tl.minimum({x}, {hi})"
    return x


@rule(aten.clamp_min)
def _clamp_min(a, kw, h):
    return f"tl.maximum({a[0]}, {a[1]})"


@rule(aten.clamp_max)
def _clamp_max(a, kw, h):
    return f"tl.minimum({a[0]}, {a[1]})"


@rule(aten.where)
def _where(a, kw, h):
    return f"tl.where({a[0]}, {a[1]}, {a[2]})"


@rule(aten.masked_fill)
def _masked_fill(a, kw, h):
    return f"tl.where({a[1]}, {a[2]}, {a[0]})"


for _packet, _sym in [(aten.eq, "=="), (aten.ne, "!="), (aten.lt, "<"), (aten.le, "<="), (aten.gt, ">"),
                      (aten.ge, ">=")]:
    rule(_packet)(lambda a, kw, h, s=_sym: f"({a[0]} {s} {a[1]})")

rule(aten.logical_and)(lambda a, kw, h: f"(({a[0]} != 0) & ({a[1]} != 0))")
rule(aten.logical_or)(lambda a, kw, h: f"(({a[0]} != 0) | ({a[1]} != 0))")
rule(aten.bitwise_and)(lambda a, kw, h: f"({a[0]} & {a[1]})")
rule(aten.bitwise_or)(lambda a, kw, h: f"({a[0]} | {a[1]})")

_SQRT1_2 = repr(math.sqrt(0.5))
_SQRT_2_PI = repr(math.sqrt(2.0 / math.pi))
_INV_SQRT_2PI = repr(1.0 / math.sqrt(2.0 * math.pi))


@rule(aten.gelu)
def _gelu(a, kw, h):
    x = a[0]
    if kw.get("approximate", "none") == "tanh":
        h.append("_tanh")
        return f"(0.5 * {x} * (1.0 + _tanh({_SQRT_2_PI} * ({x} + 0.044715 * {x} * {x} * {x}))))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * {_SQRT1_2})))"


@rule(aten.gelu_backward)
def _gelu_backward(a, kw, h):
    g, x = a[0], a[1]
    if kw.get("approximate", "none") == "tanh":
        h.append("_tanh")
        t = f"_tanh({_SQRT_2_PI} * ({x} + 0.044715 * {x} * {x} * {x}))"
        return (f"({g} * (0.5 * (1.0 + {t}) + 0.5 * {x} * (1.0 - {t} * {t}) * {_SQRT_2_PI} * "
                f"(1.0 + 0.134145 * {x} * {x})))")
    return (f"({g} * (0.5 * (1.0 + tl.erf({x} * {_SQRT1_2})) + "
            f"{x} * tl.exp(-0.5 * {x} * {x}) * {_INV_SQRT_2PI}))")


@rule(aten.silu_backward)
def _silu_backward(a, kw, h):
    g, x = a[0], a[1]
    return f"({g} * tl.sigmoid({x}) * (1.0 + {x} * (1.0 - tl.sigmoid({x}))))"


@rule(aten.sigmoid_backward)
def _sigmoid_backward(a, kw, h):
    return f"({a[0]} * {a[1]} * (1.0 - {a[1]}))"


@rule(aten.tanh_backward)
def _tanh_backward(a, kw, h):
    return f"({a[0]} * (1.0 - {a[1]} * {a[1]}))"


@rule(aten.threshold_backward)
def _threshold_backward(a, kw, h):
    return f"tl.where({a[1]} <= {a[2]}, 0.0, {a[0]})"


@rule(aten.addcmul)
def _addcmul(a, kw, h):
    v = kw.get("value", 1)
    return f"({a[0]} + {literal(v)} * {a[1]} * {a[2]})"


@rule(aten.lerp)
def _lerp(a, kw, h):
    return f"({a[0]} + {a[2]} * ({a[1]} - {a[0]}))"


def is_pointwise(target: Any) -> bool:
    packet = getattr(target, "overloadpacket", None)
    return packet in POINTWISE


def render(target: Any, operands: Sequence[Operand], kwargs: Dict[str, Any], helpers: List[str]) -> str:
    """The Triton expression for `target(*operands, **kwargs)`."""
    return POINTWISE[target.overloadpacket](list(operands), dict(kwargs), helpers)
