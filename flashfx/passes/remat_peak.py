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
candidate pinned as saved, under the same budget (the solver pays for it elsewhere), and so are the best 2, 4 and 8
together, and one change is kept. Repeat while the peak falls. Two walks, choosing by the lowest peak or by the most
peak lowered per second of added recompute; the lower final peak is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Set, Tuple

import torch.fx as fx

from flashfx.passes import remat_plan
from flashfx.passes.remat_memory import _lifetimes, _owned_inputs

MAX_ROUNDS = 16            # each round keeps one change (one value or a few pinned); a Llama needs a few
TRIALS_PER_ROUND = 4       # candidates re-solved alone per round (a solve and a split each: ~0.5 s, ANCHORS Llama)
JOINT_CUTS = (2, 4, 8)     # ...and the best this many together
MIN_PEAK_GAIN = 0.01       # a change must lower the predicted peak by at least this fraction
MIN_RELEASE = 0.05         # try only when the best candidate releases this fraction of the peak
NEAR_PEAK = 0.02           # trials this close to the lowest peak compete on recompute time
COST_FLOOR = 0.05          # recompute added counts as at least this fraction of the plan's, per second of it


@dataclass
class Trial:
    """One plan with its graphs and predicted peak."""

    solution: remat_plan.Solution
    fw: fx.GraphModule
    bw: fx.GraphModule
    peak: int


def chain_cuts(trial: Trial, problem: remat_plan.Problem, pins: FrozenSet[int]) -> List[Tuple[float, int]]:
    """(bytes released at the peak, problem index) of the values worth saving, best per byte first."""
    life = _lifetimes(trial.bw, _owned_inputs(trial.bw))
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


Choice = Tuple[FrozenSet[int], Trial]


def _lowest_peak(current: Trial, better: List[Choice]) -> Choice:
    """The lowest peak; among the trials within NEAR_PEAK of it, the least recompute."""
    lowest = min(t.peak for _, t in better)
    return min(((c, t) for c, t in better if t.peak <= lowest * (1.0 + NEAR_PEAK)),
               key=lambda ct: ct[1].solution.plan.cost)


def _most_per_second(current: Trial, better: List[Choice]) -> Choice:
    """The most peak lowered per second of recompute added (an added cost counts as at least COST_FLOOR of the
    plan's): small steps that keep the plan cheap."""
    base = current.solution.plan.cost
    floor = COST_FLOOR * base + 1e-9
    return max(better, key=lambda ct: (current.peak - ct[1].peak) / max(ct[1].solution.plan.cost - base, floor))


def repair(start: Trial, problem: remat_plan.Problem,
           evaluate: Callable[[FrozenSet[int]], Optional[Trial]]) -> Tuple[Trial, List[int]]:
    """The plan after pinning chain cuts while the predicted peak falls, and the values pinned.
    `evaluate(pins)` re-solves with those values saved (None when the budget cannot hold them).

    The greedy walk depends on its first steps (the solver re-plans around each pin), and neither rule of choice
    wins everywhere (a 4-layer Llama: at 0.2 the lowest-peak walk ends at 1.21 MB and the per-second walk at 1.44;
    at 0.1, 1.27 and 1.08), so both walks run and the lower peak (then the cheaper plan) is kept."""
    seen: Dict[FrozenSet[int], Optional[Trial]] = {}  # both walks begin with the same trials

    def cached(pins: FrozenSet[int]) -> Optional[Trial]:
        if pins not in seen:
            seen[pins] = evaluate(pins)
        return seen[pins]

    walks = [_walk(start, problem, cached, choose) for choose in (_lowest_peak, _most_per_second)]
    return min(walks, key=lambda w: (w[0].peak, w[0].solution.plan.cost))


def _walk(start: Trial, problem: remat_plan.Problem,
          evaluate: Callable[[FrozenSet[int]], Optional[Trial]],
          choose: Callable[[Trial, List[Choice]], Choice]) -> Tuple[Trial, List[int]]:
    current, pins = start, frozenset()
    for _ in range(MAX_ROUNDS):
        cuts = chain_cuts(current, problem, pins)
        if not cuts or max(freed for freed, _ in cuts) < MIN_RELEASE * current.peak:
            break
        ranked = [v for _, v in cuts]
        # each of the best few alone, and the best 2, 4, 8 together: one layer's cut re-solved alone can move the
        # plan elsewhere, where cutting every layer at once lowers the peak (a 4-layer Llama at 0.2: 1.44 MB with
        # single cuts, 1.24 MB with its six best together)
        choices = [frozenset({v}) for v in ranked[:TRIALS_PER_ROUND]]
        choices += [frozenset(ranked[:k]) for k in JOINT_CUTS if k <= len(ranked)]
        trials = [(c, evaluate(pins | c)) for c in dict.fromkeys(choices)]
        better = [(c, t) for c, t in trials if t is not None and t.peak < current.peak * (1.0 - MIN_PEAK_GAIN)]
        if not better:
            break
        chosen, current = choose(current, better)
        pins = pins | chosen
    return current, sorted(pins)
