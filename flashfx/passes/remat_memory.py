"""The memory side of remat: what the forward's saved activations cost and how they are stored.

`_bytes_of` sizes a node's tensors at the example sizes, `_peak` predicts the peak bytes a forward/backward pair
allocates (the forward's live values, then the saved activations, each freed at its last use in the backward, plus
the backward's live values, with views sharing their producer's memory: `rewriter.aliasing`), which `remat` uses to
compare plans and to pick the "auto" budget. `_compress_fp8` rewrites an extracted forward/backward pair so the chosen saved activations cross
over as float8_e4m3fn with a float32 per-tensor scale (`remat_compress="fp8"`). Choosing what to save and building
the two graphs stays in `remat.py`; the solver is `remat_plan.py`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import is_sym_node

from flashfx.rewriter import cost as cost_model
from flashfx.rewriter.aliasing import shares_storage

aten = torch.ops.aten

FP8_MAX = 448.0               # largest finite float8_e4m3fn


# ------------------------------------------------------------------------------------------------- memory model

def _bytes_of(node: fx.Node) -> int:
    """Bytes of a node's tensors at the example sizes (a symbolic size without an example value counts 1024)."""
    total = 0
    for t in pytree.tree_leaves(node.meta.get("val")):
        if isinstance(t, torch.Tensor):
            total += math.prod(_size_hint(d) for d in t.shape) * t.element_size()
    return total


def _size_hint(d: Any) -> int:
    hint = cost_model.size_hint(d)
    return 1024 if hint is None else hint


def _saved_outputs(fw: fx.GraphModule, num_fwd_outputs: int) -> List[fx.Node]:
    outs = list(fw.graph.find_nodes(op="output")[0].args[0])[num_fwd_outputs:]
    return [o for o in outs if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)]


def _peak(fw: fx.GraphModule, bw: fx.GraphModule) -> int:
    """Predicted peak bytes allocated by the step's graphs beyond their inputs: the forward's live values, then the
    saved activations plus the backward's live values. The compiled backward takes its inputs boxed and drops each
    one after its last use (`_compat.boxed_graph_module`; autograd hands them over), so a saved activation is freed
    where the backward last reads it, not at the end of the step."""
    return max(_live_peak(fw), _live_peak(bw, owned_inputs=_owned_inputs(bw)))


def _owned_inputs(bw: fx.GraphModule) -> Dict[str, int]:
    """Placeholder name -> bytes of the backward's inputs whose memory the step allocated: the saved activations (fp8
    ones included, under their own names); AOTAutograd names the others primals_* (graph inputs) and tangents_*."""
    return {n.name: _bytes_of(n) for n in bw.graph.find_nodes(op="placeholder")
            if not str(n.target).startswith(("primals", "tangents")) and isinstance(n.meta.get("val"), torch.Tensor)}


@dataclass
class Lifetimes:
    """When each allocation of a graph is alive, in node positions: keyed by the node that owns the memory (a view
    counts as its base; a tuple element is its own, born with its producer; memory the graph does not own is left
    out)."""

    nodes: List[fx.Node]
    order: Dict[fx.Node, int]
    start: Dict[fx.Node, int]
    end: Dict[fx.Node, int]
    size: Dict[fx.Node, int]

    def peak(self) -> Tuple[int, int]:
        """The largest sum of live bytes and the first position where it is reached."""
        events: Dict[int, int] = {}
        for o in self.start:
            events[self.start[o]] = events.get(self.start[o], 0) + self.size[o]
            events[self.end[o] + 1] = events.get(self.end[o] + 1, 0) - self.size[o]
        live, peak, at = 0, 0, 0
        for i in sorted(events):
            live += events[i]
            if live > peak:
                peak, at = live, i
        return peak, at


def _lifetimes(gm: fx.GraphModule, owned_inputs: Optional[Dict[str, int]] = None) -> Lifetimes:
    """Walk the graph in order; a value is alive from its node to its last use (outputs to the end); views and
    tuple elements share their producer's memory. `owned_inputs` (placeholder name -> bytes): inputs whose memory
    the graph owns, alive from the start to their last use."""
    owned_inputs = owned_inputs or {}
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    owner: Dict[fx.Node, Optional[fx.Node]] = {}
    for n in nodes:
        if n.op == "placeholder":
            owner[n] = n if n.name in owned_inputs else None
        elif shares_storage(n) and n.args and isinstance(n.args[0], fx.Node):
            owner[n] = owner.get(n.args[0])
        elif n.target is operator.getitem:
            owner[n] = n  # an element of a multi-output op: allocated by its producer, freed on its own
        else:
            owner[n] = n
    end: Dict[fx.Node, int] = {}
    start: Dict[fx.Node, int] = {}
    for n in nodes:
        o = owner.get(n)
        if o is None:
            continue
        last = order[n]
        born = 0 if n.op == "placeholder" else order[n]
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            born = order[n.args[0]]
            # the tuple holds every element until its last getitem has run
            last = max(order[g] for g in n.args[0].users)
        start.setdefault(o, born)
        for u in n.users:
            last = max(last, len(nodes) if u.op == "output" else order[u])
        end[o] = max(end.get(o, 0), last)
    size = {o: owned_inputs[o.name] if o.op == "placeholder" else
            _bytes_of(o) if not isinstance(o.meta.get("val"), (tuple, list)) else 0 for o in start}
    return Lifetimes(nodes, order, start, end, size)


def _live_peak(gm: fx.GraphModule, owned_inputs: Optional[Dict[str, int]] = None) -> int:
    """Peak live bytes of a graph (see `_lifetimes`)."""
    return _lifetimes(gm, owned_inputs).peak()[0]


def compiled_peak(gm: fx.GraphModule, stage: str) -> int:
    """The same prediction for a graph as it will run (after fusion, which may reorder it): what it allocates beyond
    its inputs, plus, in a backward, the saved activations it is handed and frees as it goes."""
    return _live_peak(gm, _owned_inputs(gm) if stage == "backward" else None)


# ------------------------------------------------------------------------------------------------- fp8

def _compress_fp8(fw: fx.GraphModule, bw: fx.GraphModule, names: Set[str], num_fwd_outputs: int) -> None:
    """Store the saved tensors named in `names` as float8_e4m3fn with a float32 per-tensor scale.

    Forward outputs are [user outputs, saved tensors, saved sizes]; backward placeholders are [saved sizes, saved
    tensors, tangents]. Each compressed tensor keeps its slot (now fp8) and its scale goes after the last saved tensor
    on both sides, so the two lists stay aligned for AOTAutograd's runtime."""
    fp8 = torch.float8_e4m3fn
    out = fw.graph.find_nodes(op="output")[0]
    outs = list(out.args[0])
    saved = outs[num_fwd_outputs:]
    n_sym = len(saved) - _first_sym(saved)
    saved_tensors = saved[:len(saved) - n_sym]
    placeholders = list(bw.graph.find_nodes(op="placeholder"))
    bw_saved = placeholders[n_sym:n_sym + len(saved_tensors)]
    if [p.name for p in bw_saved] != [s.name for s in saved_tensors]:
        raise RuntimeError("fp8: forward saved outputs and backward inputs are not aligned")
    scales_fw, scales_bw, new_saved = [], [], []
    after_saved = placeholders[n_sym + len(saved_tensors)] if n_sym + len(saved_tensors) < len(placeholders) else None
    for x, ph in zip(saved_tensors, bw_saved):
        if x.name not in names:
            new_saved.append(x)
            continue
        val = x.meta["val"]
        with fw.graph.inserting_before(out):
            xf = _call(fw.graph, aten._to_copy.default, (x,), {"dtype": torch.float32})
            amax = _call(fw.graph, aten.max.default, (_call(fw.graph, aten.abs.default, (xf,)),))
            scale = _call(fw.graph, aten.mul.Tensor,
                          (_call(fw.graph, aten.reciprocal.default,
                                 (_call(fw.graph, aten.clamp_min.default, (amax, 1e-12)),)), FP8_MAX))
            q = _call(fw.graph, aten._to_copy.default,
                      (_call(fw.graph, aten.clamp.default,
                             (_call(fw.graph, aten.mul.Tensor, (xf, scale)), -FP8_MAX, FP8_MAX)),), {"dtype": fp8})
        new_saved.append(q)
        scales_fw.append(scale)
        with bw.graph.inserting_before(ph):
            q_ph = _placeholder(bw.graph, f"{x.name}_fp8", q)
        if after_saved is not None:
            with bw.graph.inserting_before(after_saved):
                s_ph = _placeholder(bw.graph, f"{x.name}_fp8_scale", scale)
        else:
            with bw.graph.inserting_after(list(bw.graph.find_nodes(op="placeholder"))[-1]):
                s_ph = _placeholder(bw.graph, f"{x.name}_fp8_scale", scale)
        scales_bw.append(s_ph)
        first_user = min(ph.users, key=_position(bw.graph))
        with bw.graph.inserting_before(first_user):
            wide = _call(bw.graph, aten._to_copy.default, (q_ph,), {"dtype": torch.float32})
            unscaled = _call(bw.graph, aten.div.Tensor, (wide, s_ph))
            restored = _call(bw.graph, aten._to_copy.default, (unscaled,), {"dtype": val.dtype})
        ph.replace_all_uses_with(restored)
        bw.graph.erase_node(ph)
    new_outs = outs[:num_fwd_outputs] + new_saved + scales_fw + saved[len(saved_tensors):]
    descs = out.meta.get("desc")
    out.args = (tuple(new_outs),)
    if isinstance(descs, (list, tuple)) and len(descs) == len(outs):
        saved_desc = descs[num_fwd_outputs:num_fwd_outputs + len(saved_tensors)]
        extra = [_saved_desc_like(saved_desc[0] if saved_desc else None, len(saved_tensors) + k)
                 for k in range(len(scales_fw))]
        out.meta["desc"] = (list(descs[:num_fwd_outputs + len(saved_tensors)]) + extra
                            + list(descs[num_fwd_outputs + len(saved_tensors):]))
    fw.graph.lint()
    bw.graph.lint()


def _placeholder(graph: fx.Graph, name: str, like: fx.Node) -> fx.Node:
    node = graph.placeholder(name)
    node.target = node.name  # the argument name must be the (uniquified) node name, or codegen shadows values
    node.meta["val"] = like.meta["val"]
    return node


def _call(graph: fx.Graph, target: Any, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """Add a call node and give it a fake value computed from its inputs' fake values."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args = pytree.tree_map_only(fx.Node, lambda n: n.meta["val"], (args, kwargs))
    mode = next(v.fake_mode for v in pytree.tree_leaves(fake_args) if hasattr(v, "fake_mode"))
    with mode:
        node.meta["val"] = target(*fake_args[0], **fake_args[1])
    return node


def _saved_desc_like(example: Any, idx: int) -> Any:
    if example is None:
        return None
    try:
        return type(example)(idx)
    except Exception:
        return example


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _first_sym(values: Sequence[Any]) -> int:
    k = len(values)
    while k > 0 and isinstance(values[k - 1], fx.Node) and is_sym_node(values[k - 1]):
        k -= 1
    return k
