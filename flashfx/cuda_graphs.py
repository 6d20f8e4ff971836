"""Inference graphs replayed as CUDA graphs: a call costs one graph launch instead of a host trip per kernel.

A compiled inference graph launches ~100–300 kernels per call; on small and medium workloads (BERT-base, ViT-B,
a decode step) the host takes longer to launch them than the GPU takes to run them (measured on the H100: HF
BERT-base 32 × 512 fp16, 7.5 ms of kernels in a 14.5 ms call). `CudaGraphRunner` records the graph once per input
signature (shapes, strides, dtypes, scalar values) and replays it.

Per signature: the first call runs the graph as it is (kernels compile and autotune outside any capture); the second
captures it. A tensor input found at the same address in both calls (weights, buffers) is read in place, and each
replay checks it is still there (else that call runs op by op, and two such calls in a row capture the signature
anew, as when weights are replaced); any other tensor input is copied into a buffer the graph reads. Outputs are
copied out of the graph's private memory pool, so a later replay never overwrites a tensor the caller holds. A
signature seen only once is never captured: growing shapes (a KV cache concatenated each step) stay op by op
rather than capturing a graph per length.

`decline_reason` keeps a graph op by op where a replay could give another answer than running it: an input written
in place, an output that is (a view of) an input, outputs sharing memory, random numbers, tensors off the GPU
(host values computed at capture would be frozen). A capture that fails (a host sync inside, say) turns the runner
off with the reason; the call still runs op by op. Training graphs: flashfx/cuda_graphs_training.py (opt in).
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from flashfx.rewriter.aliasing import storage_owner

MAX_SIGNATURES = 8  # captured graphs per compiled graph (each holds a memory pool); beyond it, run op by op
MAX_CAPTURES = 4 * MAX_SIGNATURES  # captures in all, re-captures included: inputs that keep moving stop capturing
RANDOM = re.compile(r"rand|bernoulli|dropout|normal|uniform|multinomial|poisson|exponential|geometric|cauchy")


def decline_reason(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Optional[str]:
    """Why this inference graph must run op by op, or None when replaying it as a CUDA graph is safe."""
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"inputs are on {sorted(str(d) for d in devices) or 'no device'}, not on one CUDA device"
    return graph_hazard(gm, next(iter(devices)))


def graph_hazard(gm: fx.GraphModule, device: torch.device, outputs_may_alias: bool = False) -> Optional[str]:
    """What in the graph a replay would change (see the module docstring), for a graph whose inputs are on `device`;
    None when there is nothing. `outputs_may_alias`: outputs that are (views of) inputs or of each other are the
    caller's concern (training graphs: see cuda_graphs_training)."""
    placeholders = set(gm.graph.find_nodes(op="placeholder"))
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if RANDOM.search(name) or _dropout_arg(node):
            return f"{node.name} draws random numbers (a replay would repeat them)"
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return f"{node.name} ({name}) writes into a tensor in place"
        value = node.meta.get("val")
        # (a multi-output op's unused host output is harmless, and so is a host value that never changes)
        if isinstance(value, torch.Tensor) and value.device != device and node.users and not _constant_seed(node):
            return f"{node.name} makes a tensor on {value.device} that is used (computed once at capture, then frozen)"
    if outputs_may_alias:
        return None
    bases = []
    for out in _flat_outputs(gm):
        base = storage_owner(out)
        if base in placeholders:
            return f"output {out.name} is (a view of) the input {base.name}"
        if base in bases:
            return f"outputs share the memory of {base.name}"
        bases.append(base)
    return None


class CudaGraphRunner:
    """A boxed callable (AOTAutograd's calling convention: one list of inputs) that replays `fn` as CUDA graphs."""

    _boxed_call = True

    def __init__(self, fn: Callable[[List[Any]], Any]) -> None:
        self.fn = fn
        self.seen: Dict[Tuple, List[int]] = {}  # signature -> input addresses at its first call
        self.graphs: Dict[Tuple, "Captured"] = {}
        self.replays = 0
        self.op_by_op_calls = 0
        self.captures = 0
        self.disabled: Optional[str] = None  # why this runner stopped capturing

    def status(self) -> str:
        if self.disabled:
            return f"cuda graphs off: {self.disabled}"
        return (f"cuda graphs: {len(self.graphs)} captured, {self.replays} replays, "
                f"{self.op_by_op_calls} calls op by op")

    def __call__(self, args: List[Any]) -> Any:
        key = signature(args)
        captured = self.graphs.get(key)
        if captured is not None:
            if captured.ready(args):
                captured.misses = 0
                self.replays += 1
                return copied(captured.replay(args))
            captured.misses += 1
            if captured.misses >= 2 and self.captures < MAX_CAPTURES:
                # weights replaced, say: forget the graph; the next call captures anew, telling the inputs that
                # stay put from those that move by comparing with this call's addresses
                del self.graphs[key]
                self.seen[key] = addresses(args)
            self.op_by_op_calls += 1
            return self.fn(args)
        if self.disabled is None and key in self.seen and len(self.graphs) < MAX_SIGNATURES \
                and self.captures < MAX_CAPTURES:
            captured = self._capture(key, args)
            if captured is not None:
                self.replays += 1
                return copied(captured.replay(args))
        remember(self.seen, key, args)
        self.op_by_op_calls += 1
        return self.fn(args)

    def _capture(self, key: Tuple, args: List[Any]) -> Optional["Captured"]:
        in_place = found_in_place(args, self.seen[key])
        try:
            captured = Captured(self.fn, args, in_place)
        except Exception as exc:  # noqa: BLE001  (any capture failure: run op by op from now on, say why)
            self.disabled = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return None
        self.graphs[key] = captured
        self.captures += 1
        return captured


class Captured:
    """One signature's CUDA graph: its input buffers, the addresses it reads in place, its outputs in its pool
    (a new pool, or `pool`: graphs sharing one must replay in the order they were captured)."""

    def __init__(self, fn: Callable[[List[Any]], Any], args: Sequence[Any], in_place: Sequence[bool],
                 pool: Any = None) -> None:
        self.misses = 0  # calls in a row whose in-place inputs had moved
        self.in_place = [(i, a.data_ptr()) for i, (a, keep) in enumerate(zip(args, in_place)) if keep]
        # same strides as the caller's tensors: the kernels were compiled and tuned for them at the first call
        self.buffers = {i: torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
                        for i, (a, keep) in enumerate(zip(args, in_place)) if isinstance(a, torch.Tensor) and not keep}
        graph_args = [self.buffers.get(i, a) for i, a in enumerate(args)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # one run on the side stream first, as torch.cuda.graphs advises
            fn(list(graph_args))
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(list(graph_args))

    def ready(self, args: Sequence[Any]) -> bool:
        """Whether every input read in place is still where the graph reads it."""
        return all(args[i].data_ptr() == ptr for i, ptr in self.in_place)

    def replay(self, args: List[Any]) -> Any:
        """The graph's own outputs, overwritten by this replay (the next one overwrites them again)."""
        for i, buf in self.buffers.items():
            buf.copy_(args[i])
        args.clear()
        self.graph.replay()
        return self.outputs


# --------------------------------------------------------------------------------------------------- helpers

def copied(outputs: Any) -> Any:
    """Outputs the caller owns: copies out of the pool, which the next replay overwrites."""
    return type(outputs)(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)


def signature(args: Sequence[Any]) -> Tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                 for a in args)


def addresses(args: Sequence[Any]) -> List[int]:
    return [a.data_ptr() if isinstance(a, torch.Tensor) else 0 for a in args]


def remember(seen: Dict[Tuple, List[int]], key: Tuple, args: Sequence[Any]) -> None:
    """Note a signature's input addresses at its first call; shapes that keep changing are forgotten rather than
    kept forever."""
    if len(seen) >= 16 * MAX_SIGNATURES:
        seen.clear()
    seen.setdefault(key, addresses(args))


def found_in_place(args: Sequence[Any], first: Sequence[int]) -> List[bool]:
    """Per input: a tensor at the address it had in the first call (weights): the graph reads it in place."""
    return [isinstance(a, torch.Tensor) and a.data_ptr() == p for a, p in zip(args, first)]


def _flat_outputs(gm: fx.GraphModule) -> List[fx.Node]:
    out = gm.graph.find_nodes(op="output")[0].args[0]
    return [n for n in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(n, fx.Node)]


def _constant_seed(node: fx.Node) -> bool:
    """A host output of an op that takes a `dropout_p` (a dropout seed) called without dropout: the kernels never
    read it (flashfx's attention returns a zero; training saves it for the backward), so a replay that keeps the
    captured value changes nothing."""
    source = node.args[0] if node.target is operator.getitem and node.args else None
    return isinstance(source, fx.Node) and _dropout_p(source) == 0


def _dropout_arg(node: fx.Node) -> bool:
    """An op with a `dropout_p` argument called with a non-zero (or traced) probability: its seed is drawn on the
    host, once, at capture."""
    p = _dropout_p(node)
    return p is not None and p != 0


def _dropout_p(node: fx.Node) -> Any:
    """The node's `dropout_p` argument (0.0 when left out), or None if its op has no such argument."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "dropout_p" not in names:
        return None
    i = names.index("dropout_p")
    p = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else 0.0)
    return p if isinstance(p, (int, float)) else float("nan")  # traced: not provably zero
