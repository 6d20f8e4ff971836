"""The fusion pass: partition an ATen graph into groups one generated Triton kernel can run, with the
intermediates kept in registers, and replace each group by a call of its kernel.

A group is a set of pointwise ops and reductions over one iteration space (the shape of its largest values),
reducing at most one set of dims: a pointwise chain, a softmax, a norm with its residual add and cast, a norm's
backward. The rules the partitioner keeps:
- it never fuses across a node it cannot generate (matmuls, random ops, anything outside the op table);
- it never fuses across a mutation (a group lies between two mutating nodes) and never takes a mutating node;
- views stay ATen calls unless they only add or drop size-1 dims of a value produced and consumed inside the
  group, so a view that aliases a graph output always aliases a real tensor;
- merging never creates a cycle (no path leaves the group and comes back);
- a group is kept only when the cost model says it moves fewer HBM bytes than its nodes run one by one.
Matmul-epilogue groups are claimed first, by `fusion_matmul`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import sympy
import torch
import torch.fx as fx

from flashfx import _compat
from flashfx.passes.fusion_matmul import claim_matmul, matmul_kernel
from flashfx.rewriter import cost as cost_model
from flashfx.rewriter.pass_manager import PassContext, PassResult

aten = torch.ops.aten

PASS = "fusion"


@dataclass(eq=False)
class _Group:
    members: List[fx.Node]
    P: Tuple[sympy.Expr, ...]        # iteration space, size-1 dims dropped
    rdims: Tuple[int, ...]           # reduced dims of P
    epoch: int
    merged_into: Optional["_Group"] = None

    def root(self) -> "_Group":
        g = self
        while g.merged_into is not None:
            g = g.merged_into
        return g


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


class _Partitioner:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from flashfx.codegen import lower, pointwise

        self.lower, self.pointwise = lower, pointwise
        self.gm, self.ctx = gm, ctx
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.group_of: Dict[fx.Node, _Group] = {}
        self.claimed: Set[fx.Node] = set()  # taken by a matmul-epilogue group
        self.shifted: Set[fx.Node] = set()  # pointwise ops only a cat reads: computed inside the cat's kernel
        self.colsums: Set[fx.Node] = set()  # sums over a row group's rows (weight gradients): per-program partials
        self.epoch: Dict[fx.Node, int] = {}
        e = 0
        for n in self.nodes:
            e += _is_mutating(n)
            self.epoch[n] = e

    # ---------------------------------------------------------------------------------- classification
    def tensor_ok(self, value: Any) -> bool:
        # on a device Triton runs on: a CUDA graph also holds CPU tensors (the attention op's seed, constants)
        return isinstance(value, torch.Tensor) and value.dtype in self.pointwise.TL_DTYPES \
            and _compat.triton_runs_on(value.device)

    def kind(self, node: fx.Node) -> Optional[str]:
        """'pw', 'red', 'view' for what the generator can take, else None (the node stays ATen)."""
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return None
        value = node.meta.get("val")
        if not self.tensor_ok(value):
            return None
        for a in node.all_input_nodes:
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor) and not self.tensor_ok(v):
                return None
            if not isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat, int, float)):
                return None
        packet = node.target.overloadpacket
        if node.target is aten.slice_backward.default:
            return "cat" if _static_slice_backward(node, value, self.lower.cat_operands(node)) else None
        if node.target is aten.cat.default:
            parts, dim, _ = self.lower.cat_operands(node)
            dim %= value.dim()
            # every part of the output's rank (cat also takes legacy empty 1-D parts) with a static cat-dim size
            static = all(isinstance(p, fx.Node) and isinstance(p.meta.get("val"), torch.Tensor)
                         and p.meta["val"].dim() == value.dim()
                         and not isinstance(p.meta["val"].shape[dim], torch.SymInt) for p in parts)
            return "cat" if static and len(parts) > 1 else None
        if packet in self.lower.UNIT_VIEWS:
            src = node.args[0]
            if not isinstance(src, fx.Node) or not isinstance(src.meta.get("val"), torch.Tensor):
                return None
            same = [s for s in self.lower.shape_of(src) if s != 1] == [s for s in self.lower.shape_of(node) if s != 1]
            return "view" if same or packet is aten.expand else None
        if packet in self.lower.REDUCTIONS:
            return "red" if node.target in (aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default,
                                            aten.amax.default, aten.amin.default) else None
        if self.pointwise.is_pointwise(node.target):
            if packet is aten._to_copy and set(node.kwargs) - {"dtype", "memory_format", "layout", "device"}:
                return None
            if packet is aten._to_copy and "device" in node.kwargs and node.kwargs["device"] is not None and \
                    torch.device(node.kwargs["device"]) != value.device:
                return None
            return "pw"
        return None

    def reduced_space(self, node: fx.Node) -> Optional[Tuple[Tuple[sympy.Expr, ...], Tuple[int, ...]]]:
        """(P, rdims) a reduction node iterates over: its input's shape without size-1 dims."""
        src = node.args[0]
        shape = self.lower.shape_of(src)
        dims = node.args[1] if len(node.args) > 1 and node.target not in (aten.sum.default, aten.mean.default) \
            else node.kwargs.get("dim", [])
        if isinstance(dims, int):
            dims = [dims]
        if not dims:
            dims = list(range(len(shape)))
        dims = {d % len(shape) for d in dims} if shape else set()
        keep = [i for i, s in enumerate(shape) if s != 1]
        P = tuple(shape[i] for i in keep)
        rdims = tuple(j for j, i in enumerate(keep) if i in dims)
        if not rdims:
            return None
        return P, rdims

    # ---------------------------------------------------------------------------------------- merging
    def merge_space(self, a: Tuple, b: Tuple) -> Optional[Tuple]:
        """The space of a group holding both spaces, or None."""
        (Pa, ra), (Pb, rb) = a, b
        if ra and rb:
            return a if (Pa, ra) == (Pb, rb) else None
        if rb and not ra:
            (Pa, ra), (Pb, rb) = b, a
        if ra:  # b is pointwise: its values must be P's elements or P's rows
            kind = self.lower.classify(Pb, Pa, ra)
            return (Pa, ra) if kind in ("full", "row", "scalar") else None
        return a if Pa == Pb else None

    def creates_cycle(self, members: Set[fx.Node]) -> bool:
        """Whether some path leaves `members` and comes back (the merged group could not be one kernel)."""
        lo = min(self.index[m] for m in members)
        seen: Set[fx.Node] = set()
        for m in members:
            stack = [a for a in m.all_input_nodes if a not in members]
            while stack:
                n = stack.pop()
                if n in seen or self.index[n] < lo:
                    continue
                seen.add(n)
                for a in n.all_input_nodes:
                    if a in members:
                        return True
                    stack.append(a)
        return False

    def is_column_reduction(self, node: fx.Node, space: Tuple) -> bool:
        """A sum over leading dims of a value whose group reduces nothing yet (a weight gradient met before the
        row reductions of its norm's backward)."""
        P, rdims = space
        src = node.args[0]
        return node.target is aten.sum.dim_IntList and (len(P) - 1) not in rdims and src in self.group_of \
            and not self.group_of[src].root().rdims

    def place_postponed(self, postponed: List[Tuple[fx.Node, Tuple, int]]) -> None:
        for node, space, epoch in postponed:
            if self.take_column_sum(node, space, epoch):
                continue
            g = self.group_of[node.args[0]].root()
            if g.rdims or g.P != space[0] or g.epoch != epoch or self.creates_cycle(set(g.members) | {node}) \
                    or any(m.target in self.lower.CATS for m in g.members):
                continue  # stays an ATen sum
            g.rdims = space[1]
            g.members = sorted(g.members + [node], key=self.index.get)
            self.group_of[node] = g

    def merge_siblings(self) -> None:
        """Pointwise groups over the same space that read a common input become one kernel (RoPE on q and k with as
        many k heads as q heads): the shared input is read once and one launch is saved."""
        roots = list({id(g.root()): g.root() for g in self.group_of.values()}.values())
        pointwise = [g for g in roots if not g.rdims and len(g.members) > 1]
        for i, a in enumerate(pointwise):
            if a.merged_into is not None:
                continue
            for b in pointwise[i + 1:]:
                if b.merged_into is not None or a.P != b.P or a.epoch != b.epoch:
                    continue
                reads_a = {x for m in a.members for x in m.all_input_nodes if x not in a.members}
                reads_b = {x for m in b.members for x in m.all_input_nodes if x not in b.members}
                if not (reads_a & reads_b) or self.creates_cycle(set(a.members) | set(b.members)):
                    continue
                a.members = sorted(a.members + b.members, key=self.index.get)
                b.merged_into = a
                for m in b.members:
                    self.group_of[m] = a

    def partition(self) -> List[_Group]:
        epoch = 0
        postponed: List[Tuple[fx.Node, Tuple, int]] = []
        for node in self.nodes:
            if _is_mutating(node):
                epoch += 1
                continue
            kind = self.kind(node) if node not in self.claimed else None
            if kind is None:
                continue
            if kind == "view":
                self.take_view(node, epoch)
                continue
            if kind == "red":
                space = self.reduced_space(node)
                if space is None or self.take_column_sum(node, space, epoch):
                    continue
                if self.is_column_reduction(node, space):
                    postponed.append((node, space, epoch))  # decide once the row reductions have their groups
                    continue
            elif kind == "cat":
                self.take_cat(node, epoch)
                continue
            else:
                space = (tuple(s for s in self.lower.shape_of(node) if s != 1), ())
            group = _Group([node], space[0], space[1], epoch)
            self.group_of[node] = group
            producers = {self.group_of[a].root() for a in node.all_input_nodes if a in self.group_of}
            for g in sorted(producers, key=lambda g: -len(g.members)):
                if g.epoch != epoch or any(a in self.colsums and a in g.members for a in node.all_input_nodes):
                    continue  # a column sum is finished only after the kernel: nothing in it can read it
                merged = self.merge_space((g.P, g.rdims), (group.P, group.rdims))
                if merged is None or self.creates_cycle(set(g.members) | set(group.members)):
                    continue
                if merged[1] and any(m.target in self.lower.CATS for m in g.members + group.members):
                    continue  # cat is generated in pointwise kernels only
                if kind == "red" and node.args[0] in g.members and \
                        self.lower.classify(self.lower.shape_of(node.args[0]), merged[0], merged[1]) != "full":
                    continue
                g.members = sorted(g.members + group.members, key=self.index.get)
                g.P, g.rdims = merged
                group.merged_into = g
                group = g
            for m in group.members:
                self.group_of[m] = group
        self.place_postponed(postponed)
        self.attach_input_column_sums()
        self.merge_siblings()
        roots = {id(g.root()): g.root() for g in self.group_of.values()}
        for g in roots.values():
            g.members.sort(key=self.index.get)
        return sorted(roots.values(), key=lambda g: self.index[g.members[0]])

    def take_column_sum(self, node: fx.Node, space: Tuple, epoch: int) -> bool:
        """A sum over exactly the rows of its input's row group (a norm's weight gradient) joins that group: each
        program adds its rows into a partial, so `dy * x_hat` is never written to HBM."""
        src = node.args[0]
        if node.target is not aten.sum.dim_IntList or src not in self.group_of:
            return False
        return self.join_as_column_sum(node, self.group_of[src].root(), space, epoch)

    def attach_input_column_sums(self) -> None:
        """A lone sum over the rows of a tensor that a row group also reads (a norm's bias gradient `dy.sum((0, 1))`
        beside the kernel of its backward, which reads dy) joins that group as a column sum: dy is read once, and a
        launch is saved."""
        for node, group in list(self.group_of.items()):
            src = node.args[0] if node.args else None
            if node.target is not aten.sum.dim_IntList or group.root().members != [node] or src in self.group_of:
                continue
            readers = {self.group_of[u].root() for u in src.users if u is not node and u in self.group_of}
            for reader in sorted(readers, key=lambda r: self.index[r.members[0]]):
                if self.join_as_column_sum(node, reader, (group.P, group.rdims), group.epoch):
                    group.merged_into = reader
                    break

    def join_as_column_sum(self, node: fx.Node, g: _Group, space: Tuple, epoch: int) -> bool:
        """`node` (a sum over leading dims, `space` = its input's dims and the summed ones) joins row group `g` as a
        per-program column sum, if g reduces exactly the dims the sum keeps."""
        if node.args[0] in self.colsums:
            return False
        P, sum_dims = space
        cols = tuple(d for d in range(len(P)) if d not in sum_dims)
        # only into a group that already reduces its rows: a plain sum over the leading dims is a row reduction
        # of its own (taking it as a column sum would split the row group that follows)
        if g.epoch != epoch or g.P != P or not cols or g.rdims != cols:
            return False
        if not node.meta["val"].dtype.is_floating_point or not node.meta["val"].is_contiguous():
            return False
        if any(m.target in self.lower.CATS for m in g.members) or self.creates_cycle(set(g.members) | {node}):
            return False
        g.members = sorted(g.members + [node], key=self.index.get)
        self.group_of[node] = g
        self.colsums.add(node)
        return True

    def take_cat(self, node: fx.Node, epoch: int) -> None:
        """A cat starts a pointwise group over its output; operands computed only for it come along (shifted)."""
        group = _Group([node], tuple(s for s in self.lower.shape_of(node) if s != 1), (), epoch)
        parts, _, _ = self.lower.cat_operands(node)
        for part in dict.fromkeys(parts):
            if part not in self.group_of:
                continue
            g = self.group_of[part].root()
            private = all(u in g.members or u is node for m in g.members for u in m.users)
            if g.rdims or g.epoch != epoch or not private or any(self.kind(m) != "pw" for m in g.members):
                continue
            if self.creates_cycle(set(group.members) | set(g.members)):
                continue
            group.members = sorted(group.members + g.members, key=self.index.get)
            g.merged_into = group
            self.shifted.update(g.members)
        for m in group.members:
            self.group_of[m] = group

    def take_view(self, node: fx.Node, epoch: int) -> None:
        src = node.args[0]
        g = self.group_of[src].root() if src in self.group_of else None
        if g is None or g.epoch != epoch:
            return
        # only views consumed inside the group: one that escapes stays a real ATen view (it may alias an output)
        if any(u.op == "output" or self.kind(u) not in ("pw", "red", "view") for u in node.users):
            return
        if self.lower.classify(self.lower.shape_of(node), g.P, g.rdims) is None:
            return
        g.members.append(node)
        self.group_of[node] = g


# ------------------------------------------------------------------------------------------------------ naming

def _group_name(members: List[fx.Node], index: int) -> str:
    origins = [m.meta.get("flashfx_origin") for m in members if m.meta.get("flashfx_origin")]
    ops = [m.target.overloadpacket.__name__.strip("_") for m in members
           if isinstance(m.target, torch._ops.OpOverload)]
    opset = set(ops)
    if origins:
        pattern = origins[0]
    elif {"amax", "exp", "sum"} <= opset:
        pattern = "softmax"
    elif "mean" in opset and "rsqrt" in opset:
        pattern = "layernorm" if "sub" in opset else "rmsnorm"
    else:
        pattern = ""
    words = [pattern] if pattern else []
    for op in ops:
        if op not in words and op not in ("view", "unsqueeze", "squeeze", "expand", "detach", "to_copy", "alias") \
                and len(words) < 3:
            words.append(op)
    return "fused_" + "_".join(words or ["pointwise"]) + f"_{index}"


# ------------------------------------------------------------------------------------------------------ the pass

def _bytes(expr: Any, hints: Dict[sympy.Symbol, int]) -> float:
    expr = sympy.sympify(expr)
    try:
        return float(expr.subs(hints))
    except TypeError:
        return float("nan")


def _group_io(group: _Group, members: Set[fx.Node]) -> Tuple[Any, Any]:
    """HBM bytes of the group's nodes run one by one, and of the fused kernel (inputs read once, outputs once)."""
    before = sum((cost_model.node_cost(m).hbm_bytes for m in group.members), sympy.Integer(0))
    inputs = {a for m in group.members for a in m.all_input_nodes if a not in members}
    after = sum((cost_model.tensor_bytes(a.meta["val"]) for a in inputs
                 if isinstance(a.meta.get("val"), torch.Tensor)), sympy.Integer(0))
    after += sum((cost_model.tensor_bytes(m.meta["val"]) for m in group.members
                  if any(u not in members for u in m.users)), sympy.Integer(0))
    return before, after


def _static_slice_backward(node: fx.Node, value: torch.Tensor, operands: Tuple[List[Any], Any, Any]) -> bool:
    """slice_backward(grad, sizes, dim, start, end, step) with step 1, int bounds and a static extent along dim;
    `operands` is its `lower.cat_operands`."""
    (grad,), dim, start = operands
    end, step = node.args[4:6]
    g = grad.meta.get("val") if isinstance(grad, fx.Node) else None
    if not isinstance(g, torch.Tensor) or g.dim() != value.dim() or step != 1:
        return False
    if not all(isinstance(x, int) for x in (dim, start, end)) or start < 0:
        return False
    d = dim % value.dim()
    return not isinstance(g.shape[d], torch.SymInt) and not isinstance(value.shape[d], torch.SymInt) \
        and start + int(g.shape[d]) <= int(value.shape[d])


LONE_BROADCAST_MIN_ELEMENTS = 1 << 20


def _broadcasts(node: fx.Node) -> bool:
    """A large pointwise op with a broadcast tensor operand (RMSNorm's `weight * x` recomputed in a backward): ATen
    runs it with its non-vectorized strided kernel (H100, [8192, 2048] bf16 x [2048]: 70 us, 47% of HBM bandwidth),
    so a generated kernel pays even though it saves no bytes."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    numel = cost_model.size_hint(out.numel())
    if numel is None or numel < LONE_BROADCAST_MIN_ELEMENTS:
        return False
    for a in node.all_input_nodes:
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            n = cost_model.size_hint(v.numel())
            if n is not None and n < numel:
                return True
    return False


def _interpreter_ready() -> bool:
    """Triton picks interpreter or compiler per function when it is defined: its own library functions (tl.sum)
    are interpreted only if TRITON_INTERPRET=1 was set before Triton was imported."""
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def _devices(gm: fx.GraphModule) -> Set[torch.device]:
    devices = set()
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            devices.add(v.device)
    return devices


def fusion(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fuse pointwise / reduction groups of an ATen graph into generated Triton kernels.

    Counts `fusion.groups`, `fusion.nodes_fused`, `fusion.decomposed`; declines each node a group stops at
    because it has no codegen; puts `[(kernel_name, source), ...]` in `ctx.artifacts["kernels"]`.
    """
    if not ctx.config.fusion:
        return PassResult(gm, False)
    # Groups form only on devices Triton runs on; a graph with none of those stays ATen. Tensors elsewhere (a CUDA
    # graph's CPU scalars) only stop the groups that touch them.
    devices = _devices(gm)
    runnable = {d for d in devices if _compat.triton_runs_on(d)}
    bad = sorted(str(d) for d in devices - runnable)
    if runnable and _compat.triton_interpreting() and not _interpreter_ready():
        runnable, bad = set(), ["cpu: TRITON_INTERPRET=1 was set after Triton was imported (set it before the "
                                "first import)"]
    if not runnable:
        why = f"Triton cannot run on {', '.join(bad)}" if bad else "the graph has no tensors"
        ctx.notes.append(f"fusion: {why} (CUDA, or the CPU with TRITON_INTERPRET=1); the graph stays ATen")
        return PassResult(gm, False)
    from flashfx.codegen import decompose, fallback, splice
    from flashfx.codegen.kernel import FusedKernel
    from flashfx.codegen.lower import LoweringError, lower_group
    from flashfx.codegen.matmul_epilogue import matmul_backend

    probe = _Partitioner(gm, ctx)
    decomposed = decompose.decompose(
        gm, lambda n: all(probe.tensor_ok(a.meta.get("val")) for a in n.all_input_nodes
                          if isinstance(a.meta.get("val"), torch.Tensor)))
    ctx.count("fusion.decomposed", decomposed)
    part = _Partitioner(gm, ctx)
    mm_groups = []
    for node in part.nodes:
        claim = claim_matmul(part, node)
        if claim is not None:
            mm_groups.append(claim)
            part.claimed.update(claim[0])
            part.claimed.update(claim[1])
    groups = part.partition()
    hints = cost_model.graph_cost(gm).hints
    placeholders = {sympy.sympify(n.meta["val"].node.expr): n for n in gm.graph.nodes
                    if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.SymInt)}
    kernels: List[Tuple[str, str]] = ctx.artifacts.setdefault("kernels", [])
    fallbacks: List[Any] = ctx.artifacts.setdefault("fallbacks", [])  # the report lists those that were used
    fused: Set[fx.Node] = set()
    modified = decomposed > 0
    index = 0
    for group in groups:
        members = set(group.members)
        compute = [m for m in group.members if part.kind(m) in ("pw", "red", "cat")]
        lone = len(compute) == 1 and part.kind(compute[0]) == "pw" and _broadcasts(compute[0])
        if len(compute) < 2 and not lone:
            continue
        before, after = _group_io(group, members)
        saved = _bytes(before - after, hints)
        if not saved > 0 and not lone:
            ctx.notes.append(f"fusion: group at {group.members[0].name} saves no HBM bytes ({before} -> {after})")
            continue
        name = _group_name(group.members, index)
        try:
            plan = lower_group(name, group.members, group.P, group.rdims, placeholders.get,
                               [m for m in group.members if m in part.shifted],
                               [m for m in group.members if m in part.colsums])
            kernel = FusedKernel(plan, str(ctx.config.cache_dir), ctx.config.autotune)
            src, _ = kernel.variant(kernel.meta_signature())
        except LoweringError as e:
            ctx.decline(PASS, group.members[0], f"group of {len(members)} nodes not generated: {e}")
            continue
        except Exception as e:  # a generator bug must not cost the user their model: say so, keep ATen
            ctx.decline(PASS, group.members[0], f"group of {len(members)} nodes not generated (internal error "
                                                f"{type(e).__name__}: {e})")
            continue
        kernel.fallback = fallback.Fallback(name, fallback.extract(
            group.members, [t.node for t in plan.inputs] + list(plan.scalars), [o.node for o in plan.outputs]),
            len(plan.inputs) + len(plan.scalars))
        fallbacks.append(kernel.fallback)
        index += 1
        splice.replace_group(gm, group.members, plan, kernel)
        splice.register_kernel_cost(kernel, group.members)
        kernels.append((src.name, src.source))  # the shared name the kernel runs (and profiles) under
        fused |= members
        ctx.count("fusion.groups")
        ctx.count("fusion.nodes_fused", len(compute))
        ctx.count("fusion.bytes_saved", int(saved) if saved == saved else 0)
        modified = True
    backend = matmul_backend() if mm_groups else "triton"  # a bad FLASHFX_MATMUL_BACKEND is the user's to fix
    on_cuda = any(d.type == "cuda" for d in runnable)
    if backend == "auto":
        backend = "aten" if on_cuda else "triton"
    if backend == "race" and not (ctx.config.autotune and on_cuda):
        backend = "triton"  # nothing to race: the CPU interpreter, or autotuning off
    for mms, members in mm_groups:
        ops = [m.target.overloadpacket.__name__.strip("_") for m in members if part.kind(m) == "pw"]
        words = list(dict.fromkeys(o for o in ops if o != "to_copy"))[:3] or ["cast"]
        name = f"fused_{'mm2' if len(mms) == 2 else 'mm'}_{'_'.join(words)}_{index}"
        try:
            kernel, src = matmul_kernel(name, mms, members, ctx, backend)
        except Exception as e:  # LoweringError, or a generator bug: the matmul stays ATen, the report says why
            ctx.decline(PASS, mms[0], f"matmul epilogue not generated: {e}")
            continue
        plan = kernel.plan
        everything = sorted(set(mms) | set(members), key=part.index.get)
        before, after = _group_io(_Group(everything, (), (), 0), set(everything))
        saved = _bytes(before - after, hints)
        a_nodes = {(m.args[1] if m.target is aten.addmm.default else m.args[0]): plan.a for m in mms}
        kernel.fallback = fallback.Fallback(name, fallback.extract(
            sorted(set(mms) | set(members), key=part.index.get),
            [plan.a, *plan.bs, *plan.inputs, *plan.scalars], [n for _, n in plan.outputs], a_nodes),
            1 + len(plan.bs) + len(plan.inputs) + len(plan.scalars))
        kernel.fallback.on_fallback = kernel._reference
        fallbacks.append(kernel.fallback)
        ctx.count({"triton": "fusion.matmul_triton", "aten": "fusion.matmul_aten",
                   "race": "fusion.matmul_raced"}[backend])
        if backend == "race":
            ctx.notes.append(f"fusion: {name} races its one Triton kernel against ATen's matmul (cuBLAS) + a "
                             "Triton epilogue per shape bucket at its first large call, caching the faster")
        index += 1
        splice.replace_matmul_group(gm, kernel)
        kernels.append((kernel.kernel_name, src))
        fused |= set(mms) | set(members)
        ctx.count("fusion.matmul_epilogues")
        ctx.count("fusion.bytes_saved", int(saved) if saved == saved else 0)
        ctx.count("fusion.groups")
        ctx.count("fusion.nodes_fused", len(mms) + sum(part.kind(m) == "pw" for m in members))
        modified = True
    _decline_neighbours(gm, part, fused, ctx)
    if modified:
        splice.topological_sort(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def _decline_neighbours(gm: fx.GraphModule, part: _Partitioner, fused: Set[fx.Node], ctx: PassContext) -> None:
    """Say why each node next to a fused kernel stayed an ATen call."""
    kernels = {n for n in gm.graph.nodes if n.op == "call_function"
               and type(n.target).__name__ in ("FusedKernel", "MatmulKernel")}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in kernels or node.target is operator.getitem:
            continue
        near = any(a.op == "call_function" and a.target is operator.getitem and a.args[0] in kernels
                   for a in node.all_input_nodes) or any(u in kernels for u in node.users)
        if not near:
            continue
        name = cost_model.op_name(node)
        if name in cost_model.VIEW_OPS:
            continue
        if _is_mutating(node):
            ctx.decline(PASS, node, f"{node.target} mutates its input; groups never span a mutation")
        elif part.kind(node) is None:
            ctx.decline(PASS, node, f"no Triton codegen for {node.target}; the group stops here")
