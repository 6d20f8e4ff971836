"""Peak repair for remat plans: cut the recompute chains that make the backward hold a second forward.

The solver (`remat_plan`) minimises recompute seconds under a budget on *saved* bytes; it cannot see when a value
is alive. Under a small budget it may save nothing on a model's residual stream, because keeping a layer's input
saves no recompute on its own: every layer is recomputed once either way. But the backward starts at the last
layer, whose inputs are then recomputed from far back (the embedding), and each intermediate on the way is also
read later by its own layer's gradient, so all of them are computed at the start of the backward and held until
then: the backward holds a second forward, and the predicted peak comes back to where no remat left it (the HF
Llama of ANCHORS.md at budget 0.1: 5.6 GB predicted against 7.0 GB without remat and 2.0 GB at budget 0.2).

Hand-written checkpointing avoids this by keeping each layer's input. `repair` finds such values in the plan's own
backward graph: at the predicted peak, the recomputed values that are alive but wait for a later use were computed
early only because something the backward needs early is recomputed through them. In the graph of recomputed
values that run before the peak, a value `w` that post-dominates such a held value (every path from it to an early
use passes through `w`) would, if saved instead, let the held value be computed when its own gradient runs. Each
candidate is scored by the held bytes it releases per byte it costs; the best few are tried by re-solving with the
candidate pinned as saved, under the same budget (the solver pays for it elsewhere), and the change that lowers the
predicted peak most per second of added recompute is kept. Repeat while the peak falls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Set, Tuple

import torch.fx as fx

from flashfx.passes import remat_plan
from flashfx.passes.remat_memory import _lifetimes, _saved_bytes

MAX_ROUNDS = 16            # each round pins one value; a Llama needs about one per layer
TRIALS_PER_ROUND = 4       # candidates re-solved per round (a solve and a split each: ~0.5 s on the ANCHORS Llama)
MIN_PEAK_GAIN = 0.01       # a change must lower the predicted peak by at least this fraction
MIN_RELEASE = 0.05         # try only when the best candidate releases this fraction of the peak
COST_FLOOR = 0.05          # recompute added is counted as at least this fraction of the plan's, when ranking


@dataclass
class Trial:
    """One plan with its graphs and predicted peak."""

    solution: remat_plan.Solution
    fw: fx.GraphModule
    bw: fx.GraphModule
    peak: int


def chain_cuts(trial: Trial, num_fwd_outputs: int, problem: remat_plan.Problem,
               pins: FrozenSet[int]) -> List[Tuple[float, int]]:
    """(bytes released at the peak, problem index) of the values worth saving, best per byte first."""
    life = _lifetimes(trial.bw, _saved_bytes(trial.fw, num_fwd_outputs))
    _, at = life.peak()
    tangent: Set[fx.Node] = set()
    for n in life.nodes:
        if (n.op == "placeholder" and str(n.target).startswith("tangents")) or \
                any(i in tangent for i in n.all_input_nodes):
            tangent.add(n)
    early = [n for n in life.nodes if n.op == "call_function" and n not in tangent and life.order[n] <= at]
    held = [o for o in life.start if o.op != "placeholder" and o not in tangent and life.size[o] > 0
            and life.start[o] <= at < life.end[o]]
    dominator = _post_dominators(early, tangent, life.order, at)
    released: Dict[fx.Node, int] = {}
    for h in held:
        w = dominator.get(h)
        while w is not None:
            released[w] = released.get(w, 0) + life.size[h]
            w = dominator.get(w)
    index = {name: v for v, name in enumerate(problem.names)}
    scored = []
    for w, freed in released.items():
        v = index.get(w.name)
        if v is None or v in pins or problem.pinned[v] or not math.isfinite(problem.nbytes[v]):
            continue
        if freed > problem.nbytes[v]:
            scored.append((freed / max(problem.nbytes[v], 1.0), freed, v))
    scored.sort(reverse=True)
    return [(freed, v) for _, freed, v in scored]


def _post_dominators(early: List[fx.Node], tangent: Set[fx.Node], order: Dict[fx.Node, int],
                     at: int) -> Dict[fx.Node, fx.Node]:
    """Immediate post-dominator of each early recomputed value towards the backward nodes that run by position `at`
    (absent where that is the sink itself or where the value reaches none of them). `early` is in graph order, so
    every user comes after its input: one reverse pass suffices (Cooper, Harvey and Kennedy's intersection)."""
    sink = None
    rank: Dict[Optional[fx.Node], int] = {sink: 0}
    for n in reversed(early):
        rank[n] = len(rank)
    idom: Dict[Optional[fx.Node], Optional[fx.Node]] = {sink: sink}

    def meet(x: Optional[fx.Node], y: Optional[fx.Node]) -> Optional[fx.Node]:
        while x is not y:
            while rank[x] > rank[y]:
                x = idom[x]
            while rank[y] > rank[x]:
                y = idom[y]
        return x

    for n in reversed(early):
        succ: List[Optional[fx.Node]] = [u for u in n.users if u in idom and u is not sink]
        if any(u in tangent and order[u] <= at for u in n.users):
            succ.append(sink)
        if not succ:
            continue
        d = succ[0]
        for u in succ[1:]:
            d = meet(d, u)
        idom[n] = d
    return {n: d for n, d in idom.items() if n is not sink and d is not sink}


def repair(start: Trial, num_fwd_outputs: int, problem: remat_plan.Problem,
           evaluate: Callable[[FrozenSet[int]], Optional[Trial]]) -> Tuple[Trial, List[int]]:
    """The plan after pinning chain cuts while the predicted peak falls, and the values pinned.
    `evaluate(pins)` re-solves with those values saved (None when the budget cannot hold them)."""
    current, pins = start, frozenset()
    for _ in range(MAX_ROUNDS):
        cuts = chain_cuts(current, num_fwd_outputs, problem, pins)
        if not cuts or max(freed for freed, _ in cuts) < MIN_RELEASE * current.peak:
            break
        trials = [(v, t) for _, v in cuts[:TRIALS_PER_ROUND] for t in [evaluate(pins | {v})] if t is not None]
        better = [(v, t) for v, t in trials if t.peak < current.peak * (1.0 - MIN_PEAK_GAIN)]
        if not better:
            break
        base_cost = current.solution.plan.cost
        floor = COST_FLOOR * base_cost + 1e-9

        def gain_per_second(vt: Tuple[int, Trial]) -> float:
            return (current.peak - vt[1].peak) / max(vt[1].solution.plan.cost - base_cost, floor)

        v, current = max(better, key=gain_per_second)
        pins = pins | {v}
    return current, sorted(pins)
