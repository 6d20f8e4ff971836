"""Reference transformer models in plain PyTorch, and `load()`: any model spec → `(model, inputs)`.

The zoo models write attention out the way people do by hand (``q @ k.transpose(-2, -1) * scale → mask → softmax
→ dropout → @ v``), each family with its own mask spelling, so the attention pass sees the forms it must find:

    gpt2   causal mask from a registered ``tril`` buffer and ``masked_fill``; LayerNorm, GELU (tanh), tied LM head
    llama  additive causal mask; RMSNorm, RoPE, SwiGLU, GQA with ``repeat_kv`` written as ``expand + reshape``
    bert   additive padding mask ``[B, 1, 1, S]`` from a 0/1 ``attention_mask``; post-LN, GELU (erf), MLM head
    vit    no mask; patch convolution, CLS token, pre-LN, classifier on the CLS token

Example::

    >>> from flashfx import zoo
    >>> model, inputs = zoo.build("llama-tiny")
    >>> model(**inputs).shape                                   # logits [B, S, vocab]
    torch.Size([2, 16, 512])
    >>> model, inputs = zoo.build("gpt2-tiny", labels=True)     # with labels the model returns the loss
    >>> model(**inputs).dim()
    0

Models come back in eval mode (dropout off) with seeded random weights; call ``.train()`` to train. Norm weights
are ``1 + N(0, 0.1)`` and biases ``N(0, 0.02)`` rather than ones and zeros, so a kernel that drops one of them
changes the output. Size overrides use Hugging Face's field names (``hidden_size=128``, ``num_hidden_layers=4``).
``"hf:<Architecture>"`` specs are built by `flashfx.hf_models` (re-exported here: `build_hf`, `hf_inputs`); the model
classes and their configs live in `flashfx.zoo_models`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from flashfx.zoo_models import IGNORE_INDEX, Bert, BertConfig, GPT2, GPT2Config, Llama, LlamaConfig, ViT, ViTConfig

Inputs = Dict[str, Any]


# ---------------------------------------------------------------- inputs

def _padding_mask(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """0/1 [B, S]: row 0 full, other rows padded at the end to a random length in [S/2, S-1], so the mask matters."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        if seq > 1:
            length = int(torch.randint(max(1, seq // 2), seq, (1,), generator=gen))
            mask[b, length:] = 0
    return mask


def _mlm_labels(input_ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MLM targets: about 15% of the non-padding positions, -100 elsewhere; never all -100 (the loss would be NaN)."""
    picked = (torch.rand(input_ids.shape, generator=gen) < 0.15) & mask.bool()
    picked[0, 0] = True
    return torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def _token_inputs(cfg: Any, batch: int, seq: int, labels: bool, gen: torch.Generator) -> Inputs:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    if isinstance(cfg, BertConfig):
        inputs: Inputs = {"input_ids": ids, "attention_mask": _padding_mask(batch, seq, gen)}
        if labels:
            inputs["labels"] = _mlm_labels(ids, inputs["attention_mask"], gen)
        return inputs
    return {"input_ids": ids, "labels": ids.clone()} if labels else {"input_ids": ids}


def _image_inputs(cfg: ViTConfig, batch: int, labels: bool, gen: torch.Generator) -> Inputs:
    pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    inputs: Inputs = {"pixel_values": pixels}
    if labels:
        inputs["labels"] = torch.randint(0, cfg.num_labels, (batch,), generator=gen)
    return inputs


def example_inputs(model: nn.Module, batch: int, seq: Optional[int] = None, labels: bool = False,
                   seed: int = 0) -> Inputs:
    """Fresh random inputs for a zoo model (`model(**inputs)` runs), on the model's device and dtype.

    `seq` is the number of tokens; for ViT the number of patches, fixed by the model's image size.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, (GPT2Config, LlamaConfig, BertConfig, ViTConfig)):
        raise ValueError(f"example_inputs() needs a flashfx.zoo model, got {type(model).__name__}; "
                         f"for other models build the inputs yourself")
    _check_positive("batch", batch)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(cfg, ViTConfig):
        patches = (cfg.image_size // cfg.patch_size) ** 2
        if seq is not None and seq != patches:
            raise ValueError(f"seq={seq} does not match this ViT's {patches} patches; build the model with "
                             f"seq={seq} (a square number) instead")
        inputs = _image_inputs(cfg, batch, labels, gen)
    else:
        check_sequence_length(seq, cfg, "this model")
        if labels and seq < 2 and not isinstance(cfg, BertConfig):
            raise ValueError("a causal-LM loss needs seq >= 2 (each token predicts the next); use seq >= 2")
        inputs = _token_inputs(cfg, batch, seq, labels, gen)
    param = next(model.parameters())
    return {k: v.to(device=param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()}


# ---------------------------------------------------------------- the zoo

@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    config: Any          # one of the config dataclasses above; its type picks the model class
    batch: int           # default batch and sequence length (for ViT: patches)
    seq: int


_MODEL_CLASSES: Dict[type, type] = {GPT2Config: GPT2, LlamaConfig: Llama, BertConfig: Bert, ViTConfig: ViT}

MODELS: Dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("gpt2-tiny", "GPT-2, 2 layers, hidden 64, 4 heads, vocab 512",
              GPT2Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4), 2, 16),
    ModelSpec("gpt2", "GPT-2 small: 12 layers, hidden 768, 12 heads, vocab 50257 (124M)", GPT2Config(), 8, 1024),
    ModelSpec("llama-tiny", "Llama, 2 layers, hidden 64, 4 heads / 2 KV heads, vocab 512",
              LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2), 2, 16),
    ModelSpec("llama", "Llama: 8 layers, hidden 2048, 16 heads / 4 KV heads, vocab 128256 (886M)",
              LlamaConfig(), 4, 2048),
    ModelSpec("bert-tiny", "BERT with MLM head, 2 layers, hidden 64, 4 heads, vocab 512",
              BertConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4), 2, 16),
    ModelSpec("bert", "BERT-base with MLM head: 12 layers, hidden 768, 12 heads (110M)", BertConfig(), 32, 512),
    ModelSpec("vit-tiny", "ViT, 32x32 images, 8x8 patches, 2 layers, hidden 64, 4 heads, 10 classes",
              ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=10), 2, 16),
    ModelSpec("vit", "ViT-B/16: 224x224 images, 12 layers, hidden 768, 12 heads, 1000 classes (86M)",
              ViTConfig(), 64, 196),
]}


def list_models() -> List[Tuple[str, str]]:
    """`(name, description)` of every zoo model."""
    return [(s.name, s.description) for s in MODELS.values()]


def build(name: str, batch: Optional[int] = None, seq: Optional[int] = None,
          dtype: Union[torch.dtype, str, None] = None, device: Union[torch.device, str] = "cpu", seed: int = 0,
          labels: bool = False, **sizes: Any) -> Tuple[nn.Module, Inputs]:
    """A zoo model with seeded random weights, in eval mode, and inputs such that `model(**inputs)` runs.

    `labels=True` adds `labels` to the inputs so the model returns its training loss. `sizes` override config
    fields (`hidden_size=128`). For ViT, `seq` is the number of patches (a square) and sets the image size.
    Building on ``device="meta"`` makes no memory and no inputs-on-device work: use it to count parameters.
    """
    if name not in MODELS:
        raise ValueError(_unknown_name_message(name))
    spec = MODELS[name]
    batch = spec.batch if batch is None else batch
    _check_positive("batch", batch)
    if seq is not None:
        _check_positive("seq", seq)
    cfg = _override(spec.config, name, sizes)
    if isinstance(cfg, ViTConfig) and seq is not None:
        side = math.isqrt(seq)
        if side * side != seq:
            raise ValueError(f"ViT seq is the number of patches and must be a square (e.g. 16, 196); got seq={seq}")
        if "image_size" in sizes and sizes["image_size"] != side * cfg.patch_size:
            raise ValueError(f"seq={seq} and image_size={sizes['image_size']} disagree; give only one of them")
        cfg = dataclasses.replace(cfg, image_size=side * cfg.patch_size)
    _check_config(cfg, name)
    dtype, device = _dtype(dtype), torch.device(device)
    with _seeded(seed, device), device:
        model = _MODEL_CLASSES[type(cfg)](cfg)
        init_weights(model)
    model = model.to(dtype=dtype).eval() if dtype is not None else model.eval()
    if isinstance(cfg, ViTConfig):
        seq = None
    else:
        seq = spec.seq if seq is None else seq
    inputs = example_inputs(model, batch, seq, labels=labels, seed=seed) if device.type != "meta" else {}
    return model, inputs


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) matrices and embeddings; norm weights 1 + N(0, 0.1) and biases N(0, 0.02), not ones and
    zeros, so that a kernel that forgets a bias or a norm weight fails its test. Uses the global RNG."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                m.weight.normal_(0.0, std)
            for pname, p in m.named_parameters(recurse=False):
                if p.dim() == 1 and pname == "weight":  # LayerNorm / RMSNorm scales
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.dim() == 1 and pname == "bias":
                    p.normal_(0.0, std)
                elif p.dim() == 3:  # ViT's cls token and position embeddings
                    p.normal_(0.0, std)


# ---------------------------------------------------------------- Hugging Face architectures (flashfx.hf_models)

_HF_NAMES = ("build_hf", "hf_inputs", "HF_SMALL_SIZES")


def __getattr__(name: str) -> Any:
    # `zoo.build_hf` and friends, re-exported from flashfx.hf_models on first use: an import at the top would be
    # circular, since hf_models builds on the checks and input helpers in this module.
    if name in _HF_NAMES:
        from flashfx import hf_models

        return getattr(hf_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- load: zoo name, hf:Arch, file.py:factory

def load(spec: str, batch: Optional[int] = None, seq: Optional[int] = None,
         dtype: Union[torch.dtype, str, None] = None, device: Union[torch.device, str] = "cpu", seed: int = 0,
         labels: bool = False, attn_implementation: Optional[str] = None, **sizes: Any) -> Tuple[nn.Module, Inputs]:
    """`(model, inputs)` from a spec, such that `model(**inputs)` runs. The spec is one of:

    - a zoo name (``"llama-tiny"``, see `list_models()`);
    - ``"hf:<Architecture>"`` (``"hf:LlamaForCausalLM"``, ``"hf:BertModel"``): built from transformers' config at a
      small size with random weights; `sizes` override config fields; `attn_implementation` picks ``"eager"`` or
      ``"sdpa"`` (default: transformers' own choice);
    - ``"path/to/file.py:factory"``: `factory(...)` returns ``(model, inputs)`` or a model; it is passed those of
      `batch`, `seq`, `dtype`, `device`, `seed`, `labels` and `sizes` that its signature names.

    Example::

        >>> from flashfx import zoo
        >>> model, inputs = zoo.load("bert-tiny", batch=3, seq=8)
        >>> model(**inputs).shape
        torch.Size([3, 8, 512])
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string such as 'llama-tiny', 'hf:BertModel' or "
                         f"'model.py:make', got {spec!r}")
    spec = spec.strip()
    if spec.startswith("hf:"):
        from flashfx.hf_models import build_hf  # here, not at the top: hf_models imports this module

        return build_hf(spec[3:], batch=batch, seq=seq, dtype=_dtype(dtype), device=device, seed=seed,
                         labels=labels, attn_implementation=attn_implementation, **sizes)
    if attn_implementation is not None:
        raise ValueError(f"attn_implementation applies to 'hf:' specs only, not {spec!r}; leave it out")
    path, sep, factory = spec.rpartition(":")
    if spec.endswith(".py") or (sep and (path.endswith(".py") or os.path.isfile(path))):
        if spec.endswith(".py"):
            raise ValueError(f"{spec!r} names no factory; write it as '{spec}:make_model' (the function that "
                             f"returns (model, inputs) or a model)")
        return _load_factory(path, factory, batch=batch, seq=seq, dtype=dtype, device=device, seed=seed,
                             labels=labels, **sizes)
    return build(spec, batch=batch, seq=seq, dtype=dtype, device=device, seed=seed, labels=labels, **sizes)


def _load_factory(path: str, factory: str, **kwargs: Any) -> Tuple[nn.Module, Inputs]:
    if not os.path.isfile(path):
        raise ValueError(f"model file {path!r} does not exist; give the path of a .py file, e.g. 'models/mine.py:make'")
    if not factory.isidentifier():
        raise ValueError(f"{factory!r} is not a function name; write the spec as '{path}:make_model'")
    module_name = f"flashfx_user_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import {path!r} as Python; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling in the user's file look their module up here
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module_name]
        close = difflib.get_close_matches(factory, names, n=1)
        hint = f"did you mean '{path}:{close[0]}'?" if close else f"functions there: {', '.join(names) or 'none'}"
        raise ValueError(f"{path!r} has no function {factory!r}; {hint}")
    return _call_factory(fn, f"{path}:{factory}", **kwargs)


def _call_factory(fn: Callable[..., Any], where: str, batch: Optional[int], seq: Optional[int], dtype: Any,
                  device: Any, seed: int, labels: bool, **sizes: Any) -> Tuple[nn.Module, Inputs]:
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = {"batch": batch, "seq": seq, "dtype": _dtype(dtype), "device": device, "seed": seed,
              "labels": labels or None, **sizes}
    call = {k: v for k, v in wanted.items() if v is not None and (k in params or takes_any)}
    out = fn(**call)
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where} returned {type(model).__name__}; it must return an nn.Module or (model, inputs)")
    # What the factory did not take must still be honoured: dtype and device are applied below, batch, seq and
    # labels by the inputs flashfx makes when the factory returns none; anything else is an error.
    honoured = {"dtype", "device", "seed"} | ({"batch", "seq", "labels"} if inputs is None else set())
    for key, value in wanted.items():
        if value is not None and key not in call and key not in honoured:
            raise ValueError(f"{where} takes no {key!r} argument; add a `{key}` parameter to it or leave {key} out")
    if inputs is None:
        inputs = _guess_inputs(model, where, batch=batch, seq=seq, labels=labels, seed=seed)
    inputs = _as_kwargs(model, inputs, where)
    if dtype is not None and "dtype" not in call:
        model = model.to(dtype=_dtype(dtype))
        inputs = {k: v.to(_dtype(dtype)) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in inputs.items()}
    if "device" not in call and torch.device(device).type != "cpu":
        model = model.to(device)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return model, inputs


def _guess_inputs(model: nn.Module, where: str, batch: Optional[int], seq: Optional[int], labels: bool,
                  seed: int) -> Inputs:
    if isinstance(getattr(model, "config", None), (GPT2Config, LlamaConfig, BertConfig, ViTConfig)):
        return example_inputs(model, batch or 2, seq or (None if isinstance(model, ViT) else 16), labels, seed)
    from flashfx.hf_models import _is_hf_model, hf_inputs  # here, not at the top: hf_models imports this module

    if _is_hf_model(model):
        return hf_inputs(model, batch or 2, seq or 16, labels, seed)
    raise ValueError(f"{where} returned a {type(model).__name__} without inputs, and flashfx cannot guess what "
                     f"it takes; return (model, inputs) with inputs a dict of keyword arguments for model(**inputs)")


def _as_kwargs(model: nn.Module, inputs: Any, where: str) -> Inputs:
    """Inputs as keyword arguments: a dict as is; a tensor or tuple of positional arguments bound to forward()."""
    if isinstance(inputs, dict):
        return dict(inputs)
    args = (inputs,) if torch.is_tensor(inputs) else inputs
    if isinstance(args, (tuple, list)):
        signature = inspect.signature(model.forward)
        try:
            bound = signature.bind(*args)
        except TypeError as e:
            raise ValueError(f"the inputs {where} returned do not fit {type(model).__name__}.forward ({e}); "
                             f"return a dict of keyword arguments") from None
        # *args cannot be passed by keyword: such inputs must come as a dict already.
        if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
            return dict(bound.arguments)
    raise ValueError(f"{where} returned inputs of type {type(inputs).__name__}; return a dict of keyword "
                     f"arguments for model(**inputs)")


# ---------------------------------------------------------------- checks

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


def _dtype(dtype: Union[torch.dtype, str, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype")


def check_sequence_length(seq: Any, cfg: Any, model_name: str) -> None:
    """A positive `seq` within the config's `max_position_embeddings` (if any); else a ValueError with the fix."""
    _check_positive("seq", seq)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and seq > limit:
        raise ValueError(f"seq={seq} is longer than {model_name}'s {limit} positions; use seq <= {limit} "
                         f"or build with max_position_embeddings={seq}")


def _check_positive(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(MODELS), n=1)
    if close:
        return f"unknown model {name!r}; did you mean {close[0]!r}? (flashfx models lists them all)"
    if name[:1].isupper():
        return f"unknown model {name!r}; for a Hugging Face architecture write 'hf:{name}'"
    return (f"unknown model {name!r}; use a zoo name ({', '.join(MODELS)}), 'hf:<Architecture>' or "
            f"'path/to/file.py:factory'")


def _override(cfg: Any, name: str, sizes: Dict[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(cfg)]
    for key in sizes:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(fields)}"
            raise ValueError(f"{name} has no config field {key!r}; {hint}")
    return dataclasses.replace(cfg, **sizes)


def _check_config(cfg: Any, name: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {f.name} must be a positive integer, got {value!r}")
        if "dropout" in f.name and not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"{name}: {f.name} must be in [0, 1), got {value!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{name}: hidden_size={cfg.hidden_size} is not divisible by num_attention_heads="
                         f"{cfg.num_attention_heads}; pick sizes where it is")
    if isinstance(cfg, LlamaConfig):
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"{name}: num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={cfg.num_key_value_heads}; pick sizes where it is")
        if (cfg.hidden_size // cfg.num_attention_heads) % 2:
            raise ValueError(f"{name}: RoPE needs an even head dim, got {cfg.hidden_size // cfg.num_attention_heads}")
    if isinstance(cfg, ViTConfig) and cfg.image_size % cfg.patch_size:
        raise ValueError(f"{name}: image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")


class _seeded:
    """Seed the global RNGs for model init, restoring the caller's RNG state afterwards (no side effects)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        cuda = device.type == "cuda" and torch.cuda.is_available()
        self._cuda = cuda
        self._fork = torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else [])
        self._seed = seed

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.random.default_generator.manual_seed(self._seed)
        if self._cuda:
            torch.cuda.manual_seed_all(self._seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
