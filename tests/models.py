"""Small models and their inputs for tests: Hugging Face architectures and the flashfx zoo, seeded, no network.

    from models import hf_model, zoo_model      # in any test under tests/ (conftest.py puts tests/ on sys.path)
    model, inputs = hf_model("LlamaForCausalLM", attn_implementation="sdpa")
    out = model(**inputs).logits

Models come back in eval mode with random weights (norm scales and biases not ones / zeros, so a fused kernel that
drops one fails); inputs are random: token ids with a padded `attention_mask` for encoders, or `pixel_values`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import pytest
import torch

from flashfx import zoo

# The Hugging Face architectures the passes are tested against; any other transformers class name works too.
HF_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel", "BertModel", "ViTModel")
TINY_ZOO = ("gpt2-tiny", "llama-tiny", "bert-tiny", "vit-tiny")


def hf_model(arch: str, attn_implementation: str = "eager", batch: int = 2, seq: Optional[int] = None,
             seed: int = 0, labels: bool = False, dtype: Optional[torch.dtype] = None, device: str = "cpu",
             **sizes: Any) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A tiny transformers `arch` (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 512, 32x32 images) and its
    inputs (batch 2, seq 16 or 16 patches); `sizes` override config fields. Skips the test without transformers."""
    pytest.importorskip("transformers")
    return zoo.build_hf(arch, batch=batch, seq=seq, dtype=dtype, device=device, seed=seed, labels=labels,
                        attn_implementation=attn_implementation, **sizes)


def zoo_model(name: str, **kwargs: Any) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """`flashfx.zoo.build(name, **kwargs)`: a zoo model (e.g. "llama-tiny") and its inputs."""
    return zoo.build(name, **kwargs)
