"""The benchmark harness: cases and workloads, running every provider on a case, numerics, JSON lines and tables
(measurement is in `measure`, the providers in `providers`).

One workload = one `Case` (a model, its inputs and a step); one provider = one way a user would run it (eager,
SDPA, torch.compile, Liger-Kernel, flashfx with some passes). `run_case` runs every provider on the case in this
process, one at a time, freeing memory between them, and turns each into one JSON-lines record. A provider that
fails is recorded as ``failed: <one line>`` and the next one runs: a benchmark that dies on one provider is useless.

Times are medians of CUDA-event timings after warm-up, with the 20th and 80th percentiles. TFLOP/s and GB/s come
from explicit formulas in the workload files, against ceilings measured in the same run (`measure_ceilings`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:
    from bench import providers
    from bench.measure import (free_memory, is_cuda_context_lost, max_rel_error, one_line, peak_bytes, summarize,
                               synchronize, time_ms)
except ImportError:  # run from inside bench/
    import providers  # type: ignore[no-redef]
    from measure import (free_memory, is_cuda_context_lost, max_rel_error,  # type: ignore[no-redef]
                         one_line, peak_bytes, summarize, synchronize, time_ms)

# ----------------------------------------------------------------------------------------- progress

class Progress:
    """One status line on stderr (no tqdm): rewritten in place on a terminal, one line per update elsewhere."""

    def __init__(self, stream: Any = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[bench {time.perf_counter() - self.t0:6.1f}s] {text}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


# ----------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One workload instance. `step(fn)` runs the model callable `fn` once and returns what numerics compare:
    the loss (training) or the output tensor (inference)."""

    name: str
    model: torch.nn.Module
    step: Callable[[Callable[..., Any]], Any]
    training: bool
    flops: Optional[float] = None          # per step, from the formula in the workload file
    bytes: Optional[float] = None          # minimum HBM bytes per step (bandwidth-bound workloads)
    tokens: Optional[int] = None           # per step, for tokens/s
    items: Optional[int] = None            # images per step, for images/s
    grad_params: Optional[Sequence[str]] = ()  # parameters whose gradients are compared with eager's; None: all
    family: str = "llama"                  # which Liger patch applies, if any
    describe: str = ""


@dataclass(frozen=True)
class Workload:
    """A named workload: `build(opts)` makes its `Case`; provider lists for the full and the --quick suite."""

    name: str
    describe: str
    build: Callable[["Options"], Case]
    providers: Sequence[str]
    quick_providers: Sequence[str]
    quick_warm: Sequence[str] = ()         # providers re-compiled with warm caches in --quick (full: all)
    share: float = 1.0                     # relative share of a time budget (big models compile longer)
    est_scale: float = 1.0                 # provider time estimates (made on llama-train) scaled to this model


@dataclass
class Options:
    device: torch.device
    quick: bool = False
    tiny: bool = False
    warmup: Optional[int] = None
    repeat: Optional[int] = None
    warm_compile: bool = True              # re-compile once more with the on-disk caches warm
    warm_compile_only: Optional[Sequence[str]] = None  # ...for these providers only (None: every compiling one)
    deadline: Optional[float] = None       # time.time() after which providers are skipped
    est_scale: float = 1.0                 # Workload.est_scale
    progress: Optional[Progress] = None
    layers: Optional[int] = None           # fewer layers than the workload's model (ncu's per-kernel replay)


# ----------------------------------------------------------------------------------------- running a case

def _repeats(case: Case, opts: Options) -> Tuple[int, int]:
    if opts.warmup is not None and opts.repeat is not None:
        return opts.warmup, opts.repeat
    if opts.tiny:
        w, r = 1, 3
    elif case.training:
        w, r = (2, 10) if opts.quick else (5, 30)
    else:
        w, r = (3, 20) if opts.quick else (10, 50)
    return (opts.warmup if opts.warmup is not None else w), (opts.repeat if opts.repeat is not None else r)


def _grads(case: Case) -> Dict[str, torch.Tensor]:
    """The compared parameters' gradients, as they are (the reference provider's are copied to the host)."""
    params = dict(case.model.named_parameters())
    names = params if case.grad_params is None else case.grad_params
    return {n: params[n].grad.detach() for n in names if n in params and params[n].grad is not None}


def run_provider(case: Case, provider: providers.Provider, opts: Options, reference: Dict[str, Any],
                 ceilings: Dict[str, float], cache_root: str) -> Dict[str, Any]:
    """Measure one provider on `case`; raises on failure (run_case records it)."""
    progress = opts.progress or Progress(enabled=False)
    device = opts.device
    record: Dict[str, Any] = {"provider": provider.name, "describe": provider.describe}
    providers.set_attention(case.model, provider.attn)
    case.model.train(case.training)
    context = provider.context() if provider.context else contextlib.nullcontext()
    with providers.fresh_compile_caches(cache_root, provider.name), context:
        fn = provider.wrap(case.model, case, opts) if provider.wrap else case.model
        progress.update(f"{case.name} · {provider.name}: {'compiling' if provider.compiles else 'first call'}")
        synchronize(device)
        t0 = time.perf_counter()
        case.step(fn)
        synchronize(device)
        first_s = time.perf_counter() - t0
        warmup, repeat = _repeats(case, opts)
        progress.update(f"{case.name} · {provider.name}: timing {warmup}+{repeat}")
        samples = time_ms(lambda: case.step(fn), device, warmup, repeat)
        record.update(summarize(samples))
        if provider.compiles:
            # The first call minus one steady-state call: what the user waits for before the first step.
            record["compile_s_cold"] = max(first_s - record["ms"] / 1e3, 0.0)
        counters = _flashfx_counters(fn)
        if counters is not None:
            record["flashfx_counters"] = counters
        fell_back = fallbacks(fn)  # a generated kernel that failed runs its ATen ops instead: the row says so
        if fell_back:
            record["fallbacks"] = fell_back
        record.update(remat_prediction(fn))
        progress.update(f"{case.name} · {provider.name}: numerics + memory")
        out = case.step(fn)
        _numerics(case, record, out, reference)
        peak = peak_bytes(lambda: case.step(fn), device)
        record["peak_gb"] = peak / 1e9 if peak is not None else None
        warm = opts.warm_compile and (opts.warm_compile_only is None or provider.name in opts.warm_compile_only)
        if provider.compiles and warm:
            progress.update(f"{case.name} · {provider.name}: warm re-compile")
            del fn
            torch._dynamo.reset()
            fn = provider.wrap(case.model, case, opts) if provider.wrap else case.model
            synchronize(device)
            t0 = time.perf_counter()
            case.step(fn)
            synchronize(device)
            record["compile_s_warm"] = max(time.perf_counter() - t0 - record["ms"] / 1e3, 0.0)
        del fn
    case.model.zero_grad(set_to_none=True)
    _rates(case, record, ceilings)
    return record


def _flashfx_counters(fn: Any) -> Optional[Dict[str, int]]:
    """What flashfx's passes did (e.g. attention.replaced), so a row that rewrote nothing is visibly so."""
    report = _report(fn)
    if report is None:
        return None
    try:
        return {k: v for k, v in sorted(report.counters().items()) if v}
    except Exception:  # noqa: BLE001  (the report is informative; the timing stands without it)
        return None


def _report(fn: Any) -> Any:
    """flashfx's report of a provider's callable, or None for the other providers."""
    return getattr(fn, "report", None) if type(fn).__module__.startswith("flashfx") else None


def fallbacks(fn: Any) -> List[str]:
    """'kernel: error' for each generated kernel that failed at run time and now runs its ATen ops."""
    report = _report(fn)
    return [f"{name}: {error}" for name, error in report.fallbacks()] if report is not None else []


def remat_totals(fn: Any) -> Dict[str, Any]:
    """flashfx's remat plans summed over compiled graphs, in bytes and FLOPs; empty without a plan."""
    report = _report(fn)
    plans = [p for g in report.graphs for p in g.remat if hasattr(p, "peak_bytes")] if report is not None else []
    if not plans:
        return {}
    compiled = [max(g.compiled_peaks.values()) for g in report.graphs if getattr(g, "compiled_peaks", None)]
    return {"peak_bytes": sum(p.peak_bytes for p in plans), "activation_bytes": sum(p.activation_bytes for p in plans),
            "extra_flops": sum(p.extra_flops for p in plans), "status": ",".join(sorted({p.status for p in plans})),
            "compiled_peak_bytes": sum(compiled) if compiled else None}


def remat_prediction(fn: Any) -> Dict[str, float]:
    """The predicted peak of what the forward and backward graphs allocate (weights and inputs excluded) and the
    activation bytes saved, in GB, for a suite row; empty without a plan."""
    totals = remat_totals(fn)
    if not totals:
        return {}
    return {"remat_predicted_peak_gb": totals["peak_bytes"] / 1e9, "remat_saved_gb": totals["activation_bytes"] / 1e9}


def _fp32_reference(case: Case) -> Optional[Dict[str, Any]]:
    """The same step in float32 (SDPA attention): the yardstick that says whether a provider's 16-bit gradients are
    as accurate as eager's own, rather than merely close to them. The model is cast up and back in place (bf16 and
    fp16 values are exact in fp32); None for a model already in fp32 or when the fp32 step does not fit."""
    params = list(case.model.parameters())
    dtype = params[0].dtype if params else torch.float32
    if dtype == torch.float32:
        return None
    attn = getattr(getattr(case.model, "config", None), "_attn_implementation", None)
    try:
        case.model.float()
        providers.set_attention(case.model, "sdpa")
        loss = case.step(case.model).float().item()
        grads = {n: g.to("cpu", torch.float32, copy=True) for n, g in _grads(case).items()}
        return {"loss": loss, "grads": grads}
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        case.model.zero_grad(set_to_none=True)
        case.model.to(dtype)
        if attn is not None:
            providers.set_attention(case.model, attn)
        free_memory(next(case.model.parameters()).device)


def _fp32_errors(record: Dict[str, Any], reference: Dict[str, Any], grads: Dict[str, torch.Tensor]) -> None:
    """Loss and worst gradient error against the fp32 step, for the reference provider (eager) too."""
    fp32 = reference.get("fp32")
    if not fp32:
        return
    record["loss_rel_err_fp32"] = abs(record["loss"] - fp32["loss"]) / max(abs(fp32["loss"]), 1e-12)
    errs = _grad_errors(grads, fp32["grads"])
    if errs:
        worst = max(errs, key=errs.get)
        record.update(grad_rel_err_fp32=errs[worst], grad_worst_fp32=worst)


def _grad_errors(grads: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """max_rel_error per gradient the reference also has."""
    return {n: max_rel_error(grads[n], g) for n, g in reference.items() if n in grads}


def _numerics(case: Case, record: Dict[str, Any], out: Any, reference: Dict[str, Any]) -> None:
    tensor = out if isinstance(out, torch.Tensor) else None
    if tensor is None:
        return
    if case.training:
        record["loss"] = tensor.float().item()
        grads = _grads(case)
        if not reference:
            # on the host: every gradient of a large model would otherwise sit in the next providers' peaks
            reference.update({"loss": record["loss"], "provider": record["provider"],
                              "grads": {n: g.to("cpu", copy=True) for n, g in grads.items()}})
            reference["fp32"] = _fp32_reference(case)
            _fp32_errors(record, reference, grads)
            return
        ref_loss = reference["loss"]
        record["loss_rel_err"] = abs(record["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
        errs = _grad_errors(grads, reference["grads"])
        if errs:
            worst = max(errs, key=errs.get)
            record.update(grad_rel_err=errs[worst], grad_worst=worst, grads_compared=len(errs),
                          grads_missing=len(reference["grads"]) - len(errs))
        _fp32_errors(record, reference, grads)
    else:
        if not reference:
            reference.update({"out": tensor.detach().clone(), "provider": record["provider"]})
            return
        record["max_rel_err"] = max_rel_error(tensor, reference["out"])
    record["reference"] = reference["provider"]


def _rates(case: Case, record: Dict[str, Any], ceilings: Dict[str, float]) -> None:
    seconds = record["ms"] / 1e3
    if case.flops:
        record["tflops"] = case.flops / seconds / 1e12
        peak = ceilings.get("matmul_tflops")
        if peak and math.isfinite(peak):
            record["mfu"] = record["tflops"] / peak
    if case.bytes:
        record["gbps"] = case.bytes / seconds / 1e9
        peak = ceilings.get("copy_gbps")
        if peak and math.isfinite(peak):
            record["bw_frac"] = record["gbps"] / peak
    if case.tokens:
        record["tokens_per_s"] = case.tokens / seconds
    if case.items:
        record["items_per_s"] = case.items / seconds


def run_case(case: Case, names: Sequence[str], opts: Options, ceilings: Dict[str, float],
             emit: Callable[[Dict[str, Any]], None], reference: Optional[Dict[str, Any]] = None) -> None:
    """Every provider on `case`, one at a time; each becomes one record passed to `emit`. `reference` holds the
    first successful provider's outputs (filled here when empty), so a later call can compare against it."""
    reference = {} if reference is None else reference
    cache_root = tempfile.mkdtemp(prefix=f"bench-{case.name}-")
    context_lost: Optional[str] = None
    for name in providers.order_providers(names):
        provider = providers.PROVIDERS[name]
        base = {"workload": case.name, "provider": name, "describe": provider.describe}
        if provider.training_only and not case.training:
            emit({**base, "status": "skipped", "error": "training-only provider on an inference workload"})
            continue
        if context_lost:
            emit({**base, "status": "skipped", "error": f"CUDA context lost in {context_lost}"})
            continue
        # Half the estimate: a provider that overruns is killed by the parent at the deadline plus a grace.
        if opts.deadline is not None and not opts.tiny and \
                time.time() + 0.5 * provider.est_s * opts.est_scale > opts.deadline:
            emit({**base, "status": "skipped", "error": "time budget spent"})
            continue
        emit({**base, "status": "started"})
        t0 = time.perf_counter()  # wall_s: what the provider costs a budgeted run (compiles, timing, numerics)
        try:
            record = run_provider(case, provider, opts, reference, ceilings, cache_root)
            emit({**base, **record, "status": "ok", "wall_s": time.perf_counter() - t0})
        except Exception as exc:  # noqa: BLE001  (any provider failure is a result, not a crash)
            if os.environ.get("FLASHFX_BENCH_TRACEBACK"):
                traceback.print_exc()
            emit({**base, "status": "failed", "error": one_line(exc), "wall_s": time.perf_counter() - t0})
            if is_cuda_context_lost(exc):
                context_lost = name
        finally:
            with contextlib.suppress(Exception):
                case.model.zero_grad(set_to_none=True)
            free_memory(opts.device)
    (opts.progress or Progress(enabled=False)).done()


# ----------------------------------------------------------------------------------------- output

def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    return value


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(jsonable(record), sort_keys=True) + "\n")


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; `|` inside a cell is escaped so a failure message cannot break the table."""
    def cell(v: Any) -> str:
        return ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def fmt(value: Optional[float], digits: int = 1, unit: str = "") -> str:
    """A number for a table: None → '—'; large token rates as 51.4k."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "k":
        return f"{value / 1e3:.{digits}f}k"
    return f"{value:.{digits}f}{unit}"


def fmt_err(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if isinstance(value, str) or not math.isfinite(value):
        return "inf/nan"
    return "0" if value == 0 else f"{value:.1e}"


# ----------------------------------------------------------------------------------------- models and formulas

def build_hf(model_class: str, fields: Dict[str, Any], dtype: torch.dtype, device: torch.device,
             seed: int = 0, layers: Optional[int] = None) -> torch.nn.Module:
    """A transformers model from its config class with seeded random weights (no download), on `device`;
    `layers` overrides the number of layers."""
    import transformers
    cls = getattr(transformers, model_class)
    if layers:
        fields = {**fields, cls.config_class.attribute_map.get("num_hidden_layers", "num_hidden_layers"): layers}
    config = cls.config_class(**fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype)


def random_ids(vocab: int, shape: Tuple[int, ...], device: torch.device, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=gen).to(device)


def attention_fwd_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool) -> float:
    """QKᵀ and PV: 2 matmuls × 2·B·H·Sq·Skv·D; causal attention does half of the square."""
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    return flops / 2 if causal and q_len == kv_len else flops


def train_flops(linear_params: int, tokens: int, attention_fwd: float) -> float:
    """Forward 2·P·T for the matmuls + attention; backward 2× the matmuls, 2.5× attention (FlashAttention's
    convention: fwd+bwd = 3.5× fwd)."""
    return 3.0 * 2.0 * linear_params * tokens + 3.5 * attention_fwd
