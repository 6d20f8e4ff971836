"""What flashfx does to a model, pass by pass, with the bytes each pass saves as formulas in B and S.

    python examples/explain_model.py                   # llama-tiny
    python examples/explain_model.py hf:GPT2LMHeadModel
    python examples/explain_model.py my_model.py:make  # a function returning (model, inputs) or a model
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # flashfx's Triton kernels run on the CPU only interpreted

import flashfx  # noqa: E402
from flashfx import zoo  # noqa: E402


def main(spec: str = "llama-tiny") -> None:
    model, inputs = zoo.load(spec)
    report = flashfx.explain(model, **inputs)
    print(report.text())


if __name__ == "__main__":
    main(*sys.argv[1:2])
