"""remat: the partitioner never changes results, respects its budget, finds the brute-force optimum on small
graphs, never recomputes random ops, and declines what it does not understand."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._functorch.partitioners import default_partition

from flashfx._compat import boxed_graph_module

from flashfx.config import Config
from flashfx.passes import remat, remat_plan
from flashfx.passes.remat_plan import Problem, evaluate, normalise, solve


# ------------------------------------------------------------------------------------------------- models

class MLP(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64, p: float = 0.0) -> None:
        super().__init__()
        self.up, self.norm, self.down, self.p = nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, d), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.norm(F.gelu(self.up(x))), self.p, self.training)
        return torch.tanh(self.down(h) * 2.0) + x


class Block(nn.Module):
    """Pre-norm causal transformer block with attention written out (so softmax and the masks are ATen ops)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        attn = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        h = x + self.proj((attn @ v).transpose(1, 2).reshape(b, s, d))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


def stack(make, depth: int) -> nn.Module:
    """`depth` layers in a row: saved activations grow with depth, weight gradients stay small, so the predicted peak
    (saved activations are freed in the backward as it goes) sits where remat can lower it."""
    return nn.Sequential(*[make() for _ in range(depth)])


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.mlp, x, use_reentrant=False)


def _inputs(shape=(2, 16, 32)) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


# ------------------------------------------------------------------------------------------------- harness

def _compile(model: nn.Module, config: Config | None, dynamic: bool = False):
    """torch.compile through AOTAutograd with flashfx's partitioner (or the default one when config is None);
    returns the compiled model, the plan records and the last forward/backward graphs."""
    records: list = []
    graphs: dict = {}
    partition = remat.make_partition_fn(config, records) if config is not None else default_partition

    def keep(stage):
        def compile_stage(gm, _inputs):
            graphs[stage] = gm
            return boxed_graph_module(gm)  # as flashfx's compiler: inputs freed at their last use
        return compile_stage

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                                     partition_fn=partition)

    return torch.compile(model, backend=backend, dynamic=dynamic), records, graphs


def _step(fn, model: nn.Module, x: torch.Tensor, seed: int = 1):
    """Output and every gradient (parameters, then the input) of one forward + backward."""
    for p in model.parameters():
        p.grad = None
    x.grad = None
    torch.manual_seed(seed)
    out = fn(x)
    weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)  # a non-uniform upstream gradient
    (out * weights).sum().backward()
    return [out.detach().clone()] + [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


def _saved_activation_bytes(fw: torch.fx.GraphModule, num_user_outputs: int = 1) -> int:
    """What the forward graph really returns for the backward, graph inputs (primals) excluded."""
    outs = list(fw.graph.find_nodes(op="output")[0].args[0])[num_user_outputs:]
    return sum(remat._bytes_of(o) for o in outs if isinstance(o, torch.fx.Node) and o.op != "placeholder"
               and isinstance(o.meta.get("val"), torch.Tensor))


def _analysis_of(model: nn.Module, x: torch.Tensor, compress=None) -> "remat._Analysis":
    found = []

    def partition(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        found.append(remat._analyse(joint, num_fwd_outputs, compress))
        return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

    def backend(gm, example_inputs):
        boxed = lambda g, _inputs: make_boxed_func(g)  # noqa: E731
        return aot_module_simplified(gm, example_inputs, fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition)

    torch.compile(model, backend=backend)(x).sum().backward()
    assert len(found) == 1
    return found[0]


def brute_force(p: Problem, budget: float):
    """The cheapest plan within `budget` by enumerating every choice of the free values."""
    free = p.free_variables()
    assert len(free) <= 16, f"{len(free)} free values is too many to enumerate"
    best = None
    for mask in range(1 << len(free)):
        x = [False] * len(p)
        for k, v in enumerate(free):
            x[v] = bool(mask >> k & 1)
        ev = evaluate(p, normalise(p, x))
        if ev.nbytes <= budget and (best is None or ev.cost < best.cost):
            best = ev
    return best


# ------------------------------------------------------------------------------------------------- numerics

BUDGETS = [1.0, 0.5, 0.1, 1e-6, 4096, "auto", "speed"]


@pytest.mark.parametrize("budget", BUDGETS, ids=[str(b) for b in BUDGETS])
@pytest.mark.parametrize("make", [MLP, Block], ids=["mlp", "block"])
def test_remat_never_changes_results(make, budget):
    model, x = make(), _inputs()
    want = _step(model, model, x)
    compiled, records, graphs = _compile(model, Config(remat=budget))
    got = _step(compiled, model, x)
    _assert_same(got, want)
    (plan,) = records
    assert plan.status == "applied", plan.reason
    assert plan.activation_bytes <= plan.budget_bytes
    assert plan.activation_bytes <= plan.activation_bytes_no_remat
    # The prediction is what the forward graph really hands to the backward.
    assert _saved_activation_bytes(graphs["forward"]) == plan.activation_bytes
    if budget in (1.0, "auto"):  # CPU: "auto" has no free-memory query and keeps everything
        assert plan.recomputed == [] and plan.extra_flops == 0
        assert plan.activation_bytes == plan.activation_bytes_no_remat
    if budget == 1e-6:
        assert plan.activation_bytes == plan.min_activation_bytes == 0  # everything recomputed from the inputs
        assert plan.extra_flops > 0
    assert plan.solver["optimal"]
    assert set(plan.as_dict()) >= {"saved", "recomputed", "activation_bytes", "activation_bytes_no_remat",
                                   "budget_bytes", "extra_flops", "peak_bytes"}
    assert "saves" in plan.text()
    json.dumps(plan.as_dict())  # goes into the JSON report as is


def test_smaller_budgets_save_less_and_recompute_more():
    x = _inputs()
    plans = []
    for budget in (1.0, 0.6, 0.3, 1e-6):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Block()
        compiled, records, _ = _compile(model, Config(remat=budget))
        _step(compiled, model, x)
        plans.append(records[0])
    saved = [p.activation_bytes for p in plans]
    flops = [p.extra_flops for p in plans]
    assert saved == sorted(saved, reverse=True) and saved[0] > saved[-1]
    assert flops == sorted(flops) and flops[0] == 0 < flops[-1]


def test_cheap_pointwise_values_are_recomputed_before_matmuls():
    # Realistic sizes (a GPT-2-medium-wide block, 2048 tokens) on the meta device: only the plan is computed.
    model = Block(d=1024, heads=8).to("meta")
    a = _analysis_of(model, torch.randn(4, 512, 1024, device="meta", requires_grad=True))
    p = a.problem
    baseline = evaluate(a.raw, normalise(a.raw, [v not in a.fwd_required for v in range(len(p))]))
    plan = solve(p, 0.8 * baseline.nbytes).plan
    recomputed = {p.names[v] for v in range(len(p)) if plan.recompute[v] and p.cost[v] > 0}
    assert recomputed == {"gelu"}  # 20% of the bytes: the MLP activation, recomputed from the saved fc output
    everything = solve(p, 0.0).plan
    assert {"addmm", "bmm", "_softmax"} <= {p.names[v] for v in range(len(p)) if everything.recompute[v]}


def test_dynamic_sizes():
    model, x = MLP(), _inputs()
    want = _step(model, model, x)
    compiled, records, graphs = _compile(model, Config(remat=0.3), dynamic=True)
    _assert_same(_step(compiled, model, x), want)
    values = [n.meta.get("val") for n in graphs["forward"].graph.find_nodes(op="placeholder")]
    assert any(isinstance(v, torch.SymInt) for v in values)  # really symbolic: the sizes are graph inputs
    assert _saved_activation_bytes(graphs["forward"]) == records[0].activation_bytes
    x2 = _inputs((3, 5, 32))
    _assert_same(_step(compiled, model, x2), _step(model, model, x2))
    assert records and all(p.status == "applied" for p in records)
    assert records[0].extra_flops > 0


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_zoo_models_train_the_same(name):
    zoo = pytest.importorskip("flashfx.zoo")
    model, inputs = zoo.build(name, labels=True)
    model.train()  # gpt2 has dropout: the reference is the default partition under the same seed
    params = [p for p in model.parameters() if p.requires_grad]

    def step(fn):
        torch.manual_seed(7)
        loss = fn(**inputs)
        return [loss.detach()] + list(torch.autograd.grad(loss, params))

    reference, _, _ = _compile(model, None)
    want = step(reference)
    torch._dynamo.reset()
    compiled, records, _ = _compile(model, Config(remat=0.2))
    _assert_same(step(compiled), want)
    (plan,) = records
    assert plan.status in ("applied", "over_budget") and plan.extra_flops > 0
    assert plan.activation_bytes <= max(plan.budget_bytes, plan.min_activation_bytes)
    # the tiny models' peak is at the end of the backward (the weight gradients, vocab-sized ones first), where
    # saved activations are already freed: remat cannot lower it, only must not raise it
    assert plan.activation_bytes < plan.activation_bytes_no_remat and plan.peak_bytes <= plan.peak_bytes_no_remat


# ------------------------------------------------------------------------------------------------- the solver

@pytest.mark.parametrize("make", [MLP, lambda: MLP(p=0.3)], ids=["mlp", "mlp_dropout"])
def test_plan_is_the_brute_force_optimum_on_model_graphs(make):
    model = make()
    a = _analysis_of(model, _inputs())
    p = a.problem
    fastest = solve(p, math.inf).plan
    smallest = solve(p, 0.0).smallest
    for f in (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0):
        budget = smallest.nbytes + f * (fastest.nbytes - smallest.nbytes)
        got = solve(p, budget)
        want = brute_force(p, budget)
        assert got.plan.nbytes <= budget
        assert got.plan.cost == pytest.approx(want.cost, rel=1e-9, abs=1e-15), (f, got.plan, want)
        assert got.optimal


def _random_problem(rng: random.Random, n: int) -> Problem:
    inputs = [sorted(rng.sample(range(v), min(v, rng.choice([0, 1, 1, 2, 3])))) for v in range(n)]
    cost = [0.0 if rng.random() < 0.2 else rng.uniform(0.1, 10.0) for _ in range(n)]
    pinned = [rng.random() < 0.1 for _ in range(n)]
    nbytes = [math.inf if rng.random() < 0.15 and not pinned[v] else float(rng.randint(1, 100)) for v in range(n)]
    bw_used = [rng.random() < 0.4 for _ in range(n)]
    return Problem([f"v{v}" for v in range(n)], cost, [1] * n, nbytes, inputs, bw_used, pinned)


def test_plan_is_the_brute_force_optimum_on_random_graphs():
    rng = random.Random(0)
    checked = 0
    for _ in range(60):
        p = _random_problem(rng, rng.randint(4, 11))
        try:
            top = solve(p, math.inf)
        except ValueError:
            continue  # a needed value that is both pinned-out and unsaveable: no plan exists
        lo, hi = top.smallest.nbytes, top.fastest.nbytes
        for f in (0.0, 0.3, 0.7):
            budget = lo + f * (hi - lo)
            got, want = solve(p, budget), brute_force(p, budget)
            assert remat_plan.valid(p, got.plan.recompute)
            assert got.plan.nbytes <= budget
            assert got.plan.cost == pytest.approx(want.cost, rel=1e-9, abs=1e-12)
            assert got.optimal and got.lower_bound <= want.cost + 1e-9
            checked += 1
    assert checked > 100


def brute_force_priced(p: Problem, seconds_per_byte: float):
    best = None
    free = p.free_variables()
    for mask in range(1 << len(free)):
        x = [False] * len(p)
        for k, v in enumerate(free):
            x[v] = bool(mask >> k & 1)
        ev = evaluate(p, normalise(p, x))
        if math.isfinite(ev.nbytes) and (best is None or ev.objective(seconds_per_byte) <
                                         best.objective(seconds_per_byte)):
            best = ev
    return best


def test_speed_plan_is_the_brute_force_optimum_of_recompute_plus_priced_bytes():
    rng = random.Random(1)
    checked = 0
    for _ in range(60):
        p = _random_problem(rng, rng.randint(4, 11))
        for price in (0.001, 0.05, 1.0):
            try:
                got = remat_plan.solve_priced(p, price)
            except ValueError:
                break  # no plan exists for this problem
            want = brute_force_priced(p, price)
            assert remat_plan.valid(p, got.plan.recompute)
            assert got.plan.objective(price) == pytest.approx(want.objective(price), rel=1e-9, abs=1e-12)
            checked += 1
    assert checked > 100


def test_speed_recomputes_more_as_bytes_get_dearer():
    a = _analysis_of(MLP(), _inputs())
    plans = [remat_plan.solve_priced(a.problem, price).plan for price in (0.0, remat.SAVED_BYTE_SECONDS, 1.0)]
    assert plans[0].nbytes >= plans[1].nbytes >= plans[2].nbytes
    assert plans[0].cost <= plans[1].cost <= plans[2].cost
    assert plans[2].nbytes == remat_plan.solve(a.problem, 0.0).smallest.nbytes


def test_speed_with_fusion_costs_pointwise_recomputes_at_their_flops_only():
    # with fusion on, a pointwise / reduction recompute runs inside a backward kernel: its cost is its FLOPs; a
    # matmul keeps its roofline (a kernel of its own)
    a = _analysis_of(MLP(), _inputs())
    fused = remat._fused_recompute(a)
    for v, node in enumerate(a.nodes):
        if a.problem.cost[v] == 0.0 or remat._tensor_core(node):
            assert fused.cost[v] == a.problem.cost[v]
        else:
            assert fused.cost[v] == a.problem.flops[v] / remat.VECTOR_FLOPS_PER_S <= a.problem.cost[v]
    assert any(remat._tensor_core(n) for n in a.nodes) and any(not remat._tensor_core(n) for n in a.nodes)

    model, x = Block(), _inputs((4, 32, 32))
    want = _step(model, model, x)
    compiled, records, _ = _compile(model, Config(remat="speed"))
    _assert_same(_step(compiled, model, x), want)
    (plan,) = records
    assert plan.recomputed and plan.activation_bytes < plan.activation_bytes_no_remat
    assert any(note.startswith("speed:") and "fused into the backward" in note for note in plan.notes)
    # without fusion a recompute is a kernel of its own (roofline bytes): the plan recomputes less, saves more
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    compiled, unfused, _ = _compile(model, Config(remat="speed", fusion=False))
    _step(compiled, model, x)
    assert unfused[0].activation_bytes >= plan.activation_bytes


def test_infeasible_budget_returns_the_smallest_plan():
    # v0 (pinned, 50 B) feeds v1 which the backward reads: v0 must be saved whatever the budget.
    p = Problem(["v0", "v1"], [1.0, 1.0], [1, 1], [50.0, 80.0], [[], [0]], [False, True], [True, False])
    s = solve(p, 10.0)
    assert not s.feasible and s.plan.nbytes == 50.0 and s.plan.recompute == [False, True]


# ------------------------------------------------------------------------------------------------- safety

def test_dropout_is_never_recomputed():
    model, x = MLP(p=0.5), _inputs()
    reference, _, _ = _compile(model, None)
    want = _step(reference, model, x, seed=3)
    torch._dynamo.reset()
    compiled, records, graphs = _compile(model, Config(remat=1e-6))
    got = _step(compiled, model, x, seed=3)
    _assert_same(got, want)
    (plan,) = records
    assert plan.status == "over_budget"
    assert "native_dropout" in plan.reason and "cannot be recomputed" in plan.reason
    random_ops = [n for n in graphs["backward"].graph.nodes
                  if isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags]
    assert random_ops == []
    assert plan.activation_bytes == plan.min_activation_bytes > 0
    assert any(n.startswith("getitem") for n, _ in plan.saved)  # the dropout output and mask
    assert plan.extra_flops > 0  # everything else is recomputed


def test_buffer_mutations_stay_exact():
    # BatchNorm in training updates its running statistics: the update must happen once, in the forward.
    model = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(32, 32))
    x = _inputs()
    reference = [b.clone() for b in model.buffers()]
    want = _step(model, model, x)
    want_buffers = [b.clone() for b in model.buffers()]
    for b, r in zip(model.buffers(), reference):
        b.copy_(r)
    compiled, records, _ = _compile(model, Config(remat=1e-6))
    _assert_same(_step(compiled, model, x), want)
    _assert_same([b.float() for b in model.buffers()], [b.float() for b in want_buffers])
    (plan,) = records
    assert plan.status == "over_budget" and "an input the step mutates" in plan.reason  # the norm is not recomputed
    assert plan.extra_flops > 0  # the linears around it are


def test_activation_checkpoint_tags_decline_to_the_default_partition():
    model, x = Checkpointed(), _inputs()
    want = _step(model, model, x)
    compiled, records, _ = _compile(model, Config(remat=0.5))
    _assert_same(_step(compiled, model, x), want)
    (plan,) = records
    assert plan.status == "declined" and "checkpoint" in plan.reason
    assert "declined" in plan.text()


def test_remat_lowers_the_predicted_peak():
    # not a budget near 0: saving nothing makes the backward recompute the whole chain, holding it all again
    model, x = stack(lambda: MLP(d=64, hidden=256), 4), _inputs((4, 32, 64))
    compiled, records, _ = _compile(model, Config(remat=0.3))
    _step(compiled, model, x)
    (plan,) = records
    assert 0 < plan.peak_bytes < plan.peak_bytes_no_remat


def _measured_step_peak(fw, bw) -> int:
    """Measured peak of one forward (fresh random inputs) and the backward that takes its saved tensors."""
    args = [torch.randn(tuple(n.meta["val"].shape)) for n in fw.graph.find_nodes(op="placeholder")]
    fw_peak, outs = _measured_peak(fw, [args])
    outs = list(outs)
    saved_nodes = list(fw.graph.find_nodes(op="output")[0].args[0])[1:]
    held = sum(t.untyped_storage().nbytes() for t, n in zip(outs[1:], saved_nodes) if n.op != "placeholder")
    bw_args = outs[1:] + [torch.randn_like(outs[0])]
    del outs  # the backward's list holds the only references, as autograd hands them over
    bw_peak, _ = _measured_peak(bw, [bw_args])  # frees of saved tensors count negative against `held`
    return max(fw_peak, held + bw_peak)


def _measured_peak(fn, args) -> tuple:
    """Peak bytes the CPU allocator hands out while `fn(*args)` runs (the profiler's per-op allocations and frees).
    The garbage collector is kept out of the window, so that another test's leftover tensors freed there cannot
    count against this one's."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*args)
    finally:
        gc.enable()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, out


@pytest.mark.parametrize("budget", [1.0, 0.3, 1e-6])
@pytest.mark.parametrize("make", [Block, lambda: MLP(d=64, hidden=256)], ids=["block", "mlp"])
def test_predicted_peak_is_the_measured_peak(make, budget):
    model = make()
    compiled, records, graphs = _compile(model, Config(remat=budget))
    _step(compiled, model, _inputs((4, 32, model.up.in_features if isinstance(model, MLP) else 32)))
    fw, bw = graphs["forward"], graphs["backward"]  # boxed: each takes one list, empties it, frees inputs early
    # The profiler's per-op accounting of one step varies from run to run, always downwards (30 repeats of the
    # MLP at 0.3: 25 equal to the prediction, 5 lower by one to three tensors, none higher; why, not found). The
    # peak is the largest of five measurements.
    measured = max(_measured_step_peak(fw, bw) for _ in range(5))
    # The model counts graph values, not an op's internal scratch (CPU bmm copies a transposed operand), and the
    # CPU kernels chosen for the batched matmuls differ between machines: CI's runner measured the block at 0.3 one
    # 4 KiB tensor below the prediction in all five measurements, where ours match it exactly, and later the MLP at
    # 1e-6 one 64 KiB activation below (558080 vs 623616 bytes). Either way the difference is at most one
    # temporary, at most the largest tensor of the graphs.
    largest = max(remat._bytes_of(n) for g in (fw, bw) for n in g.graph.nodes if n.op == "call_function")
    predicted = records[0].peak_bytes
    assert abs(measured - predicted) <= largest, (predicted, measured, largest)
    if isinstance(model, MLP):  # no batched matmul on transposed operands, no scratch: never above the model
        assert measured <= predicted, (predicted, measured)


def test_recomputed_values_move_next_to_their_first_use():
    graph = torch.fx.Graph()
    a = graph.placeholder("primals_1")
    tangent = graph.placeholder("tangents_1")
    recomputed = graph.call_function(torch.ops.aten.relu.default, (a,))
    g1 = graph.call_function(torch.ops.aten.mul.Tensor, (tangent, 2.0))
    g2 = graph.call_function(torch.ops.aten.mul.Tensor, (g1, recomputed))
    graph.output((g2,))
    bw = torch.fx.GraphModule(torch.nn.Module(), graph)
    remat._schedule_recompute_late(bw)
    assert [n.name for n in bw.graph.nodes if n.op == "call_function"] == [g1.name, recomputed.name, g2.name]
    t = torch.randn(5)
    torch.testing.assert_close(bw(t, t)[0], t * 2.0 * t.relu())


def test_auto_picks_the_fastest_plan_that_fits_the_free_memory(monkeypatch):
    x = _inputs((4, 32, 32))
    peaks = {}
    for budget in (1.0, 0.3):
        torch._dynamo.reset()
        model = stack(Block, 3)
        compiled, records, _ = _compile(model, Config(remat=budget))
        _step(compiled, model, x)
        peaks[budget] = records[0].peak_bytes
    assert peaks[0.3] < peaks[1.0]
    free = (peaks[1.0] + peaks[0.3]) / 2 / remat.AUTO_HEADROOM
    monkeypatch.setattr(remat, "_free_bytes", lambda device: int(free))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = stack(Block, 3)
    want = _step(model, model, x)
    compiled, records, _ = _compile(model, Config(remat="auto"))
    _assert_same(_step(compiled, model, x), want)
    (plan,) = records
    assert plan.peak_bytes <= remat.AUTO_HEADROOM * free
    assert 0 < plan.extra_flops and plan.activation_bytes > plan.min_activation_bytes  # not more than needed
    assert any(note.startswith("auto: free memory") for note in plan.notes)


def test_an_int_budget_is_a_byte_count():
    model, x = MLP(), _inputs()
    compiled, records, _ = _compile(model, Config(remat=1024))
    _step(compiled, model, x)
    (plan,) = records
    assert plan.budget_bytes == 1024


def test_make_partition_fn_needs_a_budget():
    with pytest.raises(ValueError, match="remat"):
        remat.make_partition_fn(Config(), [])


def test_flashfx_attention_is_recomputed_only_without_dropout():
    pytest.importorskip("flashfx.codegen.attention")
    from flashfx.compiler import Compiler

    op = torch.ops.flashfx.attention_fwd.default
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    with_dropout = graph.call_function(op, (q, q, q, None, False, None, 0.1))
    without = graph.call_function(op, (q, q, q, None, True, None, 0.0))
    assert "random" in remat._pin_reason(with_dropout, {}, {}, True)
    assert remat._pin_reason(without, {}, {}, True) is None
    assert "no registered cost" in remat._pin_reason(without, {}, {}, False)

    model, x = Block(), _inputs()
    want = _step(model, model, x)
    backend = Compiler(Config(remat=1e-6, fusion=False, attention="exact", cross_entropy=False))
    _assert_same(_step(torch.compile(model, backend=backend), model, x), want, rtol=1e-4, atol=1e-5)
    (plan,) = [p for report in backend.reports for p in report.remat]
    assert plan.status == "applied" and "attention_fwd" in {n for n, _ in plan.recomputed}


# ------------------------------------------------------------------------------------------------- fp8

@pytest.mark.skipif(getattr(torch, "float8_e4m3fn", None) is None, reason="no float8_e4m3fn in this torch")
def test_fp8_saved_activations():
    model, x = MLP(d=64, hidden=128), _inputs((2, 32, 64))
    want = _step(model, model, x)
    compiled, records, graphs = _compile(model, Config(remat=1.0, remat_compress="fp8"))
    got = _step(compiled, model, x)
    (plan,) = records
    assert plan.compressed and plan.compress == "fp8"
    assert any("fp8" in note for note in plan.notes)
    assert plan.activation_bytes < plan.activation_bytes_no_remat / 2  # 1 byte per element instead of 4
    saved_dtypes = {o.meta["val"].dtype for o in graphs["forward"].graph.find_nodes(op="output")[0].args[0][1:]
                    if isinstance(o.meta.get("val"), torch.Tensor)}
    assert torch.float8_e4m3fn in saved_dtypes
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)  # the forward is exact
    for g, w in zip(got[1:], want[1:]):  # gradients see fp8 activations: close, not equal
        rel = ((g - w).norm() / w.norm()).item()
        assert rel < 0.15, rel  # e4m3 keeps 3 mantissa bits; measured up to 0.095 here
    assert any(not torch.equal(g, w) for g, w in zip(got[1:], want[1:]))


@pytest.mark.skipif(getattr(torch, "float8_e4m3fn", None) is None, reason="no float8_e4m3fn in this torch")
def test_fp8_with_recompute_from_compressed_values():
    model, x = Block(d=64), _inputs((2, 32, 64))
    want = _step(model, model, x)
    compiled, records, _ = _compile(model, Config(remat=0.2, remat_compress="fp8"))
    got = _step(compiled, model, x)
    (plan,) = records
    assert plan.compressed and plan.recomputed and plan.activation_bytes <= plan.budget_bytes
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:], want[1:]):
        assert ((g - w).norm() / w.norm()).item() < 0.15


# ------------------------------------------------------------------------------------------------- the compiler

def test_through_the_flashfx_backend():
    from flashfx.compiler import Compiler

    model, x = Block(), _inputs()
    want = _step(model, model, x)
    backend = Compiler(Config(remat=0.3, fusion=False, attention="off", cross_entropy=False))
    compiled = torch.compile(model, backend=backend)
    _assert_same(_step(compiled, model, x), want)
    plans = [p for report in backend.reports for p in report.remat]
    assert len(plans) == 1 and plans[0].status == "applied" and plans[0].extra_flops > 0
