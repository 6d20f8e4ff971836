"""SVG drawing of an FX graph through Graphviz: one box per tensor-valued node, labelled with its name, the op it
calls and its dtype[shape] (symbolic sizes by their readable names); the full node in each box's tooltip.

Graphviz is optional: the `graphviz` Python package and the `dot` program of the system package `graphviz`.
Without them `to_svg` raises `GraphvizMissing` saying what to install.

Example::

    >>> import torch
    >>> from flashfx.rewriter.draw import graphviz_available, to_svg
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 3))
    >>> svg = to_svg(gm) if graphviz_available() else "<svg/>"
    >>> svg.lstrip().startswith(("<?xml", "<svg", "<!DOCTYPE"))
    True
"""
from __future__ import annotations

import importlib
import shutil
from typing import Any, Dict, Optional

import sympy
import torch
import torch.fx as fx

from flashfx.rewriter.cost import node_value
from flashfx.rewriter.onnx_export import pretty_input_name

INSTALL_HINT = ("SVG output needs Graphviz: install the Python package (pip install graphviz) and the system "
                "package that provides the `dot` program (apt-get install graphviz, brew install graphviz or "
                "conda install graphviz)")

_FILL = {"input": "#dbeafe", "parameter": "#e5e7eb", "flashfx": "#fdba74", "call": "#ffffff", "output": "#bbf7d0"}


class GraphvizMissing(RuntimeError):
    """Graphviz (the Python package or the `dot` program) is not installed."""


def require_graphviz() -> Any:
    """The `graphviz` module, or `GraphvizMissing` naming what is not installed and how to install it."""
    try:
        module = importlib.import_module("graphviz")
    except ImportError:
        raise GraphvizMissing(f"the Python package 'graphviz' is not installed. {INSTALL_HINT}") from None
    if shutil.which("dot") is None:
        raise GraphvizMissing(f"the Graphviz program 'dot' is not on PATH. {INSTALL_HINT}")
    return module


def graphviz_available() -> bool:
    try:
        require_graphviz()
    except GraphvizMissing:
        return False
    return True


def to_svg(gm: fx.GraphModule, symbol_names: Optional[Dict[sympy.Symbol, sympy.Symbol]] = None,
           title: str = "") -> str:
    """The graph of `gm` as SVG text. `symbol_names` renames size symbols (s72 -> B) in the shapes shown."""
    graphviz = require_graphviz()
    if symbol_names is None:
        from flashfx.rewriter.capture import name_symbols

        symbol_names = name_symbols(gm)
    dot = graphviz.Digraph(name=title or "graph", graph_attr={"rankdir": "TB", "label": title, "labelloc": "t",
                                                                "fontname": "Helvetica"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                      "fontsize": "10"},
                           edge_attr={"arrowsize": "0.6"})
    drawn = set()
    for node in gm.graph.nodes:
        value = node_value(node)
        known = node.op == "placeholder" or "val" in node.meta or "example_value" in node.meta
        if node.op != "output" and known and not _tensors(value):
            continue  # sizes (B, S, B*S) and side-effect calls: shown as arguments in the tooltips instead
        kind = _kind(node)
        label = pretty_input_name(str(node.target)) if node.op == "placeholder" else node.name
        lines = [f"<b>{_esc(label)}</b>"]
        if node.op not in ("placeholder", "output"):
            lines.append(_esc(_target_name(node)))
        lines.extend(_esc(_describe_value(v, symbol_names)) for v in _tensors(value)[:4])
        dot.node(node.name, label="<" + "<br/>".join(lines) + ">", fillcolor=_FILL[kind],
                 tooltip=node.format_node()[:500])
        drawn.add(node.name)
        for arg in node.all_input_nodes:
            if arg.name in drawn:
                dot.edge(arg.name, node.name)
    try:
        svg = dot.pipe(format="svg")
    except graphviz.ExecutableNotFound:
        raise GraphvizMissing(f"the Graphviz program 'dot' could not be run. {INSTALL_HINT}") from None
    return svg.decode("utf-8")


def _tensors(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _kind(node: fx.Node) -> str:
    if node.op == "output":
        return "output"
    if node.op in ("placeholder", "get_attr"):
        return "parameter" if any(t in str(node.target) for t in ("_parameters_", "_buffers_")) \
            or node.op == "get_attr" else "input"
    if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
            str(node.target).startswith("flashfx."):
        return "flashfx"
    return "call"


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if isinstance(node.target, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(node.target)  # module path, or "flashfx.attention.default"
    return getattr(node.target, "__name__", None) or str(node.target)


def _describe_value(value: torch.Tensor, names: Dict[sympy.Symbol, sympy.Symbol]) -> str:
    dims = []
    for d in value.shape:
        dims.append(str(d.node.expr.xreplace(names)) if isinstance(d, torch.SymInt) else str(int(d)))
    return f"{str(value.dtype).removeprefix('torch.')}[{', '.join(dims)}]"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
