"""Bound kernel launches against Triton's own, in one process, on a model step run op by op (no CUDA graphs).

    PYTHONPATH=. python bench/launch_ab.py [WORKLOAD ...] [--rounds 3] [--repeat 10] [--layers N] [--profile]

For each workload (default gpt2-train) the model is optimized once with flashfx (`flashfx-loss` for training,
`flashfx-nographs` for inference: every kernel launched from Python), then its step is timed in alternating rounds
with FLASHFX_FAST_LAUNCH=1 (attention launch plans and generated kernels' bound launches, `flashfx.codegen.launch`)
and =0 (Triton's `JITFunction.run` for every launch). The knob is read at each launch, so both arms run the same
compiled graphs and the same compiled kernels. Per arm and round: the median step time (CUDA events,
`bench.measure`). The two arms' losses / outputs must be bitwise equal, or the run stops. (No host-time column:
timing the enqueue of five steps behind a 1 s sleep kernel, as bench/attention_host.py does for one op, read ~240 ms
per step on the H200, i.e. the sleep itself: hundreds of kernels per step overflow CUDA's launch queue, or the step
meets a synchronisation; which one was not looked into.) `--profile` adds a cProfile of five bound steps (where the
host time of a host-bound step goes, by Python function).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common, measure, providers  # noqa: E402
from bench.run import workloads  # noqa: E402


def ab(name: str, rounds: int, repeat: int, layers: int, profile: bool) -> None:
    device = torch.device("cuda")
    opts = common.Options(device=device, layers=layers or None)
    case = workloads()[name].build(opts)
    provider = providers.PROVIDERS["flashfx-loss" if case.training else "flashfx-nographs"]
    providers.set_attention(case.model, provider.attn)
    case.model.train(case.training)
    fn = provider.wrap(case.model, case, opts)
    step = lambda: case.step(fn)  # noqa: E731
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f"{name} ({provider.name}): first step (compile) {time.perf_counter() - start:.1f} s", flush=True)
    results = {"1": [], "0": []}
    outputs = {}
    for _ in range(rounds):
        for arm in ("1", "0"):
            with measure.fast_launch(arm == "1"):
                results[arm].append(statistics.median(measure.time_ms(step, device, 3, repeat)))
                outputs[arm] = step()
    same = torch.equal(outputs["1"], outputs["0"])
    if not same:
        raise SystemExit(f"{name}: the bound launches computed something else than Triton's own "
                         f"({outputs['1']} vs {outputs['0']})")
    for arm, label in (("1", "bound (FLASHFX_FAST_LAUNCH=1)"), ("0", "Triton's launch (=0)")):
        print(f"  {label}: step ms per round {', '.join(f'{x:.2f}' for x in results[arm])} "
              f"(median {statistics.median(results[arm]):.2f})", flush=True)
    print(f"  outputs bitwise equal: {same}", flush=True)
    if profile:
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workloads", nargs="*", default=["gpt2-train"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both arms")
    ap.add_argument("--repeat", type=int, default=10, help="timed steps per arm and round")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the workload's model (0: all)")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of five bound steps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/launch_ab.py needs a CUDA GPU: it times kernel launches")
    unknown = [w for w in args.workloads if w not in workloads()]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; known: {', '.join(workloads())}")
    for name in args.workloads:
        ab(name, args.rounds, args.repeat, args.layers, args.profile)


if __name__ == "__main__":
    main()
