"""Block sizes and warps per generated kernel, chosen per shape bucket by timing a few configs (CUDA), or the one
small config the CPU interpreter runs quickly. Choices persist in the kernel cache, so a second process does not
time again."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

import triton

# The largest reduced extent (rounded up to a power of two) kept whole in registers; above it, loop over chunks.
PERSISTENT_MAX_RBLOCK = 8192


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Kernels over fewer elements than this use their first config (timing them would only cost compile time).
TUNE_MIN_ELEMENTS = 1 << 20

# Up to this extent a whole-row kernel is still timed against the looped one when autotuning on a GPU.
PERSISTENT_TRY_RBLOCK = 32768

# Programs per SM of a kernel with column sums (a norm backward's weight gradients), the default first: more
# programs keep more rows in flight, at the price of a larger partials buffer to sum at the end. On the H200
# (16384 x 4096 RMSNorm fwd+bwd, 2026-12-03, kernel and sum timed together) 2 per SM beat 4 by 8%; 8 never won.
COLUMN_PROGRAMS_PER_SM = (2, 4)

# Whether such a kernel loads its next row block before working on the current one (registers for two blocks of
# inputs, the loads in flight during the reductions); the default first, the other timed when tuning.
COLUMN_PREFETCH = (False, True)

# Software-pipelining stages of a persistent kernel's loop over row blocks (0: no pipelining; without column sums,
# one row block per program), the default first, the others timed when tuning. A 4096 x 32000 bf16 softmax, one
# row per program, streamed at 75% of copy on the H200; a hand-written row loop with 3 stages at 89%, the generated
# one at 87% (2026-12-03).
ROW_STAGES = (0, 3)

# Programs per SM of a persistent kernel without column sums that loops over its row blocks.
ROW_LOOP_PROGRAMS_PER_SM = 2


def choose_mode(is_reduction: bool, rnumel: int) -> str:
    if not is_reduction:
        return "pointwise"
    return "persistent" if next_pow2(rnumel) <= PERSISTENT_MAX_RBLOCK else "looped"


def modes(is_reduction: bool, rnumel: int, tune: bool) -> List[str]:
    """Kernel shapes to consider, the default first."""
    first = choose_mode(is_reduction, rnumel)
    if tune and first == "looped" and next_pow2(rnumel) <= PERSISTENT_TRY_RBLOCK:
        return ["looped", "persistent"]
    return [first]


def bucket(is_reduction: bool, xnumel: int, rnumel: int) -> str:
    """Shapes that share a config: the same powers of two."""
    return f"{'reduction' if is_reduction else 'pointwise'}:x{next_pow2(xnumel)}:r{next_pow2(rnumel)}"


def candidates(mode: str, xnumel: int, rnumel: int, interpreting: bool) -> List[Dict[str, int]]:
    """Configs to time, best guess first (the first is used when autotuning is off)."""
    if mode == "pointwise":
        if interpreting:
            return [{"XBLOCK": min(1024, next_pow2(xnumel)), "num_warps": 4}]
        configs = [{"XBLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 8), (4096, 8), (2048, 4), (512, 4))]
        keep = [c for c in configs if c["XBLOCK"] <= max(512, next_pow2(xnumel))][:4]
        return keep or configs[:1]
    if mode == "persistent":
        R = next_pow2(rnumel)
        if interpreting:
            return [{"XBLOCK": min(8, next_pow2(xnumel)), "RBLOCK": R, "num_warps": 4}]
        configs = [{"XBLOCK": x, "RBLOCK": R, "num_warps": w} for x in (1, 2, 4, 8, 16) for w in (4, 8, 16)]
        keep = [c for c in configs if 512 <= c["XBLOCK"] * R <= 8192
                and 8 <= c["XBLOCK"] * R // (32 * c["num_warps"]) <= 32 and c["XBLOCK"] <= next_pow2(xnumel)]
        # rows longer than 8192: one row per program, as many warps as registers need
        return keep or [{"XBLOCK": 1, "RBLOCK": R, "num_warps": w} for w in (16, 32)]
    if interpreting:
        return [{"XBLOCK": min(8, next_pow2(xnumel)), "RBLOCK": 64, "num_warps": 4}]
    # one long row per program, its chunks from 2048 to 8192 elements; 16 warps streamed a 32000-wide softmax 25%
    # faster than 8 on the H200 (2026-12-03), 8 warps a 128256-wide one 10% faster than 16
    configs = [{"XBLOCK": x, "RBLOCK": r, "num_warps": w}
               for x, r, w in ((1, 2048, 4), (1, 2048, 8), (1, 4096, 8), (1, 4096, 16), (1, 8192, 16), (4, 1024, 4))]
    keep = [c for c in configs if c["XBLOCK"] <= next_pow2(xnumel) and c["RBLOCK"] <= next_pow2(rnumel)]
    return keep or configs[:1]


def compile_threads() -> int:
    """Threads that compile one kernel's candidate configs at once (FLASHFX_COMPILE_THREADS, default 8; 1 = one
    after another). Triton's compile waits on ptxas, a subprocess, for much of its time."""
    raw = os.environ.get("FLASHFX_COMPILE_THREADS", "8")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"FLASHFX_COMPILE_THREADS={raw!r}: use a whole number >= 1") from None
    if value < 1:
        raise ValueError(f"FLASHFX_COMPILE_THREADS={raw!r}: use a whole number >= 1")
    return value


def precompile(configs: List[Dict[str, Any]], compile_one: Callable[[Dict[str, Any]], Any],
               binary: Optional[Callable[[Dict[str, Any]], Any]] = None) -> None:
    """Compile every config before the timing loop, `compile_threads()` at a time; configs with the same
    `binary(config)` compile once (Triton does not merge concurrent compiles of one binary). A config that fails
    here is left to the timing loop, which compiles it again and skips it if it fails there too."""
    if binary is not None:
        configs = list({repr(binary(c)): c for c in configs}.values())
    threads = min(len(configs), compile_threads())
    if threads < 2:
        return

    def quietly(config: Dict[str, Any]) -> None:
        try:
            compile_one(config)
        except Exception:  # noqa: BLE001  (reported, if it matters, by the serial compile that follows)
            pass
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(quietly, configs))


def pick(configs: List[Dict[str, Any]], run: Callable[[Dict[str, Any]], Any], tune: bool,
         compile_one: Optional[Callable[[Dict[str, Any]], Any]] = None,
         binary: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Dict[str, Any]:
    """Time `run(config)` for each config (median ms) and return the fastest; the first if not tuning.
    `compile_one(config)` (compile without launching) lets the configs compile concurrently first, once per
    `binary(config)` where configs differ only in how they launch."""
    if not tune or len(configs) == 1:
        return configs[0]
    if compile_one is not None:
        precompile(configs, compile_one, binary)
    best, best_ms = configs[0], float("inf")
    for c in configs:
        try:
            ms = triton.testing.do_bench(lambda: run(c), warmup=10, rep=25, return_mode="median")
        except Exception:  # a config that does not compile (too many registers) is skipped, not fatal
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    return best
