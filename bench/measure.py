"""Measurement for the benchmarks: CUDA-event timings and their quantiles, peak memory, the card's measured ceilings,
errors against a reference, versions and device names, and one-line errors for the records.

Times are medians of CUDA-event timings after warm-up, with the 20th and 80th percentiles; `measure_ceilings`
measures the bf16 matmul and copy-bandwidth ceilings that TFLOP/s and GB/s are compared with, in the same run.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import platform
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

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

@contextlib.contextmanager
def environment_restored(names: Sequence[str]) -> Iterator[None]:
    """Put the environment variables `names` back as they were (set or unset) when the block ends."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fast_launch(on: bool) -> Iterator[None]:
    """FLASHFX_FAST_LAUNCH=1 (bound launches) or 0 (Triton's own) inside the block; read by flashfx at each launch,
    so one process can time both on the same compiled kernels."""
    with environment_restored(("FLASHFX_FAST_LAUNCH",)):
        os.environ["FLASHFX_FAST_LAUNCH"] = "1" if on else "0"
        yield


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
            "transformers": version_of("transformers"), "liger_kernel": liger_version(),
            "cuda": torch.version.cuda}


def liger_version() -> Optional[str]:
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
