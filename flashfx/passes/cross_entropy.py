"""The `cross_entropy` pass: `linear -> cross_entropy` becomes one `flashfx::linear_cross_entropy` call, which walks
the rows in chunks and never holds the [tokens x vocab] logits (see flashfx/codegen/cross_entropy.py).

Pattern (Dynamo torch-level graph, after `canonicalize`), read from each `F.cross_entropy` node upwards:

    logits = linear(h, W, b?)  |  matmul(h, permute(W, (1, 0)))  |  matmul(h, M)  [+ b]
    x      = logits  -> any chain of:  .float() / .to(float32) (upcasts only), .contiguous(),
                        slicing that keeps the last dim whole (the causal shift logits[..., :-1, :]),
                        view / reshape / flatten to [rows, V]
    loss   = F.cross_entropy(x, target, weight=None, ignore_index=c, reduction=c, label_smoothing=c)

Replacement: h gets the same slicing as the logits, is flattened to [rows, H], and
`flashfx::linear_cross_entropy(h2d, W, b, target, ignore_index, label_smoothing, reduction)` stands for the loss
(cast to the loss's dtype when the cross-entropy ran in 16 bits, with a note: the op computes it in fp32). The target
is whatever the graph fed the loss: the Hugging Face label shift (`F.pad(labels, (0, 1), value=-100)[..., 1:]`) stays
as it was. Under autocast (fp32 weights, a bf16 product) the casts autocast would make become explicit `.to` nodes,
so the op's matmuls run in the dtype the linear ran in.

Hugging Face (transformers 5.17): `LlamaForCausalLM(..., labels=)` and `GPT2LMHeadModel` always return the logits
next to the loss (no flag drops them: `logits_to_keep` only selects positions, `skip_logits` exists only in
Liger-Kernel's patched forwards), so the pass declines on `model(**batch)` and fires once on
`lambda **batch: model(**batch).loss` (the logits are then dead in the graph). `GPT2LMHeadModel` also needs
`model.loss_type = "ForCausalLM"`: without it HF logs a warning inside forward, which breaks the graph between the
lm_head and the loss.

It declines (counted `cross_entropy.declined`, with the reason in the report) when:
- the logits, or any value between them and the loss, has another user — in particular when the graph returns the
  logits (Hugging Face causal-LM models return them next to the loss): dropping a returned tensor is not a rewrite,
  and keeping it means materialising the logits anyway. Return only the loss (see docs: `model(...).loss` inside the
  compiled function);
- class weights, the legacy size_average/reduce arguments, or arguments that are not constants;
- a bias add that promotes the product's dtype;
- a downcast of the logits before the loss, or a view that is not [rows, V];
- the loss input is not produced by a linear in this graph (a graph break between lm_head and the loss, for example).
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

import flashfx.ops  # noqa: F401  (registers torch.ops.flashfx.linear_cross_entropy)
from flashfx.rewriter.matcher import arg, erase_dead, insert_node, is_call, same_shape, same_size, tensor
from flashfx.rewriter.pass_manager import PassContext, PassResult

NAME = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")  # what the op takes (F.cross_entropy's own set)
CE_FUNCTIONS = (F.cross_entropy,)
LINEAR_FUNCTIONS = (torch._C._nn.linear, F.linear)
MATMUL_FUNCTIONS = (torch.matmul, operator.matmul)
CAST_METHODS = ("float", "to", "type", "half", "bfloat16", "double")
VIEW_FUNCTIONS = (torch.reshape, torch.flatten)
VIEW_METHODS = ("view", "reshape", "flatten")
CONTIGUOUS_METHODS = ("contiguous",)


class _Decline(Exception):
    """A reason to leave one loss alone (caught per site, never escapes the pass)."""


def cross_entropy(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace each provable `linear -> cross_entropy` with `flashfx::linear_cross_entropy`."""
    if ctx.stage != "torch" or not ctx.config.cross_entropy:
        return PassResult(gm, False)
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if not is_call(node, CE_FUNCTIONS):
            continue
        try:
            site = _match(node)
        except _Decline as why:
            ctx.decline(NAME, node, str(why))
            continue
        except Exception as e:  # noqa: BLE001  (a graph this pass does not understand is a decline, not a crash)
            ctx.decline(NAME, node, f"unexpected {type(e).__name__} while matching: {e}")
            continue
        created: List[fx.Node] = []
        try:
            _rewrite(graph, node, site, created)
        except Exception as e:  # noqa: BLE001
            for new in reversed(created):
                if not new.users:
                    graph.erase_node(new)
            ctx.decline(NAME, node, f"unexpected {type(e).__name__} while rewriting: {e}")
            continue
        if site.low_precision:
            ctx.notes.append(f"{NAME}: {node.name} ran the loss on {site.low_precision} logits; the fused op "
                             f"computes it in float32 from the same logits (more exact, not bit-identical)")
        ctx.count(f"{NAME}.replaced")
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


# ------------------------------------------------------------------------------------------------------ matching

class _Site:
    def __init__(self) -> None:
        self.h: fx.Node
        self.weight: fx.Node
        self.weight_is_transposed = False  # weight node holds W.T ([H, V]): the replacement inserts a permute
        self.bias: Optional[fx.Node] = None
        self.target: Any = None
        self.slices: List[tuple] = []  # index tuples applied to the logits (applied to h in the same order)
        self.chain: List[fx.Node] = []  # nodes from the linear to the loss input, to erase
        self.ignore_index = -100
        self.smoothing = 0.0
        self.reduction = "mean"
        self.low_precision: Optional[torch.dtype] = None  # the loss input's dtype when it was not float32
        self.compute_dtype: Optional[torch.dtype] = None  # the dtype the logits were computed in


def _const(node: fx.Node, index: int, name: str, default: Any, kinds: tuple) -> Any:
    v = arg(node, index, name, default)
    if isinstance(v, fx.Node) or not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds:
        raise _Decline(f"{name}={v!r} is not a constant of type {'/'.join(k.__name__ for k in kinds)}")
    return v


def _match(ce: fx.Node) -> _Site:
    site = _Site()
    x, target = arg(ce, 0, "input"), arg(ce, 1, "target")
    if arg(ce, 2, "weight") is not None:
        raise _Decline("class weights (weight=...) are not supported by the fused op")
    if arg(ce, 3, "size_average") is not None or arg(ce, 5, "reduce") is not None:
        raise _Decline("legacy size_average/reduce arguments; use reduction=")
    site.ignore_index = _const(ce, 4, "ignore_index", -100, (int,))
    site.reduction = _const(ce, 6, "reduction", "mean", (str,))
    site.smoothing = float(_const(ce, 7, "label_smoothing", 0.0, (int, float)))
    if site.reduction not in REDUCTIONS:
        raise _Decline(f"reduction={site.reduction!r} is not one of {REDUCTIONS}")
    if not 0.0 <= site.smoothing <= 1.0:
        raise _Decline(f"label_smoothing={site.smoothing} is outside [0, 1]")
    xv, tv = tensor(x), tensor(target)
    if not isinstance(x, fx.Node) or xv is None or tv is None:
        raise _Decline("no shape/dtype metadata on the loss inputs")
    if xv.dim() != 2 or tv.dim() != 1 or tv.dtype not in (torch.int64, torch.int32):
        raise _Decline(f"expected logits [rows, V] and class-index targets [rows], got logits {list(xv.shape)} and "
                       f"target {list(tv.shape)} of {tv.dtype}")
    site.target = target
    if xv.dtype != torch.float32:
        site.low_precision = xv.dtype
    logits = _walk_chain(x, site)
    _match_linear(logits, site)
    V = tensor(site.weight).shape[1 if site.weight_is_transposed else 0]
    if not same_size(xv.shape[1], V):
        raise _Decline(f"the loss's class dim {xv.shape[1]} is not the linear's output dim {V}")
    hv, wv = tensor(site.h), tensor(site.weight)
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if site.compute_dtype not in floats or hv.dtype not in floats or wv.dtype not in floats:
        raise _Decline(f"the linear runs in {site.compute_dtype} on {hv.dtype} / {wv.dtype} inputs; the fused op "
                       f"takes fp16/bf16/fp32")
    # Under autocast the linear's inputs are cast to its output dtype (e.g. fp32 weights, bf16 product): the
    # rewrite makes the same casts explicit. Outside autocast a mixed-dtype linear does not run at all.
    if site.bias is not None:
        bv = tensor(site.bias)
        if bv is None or bv.dim() != 1 or not same_size(bv.shape[0], V) or bv.dtype not in floats:
            raise _Decline("the bias is not a [V] float tensor")
    if hv.device != tv.device:
        raise _Decline(f"h is on {hv.device} but the target on {tv.device}")
    return site


def _walk_chain(x: fx.Node, site: _Site) -> fx.Node:
    """From the loss input up to the linear: record slices, check casts and views; every link has one user."""
    node = x
    if len(x.users) != 1:
        raise _Decline(_other_users_reason(x))
    sliced = False
    while True:
        producer = _single_input(node)
        if producer is None:  # node is not a transparent link: it must be the linear itself
            return node
        # h gets the slices, then one reshape to [rows, H]: sound only when every slice sees the linear's own
        # leading dims, i.e. no view lies between the linear and a slice
        if node.target is operator.getitem:
            sliced = True
        elif sliced and is_call(node, VIEW_FUNCTIONS, VIEW_METHODS):
            raise _Decline("the logits are reshaped before they are sliced; only slices of the linear's output "
                           "can be moved to its input")
        site.chain.append(node)
        if len(producer.users) != 1:
            raise _Decline(_other_users_reason(producer))
        node = producer


def _single_input(node: fx.Node) -> Optional[fx.Node]:
    """The input of a value-preserving link (upcast, contiguous, view to rows, last-dim-preserving slice), or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    sv, ov = tensor(src), tensor(node)
    if sv is None or ov is None:
        return None
    if is_call(node, methods=CAST_METHODS):
        if ov.dtype == sv.dtype or ov.dtype == torch.float32 and sv.dtype in (torch.float16, torch.bfloat16):
            if ov.device == sv.device and tuple(ov.shape) == tuple(sv.shape):
                return src
        raise _Decline(f"the logits are cast {sv.dtype} -> {ov.dtype} before the loss (only upcasts to float32 "
                       f"keep the values)")
    if is_call(node, methods=CONTIGUOUS_METHODS) and len(node.args) == 1 and not node.kwargs:
        return src
    if is_call(node, VIEW_FUNCTIONS, VIEW_METHODS):
        # a view / reshape keeps row-major order; it must keep the class dim last and whole
        if not same_size(ov.shape[-1], sv.shape[-1]):
            raise _Decline(f"a reshape of the logits {list(sv.shape)} -> {list(ov.shape)} moves the class dim")
        return src
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        index = _slice_index(node.args[1], sv.dim())
        if index is None:
            raise _Decline(f"indexing of the logits {node.args[1]!r} is not a slice that keeps the class dim whole")
        return src
    return None


def _slice_index(index: Any, ndim: int) -> Optional[tuple]:
    """The index as a tuple of slices/Ellipsis when it leaves the last dim untouched, else None."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is Ellipsis or isinstance(i, slice) for i in index) or sum(i is Ellipsis for i in index) > 1:
        return None
    if any(isinstance(p, fx.Node) for i in index if isinstance(i, slice) for p in (i.start, i.stop, i.step)):
        return None
    if Ellipsis in index:
        after = index[index.index(Ellipsis) + 1:]
        last = after[-1] if after else slice(None)
    else:
        if len(index) > ndim:
            return None
        last = index[ndim - 1] if len(index) == ndim else slice(None)
    full = last.start in (None, 0) and last.stop is None and last.step in (None, 1)
    return index if full else None


def _match_linear(logits: fx.Node, site: _Site) -> None:
    node = logits
    if node.op == "call_function" and node.target is operator.add and len(node.args) == 2:
        a, b = node.args
        a_ok = isinstance(a, fx.Node) and _is_matmul(a)
        if not a_ok and isinstance(b, fx.Node) and _is_matmul(b):
            a, b = b, a
            a_ok = True
        if a_ok and isinstance(b, fx.Node) and tensor(b) is not None and tensor(b).dim() == 1:
            if len(a.users) != 1:
                raise _Decline(_other_users_reason(a))
            if tensor(node).dtype != tensor(a).dtype:
                raise _Decline(f"the bias add promotes the {tensor(a).dtype} product to {tensor(node).dtype}")
            site.bias = b
            site.chain.append(node)
            node = a
    if is_call(node, LINEAR_FUNCTIONS):
        site.h, site.weight = node.args[0], arg(node, 1, "weight")
        bias = arg(node, 2, "bias")
        if bias is not None:
            if site.bias is not None:
                raise _Decline("a linear with a bias followed by another bias add")
            site.bias = bias
    elif _is_matmul(node):
        site.h, rhs = node.args
        inner = _transpose_of(rhs)
        if inner is not None:
            site.weight = inner
        else:
            site.weight, site.weight_is_transposed = rhs, True
    else:
        if node.op == "placeholder":
            raise _Decline("the loss's logits are an input of this graph: a graph break between the lm_head and the "
                           "loss (e.g. Hugging Face GPT2LMHeadModel logs a warning there unless "
                           "model.loss_type = 'ForCausalLM' is set)")
        raise _Decline(f"the loss's logits are not produced by a linear (they come from {node.name}: "
                       f"{getattr(node.target, '__name__', node.target)})")
    if not isinstance(site.h, fx.Node) or not isinstance(site.weight, fx.Node):
        raise _Decline("the linear's input or weight is a constant")
    wv, hv = tensor(site.weight), tensor(site.h)
    if wv is None or hv is None or wv.dim() != 2 or hv.dim() < 1:
        raise _Decline("the linear's weight is not a 2-D matrix")
    H = wv.shape[0 if site.weight_is_transposed else 1]
    if not same_size(hv.shape[-1], H):
        raise _Decline("the linear's input and weight sizes do not line up")
    site.compute_dtype = tensor(node).dtype if tensor(node) is not None else None
    site.chain.append(node)
    if len(node.users) != 1:
        raise _Decline(_other_users_reason(node))


def _is_matmul(node: fx.Node) -> bool:
    if not is_call(node, MATMUL_FUNCTIONS) or len(node.args) != 2 or node.kwargs:
        return False
    rhs = tensor(node.args[1])
    return isinstance(node.args[1], fx.Node) and rhs is not None and rhs.dim() == 2


def _transpose_of(node: fx.Node) -> Optional[fx.Node]:
    """W when `node` is W transposed (the canonical permute, or a raw .t()/.T/transpose), else None."""
    if is_call(node, (torch.permute,)) and isinstance(node.args[1], (tuple, list)) and tuple(node.args[1]) == (1, 0):
        return node.args[0]
    if is_call(node, (torch.t,), ("t",)) and len(node.args) == 1:
        return node.args[0]
    if is_call(node, (torch.transpose,), ("transpose",)) and len(node.args) == 3:
        if sorted(d % 2 for d in node.args[1:]) == [0, 1]:
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    return None


def _other_users_reason(node: fx.Node) -> str:
    returned = any(u.op == "output" for u in node.users)
    if returned:
        return (f"the logits ({node.name}) are also returned by the graph (Hugging Face models return logits next to "
                f"the loss); fusing would drop that output. Compile a function that returns only the loss, e.g. "
                f"`lambda **kw: model(**kw).loss`")
    others = ", ".join(u.name for u in node.users)
    return f"the logits ({node.name}) have other users ({others}); fusing would leave them without a value"


# ------------------------------------------------------------------------------------------------------ rewriting

def _rewrite(graph: fx.Graph, ce: fx.Node, site: _Site, created: List[fx.Node]) -> None:
    """Emit the op before the loss (every created node goes into `created`, so a failure can erase them)."""
    def emit(target: Any, args: tuple) -> fx.Node:
        created.append(_insert(graph, ce, target, args))
        return created[-1]

    with graph.inserting_before(ce):
        h = site.h
        for index in reversed([n.args[1] for n in site.chain if n.target is operator.getitem]):
            h = emit(operator.getitem, (h, index))
        rank = tensor(site.h).dim()
        if rank > 2:  # rows in row-major order, as the logits' view to [rows, V] has them; no size constants
            h = emit("flatten", (h, 0, -2))
        elif rank == 1:
            h = emit("unsqueeze", (h, 0))
        weight = site.weight
        if site.weight_is_transposed:
            weight = emit(torch.permute, (weight, (1, 0)))
        bias = site.bias
        if tensor(h).dtype != site.compute_dtype:  # autocast's casts, made explicit
            h = emit("to", (h, site.compute_dtype))
        if tensor(weight).dtype != site.compute_dtype:
            weight = emit("to", (weight, site.compute_dtype))
        if bias is not None and tensor(bias).dtype != site.compute_dtype:
            bias = emit("to", (bias, site.compute_dtype))
        loss = emit(torch.ops.flashfx.linear_cross_entropy.default,
                    (h, weight, bias, site.target, site.ignore_index, site.smoothing, site.reduction, 0.0))
        want = tensor(ce)
        if want is not None and tensor(loss) is not None and tensor(loss).dtype != want.dtype:
            loss = emit("to", (loss, want.dtype))
        if want is not None and tensor(loss) is not None and not same_shape(tensor(loss).shape, want.shape):
            raise RuntimeError(f"the fused loss has shape {list(tensor(loss).shape)}, the original {list(want.shape)}")
    ce.replace_all_uses_with(loss)
    erase_dead(graph, [ce])


def _insert(graph: fx.Graph, ce: fx.Node, target: Any, args: tuple) -> fx.Node:
    """A new node with its fake value computed in the fake mode of its inputs' values. (Inside a torch.compile
    backend the active TracingContext may hold another fake mode than the one Dynamo's node values live in.)"""
    op = "call_method" if isinstance(target, str) else "call_function"
    fake_args = fx.node.map_arg(args, lambda n: tensor(n))
    modes = [t.fake_mode for t in torch.utils._pytree.tree_leaves(fake_args) if hasattr(t, "fake_mode")]
    val = None
    if modes:
        with modes[0]:
            val = getattr(fake_args[0], target)(*fake_args[1:]) if op == "call_method" else target(*fake_args)
    return insert_node(graph, op, target, args, meta_from=ce, val=val)
