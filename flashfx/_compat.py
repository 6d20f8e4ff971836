"""Version and platform differences, gated in one place (torch 2.11–2.13, Triton 3.6–3.9, CPU or CUDA)."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether flashfx's Triton kernels can run on tensors of `device`.

    On CUDA they compile; on the CPU only through the Triton interpreter. Elsewhere flashfx's ops
    fall back to their ATen reference implementation.
    """
    if not has_triton():
        return False
    if device.type == "cuda":
        return not triton_interpreting()
    if device.type == "cpu":
        return triton_interpreting()
    return False


_ENVIRON_DATA = getattr(os.environ, "_data", None)  # POSIX: the process environment as a dict of bytes


def environment_values(names_bytes: tuple) -> tuple:
    """The current values of these environment variables (names as bytes), for a cache key built at every call:
    os.environ's own dict read directly, ~10x cheaper than `os.environ.get` (which encodes and decodes each name).
    Values come back as bytes (None if unset), also where os.environ keeps no such dict."""
    if isinstance(_ENVIRON_DATA, dict):
        return tuple(map(_ENVIRON_DATA.get, names_bytes))
    values = (os.environ.get(n.decode()) for n in names_bytes)
    return tuple(v if v is None else v.encode() for v in values)


def triton_version() -> str:
    if not has_triton():
        return "not installed"
    import triton

    return triton.__version__


def triton_allocator_missing() -> bool:
    """Whether the current context has no `triton.set_allocator` allocator (kernels with device-side tensor
    descriptors need one). Triton 3.6–3.9 keep it in a private ContextVar; a Triton without that reads as
    missing, so flashfx sets its own there and may then replace one the caller set."""
    try:
        from triton.runtime import _allocation

        return isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        return True


def autotune_disk_cache_kwargs() -> dict:
    """Keyword arguments that make `triton.autotune` keep its results on disk, where this Triton can (>= 3.2)."""
    import inspect

    import triton

    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def boxed_graph_module(gm: torch.fx.GraphModule):
    """`gm` as AOTAutograd's boxed callable: called with one list of inputs, which it empties, then drops each
    input after its last use (so the backward frees a saved activation where it last reads it, not at its end).
    Where this torch's fx lacks the boxed code generator: `make_boxed_func` (inputs held until the call returns)."""
    from torch._functorch.aot_autograd import make_boxed_func

    codegen = getattr(torch.fx.graph, "_BoxedCodeGen", None)
    if codegen is None:
        return make_boxed_func(gm)
    gm.graph.set_codegen(codegen())
    gm.recompile()
    if not isinstance(getattr(type(gm), "_boxed_call", None), property):  # newer fx derives it from the codegen
        gm._boxed_call = True
    return gm
