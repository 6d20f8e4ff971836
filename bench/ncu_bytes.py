"""HBM bytes of flashfx's key kernels measured by Nsight Compute, beside the cost model's prediction.

    PYTHONPATH=. python bench/ncu_bytes.py --out $OUT          # every case; needs `ncu` and a CUDA GPU
    PYTHONPATH=. python bench/ncu_bytes.py --cases softmax,rmsnorm
    PYTHONPATH=. python bench/ncu_bytes.py --step bert-infer --providers compile,flashfx   # whole steps
    PYTHONPATH=. python bench/ncu_bytes.py --step llama-train --layers 2 --providers compile,flashfx-loss

`--step WORKLOAD` measures instead the DRAM bytes of every kernel of one step of a bench/run.py workload, per
provider (issue 4: flashfx should move no more HBM bytes per step than torch.compile). ncu replays each kernel of
the step, so keep to the inference workloads or small steps (`--layers 2`): a training step of ~1000 kernels takes
many minutes.

For each case (the fusion workloads of bench/fusion.py, and the attention forward) a child process compiles the
kernel, autotunes it, then runs it once more between cudaProfilerStart and cudaProfilerStop; the parent runs that
child under `ncu --profile-from-start off --metrics dram__bytes_read.sum,dram__bytes_write.sum`, so only that last
call is profiled (on every thread: a training step's backward kernels are launched by autograd's worker thread,
which an NVTX range on the main thread missed until 2026-12-03), and compares the DRAM bytes with the cost model's
HBM bytes for the same graph (what `flashfx.explain` reports). A ratio near 1 says the model counts what the
hardware moves; well above 1, the kernel moves more than it must (re-reads, spills) or the model undercounts.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
         "kibyte": 1024, "mibyte": 1024 ** 2, "gibyte": 1024 ** 3}


# ------------------------------------------------------------------------------------------------ parsing

def parse_ncu_csv(text: str) -> Dict[str, Dict[str, float]]:
    """`ncu --csv` output -> {kernel name: {metric: bytes}}, summed over the kernel's profiled launches.

    ncu prints its own progress lines (starting with '==') before the CSV; they are skipped."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines:
        return {}
    out: Dict[str, Dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        metric = row.get("Metric Name")
        if metric not in METRICS:
            continue
        unit = (row.get("Metric Unit") or "byte").strip().lower()
        if unit not in UNITS:
            raise ValueError(f"ncu reported {metric} in unit {unit!r}; expected one of {', '.join(UNITS)}")
        value = float((row.get("Metric Value") or "0").replace(",", "")) * UNITS[unit]
        kernel = out.setdefault(row["Kernel Name"], {})
        kernel[metric] = kernel.get(metric, 0.0) + value
    return out


def compare(predicted: float, measured: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    total = sum(sum(m.values()) for m in measured.values())
    return {"predicted_bytes": predicted, "measured_bytes": total, "kernels": sorted(measured),
            "kernel_bytes": {k: sum(m.values()) for k, m in measured.items()},
            "ratio": total / predicted if predicted else None}


# ------------------------------------------------------------------------------------------------ cases

def slug(name: str) -> str:
    """bench/fusion.py's row names as command-line words: 'add+layernorm' -> 'add-layernorm'."""
    words = "".join(c if c.isalnum() else " " for c in name.split(" silu")[0].split("(")[0]).split()
    return "-".join(words)


def cases() -> Dict[str, Tuple[Optional[Callable], List[Tuple[Tuple[int, ...], str]]]]:
    from bench import fusion as fusion_bench

    found: Dict[str, Tuple[Optional[Callable], List[Tuple[Tuple[int, ...], str]]]] = {
        slug(name): (fn, shapes) for name, fn, shapes in fusion_bench.workloads(tiny=False)}
    found["attention"] = (None, [])
    return found


def _inputs(shapes: Sequence[Tuple[Tuple[int, ...], str]], device: Any) -> List[Any]:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen) for shape, _ in shapes]


def _attention_case(device: Any) -> Tuple[Callable, float]:
    """flashfx.attention forward at B=4, H=16, S=4096, D=128: the bytes it must move are q, k, v, out, lse."""
    import torch

    from flashfx.codegen.attention import attention  # registers torch.ops.flashfx.attention

    B, H, S, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16) for _ in "qkv")
    predicted = 4 * B * H * S * D * 2 + B * H * S * 4  # read q, k, v; write out (bf16) and lse (fp32)
    return (lambda: attention(q, k, v)), float(predicted)


def build(name: str, device: Any) -> Tuple[Callable[[], Any], float]:
    """(a call that runs the case's kernels, the cost model's HBM bytes for it)."""
    from flashfx.rewriter import cost as cost_model

    if name == "attention":
        return _attention_case(device)
    from bench import fusion as fusion_bench

    fn, shapes = cases()[name]
    inputs = _inputs(shapes, device)
    gm, _ = fusion_bench.flashfx_compile(fn, inputs, tempfile.mkdtemp(prefix="flashfx-ncu-"))
    return (lambda: gm(*inputs)), float(cost_model.graph_cost(gm).bytes_value)


def child(name: str, out_path: str) -> None:
    """Compile, autotune, then run once with the profiler on; write the predicted bytes to `out_path`."""
    import torch

    call, predicted = build(name, torch.device("cuda"))
    for _ in range(3):  # compile and autotune outside the profiled range
        call()
    _profiled(call)
    with open(out_path, "w") as f:
        json.dump({"predicted_bytes": predicted}, f)


def _profiled(call: Callable[[], Any]) -> None:
    """Run `call` with the CUDA profiler on (ncu runs with --profile-from-start off). Not an NVTX range: those
    are per thread, and the autograd engine launches a CUDA backward from its own worker thread, so a range
    around `loss.backward()` on the main thread catches the forward's kernels only."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def step_child(workload: str, provider: str, out_path: str, layers: Optional[int] = None) -> None:
    """One step of a bench/run.py workload with `provider`, warmed up, the last with the profiler on."""
    import torch

    from bench import common, providers
    from bench.run import workloads

    opts = common.Options(device=torch.device("cuda"), layers=layers)
    case = workloads()[workload].build(opts)
    spec = providers.PROVIDERS[provider]
    providers.set_attention(case.model, spec.attn)
    case.model.train(case.training)
    fn = spec.wrap(case.model, case, opts) if spec.wrap else case.model
    for _ in range(3):
        case.step(fn)
    _profiled(lambda: case.step(fn))
    with open(out_path, "w") as f:
        json.dump(_report_costs(fn), f)


def _report_costs(fn: Any) -> Dict[str, float]:
    """flashfx's cost-model HBM bytes per step, summed over its compiled graphs: after its passes (the prediction),
    before fusion, and the lower bound (inputs read once, outputs written once). Zeros for other providers."""
    report = getattr(fn, "report", None)
    costs = [pair for g in report.graphs for pair in g.aten_costs.values()] if report is not None else []
    return {"predicted_bytes": float(sum(max(after.bytes_value, 0) for _, after in costs)),
            "unfused_bytes": float(sum(max(before.bytes_value, 0) for before, _ in costs)),
            "lower_bound_bytes": float(sum(max(after.lower_bound_value, 0) for _, after in costs))}


def ncu_command(ncu: str, child_args: Sequence[str]) -> List[str]:
    """ncu profiling only what runs between the child's cudaProfilerStart and Stop, every thread included."""
    return [ncu, "--csv", "--profile-from-start", "off", "--metrics", ",".join(METRICS),
            sys.executable, os.path.abspath(__file__), *child_args]


def run_case(name: str, ncu: str, timeout_s: float, step_of: Optional[str] = None,
             layers: Optional[int] = None) -> Dict[str, Any]:
    """`name` is a kernel case, or with `step_of` a provider whose step of that workload is measured."""
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = os.path.join(tmp, "predicted.json")
        child_args = ["--child", name] if step_of is None else ["--step", step_of, "--child-provider", name]
        if layers:
            child_args += ["--layers", str(layers)]
        cmd = ncu_command(ncu, [*child_args, "--child-out", pred_path])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(pred_path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"case": name, "error": f"ncu exit {proc.returncode}: {' | '.join(tail)[:300]}"}
        with open(pred_path) as f:
            model = json.load(f)
    return {"case": name, **{k: v for k, v in model.items() if k != "predicted_bytes"},
            **compare(model["predicted_bytes"], parse_ncu_csv(proc.stdout))}


def table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| case | cost model HBM bytes | model: unfused / lower bound | ncu DRAM bytes (read + write) | "
             "ncu ÷ model | kernels |", "|---|---|---|---|---|---|"]

    def mb(x: Optional[float]) -> str:
        return f"{x / 1e6:.1f} MB" if x else "—"
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} |  |  |  |  |")
            continue
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        bounds = (f"{mb(r.get('unfused_bytes'))} / {mb(r.get('lower_bound_bytes'))}"
                  if r.get("unfused_bytes") else "—")
        names = r["kernels"] if len(r["kernels"]) <= 4 else r["kernels"][:3] + [f"… {len(r['kernels'])} kernels"]
        lines.append(f"| {r['case']} | {mb(r['predicted_bytes'])} | {bounds} | {mb(r['measured_bytes'])} | {ratio} | "
                     f"{', '.join(k[:40] for k in names)} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/ncu_bytes.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma list (default: all): " + ", ".join(cases()))
    ap.add_argument("--out", default=".", help="directory for ncu_bytes.json / .md")
    ap.add_argument("--timeout-s", type=float, default=240.0, help="per case")
    ap.add_argument("--step", metavar="WORKLOAD", help="measure whole steps of this bench/run.py workload")
    ap.add_argument("--providers", default="compile,flashfx", help="with --step (default: compile,flashfx)")
    ap.add_argument("--layers", type=int, help="with --step: build the model with this many layers (ncu replays "
                                               "every kernel: a training step of the full model takes many minutes)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-provider", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.child_out)
        return 0
    if args.child_provider:
        step_child(args.step, args.child_provider, args.child_out, args.layers)
        return 0
    if args.step:
        from bench import measure, providers
        from bench.run import workloads

        if args.step not in workloads():
            ap.error(f"unknown workload {args.step!r}; known: {', '.join(workloads())}")
        try:
            names = providers.parse_providers(args.providers, ())
        except measure.BenchError as e:
            ap.error(str(e))
    else:
        known = cases()
        names = [n.strip() for n in args.cases.split(",")] if args.cases else list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    ncu = shutil.which("ncu")
    import torch
    if ncu is None or not torch.cuda.is_available():
        print("bench/ncu_bytes.py: needs Nsight Compute (`ncu` on PATH) and a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        try:
            rows.append(run_case(name, ncu, args.timeout_s, step_of=args.step, layers=args.layers))
        except subprocess.TimeoutExpired:
            rows.append({"case": name, "error": f"over {args.timeout_s:.0f} s"})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ncu_bytes.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "ncu_bytes.md"), "w") as f:
        f.write(table(rows) + "\n")
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
