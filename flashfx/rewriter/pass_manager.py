"""Runs graph passes in order: lint after each, time each, count what each did, and in debug mode
find the first pass whose output diverges from its input."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from flashfx.config import Config
from flashfx.rewriter import cost as cost_model


@dataclass
class Declined:
    """A near-miss: a site a pass recognised but could not prove safe to rewrite."""

    node: str
    reason: str

    def as_dict(self) -> Dict[str, str]:
        return {"node": self.node, "reason": self.reason}


@dataclass
class PassContext:
    """What a pass may read and where it records what it did."""

    config: Config
    example_inputs: Sequence[Any] = ()
    stage: str = "torch"  # "torch" (Dynamo graph), "forward" / "backward" / "inference" (ATen graphs)
    counters: Dict[str, int] = field(default_factory=dict)
    declined: List[Declined] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # Named outputs a pass leaves for the report, e.g. artifacts["kernels"] = [(kernel_name, triton_source), ...].
    artifacts: Dict[str, Any] = field(default_factory=dict)

    def count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by

    def decline(self, pass_name: str, node: fx.Node | str, reason: str) -> None:
        """Record a site the pass leaves alone, and count it as `<pass>.declined`."""
        label = node.format_node() if isinstance(node, fx.Node) else str(node)
        self.declined.append(Declined(label, reason))
        self.count(f"{pass_name}.declined")


@dataclass
class PassResult:
    """What a pass returns: the graph module (possibly the same object) and whether it changed."""

    graph_module: fx.GraphModule
    modified: bool


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclass
class PassRecord:
    """One pass's entry in the report."""

    name: str
    stage: str
    changed: bool
    seconds: float
    counters: Dict[str, int]
    declined: List[Declined]
    notes: List[str]
    artifacts: Dict[str, Any]
    cost_before: cost_model.GraphCost
    cost_after: cost_model.GraphCost
    graph_after: str

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "changed": self.changed,
            "seconds": self.seconds,
            "counters": dict(self.counters),
            "declined": [d.as_dict() for d in self.declined],
            "notes": list(self.notes),
            "flops_before": self.cost_before.flops_value,
            "flops_after": self.cost_after.flops_value,
            "hbm_bytes_before": self.cost_before.bytes_value,
            "hbm_bytes_after": self.cost_after.bytes_value,
            "flops_before_symbolic": str(self.cost_before.flops),
            "flops_after_symbolic": str(self.cost_after.flops),
            "hbm_bytes_before_symbolic": str(self.cost_before.hbm_bytes),
            "hbm_bytes_after_symbolic": str(self.cost_after.hbm_bytes),
        }


class PassDivergence(RuntimeError):
    """Raised in debug mode when a pass changes what the graph computes."""


class PassManager:
    """Runs `passes` (name, function) in order over one graph."""

    def __init__(self, passes: Sequence[tuple[str, Pass]], config: Config) -> None:
        self.passes = list(passes)
        self.config = config
        self.records: List[PassRecord] = []

    def run(self, gm: fx.GraphModule, example_inputs: Sequence[Any], stage: str = "torch") -> fx.GraphModule:
        for name, fn in self.passes:
            ctx = PassContext(self.config, example_inputs, stage)
            before = cost_model.graph_cost(gm)
            reference = copy_graph_module(gm) if self.config.debug else None
            start = time.perf_counter()
            try:
                result = fn(gm, ctx)
            except Exception as e:
                raise RuntimeError(f"flashfx pass {name!r} failed on the {stage} graph: {e}") from e
            seconds = time.perf_counter() - start
            gm = result.graph_module
            if result.modified:
                gm.graph.lint()
                gm.recompile()
            if reference is not None and result.modified:
                random_node = _draws_random_numbers(reference)
                if random_node is None:
                    _check_same_outputs(name, reference, gm, example_inputs)
                else:
                    # A rewrite may draw the same distribution from another random stream (attention dropout).
                    ctx.notes.append(f"debug: outputs not compared, the graph draws random numbers at {random_node}")
            after = cost_model.graph_cost(gm) if result.modified else before
            self.records.append(PassRecord(
                name=name, stage=stage, changed=result.modified, seconds=seconds, counters=ctx.counters,
                declined=ctx.declined, notes=ctx.notes, artifacts=ctx.artifacts, cost_before=before, cost_after=after,
                graph_after=gm.code if result.modified else "",
            ))
        return gm


RANDOM_OPS = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "bernoulli", "multinomial",
              "normal", "randperm", "native_dropout", "dropout", "feature_dropout", "alpha_dropout",
              "scaled_dot_product_attention"}


def _draws_random_numbers(gm: fx.GraphModule) -> Optional[str]:
    """The name of the first node that draws random numbers (dropout with p > 0 in training, rand, ...), or None."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = cost_model.op_name(node)
        if name in RANDOM_OPS and (("dropout" not in name and "attention" not in name) or _dropout_active(node, name)):
            return node.name
    return None


def _dropout_active(node: fx.Node, name: str) -> bool:
    if name == "scaled_dot_product_attention":
        return cost_model.argument(node, "dropout_p", 4, 0.0) != 0
    p = cost_model.argument(node, "p", 1, 0.5)
    training = cost_model.argument(node, "train" if name == "native_dropout" else "training", 2, True)
    return p != 0 and training is not False


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose graph a pass may rewrite; node metadata (fake values) is shared, not deep-copied."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # keeps pytree in/out specs where the graph has them
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def _check_same_outputs(name: str, before: fx.GraphModule, after: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Run both graphs on the same inputs (same RNG state) and raise PassDivergence naming `name` on a mismatch."""
    real_inputs = [_materialise(x) for x in inputs]
    rng = torch.random.get_rng_state()
    with torch.no_grad():
        expected = before(*real_inputs)
        torch.random.set_rng_state(rng)
        got = after(*real_inputs)
    flat_expected, _ = torch.utils._pytree.tree_flatten(expected)
    flat_got, _ = torch.utils._pytree.tree_flatten(got)
    if len(flat_expected) != len(flat_got):
        raise PassDivergence(f"pass {name!r} changed the number of graph outputs ({len(flat_expected)} -> {len(flat_got)})")
    for i, (e, g) in enumerate(zip(flat_expected, flat_got)):
        if isinstance(e, torch.Tensor):
            if e.shape != g.shape or e.dtype != g.dtype:
                raise PassDivergence(f"pass {name!r} changed output {i}: {e.shape}/{e.dtype} -> {g.shape}/{g.dtype}")
            rtol, atol = tolerance(e.dtype)
            if not torch.allclose(e.float(), g.float(), rtol=rtol, atol=atol, equal_nan=True):
                err = (e.float() - g.float()).abs().max().item()
                raise PassDivergence(f"pass {name!r} changed output {i}: max abs difference {err:.3g}")


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing a rewritten graph's output with the original's."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2
    if dtype == torch.float32:
        return 1e-4, 1e-5
    return 0.0, 0.0


def _materialise(x: Any) -> Any:
    """ATen-stage example inputs are fake (maybe symbolic): replace them by seeded random tensors of their size hints."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, torch.SymInt):
        return cost_model.size_hint(x)
    if isinstance(x, FakeTensor):
        shape = [cost_model.size_hint(d) for d in x.shape]
        if x.dtype.is_floating_point:
            return torch.randn(shape, dtype=x.dtype, device=x.device)
        if x.dtype == torch.bool:
            return torch.rand(shape, device=x.device) > 0.5
        return torch.randint(0, 2, shape, dtype=x.dtype, device=x.device)
    return x
