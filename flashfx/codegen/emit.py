"""Triton source for one fusion group: `emit(plan, signature)` -> a module with one `@triton.jit` kernel.

Three shapes of kernel, all from the same Plan:
- pointwise: one flat index over P, `XBLOCK` elements per program;
- persistent reduction: `XBLOCK` rows per program, the whole reduced extent in one `[XBLOCK, RBLOCK]` tile held
  in registers, so a softmax or a norm reads its input once;
- looped reduction: for reduced extents too large for registers, one loop over `RBLOCK` chunks per reduction,
  recomputing the cheap pointwise prologue instead of writing it to HBM; a max and the sum of exp(x - max) over
  the same row share one loop (online softmax), so a softmax reads a long row twice, not three times.
The signature says, per tensor, whether it is addressed as one contiguous run ("c") or through per-dim strides
(the P dims whose stride is non-zero); sizes and strides are kernel arguments, so a new sequence length reuses the
compiled kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import sympy
import torch

from flashfx.codegen.lower import Plan, Value, nonunit, x_dims
from flashfx.codegen.pointwise import HELPERS, TL_DTYPES

Layout = Union[str, Tuple[int, ...]]  # "c" (contiguous run), "s" (a scalar), or the P dims with a stride

IDENTITY = {"sum": "0", "max": "float('-inf')", "min": "float('inf')"}
COMBINE = {"sum": "{a} + {b}", "max": "tl.maximum({a}, {b})", "min": "tl.minimum({a}, {b})"}
TL_REDUCE = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}


@dataclass(frozen=True)
class Signature:
    mode: str                     # "pointwise" | "persistent" | "looped"
    inputs: Tuple[Layout, ...]
    outputs: Tuple[Layout, ...]
    index_bits: int = 32          # 64 only when some tensor has 2**31 elements or more (int32 math is cheaper)
    prefetch: bool = False        # persistent with column sums: load the next row block before this one's math
    row_stages: int = 0           # persistent: walk row blocks in a loop Triton software-pipelines over this many
                                  # stages (it pipelines a loop without a matmul only when the loop asks for it)


@dataclass
class KernelSource:
    name: str
    source: str
    params: List[str]             # runtime parameters in order (constexpr block sizes excluded)


def size_expr(plan: Plan, d: int) -> sympy.Expr:
    """Size of P's dim d in the kernel: a literal when static, the argument `ks{d}` when symbolic."""
    s = plan.P[d]
    return s if s.is_Integer else sympy.Symbol(f"ks{d}", integer=True, positive=True)


def symbolic_dims(plan: Plan) -> List[int]:
    return [d for d in nonunit(plan.P) if not plan.P[d].is_Integer]


class _Emitter:
    def __init__(self, plan: Plan, sig: Signature) -> None:
        self.plan, self.sig = plan, sig
        self.reduction = sig.mode != "pointwise"
        self.xdims = x_dims(plan.P, plan.rdims) if self.reduction else nonunit(plan.P)
        self.rdims = [d for d in nonunit(plan.P) if d in plan.rdims]
        self.params: List[str] = []
        self.top: List[str] = []

    # ------------------------------------------------------------------------------------------- indexing
    def dim_index(self, d: int) -> str:
        space, base = (self.rdims, "rindex") if d in self.rdims else (self.xdims, "xindex")
        pos = space.index(d)
        inner = sympy.Mul(*[size_expr(self.plan, e) for e in space[pos + 1:]])
        expr = base if inner == 1 else f"({base} // ({inner}))"
        return f"{expr} % ({size_expr(self.plan, d)})" if pos > 0 else expr

    def offset(self, prefix: str, layout: Layout, kind: str, shift: Optional[Tuple[int, int, int]] = None) -> str:
        if layout == "c":
            if not self.reduction or kind == "row":
                return "xindex"
            return str(sympy.Symbol("xindex") * sympy.Symbol("rnumel") + sympy.Symbol("rindex"))
        terms = [(sympy.Symbol(f"i{d}") - (shift[1] if shift and shift[0] == d else 0)) *
                 sympy.Symbol(f"{prefix}_s{d}") for d in layout]
        return str(sympy.Add(*terms)) if terms else "0"

    def strided_dims(self) -> Set[int]:
        dims: Set[int] = {t.shift[0] for t in self.plan.inputs if t.shift}  # cat selects by this index
        for layout in list(self.sig.inputs) + list(self.sig.outputs):
            if layout not in ("c", "s", "p"):
                dims.update(layout)
        return dims

    def mask(self, kind: str) -> str:
        return "xrmask" if kind == "full" and self.reduction else "xmask"

    # -------------------------------------------------------------------------------------------- values
    def line(self, v: Value, name: Optional[str] = None) -> List[str]:
        """`v`'s line(s); a load may be given another target `name` (a prefetching loop's next block)."""
        if v.op == "load":
            target = name or v.name
            t = self.plan.inputs[v.arg]
            layout = self.sig.inputs[v.arg]
            if layout == "s":
                return [f"{target} = tl.load(in{v.arg}_ptr)  # {v.source}"]
            off = self.offset(f"in{v.arg}", layout, t.kind, t.shift)
            mask = self.mask(t.kind)
            if t.shift:  # a cat operand: only the lanes of its range read it
                d, lo, size = t.shift
                mask = f"{mask} & (i{d} >= {lo}) & (i{d} < {lo + size})"
            return [f"{target} = tl.load(in{v.arg}_ptr + ({off}), mask={mask}, other=0)  # {v.source}"]
        if v.op == "scalar":
            return [f"{v.name} = sc{v.arg}  # {v.source}"]
        if v.op == "compute":
            return [f"{v.name} = {v.expr}  # {v.source}"]
        raise AssertionError(v.op)

    def reduce_persistent(self, v: Value) -> List[str]:
        src = v.deps[0]
        red = f"{TL_REDUCE[v.expr]}(tl.where(xrmask, {src}, {IDENTITY[v.expr]}), 1)[:, None]"
        if v.mean:
            red += " / rnumel"
        return [f"{v.name} = {red}  # {v.source}"]

    # ---------------------------------------------------------------------------------------------- stores
    def store(self, k: int, indent: str) -> List[str]:
        out = self.plan.outputs[k]
        layout = self.sig.outputs[k]
        v = self.plan.value(out.value)
        if out.kind == "col" and self.sig.mode == "persistent":  # a whole row per block: sum in registers,
            # stored once after the program's last row block (`column_stores`)
            return [f"colacc{k} += tl.sum(tl.where(xrmask, {v.deps[0]}, 0.0), 0)  # {out.node.name}"]
        if out.kind == "col":  # add this program's rows into its own row of the partials (no other program writes it)
            return ["rcol = roffset + tl.arange(0, RBLOCK)",
                    f"pcol = out{k}_ptr + tl.program_id(0) * rnumel + rcol",
                    f"tl.store(pcol, tl.load(pcol, mask=rcol < rnumel) + "
                    f"tl.sum(tl.where(xrmask, {v.deps[0]}, 0.0), 0), mask=rcol < rnumel)  # {out.node.name}",
                    # the next read of this row may come from another thread of the program
                    "tl.debug_barrier()"]
        expr = v.name
        if out.kind != v.kind and out.kind != "scalar":
            shape = "[XBLOCK, RBLOCK]" if (self.reduction and out.kind == "full") else \
                ("[XBLOCK, 1]" if self.reduction else "[XBLOCK]")
            expr = f"tl.broadcast_to({expr}, {shape})"
        off = self.offset(f"out{k}", layout, out.kind) if layout != "s" else "0"
        mask = self.mask(out.kind) if layout != "s" else "xmask"
        return [f"{indent}tl.store(out{k}_ptr + ({off}), {expr}.to(out{k}_ptr.dtype.element_ty), mask={mask})"
                f"  # {out.node.name}"]

    def column_accumulators(self) -> Tuple[List[str], List[str]]:
        """Persistent mode: the column sums' fp32 registers (before the row-block loop) and their one store each
        into this program's row of the partials (after it). Looped mode keeps them in the partials buffer."""
        if self.sig.mode != "persistent":
            return [], []
        cols = [k for k, o in enumerate(self.plan.outputs) if o.kind == "col"]
        init = [f"colacc{k} = tl.zeros([RBLOCK], dtype=tl.float32)" for k in cols]
        stores = ["rcol = tl.arange(0, RBLOCK)"] + [
            f"tl.store(out{k}_ptr + tl.program_id(0) * rnumel + rcol, colacc{k}, mask=rcol < rnumel)"
            f"  # {self.plan.outputs[k].node.name}" for k in cols]
        return init, stores

    def loop_head(self) -> List[str]:
        """The first lines inside a looped kernel's `for roffset` loop: this chunk's reduced indices and masks."""
        head = ["rindex = roffset + rbase", "rmask = rindex < rnumel", "xrmask = xmask & rmask"]
        return head + [f"i{d} = {self.dim_index(d)}" for d in self.rdims if d in self.strided_dims()]

    def online_max(self, total: Value) -> Optional[Value]:
        """The max reduce `top` when `total` is sum(exp(a - top)) with top = max(a) over the same row (softmax,
        log-softmax, logsumexp): a looped kernel then finds both in one pass over the row instead of two."""
        if total.expr != "sum" or total.mean or total.kind != "row" or total.dtype != torch.float32:
            return None
        e = self.plan.value(total.deps[0])
        if e.op != "compute" or len(e.deps) != 1 or e.expr != f"tl.exp({e.deps[0]})":
            return None
        d = self.plan.value(e.deps[0])
        if d.op != "compute" or len(d.deps) != 2:
            return None
        top = self.plan.value(d.deps[1])
        if top.op != "reduce" or top.expr != "max" or top.mean or top.dtype != torch.float32:
            return None
        a = self.plan.value(top.deps[0])
        # d is a - top, where a is the max's operand itself or the fp32 upcast of a loaded 16-bit value
        same = d.deps[0] == a.name and d.expr == f"{a.name} - {top.name}"
        upcast = a.op == "compute" and a.deps == (d.deps[0],) and d.expr == f"{a.expr} - {top.name}"
        return top if (same or upcast) and a.kind == "full" else None

    # -------------------------------------------------------------------------------------------- regions
    def emit_pointwise_or_persistent(self, skip: Sequence[str] = ()) -> List[str]:
        body: List[str] = []
        for v in self.plan.values:
            if v.op != "colsum" and v.name not in skip:
                body += self.reduce_persistent(v) if v.op == "reduce" else self.line(v)
        for k in range(len(self.plan.outputs)):
            body += self.store(k, "")
        return body

    def row_loads(self) -> List[Value]:
        """The loads that change with the row block: what a prefetching kernel issues one block ahead. Loads that
        only walk the reduced dims (a norm's weight, broadcast over rows) stay where they are."""
        def varies(layout: Layout) -> bool:
            return layout == "c" or (isinstance(layout, tuple) and any(d in self.xdims for d in layout))
        return [v for v in self.plan.values if v.op == "load" and self.plan.inputs[v.arg].kind in ("full", "row")
                and varies(self.sig.inputs[v.arg])]

    def prefetching_loop(self, head: Callable[[str], List[str]], row_loop: str) -> List[str]:
        """The row-block loop of a persistent kernel with column sums, its next block's loads issued before this
        block's reductions, so they are in flight while it computes (values carried to the next iteration)."""
        loads = self.row_loads()
        ahead = [line for v in loads for line in self.line(v, name=f"n_{v.name}")]
        lines = head("tl.program_id(0)") + [line for v in loads for line in self.line(v)]
        lines.append(row_loop)
        inner = head("(xb + tl.num_programs(0))") + ahead + head("xb")
        inner += self.emit_pointwise_or_persistent(skip=[v.name for v in loads])
        inner += [f"{v.name} = n_{v.name}" for v in loads]
        return lines + ["    " + line for line in inner]

    def full_closure(self, names: Sequence[str]) -> Tuple[List[Value], List[str]]:
        """The full-kind values `names` need (in plan order) and the non-full values those read."""
        need: Set[str] = set()
        outside: List[str] = []
        stack = list(names)
        while stack:
            n = stack.pop()
            v = self.plan.value(n)
            if v.kind != "full" or v.op == "reduce":
                if n not in outside:
                    outside.append(n)
                continue
            if n in need:
                continue
            need.add(n)
            stack.extend(v.deps)
        return [v for v in self.plan.values if v.name in need], outside

    def emit_looped(self) -> List[str]:
        done: Set[str] = set()
        body: List[str] = []

        def ensure(n: str) -> None:
            if n in done:
                return
            v = self.plan.value(n)
            top = self.online_max(v) if v.op == "reduce" else None
            if top is not None and top.name not in done:
                online_loop(v, top)
                done.add(top.name)
            elif v.op == "reduce":
                loop(v.deps, reduce_into=v)
            else:
                for d in v.deps:
                    ensure(d)
                body.extend(self.line(v))
            done.add(n)

        def loop(targets: Sequence[str], reduce_into: Optional[Value] = None, stores: Sequence[int] = ()) -> None:
            values, outside = self.full_closure(targets)
            for n in outside:
                ensure(n)
            if reduce_into is not None:
                r = reduce_into
                body.append(f"acc_{r.name} = tl.full([XBLOCK, RBLOCK], {IDENTITY[r.expr]}, {TL_DTYPES[r.dtype]})")
            body.append("for roffset in range(0, rnumel, RBLOCK):")
            inner = self.loop_head()
            for v in values:
                inner += self.line(v)
            if reduce_into is not None:
                r = reduce_into
                masked = f"tl.where(xrmask, {r.deps[0]}, {IDENTITY[r.expr]})"
                inner.append(f"acc_{r.name} = " + COMBINE[r.expr].format(a=f"acc_{r.name}", b=masked))
            for k in stores:
                inner += self.store(k, "")
            body.extend("    " + s for s in inner)
            if reduce_into is not None:
                r = reduce_into
                red = f"{TL_REDUCE[r.expr]}(acc_{r.name}, 1)[:, None]" + (" / rnumel" if r.mean else "")
                body.append(f"{r.name} = {red}  # {r.source}")

        def online_loop(total: Value, top: Value) -> None:
            """`top` = max(a) and `total` = sum(exp(a - top)) in one pass: each lane keeps a running max and a sum
            rescaled when its max grows (one exp per element), combined across lanes at the end."""
            a = top.deps[0]
            values, outside = self.full_closure([a])
            for n in outside:
                ensure(n)
            m, s = f"acc_{top.name}", f"acc_{total.name}"
            body.extend([f"{m} = tl.full([XBLOCK, RBLOCK], float('-inf'), tl.float32)",
                         f"{s} = tl.full([XBLOCK, RBLOCK], 0, tl.float32)",
                         "for roffset in range(0, rnumel, RBLOCK):"])
            inner = self.loop_head()
            for v in values:
                inner += self.line(v)
            nan = "propagate_nan=tl.PropagateNan.ALL"  # a NaN lane keeps a NaN sum: the row comes out NaN, as in ATen
            inner += [f"on_x = tl.where(xrmask, {a}, float('-inf')).to(tl.float32)",
                      f"on_top = tl.maximum({m}, on_x, {nan})",
                      # exp(-|x - max|): the smaller of the two against the new max (0 while the lane saw only -inf)
                      f"on_e = tl.where(on_top == float('-inf'), 0.0, tl.exp(tl.minimum({m}, on_x, {nan}) - on_top))",
                      f"{s} = tl.where(on_x > {m}, {s} * on_e + 1.0, {s} + on_e)",
                      f"{m} = on_top"]
            body.extend("    " + line for line in inner)
            body.append(f"{top.name} = tl.max({m}, 1)[:, None]  # {top.source}")
            body.append(f"{total.name} = tl.sum(tl.where({m} == float('-inf'), 0.0, {s} * tl.exp({m} - {top.name})), "
                        f"1)[:, None]  # {total.source} (online, with {top.source})")

        full_outs = [k for k, o in enumerate(self.plan.outputs) if o.kind in ("full", "col")]
        for k, o in enumerate(self.plan.outputs):
            if o.kind not in ("full", "col"):
                ensure(o.value)
                body.extend(self.store(k, ""))
        if full_outs:
            targets = [self.plan.value(o.value).deps[0] if o.kind == "col" else o.value
                       for o in (self.plan.outputs[k] for k in full_outs)]
            loop(targets, stores=full_outs)
        return body

    # ---------------------------------------------------------------------------------------------- module
    def source(self) -> KernelSource:
        plan, sig = self.plan, self.sig
        params = [f"in{k}_ptr" for k in range(len(plan.inputs))] + [f"out{k}_ptr" for k in range(len(plan.outputs))]
        params += [f"sc{k}" for k in range(len(plan.scalars))]
        params += ["xnumel"] + (["rnumel"] if self.reduction else [])
        params += [f"ks{d}" for d in symbolic_dims(plan)]
        for prefix, layouts in (("in", sig.inputs), ("out", sig.outputs)):
            for k, layout in enumerate(layouts):
                if layout not in ("c", "s", "p"):
                    params += [f"{prefix}{k}_s{d}" for d in layout]
        strided = self.strided_dims()
        columns = any(o.kind == "col" for o in plan.outputs)

        def head(pid: str) -> List[str]:
            """Indices and masks of the row block (or flat block) `pid`."""
            if sig.index_bits == 64:
                pid = f"tl.cast({pid}, tl.int64)"
            if self.reduction:
                lines = [f"xindex = ({pid} * XBLOCK + tl.arange(0, XBLOCK))[:, None]",
                         "xmask = xindex < xnumel", "rbase = tl.arange(0, RBLOCK)[None, :]"]
            else:
                lines = [f"xindex = {pid} * XBLOCK + tl.arange(0, XBLOCK)", "xmask = xindex < xnumel"]
            lines += [f"i{d} = {self.dim_index(d)}" for d in self.xdims if d in strided]
            if sig.mode == "persistent":
                lines += ["rindex = rbase", "rmask = rindex < rnumel", "xrmask = xmask & rmask"]
                lines += [f"i{d} = {self.dim_index(d)}" for d in self.rdims if d in strided]
            return lines
        # with column sums: few programs, each over many row blocks `xb`, so the column partials stay small
        rows = "tl.program_id(0), tl.cdiv(xnumel, XBLOCK), tl.num_programs(0)"
        row_loop = (f"for xb in tl.range({rows}, num_stages={sig.row_stages}):" if sig.row_stages
                    else f"for xb in range({rows}):")
        prefetch = columns and sig.prefetch and sig.mode == "persistent"
        if not prefetch:
            body = self.emit_looped() if sig.mode == "looped" else self.emit_pointwise_or_persistent()

        consts = "XBLOCK: tl.constexpr" + (", RBLOCK: tl.constexpr" if self.reduction else "")
        lines = [f"# {plan.name}: generated by flashfx ({sig.mode}; space {list(plan.P)}, reduced dims "
                 f"{list(plan.rdims)})", "# FX nodes covered:"]
        lines += [f"#   {c}" for c in plan.covered]
        lines += ["# arguments:"]
        lines += [f"#   in{k}: {t.node.name} {t.dtype} ({t.kind})" for k, t in enumerate(plan.inputs)]
        lines += [f"#   out{k}: {t.node.name} {t.dtype} ({t.kind})" for k, t in enumerate(plan.outputs)]
        lines += [f"#   sc{k}: {n.name}" for k, n in enumerate(plan.scalars)]
        lines += ["import triton", "import triton.language as tl", ""]
        for h in dict.fromkeys(plan.helpers):
            lines += [HELPERS[h], ""]
        lines += ["@triton.jit", f"def {plan.name}({', '.join(params + [consts])}):"]
        accumulators, column_stores = self.column_accumulators() if columns else ([], [])
        lines += ["    " + s for s in accumulators]
        if prefetch:
            lines += ["    " + s for s in self.prefetching_loop(head, row_loop)]
        elif columns or sig.row_stages:  # fewer programs than row blocks: each walks its blocks in a loop
            lines += ["    " + row_loop] + ["        " + s for s in head("xb") + body]
        else:
            lines += ["    " + s for s in head("tl.program_id(0)") + body]
        lines += ["    " + s for s in column_stores]
        return KernelSource(plan.name, "\n".join(lines) + "\n", params)


def emit(plan: Plan, sig: Signature) -> KernelSource:
    """The Triton module source for `plan` under `sig`."""
    return _Emitter(plan, sig).source()
