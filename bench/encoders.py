"""Encoder inference in fp16: HF BERT-base (batch 32 × 512) and ViT-B/16 (batch 64 at 224 × 224).

ANCHORS.md found torch.compile about 2× slower than SDPA eager on both (attention lowered to fp32 GEMMs): these
are the workloads where keeping attention fused in the input dtype pays.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

try:
    from bench import common
except ImportError:  # run as a file
    import common  # type: ignore[no-redef]

ENCODER_PROVIDERS = ("eager", "sdpa", "compile", "compile-max-autotune", "compile-reduce-overhead", "flashfx",
                     "flashfx-nographs", "flashfx-attention", "flashfx-fusion", "flashfx-none")
ENCODER_QUICK = ("eager", "sdpa", "flashfx", "compile")

BERT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=128)
VIT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)


def _encoder_flops(layers: int, hidden: int, inter: int, heads: int, batch: int, seq: int) -> float:
    linear = layers * (4 * hidden * hidden + 2 * hidden * inter)  # q, k, v, o; fc1, fc2
    attn = layers * common.attention_fwd_flops(batch, heads, seq, seq, hidden // heads, causal=False)
    return 2.0 * linear * batch * seq + attn


def _infer(ids_or_pixels: str, inputs: torch.Tensor) -> Callable[[Callable[..., Any]], Any]:
    def step(fn: Callable[..., Any]) -> torch.Tensor:
        with torch.no_grad():
            return fn(**{ids_or_pixels: inputs}).last_hidden_state
    return step


def build_bert(opts: common.Options) -> common.Case:
    batch, seq = (4, 64) if opts.tiny else (32, 512)
    dtype = torch.float32 if opts.tiny else torch.float16
    model = common.build_hf("BertModel", BERT_TINY if opts.tiny else {}, dtype, opts.device,
                            layers=opts.layers)
    cfg = model.config
    ids = common.random_ids(cfg.vocab_size, (batch, seq), opts.device)
    flops = _encoder_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                           cfg.num_attention_heads, batch, seq)
    return common.Case(name="bert-infer", model=model, step=_infer("input_ids", ids), training=False,
                       flops=flops, tokens=batch * seq, family="bert",
                       describe=f"HF BertModel ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), batch "
                                f"{batch} × {seq}, {str(dtype)[6:]}, no padding mask, last hidden state")


def build_vit(opts: common.Options) -> common.Case:
    batch = 4 if opts.tiny else 64
    dtype = torch.float32 if opts.tiny else torch.float16
    model = common.build_hf("ViTModel", VIT_TINY if opts.tiny else {}, dtype, opts.device,
                            layers=opts.layers)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    pixels = pixels.to(device=opts.device, dtype=dtype)
    seq = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + CLS
    patch = 2.0 * batch * (seq - 1) * cfg.num_channels * cfg.patch_size ** 2 * cfg.hidden_size
    flops = patch + _encoder_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                                   cfg.num_attention_heads, batch, seq)
    return common.Case(name="vit-infer", model=model, step=_infer("pixel_values", pixels), training=False,
                       flops=flops, items=batch, family="vit",
                       describe=f"HF ViTModel (B/{cfg.patch_size}, {cfg.image_size}px, {seq} tokens), batch "
                                f"{batch}, {str(dtype)[6:]}, last hidden state")


WORKLOADS = {
    "bert-infer": common.Workload("bert-infer", "BERT-base inference, 32 × 512 fp16", build_bert,
                                  ENCODER_PROVIDERS, ENCODER_QUICK, quick_warm=("flashfx",), share=1.0,
                                  est_scale=0.5),
    "vit-infer": common.Workload("vit-infer", "ViT-B/16 inference, batch 64 fp16", build_vit,
                                 ENCODER_PROVIDERS, ENCODER_QUICK, share=0.9, est_scale=0.5),
}
