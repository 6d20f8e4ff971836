"""Shared by the attention-mask tests: capture a function, run canonicalize + attention, return what changed."""
import torch

import flashfx.ops  # noqa: F401  (registers torch.ops.flashfx.attention)
from flashfx.config import Config
from flashfx.passes.attention import attention
from flashfx.rewriter.canonicalize import canonicalize
from flashfx.rewriter.capture import capture
from flashfx.rewriter.pass_manager import PassContext

OP = torch.ops.flashfx.attention.default


def rewrite(fn, *args, **kwargs):
    """Capture `fn`, run canonicalize + attention; (ctx, op nodes, outputs before, outputs after)."""
    ctx = PassContext(Config())
    (g,) = capture(fn, args, kwargs)
    inputs = [x.node.hint if isinstance(x, torch.SymInt) else x for x in g.example_inputs]
    before = g.gm(*inputs)
    gm = attention(canonicalize(g.gm, ctx).graph_module, ctx).graph_module
    gm.graph.lint()
    return ctx, [n for n in gm.graph.nodes if n.target is OP], before, gm(*inputs)
