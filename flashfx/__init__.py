"""flashfx: a graph compiler that makes PyTorch transformer models move fewer bytes.

The whole public API::

    fast = flashfx.optimize(model)                        # same call signature, shares parameters with `model`
    fast = torch.compile(model, backend="flashfx")        # the same compiler as a torch.compile backend
    report = flashfx.explain(model, *args, **kwargs)      # what each pass did, and the bytes it saved
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from flashfx import ops as _ops  # noqa: F401  (registers torch.ops.flashfx.*)
from flashfx.compiler import Compiler
from flashfx.config import Config
from flashfx.report import Report

__all__ = ["optimize", "explain", "backend", "Config", "Report", "OptimizedModule"]
__version__ = "0.1.0"


def backend(config: Optional[Config] = None, **config_kwargs: Any) -> Compiler:
    """A configured backend for `torch.compile`.

    Example::

        >>> import torch, flashfx
        >>> compiled = torch.compile(torch.nn.Linear(4, 4), backend=flashfx.backend(fusion=False))
        >>> compiled(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    return Compiler(_make_config(config, config_kwargs))


class OptimizedModule(torch.nn.Module):
    """`model` compiled by flashfx on its first call. Parameters and buffers are the original model's own.

    `state_dict()` / `load_state_dict()` use the original model's keys, so checkpoints round-trip both ways;
    attributes the wrapper does not have (e.g. a Hugging Face model's `config`) are looked up on the model.
    """

    def __init__(self, model: torch.nn.Module, config: Config) -> None:
        super().__init__()
        self.model = model
        self.flashfx_config = config
        self.compiler = Compiler(config)
        # Not a registered submodule: its parameters are `model`'s, reached through `self.model`.
        object.__setattr__(self, "_compiled", torch.compile(model, backend=self.compiler))
        self._marked = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._marked:
            # Batch and sequence sizes symbolic from the first call: a new length reuses the compiled code.
            from flashfx.rewriter.capture import mark_batch_and_sequence

            for value in [*args, *kwargs.values()]:
                mark_batch_and_sequence(value)
            self._marked = True
        return self._compiled(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    @property
    def report(self) -> Report:
        """What flashfx did to each graph compiled so far."""
        return Report(self.compiler.reports, self.flashfx_config)


def optimize(model: torch.nn.Module, config: Optional[Config] = None, **config_kwargs: Any) -> OptimizedModule:
    """Compile `model` with flashfx; returns a module with the same call signature.

    Compilation happens on the first call. Options are `flashfx.Config` fields.

    Example::

        >>> import torch, flashfx
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        >>> fast = flashfx.optimize(model, fusion=False)
        >>> torch.allclose(fast(torch.ones(2, 8)), model(torch.ones(2, 8)))
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"flashfx.optimize expects a torch.nn.Module, got {type(model).__name__}")
    return OptimizedModule(model, _make_config(config, config_kwargs))


def explain(model: Callable[..., Any], *args: Any, config: Optional[Config] = None, **kwargs: Any) -> Report:
    """Run `model(*args, **kwargs)` once through flashfx and report what each pass did.

    Batch and sequence sizes are kept symbolic, so the report gives costs as expressions in B and S.
    If the model is in training mode and has trainable parameters, a backward pass is run too (through
    `torch.autograd.grad`, leaving `.grad` untouched) so the backward graph is compiled and reported.

    Example::

        >>> import flashfx
        >>> model, inputs = flashfx.zoo.build("gpt2-tiny")
        >>> report = flashfx.explain(model, **inputs)
        >>> "passes" in report.to_json()
        True
    """
    from flashfx.rewriter.capture import capture

    compiler = Compiler(config if config is not None else Config())
    outputs = capture(model, args, kwargs, dynamic=True, backend=compiler, return_outputs=True)
    _compile_backward(model, outputs)
    return Report(compiler.reports, compiler.config)


def _compile_backward(model: Any, outputs: Any) -> None:
    if not isinstance(model, torch.nn.Module) or not model.training:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat, _ = torch.utils._pytree.tree_flatten(outputs)
    grads_of = [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
    if not params or not grads_of:
        return
    total = sum(t.float().sum() for t in grads_of)
    torch.autograd.grad(total, params, allow_unused=True)


def _make_config(config: Optional[Config], kwargs: Dict[str, Any]) -> Config:
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a flashfx.Config, got {type(config).__name__}")
    if config is None:
        return Config(**kwargs)
    return config.replace(**kwargs) if kwargs else config


def __getattr__(name: str) -> Any:
    # `flashfx.zoo` without importing the model definitions at `import flashfx`.
    if name == "zoo":
        import importlib

        return importlib.import_module("flashfx.zoo")
    raise AttributeError(f"module 'flashfx' has no attribute {name!r}")
