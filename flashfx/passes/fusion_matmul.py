"""Matmul-epilogue groups for the fusion pass: which pointwise ops after a `mm` / `addmm` / `bmm` (and a second
matmul sharing its left operand, for SwiGLU) join it, and the kernel that runs the group
(`flashfx.codegen.matmul_epilogue`). The fusion pass claims these groups first, then partitions the rest."""
from __future__ import annotations

from typing import Any, List, Optional, Set, Tuple

import sympy
import torch
import torch.fx as fx

from flashfx.rewriter.pass_manager import PassContext

aten = torch.ops.aten


MM_WINDOW = 64  # how far past a matmul to look for its epilogue (graph order)


def _through_views(node: fx.Node, stop: Set[fx.Node]) -> Tuple[fx.Node, List[fx.Node]]:
    chain = []
    while isinstance(node.target, torch._ops.OpOverload) and node.target.overloadpacket in (
            aten.view, aten.reshape, aten._unsafe_view) and node not in stop:
        chain.append(node)
        node = node.args[0]
    return node, chain


def _same_operand(x: fx.Node, y: fx.Node) -> bool:
    """The same tensor: one node, or two identical views of one base (AOTAutograd makes a view per linear)."""
    if x is y:
        return True
    views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    if x.target in views and y.target in views and x.args[0] is y.args[0]:
        xv, yv = x.meta.get("val"), y.meta.get("val")
        return xv is not None and yv is not None and xv.shape == yv.shape and xv.stride() == yv.stride()
    return False


def claim_matmul(part: Any, anchor: fx.Node) -> Optional[Tuple[List[fx.Node], List[fx.Node]]]:
    """(matmuls, epilogue members) for the group anchored at `anchor`, or None when nothing fuses."""
    from flashfx.codegen import matmul_epilogue as me
    from flashfx.codegen.lower import LoweringError

    if anchor.target not in me.MM_TARGETS or anchor in part.claimed:
        return None
    a = anchor.args[1] if anchor.target is aten.addmm.default else anchor.args[0]
    b = anchor.args[2] if anchor.target is aten.addmm.default else anchor.args[1]
    av, bv, ov = (x.meta.get("val") for x in (a, b, anchor))
    batched = anchor.target is aten.bmm.default
    if not all(part.tensor_ok(v) for v in (av, bv, ov)) or av.dtype not in (
            torch.float16, torch.bfloat16, torch.float32) or bv.dtype != av.dtype or ov.dim() != 2 + batched:
        return None
    out_shape = part.lower.shape_of(anchor)
    M, N = sympy.Mul(*out_shape[:-1]), out_shape[-1]  # the epilogue's rows: batch x rows for bmm
    mms, members, inside = [anchor], [], {anchor}
    view_shape = None
    start = part.index[anchor]
    for node in part.nodes[start + 1:start + 1 + MM_WINDOW]:
        if node in part.claimed or node.op != "call_function" or part.epoch[node] != part.epoch[anchor]:
            continue
        if not any(i in inside for i in node.all_input_nodes):
            continue
        kind = part.kind(node)
        shape = part.lower.shape_of(node) if isinstance(node.meta.get("val"), torch.Tensor) else ()
        if kind not in ("pw", "view") and not (isinstance(node.target, torch._ops.OpOverload) and
                                                node.target.overloadpacket in me.VIEWS):
            continue
        if not me.flat_ok(shape, M, N) or not node.meta["val"].is_contiguous():
            continue
        if any(part.kind(u) == "red" for u in node.users):
            continue  # it feeds a reduction: its place is in that reduction's kernel (a norm's backward)
        if tuple(shape) != tuple(out_shape):
            if view_shape is not None and tuple(shape) != view_shape:
                continue
        extra_mms, extra_views = [], []
        ok = True
        for i in node.all_input_nodes:
            if i in inside or not isinstance(i.meta.get("val"), torch.Tensor):
                continue
            src, chain = _through_views(i, inside)
            same_a = src.target in me.MM_TARGETS[:2] and not batched and src not in part.claimed \
                and len(mms) + len(extra_mms) < 2 \
                and _same_operand(src.args[1] if src.target is aten.addmm.default else src.args[0], a)
            if same_a and part.lower.shape_of(src) == (M, N) and all(
                    me.flat_ok(part.lower.shape_of(c), M, N) for c in chain):
                extra_mms.append(src)
                extra_views += chain
                continue
            try:
                me.input_kind(part.lower.shape_of(i), M, N, out_shape[-2] if batched else None)
            except LoweringError:
                ok = False
        trial = inside | {node} | set(extra_mms) | set(extra_views)
        if not ok or part.creates_cycle(trial):
            continue
        if tuple(shape) != tuple(out_shape) and view_shape is None:
            view_shape = tuple(shape)
        mms += extra_mms
        members += extra_views + [node]
        inside = trial
    if not any(part.kind(m) == "pw" for m in members):
        return None
    members.sort(key=part.index.get)
    return mms, members


def matmul_kernel(name: str, mms: List[fx.Node], members: List[fx.Node], ctx: PassContext,
                   backend: str) -> Tuple[Any, str]:
    from flashfx.codegen import matmul_epilogue as me
    from flashfx.codegen import splice

    plan = me.lower_matmul(name, mms, members)
    kernel = me.MatmulKernel(plan, str(ctx.config.cache_dir), ctx.config.autotune, backend)
    src, _ = kernel.source(ieee=plan.a.meta["val"].dtype == torch.float32 and
                           not torch.backends.cuda.matmul.allow_tf32, product=backend == "aten")  # what will run
    splice.register_kernel_cost(kernel, list(mms) + list(members))
    return kernel, src
