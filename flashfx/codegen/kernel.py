"""`FusedKernel`: the callable a fusion group becomes in the graph. It allocates the group's outputs with the
strides the ATen graph promised, reads the symbolic sizes from its inputs, picks the kernel variant for the
layouts it is given (contiguous run or strided, per tensor), and launches it with an autotuned config."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import triton

from flashfx import _compat
from flashfx.codegen import autotune, column_sum, kernel_cache
from flashfx.codegen.emit import KernelSource, Signature, Layout, emit, symbolic_dims
from flashfx.codegen.launch import BoundCall, Launcher, launcher, sm_programs
from flashfx.codegen.lower import Plan, nonunit, shape_of, strides_of, x_dims

_STATS = {"cache_hits": 0, "cache_misses": 0}

# Offsets are int32 while every tensor a kernel reads or writes spans fewer elements than this (a margin below
# 2**31 for the block that overhangs the end), else int64.
INT32_REACH = 2 ** 31 - 2 ** 20


def cache_stats() -> Dict[str, int]:
    """Kernel modules this process found on disk (hits) or wrote (misses); the disk-cache test reads it."""
    return dict(_STATS)


def _layout(plan: Plan, spec: Any, strides: Dict[int, Any], sizes: Sequence[Any], mode: str) -> Layout:
    """'s' for a scalar, 'c' when the tensor is one contiguous run in iteration order, else its strided P dims."""
    if spec.kind == "col":
        return "p"  # partials: addressed by program and column, not through P
    if spec.kind == "scalar" and not spec.shift:
        return "s"
    space = nonunit(plan.P) if spec.kind == "full" else x_dims(plan.P, plan.rdims)
    trailing_r = not plan.rdims or nonunit(plan.P) == x_dims(plan.P, plan.rdims) + [
        d for d in nonunit(plan.P) if d in plan.rdims]
    expected, contiguous = 1, spec.kind == "row" or mode == "pointwise" or trailing_r
    for d in reversed(space):
        if strides.get(d, 0) != expected:
            contiguous = False
        expected = expected * sizes[d]
    if contiguous and all(d in strides for d in space) and not spec.shift:
        return "c"
    return tuple(d for d in sorted(strides) if strides[d] != 0)


def on_device(device: torch.device) -> Any:
    """Triton launches on the current CUDA device: make it the tensors' one (a no-op on one GPU)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _kernel_meta(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config's Triton launch options: without the launcher's own keys (the kernel variant, the program count,
    whether the next row block is prefetched, the stages of a pipelined row loop)."""
    return {k: v for k, v in config.items() if k not in ("mode", "programs", "prefetch", "row_stages")}


def _variant_key(config: Dict[str, Any]) -> Tuple[Any, bool, int]:
    return config.get("mode"), bool(config.get("prefetch", False)), int(config.get("row_stages", 0))


class _FastLaunch:
    """How `FusedKernel` launches for one key (shapes, strides, scalars) once its config is chosen."""

    __slots__ = ("out_specs", "run", "param_plan", "tensors", "grid", "columns", "bound", "unbound")

    def __init__(self, out_specs: List[Tuple], run: Launcher, param_plan: List[Tuple[int, Any]],
                 grid: Tuple[int, ...], columns: List[Tuple[int, List[int], torch.dtype]]) -> None:
        self.out_specs, self.run, self.param_plan, self.grid, self.columns = out_specs, run, param_plan, grid, columns
        self.tensors = [(kind, i) for kind, i in param_plan if kind != 2]  # inputs (0) and outputs (1), in order
        self.bound: Optional[BoundCall] = None  # every non-tensor argument is fixed by the key
        self.unbound = True


class FusedKernel:
    """Runs one fusion group. Called as `kernel(*input_tensors, *scalars)`; returns a tuple of outputs."""

    def __init__(self, plan: Plan, cache_dir: str, tune: bool) -> None:
        self.plan = plan
        self.__name__ = self.__qualname__ = plan.name
        self.__module__ = __name__
        self.cache_dir, self.tune = cache_dir, tune
        self._variants: Dict[Signature, Tuple[KernelSource, Any]] = {}
        self._configs: Dict[Tuple[Signature, str], Dict[str, int]] = {}
        self._fast: Dict[Any, _FastLaunch] = {}
        self.fallback = None  # a fallback.Fallback set by the fusion pass: the ATen ops, if the kernel fails
        exprs = list(plan.P)
        for o in plan.outputs:
            exprs += list(shape_of(o.node)) + list(strides_of(o.node))
        self._n_out = len(plan.outputs)
        self._sizes_fn = sympy.lambdify(plan.symbols, exprs, modules="math") if plan.symbols else None
        self._static = [int(e) for e in exprs] if not plan.symbols else None

    def __repr__(self) -> str:
        return f"FusedKernel({self.plan.name})"

    def __deepcopy__(self, memo: Any) -> "FusedKernel":
        return self  # stateless apart from caches; graph copies share it

    # ------------------------------------------------------------------------------------------ variants
    def meta_signature(self) -> Signature:
        """The signature the ATen graph's own (fake) layouts call for; fusion emits it for the report."""
        plan = self.plan
        P = list(plan.P)
        r = sympy.Mul(*[P[d] for d in plan.rdims]) if plan.rdims else 1
        mode = "pointwise" if not plan.is_reduction else ("persistent" if not sympy.sympify(r).free_symbols
                                                            and autotune.next_pow2(int(r))
                                                            <= autotune.PERSISTENT_MAX_RBLOCK else "looped")
        # a symbolic reduced extent assumes registers suffice (hidden sizes are static in practice)
        if plan.is_reduction and sympy.sympify(r).free_symbols:
            mode = "persistent"

        def lay(spec: Any, shape: Sequence[Any], strides: Sequence[Any]) -> Layout:
            st = {pd: strides[i] for i, pd in enumerate(spec.dmap) if pd is not None and shape[i] != 1}
            return _layout(plan, spec, st, P, mode)

        ins = tuple(lay(t, shape_of(t.node), strides_of(t.node)) for t in plan.inputs)
        outs = tuple(lay(t, shape_of(t.node), strides_of(t.node)) for t in plan.outputs)
        return Signature(mode, ins, outs)

    def variant(self, sig: Signature) -> Tuple[KernelSource, Any]:
        if sig not in self._variants:
            src = emit(self.plan, sig)
            name, source = kernel_cache.shared_name(self.plan.name, src.source)
            src = dataclasses.replace(src, name=name, source=source)
            module, hit = kernel_cache.load_module(name, source, self.cache_dir)
            _STATS["cache_hits" if hit else "cache_misses"] += 1
            self._variants[sig] = (src, getattr(module, name))
        return self._variants[sig]

    # ------------------------------------------------------------------------------------------- running
    def _sizes(self, tensors: Sequence[torch.Tensor], scalars: Sequence[Any]) -> List[int]:
        if self._static is not None:
            return self._static
        vals = [int(tensors[s[1]].shape[s[2]]) if s[0] == "tensor" else scalars[s[1]]
                for s in self.plan.symbol_sources]
        return [int(v) for v in self._sizes_fn(*vals)]

    def __call__(self, *args: Any) -> Tuple[torch.Tensor, ...]:
        n_in = len(self.plan.inputs)
        key = tuple((tuple(t.shape), t.stride(), t.device) for t in args[:n_in]) + tuple(args[n_in:])
        fast = self._fast.get(key)
        if fast is None:
            if self.fallback is None:
                return self._call_slow(key, args)
            return self.fallback.guard(lambda: self._call_slow(key, args), args)
        outs = [torch.empty_strided(shape, stride, dtype=dtype, device=dev) if stride is not None else
                torch.zeros(shape, dtype=dtype, device=dev) for shape, stride, dtype, dev in fast.out_specs]
        if fast.bound is not None and fast.bound([args[i] if kind == 0 else outs[i] for kind, i in fast.tensors]):
            return self._finish(outs, fast.columns, fast.grid[0])
        call_args = [args[i] if kind == 0 else (outs[i] if kind == 1 else i) for kind, i in fast.param_plan]
        with on_device(fast.out_specs[0][3]):
            if fast.unbound:  # the second call binds (the first went through Triton's launch while tuning)
                fast.unbound = False
                fast.bound = fast.run.bind(fast.grid, call_args)
            else:
                fast.run(fast.grid, call_args)
            return self._finish(outs, fast.columns, fast.grid[0])

    @staticmethod
    def _finish(outs: List[torch.Tensor], columns: List[Tuple[int, List[int], torch.dtype]],
                programs: int) -> Tuple:
        """Column sums: add the partial rows of the `programs` that ran (a small [programs, columns] fp32 buffer)."""
        for k, shape, dtype in columns:
            outs[k] = column_sum.sum_partials(outs[k][:programs], shape, dtype)
        return tuple(outs)

    @staticmethod
    def column_programs(device: torch.device) -> List[int]:
        """Program counts a kernel with column sums may run (its partials have one row per program): enough to fill
        the GPU, few enough for small partials; the first is the default, the others are timed when tuning."""
        return list(dict.fromkeys(sm_programs(device, per_sm, 8) for per_sm in autotune.COLUMN_PROGRAMS_PER_SM))

    @staticmethod
    def row_loop_programs(device: torch.device) -> int:
        """Programs of a persistent kernel that walks its row blocks in a pipelined loop."""
        return sm_programs(device, autotune.ROW_LOOP_PROGRAMS_PER_SM, 2)

    def _call_slow(self, key: Any, args: Sequence[Any]) -> Tuple[torch.Tensor, ...]:
        """First call for these shapes/strides: choose the variant and config, then remember how to launch."""
        plan = self.plan
        n_in = len(plan.inputs)
        tensors, scalars = args[:n_in], args[n_in:]
        flat = self._sizes(tensors, scalars)
        P, pos = flat[:len(plan.P)], len(plan.P)
        device = tensors[0].device if tensors else torch.device("cpu")
        outs = []
        for o in plan.outputs:
            nd = len(shape_of(o.node))
            shape, stride = flat[pos:pos + nd], flat[pos + nd:pos + 2 * nd]
            pos += 2 * nd
            outs.append(torch.empty_strided(shape, stride, dtype=o.dtype, device=device))
        rnumel = 1
        for d in plan.rdims:
            rnumel *= P[d]
        xnumel = 1
        for d in (x_dims(plan.P, plan.rdims) if plan.is_reduction else nonunit(plan.P)):
            xnumel *= P[d]
        if xnumel == 0 or rnumel == 0:
            return self._empty_result(outs, rnumel)
        columns = [(k, list(outs[k].shape), o.dtype) for k, o in enumerate(plan.outputs) if o.kind == "col"]
        programs = self.column_programs(device) if columns else [0]
        for k, _, _ in columns:
            outs[k] = torch.zeros((max(programs), rnumel), dtype=torch.float32, device=device)

        def grid_of(config: Dict[str, Any]) -> Tuple[int]:
            blocks = triton.cdiv(xnumel, config["XBLOCK"])
            if columns:  # (a choice saved on another GPU may ask for more programs than this one's partials have rows)
                return (min(blocks, config.get("programs", programs[0]), max(programs)),)
            if config.get("row_stages"):
                return (min(blocks, config.get("programs", self.row_loop_programs(device))),)
            return (blocks,)
        interpreting = _compat.triton_interpreting()
        # small kernels are launch-bound whatever their blocks: time configs only where bandwidth matters
        tune = self.tune and device.type == "cuda" and xnumel * rnumel >= autotune.TUNE_MIN_ELEMENTS
        modes = autotune.modes(plan.is_reduction, rnumel, tune)

        def strides_of_tensor(t: torch.Tensor, spec: Any) -> Dict[int, int]:
            return {pd: t.stride(i) for i, pd in enumerate(spec.dmap) if pd is not None and t.shape[i] != 1}

        in_st = [strides_of_tensor(t, s) for t, s in zip(tensors, plan.inputs)]
        out_st = [strides_of_tensor(t, s) for t, s in zip(outs, plan.outputs)]
        # int32 offsets unless some tensor spans 2**31 elements (strides included: a view can reach further)
        reach = max([xnumel * rnumel] + [sum((t.shape[i] - 1) * abs(t.stride(i)) for i in range(t.dim())) + 1
                                         for t in list(tensors) + outs])
        values: Dict[str, Any] = {"xnumel": xnumel, "rnumel": rnumel}
        for k, t in enumerate(tensors):
            values[f"in{k}_ptr"] = t
            for d, s in in_st[k].items():
                values[f"in{k}_s{d}"] = s
        for k, t in enumerate(outs):
            values[f"out{k}_ptr"] = t
            for d, s in out_st[k].items():
                values[f"out{k}_s{d}"] = s
        for k, s in enumerate(scalars):
            values[f"sc{k}"] = s
        for d in symbolic_dims(plan):
            values[f"ks{d}"] = P[d]
        variants = {}
        for mode in modes:
            sig = Signature(mode, tuple(_layout(plan, s, st, P, mode) for s, st in zip(plan.inputs, in_st)),
                            tuple(_layout(plan, s, st, P, mode) for s, st in zip(plan.outputs, out_st)),
                            32 if reach < INT32_REACH else 64)
            variants[(mode, False, 0)] = (sig,) + self.variant(sig)
        # how a persistent kernel walks its row blocks, (prefetch, row_stages) pairs, the default first: with column
        # sums it always loops (prefetching, or pipelined by Triton); without, it may loop when rows outnumber programs
        prefetch = autotune.COLUMN_PREFETCH if tune else autotune.COLUMN_PREFETCH[:1]
        stages = autotune.ROW_STAGES if tune else autotune.ROW_STAGES[:1]
        if not columns:
            prefetch = (False,)
            if xnumel <= self.row_loop_programs(device):
                stages = (0,)
        walks = list(dict.fromkeys((f, 0 if f else s) for f in prefetch for s in stages))
        if ("persistent", False, 0) in variants:
            base = variants[("persistent", False, 0)][0]
            for f, s in walks:
                sig = dataclasses.replace(base, prefetch=f, row_stages=s)
                variants[("persistent", f, s)] = (sig,) + self.variant(sig)

        def launch(config: Dict[str, Any], compile_only: bool = False) -> None:
            _, src, fn = variants[_variant_key(config)]
            meta = _kernel_meta(config)
            kernel_args = [values[p] for p in src.params]
            with on_device(device):
                if compile_only:
                    fn.warmup(*kernel_args, grid=grid_of(config), **meta)
                    return
                for k, _, _ in columns:  # partials accumulate: every launch starts from zero
                    outs[k].zero_()
                fn[grid_of(config)](*kernel_args, **meta)

        def launch_and_sum(config: Dict[str, Any]) -> None:
            """What a config is timed by: with column sums, the program count also sets the partials' size."""
            launch(config)
            with on_device(device):
                self._finish(list(outs), columns, grid_of(config)[0])

        # one autotune entry per group source (its first mode's variant) and shape bucket
        first_sig, first_src, _ = variants[(modes[0], False, 0)]
        b = autotune.bucket(plan.is_reduction, xnumel, rnumel)
        config = self._configs.get((first_sig, b))
        if config is None:
            cache_key = kernel_cache.cache_key(first_src.source)
            config = kernel_cache.load_choices(self.cache_dir, cache_key).get(b)
            if config is not None and _variant_key(config) not in variants:
                config = None
            with kernel_cache.triton_binaries_under(self.cache_dir):
                if config is None:
                    configs = [dict(c, mode=m) for m in modes
                               for c in autotune.candidates(m, xnumel, rnumel, interpreting)]
                    if columns and tune:  # the program count changes the grid, not the binary (compiled once)
                        configs = [dict(c, programs=p) for c in configs for p in programs]
                    loop_programs = {} if columns else {"programs": self.row_loop_programs(device)}
                    configs = [dict(c, prefetch=f, row_stages=s, **(loop_programs if s else {}))
                               for f, s in walks for c in configs if c["mode"] == "persistent"] + [
                        c for c in configs if c["mode"] != "persistent"]
                    config = autotune.pick(configs, launch_and_sum, tune, functools.partial(launch, compile_only=True),
                                           binary=lambda c: (_variant_key(c), sorted(_kernel_meta(c).items())))
                    kernel_cache.save_choice(self.cache_dir, cache_key, b, config)
                launch(config)  # compiles (or loads the cached binary) under cache_dir
            self._configs[(first_sig, b)] = config
        else:
            launch(config)
        _, src, fn = variants[_variant_key(config)]
        # how to launch next time: 0 = an input tensor, 1 = an output, 2 = a constant
        marks = {f"in{k}_ptr": (0, k) for k in range(n_in)}
        marks.update({f"out{k}_ptr": (1, k) for k in range(len(outs))})
        param_plan = [marks.get(p, (2, values[p])) for p in src.params]
        meta = _kernel_meta(config)
        col_ks = {k for k, _, _ in columns}
        # partials: one row per program the chosen grid runs, summed by _finish; a persistent kernel stores each row
        # once (left uninitialised: contiguous strides), a looped one adds into it (zeroed at each call: no strides)
        grid = grid_of(config)
        col_stride = (rnumel, 1) if config["mode"] == "persistent" else None
        out_specs = [((grid[0], rnumel), col_stride, o.dtype, o.device) if k in col_ks else
                     (tuple(o.shape), o.stride(), o.dtype, o.device) for k, o in enumerate(outs)]
        self._fast[key] = _FastLaunch(out_specs, launcher(fn, **meta), param_plan, grid, columns)
        with on_device(device):
            return self._finish(outs, columns, grid[0])

    def _empty_result(self, outs: List[torch.Tensor], rnumel: int) -> Tuple[torch.Tensor, ...]:
        """Zero-size groups: nothing to launch; a reduction over nothing is computed by the ATen reference."""
        if rnumel == 0 and any(o.numel() for o in outs):
            raise NotImplementedError(f"{self.plan.name}: reduction over an empty extent")
        return tuple(outs)
