"""`flashfx bench`: run one workload or all, write JSON lines, regenerate docs/benchmarks.md and its plots.

    python bench/run.py                          # every workload, every provider (long)
    python bench/run.py --quick                  # the suite in one ~10-minute GPU call
    python bench/run.py llama-train --providers eager,compile,flashfx
    python bench/run.py --device cpu --tiny      # smoke test of the harness on tiny models (numbers meaningless)
    python bench/run.py --render bench/results/*.jsonl   # regenerate the doc from measured results only

On a GPU each workload runs in its own child process (providers side by side inside it), so a provider that
kills its CUDA context or the process costs only itself: the parent records it and restarts the child for the
providers left. Exit codes: 0 done (failed providers are results, not errors), 2 usage error or no CUDA GPU.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, measure, providers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD_MODULES = ("bench.train_step", "bench.prefill", "bench.encoders", "bench.decode")
# Other engineers' scripts: run as they are, in a subprocess, when present (`all` in full mode only).
EXTERNAL = {"attention": "bench/attention.py", "fusion": "bench/fusion.py", "cross-entropy": "bench/cross_entropy.py"}
DOC_BEGIN = "<!-- BEGIN GENERATED: bench/run.py suite (do not edit by hand) -->"
DOC_END = "<!-- END GENERATED: bench/run.py suite -->"
QUICK_BUDGET_S = 570.0  # from the parent's start (ceilings included); + imports and the doc: one 600 s call
REVISIT_SHARE = 0.1  # budget weight of a workload seen again (its Liger row: one uncompiled provider, 5-10 s)
GRACE_S = 30.0  # a child past its workload's deadline is killed this much later


def workloads() -> Dict[str, common.Workload]:
    found: Dict[str, common.Workload] = {}
    for name in WORKLOAD_MODULES:
        found.update(importlib.import_module(name).WORKLOADS)
    return found


# ----------------------------------------------------------------------------------------- arguments

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    known = list(workloads()) + list(EXTERNAL)
    ap = argparse.ArgumentParser(prog="flashfx bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=["all"], metavar="WORKLOAD",
                    help=f"one or more of: {', '.join(known)}, or 'all' (default)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and providers; fits one 10-minute call")
    ap.add_argument("--providers", help=f"comma list (default: the workload's own); known: "
                                        f"{', '.join(providers.PROVIDERS)}")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny model sizes: tests the harness, not the speed")
    ap.add_argument("--out", help="JSON-lines file to append to (default bench/results/suite-<date>[-quick].jsonl)")
    ap.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.md"), help="markdown file to update")
    ap.add_argument("--img-dir", default=os.path.join(REPO, "docs", "img"), help="where the PNG plots go")
    ap.add_argument("--no-docs", action="store_true", help="write JSON lines only")
    ap.add_argument("--render", nargs="+", metavar="JSONL", help="regenerate the docs from these files; run nothing")
    ap.add_argument("--budget-s", type=float, help=f"total wall-time budget (default {QUICK_BUDGET_S:.0f} with "
                                                   "--quick): providers that cannot fit are recorded as skipped")
    ap.add_argument("--warmup", type=int, help="warm-up calls per provider (default by workload and mode)")
    ap.add_argument("--repeat", type=int, help="timed calls per provider (default by workload and mode)")
    ap.add_argument("--no-warm-compile", action="store_true", help="skip the re-compile with warm caches")
    ap.add_argument("--no-isolate", action="store_true", help="run workloads in this process (default off CUDA)")
    ap.add_argument("--isolate", action="store_true", help="one child process per workload (default on CUDA)")
    ap.add_argument("--list", action="store_true", help="list workloads and providers, run nothing")
    # Internal: the parent starts children with these.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--ceilings", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for w in args.workloads:
        if w != "all" and w not in known:
            raise measure.BenchError(f"unknown workload {w!r}; choose from: {', '.join(known)}, all")
    for n, v in (("--warmup", args.warmup), ("--repeat", args.repeat)):
        if v is not None and v < (0 if n == "--warmup" else 1):
            raise measure.BenchError(f"{n} {v} is too small; use {n} {'0' if n == '--warmup' else '1'} or more")
    return args


def selected(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """(own workloads, external scripts) to run, in the order given."""
    names = args.workloads
    own = list(workloads())
    if "all" in names:
        present = [n for n, path in EXTERNAL.items() if os.path.exists(os.path.join(REPO, path))]
        return own, ([] if args.quick or args.tiny else present)
    return [n for n in names if n in own], [n for n in names if n in EXTERNAL]


# ----------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        if args.list:
            return _list()
        if args.render:
            records = [r for path in args.render for r in common.read_jsonl(path)]
            return _render(records, args)
        device = measure.require_device(args.device)
        if args.child:
            return _child(args, device)
        return _parent(args, device)
    except measure.BenchError as e:
        print(f"flashfx bench: {e}", file=sys.stderr)
        return measure.EXIT_NO_CUDA


def _list() -> int:
    for name, wl in workloads().items():
        print(f"{name:15s} {wl.describe}\n{'':15s} providers: {', '.join(wl.providers)}\n"
              f"{'':15s} --quick:   {', '.join(wl.quick_providers)}")
    for name, path in EXTERNAL.items():
        print(f"{name:15s} {path} ({'present' if os.path.exists(os.path.join(REPO, path)) else 'absent'})")
    print("\nproviders:")
    for p in providers.PROVIDERS.values():
        print(f"  {p.name:22s} {p.describe}")
    return 0


def _default_out(args: argparse.Namespace) -> str:
    tag = "-tiny" if args.tiny else ("-quick" if args.quick else "")
    return os.path.join(REPO, "bench", "results", f"suite-{measure.today()}{tag}.jsonl")


Plan = List[Tuple[str, str]]  # (workload, provider) pairs in the order they run


def make_plan(names: Sequence[str], args: argparse.Namespace) -> Plan:
    """Every workload's providers in order; the providers that patch classes (Liger) after all the others, so
    no other provider of the process runs on patched classes."""
    table = workloads()
    first: Plan = []
    last: Plan = []
    for name in names:
        for p in providers.order_providers(providers.parse_providers(args.providers, _default_providers(table[name], args))):
            (last if p in providers.RUN_LAST else first).append((name, p))
    return first + last


def _parent(args: argparse.Namespace, device: Any) -> int:
    out = args.out or _default_out(args)
    run_id = args.run_id or datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    own, external = selected(args)
    budget = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if args.quick else None)
    start = time.time()
    progress = common.Progress()
    meta = {"type": "run", "run_id": run_id, "device": measure.device_name(device), "date": measure.today(),
            "versions": measure.versions(), "quick": args.quick, "tiny": args.tiny, "argv": list(sys.argv[1:]),
            "budget_s": budget}
    common.append_jsonl(out, meta)
    progress.update("measuring the card's ceilings (bf16 matmul, device copy)")
    ceilings = measure.measure_ceilings(device, quick=args.quick)
    common.append_jsonl(out, {"type": "ceilings", "run_id": run_id, **ceilings})
    deadline = None if budget is None else start + budget
    plan = make_plan(own, args)
    if args.isolate or (device.type == "cuda" and not args.no_isolate):
        _run_isolated(plan, args, out, run_id, deadline, ceilings)
    else:
        execute_plan(plan, args, device, out, run_id, deadline, ceilings)
    for name in external:
        _run_external(name, out, run_id, progress)
    progress.done()
    if not args.no_docs:
        records = [r for r in common.read_jsonl(out) if r.get("run_id") == run_id]
        _render(records, args)
    print(summary_text([r for r in common.read_jsonl(out) if r.get("run_id") == run_id]))
    print(f"results: {out}", file=sys.stderr)
    return 0


def _default_providers(wl: common.Workload, args: argparse.Namespace) -> Sequence[str]:
    if args.tiny and args.device == "cpu":
        # On a CPU smoke test Inductor needs a C++ toolchain and minutes: the harness is what is tested.
        return [p for p in wl.quick_providers if not providers.PROVIDERS[p].name.startswith("compile")]
    return wl.quick_providers if args.quick else wl.providers


def _groups(plan: Plan) -> List[Tuple[str, List[str]]]:
    """Consecutive pairs of one workload → (workload, providers): one model build each."""
    out: List[Tuple[str, List[str]]] = []
    for name, p in plan:
        if out and out[-1][0] == name:
            out[-1][1].append(p)
        else:
            out.append((name, [p]))
    return out


def execute_plan(plan: Plan, args: argparse.Namespace, device: Any, out: str, run_id: str,
                 deadline: Optional[float], ceilings: Dict[str, float]) -> None:
    """Run the plan in this process. A budget is shared among the workloads left by their `share`; a workload
    seen again later in the plan (its Liger row) keeps its eager reference for the numerics."""
    table = workloads()
    groups = _groups(plan)
    references: Dict[str, Dict[str, Any]] = {}
    for i, (name, names) in enumerate(groups):
        group_deadline = deadline
        if deadline is not None:
            later = [n for n, _ in groups[i:]]
            first_time = [n for j, n in enumerate(later) if n not in later[:j]]
            weight = table[name].share if name not in references else REVISIT_SHARE
            total = sum(table[n].share if n not in references else REVISIT_SHARE for n in first_time)
            group_deadline = time.time() + max(deadline - time.time(), 0.0) * weight / total
        keep = any(n == name for n, _ in groups[i + 1:])
        reference = references.setdefault(name, {}) if keep or name in references else {}
        _run_group(name, names, args, device, out, run_id, group_deadline, ceilings, reference)
        if not keep:
            references.pop(name, None)


def _options(args: argparse.Namespace, device: Any, deadline: Optional[float], name: str) -> common.Options:
    wl = workloads()[name]
    return common.Options(device=device, quick=args.quick, tiny=args.tiny, warmup=args.warmup, repeat=args.repeat,
                          warm_compile=not args.no_warm_compile,
                          warm_compile_only=wl.quick_warm if args.quick else None,
                          deadline=deadline, est_scale=wl.est_scale, progress=common.Progress())


def _run_group(name: str, names: Sequence[str], args: argparse.Namespace, device: Any, out: str,
               run_id: str, deadline: Optional[float], ceilings: Dict[str, float],
               reference: Dict[str, Any]) -> None:
    def emit(record: Dict[str, Any]) -> None:
        common.append_jsonl(out, {"type": "result" if record.get("status") != "started" else "event",
                                  "run_id": run_id, **record})
    opts = _options(args, device, deadline, name)
    if deadline is not None and not args.tiny and time.time() >= deadline:
        for p in names:
            emit({"workload": name, "provider": p, "status": "skipped", "error": "time budget spent"})
        return
    opts.progress.update(f"{name}: building the model")
    t0 = time.perf_counter()
    try:
        case = workloads()[name].build(opts)
    except Exception as exc:  # noqa: BLE001  (a workload that cannot build is a result for every provider)
        for p in names:
            emit({"workload": name, "provider": p, "status": "failed", "error": f"build: {measure.one_line(exc)}"})
        return
    case.name = name  # records are keyed by the workload name the plan uses
    emit({"workload": name, "provider": "-", "status": "started", "describe": case.describe,
          "flops": case.flops, "bytes": case.bytes, "tokens": case.tokens, "items": case.items,
          "build_s": time.perf_counter() - t0})
    common.run_case(case, names, opts, ceilings, emit, reference)
    del case
    measure.free_memory(device)


def _child(args: argparse.Namespace, device: Any) -> int:
    ceilings = json.loads(args.ceilings) if args.ceilings else {}
    plan = [tuple(pair) for pair in json.loads(args.plan)]
    execute_plan(plan, args, device, args.out, args.run_id, args.deadline, ceilings)  # type: ignore[arg-type]
    return 0


def _run_isolated(plan: Plan, args: argparse.Namespace, out: str, run_id: str, deadline: Optional[float],
                  ceilings: Dict[str, float]) -> None:
    """The plan in a child process. A child that dies costs the provider it was running (recorded as failed),
    then a fresh child goes on with the rest; at the budget's end (plus a grace) the child is killed."""
    remaining = list(plan)
    for _attempt in range(len(plan) + 1):
        if not remaining:
            return
        cmd = [sys.executable, os.path.join(REPO, "bench", "run.py"), remaining[0][0], "--child", "--out", out,
               "--run-id", run_id, "--plan", json.dumps(remaining), "--device", args.device,
               "--ceilings", json.dumps(common.jsonable(ceilings))]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--no-warm-compile"] if args.no_warm_compile else []
        cmd += ["--deadline", repr(deadline)] if deadline is not None else []
        cmd += ["--warmup", str(args.warmup)] if args.warmup is not None else []
        cmd += ["--repeat", str(args.repeat)] if args.repeat is not None else []
        timeout = None if deadline is None else max(deadline - time.time(), 0) + GRACE_S
        rc, tail, timed_out = _spawn(cmd, timeout)
        records = [r for r in common.read_jsonl(out) if r.get("run_id") == run_id]
        finished = {(r["workload"], r["provider"]) for r in records if r.get("type") == "result"}
        started = [(r["workload"], r["provider"]) for r in records
                   if r.get("type") == "event" and (r.get("workload"), r.get("provider")) in remaining]
        crashed = [pair for pair in started if pair not in finished]
        for name, p in crashed[-1:]:
            last = next((line.strip() for line in reversed(tail) if line.strip()), "")
            if timed_out:  # the progress line says what it was doing: "[bench 46.5s] wl · p: compiling"
                status, error = "timeout", f"unfinished at the time budget (was {last.rsplit(': ', 1)[-1][:60]})"
            else:
                status, error = "failed", f"process died (exit {rc}): {last[:160]}"
            common.append_jsonl(out, {"type": "result", "run_id": run_id, "workload": name, "provider": p,
                                      "status": status, "describe": providers.PROVIDERS[p].describe, "error": error})
            finished.add((name, p))
        remaining = [pair for pair in remaining if pair not in finished]
        if timed_out or (rc == 0 and remaining and not crashed):
            for name, p in remaining:
                common.append_jsonl(out, {"type": "result", "run_id": run_id, "workload": name, "provider": p,
                                          "status": "skipped", "describe": providers.PROVIDERS[p].describe,
                                          "error": "time budget spent" if timed_out else "not run"})
            return


def _spawn(cmd: List[str], timeout: Optional[float]) -> Tuple[int, List[str], bool]:
    """Run a child, echo its stderr, keep the last lines; kill it at `timeout` seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()
    timer = threading.Timer(timeout, kill) if timeout is not None else None
    if timer:
        timer.start()
    tail: collections.deque = collections.deque(maxlen=30)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
    rc = proc.wait()
    if timer:
        timer.cancel()
    return rc, list(tail), killed.is_set()


def _run_external(name: str, out: str, run_id: str, progress: common.Progress) -> None:
    """Another engineer's script, as its author runs it (it writes its own results and doc section)."""
    path = os.path.join(REPO, EXTERNAL[name])
    progress.update(f"{name}: {EXTERNAL[name]}")
    folder = os.path.dirname(os.path.abspath(out))
    env = {**os.environ, "OUT": folder, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    rc = subprocess.call([sys.executable, path, "--out", folder], cwd=REPO, env=env)
    common.append_jsonl(out, {"type": "external", "run_id": run_id, "workload": name, "script": EXTERNAL[name],
                              "exit_code": rc})


# ----------------------------------------------------------------------------------------- results → text

def latest(records: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, Any], Dict[str, float],
                                                       Dict[str, Dict[str, Dict[str, Any]]],
                                                       Dict[str, Dict[str, Any]]]:
    """(run meta, ceilings, {workload: {provider: result}}, {workload: case info}); later records win, except that
    a skipped row (not measured) never hides an earlier measurement of the same provider."""
    meta: Dict[str, Any] = {}
    ceilings: Dict[str, float] = {}
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    cases: Dict[str, Dict[str, Any]] = {}
    warm_after = _compiled_after(records)
    for i, r in enumerate(records):
        kind = r.get("type")
        if kind == "run":
            meta = r
        elif kind == "ceilings":
            ceilings = r
        elif kind == "event" and r.get("provider") == "-":
            cases[r["workload"]] = r
        elif kind == "result":
            rows = results.setdefault(r["workload"], {})
            earlier = rows.get(r["provider"])
            if r.get("status") == "skipped" and earlier and earlier.get("status") == "ok":
                continue
            rows[r["provider"]] = {**r, "compiled_after": warm_after[i]} if i in warm_after else r
    return meta, ceilings, results, cases


def _compiled_after(records: Sequence[Dict[str, Any]]) -> Dict[int, str]:
    """{index of a flashfx result: the flashfx provider compiled before it in the same process}. Triton keeps
    compiled kernels and flashfx its autotune choices in memory whatever the disk caches say, so only the first
    flashfx provider of a process compiles cold. A child that died or was killed ends its process."""
    compiled: Dict[str, List[str]] = {}  # run id → flashfx providers started in its current child process
    first: Dict[Tuple[str, str, str], str] = {}
    out: Dict[int, str] = {}
    for i, r in enumerate(records):
        run, p = str(r.get("run_id")), str(r.get("provider"))
        spec = providers.PROVIDERS.get(p)
        if r.get("type") == "event" and r.get("status") == "started" and spec and spec.compiles and _is_flashfx(p):
            done = compiled.setdefault(run, [])
            if done:
                first[(run, r["workload"], p)] = done[0]
            done.append(f"{r['workload']} {p}")
        elif r.get("type") == "result":
            if (run, r.get("workload"), p) in first and r.get("status") == "ok":
                out[i] = first.pop((run, r["workload"], p))
            if r.get("status") == "timeout" or str(r.get("error", "")).startswith("process died"):
                compiled[run] = []
    return out


def _is_flashfx(provider: str) -> bool:
    return provider.startswith("flashfx")


def workload_table(workload: str, rows: Dict[str, Dict[str, Any]]) -> str:
    """One markdown table: a row per provider, fastest time and lowest peak in bold, failures in one line."""
    ok = {p: r for p, r in rows.items() if r.get("status") == "ok"}
    fastest = min(ok, key=lambda p: ok[p]["ms"]) if ok else None
    peaks = {p: r["peak_gb"] for p, r in ok.items() if r.get("peak_gb") is not None}
    leanest = min(peaks, key=peaks.get) if peaks else None
    training = any("loss" in r for r in ok.values())
    rate = "tok/s" if any("tokens_per_s" in r for r in ok.values()) else "img/s"
    bandwidth = any("gbps" in r for r in ok.values())
    headers = ["provider", "ms (p20–p80)", rate, "TFLOP/s (MFU)"] + (["GB/s (of copy)"] if bandwidth else []) + [
        "peak GB", "compile s cold / warm",
        "loss (rel err) / grad rel err vs eager; grad rel err vs fp32" if training else "max rel err vs eager"]
    body = []
    for p, r in rows.items():
        if r.get("status") != "ok":
            cells = [p, f"{r.get('status')}: {r.get('error', '')}"] + [""] * (len(headers) - 2)
            body.append(cells)
            continue
        ms = f"{r['ms']:.2f} ({r['ms_p20']:.2f}–{r['ms_p80']:.2f})"
        ms = f"**{ms}**" if p == fastest else ms
        tput = r.get("tokens_per_s") if rate == "tok/s" else r.get("items_per_s")
        tput_s = common.fmt(tput, 1, "k") if tput and tput >= 1e4 else common.fmt(tput, 1)
        tf = common.fmt(r.get("tflops"), 1)
        if r.get("mfu") is not None:
            tf += f" ({100 * r['mfu']:.0f}%)"
        peak = common.fmt(r.get("peak_gb"), 2)
        peak = f"**{peak}**" if p == leanest else peak
        comp = "—"
        if r.get("compile_s_cold") is not None:
            after = "†" if r.get("compiled_after") else ""
            comp = f"{r['compile_s_cold']:.1f}{after} / {common.fmt(r.get('compile_s_warm'), 1)}"
        if training:
            num = f"{common.fmt(r.get('loss'), 4)}"
            if r.get("loss_rel_err") is not None:
                num += f" ({common.fmt_err(r['loss_rel_err'])}) / {common.fmt_err(r.get('grad_rel_err'))}"
            else:
                num += " (reference)"
            if r.get("grad_rel_err_fp32") is not None:
                num += f"; {common.fmt_err(r['grad_rel_err_fp32'])}"
        else:
            num = common.fmt_err(r.get("max_rel_err")) if "max_rel_err" in r else "reference"
        cells = [p, ms, tput_s, tf]
        if bandwidth:
            gb = common.fmt(r.get("gbps"), 0)
            if r.get("bw_frac") is not None:
                gb += f" ({100 * r['bw_frac']:.0f}%)"
            cells.append(gb)
        body.append(cells + [peak, comp, num])
    return common.markdown_table(headers, body)


def _apart(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    """A note for a comparison of two rows that came from different runs (not side by side in one process)."""
    ra, rb = a.get("run_id"), b.get("run_id")
    return f" (runs `{ra}` and `{rb}`: not side by side)" if ra != rb else ""


def verdicts(results: Dict[str, Dict[str, Dict[str, Any]]]) -> List[str]:
    """Plain sentences: per workload, flashfx's best against the best of the rest, and what failed."""
    lines = []
    for wl, rows in results.items():
        ok = {p: r for p, r in rows.items() if r.get("status") == "ok"}
        fx = {p: r for p, r in ok.items() if _is_flashfx(p)}
        peers = {p: r for p, r in ok.items() if not _is_flashfx(p)}
        broken = [p for p, r in rows.items() if _is_flashfx(p) and r.get("status") == "failed"]
        if not fx:
            if broken:
                lines.append(f"- **{wl}**: every flashfx variant run here failed ({', '.join(broken)}): "
                             "**flashfx loses**.")
            else:
                lines.append(f"- **{wl}**: flashfx not measured in this run (see the table for why).")
            continue
        best_fx = min(fx, key=lambda p: fx[p]["ms"])
        text = f"- **{wl}**: best flashfx variant `{best_fx}` {fx[best_fx]['ms']:.2f} ms"
        if peers:
            best = min(peers, key=lambda p: peers[p]["ms"])
            ratio = fx[best_fx]["ms"] / peers[best]["ms"]
            word = "slower" if ratio > 1.0 else "faster"
            factor = ratio if ratio > 1.0 else 1.0 / ratio
            text += f" vs `{best}` {peers[best]['ms']:.2f} ms: {factor:.2f}× {word}"
            text += " — **flashfx loses**" if ratio > 1.02 else ""
            text += _apart(fx[best_fx], peers[best])
            mem_fx = [(r["peak_gb"], p) for p, r in fx.items() if r.get("peak_gb") is not None]
            mem_peer = [(r["peak_gb"], p) for p, r in peers.items() if r.get("peak_gb") is not None]
            if mem_fx and mem_peer:
                (m_fx, p_fx), (m_peer, p_peer) = min(mem_fx), min(mem_peer)
                text += (f"; lowest peak memory: flashfx `{p_fx}` {m_fx:.2f} GB vs `{p_peer}` {m_peer:.2f} GB"
                         + (" (flashfx loses)" if m_fx > m_peer * 1.02 else "") + _apart(fx[p_fx], peers[p_peer]))
        if broken:
            text += f". Failed: {', '.join(broken)}"
        lines.append(text + ".")
    return lines


def _fp32_note(r: Dict[str, Any], eager: Dict[str, Any]) -> str:
    """A flashfx row's worst gradient error against the fp32 step, beside eager's own (its bf16 rounding)."""
    if r.get("grad_rel_err_fp32") is None:
        return ""
    own = eager.get("grad_rel_err_fp32")
    return (f"; against the fp32 step {common.fmt_err(r['grad_rel_err_fp32'])}"
            + (f" (eager's own {common.fmt_err(own)})" if own is not None else ""))


def issue5_targets(results: Dict[str, Dict[str, Dict[str, Any]]]) -> List[str]:
    """Issue 5's targets on the Llama training step: peak ≤ 7.0 GB at a step time ≤ torch.compile's, for the
    flashfx variants that run every default pass."""
    rows = results.get("llama-train", {})
    compiled, eager = rows.get("compile", {}), rows.get("eager", {})
    fx = {p: r for p, r in rows.items() if _is_flashfx(p) and p not in providers.SINGLE_PASS
          and r.get("status") == "ok" and r.get("peak_gb")}
    if compiled.get("status") != "ok" or not fx:
        return ["- Issue 5 (Llama training memory): not measurable in this run (needs `compile` and a flashfx "
                "variant to succeed)."]
    out = []
    for p, r in fx.items():
        mem_ok = r["peak_gb"] <= 7.0
        time_ok = r["ms"] <= compiled["ms"]
        plan = (f"; remat plan: predicted peak of the graphs' own allocations {r['remat_predicted_peak_gb']:.2f} GB "
                f"(weights and inputs excluded), {r['remat_saved_gb']:.2f} GB of activations saved"
                if r.get("remat_predicted_peak_gb") is not None else "")
        out.append(f"- `{p}`: peak {r['peak_gb']:.2f} GB ({'meets' if mem_ok else 'misses'} ≤ 7.0 GB), step "
                   f"{r['ms']:.2f} ms vs torch.compile {compiled['ms']:.2f} ms ({'meets' if time_ok else 'misses'}"
                   f" ≤ compile{_apart(r, compiled)}); loss rel err {common.fmt_err(r.get('loss_rel_err'))}, grad rel err "
                   f"{common.fmt_err(r.get('grad_rel_err'))}{_grads_compared(r)}{_fp32_note(r, eager)}{plan}.")
    return out


def render_section(records: Sequence[Dict[str, Any]], img_rel: Optional[Dict[str, str]] = None) -> str:
    """The generated part of docs/benchmarks.md, from JSON-lines records."""
    meta, ceilings, results, cases = latest(records)
    lines = [DOC_BEGIN, "", METHOD, ""]
    metas = [r for r in records if r.get("type") == "run"] or [meta]
    used = {r.get("run_id") for rows in results.values() for r in rows.values()}
    metas = [m for m in metas if m.get("run_id") in used] or metas[-1:]
    for m in metas:
        v = m.get("versions", {})
        mode = "tiny smoke test (numbers meaningless)" if m.get("tiny") else ("--quick" if m.get("quick") else
                                                                              "full")
        lines += [f"Run `{m.get('run_id', '?')}` ({mode}) on **{m.get('device', '?')}**, {m.get('date', '?')}: "
                  f"torch {v.get('torch')}, Triton {v.get('triton')}, transformers {v.get('transformers')}, "
                  f"liger-kernel {v.get('liger_kernel') or 'absent'}, CUDA {v.get('cuda')}.", ""]
    if ceilings:
        where = "the last of these runs (each row's MFU uses its own run's)" if len(metas) > 1 else "the same run"
        lines.append(f"Ceilings measured in {where}: bf16 dense matmul (8192³) "
                     f"**{common.fmt(ceilings.get('matmul_tflops'), 0)} TFLOP/s**, device copy (read + write) "
                     f"**{common.fmt(ceilings.get('copy_gbps'), 0)} GB/s**. MFU = achieved TFLOP/s over the first.")
        lines.append("")
    lines += ["### Where flashfx stands", ""] + verdicts(results) + [""]
    if "llama-train" in results:
        lines += ["### Issue 5 targets (Llama training step)", ""] + issue5_targets(results) + [""]
    for wl, rows in results.items():
        case = cases.get(wl, {})
        lines += [f"### {wl}", "", case.get("describe", ""), ""]
        if case.get("flops"):
            lines.append(f"FLOPs per step (formula in bench/): {_si(case['flops'])}FLOP"
                         + (f"; minimum HBM bytes: {_si(case['bytes'])}B" if case.get("bytes") else "") + ".")
            lines.append("")
        lines += [workload_table(wl, rows), ""]
        by_run: Dict[str, List[str]] = {}
        for p, r in rows.items():
            by_run.setdefault(str(r.get("run_id", "?")), []).append(p)
        if len(by_run) > 1:  # rows merged from several runs are not side by side: say so under the table
            lines += ["**Not one process:** " + "; ".join(f"run `{run}`: {', '.join(ps)}" for run, ps in
                                                           by_run.items()) + ".", ""]
        elif len(metas) > 1:
            lines += [f"Measured in run `{next(iter(by_run))}`.", ""]
        reused = [f"`{p}` after `{r['compiled_after']}`" for p, r in rows.items() if r.get("compiled_after")]
        if reused:
            lines += ["† Not a cold compile: " + ", ".join(reused) + " in the same process; the kernels they "
                      "share (same source and specialisation) were compiled and autotuned then and stayed in memory.",
                      ""]
        counted = [(p, r["flashfx_counters"]) for p, r in rows.items() if r.get("flashfx_counters") is not None]
        if counted:
            lines.append("flashfx pass counters (summed over compiled graphs): " + "; ".join(
                f"`{p}`: " + (", ".join(f"{k}={v}" for k, v in c.items()) or "nothing rewritten")
                for p, c in counted) + ".")
            lines.append("")
        if img_rel and wl in img_rel:
            lines += [f"![{wl}: time and peak memory per provider]({img_rel[wl]})", ""]
    lines.append(DOC_END)
    return "\n".join(lines)


def _si(x: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g} "


def summary_text(records: Sequence[Dict[str, Any]]) -> str:
    """The short table printed at the end of a run (what a GPU call's output tail shows)."""
    _, ceilings, results, _ = latest(records)
    out = [f"ceilings: matmul {common.fmt(ceilings.get('matmul_tflops'), 0)} TFLOP/s, copy "
           f"{common.fmt(ceilings.get('copy_gbps'), 0)} GB/s"]
    for wl, rows in results.items():
        for p, r in rows.items():
            if r.get("status") == "ok":
                out.append(f"{wl:14s} {p:20s} {r['ms']:9.2f} ms  peak {common.fmt(r.get('peak_gb'), 2):>6s} GB  "
                           f"compile {common.fmt(r.get('compile_s_cold'), 1):>5s}s  "
                           f"err {common.fmt_err(r.get('max_rel_err', r.get('loss_rel_err')))}")
            else:
                out.append(f"{wl:14s} {p:20s} {r.get('status')}: {r.get('error', '')[:90]}")
    return "\n".join(out)


def _grads_compared(r: Dict[str, Any]) -> str:
    """How many gradients the grad error covers, and the worst one (records from before 2026-11-23 18:00: a few)."""
    if not r.get("grads_compared"):
        return ""
    missing = f", {r['grads_missing']} missing" if r.get("grads_missing") else ""
    return f" (max over all {r['grads_compared']} parameter gradients{missing}, worst `{r['grad_worst']}`)"


METHOD = """Whole models, providers side by side in one process (`python bench/run.py`, i.e. `flashfx bench`; JSON
lines under `bench/results/`; Liger-Kernel rows run last because its patch changes the model classes). Times are
medians of CUDA-event timings after warm-up, with the 20th–80th percentile range; peak memory is
`torch.cuda.max_memory_allocated` over one step, weights included (runs after 2026-11-23 17:30 add the free part of
CUDA-graph memory pools, which a replay uses unseen by it); compile time is the first call minus one steady-state
call with empty on-disk kernel caches (cold) and, where shown, again after `torch._dynamo.reset()` with those caches
filled (warm). Numerics compare each provider with the first that ran (eager attention, or SDPA where eager did not
run): max |out − ref| / max |ref| for outputs; for training the loss and the same metric over the parameters'
gradients (every parameter from runs after 2026-11-23 18:00, the worst one named; earlier runs, four). A provider
that failed shows its one-line error; one that did not fit the time budget says so."""
SECTION_HEADING = "## Models: training, prefill, decode, encoders (`bench/run.py`)"


def update_doc(path: str, section: str) -> None:
    """Replace the generated section between its markers; everything else in the file stays as it is."""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = "# Benchmarks\n"
    if DOC_BEGIN in text and DOC_END in text:
        before, rest = text.split(DOC_BEGIN, 1)
        after = rest.split(DOC_END, 1)[1]
        text = before + section + after
    else:  # first run: our section goes at the end, after whatever other sections the file has
        text = text.rstrip("\n") + "\n\n" + SECTION_HEADING + "\n\n" + section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def plot(results: Dict[str, Dict[str, Dict[str, Any]]], img_dir: str, title: str) -> Dict[str, str]:
    """One PNG per workload: time (with the p20–p80 range) and peak memory per provider. Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("flashfx bench: matplotlib is not installed (pip install matplotlib); plots not regenerated",
              file=sys.stderr)
        return {}
    os.makedirs(img_dir, exist_ok=True)
    paths = {}
    for wl, rows in results.items():
        names = list(rows)
        ok = [rows[p].get("status") == "ok" for p in names]
        if sum(ok) < 2:  # nothing to compare: no plot
            continue
        ms = [rows[p]["ms"] if k else 0.0 for p, k in zip(names, ok)]
        lo = [rows[p]["ms"] - rows[p]["ms_p20"] if k else 0.0 for p, k in zip(names, ok)]
        hi = [rows[p]["ms_p80"] - rows[p]["ms"] if k else 0.0 for p, k in zip(names, ok)]
        mem = [(rows[p].get("peak_gb") or 0.0) if k else 0.0 for p, k in zip(names, ok)]
        colors = ["tab:orange" if _is_flashfx(p) else "tab:blue" for p in names]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
        ys = list(range(len(names)))
        a.barh(ys, ms, xerr=[lo, hi], color=colors)
        b.barh(ys, mem, color=colors)
        a.set_yticks(ys, [p if k else f"{p} ({rows[p].get('status')})" for p, k in zip(names, ok)])
        a.invert_yaxis()
        a.set_xlabel("time per step, ms (median, p20–p80)")
        b.set_xlabel("peak memory, GB")
        fig.suptitle(f"{wl} — {title}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(img_dir, f"bench_{wl}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[wl] = path
    return paths


def _render(records: Sequence[Dict[str, Any]], args: argparse.Namespace) -> int:
    meta, _, results, _ = latest(records)
    if not results:
        raise measure.BenchError("no benchmark results in the given records; run a workload first")
    title = f"{meta.get('device', '?')}, {meta.get('date', '?')}"
    img = {} if meta.get("tiny") else plot(results, args.img_dir, title)
    doc_dir = os.path.dirname(os.path.abspath(args.docs))
    rel = {wl: os.path.relpath(p, doc_dir) for wl, p in img.items()}
    if not rel and not meta.get("tiny"):  # keep links to plots already made (matplotlib absent here)
        rel = {wl: os.path.relpath(os.path.join(args.img_dir, f"bench_{wl}.png"), doc_dir) for wl, rows in results.items()
               if os.path.exists(os.path.join(args.img_dir, f"bench_{wl}.png"))
               and sum(r.get("status") == "ok" for r in rows.values()) >= 2}
    update_doc(args.docs, render_section(records, rel))
    print(f"updated {args.docs}" + (f" and {len(img)} plots in {args.img_dir}" if img else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
