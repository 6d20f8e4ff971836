"""Hugging Face architectures for `flashfx.zoo.load("hf:<Architecture>")`: a transformers model built from its
config class at a small size with seeded random weights, and random inputs that fit it.

`build_hf` makes the model (sizes from `HF_SMALL_SIZES` unless overridden; norm scales and biases perturbed by
`_perturb_norms_and_biases` so a kernel that drops one changes the output), `hf_inputs` its inputs (token ids with a
padded attention mask for encoders, or pixel values; labels that fit the head), and `_is_hf_model` tells a
transformers model from any other module. transformers is imported only when a model is built. The checks, dtype
names, seeding and input helpers shared with the zoo models live in `flashfx.zoo`, which re-exports `build_hf`,
`hf_inputs` and `HF_SMALL_SIZES`.
"""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from flashfx.zoo import Inputs, _check_positive, _dtype, _mlm_labels, _padding_mask, _seeded, check_sequence_length

# Small sizes given to any transformers config that has the field (GPT-2's n_embd, n_layer, ... map onto these).
HF_SMALL_SIZES: Dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=512, max_position_embeddings=512, image_size=32, patch_size=8, use_cache=False)


def build_hf(arch: str, batch: Optional[int] = None, seq: Optional[int] = None,
             dtype: Union[torch.dtype, str, None] = None, device: Union[torch.device, str] = "cpu", seed: int = 0,
             labels: bool = False, attn_implementation: Optional[str] = None,
             **sizes: Any) -> Tuple[nn.Module, Inputs]:
    """A transformers model by class name (``"LlamaForCausalLM"``) at `HF_SMALL_SIZES` unless `sizes` say
    otherwise, with seeded random weights, in eval mode, and inputs such that `model(**inputs)` runs."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"'hf:{arch}' needs Hugging Face transformers: pip install transformers") from None
    cls = getattr(transformers, arch, None) if arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and isinstance(getattr(cls, "config_class", None), type)):
        models = [n for n in dir(transformers) if n[:1].isupper() and n.endswith(("Model", "LM", "LMHeadModel"))
                  or "For" in n]
        close = difflib.get_close_matches(arch, models, n=1)
        hint = f"did you mean 'hf:{close[0]}'?" if close else "give a model class, e.g. 'hf:LlamaForCausalLM'"
        raise ValueError(f"unknown Hugging Face architecture {arch!r} in transformers {transformers.__version__}; "
                         f"{hint}")
    batch = 2 if batch is None else batch
    _check_positive("batch", batch)
    if seq is not None:
        _check_positive("seq", seq)
    base = cls.config_class()
    known = sorted({*base.to_dict(), *getattr(base, "attribute_map", {})})
    for key in sizes:
        if not hasattr(base, key):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see its config class for the fields"
            raise ValueError(f"{cls.config_class.__name__} has no field {key!r}; {hint}")
    fields = {k: v for k, v in HF_SMALL_SIZES.items() if hasattr(base, k)}
    if cls.main_input_name == "pixel_values":
        if seq is not None:
            side = math.isqrt(seq)
            if side * side != seq:
                raise ValueError(f"for image models seq is the number of patches and must be a square; got {seq}")
            fields["image_size"] = side * sizes.get("patch_size", fields.get("patch_size", base.patch_size))
    else:
        seq = 16 if seq is None else seq
        if "max_position_embeddings" in fields:
            # Random weights either way: grow the position table so any requested length fits.
            fields["max_position_embeddings"] = max(fields["max_position_embeddings"], seq)
    fields.update(sizes)
    vocab = fields.get("vocab_size", getattr(base, "vocab_size", None))
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        # GPT-2's 50256 is outside a small vocabulary; these ids only matter to generate().
        value = getattr(base, token, None)
        if token not in sizes and isinstance(value, int) and vocab and value >= vocab:
            fields[token] = None
    if attn_implementation is not None:
        fields["attn_implementation"] = attn_implementation
    config = cls.config_class(**fields)
    device = torch.device(device)
    with _seeded(seed, device), device:
        model = cls(config)
        _perturb_norms_and_biases(model)
    dtype = _dtype(dtype)
    model = (model.to(dtype=dtype) if dtype is not None else model).eval()
    inputs = hf_inputs(model, batch, seq, labels, seed) if device.type != "meta" else {}
    return model, inputs


def hf_inputs(model: nn.Module, batch: int, seq: Optional[int], labels: bool = False, seed: int = 0) -> Inputs:
    """Random inputs for a transformers model: `input_ids` (and a padded `attention_mask` for encoders), or
    `pixel_values`; with `labels`, targets that fit the head (next token, masked LM or class)."""
    cfg, name = model.config, type(model).__name__
    gen = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.forward).parameters
    inputs: Inputs = {}
    if model.main_input_name == "pixel_values":
        inputs["pixel_values"] = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    else:
        check_sequence_length(seq, cfg, name)
        inputs["input_ids"] = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
        if "attention_mask" in params and not model.can_generate():
            inputs["attention_mask"] = _padding_mask(batch, seq, gen)
    if labels:
        if "labels" not in params:
            raise ValueError(f"{name} takes no labels (it has no loss); use a class with a head, e.g. "
                             f"'hf:BertForMaskedLM', or labels=False")
        if model.can_generate():
            inputs["labels"] = inputs["input_ids"].clone()
        elif name.endswith("ForMaskedLM"):
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            inputs["labels"] = _mlm_labels(inputs["input_ids"], mask, gen)
        elif name.endswith(("ForImageClassification", "ForSequenceClassification")):
            inputs["labels"] = torch.randint(0, cfg.num_labels, (batch,), generator=gen)
        else:
            raise ValueError(f"flashfx cannot make labels for {name}; pass labels=False and build them yourself")
    param = next(model.parameters())
    return {k: v.to(device=param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()}


def _is_hf_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "main_input_name")


def _perturb_norms_and_biases(model: nn.Module) -> None:
    """Norm scales that are all ones become 1 + N(0, 0.1), zero biases N(0, 0.02): see `init_weights`."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() != 1 or not p.is_floating_point() or p.is_meta:
                continue
            if pname.endswith("weight") and bool((p == 1).all()):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias") and bool((p == 0).all()):
                p.normal_(0.0, 0.02)
