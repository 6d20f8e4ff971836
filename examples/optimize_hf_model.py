"""Optimize a Hugging Face model with flashfx and check that it computes what the original computes.

    python examples/optimize_hf_model.py                       # a small random-weight Llama
    python examples/optimize_hf_model.py hf:BertModel          # any transformers class, a zoo name or file.py:factory

Runs on the CPU (slowly, through the Triton interpreter) or on a GPU if there is one.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # flashfx's Triton kernels run on the CPU only interpreted

import flashfx  # noqa: E402
from flashfx import zoo  # noqa: E402


def main(spec: str = "hf:LlamaForCausalLM") -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = {"attn_implementation": "eager"} if spec.startswith("hf:") else {}
    model, inputs = zoo.load(spec, device=device, **extra)  # small default sizes: batch 2, seq 16
    fast = flashfx.optimize(model)  # compiles on the first call; shares `model`'s parameters

    with torch.no_grad():
        ref, out = model(**inputs), fast(**inputs)
    # Hugging Face models return a ModelOutput: its first field is the logits or the last hidden state.
    ref, out = (o if torch.is_tensor(o) else o[0] for o in (ref, out))
    print(f"{spec}: output {tuple(out.shape)}, max |flashfx - eager| = {(out - ref).abs().max().item():.2e}")
    print(fast.report.text())


if __name__ == "__main__":
    main(*sys.argv[1:2])
