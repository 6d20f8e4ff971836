"""Shared by the fusion/codegen tests: trace to ATen, run the fusion pass, compare with the ATen graph."""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch.fx.experimental.proxy_tensor import make_fx

from flashfx.config import Config
from flashfx.passes.fusion import fusion
from flashfx.rewriter.pass_manager import PassContext

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.float64: (1e-7, 1e-7)}


def run_fusion(gm, cache_dir, stage="forward", **config):
    ctx = PassContext(Config(cache_dir=str(cache_dir), **config), stage=stage)
    result = fusion(gm, ctx)
    return result.graph_module, ctx


def fuse_function(fn: Callable, inputs: Sequence[torch.Tensor], cache_dir, tracing_mode="fake", **config):
    """make_fx(fn) -> fusion -> (fused graph module, ctx)."""
    gm = make_fx(fn, tracing_mode=tracing_mode)(*inputs)
    return run_fusion(gm, cache_dir, **config)


def assert_close(got: Any, expected: Any, dtype=None) -> None:
    flat_got, _ = torch.utils._pytree.tree_flatten(got)
    flat_exp, _ = torch.utils._pytree.tree_flatten(expected)
    assert len(flat_got) == len(flat_exp)
    for g, e in zip(flat_got, flat_exp):
        if not isinstance(e, torch.Tensor):
            continue
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, e.shape, g.dtype, e.dtype)
        assert g.stride() == e.stride() or e.numel() <= 1 or not e.is_contiguous() or g.is_contiguous()
        rtol, atol = TOL.get(dtype or e.dtype, (0, 0))
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, equal_nan=True)


def kernel_nodes(gm) -> List[Any]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and type(n.target).__name__ == "FusedKernel"]


class AOTFusion:
    """A Dynamo backend: AOTAutograd with the fusion pass as forward and backward compiler."""

    def __init__(self, cache_dir) -> None:
        self.cache_dir = cache_dir
        self.contexts: List[PassContext] = []

    def compile(self, stage):
        def compiler(gm, example_inputs):
            gm, ctx = run_fusion(gm, self.cache_dir, stage=stage)
            self.contexts.append(ctx)
            return make_boxed_func(gm)

        return compiler

    def __call__(self, gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=self.compile("forward"),
                                     bw_compiler=self.compile("backward"),
                                     inference_compiler=self.compile("inference"))

    def counter(self, stage, name):
        return sum(c.counters.get(name, 0) for c in self.contexts if c.stage == stage)


def check_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, cache_dir, dynamic=False, tol=None):
    """Outputs and every gradient of `module` compiled with fusion vs eager, on the same random upstream grad."""
    backend = AOTFusion(cache_dir)
    compiled = torch.compile(module, backend=backend, dynamic=dynamic)
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out = compiled(x1)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out, x1.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    ref = module(x2)
    ref.backward(grad)
    expected = [ref, x2.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    rtol, atol = tol or TOL[x.dtype]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    return backend
