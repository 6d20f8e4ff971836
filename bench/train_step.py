"""Training step (forward + backward, no optimizer): the HF Llama of ANCHORS.md and GPT-2-small, bf16.

The loss is Hugging Face's own (labels = input_ids, shifted inside the model), so the fused linear +
cross-entropy rewrites (flashfx's pass, Liger's patch) see the graph users train with.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

try:
    from bench import common
except ImportError:  # run as a file: python bench/train_step.py
    import common  # type: ignore[no-redef]

TRAIN_PROVIDERS = ("eager", "sdpa", "compile", "compile-amb0.5", "compile-reduce-overhead", "compile-max-autotune",
                   "flashfx", "flashfx-loss", "flashfx-graphs", "flashfx-attention", "flashfx-fusion", "flashfx-ce",
                   "flashfx-remat0.5", "flashfx-remat-speed", "flashfx-none", "liger")
# --quick: in priority order (a time budget skips from the end; Liger always runs last, it patches classes).
# Sized from the twelfth session's per-provider wall times (H200: the remat row 94 s with its cold compile, the
# GPT-2 graphs row 81 s): the quick suite fits one 10-minute call only without `flashfx-loss` (the plain training
# setup flashfx documents), GPT-2's `compile-reduce-overhead`, the single-pass flashfx variants, eager (math
# attention) and torch.compile with an activation budget; they run in the full suite. GPT-2's step is host-bound:
# `flashfx-graphs` (training CUDA graphs) is its flashfx row.
# The zoo models have no attention implementation to switch and no Liger patch.
ZOO_PROVIDERS = ("eager", "compile", "compile-reduce-overhead", "flashfx", "flashfx-graphs", "flashfx-fusion",
                 "flashfx-remat0.5", "flashfx-none")
LLAMA_QUICK = ("sdpa", "compile", "flashfx-remat0.5", "liger")
GPT2_QUICK = ("sdpa", "compile", "flashfx-graphs")

# ANCHORS.md: hidden 2048, intermediate 5632, 8 layers, 16 heads, 4 KV heads (GQA), vocab 128256.
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=128256, max_position_embeddings=8192)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
# GPT-2 small: the config class defaults (768 wide, 12 layers, 12 heads, vocab 50257, 1024 positions), dropout off
# so that every provider computes the same function and losses / gradients can be compared with eager.
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
GPT2 = dict(NO_DROPOUT)
GPT2_TINY = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128, bos_token_id=0, eos_token_id=0,
                 **NO_DROPOUT)


def llama_linear_params(cfg: Any, with_head: bool = True) -> int:
    """Parameters of every matmul a token goes through (q, k, v, o, gate, up, down per layer; the LM head)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return cfg.num_hidden_layers * per_layer + (h * cfg.vocab_size if with_head else 0)


def gpt2_linear_params(cfg: Any) -> int:
    """HF GPT2Config maps `hidden_size` / `num_hidden_layers` to its own fields: the zoo config reads the same."""
    h = cfg.hidden_size
    return cfg.num_hidden_layers * (4 * h * h + 8 * h * h) + h * cfg.vocab_size  # qkv+proj, fc+proj, tied head


def _train_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[Callable[..., Any]], Any]:
    labels = ids.clone()  # its own tensor, as a data collator makes it (HF shifts it inside the loss)

    def step(fn: Callable[..., Any]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)  # grads of the last step freed first: peak = one step's
        out = fn(input_ids=ids, labels=labels)
        loss = out if isinstance(out, torch.Tensor) else out.loss  # LossOnly-wrapped providers return the loss
        loss.backward()
        return loss.detach()
    return step


def build_llama(opts: common.Options) -> common.Case:
    batch, seq = (2, 64) if opts.tiny else (4, 2048)
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    model = common.build_hf("LlamaForCausalLM", LLAMA_TINY if opts.tiny else LLAMA, dtype, opts.device,
                            layers=opts.layers)
    model.loss_type = "ForCausalLM"  # unset, HF warns inside forward: a graph break for every compiler
    cfg = model.config
    ids = common.random_ids(cfg.vocab_size, (batch, seq), opts.device)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.num_hidden_layers * common.attention_fwd_flops(batch, cfg.num_attention_heads, seq, seq, head_dim,
                                                              causal=True)
    return common.Case(
        name="llama-train", model=model, step=_train_step(model, ids), training=True,
        flops=common.train_flops(llama_linear_params(cfg), batch * seq, attn), tokens=batch * seq,
        grad_params=None,  # every parameter's gradient against eager's
        family="llama",
        describe=f"HF LlamaForCausalLM ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, GQA "
                 f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}), "
                 f"batch {batch} × {seq}, {str(dtype)[6:]}, forward + backward, no optimizer")


def build_gpt2(opts: common.Options) -> common.Case:
    batch, seq = (2, 64) if opts.tiny else (8, 1024)
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    model = common.build_hf("GPT2LMHeadModel", GPT2_TINY if opts.tiny else GPT2, dtype, opts.device,
                            layers=opts.layers)
    model.loss_type = "ForCausalLM"  # unset, HF warns inside forward: a graph break for every compiler
    cfg = model.config
    ids = common.random_ids(cfg.vocab_size, (batch, seq), opts.device)
    attn = cfg.n_layer * common.attention_fwd_flops(batch, cfg.n_head, seq, seq, cfg.n_embd // cfg.n_head,
                                                    causal=True)
    return common.Case(
        name="gpt2-train", model=model, step=_train_step(model, ids), training=True,
        flops=common.train_flops(gpt2_linear_params(cfg), batch * seq, attn), tokens=batch * seq,
        grad_params=None, family="gpt2",
        describe=f"HF GPT2LMHeadModel ({cfg.n_layer} layers, hidden {cfg.n_embd}), batch {batch} × {seq}, "
                 f"{str(dtype)[6:]}, dropout 0, forward + backward, no optimizer")


def _build_zoo(family: str) -> Callable[[common.Options], common.Case]:
    """flashfx's own zoo model (attention written out by hand, no Hugging Face code), same sizes as the HF one."""
    def build(opts: common.Options) -> common.Case:
        from flashfx import zoo
        name = f"{family}-tiny" if opts.tiny else family
        sizes = {"num_hidden_layers": opts.layers} if opts.layers else {}
        if family == "gpt2":
            sizes["dropout"] = 0.0  # every provider computes the same function, as for the HF GPT-2
        batch, seq = (2, 64) if opts.tiny else ((4, 2048) if family == "llama" else (8, 1024))
        dtype = torch.float32 if opts.tiny else torch.bfloat16
        model, _ = zoo.build(name, batch=batch, seq=seq, dtype=dtype, device=opts.device, **sizes)
        model.train()
        cfg = model.config
        ids = common.random_ids(cfg.vocab_size, (batch, seq), opts.device)
        h = cfg.hidden_size
        params = llama_linear_params(cfg) if family == "llama" else gpt2_linear_params(cfg)
        attn = cfg.num_hidden_layers * common.attention_fwd_flops(batch, cfg.num_attention_heads, seq, seq,
                                                                  h // cfg.num_attention_heads, causal=True)
        return common.Case(
            name=f"zoo-{family}-train", model=model, step=_train_step(model, ids), training=True,
            flops=common.train_flops(params, batch * seq, attn), tokens=batch * seq, grad_params=None,
            family=family,
            describe=f"flashfx.zoo {name} ({cfg.num_hidden_layers} layers, hidden {h}), batch {batch} × {seq}, "
                     f"{str(dtype)[6:]}, dropout 0, forward + backward, no optimizer")
    return build


WORKLOADS = {
    "llama-train": common.Workload("llama-train", "Llama-style training step (ANCHORS config), 4 × 2048 bf16",
                                   build_llama, TRAIN_PROVIDERS, LLAMA_QUICK, share=3.5),
    "gpt2-train": common.Workload("gpt2-train", "GPT-2-small training step, 8 × 1024 bf16", build_gpt2,
                                  TRAIN_PROVIDERS, GPT2_QUICK, share=2.0, est_scale=0.7),
    # The zoo models are plain PyTorch (attention by hand, returning the loss alone): full suite and ncu only.
    "zoo-llama-train": common.Workload("zoo-llama-train", "flashfx.zoo Llama training step, 4 × 2048 bf16",
                                       _build_zoo("llama"), ZOO_PROVIDERS, (), share=3.5),
    "zoo-gpt2-train": common.Workload("zoo-gpt2-train", "flashfx.zoo GPT-2 training step, 8 × 1024 bf16",
                                      _build_zoo("gpt2"), ZOO_PROVIDERS, (), share=2.0, est_scale=0.7),
}
