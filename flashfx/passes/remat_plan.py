"""The remat solver: which forward values the backward recomputes, under a byte budget.

`remat.py` turns AOTAutograd's joint graph into a `Problem`: one variable per forward value the backward may
need, x_v = 1 when the backward recomputes v, x_v = 0 when the forward computes it (and saves it if needed).
A value is *saved* exactly when it is not recomputed and something that runs in the backward reads it:

    saved(v)  <=>  x_v = 0  and  (v is read by the backward proper  or  some user u of v has x_u = 1)

The plan costs `sum(cost_v * x_v)` (recompute seconds; zero for values that only the backward needs) and keeps
`sum(bytes_v * saved(v))` bytes alive between forward and backward.

Soundness: every assignment with pinned values at 0 and no unsaveable value saved is a valid plan. A recomputed
value's inputs are graph inputs, recomputed themselves, or saved by the definition above, so the backward can always
be built from the saved set; pinned values (random ops, mutations, impure ops) are never recomputed; views and
tuple-valued nodes are never saved (infinite bytes: a view is free to recompute from its base, which is what holds
the memory; a tuple cannot be saved), so the backward recomputes them from what it has whenever it needs them.

Optimality: for a fixed multiplier lam, minimising cost + lam * bytes is one s-t minimum cut, because every term is
"pay w when x_i = 1 and x_j = 0" (the "some user is recomputed" OR gets an auxiliary vertex). The solver walks the
lower convex hull of (bytes, cost) over lam with the Eisner-Severance rule (next lam = slope between the two
plans that bracket the budget), takes the cheapest hull plan within the budget, then spends the budget that is
left over greedily (un-recompute the value with the best seconds-saved per byte). Hull plans are exact optima for
their own byte count; the greedy fill is a heuristic that only ever keeps the plan within the budget.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


# Plans of problems with at most this many free values are polished by a 1- and 2-flip local search (it costs
# O(free^2 * values) per round; large graphs rely on the hull and the greedy fill alone).
LOCAL_SEARCH_MAX_VALUES = 40
REPAIR_MAX_VALUES = 300       # the greedy repair evaluates every candidate per step: O(free * values) each


@dataclass
class Problem:
    """The remat choice over the forward values the backward may need (indices are positions in these lists)."""

    names: List[str]
    cost: List[float]           # seconds the backward spends recomputing v (0 when only the backward needs v)
    flops: List[int]            # FLOPs of that recompute (for the report)
    nbytes: List[float]         # bytes kept alive if v is saved; math.inf when v cannot be saved (a tuple)
    inputs: List[List[int]]     # the problem values v reads (graph inputs are always available, so not listed)
    bw_used: List[bool]         # the backward proper (or a gradient output) reads v
    pinned: List[bool]          # never recompute (random, mutating, impure, symbolic sizes)
    users: List[List[int]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        n = len(self.names)
        self.users = [[] for _ in range(n)]
        for v, ins in enumerate(self.inputs):
            assert all(u < v for u in ins), f"{self.names[v]}: problem values must be in topological order"
            for u in ins:
                self.users[u].append(v)

    def __len__(self) -> int:
        return len(self.names)

    def free_variables(self) -> List[int]:
        """The values a plan really chooses for: neither pinned nor unsaveable (those follow from the rest)."""
        return [v for v in range(len(self)) if not self.pinned[v] and math.isfinite(self.nbytes[v])]


@dataclass
class Evaluation:
    recompute: List[bool]
    saved: List[int]
    nbytes: float
    cost: float
    flops: int

    def objective(self, lam: float) -> float:
        return self.cost + lam * self.nbytes


def normalise(p: Problem, recompute: Sequence[bool]) -> List[bool]:
    """Pinned values are never recomputed, unsaveable ones (views, tuples) always when needed, and a recompute
    that nothing in the backward reads is dropped (it would only cost time)."""
    x = [bool(r) and not p.pinned[v] for v, r in enumerate(recompute)]
    # Users come after their inputs: walking backwards settles every user before the values it reads.
    for v in reversed(range(len(p))):
        if p.pinned[v]:
            continue
        needed = p.bw_used[v] or any(x[u] for u in p.users[v])
        x[v] = needed if math.isinf(p.nbytes[v]) else (x[v] and needed)
    return x


def evaluate(p: Problem, recompute: Sequence[bool]) -> Evaluation:
    x = list(recompute)
    saved = [v for v in range(len(p)) if not x[v] and (p.bw_used[v] or any(x[u] for u in p.users[v]))]
    nbytes = sum((p.nbytes[v] for v in saved), 0.0)
    cost = sum((p.cost[v] for v in range(len(p)) if x[v]), 0.0)
    flops = sum(p.flops[v] for v in range(len(p)) if x[v] and p.cost[v] > 0)
    return Evaluation(x, saved, nbytes, cost, flops)


def valid(p: Problem, recompute: Sequence[bool]) -> bool:
    """A plan is valid when pinned values are computed once and nothing unsaveable is saved."""
    if any(recompute[v] and p.pinned[v] for v in range(len(p))):
        return False
    return math.isfinite(evaluate(p, recompute).nbytes)


# ------------------------------------------------------------------------------------------------- min cut

class _FlowNetwork:
    """Dinic's maximum flow with float capacities (iterative, so deep graphs do not hit the recursion limit)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.head: List[List[int]] = [[] for _ in range(n)]
        self.to: List[int] = []
        self.cap: List[float] = []

    def add(self, u: int, v: int, c: float) -> None:
        if c <= 0:
            return
        self.head[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(c)
        self.head[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)

    def _levels(self, s: int, eps: float) -> List[int]:
        level = [-1] * self.n
        level[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in self.head[u]:
                if self.cap[e] > eps and level[self.to[e]] < 0:
                    level[self.to[e]] = level[u] + 1
                    queue.append(self.to[e])
        return level

    def max_flow(self, s: int, t: int, eps: float) -> float:
        total = 0.0
        while True:
            level = self._levels(s, eps)
            if level[t] < 0:
                return total
            it = [0] * self.n
            while True:
                pushed = self._augment(s, t, level, it, eps)
                if pushed <= 0:
                    break
                total += pushed

    def _augment(self, s: int, t: int, level: List[int], it: List[int], eps: float) -> float:
        stack, path = [s], []
        while stack:
            u = stack[-1]
            if u == t:
                pushed = min(self.cap[e] for e in path)
                for e in path:
                    self.cap[e] -= pushed
                    self.cap[e ^ 1] += pushed
                return pushed
            edges = self.head[u]
            while it[u] < len(edges):
                e = edges[it[u]]
                if self.cap[e] > eps and level[self.to[e]] == level[u] + 1:
                    break
                it[u] += 1
            if it[u] < len(edges):
                e = edges[it[u]]
                stack.append(self.to[e])
                path.append(e)
            else:
                level[u] = -1  # dead end in this phase
                stack.pop()
                if path:
                    path.pop()
                    it[stack[-1]] += 1
        return 0.0

    def source_side(self, s: int, eps: float) -> List[bool]:
        seen = [False] * self.n
        seen[s] = True
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in self.head[u]:
                if self.cap[e] > eps and not seen[self.to[e]]:
                    seen[self.to[e]] = True
                    queue.append(self.to[e])
        return seen


def min_cut_plan(p: Problem, cost_weight: float, bytes_weight: float,
                 fix: Optional[Dict[int, bool]] = None) -> Optional[List[bool]]:
    """The plan minimising cost_weight * cost + bytes_weight * bytes exactly, with the values in `fix` fixed to
    recompute (True) or not (False); None if every such plan is invalid."""
    fix = fix or {}
    n = len(p)
    s, t = 0, 1
    finite = [cost_weight * c for c in p.cost] + [bytes_weight * b for b in p.nbytes if math.isfinite(b)]
    inf = 2.0 * sum(finite) + 1.0
    eps = 1e-12 * max([w for w in finite if w > 0], default=1.0)
    aux = []  # (value, user list) pairs that need an "any user recomputed" vertex
    for v in range(n):
        if not p.bw_used[v] and len(p.users[v]) > 1 and 0 < p.nbytes[v] < math.inf:
            aux.append(v)
    net = _FlowNetwork(2 + n + len(aux))
    x = lambda v: 2 + v  # noqa: E731  (vertex of value v: source side = recomputed)
    for v in range(n):
        if p.pinned[v] or fix.get(v) is False:
            net.add(x(v), t, inf)
        elif fix.get(v) is True:
            net.add(s, x(v), inf)
        elif p.cost[v] > 0:
            net.add(x(v), t, cost_weight * p.cost[v])
        b = p.nbytes[v]
        if b == 0:
            continue
        w = inf if math.isinf(b) else bytes_weight * b
        if p.bw_used[v]:
            net.add(s, x(v), w)  # saved unless recomputed
        elif math.isinf(b) or len(p.users[v]) == 1:
            for u in p.users[v]:
                net.add(x(u), x(v), w)  # a recomputed user needs v: recompute it or pay to save it
    for k, v in enumerate(aux):
        a = 2 + n + k
        for u in p.users[v]:
            net.add(x(u), a, inf)
        net.add(a, x(v), bytes_weight * p.nbytes[v])
    flow = net.max_flow(s, t, eps)
    if flow >= inf:
        return None
    side = net.source_side(s, eps)
    return normalise(p, [side[x(v)] for v in range(n)])


# ------------------------------------------------------------------------------------------------- the search

@dataclass
class Solution:
    plan: Evaluation
    feasible: bool                 # the plan's bytes are within the budget
    fastest: Evaluation            # the least-recompute plan (what the budget is compared with)
    smallest: Evaluation           # the fewest-bytes plan (the floor no budget can go under)
    optimal: bool = True           # proven: no plan within the budget recomputes for less
    lower_bound: float = 0.0       # Lagrangian bound on the cost of any plan within the budget
    hull: List[Tuple[float, float]] = field(default_factory=list)  # (bytes, cost) of the hull plans visited
    search_nodes: int = 0


def solve(p: Problem, budget: float) -> Solution:
    """The cheapest plan whose saved bytes are at most `budget` (or the smallest plan, marked infeasible).

    Exact when `optimal` comes back True: branch and bound over the values, each branch bounded by its Lagrangian
    dual (the hull search below); the node limit scales inversely with the graph size, and a graph too large to
    finish keeps the best plan found by the greedy fill / repair / local search and the branches explored."""
    root = _bound(p, budget, {})
    if root is None:
        raise ValueError("no valid remat plan: a value the backward needs can be neither saved nor recomputed")
    fastest, smallest = root.fastest, root.smallest
    if smallest.nbytes > budget:
        return Solution(smallest, False, fastest, smallest, True, smallest.cost, root.hull)
    if fastest.nbytes <= budget:
        return Solution(fastest, True, fastest, smallest, True, fastest.cost, root.hull)
    # Incumbent: two ways into the gap between the hull plans (fill what `hi` leaves, or repair `lo`), polished.
    best, _ = _greedy_fill(p, root.hi, budget)
    n_free = len(p.free_variables())
    repaired = _greedy_repair(p, root.lo, budget) if n_free <= REPAIR_MAX_VALUES else None
    if repaired is not None and repaired.cost < best.cost:
        best = repaired
    if n_free <= LOCAL_SEARCH_MAX_VALUES:
        best, _ = _local_search(p, best, budget)
    best, complete, nodes = _branch_and_bound(p, budget, root, best)
    lower = best.cost if complete else min(root.lower_bound, best.cost)  # a finished search is its own proof
    return Solution(best, True, fastest, smallest, complete, lower, root.hull, nodes)


def solve_priced(p: Problem, seconds_per_byte: float) -> Solution:
    """The plan minimising recompute seconds + `seconds_per_byte` x saved bytes, with no budget: what keeping a byte
    costs is priced in the same seconds as recomputing it. One min cut, so exact for that objective."""
    root = _bound(p, math.inf, {})
    if root is None:
        raise ValueError("no valid remat plan: a value the backward needs can be neither saved nor recomputed")
    x = min_cut_plan(p, 1.0, seconds_per_byte)
    plan = evaluate(p, x) if x is not None else root.fastest
    return Solution(plan, True, root.fastest, root.smallest, True, plan.cost, root.hull)


# Branch-and-bound work limit, in (search nodes x problem values): small graphs are solved exactly, large ones get a
# few branches on top of the heuristics (each node costs a handful of min cuts).
SEARCH_WORK = 6_000


@dataclass
class _Bound:
    fastest: Evaluation
    smallest: Evaluation
    lo: Evaluation                 # over the budget (== fastest when that fits)
    hi: Evaluation                 # within the budget (== smallest when nothing fits)
    lower_bound: float             # no plan of this branch within the budget costs less
    hull: List[Tuple[float, float]]


def _bound(p: Problem, budget: float, fix: Dict[int, bool]) -> Optional[_Bound]:
    """Lagrangian dual of one branch (values in `fix` fixed): the Eisner-Severance walk along the lower hull of
    (bytes, cost) until the two plans that bracket the budget are hull neighbours. None: the branch has no plan."""
    total_cost = sum(p.cost) + 1.0
    total_bytes = sum(b for b in p.nbytes if math.isfinite(b)) + 1.0
    # Lexicographic objectives by weighting: the tie-break term stays below one unit of the main term.
    fastest_x = min_cut_plan(p, 1.0, 1e-9 * _min_positive(p.cost) / total_bytes, fix)
    smallest_x = min_cut_plan(p, 1e-9 / total_cost, 1.0, fix)
    if fastest_x is None or smallest_x is None:
        return None
    fastest, smallest = evaluate(p, fastest_x), evaluate(p, smallest_x)
    hull = [(fastest.nbytes, fastest.cost), (smallest.nbytes, smallest.cost)]
    if fastest.nbytes <= budget:
        return _Bound(fastest, smallest, fastest, fastest, fastest.cost, hull)
    if smallest.nbytes > budget:
        return _Bound(fastest, smallest, smallest, smallest, math.inf, hull)
    lo, hi = fastest, smallest
    lower = 0.0
    for _ in range(64):
        lam = max(hi.cost - lo.cost, 0.0) / max(lo.nbytes - hi.nbytes, 1e-30)
        x = min_cut_plan(p, 1.0, lam, fix)
        mid = evaluate(p, x) if x is not None else hi
        lower = max(lower, min(mid.objective(lam), lo.objective(lam), hi.objective(lam)) - lam * budget)
        best_end = min(lo.objective(lam), hi.objective(lam))
        if mid.objective(lam) >= best_end - 1e-9 * max(abs(best_end), 1e-30) \
                or mid.recompute in (lo.recompute, hi.recompute):
            break  # lo and hi are hull neighbours: the dual optimum is at this lam
        hull.append((mid.nbytes, mid.cost))
        if mid.nbytes <= budget:
            hi = mid
        else:
            lo = mid
    return _Bound(fastest, smallest, lo, hi, lower, hull)


def _branch_and_bound(p: Problem, budget: float, root: _Bound,
                      incumbent: Evaluation) -> Tuple[Evaluation, bool, int]:
    """Depth-first branch and bound on single values; returns (best plan, proven optimal, nodes explored)."""
    free = p.free_variables()
    max_nodes = max(1, SEARCH_WORK // max(len(p), 1))
    best = incumbent
    stack: List[Tuple[Dict[int, bool], Optional[_Bound]]] = [({}, root)]
    nodes = 0
    while stack:
        if nodes >= max_nodes:
            return best, False, nodes
        fix, bound = stack.pop()
        bound = bound if bound is not None else _bound(p, budget, fix)
        nodes += 1
        if bound is None:
            continue
        for plan in (bound.hi, bound.fastest):
            if plan.nbytes <= budget and plan.cost < best.cost:
                best = plan
        if bound.lower_bound >= best.cost - 1e-9 * max(best.cost, 1e-30):
            continue
        split = [v for v in free if v not in fix and bound.lo.recompute[v] != bound.hi.recompute[v]]
        split = split or [v for v in free if v not in fix]
        if not split:
            continue
        v = max(split, key=lambda u: (p.nbytes[u], p.cost[u]))
        stack.append(({**fix, v: bound.lo.recompute[v]}, None))
        stack.append(({**fix, v: bound.hi.recompute[v]}, None))  # explored first: next to the feasible plan
    return best, True, nodes


def _greedy_repair(p: Problem, start: Evaluation, budget: float, keep: int = -1) -> Optional[Evaluation]:
    """Recompute more values (not `keep`), most bytes freed per second first, until the plan fits (None if it
    never does)."""
    x = list(start.recompute)
    current = start
    while current.nbytes > budget:
        best, best_key = None, None
        for v in range(len(p)):
            if x[v] or p.pinned[v] or math.isinf(p.nbytes[v]) or v == keep:
                continue
            trial = evaluate(p, normalise(p, x[:v] + [True] + x[v + 1:]))
            freed = current.nbytes - trial.nbytes
            if freed <= 0:
                continue
            key = (trial.nbytes > budget, (trial.cost - current.cost) / freed)
            if best_key is None or key < best_key:
                best, best_key = trial, key
        if best is None:
            return None
        x, current = best.recompute, best
    return current


def _local_search(p: Problem, start: Evaluation, budget: float) -> Tuple[Evaluation, int]:
    """Improve a plan by flipping one or two free values at a time while it stays within the budget."""
    free = p.free_variables()
    current, moves = start, 0
    improved = True
    while improved:
        improved = False
        for i, v in enumerate(free):
            for w in [None] + free[i + 1:]:
                x = list(current.recompute)
                x[v] = not x[v]
                if w is not None:
                    x[w] = not x[w]
                trial = evaluate(p, normalise(p, x))
                if trial.nbytes > budget and w is None:
                    # Un-recomputing v broke the budget: pay it back with the cheapest recomputes elsewhere.
                    trial = _greedy_repair(p, trial, budget, keep=v) or trial
                if trial.nbytes <= budget and trial.cost < current.cost * (1 - 1e-12) - 1e-30:
                    current, moves, improved = trial, moves + 1, True
    return current, moves


def _min_positive(values: Sequence[float]) -> float:
    return min((v for v in values if v > 0), default=1.0)


def _greedy_fill(p: Problem, start: Evaluation, budget: float) -> Tuple[Evaluation, int]:
    """Un-recompute values while the budget allows, best seconds-saved per byte first."""
    x = list(start.recompute)
    current = start
    moves = 0
    while True:
        slack = budget - current.nbytes
        best, best_key = None, None
        for v in range(len(p)):
            if not x[v] or p.cost[v] <= 0 or math.isinf(p.nbytes[v]):
                continue
            delta = _delta_bytes_if_computed_once(p, x, v)
            if delta > slack:
                continue
            key = (delta > 0, -p.cost[v] / delta if delta > 0 else -p.cost[v])
            if best_key is None or key < best_key:
                best, best_key = v, key
        if best is None:
            return current, moves
        x[best] = False
        x = normalise(p, x)
        trial = evaluate(p, x)
        if trial.nbytes > budget or trial.cost >= current.cost:
            return current, moves  # the local estimate was off (a shared input): stop where we were
        current, moves = trial, moves + 1


def _delta_bytes_if_computed_once(p: Problem, x: Sequence[bool], v: int) -> float:
    """Bytes saved after minus before, if recomputed value v were computed in the forward only."""
    delta = p.nbytes[v] if (p.bw_used[v] or any(x[u] for u in p.users[v] if u != v)) else 0.0
    for w in set(p.inputs[v]):
        if x[w] or p.bw_used[w]:
            continue
        if not any(x[u] for u in p.users[w] if u != v):
            delta -= p.nbytes[w]  # w was saved only for v's recompute
    return delta
