"""Launch a bound Triton kernel without `JITFunction.run`'s per-call work.

`fn[grid](*args, **meta)` binds and specialises every argument, builds a cache key string and looks the kernel up
on each call: on the H100 machine's CPU about 0.13 ms per launch under cProfile, which made GPT-2's training step
host-bound (46 ms per step for 33 ms of GPU work, docs/benchmarks.md). A `Launcher` holds one kernel and one set
of constexpr arguments; the first call with a given *argument signature* goes through `fn[grid]` (which compiles
or loads the kernel and returns it), later calls with the same signature call the compiled kernel's launcher
directly, as `JITFunction.run` itself does after its cache lookup.

The signature is at least as fine as Triton's own specialisation, so a bound kernel is only reused where Triton
would have chosen the same one: per tensor its dtype and whether its address is 16-byte aligned; every int and bool
by value; floats by type (Triton never specialises on a float's value); None as None.

The direct call replays the statement `JITFunction.run` ends with. It is used only where that statement is found in
the installed Triton's source (so a Triton that changes its launch convention falls back to `fn[grid]`), only on
CUDA, and never while a launch hook (a profiler such as Proton) is installed.

Opt-in for now (FLASHFX_FAST_LAUNCH=1): its one H100 measurement is confounded. GPT-2's training step took 88 ms
(p20-p80 74-107) with it on, against 46 ms (41-49) in the morning's run without it, on another machine whose host
compiled the same model 19% slower; the run that would have timed it off in the same call was cut by its time
limit (docs/benchmarks.md). No mechanism for a slowdown is known; until an A/B in one process says which way it
goes, the default stays Triton's own launch.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from flashfx import _compat

# What JITFunction.run calls once it holds the compiled kernel (whitespace removed), as written in Triton 3.9;
# `fast_launch_available` looks for it in the installed Triton.
_RUN_STATEMENT = ("kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
                  "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())")


# Signatures remembered per launcher. An int that changes every call (attention's dropout seed) makes a new
# signature each time: past this many, such calls keep going through fn[grid] instead of growing the table.
MAX_BOUND = 64


@functools.lru_cache(maxsize=None)
def fast_launch_available() -> bool:
    """Whether the installed Triton launches the way `Launcher` replays (see the module docstring)."""
    if os.environ.get("FLASHFX_FAST_LAUNCH", "0") != "1" or not _compat.has_triton():
        return False
    if _compat.triton_interpreting():
        return False
    try:
        from triton.runtime.jit import JITFunction
        source = inspect.getsource(JITFunction.run)
    except (ImportError, OSError, TypeError):
        return False
    return _RUN_STATEMENT in "".join(source.split())


def _hooks_installed() -> bool:
    from triton import knobs
    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


def _on_cuda(args: Sequence[Any]) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_cuda


def _current_stream() -> int:
    from triton.runtime import driver
    return driver.active.get_current_stream(driver.active.get_current_device())


def argument_signature(args: Sequence[Any], constexpr: Sequence[bool]) -> Tuple[Any, ...]:
    """What decides which compiled specialisation a call needs (finer than or equal to Triton's own)."""
    sig = []
    for a, const in zip(args, constexpr):
        if isinstance(a, torch.Tensor):
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, float) and not const:
            sig.append(float)
        else:  # int, bool, None, a constexpr of any type: by value
            sig.append(a)
    return tuple(sig)


class Launcher:
    """`fn[grid](*args, **kwargs, **fixed)` for one Triton JIT function. `fixed` holds what stays the same for
    every call of this launcher (launch options such as num_warps, and tile constexprs), `kwargs` what a call
    may change (scalars passed by name)."""

    __slots__ = ("fn", "fixed", "_names", "_constexpr", "_bound")

    def __init__(self, fn: Any, fixed: Dict[str, Any]) -> None:
        self.fn, self.fixed = fn, dict(fixed)
        params = getattr(fn, "params", None)
        self._names: Tuple[str, ...] = tuple(getattr(fn, "arg_names", ()))
        self._constexpr = tuple(bool(p.is_constexpr) for p in params) if params else None
        self._bound: Dict[Tuple[Any, ...], Any] = {}

    def __call__(self, grid: Tuple[int, ...], args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None) -> None:
        kwargs = kwargs or {}
        if self._constexpr is None or not fast_launch_available() or not _on_cuda(args):
            self.fn[grid](*args, **kwargs, **self.fixed)
            return
        full = self._positional(args, kwargs)
        if full is None:
            self.fn[grid](*args, **kwargs, **self.fixed)
            return
        sig = argument_signature(full, self._constexpr)
        kernel = self._bound.get(sig)
        if kernel is not None and not _hooks_installed():
            stream = _current_stream()
            kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                       kernel.function, kernel.packed_metadata, None, None, None, *full)
            return
        kernel = self.fn[grid](*args, **kwargs, **self.fixed)
        if kernel is not None and getattr(kernel, "function", None) is not None and len(self._bound) < MAX_BOUND:
            self._bound[sig] = kernel

    def _positional(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
        """Every parameter's value in the kernel's order (what the compiled launcher takes); None if one is left
        to its default (the fast path does not guess defaults)."""
        fixed = self.fixed
        try:
            rest = [kwargs[n] if n in kwargs else fixed[n] for n in self._names[len(args):]]
        except KeyError:
            return None
        return (*args, *rest)


_LAUNCHERS: Dict[Tuple[Any, Tuple[Tuple[str, Any], ...]], Launcher] = {}


def launcher(fn: Any, **fixed: Any) -> Launcher:
    """The one `Launcher` of `fn` with these fixed keyword arguments (kernels are module-level: kept for good)."""
    key = (fn, tuple(sorted(fixed.items())))
    found = _LAUNCHERS.get(key)
    if found is None:
        found = _LAUNCHERS[key] = Launcher(fn, fixed)
    return found
