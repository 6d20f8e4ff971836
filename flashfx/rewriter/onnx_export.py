"""ONNX export of a torch-level FX graph, for looking at (Netron, `onnx.checker`), not for running.

Standard ops become ONNX ops only where the mapping is exact in meaning (MatMul, Add, Softmax, LayerNormalization,
Reshape, ...), with a Cast inserted where torch would promote dtypes. Everything else stays one node in a custom
domain: `flashfx` for `torch.ops.flashfx.*`, `torch` for other ATen / torch functions and Tensor methods, with the
call's non-tensor arguments as attributes. Every tensor carries its dtype and shape; symbolic sizes become
`dim_param` names ("B", "S", "B*S"). Graph placeholders, parameters included, are graph inputs: no weights are stored,
so the file stays small whatever the model size.

This module walks the graph (inputs, constants, size expressions, outputs, custom nodes); the table of exact
mappings and their converters is `flashfx.rewriter.onnx_ops`.

Example::

    >>> import onnx, torch
    >>> from flashfx.rewriter.capture import capture
    >>> g = capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))[0]
    >>> model = to_onnx(g.gm, g.symbol_names)
    >>> onnx.checker.check_model(model, full_check=True)
    >>> [n.op_type for n in model.graph.node]
    ['Transpose', 'MatMul', 'Add']
    >>> [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    ['B', 3]
"""
from __future__ import annotations

import inspect
import operator
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import onnx
import sympy
import torch
import torch.fx as fx
from onnx import TensorProto, helper

from flashfx.rewriter.cost import node_value
from flashfx.rewriter.onnx_ops import _EXACT, _ONNX_DTYPES, _key, _NotExact

OPSET = 20  # Gelu arrived in 20; LayerNormalization (17) and ReduceMean with an axes input (18) are older.
FLASHFX_DOMAIN = "flashfx"
TORCH_DOMAIN = "torch"
# Constants up to this many elements are stored with their data (scalars, small index tables); larger ones are
# graph inputs like the parameters, so that a dump never carries weights.
_MAX_STORED_CONSTANT = 64


class _Scalar:
    """A non-tensor value computed in the graph (a symbolic size): shown as an expression, never an ONNX value."""

    def __init__(self, text: str) -> None:
        self.text = text


def to_onnx(gm: fx.GraphModule, symbol_names: Optional[Dict[sympy.Symbol, sympy.Symbol]] = None,
            name: str = "flashfx") -> onnx.ModelProto:
    """The graph `gm` as an ONNX model that `onnx.checker.check_model(..., full_check=True)` accepts.

    `symbol_names` maps the graph's size symbols to readable ones (`CapturedGraph.symbol_names`); by default they
    are named from the placeholders (dim 0 -> B, dim 1 -> S). Nodes need `meta['val']` (fake tensors) for shapes.
    """
    if symbol_names is None:
        from flashfx.rewriter.capture import name_symbols  # same package; imported late to keep this module light

        symbol_names = name_symbols(gm)
    return _Exporter(gm, dict(symbol_names), name).run()


# ---------------------------------------------------------------------------------------------------- exporter

class _Exporter:
    def __init__(self, gm: fx.GraphModule, symbol_names: Dict[sympy.Symbol, sympy.Symbol], name: str) -> None:
        self.gm = gm
        self.symbol_names = symbol_names
        self.name = name
        self.nodes: List[onnx.NodeProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.value_info: List[onnx.ValueInfoProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.values: Dict[fx.Node, Any] = {}  # fx node -> ONNX value name, list of names (tuples), or _Scalar
        self.taken: set = set()  # value names
        self.node_names: set = set()
        self.domains: set = set()
        # Where each size symbol can be read at run time: (graph input, dim), and the 1-element int64 tensors
        # already built for size expressions, with the index of the first node that builds them.
        self.size_sources: Dict[sympy.Symbol, Tuple[str, int]] = {}
        self.size_values: Dict[sympy.Expr, Tuple[str, int]] = {}

    # ------------------------------------------------------------------ naming, types, constants

    def fresh(self, base: str, taken: Optional[set] = None) -> str:
        taken = self.taken if taken is None else taken
        base = re.sub(r"[^A-Za-z0-9_.:/#-]", "_", base) or "v"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}#{k}"  # '#' never occurs in fx names, so a suffixed name cannot take a later node's
        taken.add(name)
        return name

    def dim(self, d: Any) -> Any:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            if expr.is_number:
                return int(expr)
            return str(expr.xreplace(self.symbol_names))
        return int(d)

    def expr(self, value: Any) -> str:
        """Text of a non-tensor argument: symbolic sizes by their readable names."""
        if isinstance(value, fx.Node):
            v = self.values.get(value)
            if isinstance(v, _Scalar):
                return v.text
            return value.name
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return str(value.node.expr.xreplace(self.symbol_names))
        if isinstance(value, (list, tuple)):
            inner = ", ".join(self.expr(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
        if isinstance(value, slice):
            parts = [("" if p is None else self.expr(p)) for p in (value.start, value.stop, value.step)]
            return ":".join(parts[:2]) + (f":{parts[2]}" if value.step is not None else "")
        if value is Ellipsis:
            return "..."
        return str(value)

    def vinfo(self, name: str, val: Any) -> Optional[onnx.ValueInfoProto]:
        if not isinstance(val, torch.Tensor):
            return None
        elem = _ONNX_DTYPES.get(val.dtype, TensorProto.UNDEFINED)
        return helper.make_tensor_value_info(name, elem, [self.dim(d) for d in val.shape])

    def const(self, value: Any, dtype: torch.dtype, hint: str) -> str:
        """A stored constant tensor of `dtype`; raises _NotExact when `value` does not survive the conversion."""
        if dtype not in _ONNX_DTYPES:
            raise _NotExact
        t = torch.tensor(value, dtype=dtype)
        # torch computes fp32 ops with the scalar rounded to fp32 too, but fp16/bf16 ops in fp32 ("opmath"):
        # a scalar such as 0.1 that fp16/bf16 cannot hold would make ONNX compute with another number.
        exact_in = torch.float32 if dtype in (torch.float32, torch.float64) else torch.float64
        if not torch.equal(t.to(torch.float64), torch.tensor(value, dtype=exact_in).to(torch.float64)):
            raise _NotExact
        name = self.fresh(hint)
        flat = t.reshape(-1)
        vals = flat.to(torch.float32).tolist() if dtype in (torch.float16, torch.bfloat16) else flat.tolist()
        self.initializers.append(helper.make_tensor(name, _ONNX_DTYPES[dtype], list(t.shape), vals))
        return name

    def ints(self, values: Sequence[int], hint: str) -> str:
        return self.const([int(v) for v in values], torch.int64, hint)

    def shape(self, dims: Sequence[Any], hint: str) -> str:
        """A 1-D int64 tensor holding `dims`; symbolic sizes are read from the graph inputs' shapes at run time."""
        if all(not isinstance(d, torch.SymInt) or d.node.expr.is_number for d in dims):
            return self.ints([int(d) for d in dims], hint)
        parts = [self.size(d.node.expr) if isinstance(d, torch.SymInt) and not d.node.expr.is_number
                 else self.ints([int(d)], f"{hint}/{i}") for i, d in enumerate(dims)]
        name = self.fresh(hint)
        self.emit("Concat", parts, [name], hint, axis=0)
        return name

    def size(self, expr: sympy.Expr) -> str:
        """A 1-element int64 tensor with the value of the size expression `expr` (a symbol, sums and products)."""
        if expr in self.size_values:
            return self.size_values[expr][0]
        first = len(self.nodes)
        label = str(expr.xreplace(self.symbol_names))
        name = self.fresh(f"size:{label}")
        if expr.is_Symbol:
            if expr not in self.size_sources:
                raise _NotExact  # e.g. an unbacked size: nothing in the graph's inputs holds it
            source, dim = self.size_sources[expr]
            self.emit("Shape", [source], [name], f"size:{label}", start=dim, end=dim + 1)
        elif expr.is_Integer:
            self.initializers.append(helper.make_tensor(name, TensorProto.INT64, [1], [int(expr)]))
        elif expr.is_Mul or expr.is_Add:
            terms = [self.size(t) for t in expr.args]
            acc = terms[0]
            for k, t in enumerate(terms[1:]):
                out = name if k == len(terms) - 2 else self.fresh(f"size:{label}/{k}")
                self.emit("Mul" if expr.is_Mul else "Add", [acc, t], [out], out)
                acc = out
        else:
            raise _NotExact  # floor division, min/max, ...: not worth a Shape program
        self.value_info.append(helper.make_tensor_value_info(name, TensorProto.INT64, [1]))
        self.size_values[expr] = (name, first)
        return name

    def emit(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
             domain: str = "", doc: str = "", **attrs: Any) -> None:
        if domain:
            self.domains.add(domain)
        node = helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(name, self.node_names), domain=domain,
                                **{k: v for k, v in attrs.items() if v is not None})
        if doc:
            node.doc_string = doc
        self.nodes.append(node)

    # ------------------------------------------------------------------ the walk

    def run(self) -> onnx.ModelProto:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.placeholder(node)
            elif node.op == "get_attr":
                self.get_attr(node)
            elif node.op == "output":
                self.output(node)
            else:
                self.call(node)
        graph = helper.make_graph(self.nodes, _graph_name(self.name), self.inputs, self.outputs,
                                  initializer=self.initializers, value_info=self.value_info)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="flashfx",
                                  doc_string="flashfx graph export for inspection; parameters are inputs, no weights")
        if self.symbol_names:
            helper.set_model_props(model, {"flashfx.symbols": ", ".join(
                f"{v}={k}" for k, v in sorted(self.symbol_names.items(), key=lambda kv: str(kv[1])))})
        return model

    def placeholder(self, node: fx.Node) -> None:
        val = node_value(node)
        if val is None and "val" not in node.meta and "example_value" not in node.meta:
            # A graph traced without metadata: an input of unknown dtype and shape.
            name = self.fresh(pretty_input_name(str(node.target)))
            self.values[node] = name
            info = helper.make_tensor_value_info(name, TensorProto.UNDEFINED, ["?"])
            info.doc_string = "dtype and shape unknown: the FX node has no metadata"
            self.inputs.append(info)
            return
        if not isinstance(val, torch.Tensor):
            self.values[node] = _Scalar(self.expr(val) if val is not None else node.name)
            return
        name = self.fresh(pretty_input_name(str(node.target)))
        self.values[node] = name
        for i, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                self.size_sources.setdefault(d.node.expr, (name, i))
        info = self.vinfo(name, val)
        if any(tag in str(node.target) for tag in ("_parameters_", "_buffers_")):
            info.doc_string = "parameter (weights are not stored in this export)"
        self.inputs.append(info)

    def get_attr(self, node: fx.Node) -> None:
        value = _fetch_attr(self.gm, str(node.target))
        if not isinstance(value, torch.Tensor):
            self.values[node] = _Scalar(node.name)
            return
        if value.numel() <= _MAX_STORED_CONSTANT and value.dtype in _ONNX_DTYPES and not value.is_meta:
            try:
                self.values[node] = self.const(value.detach().cpu().tolist(), value.dtype, node.name)
                return
            except _NotExact:
                pass
        name = self.fresh(node.name)
        self.values[node] = name
        info = self.vinfo(name, node_value(node) if node_value(node) is not None else value)
        info.doc_string = "constant (data not stored in this export)"
        self.inputs.append(info)

    def output(self, node: fx.Node) -> None:
        seen = set()
        for i, leaf in enumerate(_leaves(node.args[0] if node.args else ())):
            if not isinstance(leaf, fx.Node) or not isinstance(self.values.get(leaf), str):
                continue
            name = self.values[leaf]
            val = node_value(leaf)
            if name in seen or any(v.name == name for v in self.inputs) or name in _initializer_names(self):
                # An ONNX graph output must be a distinct value produced in the graph.
                alias = self.fresh(f"output_{i}")
                self.emit("Identity", [name], [alias], f"output_{i}")
                name = alias
            seen.add(name)
            self.value_info = [v for v in self.value_info if v.name != name]
            if isinstance(val, torch.Tensor):
                info = self.vinfo(name, val)
            else:  # ONNX wants a type and a rank for every graph output: say plainly that they are unknown
                info = helper.make_tensor_value_info(name, TensorProto.UNDEFINED, ["?"])
                info.doc_string = "dtype and shape unknown: the FX node has no metadata"
            self.outputs.append(info)

    def call(self, node: fx.Node) -> None:
        val = node_value(node)
        if node.target is operator.getitem and isinstance(self.values.get(node.args[0]), list):
            # Selecting one result of a multi-output node: no ONNX node, just its output's name.
            picked = self.values[node.args[0]][node.args[1]]
            self.values[node] = picked if picked is not None else _Scalar(node.name)
            return
        if val is None and "val" not in node.meta and "example_value" not in node.meta:
            if not node.users:  # grad-mode switches, API-usage logging: calls for their side effect only
                self.values[node] = _Scalar(node.name)
                return
            val = _propagate(node)  # a node a pass added without metadata: compute it from its inputs
        if not _tensor_leaves(val) and val is not _UNKNOWN:
            # Size arithmetic (sym_size, s0 * s1) and side-effect calls: no tensor flows, nothing to draw.
            self.values[node] = _Scalar(self.expr(val) if val is not None else node.name)
            return
        outputs = self.output_names(node, val)
        handler = _EXACT.get(_key(node))
        if handler is not None and val is not _UNKNOWN:
            checkpoint = (len(self.nodes), len(self.initializers), len(self.value_info))
            try:
                handler(self, node, outputs[0] if len(outputs) == 1 else outputs)
                self.add_value_info(node, val, outputs)
                return
            except _NotExact:
                del self.nodes[checkpoint[0]:], self.initializers[checkpoint[1]:], self.value_info[checkpoint[2]:]
                self.size_values = {k: v for k, v in self.size_values.items() if v[1] < checkpoint[0]}
        self.custom(node, outputs)
        if val is not _UNKNOWN:
            self.add_value_info(node, val, outputs)

    def output_names(self, node: fx.Node, val: Any) -> List[str]:
        if isinstance(val, (tuple, list)):
            names = [self.fresh(f"{node.name}.{i}") if isinstance(v, torch.Tensor) else None
                     for i, v in enumerate(val)]
            self.values[node] = names
            return [n or "" for n in names]
        name = self.fresh(node.name)
        self.values[node] = name
        return [name]

    def add_value_info(self, node: fx.Node, val: Any, outputs: List[str]) -> None:
        vals = list(val) if isinstance(val, (tuple, list)) else [val]
        for name, v in zip(outputs, vals):
            info = self.vinfo(name, v) if name else None
            if info is not None:
                self.value_info.append(info)

    def ref(self, arg: Any) -> str:
        """The ONNX name of a tensor argument."""
        if isinstance(arg, fx.Node) and isinstance(self.values.get(arg), str):
            return self.values[arg]
        raise _NotExact

    # ------------------------------------------------------------------ custom-domain nodes

    def custom(self, node: fx.Node, outputs: List[str]) -> None:
        domain, op_type, qualname, arg_names, tensor_args = _describe(node)
        inputs: List[str] = []
        attrs: Dict[str, Any] = {}

        def add(arg_name: str, value: Any, is_tensor_arg: Optional[bool]) -> None:
            leaves = list(_leaves(value)) if isinstance(value, (list, tuple)) else [value]
            tensors = [v for v in leaves if isinstance(v, fx.Node) and isinstance(self.values.get(v), str)]
            inputs.extend(self.values[t] for t in tensors)
            if tensors and len(tensors) == len(leaves):
                return
            if tensors:  # e.g. x[idx, :]: the tensors are inputs and the whole argument is spelled out
                attrs[arg_name] = self.expr(value)
            elif value is None and is_tensor_arg:
                inputs.append("")  # an omitted optional tensor keeps the positions of those after it
            elif value is not None:
                attrs[arg_name] = self.attribute(value)

        for i, arg in enumerate(node.args):
            name = arg_names[i] if i < len(arg_names) else f"arg{i}"
            add(name, arg, name in tensor_args)
        for key, arg in node.kwargs.items():
            add(key, arg, key in tensor_args)
        while inputs and inputs[-1] == "":
            inputs.pop()
        doc = f"{qualname}: {node.format_node()}"
        self.emit(op_type, inputs, outputs, node.name, domain=domain, doc=doc[:400], **attrs)

    def attribute(self, value: Any) -> Any:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, (int, float, str)):
            return value
        if isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value] if any(isinstance(v, float) for v in value) else [int(v) for v in value]
        return self.expr(value)


_UNKNOWN = object()


def _propagate(node: fx.Node) -> Any:
    """The fake value of a node without metadata, run on its inputs' fake values; `_UNKNOWN` if that fails."""
    from torch._guards import detect_fake_mode

    def value(a: Any) -> Any:
        return node_value(a) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    mode = detect_fake_mode([v for v in _leaves((args, kwargs)) if isinstance(v, torch.Tensor)])
    if mode is None or node.op not in ("call_function", "call_method"):
        return _UNKNOWN
    try:
        with mode:
            fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
            result = fn(*args[1:], **kwargs) if node.op == "call_method" else fn(*args, **kwargs)
    except Exception:  # any failure only costs the shapes in the drawing
        return _UNKNOWN
    node.meta["val"] = result
    return result


# ---------------------------------------------------------------------------------------------------- helpers

def _graph_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "graph"


def _initializer_names(ex: _Exporter) -> set:
    return {t.name for t in ex.initializers}


def pretty_input_name(target: str) -> str:
    """`L_self_modules_layers_modules_0_modules_attn_parameters_weight_` -> `self.layers.0.attn.weight`."""
    name = re.sub(r"^[Ll]_(kwargs_)?", "", target).rstrip("_")  # model(**inputs) inputs are L_kwargs_<name>_
    name = re.sub(r"_(modules|parameters|buffers)_", ".", name)
    return name or target


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _leaves(value: Any):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _tensor_leaves(val: Any) -> List[torch.Tensor]:
    return [v for v in _leaves(val) if isinstance(v, torch.Tensor)]


def _describe(node: fx.Node) -> Tuple[str, str, str, List[str], set]:
    """(domain, op_type, qualified name, positional argument names, names of tensor-typed arguments)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", target)
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        domain = FLASHFX_DOMAIN if ns == "flashfx" else TORCH_DOMAIN if ns in ("aten", "prims") else ns
        overload = target._overloadname
        op_type = target._opname if overload == "default" else f"{target._opname}_{overload}"
        args = target._schema.arguments
        tensor_args = {a.name for a in args if "Tensor" in str(a.type)}
        return domain, op_type, str(target), [a.name for a in args if not a.kwarg_only], tensor_args
    if node.op == "call_method":
        return TORCH_DOMAIN, str(target), f"torch.Tensor.{target}", ["self"], {"self"}
    if node.op == "call_module":
        module = _fetch_attr(node.graph.owning_module, str(target)) if node.graph.owning_module else None
        return TORCH_DOMAIN, type(module).__name__ if module is not None else str(target), str(target), [], set()
    name = getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", None) or ("operator" if target in _OPERATORS else "torch")
    if target is operator.getitem:
        return TORCH_DOMAIN, name, "operator.getitem", ["self", "index"], {"self"}  # x[index]
    try:
        params = [p.name for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # builtins such as torch.softmax have no Python signature
        params = []
    return TORCH_DOMAIN, name, f"{module}.{name}", params, set()


_OPERATORS = {getattr(operator, n) for n in dir(operator) if not n.startswith("_")}
