"""The providers: each way a user would run a workload (eager, SDPA, torch.compile in its modes, Liger-Kernel,
flashfx with some passes), how each wraps the model, and the on-disk caches each compiles into."""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

try:
    from bench.measure import BenchError, environment_restored, liger_version
except ImportError:  # run from inside bench/
    from measure import BenchError, environment_restored, liger_version  # type: ignore[no-redef]

if TYPE_CHECKING:
    from bench.common import Case, Options


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
    est_s: float = 10.0                    # rough wall time on the Llama step (H200 wall_s), to skip what cannot fit


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
        raise RuntimeError(f"liger-kernel {liger_version()} has no patch for {case.family}")
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
        out = self.model(**batch)
        return out if isinstance(out, torch.Tensor) else out.loss  # flashfx.zoo models return the loss itself


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
             wrap=_compile("max-autotune"), est_s=300),
    Provider("compile-reduce-overhead", "SDPA + torch.compile(mode='reduce-overhead'): with CUDA graphs",
             compiles=True, wrap=_compile("reduce-overhead"), est_s=70),
    Provider("compile-amb0.5", "SDPA + torch.compile, activation_memory_budget=0.5", compiles=True,
             wrap=_compile(), context=_budget(0.5), training_only=True, est_s=45),
    Provider("liger", "Liger-Kernel apply_liger_kernel_to_* (SDPA)", wrap=_liger, est_s=15),
    Provider("flashfx", "flashfx.optimize(model): all default passes", compiles=True, wrap=_flashfx(), est_s=85),
    Provider("flashfx-nographs", "flashfx, all default passes, inference graphs launched op by op "
             "(cuda_graphs=False)", compiles=True, wrap=_flashfx(cuda_graphs=False), est_s=85),
    Provider("flashfx-loss", "flashfx, all default passes, on `model(**batch).loss` (logits not returned)",
             compiles=True, wrap=_flashfx(loss_only=True), training_only=True, est_s=85),
    Provider("flashfx-graphs", "flashfx, all default passes + cuda_graphs='training', on `model(**batch).loss`",
             compiles=True, wrap=_flashfx(loss_only=True, cuda_graphs="training"), training_only=True, est_s=110),
    Provider("flashfx-attention", "flashfx, attention pass only", compiles=True,
             wrap=_flashfx(**{**_ONLY, "attention": "exact"}), est_s=85),
    Provider("flashfx-fusion", "flashfx, fusion pass only", compiles=True,
             wrap=_flashfx(**{**_ONLY, "fusion": True}), est_s=80),
    Provider("flashfx-ce", "flashfx, fused linear + cross-entropy only, on `model(**batch).loss`", compiles=True,
             wrap=_flashfx(loss_only=True, **{**_ONLY, "cross_entropy": True}), training_only=True, est_s=75),
    Provider("flashfx-remat0.5", "flashfx, all passes + remat=0.5, on `model(**batch).loss`", compiles=True,
             wrap=_flashfx(loss_only=True, remat=0.5), training_only=True, est_s=95),
    Provider("flashfx-remat-speed", "flashfx, all passes + remat='speed' (no budget), on `model(**batch).loss`",
             compiles=True, wrap=_flashfx(loss_only=True, remat="speed"), training_only=True, est_s=85),
    Provider("flashfx-none", "flashfx with every pass off (capture + AOTAutograd overhead alone)", compiles=True,
             wrap=_flashfx(**_ONLY), est_s=60),
]}
# Liger patches model classes in place, so it runs after every other provider of a process.
RUN_LAST = ("liger",)
# flashfx with one pass (or none): they show what each pass gives, not flashfx as a user runs it.
SINGLE_PASS = ("flashfx-attention", "flashfx-fusion", "flashfx-ce", "flashfx-none")


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
    try:
        with environment_restored(("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHFX_BENCH_CACHE")):
            os.environ.update({"TORCHINDUCTOR_CACHE_DIR": os.path.join(path, "inductor"),
                               "TRITON_CACHE_DIR": os.path.join(path, "triton"),
                               "FLASHFX_BENCH_CACHE": os.path.join(path, "flashfx")})
            _clear_inductor_memory_caches()
            yield path
    finally:
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
