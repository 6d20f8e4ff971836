"""Lowering: a fusion group's ATen FX nodes -> a `Plan`, the small IR the Triton emitter reads.

A group iterates over one space `P` (a tuple of sympy sizes, the shape of its largest values) and may reduce over a
set of P's dims (`rdims`). Every value in the group is either `full` (indexed by all of P), `row` (constant along
the reduced dims: a reduction result, a per-row statistic) or `scalar`. Tensors from outside the group are loaded
through a map from each of their dims to a dim of P; the strides are runtime arguments, so one source serves every
layout of the same kind, and symbolic sizes stay kernel arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import torch.fx as fx

from flashfx.codegen import pointwise as pw
from flashfx.codegen.pointwise import TL_DTYPES, LOW_PRECISION, compute_dtype

aten = torch.ops.aten

Shape = Tuple[sympy.Expr, ...]
KINDS = ("scalar", "row", "full")  # ordered: a value's kind is the largest of its operands'

# Reductions the generator writes: packet -> (combine, identity for masked lanes)
REDUCTIONS = {aten.sum: "sum", aten.mean: "sum", aten.amax: "max", aten.amin: "min"}
# Views that only add or drop size-1 dims (or broadcast): inside a group they move no data.
UNIT_VIEWS = {aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.expand, aten.detach,
              aten.alias}
COMPARISONS = {aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_and, aten.logical_or,
               aten.logical_not, aten.isnan}
CASTS = {aten._to_copy, torch.ops.prims.convert_element_type}
# Ops that place operands at offsets along one dim: cat, and slice_backward (the gradient of a slice: its input in
# [start, end), zeros elsewhere; RoPE's rotate_half makes four per layer in a backward)
CATS = (aten.cat.default, aten.slice_backward.default)


def read_as_stored(node: fx.Node, members: Any, expr: str) -> str:
    """`expr` (node's value, computed in fp32) rounded to node's 16-bit dtype when the group both stores node and
    reads it: the graph outside reads the rounded value, and what the group derives from it must see the same one,
    or statistics saved for a backward (LayerNorm's mean and rstd of a residual sum) disagree with the stored tensor
    the backward recomputes from. Otherwise `expr` unchanged."""
    dtype = val(node).dtype
    inside = [u in members for u in node.users]
    if dtype in LOW_PRECISION and any(inside) and not all(inside):
        return f"({expr}).to({TL_DTYPES[dtype]}).to(tl.float32)"
    return expr


def cat_operands(node: fx.Node) -> Tuple[List[Any], Any, Any]:
    """(operands, dim, offset of the first operand) of a node in CATS: cat's parts from 0, or slice_backward's one
    operand at its start."""
    if node.target is aten.slice_backward.default:
        return [node.args[0]], node.args[2], node.args[3]
    return list(node.args[0]), (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)), 0


class LoweringError(Exception):
    """The group cannot be generated; the message says why (it becomes the decline reason)."""


# ------------------------------------------------------------------------------------------------------ shapes

def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def sym(d: Any) -> sympy.Expr:
    return sympy.sympify(d.node.expr) if isinstance(d, torch.SymInt) else sympy.Integer(int(d))


def shape_of(node: fx.Node) -> Shape:
    return tuple(sym(d) for d in val(node).shape)


def strides_of(node: fx.Node) -> Shape:
    return tuple(sym(d) for d in val(node).stride())


def nonunit(shape: Sequence[sympy.Expr]) -> List[int]:
    return [i for i, s in enumerate(shape) if s != 1]


def x_dims(P: Shape, rdims: Sequence[int]) -> List[int]:
    return [d for d in nonunit(P) if d not in rdims]


def classify(shape: Shape, P: Shape, rdims: Sequence[int]) -> Optional[str]:
    """'full' if `shape` is P up to size-1 dims, 'row' if it is P without the reduced dims, else None."""
    sizes = [s for s in shape if s != 1]
    if sizes == [P[d] for d in nonunit(P)]:
        return "full"
    if rdims and sizes == [P[d] for d in x_dims(P, rdims)]:
        return "row"
    if not sizes:
        return "scalar"
    return None


def map_to_p(shape: Shape, P: Shape, rdims: Sequence[int], kind: str) -> List[Optional[int]]:
    """For each dim of a value of `kind`, the dim of P it walks (None for size-1 dims)."""
    targets = iter(nonunit(P) if kind == "full" else x_dims(P, rdims))
    return [None if s == 1 else next(targets) for s in shape]


def broadcast_map(in_shape: Shape, out_shape: Shape, out_map: List[Optional[int]]) -> Optional[List[Optional[int]]]:
    """Right-aligned broadcasting of an operand of `in_shape` into an output: each operand dim -> dim of P."""
    offset = len(out_shape) - len(in_shape)
    if offset < 0:
        return None
    result: List[Optional[int]] = []
    for i, s in enumerate(in_shape):
        o = out_shape[offset + i]
        if s == 1:
            result.append(None)
        elif s == o:
            result.append(out_map[offset + i])
        else:
            return None
    return result


def kind_of_map(dmap: Sequence[Optional[int]], rdims: Sequence[int]) -> str:
    mapped = [d for d in dmap if d is not None]
    if not mapped:
        return "scalar"
    return "full" if any(d in rdims for d in mapped) or not rdims else "row"


# --------------------------------------------------------------------------------------------------------- IR

@dataclass
class Value:
    """One SSA value of the kernel."""

    name: str
    op: str                      # "load" | "scalar" | "compute" | "reduce"
    kind: str                    # what its data varies along: "scalar" | "row" | "full"
    dtype: torch.dtype           # dtype of the Triton value (fp16/bf16 only right after an explicit cast)
    expr: str = ""               # compute: the Triton expression; reduce: the combine ("sum" | "max" | "min")
    deps: Tuple[str, ...] = ()
    arg: int = -1                # load: index into Plan.inputs; scalar: index into Plan.scalars
    source: str = ""             # the FX node it comes from, for comments
    mean: bool = False           # reduce: divide by the reduced count


@dataclass
class TensorArg:
    """A tensor the kernel loads or stores: its FX node and how its dims walk P."""

    node: fx.Node
    dmap: Tuple[Optional[int], ...]
    kind: str
    dtype: torch.dtype
    value: str = ""              # output: the Value stored
    # a `cat` operand: (P dim, offset, extent): read at i - offset where offset <= i < offset + extent
    shift: Optional[Tuple[int, int, int]] = None


@dataclass
class Plan:
    name: str
    P: Shape
    rdims: Tuple[int, ...]
    inputs: List[TensorArg] = field(default_factory=list)
    scalars: List[fx.Node] = field(default_factory=list)
    values: List[Value] = field(default_factory=list)
    outputs: List[TensorArg] = field(default_factory=list)
    helpers: List[str] = field(default_factory=list)
    covered: List[str] = field(default_factory=list)
    symbols: List[sympy.Symbol] = field(default_factory=list)
    # how to read each symbol at runtime: ("tensor", input index, dim) or ("scalar", scalar index)
    symbol_sources: List[Tuple] = field(default_factory=list)

    @property
    def is_reduction(self) -> bool:
        return bool(self.rdims)

    def value(self, name: str) -> Value:
        return self._by_name[name]

    def index(self) -> None:
        self._by_name = {v.name: v for v in self.values}


# ------------------------------------------------------------------------------------------------------ lowering

class _Lowerer:
    def __init__(self, name: str, nodes: Sequence[fx.Node], P: Shape, rdims: Sequence[int],
                 find_symbol: Callable[[sympy.Symbol], Optional[fx.Node]],
                 shifted: Sequence[fx.Node] = (), colsums: Sequence[fx.Node] = ()) -> None:
        self.plan = Plan(name, tuple(P), tuple(sorted(rdims)))
        self.colsums = set(colsums)  # sums over the rows: kind "col", reduced across programs by the launcher
        self.members = set(nodes)
        self.nodes = list(nodes)
        self.shifted = set(shifted)  # members only a `cat` reads: lowered inside the cat, once per operand range
        self.env: Dict[fx.Node, str] = {}
        self.loads: Dict[Tuple[fx.Node, Tuple], str] = {}
        self.scalar_vals: Dict[fx.Node, str] = {}
        self.find_symbol = find_symbol

    def new(self, **kw: Any) -> Value:
        v = Value(name=f"v{len(self.plan.values)}", **kw)
        self.plan.values.append(v)
        self.plan._by_name[v.name] = v
        return v

    def node_kind(self, node: fx.Node) -> str:
        kind = classify(shape_of(node), self.plan.P, self.plan.rdims)
        if kind is None:
            raise LoweringError(f"{node.name} has shape {list(shape_of(node))}, outside the group's space "
                                f"{list(self.plan.P)}")
        return kind

    def operand(self, arg: Any, user: fx.Node) -> pw.Operand:
        if isinstance(arg, fx.Node):
            if arg in self.members:
                v = self.plan.value(self.env[arg])
                return self._upcast(v)
            value = val(arg)
            if isinstance(value, torch.Tensor):
                return self._upcast(self.load(arg, user))
            if isinstance(value, (torch.SymInt, torch.SymFloat, int, float)):
                return pw.Operand(self.scalar(arg), torch.int64 if isinstance(value, (int, torch.SymInt))
                                  else torch.float32)
            raise LoweringError(f"argument {arg.name} of {user.name} is a {type(value).__name__}")
        if isinstance(arg, (bool, int, float)):
            return pw.Operand(pw.literal(arg), None, arg)
        if isinstance(arg, (torch.SymInt, torch.SymFloat)):
            raise LoweringError(f"symbolic constant {arg} in {user.name} has no graph node to read it from")
        return pw.Operand(str(arg), None, arg)

    @staticmethod
    def _upcast(v: Value) -> pw.Operand:
        if v.dtype in LOW_PRECISION:
            return pw.Operand(f"{v.name}.to(tl.float32)", torch.float32)
        return pw.Operand(v.name, v.dtype)

    def load(self, node: fx.Node, user: fx.Node) -> Value:
        user_shape = shape_of(user)
        user_map = map_to_p(user_shape, self.plan.P, self.plan.rdims, self.node_kind(user))
        dmap = broadcast_map(shape_of(node), user_shape, user_map)
        if dmap is None:
            raise LoweringError(f"{node.name} {list(shape_of(node))} does not broadcast into {user.name}")
        key = (node, tuple(dmap))
        if key not in self.loads:
            dtype = val(node).dtype
            if dtype not in TL_DTYPES:
                raise LoweringError(f"{node.name} has dtype {dtype}, which the generator does not load")
            idx = len(self.plan.inputs)
            kind = kind_of_map(dmap, self.plan.rdims)
            self.plan.inputs.append(TensorArg(node, tuple(dmap), kind, dtype))
            self.loads[key] = self.new(op="load", kind=kind, dtype=dtype, arg=idx, source=node.name).name
        return self.plan.value(self.loads[key])

    def scalar(self, node: fx.Node) -> str:
        if node not in self.scalar_vals:
            idx = len(self.plan.scalars)
            self.plan.scalars.append(node)
            is_int = isinstance(val(node), (int, torch.SymInt))
            self.scalar_vals[node] = self.new(op="scalar", kind="scalar", dtype=torch.int64 if is_int else
                                              torch.float32, arg=idx, source=node.name).name
        return self.scalar_vals[node]

    def lower(self) -> Plan:
        self.plan.index()
        for node in self.nodes:
            self.plan.covered.append(node.format_node())
            if node in self.shifted:
                continue
            packet = node.target.overloadpacket
            if node.target in CATS:
                self.env[node] = self.cat(node)
            elif packet in UNIT_VIEWS:
                self.env[node] = self.plan.value(self.env[node.args[0]]).name if node.args[0] in self.members \
                    else self.load_own(node.args[0]).name
            elif node in self.colsums:
                self.env[node] = self.column_sum(node)
            elif packet in REDUCTIONS:
                self.env[node] = self.reduction(node, packet)
            elif pw.is_pointwise(node.target):
                self.env[node] = self.compute(node, packet)
            else:
                raise LoweringError(f"no Triton codegen for {node.target}")
            self.plan.index()
        self.outputs()
        self.resolve_symbols()
        self.plan.index()
        return self.plan

    def cat(self, node: fx.Node) -> str:
        """`cat` along one dim: each lane picks the operand whose range holds its index, read shifted.
        `slice_backward`: its one operand over [start, start + extent), zero elsewhere."""
        if self.plan.rdims:
            raise LoweringError(f"{node.name}: {node.target.__name__} inside a reduction group is not generated")
        out_shape = shape_of(node)
        parts, dim, start = cat_operands(node)
        d = dim % len(out_shape)
        out_map = map_to_p(out_shape, self.plan.P, self.plan.rdims, "full")
        pd = out_map[d]
        if pd is None:
            raise LoweringError(f"{node.name} places operands along a size-1 dim")
        pieces, lo = [], start
        for t in parts:
            size = shape_of(t)[d]
            if not size.is_Integer:
                raise LoweringError(f"{node.name}: an operand of symbolic extent {size}")
            pieces.append((lo, int(size), self.shifted_value(t, out_map, (pd, lo, int(size)))))
            lo += int(size)
        if node.target is aten.slice_backward.default:
            (lo, size, name), = pieces
            expr = f"tl.where((i{pd} >= {lo}) & (i{pd} < {lo + size}), {name}, 0.0)"
        else:
            expr = pieces[-1][2]
            for begin, size, name in reversed(pieces[:-1]):
                expr = f"tl.where(i{pd} < {begin + size}, {name}, {expr})"
        dtype = max((self.plan.value(n).dtype for _, _, n in pieces), key=lambda t: t.is_floating_point)
        return self.new(op="compute", kind="full", dtype=dtype, expr=expr, deps=tuple(n for _, _, n in pieces),
                        source=node.name).name

    def shifted_value(self, node: fx.Node, out_map: List[Optional[int]], shift: Tuple[int, int, int]) -> str:
        """The value of cat operand `node` (an outside tensor, or a pointwise member only the cat reads)."""
        if node not in self.shifted:
            return self.shifted_load(node, shape_of(node), out_map, shift).name
        operands = []
        for a in node.args:
            if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor):
                name = self.shifted_value(a, out_map, shift) if a in self.shifted else \
                    self.shifted_load(a, shape_of(node), out_map, shift).name
                operands.append(self._upcast(self.plan.value(name)))
            else:
                operands.append(self.operand(a, node))
        kwargs = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
        expr = pw.render(node.target, operands, kwargs, self.plan.helpers)
        dtype = compute_dtype(val(node).dtype)
        if node.target.overloadpacket in CASTS:
            dtype = val(node).dtype
            expr = f"({expr}).to({TL_DTYPES[dtype]})"
        deps = tuple(o.expr.split(".")[0] for o in operands if o.dtype is not None)
        return self.new(op="compute", kind="full", dtype=dtype, expr=expr, deps=deps,
                        source=f"{node.name} (cat operand)").name

    def shifted_load(self, node: fx.Node, user_shape: Shape, out_map: List[Optional[int]],
                     shift: Tuple[int, int, int]) -> Value:
        dmap = broadcast_map(shape_of(node), user_shape, out_map) if len(user_shape) == len(out_map) else None
        if dmap is None:
            raise LoweringError(f"{node.name} {list(shape_of(node))} does not broadcast into the cat operand")
        key = (node, tuple(dmap), shift)
        if key not in self.loads:
            idx = len(self.plan.inputs)
            self.plan.inputs.append(TensorArg(node, tuple(dmap), "full", val(node).dtype, shift=shift))
            self.loads[key] = self.new(op="load", kind="full", dtype=val(node).dtype, arg=idx,
                                       source=node.name).name
        return self.plan.value(self.loads[key])

    def compute(self, node: fx.Node, packet: Any) -> str:
        operands = [self.operand(a, node) for a in node.args]
        kwargs = {k: (self.operand(v, node) if isinstance(v, fx.Node) else v) for k, v in node.kwargs.items()}
        expr = pw.render(node.target, operands, kwargs, self.plan.helpers)
        out_dtype = val(node).dtype
        if out_dtype not in TL_DTYPES:
            raise LoweringError(f"{node.name} computes dtype {out_dtype}")
        deps = tuple(o.expr.split(".")[0] for o in list(operands) + list(kwargs.values())
                     if isinstance(o, pw.Operand) and o.dtype is not None)
        kind = max((self.plan.value(d).kind for d in deps), key=KINDS.index, default="scalar")
        if packet in CASTS:
            dtype = out_dtype
            expr = f"({expr}).to({TL_DTYPES[out_dtype]})"
        elif packet in COMPARISONS and out_dtype == torch.bool:
            dtype = torch.bool
        else:
            dtype = compute_dtype(out_dtype)
            if not (dtype == torch.float32 and all(o.dtype in (torch.float32, None) for o in operands)):
                expr = f"({expr}).to({TL_DTYPES[dtype]})"
            expr = read_as_stored(node, self.members, expr)
        return self.new(op="compute", kind=kind, dtype=dtype, expr=expr, deps=deps, source=node.name).name

    def reduction(self, node: fx.Node, packet: Any) -> str:
        src = node.args[0]
        if classify(shape_of(src), self.plan.P, self.plan.rdims) != "full":
            raise LoweringError(f"{node.name} reduces {src.name}, which is not over the group's whole space")
        operand = self._upcast(self.plan.value(self.env[src]) if src in self.members else self.load_own(src))
        out_dtype = val(node).dtype
        if packet in (aten.amax, aten.amin) and not out_dtype.is_floating_point:
            raise LoweringError(f"{node.name}: integer max/min reductions are not generated")
        acc = torch.float64 if out_dtype == torch.float64 else (torch.float32 if out_dtype.is_floating_point
                                                                   else torch.int64)
        src_name = operand.expr.split(".")[0]
        if operand.expr != src_name:  # accumulate the fp32 upcast, not the fp16/bf16 load
            src_name = self.new(op="compute", kind=self.plan.value(src_name).kind, dtype=operand.dtype,
                                expr=operand.expr, deps=(src_name,), source=f"{src.name} (fp32)").name
        deps = (src_name,)
        v = self.new(op="reduce", kind="row", dtype=acc, expr=REDUCTIONS[packet], deps=deps, source=node.name,
                     mean=packet is aten.mean)
        return v.name

    def column_sum(self, node: fx.Node) -> str:
        src = node.args[0]
        # a value of the group, or a tensor it reads (a norm's bias gradient beside its backward)
        value = self.plan.value(self.env[src]) if src in self.members else self.load_own(src)
        if value.kind != "full":
            raise LoweringError(f"{node.name}: a column sum must reduce a full value of its group")
        operand = self._upcast(value)
        return self.new(op="colsum", kind="col", dtype=torch.float32, expr=operand.expr,
                        deps=(operand.expr.split(".")[0],), source=node.name).name

    def load_own(self, node: fx.Node) -> Value:
        """Load an outside tensor by its own shape (it is P, or P's rows, up to size-1 dims)."""
        kind = classify(shape_of(node), self.plan.P, self.plan.rdims)
        if kind is None:
            raise LoweringError(f"{node.name} {list(shape_of(node))} is outside the group's space")
        dmap = map_to_p(shape_of(node), self.plan.P, self.plan.rdims, kind) if kind != "scalar" else \
            [None] * len(shape_of(node))
        key = (node, tuple(dmap))
        if key not in self.loads:
            idx = len(self.plan.inputs)
            self.plan.inputs.append(TensorArg(node, tuple(dmap), kind_of_map(dmap, self.plan.rdims), val(node).dtype))
            self.loads[key] = self.new(op="load", kind=kind_of_map(dmap, self.plan.rdims), dtype=val(node).dtype,
                                       arg=idx, source=node.name).name
            self.plan.index()
        return self.plan.value(self.loads[key])

    def outputs(self) -> None:
        for node in self.nodes:
            if all(u in self.members for u in node.users):
                continue
            if node in self.colsums:  # partials [programs, rnumel]; the launcher sums them
                self.plan.outputs.append(TensorArg(node, (), "col", val(node).dtype, value=self.env[node]))
                continue
            kind = self.node_kind(node)
            dmap = map_to_p(shape_of(node), self.plan.P, self.plan.rdims, kind)
            dtype = val(node).dtype
            self.plan.outputs.append(TensorArg(node, tuple(dmap), kind, dtype, value=self.env[node]))

    def resolve_symbols(self) -> None:
        exprs = list(self.plan.P)
        for out in self.plan.outputs:
            exprs += list(shape_of(out.node)) + list(strides_of(out.node))
        symbols = sorted(set().union(*[e.free_symbols for e in exprs]), key=str) if exprs else []
        for s in symbols:
            source = None
            for i, t in enumerate(self.plan.inputs):
                for d, size in enumerate(shape_of(t.node)):
                    if size == s:
                        source = ("tensor", i, d)
                        break
                if source:
                    break
            if source is None:
                for i, n in enumerate(self.plan.scalars):
                    if isinstance(val(n), torch.SymInt) and sym(val(n)) == s:
                        source = ("scalar", i)
            if source is None:
                node = self.find_symbol(s)
                if node is None:
                    raise LoweringError(f"size {s} is not readable from the group's inputs")
                self.scalar(node)
                source = ("scalar", len(self.plan.scalars) - 1)
            self.plan.symbols.append(s)
            self.plan.symbol_sources.append(source)


def lower_group(name: str, nodes: Sequence[fx.Node], P: Shape, rdims: Sequence[int],
                find_symbol: Callable[[sympy.Symbol], Optional[fx.Node]] = lambda s: None,
                shifted: Sequence[fx.Node] = (), colsums: Sequence[fx.Node] = ()) -> Plan:
    """Lower `nodes` (in graph order) iterating over `P`, reducing `rdims`, into a Plan. `shifted` members are
    pointwise ops that only a `cat` in the group reads (they are computed per cat operand range)."""
    return _Lowerer(name, nodes, P, rdims, find_symbol, shifted, colsums).lower()
