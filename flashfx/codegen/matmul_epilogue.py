"""Matmul with a generated epilogue: `mm` / `addmm` (one or two weight matrices sharing the left operand) followed by
the pointwise ops that consume the product (bias, GELU / SiLU / ReLU, SwiGLU gating, residual add, cast), in one
Triton kernel. The product never goes to HBM unless the graph needs it elsewhere (a saved activation).

The epilogue works on the `[M, N]` tile of the product. Graph values of shape `[..., N]` whose leading dims
multiply to M (the usual `view(addmm, [B, S, N])`) are the same elements; tensors from outside the group are
flattened to `[M, N]` (broadcast dims get stride 0) by the launcher, so the kernel sees two strides per tensor.

FLASHFX_MATMUL_BACKEND (read when the fusion pass builds a group) picks how a group runs: `aten` (torch.mm / bmm,
i.e. cuBLAS, writes each product; a generated kernel of the same epilogue reads it), `triton` (the matmul and
epilogue in one generated kernel: the product never reaches HBM), `race` (on CUDA with autotuning, both are timed
per shape bucket and the faster is cached with the other autotune choices), or `auto` (the default): `aten` on
CUDA, `triton` on the CPU interpreter. `auto` is not `race` because racing compiles every Triton matmul tile
config: on the H100 that made the first call of the 8-layer Llama training step take minutes.
Order in this file: template (source emission) -> plan (lowering) -> launcher.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import sympy
import torch
import torch.fx as fx
import triton

from flashfx import _compat
from flashfx.codegen import autotune, kernel_cache
from flashfx.codegen.kernel import on_device
from flashfx.codegen import pointwise as pw
from flashfx.codegen.lower import CASTS, COMPARISONS, LoweringError, UNIT_VIEWS, read_as_stored, shape_of, val
from flashfx.codegen.pointwise import HELPERS, LOW_PRECISION, TL_DTYPES, compute_dtype

aten = torch.ops.aten
MM_TARGETS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
VIEWS = {aten.view, aten.reshape, aten._unsafe_view}
BACKENDS = ("auto", "aten", "triton", "race")


def matmul_backend() -> str:
    """FLASHFX_MATMUL_BACKEND, checked: "auto" (the default), "aten", "triton" or "race"."""
    value = os.environ.get("FLASHFX_MATMUL_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"FLASHFX_MATMUL_BACKEND={value!r} is not a matmul backend: set it to one of "
                         f"{', '.join(BACKENDS)}, or unset it for auto")
    return value


@dataclass
class MatmulPlan:
    name: str
    a: fx.Node
    bs: List[fx.Node]                     # one or two [K, N] operands sharing `a`
    mms: List[fx.Node]
    M: sympy.Expr                         # rows of the epilogue: batch x rows for bmm
    N: sympy.Expr
    K: sympy.Expr
    batched: bool = False                 # bmm: one grid row of tiles per batch
    lines: List[Tuple[str, str, str]] = field(default_factory=list)   # (name, expr, source)
    inputs: List[fx.Node] = field(default_factory=list)               # epilogue tensors from outside
    input_kinds: List[str] = field(default_factory=list)  # "full" [..., N] | "batchrow" | "row" [N] | "scalar"
    view_shape: Any = None        # the shape argument of the graph's own view to [..., N] (reused for outputs)
    members: List[fx.Node] = field(default_factory=list)
    scalars: List[fx.Node] = field(default_factory=list)
    outputs: List[Tuple[str, fx.Node]] = field(default_factory=list)  # (value, node it stands for)
    helpers: List[str] = field(default_factory=list)
    covered: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ template

def _gemm_lines(plan: MatmulPlan, precision: str) -> List[str]:
    """The K loop: acc{j} = a @ b{j} over [BLOCK_M, BLOCK_N] tiles."""
    nb = len(plan.bs)
    body = [
        "# wrap the rows/columns past the edge instead of masking every load (their results are not stored)",
        "ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)",
        "rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)",
        "rk = tl.arange(0, BLOCK_K)",
        "a_ptrs = a_ptr + (ram[:, None] * stride_am + rk[None, :] * stride_ak)" +
        (" + bid * stride_ab" if plan.batched else ""),
    ]
    for j in range(nb):
        batch = f" + bid * stride_b{j}b" if plan.batched else ""
        body += [f"b{j}_ptrs = b{j}_ptr + (rk[:, None] * stride_b{j}k + rbn[None, :] * stride_b{j}n){batch}",
                 f"acc{j} = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)"]
    body += ["for k in range(0, tl.cdiv(K, BLOCK_K)):",
             "    if EVEN_K:",
             "        a = tl.load(a_ptrs)"]
    body += [f"        b{j} = tl.load(b{j}_ptrs)" for j in range(nb)]
    body += ["    else:",
             "        a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)"]
    body += [f"        b{j} = tl.load(b{j}_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0.0)" for j in range(nb)]
    for j in range(nb):
        body += [f"    acc{j} = tl.dot(a, b{j}, acc{j}{precision})", f"    b{j}_ptrs += BLOCK_K * stride_b{j}k"]
    return body + ["    a_ptrs += BLOCK_K * stride_ak"]


def emit_matmul(plan: MatmulPlan, ieee: bool, product: bool = False) -> str:
    """Triton source: a grouped-ordering tiled matmul with fp32 accumulators, then the epilogue lines. `product`:
    no matmul; the kernel reads the products ATen (cuBLAS) wrote, contiguous [batch * M, N], as its accumulators."""
    nb = len(plan.bs)
    params = [f"p{j}_ptr" for j in range(nb)] if product else ["a_ptr"] + [f"b{j}_ptr" for j in range(nb)]
    params += [f"in{k}_ptr" for k in range(len(plan.inputs))]
    params += [f"out{k}_ptr" for k in range(len(plan.outputs))] + [f"sc{k}" for k in range(len(plan.scalars))]
    if product:
        params += ["M", "N"]
    else:
        params += ["M", "N", "K", "stride_am", "stride_ak"] + (["stride_ab"] if plan.batched else [])
        params += [p for j in range(nb) for p in (f"stride_b{j}k", f"stride_b{j}n")]
        params += [f"stride_b{j}b" for j in range(nb)] if plan.batched else []
    params += [p for k in range(len(plan.inputs)) for p in (f"in{k}_sm", f"in{k}_sn")]
    consts = "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr" if product else \
        "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, " \
        "EVEN_K: tl.constexpr"
    precision = ', input_precision="ieee"' if ieee else ""
    body = [
        "pid = tl.program_id(0)",
        "num_pid_m = tl.cdiv(M, BLOCK_M)",
        "num_pid_n = tl.cdiv(N, BLOCK_N)",
        "# grouped ordering: GROUP_M row-blocks share their B columns in L2",
        "num_pid_in_group = GROUP_M * num_pid_n",
        "first_pid_m = (pid // num_pid_in_group) * GROUP_M",
        "group_size_m = min(num_pid_m - first_pid_m, GROUP_M)",
        "pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)",
        "pid_n = (pid % num_pid_in_group) // group_size_m",
        "rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
    ]
    if plan.batched:  # M is the rows of one batch here; the epilogue sees batch * M + row
        body += ["bid = tl.program_id(1)"]
    if not product:
        body += _gemm_lines(plan, precision)
    body += ["# epilogue on the [BLOCK_M, BLOCK_N] tile",
             "i0 = (bid * M + rm)[:, None]" if plan.batched else "i0 = rm[:, None]", "i1 = rn[None, :]",
             "xmask = (rm[:, None] < M) & (i1 < N)"]
    if product:
        body += [f"acc{j} = tl.load(p{j}_ptr + (i0 * N + i1), mask=xmask, other=0).to(tl.float32)"
                 for j in range(nb)]
    body += [f"{name} = {expr}  # {source}" for name, expr, source in plan.lines]
    for k, (value, node) in enumerate(plan.outputs):
        body.append(f"tl.store(out{k}_ptr + (i0 * N + i1), {value}.to(out{k}_ptr.dtype.element_ty), mask=xmask)"
                    f"  # {node.name}")
    lines = [f"# {plan.name}: generated by flashfx (matmul [{plan.M}, {plan.K}] x [{plan.K}, {plan.N}] "
             f"x{nb} + epilogue{'; the matmul by ATen' if product else ''})", "# FX nodes covered:"]
    lines += [f"#   {c}" for c in plan.covered]
    lines += ["import triton", "import triton.language as tl", ""]
    for h in dict.fromkeys(plan.helpers):
        lines += [HELPERS[h], ""]
    lines += ["@triton.jit", f"def {plan.name}({', '.join(params + [consts])}):"]
    lines += ["    " + b for b in body]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- lowering

def flat_ok(shape: Sequence[sympy.Expr], M: sympy.Expr, N: sympy.Expr) -> bool:
    """Whether a value of `shape` is the [M, N] product's elements in the same order."""
    if not shape or shape[-1] != N:
        return False
    return sympy.simplify(sympy.Mul(*shape[:-1]) - M) == 0


def input_kind(shape: Sequence[sympy.Expr], M: sympy.Expr, N: sympy.Expr, rows: Any = None) -> str:
    """How an outside tensor enters the [M, N] epilogue; LoweringError for any other broadcast. `rows`: a bmm's
    rows per batch (a [rows, N] tensor is then the same for every batch: "batchrow")."""
    if flat_ok(shape, M, N):
        return "full"
    if rows is not None and len(shape) >= 2 and tuple(shape[-2:]) == (rows, N) and all(s == 1 for s in shape[:-2]):
        return "batchrow"
    if all(s == 1 for s in shape[:-1]) and shape and shape[-1] in (N, 1):
        return "row" if shape[-1] == N else "scalar"
    if all(s == 1 for s in shape):
        return "scalar"
    raise LoweringError(f"a tensor of shape {list(shape)} broadcasts into the [M, N] product in a way the "
                        "matmul epilogue does not address")


def lower_matmul(name: str, mms: List[fx.Node], members: List[fx.Node]) -> MatmulPlan:
    """`mms` (sharing their left operand) and the epilogue `members` (graph order) -> MatmulPlan."""
    first = mms[0]
    a = first.args[1] if first.target is aten.addmm.default else first.args[0]
    out_shape = shape_of(first)
    M, N = sympy.Mul(*out_shape[:-1]), out_shape[-1]
    K = shape_of(a)[-1]
    bs = [m.args[2] if m.target is aten.addmm.default else m.args[1] for m in mms]
    plan = MatmulPlan(name, a, bs, list(mms), M, N, K, batched=first.target is aten.bmm.default)
    plan.members = list(members)
    env: Dict[fx.Node, Tuple[str, torch.dtype]] = {}
    loads: Dict[fx.Node, str] = {}
    memberset = set(members) | set(mms)

    def new(expr: str, source: str) -> str:
        v = f"v{len(plan.lines)}"
        plan.lines.append((v, expr, source))
        return v

    def operand(arg: Any, user: fx.Node) -> pw.Operand:
        if isinstance(arg, fx.Node) and arg in env:
            name, dtype = env[arg]
            return pw.Operand(f"{name}.to(tl.float32)", torch.float32) if dtype in LOW_PRECISION else \
                pw.Operand(name, dtype)
        if isinstance(arg, fx.Node):
            value = val(arg)
            if isinstance(value, torch.Tensor):
                if arg not in loads:
                    k = len(plan.inputs)
                    plan.inputs.append(arg)
                    kind = input_kind(shape_of(arg), M, N, out_shape[-2] if plan.batched else None)
                    plan.input_kinds.append(kind)
                    row = "rm[:, None]" if kind == "batchrow" else "i0"
                    loads[arg] = new(f"tl.load(in{k}_ptr + ({row} * in{k}_sm + i1 * in{k}_sn), mask=xmask, other=0)",
                                     arg.name)
                dtype = value.dtype
                name = loads[arg]
                return pw.Operand(f"{name}.to(tl.float32)", torch.float32) if dtype in LOW_PRECISION else \
                    pw.Operand(name, dtype)
            if isinstance(value, (torch.SymInt, torch.SymFloat, int, float)):
                if arg not in plan.scalars:
                    plan.scalars.append(arg)
                return pw.Operand(f"sc{plan.scalars.index(arg)}", torch.int64 if isinstance(value, (int, torch.SymInt))
                                  else torch.float32)
            raise LoweringError(f"argument {arg.name} of {user.name} is a {type(value).__name__}")
        if isinstance(arg, (bool, int, float)):
            return pw.Operand(pw.literal(arg), None, arg)
        return pw.Operand(str(arg), None, arg)

    for j, mm in enumerate(mms):
        plan.covered.append(mm.format_node())
        expr = f"acc{j}"
        if mm.target is aten.addmm.default:
            alpha, beta = mm.kwargs.get("alpha", 1), mm.kwargs.get("beta", 1)
            bias = operand(mm.args[0], mm)
            expr = (f"acc{j}" if alpha == 1 else f"acc{j} * {pw.literal(alpha)}") + \
                (f" + {bias}" if beta == 1 else f" + {pw.literal(beta)} * {bias}")
        env[mm] = (new(read_as_stored(mm, memberset, expr), mm.name), torch.float32)
    for node in members:
        plan.covered.append(node.format_node())
        packet = node.target.overloadpacket
        if packet in UNIT_VIEWS or packet in VIEWS:
            env[node] = env[node.args[0]]
            if shape_of(node) != out_shape and plan.view_shape is None and packet in VIEWS:
                plan.view_shape = node.args[1]
            continue
        ops = [operand(x, node) for x in node.args]
        kwargs = {k: (operand(v, node) if isinstance(v, fx.Node) else v) for k, v in node.kwargs.items()}
        expr = pw.render(node.target, ops, kwargs, plan.helpers)
        out_dtype = val(node).dtype
        if packet in CASTS:
            expr, dtype = f"({expr}).to({TL_DTYPES[out_dtype]})", out_dtype
        elif packet in COMPARISONS and out_dtype == torch.bool:
            dtype = torch.bool
        else:
            dtype = compute_dtype(out_dtype)
            if dtype != torch.float32:
                expr = f"({expr}).to({TL_DTYPES[dtype]})"
            expr = read_as_stored(node, memberset, expr)
        env[node] = (new(expr, node.name), dtype)
    view_dims = None
    for node in members:
        if node.target.overloadpacket in VIEWS and shape_of(node) != out_shape and plan.view_shape is node.args[1]:
            view_dims = shape_of(node)
    for node in list(mms) + list(members):
        if any(u not in memberset for u in node.users):
            if shape_of(node) != out_shape and shape_of(node) != view_dims:
                raise LoweringError(f"{node.name} {list(shape_of(node))} is needed outside, in a shape the kernel's "
                                    f"output {list(out_shape)} cannot be viewed as")
            plan.outputs.append((env[node][0], node))
    return plan


# --------------------------------------------------------------------------------------------------- launcher

def candidates(M: int, N: int, nb: int, interpreting: bool, backend: str) -> List[Dict[str, Any]]:
    """Configs to time for `backend`: "triton" (tiles of the whole kernel), "aten" (tiles of the epilogue kernel
    after ATen's matmul; marked "backend": "aten"), or "race" (both)."""
    fits = lambda m, n: m <= max(64, autotune.next_pow2(M)) and n <= max(64, autotune.next_pow2(N))
    configs = []
    if backend in ("triton", "race"):
        tiles = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                 (64, 64, 64, 4, 4)]
        if nb == 2:  # two accumulators: keep register use in check
            tiles = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]
        if interpreting:
            tiles = [(16, 16, 16, 4, 1)]
        configs += [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": w, "num_stages": s}
                    for m, n, k, w, s in tiles if interpreting or fits(m, n)]
    if backend in ("aten", "race"):
        tiles = [(16, 16, 4)] if interpreting else [(64, 64, 4), (32, 128, 4), (64, 128, 8), (128, 128, 8)]
        configs += [{"backend": "aten", "BLOCK_M": m, "BLOCK_N": n, "GROUP_M": 8, "num_warps": w}
                    for m, n, w in tiles if interpreting or fits(m, n)]
    return configs


class MatmulKernel:
    """Runs one matmul group: `kernel(a, b0, [b1], *epilogue_inputs, *scalars)` -> tuple of outputs.

    `backend`: "triton", "aten" or "race" (see the module docstring); `choices` records, per shape bucket, which
    one runs ("triton" or "aten")."""

    def __init__(self, plan: MatmulPlan, cache_dir: str, tune: bool, backend: str = "triton") -> None:
        self.plan = plan
        self.__name__ = self.__qualname__ = plan.name
        self.__module__ = __name__
        self.cache_dir, self.tune, self.backend = cache_dir, tune, backend
        self._fns: Dict[Tuple[bool, bool], Tuple[str, Any]] = {}
        self._configs: Dict[str, Dict[str, Any]] = {}
        self.choices: Dict[str, str] = {}
        self.kernel_name = plan.name  # the shared name (see kernel_cache.shared_name) once a source is emitted
        self.fallback = None  # a fallback.Fallback set by the fusion pass: the ATen ops, if the kernel fails

    def __repr__(self) -> str:
        return f"MatmulKernel({self.plan.name})"

    def __deepcopy__(self, memo: Any) -> "MatmulKernel":
        return self

    def source(self, ieee: bool, product: bool = False) -> Tuple[str, Any]:
        if (ieee, product) not in self._fns:
            name, src = kernel_cache.shared_name(self.plan.name, emit_matmul(self.plan, ieee, product))
            self.kernel_name = name
            module, _ = kernel_cache.load_module(name, src, self.cache_dir)
            self._fns[ieee, product] = (src, getattr(module, name))
        return self._fns[ieee, product]

    def __call__(self, *args: Any) -> Tuple[torch.Tensor, ...]:
        if self.fallback is None:
            return self._run(*args)
        return self.fallback.guard(lambda: self._run(*args), args)

    def _reference(self, args: Sequence[Any]) -> Tuple[torch.Tensor, ...]:
        """The ATen ops' outputs as the kernel returns them: [M, N]."""
        outs = self.fallback(args)
        if self.plan.batched:
            a = args[0]
            return tuple(t.reshape(a.shape[0], a.shape[1], t.shape[-1]) for t in outs)
        return tuple(t.reshape(-1, t.shape[-1]) for t in outs)

    def _run(self, *args: Any) -> Tuple[torch.Tensor, ...]:
        plan = self.plan
        nb = len(plan.bs)
        a, bs = args[0], args[1:1 + nb]
        ext = args[1 + nb:1 + nb + len(plan.inputs)]
        scalars = args[1 + nb + len(plan.inputs):]
        batch = a.shape[0] if plan.batched else 1
        M, K = a.shape[-2], a.shape[-1]  # rows of one batch
        N = bs[0].shape[-1]
        # epilogue tensors as [M, N]: the product's own layout ("full"), a row of N broadcast, or one scalar
        flat = [t.reshape(batch * M, N) if kind == "full" else t.reshape(M, N) if kind == "batchrow" else
                t.reshape(1, -1).expand(batch * M, N) for t, kind in zip(ext, plan.input_kinds)]
        ieee = a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        src, fn = self.source(ieee)
        bucket = f"{self.backend}:mm:b{batch}:m{autotune.next_pow2(M)}:n{N}:k{K}"
        grid_of = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]), batch)
        ext_strides = [s for t in flat for s in (t.stride(0), t.stride(1))]

        def launch(c: Dict[str, Any], compile_only: bool = False) -> List[torch.Tensor]:
            """Run config `c` and return its outputs; with `compile_only`, compile it and launch nothing."""
            outs = [torch.empty((batch * M, N), dtype=val(node).dtype, device=a.device) for _, node in plan.outputs]
            if c.get("backend") == "aten":  # cuBLAS writes each product, contiguous; the epilogue kernel reads it
                mm = torch.bmm if plan.batched else torch.mm
                tiles = {k: v for k, v in c.items() if k != "backend"}
                products = [torch.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device=a.device)
                            if compile_only else mm(a, b) for b in bs]
                kernel_args = [*products, *flat, *outs, *scalars, M, N, *ext_strides]
                launch_fn = self.source(ieee, product=True)[1]
            else:
                stride_args = [a.stride(-2), a.stride(-1)] + ([a.stride(0)] if plan.batched else [])
                stride_args += [s for b in bs for s in (b.stride(-2), b.stride(-1))]
                stride_args += [b.stride(0) for b in bs] if plan.batched else []
                tiles = dict(c, EVEN_K=K % c["BLOCK_K"] == 0)
                kernel_args = [a, *bs, *flat, *outs, *scalars, M, N, K, *stride_args, *ext_strides]
                launch_fn = fn
            with on_device(a.device):
                if compile_only:
                    launch_fn.warmup(*kernel_args, grid=grid_of(c), **tiles)
                else:
                    launch_fn[grid_of(c)](*kernel_args, **tiles)
            return outs

        config = self._configs.get(bucket)
        if config is None:
            key = kernel_cache.cache_key(src)
            config = kernel_cache.load_choices(self.cache_dir, key).get(bucket)
            with kernel_cache.triton_binaries_under(self.cache_dir):
                if config is None:
                    race = self.tune and a.is_cuda and batch * M * N * K >= 1 << 27
                    # "race" where timing is worth it: ATen's matmul + the epilogue kernel race the fused kernel
                    backend = "triton" if self.backend == "race" and not race else self.backend
                    configs = candidates(M, N, nb, _compat.triton_interpreting(), backend)
                    config = autotune.pick(configs, launch, race, functools.partial(launch, compile_only=True))
                    kernel_cache.save_choice(self.cache_dir, key, bucket, config)
                outs = launch(config)
            self._configs[bucket] = config
            self.choices[bucket] = config.get("backend", "triton")
        else:
            outs = launch(config)
        if plan.batched:
            outs = [o.view(batch, M, N) for o in outs]
        return tuple(outs)  # the product's shape; the graph views them back to each node's shape
