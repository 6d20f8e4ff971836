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
``"hf:<Architecture>"`` specs are built by `flashfx.hf_models` (re-exported here: `build_hf`, `hf_inputs`).
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
import torch.nn.functional as F

Inputs = Dict[str, Any]
IGNORE_INDEX = -100  # label value the losses skip (padding, unmasked MLM positions)


# ---------------------------------------------------------------- configs (field names follow Hugging Face's)

@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_labels: int = 1000
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12


# ---------------------------------------------------------------- shared pieces

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 as Llama does: bf16 mean-of-squares loses too many bits.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)  # [B, H, S, D]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    # Shift before the head (position t predicts token t + 1) so the head's output feeds cross_entropy directly.
    logits = head(hidden[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------- GPT-2

class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        n = cfg.max_position_embeddings
        self.register_buffer("tril", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.size(1)
        q, k, v = (_split_heads(t, self.heads) for t in self.c_attn(x).split(x.size(-1), dim=-1))
        att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.size(-1)))  # [B, H, S, S]
        att = att.masked_fill(~self.tril[:, :, :s, :s], float("-inf"))
        att = self.attn_dropout(att.softmax(dim=-1))
        return self.resid_dropout(self.c_proj(_merge_heads(att @ v)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.c_fc = nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size)
        self.c_proj = nn.Linear(4 * cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.dropout(self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class GPT2(nn.Module):
    """GPT-2: `model(input_ids)` → logits [B, S, vocab]; with `labels` (usually `input_ids`) → causal-LM loss."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x) if labels is None else _lm_loss(x, self.lm_head, labels)


# ---------------------------------------------------------------- Llama

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        # [B, Hkv, S, D] -> [B, H, S, D]: each KV head serves H / Hkv query heads (GQA).
        b, hkv, s, d = x.shape
        n_rep = self.heads // hkv
        return x[:, :, None, :, :].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = x.size(1)
        q = _split_heads(self.q_proj(x), self.heads)
        k = _split_heads(self.k_proj(x), self.kv_heads)
        v = _split_heads(self.v_proj(x), self.kv_heads)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))  # [B, H, S, S]
        att = att + torch.full((s, s), float("-inf"), device=x.device, dtype=att.dtype).triu(1)
        att = F.dropout(att.softmax(dim=-1), p=self.dropout, training=self.training)
        return self.o_proj(_merge_heads(att @ v))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """Llama: `model(input_ids)` → logits [B, S, vocab]; with `labels` (usually `input_ids`) → causal-LM loss."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # RoPE angles for positions 0..S-1, computed per call so any sequence length works.
        freqs = torch.arange(input_ids.size(1), device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)  # [S, D]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return self.lm_head(x) if labels is None else _lm_loss(x, self.lm_head, labels)


# ---------------------------------------------------------------- BERT

class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.attn_out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.size(-1)))  # [B, H, S, S]
        att = self.attn_dropout((att + mask).softmax(dim=-1))  # mask: [B, 1, 1, S], 0 or a large negative
        x = self.attn_norm(x + self.dropout(self.attn_out(_merge_heads(att @ v))))
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class Bert(nn.Module):
    """BERT with its masked-LM head: `model(input_ids, attention_mask)` → logits [B, S, vocab];
    with `labels` ([B, S], -100 where no prediction is wanted) → the MLM loss."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.head_transform = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.head_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.decoder.weight = self.word_embeddings.weight  # tied, as in BERT

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.embed_norm(x))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # 1 = attend, 0 = padding -> additive [B, 1, 1, S]: 0 where attended, the dtype's minimum where padded.
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask)
        logits = self.decoder(self.head_norm(F.gelu(self.head_transform(x))))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------- ViT

class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.size(-1)))  # [B, H, S, S], no mask
        att = self.attn_dropout(att.softmax(dim=-1))
        x = x + self.dropout(self.proj(_merge_heads(att @ v)))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    """ViT: `model(pixel_values)` ([B, C, H, W]) → class logits [B, num_labels]; with `labels` ([B]) → the loss."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.hidden_size))
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, patches, hidden]
        x = torch.cat((self.cls_token.expand(x.size(0), -1, -1), x), dim=1) + self.pos_embed
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x)
        logits = self.classifier(self.norm(x)[:, 0])
        return logits if labels is None else F.cross_entropy(logits.float(), labels)


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
        _check_positive("seq", seq)
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and seq > limit:
            raise ValueError(f"seq={seq} is longer than this model's {limit} positions; use seq <= {limit} "
                             f"or build with max_position_embeddings={seq}")
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
