"""remat: flashfx's AOTAutograd partitioner. Under a memory budget it chooses which forward values the forward saves
for the backward and which the backward recomputes, cheapest recompute per byte first (the cost model's FLOPs and
bytes on an H100 roofline), and records the plan for the report.

    partition_fn = make_partition_fn(config, records)      # what the compiler hands to aot_module_simplified

`config.remat` is the budget: a fraction in (0, 1] of the activation bytes the forward saves without remat, an int
byte count, "auto" (the fastest plan whose predicted peak fits the free GPU memory; 1.0 off CUDA), or "speed" (no
budget: each saved byte is priced at a write and a read at HBM bandwidth, and the plan minimises recompute + that).
The decisions are made by `remat_plan.solve` (an exact min cut per multiplier, see there); graph extraction reuses
torch's `_extract_fwd_bwd_modules`; byte counts, the peak-memory estimate and fp8 storage of saved activations are in
`remat_memory`. Graphs this pass does not understand (activation-checkpoint tags, mutations,
RNG-functionalised or effectful graphs) get torch's default partition (save everything, recompute nothing), with the
reason in the plan.
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._functorch.partitioners import _extract_fwd_bwd_modules, default_partition
from torch.fx.experimental.proxy_tensor import is_sym_node

from flashfx.config import Config
from flashfx.passes import remat_peak, remat_plan
from flashfx.passes.remat_memory import _bytes_of, _compress_fp8, _peak, _saved_outputs
from flashfx.rewriter import cost as cost_model
from flashfx.rewriter.aliasing import shares_storage

# Roofline used to turn node FLOPs/bytes into recompute seconds. Only the ratios steer the plan (matmuls are
# ~10x costlier per saved byte than pointwise ops); the absolute values are H100 SXM figures a good kernel reaches.
MATMUL_FLOPS_PER_S = 400e12   # bf16 tensor cores (990 TFLOP/s peak)
VECTOR_FLOPS_PER_S = 30e12    # CUDA cores (67 TFLOP/s fp32 peak)
HBM_BYTES_PER_S = 2.5e12      # 3.35 TB/s peak
AUTO_FRACTIONS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0)
# "speed": a saved byte costs a write in the forward and a read in the backward at HBM bandwidth.
SAVED_BYTE_SECONDS = 2.0 / HBM_BYTES_PER_S
AUTO_HEADROOM = 0.9           # "auto" leaves 10% of the free memory to the allocator and the rest of the step
FP8_MIN_NUMEL = 1024          # smaller saved tensors (norm statistics, scalars) stay exact: no memory to win


class _Decline(Exception):
    """The joint graph has something this partitioner cannot prove safe to recompute around."""


# ------------------------------------------------------------------------------------------------- the record

@dataclass
class RematPlan:
    """What the partitioner decided for one joint graph (one entry of the report's `remat` list)."""

    status: str                              # "applied", "over_budget" (the minimum plan) or "declined"
    reason: str = ""
    budget: Any = None                       # config.remat as given
    budget_bytes: int = 0
    saved: List[Tuple[str, int]] = field(default_factory=list)         # activations kept for the backward
    inputs_saved: List[Tuple[str, int]] = field(default_factory=list)  # graph inputs it reads (the caller holds them)
    recomputed: List[Tuple[str, int]] = field(default_factory=list)    # (value, extra FLOPs)
    activation_bytes_no_remat: int = 0
    activation_bytes: int = 0
    min_activation_bytes: int = 0
    extra_flops: int = 0
    recompute_seconds: float = 0.0          # roofline estimate on an H100 (see MATMUL_FLOPS_PER_S)
    peak_bytes_no_remat: int = 0
    peak_bytes: int = 0                      # predicted peak of what the fwd/bwd graphs allocate (not their inputs)
    compress: Optional[str] = None
    compressed: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    solver: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "status": self.status, "reason": self.reason, "budget": self.budget, "budget_bytes": self.budget_bytes,
            "saved": [{"name": n, "bytes": b} for n, b in self.saved],
            "inputs_saved": [{"name": n, "bytes": b} for n, b in self.inputs_saved],
            "recomputed": [{"name": n, "extra_flops": f} for n, f in self.recomputed],
            "activation_bytes_no_remat": self.activation_bytes_no_remat, "activation_bytes": self.activation_bytes,
            "min_activation_bytes": self.min_activation_bytes, "extra_flops": self.extra_flops,
            "recompute_seconds": self.recompute_seconds, "peak_bytes_no_remat": self.peak_bytes_no_remat,
            "peak_bytes": self.peak_bytes, "compress": self.compress, "compressed": list(self.compressed),
            "notes": list(self.notes), "solver": dict(self.solver),
        }

    def text(self) -> str:
        fb = cost_model.format_bytes
        if self.status == "declined":
            return f"default partition (remat declined: {self.reason}); saves {fb(self.activation_bytes)}"
        line = (f"saves {fb(self.activation_bytes)} of {fb(self.activation_bytes_no_remat)} "
                f"(budget {fb(self.budget_bytes)}), recomputes {len(self.recomputed)} values "
                f"(+{cost_model.format_flops(self.extra_flops)}, ~{self.recompute_seconds * 1e6:.1f} us on H100); "
                f"predicted peak {fb(self.peak_bytes)} (no remat {fb(self.peak_bytes_no_remat)})")
        if self.compress:
            line += f"; {len(self.compressed)} saved tensors stored as {self.compress} (approximate gradients)"
        if self.status == "over_budget":
            line += f"; OVER BUDGET: {self.reason}"
        return line


# ------------------------------------------------------------------------------------------------- entry point

def make_partition_fn(config: Config, records: List[Any]) -> Callable[..., Tuple[fx.GraphModule, fx.GraphModule]]:
    """AOTAutograd's `partition_fn` for `config.remat`; each call appends a `RematPlan` to `records`."""
    if config.remat is None:
        raise ValueError("make_partition_fn needs config.remat set (a fraction, a byte count or 'auto'); "
                         "with remat=None use torch's default_partition")

    def partition(joint_module: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int,
                  **kwargs: Any) -> Tuple[fx.GraphModule, fx.GraphModule]:
        try:
            analysis = _analyse(joint_module, num_fwd_outputs, config.remat_compress)
        except _Decline as e:
            return _fallback(joint_module, joint_inputs, num_fwd_outputs, kwargs, config, records, str(e))
        try:
            fw, bw, plan = _plan_and_split(analysis, config, _device_of(joint_module))
        except Exception as e:  # never crash a user's model: a bug here costs the memory saving, not the step
            return _fallback(joint_module, joint_inputs, num_fwd_outputs, kwargs, config, records,
                             f"internal error {type(e).__name__}: {e}")
        records.append(plan)
        return fw, bw

    return partition


def _fallback(joint_module: fx.GraphModule, joint_inputs: Any, num_fwd_outputs: int, kwargs: Dict[str, Any],
              config: Config, records: List[Any], reason: str) -> Tuple[fx.GraphModule, fx.GraphModule]:
    fw, bw = default_partition(joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    saved = _saved_outputs(fw, num_fwd_outputs)
    activations = [(n.name, _bytes_of(n)) for n in saved if not n.name.startswith("primals")]
    total = sum(b for _, b in activations)
    records.append(RematPlan("declined", reason, config.remat, saved=activations, activation_bytes=total,
                             activation_bytes_no_remat=total, compress=None))
    return fw, bw


# ------------------------------------------------------------------------------------------------- analysis

@dataclass
class _Analysis:
    joint: fx.GraphModule
    num_fwd_outputs: int
    problem: remat_plan.Problem           # bytes as stored (fp8 where compressed)
    raw: remat_plan.Problem               # bytes at full precision (the budget's reference)
    nodes: List[fx.Node]                  # problem index -> joint node
    available: List[fx.Node]              # primals and get_attr: always there
    backward: Set[fx.Node]                # nodes that depend on a tangent
    fwd_required: Set[int]                # indices of values the forward outputs need (computed there anyway)
    compressible: Set[int]
    pin_reasons: Dict[int, str]
    notes: List[str]


def _analyse(joint: fx.GraphModule, num_fwd_outputs: int, compress: Optional[str]) -> _Analysis:
    graph = joint.graph
    notes: List[str] = []
    available: List[fx.Node] = []
    avail_set: Set[fx.Node] = set()
    backward: Set[fx.Node] = set()
    for node in graph.nodes:
        if node.meta.get("recompute") is not None:
            raise _Decline(f"{node.name} carries an activation-checkpoint tag: the user's checkpoint decides")
        if str(node.meta.get("partitioner_tag", "")).startswith("must_be_in"):
            raise _Decline(f"{node.name} is tagged {node.meta['partitioner_tag']}")
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            raise _Decline(f"{node.name} mutates ({node.target}): recomputing around mutations is not proven safe")
        if node.op == "placeholder":
            if str(node.target).startswith("primals"):
                available.append(node)
                avail_set.add(node)
            elif str(node.target).startswith("tangents"):
                backward.add(node)
            else:
                raise _Decline(f"placeholder {node.target} (RNG seeds or backward state) is not handled")
        elif node.op == "get_attr":
            available.append(node)
            avail_set.add(node)
        elif node.op == "call_function":
            if any(a in backward for a in node.all_input_nodes):
                backward.add(node)
        elif node.op != "output":
            raise _Decline(f"{node.op} node {node.name} in the joint graph")

    output_node = graph.find_nodes(op="output")[0]
    outputs = pytree.arg_tree_leaves(*output_node.args)
    mutated = _mutated_inputs(output_node, available)
    fwd_outputs = [o for o in outputs[:num_fwd_outputs] if isinstance(o, fx.Node)]
    bwd_outputs = {o for o in outputs[num_fwd_outputs:] if isinstance(o, fx.Node)}
    forward = [n for n in graph.nodes if n.op == "call_function" and n not in backward]
    fwd_set = set(forward)
    fwd_required = _ancestors(fwd_outputs, fwd_set)
    # The other elements of a multi-output op the forward runs (layer-norm statistics) come with it for free.
    fwd_required |= {u for n in fwd_required if isinstance(n.meta.get("val"), (tuple, list))
                     for u in n.users if u.target is operator.getitem}
    bw_used = {n for n in forward
               if n in bwd_outputs or any(u in backward for u in n.users)}
    relevant = _ancestors(bw_used, fwd_set)
    nodes = [n for n in forward if n in relevant]
    index = {n: i for i, n in enumerate(nodes)}

    hints: Dict[Any, int] = {}
    for node in graph.nodes:
        cost_model.size_hints(cost_model.node_value(node), hints)
    evaluate = _Evaluator(hints, notes)

    names, costs, flops, nbytes, raw_bytes, inputs, used, pinned = [], [], [], [], [], [], [], []
    pin_reasons: Dict[int, str] = {}
    compressible: Set[int] = set()
    for i, node in enumerate(nodes):
        value = node.meta.get("val")
        c = cost_model.node_cost(node, joint)
        reason = _pin_reason(node, index, pin_reasons, c.exact)
        stale = [a.name for a in node.all_input_nodes if a in mutated]
        if stale and reason is None:
            # The step writes the new value into this input after the forward: a backward recompute would read the
            # updated value (and trip autograd's version check), so this reader runs in the forward only.
            reason = f"reads {', '.join(stale)}, an input the step mutates"
        if isinstance(value, torch.Tensor):
            size = evaluate(cost_model.tensor_bytes(value))
            stored = size
            if shares_storage(node) and reason is None:
                size = stored = math.inf  # saving the base holds the memory; the view is free to recompute
            elif compress == "fp8" and _fp8_ok(value, evaluate):
                stored = evaluate(cost_model.numel(value)) + 4  # one byte per element and a float32 scale
                compressible.add(i)
        elif is_sym_node(node):
            size = stored = 0.0
            reason = reason or "symbolic size"
        elif isinstance(value, (tuple, list)):
            size = stored = math.inf
        else:
            raise _Decline(f"{node.name} has a value remat does not understand ({type(value).__name__})")
        node_flops = evaluate(c.flops)
        seconds = _roofline_seconds(node, node_flops, evaluate(c.hbm_bytes))
        if reason:
            pin_reasons[i] = reason
        names.append(node.name)
        costs.append(seconds if node in fwd_required else 0.0)
        flops.append(int(node_flops))
        nbytes.append(stored)
        raw_bytes.append(size)
        inputs.append(sorted({index[a] for a in node.all_input_nodes if a in index}))
        used.append(node in bw_used)
        pinned.append(reason is not None)
    problem = remat_plan.Problem(names, costs, flops, nbytes, inputs, used, pinned)
    raw = replace(problem, nbytes=raw_bytes)
    return _Analysis(joint, num_fwd_outputs, problem, raw, nodes, available, backward,
                     {index[n] for n in fwd_required if n in index}, compressible, pin_reasons, notes)


def _mutated_inputs(output_node: fx.Node, available: Sequence[fx.Node]) -> Set[fx.Node]:
    """The graph inputs the step writes back after the forward (AOTAutograd's input-mutation outputs)."""
    descs = output_node.meta.get("desc")
    if descs is None:
        raise _Decline("no output descriptors in the joint graph: cannot tell which inputs the step mutates")
    mutated_descs = [getattr(d, "mutated_input", None) for d in pytree.tree_leaves(descs)
                     if type(d).__name__ == "InputMutationAOTOutput"]
    by_desc = {repr(n.meta.get("desc")): n for n in available if n.op == "placeholder"}
    found = set()
    for d in mutated_descs:
        if repr(d) not in by_desc:
            raise _Decline(f"input mutation {d!r} does not name a graph input")
        found.add(by_desc[repr(d)])
    return found


def _ancestors(roots: Any, within: Set[fx.Node]) -> Set[fx.Node]:
    seen: Set[fx.Node] = set()
    stack = [r for r in roots if r in within]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a in within and a not in seen)
    return seen


class _Evaluator:
    """Numbers for the example sizes (symbolic sizes without an example value are assumed 1024, noted once)."""

    def __init__(self, hints: Dict[Any, int], notes: List[str]) -> None:
        self.hints, self.notes = hints, notes

    def __call__(self, expr: Any) -> float:
        missing = [s for s in getattr(expr, "free_symbols", ()) if s not in self.hints]
        for s in missing:
            self.hints[s] = 1024
            self.notes.append(f"size {s} has no example value; assumed 1024")
        return float(expr.subs(self.hints)) if getattr(expr, "free_symbols", None) else float(expr)


def _pin_reason(node: fx.Node, index: Dict[fx.Node, int], pin_reasons: Dict[int, str],
                cost_known: bool) -> Optional[str]:
    """Why `node` must never be recomputed (None when recomputing it gives the same value at a known cost)."""
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher-order op {target.name()}"
    if isinstance(target, torch._ops.OpOverload):
        custom = target.namespace not in ("aten", "prims")
        dropout = _dropout_argument(node, target) if custom else None
        if torch.Tag.nondeterministic_seeded in target.tags:
            # flashfx's own ops draw random numbers only for dropout (flashfx.codegen.attention._draw_seed), so
            # with dropout off a recompute returns the same values; anything else seeded is a fresh draw.
            if not (target.namespace == "flashfx" and dropout is not None and not dropout[1]):
                return f"random op {target}: a recompute would draw different numbers"
        elif dropout is not None and dropout[1]:
            return f"random: {target}({dropout[0]}={dropout[1]})"
        if custom and not cost_known:
            return f"{target} has no registered cost: recomputing it could cost anything"
    if target is operator.getitem and isinstance(node.args[0], fx.Node) and index.get(node.args[0]) in pin_reasons:
        return f"element of {node.args[0].name} ({pin_reasons[index[node.args[0]]]})"
    if _impure(node):
        return f"impure op {target}"
    return None


def _impure(node: fx.Node) -> bool:
    """Side effects other than drawing random numbers (handled above, op by op)."""
    try:
        return node.is_impure(impure_random=False)
    except TypeError:  # older torch.fx: no impure_random argument
        return node.is_impure()


def _dropout_argument(node: fx.Node, target: torch._ops.OpOverload) -> Optional[Tuple[str, Any]]:
    """(name, value) of a custom op's dropout-probability argument, None when it has none."""
    for i, arg in enumerate(target._schema.arguments):
        if "dropout" in arg.name or arg.name == "p":
            value = node.kwargs.get(arg.name, node.args[i] if i < len(node.args) else arg.default_value)
            return arg.name, (value if value not in (None, False) else 0)
    return None


def _fp8_ok(value: torch.Tensor, evaluate: Callable[[Any], float]) -> bool:
    return (getattr(torch, "float8_e4m3fn", None) is not None and value.dtype.is_floating_point
            and value.element_size() >= 2 and evaluate(cost_model.numel(value)) >= FP8_MIN_NUMEL)


def _tensor_core(node: fx.Node) -> bool:
    """Matmuls and flashfx's own ops (attention, fused loss): the recomputes that run as kernels of their own."""
    name = cost_model.op_name(node)
    return (name in cost_model.MATMUL_OPS or name in cost_model.ATTENTION_OPS or node.target is operator.matmul
            or (isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "flashfx"))


def _roofline_seconds(node: fx.Node, flops: float, nbytes: float) -> float:
    peak = MATMUL_FLOPS_PER_S if _tensor_core(node) else VECTOR_FLOPS_PER_S
    return max(flops / peak, nbytes / HBM_BYTES_PER_S)


def _fused_recompute(a: _Analysis) -> remat_plan.Problem:
    """The problem with pointwise / reduction recomputes costed at their FLOPs only: the fusion pass runs them inside
    the backward kernels that read their inputs anyway (those inputs' bytes are the plan's saved bytes), so they
    write nothing. Matmuls and flashfx's ops keep their roofline: they are kernels of their own."""
    p = a.problem
    cost = [c if c == 0.0 or _tensor_core(a.nodes[v]) else p.flops[v] / VECTOR_FLOPS_PER_S
            for v, c in enumerate(p.cost)]
    return replace(p, cost=cost)


def _device_of(joint: fx.GraphModule) -> torch.device:
    for node in joint.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------- plan + split

def _plan_and_split(a: _Analysis, config: Config,
                    device: torch.device) -> Tuple[fx.GraphModule, fx.GraphModule, RematPlan]:
    start = time.perf_counter()
    # No remat = what default_partition does: save every forward value the backward reads; values only the
    # backward needs (weight transposes, views) are computed there.
    no_remat = remat_plan.normalise(a.raw, [v not in a.fwd_required for v in range(len(a.raw))])
    baseline = remat_plan.evaluate(a.raw, no_remat)
    base_fw, base_bw = _split(a, no_remat, compress=False)
    base_peak = _peak(base_fw, base_bw)
    notes = list(a.notes)

    if config.remat == "auto":
        free = _free_bytes(device)
        fractions: Sequence[float] = AUTO_FRACTIONS if free is not None else (1.0,)
        if free is None:
            notes.append(f"auto on {device.type}: no free-memory query, budget = no-remat activations")
    else:
        free, fractions = None, ()
    if config.remat == "speed":
        solution = remat_plan.solve_priced(_fused_recompute(a) if config.fusion else a.problem, SAVED_BYTE_SECONDS)
        budget = solution.plan.nbytes
        fw, bw = _split(a, solution.plan.recompute, compress=config.remat_compress == "fp8")
        peak = _peak(fw, bw)
        notes.append(f"speed: each saved byte priced at a write and a read at {HBM_BYTES_PER_S / 1e12:.1f} TB/s"
                     + (", pointwise / reduction recomputes at their FLOPs (fused into the backward)"
                        if config.fusion else "")
                     + f"; the plan saves {budget / max(baseline.nbytes, 1):.2f} of the no-remat activations")
    budgets = ([f * baseline.nbytes for f in fractions] if fractions
               else [] if config.remat == "speed" else [_budget_bytes(config.remat, baseline.nbytes)])
    smallest = solution.smallest if config.remat == "speed" else None
    repair_note: Optional[str] = None
    for k, budget in enumerate(budgets):
        solution = remat_plan.solve(a.problem, budget)
        smallest = solution.smallest
        fw, bw = _split(a, solution.plan.recompute, compress=config.remat_compress == "fp8")
        peak = _peak(fw, bw)
        # a budget the user chose: always keep its peak low; "auto": only where the plan as solved does not fit
        if solution.feasible and (free is None or peak > AUTO_HEADROOM * free):
            fw, bw, peak, solution, repair_note = _repair_peak(a, config, budget, fw, bw, peak, solution)
        if free is None or peak <= AUTO_HEADROOM * free:
            break
        if k == len(budgets) - 1:
            notes.append(f"auto: even the smallest plan (peak {cost_model.format_bytes(peak)}) exceeds "
                         f"{AUTO_HEADROOM:.0%} of the free memory ({cost_model.format_bytes(free)})")
    if free is not None:
        notes.append(f"auto: free memory {cost_model.format_bytes(free)}, chose budget "
                     f"{budget / max(baseline.nbytes, 1):.2f} of the no-remat activations")
    if repair_note:
        notes.append(repair_note)

    plan = solution.plan
    p = a.problem
    status, reason = "applied", ""
    if not solution.feasible:
        status = "over_budget"
        reason = _why_minimum(a, smallest, budget)
    compressed = [p.names[v] for v in plan.saved if v in a.compressible] if config.remat_compress == "fp8" else []
    if config.remat_compress == "fp8" and getattr(torch, "float8_e4m3fn", None) is None:
        notes.append("fp8: this torch has no float8_e4m3fn; saved activations stay at full precision")
    if compressed:
        notes.append(f"fp8: {len(compressed)} saved activations stored as float8_e4m3fn with a per-tensor scale; "
                     "the backward reads them back with ~6% relative error per element")
    record = RematPlan(
        status=status, reason=reason, budget=config.remat, budget_bytes=int(min(budget, 2**62)),
        saved=[(p.names[v], int(p.nbytes[v])) for v in plan.saved if not is_sym_node(a.nodes[v])],
        inputs_saved=[(n.name, _bytes_of(n)) for n in _needed_inputs(a, plan.recompute)],
        recomputed=[(p.names[v], p.flops[v]) for v in range(len(p)) if plan.recompute[v] and p.cost[v] > 0],
        activation_bytes_no_remat=int(baseline.nbytes), activation_bytes=int(plan.nbytes),
        min_activation_bytes=int(smallest.nbytes), extra_flops=int(plan.flops),
        recompute_seconds=plan.cost, peak_bytes_no_remat=base_peak, peak_bytes=peak,
        compress=config.remat_compress, compressed=compressed, notes=notes,
        solver={"optimal": solution.optimal, "lower_bound_seconds": solution.lower_bound,
                "gap": round(1.0 - solution.lower_bound / plan.cost, 6) if plan.cost > 0 else 0.0,
                "hull_plans": len(solution.hull), "search_nodes": solution.search_nodes,
                "values": len(p), "free_values": len(p.free_variables()),
                "seconds": round(time.perf_counter() - start, 4)},
    )
    return fw, bw, record


def _repair_peak(a: _Analysis, config: Config, budget: float, fw: fx.GraphModule, bw: fx.GraphModule, peak: int,
                 solution: remat_plan.Solution) -> Tuple[Any, ...]:
    """`remat_peak.repair` on the budget's plan: keep chain cuts while they lower the predicted peak. Returns the
    graphs, peak and solution to use, and the note for the plan (None when nothing was cut)."""
    compress = config.remat_compress == "fp8"

    def evaluate(pins: FrozenSet[int]) -> Optional[remat_peak.Trial]:
        problem = replace(a.problem, pinned=[p or v in pins for v, p in enumerate(a.problem.pinned)])
        pinned = remat_plan.solve(problem, budget)
        if not pinned.feasible:
            return None
        pfw, pbw = _split(a, pinned.plan.recompute, compress=compress)
        return remat_peak.Trial(pinned, pfw, pbw, _peak(pfw, pbw))

    start = remat_peak.Trial(solution, fw, bw, peak)
    best, pins = remat_peak.repair(start, a.problem, evaluate)
    note = None
    if pins:
        fb = cost_model.format_bytes
        names = ", ".join(a.problem.names[v] for v in pins[:6]) + (", ..." if len(pins) > 6 else "")
        note = (f"peak repair: saving {len(pins)} values a recompute chain ran through ({names}) lowers the "
                f"predicted peak {fb(peak)} -> {fb(best.peak)} at {fb(best.solution.plan.nbytes)} saved, "
                f"recompute {solution.plan.cost * 1e3:.2f} -> {best.solution.plan.cost * 1e3:.2f} ms")
    return best.fw, best.bw, best.peak, best.solution, note


def _budget_bytes(spec: Any, baseline: float) -> float:
    if isinstance(spec, float):
        return spec * baseline
    if isinstance(spec, int) and not isinstance(spec, bool):
        return float(spec)
    raise ValueError(f"flashfx remat: budget {spec!r} is not a fraction in (0, 1], a byte count or 'auto'")


def _free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _why_minimum(a: _Analysis, smallest: remat_plan.Evaluation, budget: float) -> str:
    fb = cost_model.format_bytes
    p = a.problem
    pinned = [(p.names[v], p.nbytes[v]) for v in smallest.saved if p.pinned[v] and p.nbytes[v] > 0]
    what = ", ".join(f"{n} ({a.pin_reasons.get(p.names.index(n), 'pinned')}, {fb(b)})" for n, b in pinned[:4])
    return (f"the backward needs at least {fb(smallest.nbytes)} of saved activations (budget {fb(budget)}): "
            + (f"values that cannot be recomputed: {what}" if pinned
               else "values whose inputs are not graph inputs either"))


def _needed_inputs(a: _Analysis, recompute: Sequence[bool]) -> List[fx.Node]:
    index = {n: i for i, n in enumerate(a.nodes)}
    out = []
    for node in a.available:
        for u in node.users:
            if u in a.backward or (u in index and recompute[index[u]]):
                out.append(node)
                break
    return out


def _split(a: _Analysis, recompute: Sequence[bool], compress: bool) -> Tuple[fx.GraphModule, fx.GraphModule]:
    """The forward and backward graphs for a plan: torch's extraction, then our clean-up and late recompute."""
    ev = remat_plan.evaluate(a.problem, recompute)
    saved_set = {a.nodes[v] for v in ev.saved}
    needed = _needed_inputs(a, recompute)
    saved_values = [n for n in needed if not is_sym_node(n) and n.op == "placeholder"]
    saved_sym = [n for n in needed if is_sym_node(n)]
    for node in a.joint.graph.nodes:  # graph order keeps the runtime's saved-tensor order stable
        if node in saved_set:
            (saved_sym if is_sym_node(node) else saved_values).append(node)
    fw, bw = _extract(a.joint, saved_values, saved_sym, a.num_fwd_outputs)
    _dce_keep_mutations(bw)
    _check_no_random_recompute(bw, a)
    if compress:
        fp8 = {a.nodes[v].name for v in ev.saved if v in a.compressible}
        if fp8:
            _compress_fp8(fw, bw, fp8, a.num_fwd_outputs)
    _schedule_recompute_late(bw)
    fw.recompile()
    bw.recompile()
    return fw, bw


def _extract(joint: fx.GraphModule, saved_values: List[fx.Node], saved_sym: List[fx.Node],
             num_fwd_outputs: int) -> Tuple[fx.GraphModule, fx.GraphModule]:
    # The one place that touches torch's private extraction API: (joint, saved_values, saved_sym_nodes, *,
    # num_fwd_outputs) is the same from torch 2.11 to 2.13; later keyword arguments keep their defaults.
    return _extract_fwd_bwd_modules(joint, list(saved_values), list(saved_sym), num_fwd_outputs=num_fwd_outputs)


def _dce_keep_mutations(gm: fx.GraphModule) -> None:
    """Dead-code elimination that also drops unused random ops (a dead dropout copied into the backward would
    still draw numbers and shift every later random op); only mutating ops are kept."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            continue
        gm.graph.erase_node(node)


def _check_no_random_recompute(bw: fx.GraphModule, a: _Analysis) -> None:
    """A pinned value (random, impure, unknown cost) may reach the backward only as a saved input."""
    pinned = {a.nodes[v].name for v in a.pin_reasons}
    for node in bw.graph.nodes:
        if node.op == "call_function" and node.name in pinned:
            why = a.pin_reasons[a.problem.names.index(node.name)]
            raise RuntimeError(f"the backward would recompute {node.name}: {why}")


def _schedule_recompute_late(bw: fx.GraphModule) -> None:
    """Move each recomputed value just before its first use, so recomputed activations are not all alive at the
    start of the backward. Nodes that depend on a tangent keep their (autograd engine) order."""
    graph = bw.graph
    nodes = list(graph.nodes)
    output = nodes[-1]
    tangent_dep = {n for n in nodes if n.op == "placeholder" and str(n.target).startswith("tangents")}
    for n in nodes:
        if n.op == "call_function" and any(a in tangent_dep for a in n.all_input_nodes):
            tangent_dep.add(n)
    placed = {n for n in nodes if n.op == "placeholder"}
    order: List[fx.Node] = []

    def emit(root: fx.Node) -> None:
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in placed:
                continue
            if expanded:
                placed.add(n)
                order.append(n)
                # Take every element out of a tuple at once: the tuple keeps all of them alive until its last
                # getitem, so a late getitem (norm statistics) would pin a big element across the backward.
                for u in n.users:
                    if u.target is operator.getitem and u not in placed:
                        placed.add(u)
                        order.append(u)
                continue
            stack.append((n, True))
            stack.extend((i, False) for i in reversed(n.all_input_nodes) if i not in placed)

    for n in nodes:
        if n in tangent_dep:
            emit(n)
    for n in nodes:
        if n.op != "output":
            emit(n)
    for n in order:
        output.prepend(n)
