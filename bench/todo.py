"""Which (workload, provider) rows of the full suite have never been measured, and the GPU calls that measure them.

    python bench/todo.py bench/results/suite-*.jsonl                # every workload of bench/run.py
    python bench/todo.py bench/results/*.jsonl --workloads llama-train,bert-infer --call-s 540

A row counts as measured when some file holds an `ok` result for it. The missing providers of each workload are
packed into `bench/run.py` commands of at most `--call-s` estimated seconds (one 10-minute call each, the start-up
of the machine not counted). Each command starts with a cheap reference provider (SDPA, or eager for the zoo
models) so its numerics compare with eager-style attention. Estimates come from the measured wall time of the same
provider on the same workload (a failed or timed-out attempt), else from the provider's `est_s` scaled to the
workload; both are rough, and `bench/run.py --budget-s` still skips what does not fit.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, providers, run  # noqa: E402

START_S = 25.0  # a command's own start-up: imports, the card's ceilings, the model build


def measured(records: Sequence[dict]) -> Tuple[Set[Tuple[str, str]], Dict[Tuple[str, str], float]]:
    """(rows with an ok result, wall seconds of the latest attempt of each row that recorded one)."""
    ok: Set[Tuple[str, str]] = set()
    wall: Dict[Tuple[str, str], float] = {}
    for r in records:
        if r.get("type") != "result":
            continue
        key = (r.get("workload"), r.get("provider"))
        if r.get("status") == "ok":
            ok.add(key)
        if r.get("wall_s") is not None:
            wall[key] = float(r["wall_s"])
    return ok, wall


def estimate_s(workload: common.Workload, provider: str, wall: Dict[Tuple[str, str], float]) -> float:
    spec = providers.PROVIDERS[provider]
    return wall.get((workload.name, provider), spec.est_s * workload.est_scale)


def plan_calls(records: Sequence[dict], names: Sequence[str], call_s: float) -> List[Tuple[str, List[str], float]]:
    """[(workload, providers to run, estimated seconds)]: each fits `call_s` (a provider estimated above it runs
    alone). The reference provider leads every command and is counted in its estimate."""
    table = run.workloads()
    ok, wall = measured(records)
    calls: List[Tuple[str, List[str], float]] = []
    for name in names:
        wl = table[name]
        missing = [p for p in wl.providers if (name, p) not in ok]
        if not missing:
            continue
        reference = "sdpa" if "sdpa" in wl.providers else wl.providers[0]
        ref_s = estimate_s(wl, reference, wall)
        todo = [p for p in missing if p != reference]
        if not todo:  # only the reference itself is missing
            calls.append((name, [reference], START_S + ref_s))
            continue
        chunk: List[str] = []
        total = START_S + ref_s
        for p in providers.order_providers(todo):
            cost = estimate_s(wl, p, wall)
            if chunk and total + cost > call_s:
                calls.append((name, [reference] + chunk, total))
                chunk, total = [], START_S + ref_s
            chunk.append(p)
            total += cost
        calls.append((name, [reference] + chunk, total))
    return calls


def pack(calls: Sequence[Tuple[str, List[str], float]], call_s: float) -> List[List[Tuple[str, List[str], float]]]:
    """Commands into GPU calls of at most `call_s` estimated seconds, largest first (first fit)."""
    bins: List[List[Tuple[str, List[str], float]]] = []
    for c in sorted(calls, key=lambda c: -c[2]):
        fit = next((b for b in bins if sum(x[2] for x in b) + c[2] <= call_s), None)
        if fit is None:
            bins.append([c])
        else:
            fit.append(c)
    return bins


def command(name: str, names: Sequence[str], call_s: float) -> str:
    return (f"python bench/run.py {name} --providers {','.join(names)} --budget-s {call_s:.0f} --no-warm-compile "
            f"--out $OUT/{name}.jsonl --no-docs")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", metavar="JSONL", help="bench/run.py result files")
    ap.add_argument("--workloads", help="comma list (default: every workload of bench/run.py)")
    ap.add_argument("--call-s", type=float, default=540.0, help="estimated seconds per command (default 540)")
    args = ap.parse_args(argv)
    known = list(run.workloads())
    names = args.workloads.split(",") if args.workloads else known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"bench/todo.py: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(known)}",
              file=sys.stderr)
        return 2
    records = [r for path in args.results for r in common.read_jsonl(path)]
    calls = plan_calls(records, names, args.call_s)
    if not calls:
        print("every provider of every selected workload has a measured row")
        return 0
    rows = sum(len(ps) - 1 for _, ps, _ in calls) + sum(1 for _, ps, _ in calls if len(ps) == 1)
    bins = pack(calls, args.call_s)
    print(f"{rows} rows never measured: {len(calls)} commands in {len(bins)} calls "
          f"(~{sum(s for *_, s in calls) / 60:.0f} min of commands)")
    for i, group in enumerate(bins, 1):
        total = sum(c[2] for c in group)
        print(f"\n# call {i}: ~{total:.0f} s")
        for name, ps, s in group:
            # the call's slack shared among its commands: their budgets add up to --call-s
            print(command(name, ps, s + max(args.call_s - total, 0.0) / len(group)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
