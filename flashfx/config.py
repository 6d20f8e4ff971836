"""`Config`: every knob of the compiler, validated when it is built."""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

# Allowed values of the enumerated fields; the error messages quote them.
ATTENTION_MODES = ("exact", "off")
QUANTIZE_MODES = (None,)  # int8 / fp8 / int4 weights are planned; only "no quantization" exists today.
REMAT_COMPRESS_MODES = (None, "fp8")
CUDA_GRAPHS_MODES = (True, False, "training")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FLASHFX_CACHE_DIR") or os.path.join(base, "flashfx")


@dataclass(init=False)
class Config:
    """What flashfx does to a model.

    Example::

        >>> import flashfx
        >>> flashfx.Config(attention="off", fusion=True).attention
        'off'
        >>> flashfx.Config(remat=0.5).remat
        0.5

    Fields:
        attention: ``"exact"`` replaces every attention it can prove equivalent with the tiled flash kernel;
            ``"off"`` leaves attention alone.
        fusion: fuse pointwise / reduction / matmul-epilogue groups into generated Triton kernels.
        cross_entropy: rewrite ``linear -> cross_entropy`` into the chunked fused op.
        remat: activation-memory budget for training: ``None`` (off), a fraction in (0, 1] of the
            activation bytes saved without remat, an int byte count, ``"auto"`` (the least recompute that fits
            the free GPU memory) or ``"speed"`` (no budget: recompute a value when that is predicted cheaper than
            writing and reading it back).
        remat_compress: ``None`` or ``"fp8"`` (store chosen saved activations in fp8 with a scale).
        quantize: weight quantization scheme; only ``None`` today.
        autotune: autotune block sizes per shape (otherwise the first config of each kernel is used).
        cuda_graphs: ``True`` replays inference graphs (no autograd) on CUDA as CUDA graphs, one per input
            signature seen twice, so a call costs one launch instead of one per kernel; each keeps a private memory
            pool of the graph's intermediates. ``"training"`` also replays the forward and backward graphs of
            training (flashfx/cuda_graphs_training.py: the saved activations stay in the pool, the loss and the
            gradients are copied out). ``False``: never. Graphs a replay could change (in-place writes to inputs,
            random numbers, host tensors) run op by op, and the report says why.
        cache_dir: where compiled kernels and autotune results are kept.
        debug: after each pass, run its input and output graphs on the example inputs and name the first
            pass whose output diverges.
    """

    attention: str = "exact"
    fusion: bool = True
    cross_entropy: bool = True
    remat: Optional[Union[float, int, str]] = None
    remat_compress: Optional[str] = None
    quantize: Optional[str] = None
    autotune: bool = True
    cuda_graphs: Union[bool, str] = True
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    debug: bool = False

    def __init__(self, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(names)}"
                raise TypeError(f"flashfx.Config got an unknown option {key!r}{hint}")
        for f in dataclasses.fields(self):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(self, f.name, value)
        self._validate()

    def replace(self, **changes: Any) -> "Config":
        return Config(**{**dataclasses.asdict(self), **changes})

    def _validate(self) -> None:
        _check_choice("attention", self.attention, ATTENTION_MODES)
        for flag in ("fusion", "cross_entropy", "autotune", "debug"):
            _check_bool(flag, getattr(self, flag))
        if not (isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "training"):
            raise ValueError(f"flashfx.Config: cuda_graphs={self.cuda_graphs!r} is not allowed; choose one of "
                             f"{', '.join(map(repr, CUDA_GRAPHS_MODES))}")
        _check_choice("quantize", self.quantize, QUANTIZE_MODES,
                      extra="(int8 / fp8 / int4 weight quantization is not implemented yet)")
        _check_choice("remat_compress", self.remat_compress, REMAT_COMPRESS_MODES)
        _check_remat(self.remat)
        if not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"flashfx.Config: cache_dir={self.cache_dir!r} must be a directory path (str)")


def _check_choice(field: str, value: Any, allowed: tuple, extra: str = "") -> None:
    if value not in allowed:
        raise ValueError(
            f"flashfx.Config: {field}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
            + (f" {extra}" if extra else "")
        )


def _check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"flashfx.Config: {field}={value!r} must be True or False")


def _check_remat(value: Any) -> None:
    if value is None or value in ("auto", "speed"):
        return
    if isinstance(value, bool):
        pass  # bool is an int subclass; reject it below with the general message
    elif isinstance(value, float) and 0.0 < value <= 1.0:
        return
    elif isinstance(value, int) and value >= 1024:
        return
    elif isinstance(value, int) and value > 0:
        raise ValueError(
            f"flashfx.Config: remat={value!r} is read as a byte count, and {value} bytes saves nothing; "
            f"for a fraction of the activation memory write a float such as remat={float(value)!r}, "
            "or give at least 1024 bytes"
        )
    raise ValueError(
        f"flashfx.Config: remat={value!r} is not allowed; use None (off), a fraction in (0, 1] of the "
        "activation memory, a positive byte count (int), 'auto' or 'speed'"
    )
