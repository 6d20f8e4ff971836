"""The benchmark harness: timing, memory, the card's ceilings, providers, numerics, JSON lines and tables.

One workload = one `Case` (a model, its inputs and a step); one provider = one way a user would run it (eager,
SDPA, torch.compile, Liger-Kernel, flashfx with some passes). `run_case` runs every provider on the case in this
process, one at a time, freeing memory between them, and turns each into one JSON-lines record. A provider that
fails is recorded as ``failed: <one line>`` and the next one runs: a benchmark that dies on one provider is useless.

Times are medians of CUDA-event timings after warm-up, with the 20th and 80th percentiles. TFLOP/s and GB/s come
from explicit formulas in the workload files, against ceilings measured in the same run (`measure_ceilings`).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

EXIT_NO_CUDA = 2
NO_CUDA_MESSAGE = (
    "flashfx bench needs a CUDA GPU: the benchmarks time CUDA kernels with CUDA events and read "
    "torch.cuda.max_memory_allocated, and torch {torch} sees no CUDA device here. Run it on a machine with an "
    "NVIDIA GPU and a CUDA build of PyTorch. For a smoke test of the harness itself (no meaningful numbers), "
    "pass --device cpu --tiny."
)


class BenchError(Exception):
    """A user-facing error of the benchmark command (exit code 2, message printed as is)."""


def require_device(device: str) -> torch.device:
    """The device to benchmark on; a clear `BenchError` when CUDA is asked for and absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(NO_CUDA_MESSAGE.format(torch=torch.__version__))
    if dev.type not in ("cuda", "cpu"):
        raise BenchError(f"--device {device!r} is not supported; use 'cuda' (benchmarks) or 'cpu' (smoke test)")
    return dev


# ----------------------------------------------------------------------------------------- statistics

def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile of an empty list: time at least one repeat")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q={q!r} must be in [0, 1]")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> Dict[str, float]:
    """Median with the 20/80 quantiles: robust to the odd slow repeat, and the spread says how noisy it was."""
    return {"ms": quantile(samples_ms, 0.5), "ms_p20": quantile(samples_ms, 0.2),
            "ms_p80": quantile(samples_ms, 0.8), "repeats": len(samples_ms)}


# ----------------------------------------------------------------------------------------- timing / memory

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> List[float]:
    """Per-call times in ms: CUDA events on the GPU (no host sync inside the loop), perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        out = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def free_memory(device: torch.device) -> None:
    """Forget compiled graphs and cached blocks so the next provider starts from the same state."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak allocated bytes during one call (weights included), or None off CUDA. CUDA-graph replays (flashfx's
    inference graphs, torch.compile's reduce-overhead) run in private pools whose intermediates the allocator
    counts as free: their unallocated reserved bytes are added (`graph_pool_bytes`)."""
    if device.type != "cuda":
        fn()
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.max_memory_allocated(device) + graph_pool_bytes(torch.cuda.memory_snapshot(), index)


def graph_pool_bytes(segments: Sequence[Dict[str, Any]], device_index: int) -> int:
    """Reserved but unallocated bytes of the allocator's private pools (CUDA graphs) on one device, from
    `torch.cuda.memory_snapshot()`'s segments; the default pool is (0, 0)."""
    return sum(s["total_size"] - s.get("allocated_size", 0) for s in segments
               if s.get("device") == device_index and tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


def measure_ceilings(device: torch.device, quick: bool = False) -> Dict[str, float]:
    """The card's two ceilings, measured now: bf16 dense matmul TFLOP/s and device-copy GB/s (read + write)."""
    if device.type != "cuda":
        return {"matmul_tflops": float("nan"), "copy_gbps": float("nan")}
    n = 8192
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)  # random, never zeros
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    mm = summarize(time_ms(lambda: torch.mm(a, b, out=c), device, warmup=3, repeat=10 if quick else 30))
    del a, b, c
    elems = 1 << 29  # 1 GiB of bf16 each way: far larger than the 50 MB L2
    src = torch.randn(elems, device=device, dtype=torch.bfloat16, generator=gen)
    dst = torch.empty_like(src)
    cp = summarize(time_ms(lambda: dst.copy_(src), device, warmup=3, repeat=10 if quick else 30))
    del src, dst
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n ** 3 / (mm["ms"] / 1e3) / 1e12,
            "copy_gbps": 2 * elems * 2 / (cp["ms"] / 1e3) / 1e9,  # bytes read + bytes written, bf16
            "matmul_ms": mm["ms"], "copy_ms": cp["ms"]}


# ----------------------------------------------------------------------------------------- numerics

def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out − ref| / max|ref| in float32: relative to the reference's scale, so near-zero elements of a
    bf16 output do not turn rounding into huge ratios."""
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    o, r = out.detach().float(), ref.detach().float().to(out.device)
    if not torch.isfinite(o).all():
        return float("inf")
    scale = r.abs().max().item()
    return (o - r).abs().max().item() / (scale if scale > 0 else 1.0)


# ----------------------------------------------------------------------------------------- environment

def versions() -> Dict[str, Optional[str]]:
    def version_of(name: str) -> Optional[str]:
        try:
            module = __import__(name)
            return getattr(module, "__version__", None)
        except Exception:  # noqa: BLE001  (a missing optional package is just "absent")
            return None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": version_of("triton"),
            "transformers": version_of("transformers"), "liger_kernel": _liger_version(),
            "cuda": torch.version.cuda}


def _liger_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("liger-kernel")
    except Exception:  # noqa: BLE001
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def today() -> str:
    return datetime.date.today().isoformat()


def _chain(exc: BaseException) -> List[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return out


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line` of the most telling error in the chain, short enough for a table cell.

    Dynamo wraps a backend's error in BackendCompilerFailed, whose first line names only the backend object:
    the first exception under such wrappers is the one that says what went wrong (e.g. which flashfx pass)."""
    chain = _chain(exc)
    tell = next((e for e in chain if not type(e).__module__.startswith("torch._dynamo")), chain[-1])
    text = [t for t in str(tell).strip().splitlines() if t.strip()]
    first = re.sub(r"<([\w.]+?)(?: object)? at 0x[0-9a-f]+>", lambda m: f"<{m.group(1).rsplit('.', 1)[-1]}>",
                   text[0].strip() if text else "")
    msg = f"{type(tell).__name__}: {first}".rstrip(": ")
    if tell is not exc:
        msg = f"{type(exc).__name__} ← {msg}"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def is_cuda_context_lost(exc: BaseException) -> bool:
    """After an illegal address or a device-side assert the CUDA context is unusable for every later provider."""
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "device-side assert", "unspecified launch failure",
                                    "CUDA error: an illegal instruction", "misaligned address"))


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


# ----------------------------------------------------------------------------------------- providers

@dataclass(frozen=True)
class Provider:
    """A way to run the model. `attn` is the Hugging Face attention implementation; `wrap` turns the model into
    the callable that is timed (and may return a context manager that must stay open while it runs)."""

    name: str
    describe: str
    attn: str = "sdpa"
    compiles: bool = False
    wrap: Optional[Callable[[torch.nn.Module, Case, Options], Any]] = None
    context: Optional[Callable[[], Any]] = None
    training_only: bool = False
    est_s: float = 10.0                    # rough wall time on the full-size case, to skip what cannot fit


def _compile(mode: Optional[str] = None) -> Callable[..., Any]:
    def wrap(model: torch.nn.Module, case: Case, opts: Options) -> Any:
        return torch.compile(model, mode=mode) if mode else torch.compile(model)
    return wrap


def _budget(fraction: float) -> Callable[[], Any]:
    def context() -> Any:
        import torch._functorch.config as functorch_config
        return functorch_config.patch(activation_memory_budget=fraction)
    return context


def _liger(model: torch.nn.Module, case: Case, opts: Options) -> Any:
    try:
        import liger_kernel.transformers as liger
    except ImportError as e:
        raise RuntimeError("liger-kernel is not installed (pip install liger-kernel)") from e
    patch = getattr(liger, f"apply_liger_kernel_to_{case.family}", None)
    if patch is None:
        raise RuntimeError(f"liger-kernel {_liger_version()} has no patch for {case.family}")
    # Patches the classes and this instance for good: run_case runs Liger last for that reason.
    patch(model=model)
    return model


class LossOnly(torch.nn.Module):
    """`model(**batch).loss` as a module: the logits are dead in the captured graph, so the fused linear +
    cross-entropy may drop them (Hugging Face causal LMs return them next to the loss, and the pass must then
    decline). This is how flashfx's docs say to compile a training step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Any) -> torch.Tensor:
        return self.model(**batch).loss


def _flashfx(loss_only: bool = False, **config: Any) -> Callable[..., Any]:
    def wrap(model: torch.nn.Module, case: Case, opts: Options) -> Any:
        import flashfx
        # A fresh kernel cache per provider, so "cold" compile time really compiles.
        cache = os.environ.get("FLASHFX_BENCH_CACHE") or tempfile.mkdtemp(prefix="flashfx-bench-")
        return flashfx.optimize(LossOnly(model) if loss_only else model, cache_dir=cache, **config)
    return wrap


_ONLY = dict(attention="off", fusion=False, cross_entropy=False)
PROVIDERS: Dict[str, Provider] = {p.name: p for p in [
    Provider("eager", "Hugging Face attn_implementation='eager' (math attention)", attn="eager", est_s=10),
    Provider("sdpa", "attn_implementation='sdpa'", est_s=8),
    Provider("compile", "SDPA + torch.compile (default mode)", compiles=True, wrap=_compile(), est_s=45),
    Provider("compile-max-autotune", "SDPA + torch.compile(mode='max-autotune')", compiles=True,
             wrap=_compile("max-autotune"), est_s=400),
    Provider("compile-reduce-overhead", "SDPA + torch.compile(mode='reduce-overhead'): with CUDA graphs",
             compiles=True, wrap=_compile("reduce-overhead"), est_s=60),
    Provider("compile-amb0.5", "SDPA + torch.compile, activation_memory_budget=0.5", compiles=True,
             wrap=_compile(), context=_budget(0.5), training_only=True, est_s=45),
    Provider("liger", "Liger-Kernel apply_liger_kernel_to_* (SDPA)", wrap=_liger, est_s=15),
    Provider("flashfx", "flashfx.optimize(model): all default passes", compiles=True, wrap=_flashfx(), est_s=85),
    Provider("flashfx-nographs", "flashfx, all default passes, inference graphs launched op by op "
             "(cuda_graphs=False)", compiles=True, wrap=_flashfx(cuda_graphs=False), est_s=85),
    Provider("flashfx-loss", "flashfx, all default passes, on `model(**batch).loss` (logits not returned)",
             compiles=True, wrap=_flashfx(loss_only=True), training_only=True, est_s=85),
    Provider("flashfx-attention", "flashfx, attention pass only", compiles=True,
             wrap=_flashfx(**{**_ONLY, "attention": "exact"}), est_s=75),
    Provider("flashfx-fusion", "flashfx, fusion pass only", compiles=True,
             wrap=_flashfx(**{**_ONLY, "fusion": True}), est_s=80),
    Provider("flashfx-ce", "flashfx, fused linear + cross-entropy only, on `model(**batch).loss`", compiles=True,
             wrap=_flashfx(loss_only=True, **{**_ONLY, "cross_entropy": True}), training_only=True, est_s=75),
    Provider("flashfx-remat0.5", "flashfx, all passes + remat=0.5, on `model(**batch).loss`", compiles=True,
             wrap=_flashfx(loss_only=True, remat=0.5), training_only=True, est_s=85),
    Provider("flashfx-remat-speed", "flashfx, all passes + remat='speed' (no budget), on `model(**batch).loss`",
             compiles=True, wrap=_flashfx(loss_only=True, remat="speed"), training_only=True, est_s=85),
    Provider("flashfx-none", "flashfx with every pass off (capture + AOTAutograd overhead alone)", compiles=True,
             wrap=_flashfx(**_ONLY), est_s=60),
]}
# Liger patches model classes in place, so it runs after every other provider of a process.
RUN_LAST = ("liger",)


def parse_providers(text: Optional[str], default: Sequence[str]) -> List[str]:
    """`--providers a,b,c` → names, checked against `PROVIDERS`, in the order given."""
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise BenchError(f"unknown provider(s) {', '.join(map(repr, unknown))}; known: {', '.join(PROVIDERS)}")
    return names


def order_providers(names: Iterable[str]) -> List[str]:
    names = list(dict.fromkeys(names))
    return [n for n in names if n not in RUN_LAST] + [n for n in names if n in RUN_LAST]


def set_attention(model: torch.nn.Module, attn: str) -> None:
    """Switch a Hugging Face model's attention implementation; a plain module has no such choice."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    elif hasattr(getattr(model, "config", None), "_attn_implementation"):
        model.config._attn_implementation = attn


@contextlib.contextmanager
def fresh_compile_caches(root: str, tag: str) -> Iterator[str]:
    """Empty Inductor / Triton / flashfx on-disk caches for one provider; kept for its warm re-compile."""
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHFX_BENCH_CACHE")}
    os.environ.update({"TORCHINDUCTOR_CACHE_DIR": os.path.join(path, "inductor"),
                       "TRITON_CACHE_DIR": os.path.join(path, "triton"),
                       "FLASHFX_BENCH_CACHE": os.path.join(path, "flashfx")})
    _clear_inductor_memory_caches()
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_inductor_memory_caches()


def _clear_inductor_memory_caches() -> None:
    try:
        from torch._inductor.utils import clear_caches
        clear_caches()
    except Exception:  # noqa: BLE001  (older/newer torch: the on-disk dir change is what matters)
        pass
    try:
        # Compile workers keep the Triton cache dir they were started with: restart them with the new one.
        from torch._inductor.async_compile import shutdown_compile_workers
        shutdown_compile_workers()
    except Exception:  # noqa: BLE001
        pass


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


def run_provider(case: Case, provider: Provider, opts: Options, reference: Dict[str, Any],
                 ceilings: Dict[str, float], cache_root: str) -> Dict[str, Any]:
    """Measure one provider on `case`; raises on failure (run_case records it)."""
    progress = opts.progress or Progress(enabled=False)
    device = opts.device
    record: Dict[str, Any] = {"provider": provider.name, "describe": provider.describe}
    set_attention(case.model, provider.attn)
    case.model.train(case.training)
    context = provider.context() if provider.context else contextlib.nullcontext()
    with fresh_compile_caches(cache_root, provider.name), context:
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
            return
        ref_loss = reference["loss"]
        record["loss_rel_err"] = abs(record["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
        errs = {n: max_rel_error(grads[n], g) for n, g in reference["grads"].items() if n in grads}
        if errs:
            worst = max(errs, key=errs.get)
            record.update(grad_rel_err=errs[worst], grad_worst=worst, grads_compared=len(errs),
                          grads_missing=len(reference["grads"]) - len(errs))
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


def run_case(case: Case, providers: Sequence[str], opts: Options, ceilings: Dict[str, float],
             emit: Callable[[Dict[str, Any]], None], reference: Optional[Dict[str, Any]] = None) -> None:
    """Every provider on `case`, one at a time; each becomes one record passed to `emit`. `reference` holds the
    first successful provider's outputs (filled here when empty), so a later call can compare against it."""
    reference = {} if reference is None else reference
    cache_root = tempfile.mkdtemp(prefix=f"bench-{case.name}-")
    context_lost: Optional[str] = None
    for name in order_providers(providers):
        provider = PROVIDERS[name]
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
        try:
            record = run_provider(case, provider, opts, reference, ceilings, cache_root)
            emit({**base, **record, "status": "ok"})
        except Exception as exc:  # noqa: BLE001  (any provider failure is a result, not a crash)
            if os.environ.get("FLASHFX_BENCH_TRACEBACK"):
                traceback.print_exc()
            emit({**base, "status": "failed", "error": one_line(exc)})
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
             seed: int = 0) -> torch.nn.Module:
    """A transformers model from its config class with seeded random weights (no download), on `device`."""
    import transformers
    cls = getattr(transformers, model_class)
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
