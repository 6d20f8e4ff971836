"""Training graphs replayed as CUDA graphs (opt in: ``flashfx.optimize(model, cuda_graphs="training")``).

A training step of a small or medium model launches hundreds of kernels whose host cost exceeds their GPU time
(measured on the H100 machine: HF GPT-2-small, 8 x 1024 bf16, 63 ms of host time per step for 20 ms of kernels,
docs/benchmarks.md). Here the forward and the backward graph that AOTAutograd compiled are each recorded once per
input signature and replayed, so a step costs two graph launches plus a few copies.

How a step runs, per forward signature (the first call runs op by op, compiling and tuning every kernel; the
second captures; later calls replay):
- forward: inputs found at the same address in the first two calls (weights) are read in place, the others are
  copied into buffers. What the forward returns to the caller (the loss, mutated buffers) is copied out of the
  graph's memory pool; the activations it saves for the backward are handed out as aliases of the pool, not copied.
- backward: captured in the forward's pool at its first call after a replay; the saved activations are read where
  the forward left them, the incoming gradients are copied in, the parameter gradients are copied out.

Why this never gives a wrong answer: a forward replay overwrites the activations of the previous replay, so it
only happens once nothing but the runner holds their storage (its backward ran and autograd released them, or
the graph was dropped; checked by the storage's use count). Otherwise the forward runs op by op, with its own
memory, and so does its backward (recognised by its inputs: not at the latest replay's addresses). Several
forwards before their backwards (gradient accumulation written that way), or a forward whose backward never runs
while its graph is kept, therefore work, at op-by-op speed. Graphs with random numbers, in-place writes or
tensors off the GPU are never captured (the report says why), as for inference.

The memory cost: the pool keeps the forward's and backward's intermediates reserved between steps (the caching
allocator would keep most of them too), plus one extra copy of the parameter gradients.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from flashfx.cuda_graphs import (MAX_CAPTURES, MAX_SIGNATURES, Captured, addresses, copied, found_in_place,
                                 remember, signature)


class TrainingGraphs:
    """The forward and backward runners of one compiled training graph, and what they share."""

    def __init__(self, forward: Callable[[List[Any]], Any], saved: slice) -> None:
        self.forward_fn = forward
        self.backward_fn: Optional[Callable[[List[Any]], Any]] = None  # compiled at the first backward
        self.backward_off: Optional[str] = None  # why the backward runs op by op (the forward may still replay)
        self.saved = saved  # which forward outputs are activations saved for the backward
        self.seen: Dict[Tuple, List[int]] = {}
        self.pairs: Dict[Tuple, "_Pair"] = {}
        # the pool tensors the latest forward replay handed out as saved activations, with the storage use count
        # they had before (our own references): a higher count means someone still holds them
        self.handed_out: List[Tuple[torch.Tensor, int]] = []
        self.latest: Optional[_Pair] = None
        self.replays = self.op_by_op_calls = self.captures = 0
        self.disabled: Optional[str] = None

    def status(self) -> str:
        if self.disabled:
            return f"cuda graphs (training) off: {self.disabled}"
        backward = f"; backward op by op: {self.backward_off}" if self.backward_off else ""
        return (f"cuda graphs (training): {len(self.pairs)} captured, {self.replays} replays, "
                f"{self.op_by_op_calls} calls op by op{backward}")

    def released(self) -> bool:
        """Whether every activation the latest replay handed out is gone (a new replay may overwrite them). The
        storage's use count, not the tensor's: AOTAutograd saves its own aliases of what the forward returns."""
        return all(_uses(t) <= baseline for t, baseline in self.handed_out)

    # ----------------------------------------------------------------------------------------------- forward
    def run_forward(self, args: List[Any]) -> Any:
        key = signature(args)
        pair = self.pairs.get(key)
        if pair is not None:
            if pair.forward.ready(args):
                pair.misses = 0
                if self.released():
                    return self._replay_forward(pair, args)
            else:
                pair.misses += 1
                if pair.misses >= 2 and (pair is not self.latest or self.released()):
                    # weights moved for good (`p.data = ...`, say): drop the pair (only the latest replay's
                    # activations can still be held), and capture anew from the addresses of this call
                    del self.pairs[key]
                    if pair is self.latest:
                        self.latest, self.handed_out = None, []
                    self.seen[key] = addresses(args)
                    self.op_by_op_calls += 1
                    return self.forward_fn(args)
        if pair is None and self.disabled is None and key in self.seen and self.released() \
                and len(self.pairs) < MAX_SIGNATURES and self.captures < MAX_CAPTURES:
            pair = self._capture_forward(key, args)
            if pair is not None:
                return self._replay_forward(pair, args)
        remember(self.seen, key, args)
        self.op_by_op_calls += 1
        return self.forward_fn(args)

    def _capture_forward(self, key: Tuple, args: List[Any]) -> Optional["_Pair"]:
        in_place = found_in_place(args, self.seen[key])
        weights = {a.untyped_storage().data_ptr() for a, keep in zip(args, in_place) if keep}
        try:
            captured = Captured(self.forward_fn, args, in_place)
        except Exception as exc:  # noqa: BLE001  (run op by op from now on, and say why)
            self.disabled = f"forward capture failed: {type(exc).__name__}: {_first_line(exc)}"
            return None
        self.captures += 1
        pair = self.pairs[key] = _Pair(captured, weights)
        return pair

    def _replay_forward(self, pair: "_Pair", args: List[Any]) -> Any:
        outputs = pair.forward.replay(args)
        self.replays += 1
        handed, tracked = [], []
        for i, out in enumerate(outputs):
            if not isinstance(out, torch.Tensor):
                handed.append(out)
            elif _in(i, self.saved):
                if out.untyped_storage().data_ptr() not in pair.weights:  # (a weight saved as it is: the caller's)
                    tracked.append((out, _uses(out)))
                handed.append(out.detach())  # an alias of the pool memory
            else:
                handed.append(out.clone())  # the caller may keep it past the next replay
        self.handed_out = tracked
        self.latest = pair
        return type(outputs)(handed)

    # ---------------------------------------------------------------------------------------------- backward
    def run_backward(self, args: List[Any]) -> Any:
        pair = self.latest
        pool = {t.data_ptr() for t, _ in self.handed_out}
        saved = {t.data_ptr() for t in pair.forward.outputs[self.saved] if isinstance(t, torch.Tensor)} \
            if pair is not None else set()
        reads = [isinstance(a, torch.Tensor) and a.data_ptr() in saved for a in args]
        found = {a.data_ptr() for a, r in zip(args, reads) if r}
        if pair is None or self.disabled is not None or self.backward_off is not None or not pool <= found:
            self.op_by_op_calls += 1  # the activations of an op-by-op forward: no graph reads them
            return self.backward_fn(args)
        key = signature(args)
        if pair.backward is None and pair.backward_key is None:
            pair.backward_key = key
            try:
                pair.backward = Captured(self.backward_fn, args, reads, pool=pair.forward.graph.pool())
                self.captures += 1
            except Exception as exc:  # noqa: BLE001
                self.disabled = f"backward capture failed: {type(exc).__name__}: {_first_line(exc)}"
                return self.backward_fn(args)
        if pair.backward is None or pair.backward_key != key or not pair.backward.ready(args):
            self.op_by_op_calls += 1
            return self.backward_fn(args)
        self.replays += 1
        return copied(pair.backward.replay(args))  # gradients: the caller keeps them past the next replay


class _Pair:
    """One forward signature's captured forward, and its backward once captured."""

    def __init__(self, forward: Captured, weights: set) -> None:
        self.forward = forward
        self.weights = weights  # storages of the inputs read in place
        self.misses = 0  # calls in a row whose in-place inputs had moved
        self.backward: Optional[Captured] = None
        self.backward_key: Optional[Tuple] = None


class Runner:
    """A boxed callable for AOTAutograd: one side (forward or backward) of a `TrainingGraphs`."""

    _boxed_call = True

    def __init__(self, graphs: TrainingGraphs, side: str) -> None:
        self.graphs, self.side = graphs, side

    def status(self) -> str:
        return self.graphs.status()

    def __call__(self, args: List[Any]) -> Any:
        if self.side == "forward":
            return self.graphs.run_forward(args)
        return self.graphs.run_backward(args)


def saved_slice() -> Optional[slice]:
    """Which outputs of the forward being compiled are saved for the backward (AOTAutograd's metadata), or None
    when the compile is not inside AOTAutograd's tracing context."""
    context = torch._guards.TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None) if context is not None else None
    found = getattr(meta, "tensors_saved_for_backwards_slice", None)
    return found if isinstance(found, slice) else None


def _uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _in(i: int, s: slice) -> bool:
    return i in range(*s.indices(1 << 30))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""
