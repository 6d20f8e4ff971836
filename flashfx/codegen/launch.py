"""Launch a Triton kernel that has already run once without `JITFunction.run`'s per-call binding.

`fn[grid](*args, **meta)` binds and specialises every argument, builds a cache key and looks the compiled kernel up
on each call. For the attention kernels (40-odd arguments) that cost 36-56 us per launch on the H200 machine's CPU,
against 8-13 us for the compiled kernel's own launcher (2026-12-03, two machine starts; docs/benchmarks.md, attention
host time): four launches per forward+backward made short-sequence attention host-bound. A `Launcher` holds one
kernel and one set of fixed keyword arguments (the tuned config); the first call with a given *argument signature*
goes through `fn[grid]`, which compiles or loads the kernel and returns it; later calls with that signature call
the compiled kernel's launcher directly, with the statement `JITFunction.run` itself ends with.

The signature is at least as fine as Triton's specialisation, so a bound kernel is only reused where Triton would
have picked the same one: every argument's type; per tensor its dtype and whether its address is 16-byte aligned;
every other argument by value (a float too, which Triton never specialises on: finer, never wrong); and the current
CUDA device.

The direct call is used only where the installed Triton's `JITFunction.run` ends with the replayed statement (so a
Triton that changes its launch convention falls back to `fn[grid]`), only on CUDA tensors, and never while a
launch hook (a profiler such as Proton) is installed. FLASHFX_FAST_LAUNCH=0 turns it off.

`BoundCall` goes one step further for callers that key their launches themselves: a launch whose grid and
non-tensor arguments are fixed by the caller's key (the attention op's launch plans, a `FusedKernel`'s shapes and
strides) takes only its tensors and launches the compiled kernel directly. Measured on the H200 (2026-12-03,
docs/benchmarks.md): attention at S=2048 went from host-bound to its kernels' own rate (D64 causal fwd+bwd 96 ->
252 TFLOP/s); GPT-2's op-by-op training step ran ~12% faster with the generated kernels bound than through
`JITFunction.run` (medians of three alternating rounds, noisy), Llama's no different. (The fifth session's binding
of the generated kernels, removed after an A/B timed GPT-2 at 67.9 ms with it against 50.7 ms without, read Triton
3.6's launch hooks, `HookChain` objects that are never None, as installed hooks: it never bound a kernel and paid
for a signature on top of `JITFunction.run` at every launch.)
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from flashfx import _compat

# What JITFunction.run calls once it holds the compiled kernel (whitespace removed), Triton 3.4 to 3.9.
_RUN_STATEMENT = ("kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
                  "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())")

# Bound signatures kept per launcher: an argument that changes on every call (a seed) must not grow it forever.
MAX_BOUND = 64


@functools.lru_cache(maxsize=None)
def _triton_launches_as_replayed() -> bool:
    if not _compat.has_triton() or _compat.triton_interpreting():
        return False
    try:
        from triton.runtime.jit import JITFunction
        source = inspect.getsource(JITFunction.run)
    except (ImportError, OSError, TypeError):
        return False
    return _RUN_STATEMENT in "".join(source.split())


def fast_launch_available() -> bool:
    """Whether launches may skip `JITFunction.run` (see the module docstring); FLASHFX_FAST_LAUNCH=0 says no.
    (Read at every launch, so through `_compat.environment_values`.)"""
    choice = _compat.environment_values((b"FLASHFX_FAST_LAUNCH",))[0] or b"1"
    if choice not in (b"0", b"1"):
        raise ValueError(f"FLASHFX_FAST_LAUNCH={choice.decode(errors='replace')!r}: use '1' (bind launches) or '0' "
                         f"(Triton's own launch)")
    return choice == b"1" and _triton_launches_as_replayed()


def _hook_set(hook: Any) -> bool:
    # Triton 3.6+ keeps each launch hook as a HookChain, present even when empty; older ones None or a function
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_installed() -> bool:
    from triton import knobs
    return _hook_set(knobs.runtime.launch_enter_hook) or _hook_set(knobs.runtime.launch_exit_hook)


def _on_cuda(args: Sequence[Any]) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_cuda


def _current_device_and_stream() -> Tuple[int, int]:
    from triton.runtime import driver
    device = driver.active.get_current_device()
    return device, driver.active.get_current_stream(device)


def _picker(positions: Sequence[int], names: Optional[Sequence[str]] = None) -> Any:
    """A C-level getter of these positions (or of the names at these positions, from a dict) that always returns
    a tuple of them (itemgetter of one key returns the bare item)."""
    keys = [names[i] for i in positions] if names is not None else list(positions)
    if not keys:
        return lambda items: ()
    if len(keys) == 1:
        return lambda items: (items[keys[0]],)
    return operator.itemgetter(*keys)


class Launcher:
    """`fn[grid](*args, **kwargs, **fixed)` for one Triton JIT function. `fixed` holds what stays the same for every
    call of this launcher (the tuned config: tile constexprs and launch options such as num_warps), `kwargs` what a
    call may change (scalars and flags passed by name)."""

    __slots__ = ("fn", "fixed", "_names", "_bound", "_pickers", "_rest")

    def __init__(self, fn: Any, fixed: Dict[str, Any]) -> None:
        self.fn, self.fixed = fn, dict(fixed)
        self._names: Tuple[str, ...] = tuple(getattr(fn, "arg_names", ()))
        self._bound: Dict[Tuple[Any, ...], Any] = {}
        self._pickers: Dict[Tuple[type, ...], Tuple[Any, Any]] = {}  # argument types -> (tensor, other) getters
        self._rest: Dict[int, Any] = {}  # number of positional arguments -> getter of the named ones, in order

    def signature(self, args: Sequence[Any]) -> Tuple[Any, ...]:
        """What decides which compiled specialisation a call needs (finer than or equal to Triton's own): every
        argument's type (so 1, 1.0 and True differ), each tensor's dtype and 16-byte alignment, every other value.
        (isinstance against torch.Tensor is slow; the tensors' positions are found once per tuple of types.)"""
        types = tuple(map(type, args))
        pickers = self._pickers.get(types)
        if pickers is None:
            is_tensor = [issubclass(t, torch.Tensor) for t in types]
            pickers = self._pickers[types] = (_picker([i for i, t in enumerate(is_tensor) if t]),
                                              _picker([i for i, t in enumerate(is_tensor) if not t]))
        tensors = pickers[0](args)
        return types, tuple([t.dtype for t in tensors]), tuple([t.data_ptr() % 16 == 0 for t in tensors]), \
            pickers[1](args)

    def __call__(self, grid: Tuple[int, ...], args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None) -> None:
        self._launch(grid, args, kwargs or {})

    def bind(self, grid: Tuple[int, ...], args: Sequence[Any],
             kwargs: Optional[Dict[str, Any]] = None) -> Optional["BoundCall"]:
        """Launch like `__call__`, then return this launch as a `BoundCall` (only its tensors change at the next
        call), or None where it could not be bound (not on CUDA, fast launch off, a launch hook installed)."""
        launched = self._launch(grid, args, kwargs or {})
        return BoundCall(*launched, grid) if launched is not None else None

    def _launch(self, grid: Tuple[int, ...], args: Sequence[Any],
                kwargs: Dict[str, Any]) -> Optional[Tuple[Any, Tuple[Any, ...], int]]:
        """Launch; return (the compiled kernel, every argument in the kernel's order, the device) where the launch
        may be replayed directly, else None (it went through `fn[grid]` and nothing is bound)."""
        where = direct_stream() if self._names and _on_cuda(args) else None
        full = self._positional(args, kwargs) if where is not None else None
        if full is None:
            self.fn[grid](*args, **kwargs, **self.fixed)
            return None
        device, stream = where
        sig = (device, self.signature(full))
        kernel = self._bound.get(sig)
        if kernel is not None:
            _run(kernel, _grid3(grid), stream, full)
            return kernel, full, device
        kernel = self.fn[grid](*args, **kwargs, **self.fixed)
        if kernel is None or getattr(kernel, "function", None) is None:
            return None
        if len(self._bound) < MAX_BOUND:
            self._bound[sig] = kernel
        return kernel, full, device

    def _positional(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
        """Every parameter's value in the kernel's order (what the compiled launcher takes); None if one is left
        to its default (the direct launch does not guess defaults)."""
        rest = self._rest.get(len(args))
        if rest is None:
            rest = self._rest[len(args)] = _picker(range(len(args), len(self._names)), self._names)
        try:
            return (*args, *rest({**kwargs, **self.fixed}))
        except KeyError:
            return None


class BoundCall:
    """One bound launch whose grid and non-tensor arguments are fixed: a call passes only the tensors (in the
    order they were bound) and launches the compiled kernel, or returns False, launching nothing, where the bound
    kernel may not fit (another tensor dtype or 16-byte alignment, another device, fast launch turned off, a launch
    hook installed). The caller must key its BoundCalls on everything that decides the non-tensor arguments."""

    __slots__ = ("kernel", "grid", "template", "slots", "device", "dtypes", "aligned")

    def __init__(self, kernel: Any, full: Sequence[Any], device: int, grid: Tuple[int, ...]) -> None:
        self.kernel, self.device, self.grid = kernel, device, _grid3(grid)
        self.slots = tuple(i for i, a in enumerate(full) if isinstance(a, torch.Tensor))
        # the bound tensors are not kept alive by the template: each call puts its own in their slots
        self.template = [None if i in self.slots else a for i, a in enumerate(full)]
        self.dtypes = tuple(full[i].dtype for i in self.slots)
        self.aligned = tuple(full[i].data_ptr() % 16 == 0 for i in self.slots)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> bool:
        where = direct_stream()
        return where is not None and self.launch(tensors, *where)

    def launch(self, tensors: Sequence[torch.Tensor], device: int, stream: int) -> bool:
        """The launch on `stream` (`direct_stream()`'s answer, fetched once for several bound calls in a row)."""
        if len(tensors) != len(self.slots):
            raise ValueError(f"BoundCall: {len(tensors)} tensors for {len(self.slots)} tensor arguments")
        if (device != self.device or tuple([t.dtype for t in tensors]) != self.dtypes
                or tuple([t.data_ptr() % 16 == 0 for t in tensors]) != self.aligned):
            return False
        args = list(self.template)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        _run(self.kernel, self.grid, stream, args)
        return True


def _grid3(grid: Tuple[int, ...]) -> Tuple[int, int, int]:
    return grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1


def _run(kernel: Any, grid: Tuple[int, int, int], stream: int, args: Sequence[Any]) -> None:
    """The compiled kernel's own launch: the statement `JITFunction.run` ends with, no launch hooks."""
    kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)


def direct_stream() -> Optional[Tuple[int, int]]:
    """(current device, its stream) where bound calls may launch now; None with FLASHFX_FAST_LAUNCH=0 or while a
    launch hook (a profiler) is installed."""
    if not fast_launch_available() or _hooks_installed():
        return None
    return _current_device_and_stream()


_LAUNCHERS: Dict[Tuple[Any, Tuple[Tuple[str, Any], ...]], Launcher] = {}


def sm_programs(device: torch.device, per_sm: int, interpreted: int) -> int:
    """`per_sm` programs on each of a GPU's SMs (a persistent grid); `interpreted` on the CPU interpreter (a few,
    so that each program walks several blocks)."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return interpreted


def launcher(fn: Any, **fixed: Any) -> Launcher:
    """The one `Launcher` of `fn` with these fixed keyword arguments (kernels are module-level: kept for good)."""
    key = (fn, tuple(sorted(fixed.items())))
    found = _LAUNCHERS.get(key)
    if found is None:
        found = _LAUNCHERS[key] = Launcher(fn, fixed)
    return found
