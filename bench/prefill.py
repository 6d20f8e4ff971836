"""Inference prefill: the HF Llama of ANCHORS.md, batch 1 × 8192 tokens, bf16, last-token logits only.

`logits_to_keep=1` is how generation calls the model: the LM head runs on the last position alone, so the
time is the 8 decoder layers over 8192 tokens, where attention's S² term matters.
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

PREFILL_PROVIDERS = ("eager", "sdpa", "compile", "compile-max-autotune", "compile-reduce-overhead", "flashfx",
                     "flashfx-nographs", "flashfx-attention", "flashfx-fusion", "flashfx-none", "liger")
PREFILL_QUICK = ("eager", "sdpa", "flashfx", "compile", "liger")


def build(opts: common.Options) -> common.Case:
    batch, seq = (1, 128) if opts.tiny else (1, 8192)
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    model = common.build_hf("LlamaForCausalLM", LLAMA_TINY if opts.tiny else LLAMA, dtype, opts.device,
                            layers=opts.layers)
    cfg = model.config
    ids = common.random_ids(cfg.vocab_size, (batch, seq), opts.device)

    def step(fn: Callable[..., Any]) -> torch.Tensor:
        with torch.no_grad():
            return fn(input_ids=ids, logits_to_keep=1).logits  # [B, 1, vocab]

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    flops = (2.0 * llama_linear_params(cfg, with_head=False) * batch * seq
             + 2.0 * cfg.hidden_size * cfg.vocab_size * batch
             + cfg.num_hidden_layers * common.attention_fwd_flops(batch, cfg.num_attention_heads, seq, seq,
                                                                  head_dim, causal=True))
    return common.Case(name="llama-prefill", model=model, step=step, training=False, flops=flops,
                       tokens=batch * seq, family="llama",
                       describe=f"HF LlamaForCausalLM (ANCHORS config), batch {batch} × {seq}, "
                                f"{str(dtype)[6:]}, last-token logits")


WORKLOADS = {
    "llama-prefill": common.Workload("llama-prefill", "Llama prefill, 1 × 8192 bf16, last-token logits", build,
                                     PREFILL_PROVIDERS, PREFILL_QUICK, share=1.0, est_scale=0.6),
}
