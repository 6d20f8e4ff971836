"""Drop copies that copy nothing anyone else could see: `clone(x)` where `x` is a fresh buffer whose only reader is
the clone, with the same layout.

Where they come from: AOTAutograd decomposes `dropout` in eval mode or with p=0 to `clone` (Hugging Face BERT, ViT
and GPT-2 have a dropout after every projection). Each is a full read and write of the activation, and on CUDA one
more kernel launch; next to a matmul it also turns a cuBLAS `addmm` (bias fused) into a matmul plus an epilogue
kernel.

Safe because the ATen graphs AOTAutograd hands over are functional, and the rewrite is limited to a clone whose
source's storage is private: computed in the graph (not an input, so no input ends up aliased by an output), and
the clone its only reader, through any chain of views, each with one user (no second name for the buffer
appears); and the source has the clone's shape, dtype and strides (no layout change is lost). Anything else is left
alone.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfx.rewriter.aliasing import shares_storage
from flashfx.rewriter.pass_manager import PassContext, PassResult

aten = torch.ops.aten
PASS = "copies"


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def _private_buffer(node: fx.Node) -> bool:
    """No one but `node`'s single user can see its storage: down the chain of views to the buffer they share,
    every node has one user, and the buffer is computed in the graph (not an input)."""
    while True:
        if node.op != "call_function" or len(node.users) != 1:
            return False
        if not shares_storage(node):
            return True
        base = node.args[0]
        if not isinstance(base, fx.Node):
            return False
        node = base


def drop_redundant_clones(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Counts `copies.clones_dropped`."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.clone.default:
            continue
        src = node.args[0]
        val, src_val = node.meta.get("val"), getattr(src, "meta", {}).get("val")
        if not (isinstance(src, fx.Node) and isinstance(val, torch.Tensor) and isinstance(src_val, torch.Tensor)):
            continue
        if not _private_buffer(src) or not _same_layout(val, src_val):
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        dropped += 1
    if dropped:
        ctx.count("copies.clones_dropped", dropped)
    return PassResult(gm, dropped > 0)
