"""Issue 5's memory / step-time curve: the Llama training step under flashfx's remat at a sweep of budgets, the
predicted peak (the remat plan's) beside the measured one (`torch.cuda.max_memory_allocated`).

    PYTHONPATH=. python bench/remat_curve.py --out $OUT                 # budgets 1.0 ... 0.05, ANCHORS Llama
    PYTHONPATH=. python bench/remat_curve.py --budgets 0.5,0.3 --compile  # also torch.compile's
                                                                          # activation_memory_budget, same values
    PYTHONPATH=. python bench/remat_curve.py --device cpu --tiny        # harness smoke test (numbers meaningless)

Every budget compiles into the same kernel cache, so kernels are compiled and autotuned once for the sweep. Peaks:
"measured" is the step's peak allocation minus what was allocated before it (weights, inputs), the quantity the
remat plan predicts (what the forward and backward graphs allocate); "predicted" is the sum over compiled graphs of
the plan's predicted peak. One JSON line per budget; a markdown table and, with matplotlib, a plot.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common, measure, providers, train_step  # noqa: E402
from flashfx.rewriter.cost import format_bytes  # noqa: E402

DEFAULT_BUDGETS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, "speed")


def parse_budgets(text: str) -> List[Any]:
    """Fractions in (0, 1] and the word "speed" (flashfx's budget-free plan), comma separated."""
    budgets: List[Any] = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        try:
            budgets.append(word if word == "speed" else float(word))
        except ValueError:
            raise SystemExit(f"--budgets {text!r}: give fractions in (0, 1] or 'speed', comma separated, "
                             "e.g. 1.0,0.5,0.2,speed")
    if not budgets or any(b != "speed" and not 0.0 < b <= 1.0 for b in budgets):
        raise SystemExit(f"--budgets {text!r}: every budget must be a fraction in (0, 1] or 'speed', "
                         "e.g. 1.0,0.5,speed")
    return budgets


def step_peak(case: common.Case, fn: Any, device: torch.device) -> Tuple[Optional[int], Optional[int]]:
    """Peak bytes the step allocates above what is allocated before it, and the same peak up to the moment the
    backward starts (the forward's, loss included), so a peak can be placed; (None, None) off CUDA."""
    if device.type != "cuda":
        case.step(fn)
        return None, None
    case.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward_peak: List[int] = []
    backward = torch.Tensor.backward

    def timed_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        forward_peak.append(torch.cuda.max_memory_allocated(device) - before)
        return backward(self, *args, **kwargs)

    torch.Tensor.backward = timed_backward  # the step calls loss.backward(): note the peak so far first
    try:
        case.step(fn)
    finally:
        torch.Tensor.backward = backward
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, (forward_peak[0] if forward_peak else None)


def predicted(fn: Any) -> Dict[str, Any]:
    """The remat plans' predictions summed over compiled graphs (None when no plan was made)."""
    totals = common.remat_totals(fn)
    return {"predicted_peak_bytes": totals.get("peak_bytes"),
            "predicted_compiled_peak_bytes": totals.get("compiled_peak_bytes"),
            "predicted_activation_bytes": totals.get("activation_bytes"),
            "extra_flops": totals.get("extra_flops"), **({"status": totals["status"]} if totals else {})}


def measure_budget(case: common.Case, make: Any, opts: common.Options, warmup: int, repeat: int) -> Dict[str, Any]:
    providers.set_attention(case.model, "sdpa")
    case.model.train(True)
    fn = make()
    measure.synchronize(opts.device)
    t0 = time.perf_counter()
    case.step(fn)
    measure.synchronize(opts.device)
    first_s = time.perf_counter() - t0
    record: Dict[str, Any] = measure.summarize(measure.time_ms(lambda: case.step(fn), opts.device, warmup, repeat))
    record["compile_s"] = max(first_s - record["ms"] / 1e3, 0.0)
    record["loss"] = case.step(fn).float().item()
    record["measured_peak_bytes"], record["measured_forward_peak_bytes"] = step_peak(case, fn, opts.device)
    if hasattr(fn, "report"):
        record.update(predicted(fn))
    case.model.zero_grad(set_to_none=True)
    return record  # the caller frees the compiled model's memory once `fn` is out of scope


def size(value: Optional[float]) -> str:
    return "—" if value is None else format_bytes(value)


def table(records: Sequence[Dict[str, Any]]) -> str:
    lines = ["| provider | budget | step ms (p20–p80) | measured peak (forward's) | predicted peak (plan; compiled "
             "graphs) | predicted saved | extra GFLOP | compile s | loss |", "|---" * 9 + "|"]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['provider']} | {r['budget']} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        extra = "—" if r.get("extra_flops") is None else f"{r['extra_flops'] / 1e9:.0f}"
        forward = f" ({size(r['measured_forward_peak_bytes'])})" if r.get("measured_forward_peak_bytes") else ""
        lines.append(f"| {r['provider']} | {r['budget']} | {r['ms']:.2f} ({r['ms_p20']:.2f}–{r['ms_p80']:.2f}) | "
                     f"{size(r.get('measured_peak_bytes'))}{forward} | "
                     f"{size(r.get('predicted_peak_bytes'))}; {size(r.get('predicted_compiled_peak_bytes'))} | "
                     f"{size(r.get('predicted_activation_bytes'))} | {extra} | {r['compile_s']:.1f} | "
                     f"{r['loss']:.4f} |")
    return "\n".join(lines)


def plot(records: Sequence[Dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for provider in dict.fromkeys(r["provider"] for r in records):
        pts = [(r["measured_peak_bytes"] / 1e9, r["ms"], r["budget"]) for r in records
               if r["provider"] == provider and not r.get("error") and r.get("measured_peak_bytes")]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        for x, y, b in pts:
            ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("measured peak above weights and inputs (GB)")
    ax.set_ylabel("step time (ms)")
    ax.set_title("Llama training step: remat budget sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/remat_curve.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS))
    ap.add_argument("--compile", action="store_true", help="also torch.compile with activation_memory_budget")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model: tests the harness, not the memory")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default=".", help="directory for remat_curve.jsonl / .md / .png")
    args = ap.parse_args(argv)
    budgets = parse_budgets(args.budgets)
    try:
        device = measure.require_device(args.device)
    except measure.BenchError as e:
        print(f"bench/remat_curve.py: {e}", file=sys.stderr)
        return measure.EXIT_NO_CUDA
    opts = common.Options(device=device, tiny=args.tiny)
    case = train_step.build_llama(opts)
    cache = tempfile.mkdtemp(prefix="flashfx-remat-curve-")  # shared: kernels compile once for the sweep
    os.makedirs(args.out, exist_ok=True)
    records: List[Dict[str, Any]] = []

    def flashfx_at(budget: Any) -> Any:
        import flashfx
        return lambda: flashfx.optimize(providers.LossOnly(case.model), cache_dir=cache, remat=budget)

    def compile_at(budget: Any) -> Any:
        return lambda: torch.compile(case.model)

    runs = [("flashfx", b, flashfx_at(b), None) for b in budgets]
    if args.compile:
        runs += [("compile", b, compile_at(b), b) for b in budgets if b != "speed"]
    for provider, budget, make, amb in runs:
        base = {"provider": provider, "budget": budget, "workload": case.name, "device": measure.device_name(device),
                "date": measure.today(), "versions": measure.versions()}
        try:
            if amb is None:
                record = measure_budget(case, make, opts, args.warmup, args.repeat)
            else:
                import torch._functorch.config as functorch_config
                with functorch_config.patch(activation_memory_budget=amb):
                    record = measure_budget(case, make, opts, args.warmup, args.repeat)
        except Exception as exc:  # noqa: BLE001  (one budget failing is a result; the sweep goes on)
            record = {"error": measure.one_line(exc)}
        measure.free_memory(device)
        records.append({**base, **record})
        common.append_jsonl(os.path.join(args.out, "remat_curve.jsonl"), records[-1])
        print(table(records[-1:]).splitlines()[-1], flush=True)
    text = table(records)
    with open(os.path.join(args.out, "remat_curve.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    if device.type == "cuda":
        plot(records, os.path.join(args.out, "remat_curve.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
