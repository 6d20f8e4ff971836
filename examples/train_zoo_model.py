"""Train a zoo model for a few steps with flashfx: the loss goes down and the gradients are flashfx's.

    python examples/train_zoo_model.py                 # gpt2-tiny, 20 steps on one fixed batch
    python examples/train_zoo_model.py llama-tiny 50
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # flashfx's Triton kernels run on the CPU only interpreted

import flashfx  # noqa: E402
from flashfx import zoo  # noqa: E402


def main(name: str = "gpt2-tiny", steps: str = "20") -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, inputs = zoo.build(name, device=device, labels=True)  # with labels the model returns its loss
    model.train()
    fast = flashfx.optimize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(int(steps)):
        loss = fast(**inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == int(steps) - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
