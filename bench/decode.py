"""Decode: the HF Llama of ANCHORS.md generating one token (batch 1) against a 2048-token KV cache, bf16.

A decode step must read every weight once, so it is bound by memory bandwidth: the table reports GB/s against
the copy ceiling measured in the same run. The cache is filled once (SDPA prefill); each timed step appends one
token and `crop(-1)` drops it again, so every step sees the same 2048-token cache.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

try:
    from bench import common
    from bench.train_step import LLAMA, LLAMA_TINY, llama_linear_params
except ImportError:  # run as a file
    import common  # type: ignore[no-redef]
    from train_step import LLAMA, LLAMA_TINY, llama_linear_params  # type: ignore[no-redef]

DECODE_PROVIDERS = ("eager", "sdpa", "compile", "compile-max-autotune", "compile-reduce-overhead", "flashfx",
                    "flashfx-nographs", "flashfx-attention", "flashfx-fusion", "flashfx-none", "liger")
DECODE_QUICK = ("eager", "sdpa", "flashfx", "compile")


def build(opts: common.Options) -> common.Case:
    from transformers import DynamicCache

    context = 32 if opts.tiny else 2048
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    model = common.build_hf("LlamaForCausalLM", LLAMA_TINY if opts.tiny else LLAMA, dtype, opts.device,
                            layers=opts.layers)
    cfg = model.config
    model.eval()
    prompt = common.random_ids(cfg.vocab_size, (1, context), opts.device)
    token = common.random_ids(cfg.vocab_size, (1, 1), opts.device, seed=2)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)

    def step(fn: Callable[..., Any]) -> torch.Tensor:
        with torch.no_grad():
            logits = fn(input_ids=token, past_key_values=cache, use_cache=True).logits  # [1, 1, vocab]
        cache.crop(-1)  # back to `context` tokens: every step sees the same cache
        return logits

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    width = 2 if dtype != torch.float32 else 4
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * head_dim * width  # K and V read
    weight_bytes = llama_linear_params(cfg) * width + cfg.hidden_size * width  # matmul weights + one embedding row
    flops = 2.0 * llama_linear_params(cfg) + cfg.num_hidden_layers * common.attention_fwd_flops(
        1, cfg.num_attention_heads, 1, context + 1, head_dim, causal=False)
    return common.Case(name="llama-decode", model=model, step=step, training=False, flops=flops,
                       bytes=float(weight_bytes + kv_bytes), tokens=1, family="llama",
                       describe=f"HF LlamaForCausalLM (ANCHORS config), batch 1, one token against a {context}-token "
                                f"DynamicCache, {str(dtype)[6:]}")


WORKLOADS = {
    "llama-decode": common.Workload("llama-decode", "Llama decode, 1 token vs a 2048-token KV cache", build,
                                    DECODE_PROVIDERS, DECODE_QUICK, share=0.9, est_scale=0.6),
}
