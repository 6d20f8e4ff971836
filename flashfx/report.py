"""`Report`: what flashfx did to a model, graph by graph and pass by pass, with the cost before and after."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import sympy
import torch.fx as fx

from flashfx.rewriter import cost as cost_model
from flashfx.rewriter.pass_manager import PassRecord

STAGES = ("captured", "rewritten", "aten", "kernels")


@dataclass
class GraphReport:
    """One Dynamo frame through the pipeline."""

    index: int
    captured: fx.GraphModule
    rewritten: fx.GraphModule
    symbol_names: Dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)
    passes: List[PassRecord] = field(default_factory=list)  # torch-level passes, then ATen passes per stage
    aten: Dict[str, str] = field(default_factory=dict)  # stage ("forward", "backward", "inference") -> final code
    aten_costs: Dict[str, Tuple[cost_model.GraphCost, cost_model.GraphCost]] = field(default_factory=dict)
    kernels: List[Tuple[str, str]] = field(default_factory=list)
    remat: List[Any] = field(default_factory=list)  # plan records from the remat partitioner
    # stage -> predicted peak bytes of the compiled training graph as it runs (`remat_memory.compiled_peak`)
    compiled_peaks: Dict[str, int] = field(default_factory=dict)
    fallbacks: List[Any] = field(default_factory=list)  # codegen.fallback.Fallback of each generated kernel
    cuda_graphs: List[Any] = field(default_factory=list)  # a CudaGraphRunner, or why the graph runs op by op (str)
    notes: List[str] = field(default_factory=list)  # what the user may want to change (not a pass's decision)

    def active_fallbacks(self) -> List[Any]:
        """The generated kernels that failed at run time and now run their ATen ops."""
        return [f for f in self.fallbacks if f.active]

    def readable(self, expr: Any) -> str:
        """A cost expression with size symbols renamed (s72 -> B)."""
        return str(sympy.simplify(sympy.sympify(expr).subs(self.symbol_names)))


class Report:
    """The result of `flashfx.explain`: the graph at each stage and what each pass did.

    Example::

        >>> import flashfx, torch
        >>> model, inputs = flashfx.zoo.build("gpt2-tiny")
        >>> report = flashfx.explain(model, **inputs)
        >>> print(report.text())                      # doctest: +SKIP
        >>> report.to_json()["passes"][0]["name"]     # doctest: +SKIP
        'canonicalize'
    """

    def __init__(self, graphs: List[GraphReport], config: Any) -> None:
        self.graphs = graphs
        self.config = config

    @property
    def passes(self) -> List[Tuple[GraphReport, PassRecord]]:
        return [(g, p) for g in self.graphs for p in g.passes]

    def fallbacks(self) -> List[Tuple[str, str]]:
        """(kernel, error) for each generated kernel that failed at run time and now runs its ATen ops."""
        return [(f.name, f.error) for g in self.graphs for f in g.active_fallbacks()]

    def counters(self) -> Dict[str, int]:
        """All pass counters summed over graphs, e.g. {'attention.replaced': 2}."""
        total: Dict[str, int] = {}
        for _, p in self.passes:
            for k, v in p.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    # ------------------------------------------------------------------------------------------------ stages

    def stage_text(self, stage: str) -> str:
        """The graphs at one stage: 'captured', 'rewritten', 'aten' (forward/backward) or 'kernels' (Triton)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        parts = []
        for g in self.graphs:
            title = f"# ---- graph {g.index}: {stage}"
            if stage == "captured":
                parts.append(f"{title}\n{g.captured.code.strip()}")
            elif stage == "rewritten":
                parts.append(f"{title}\n{g.rewritten.code.strip()}")
            elif stage == "aten":
                for name, code in g.aten.items():
                    parts.append(f"{title} ({name})\n{code.strip()}")
            else:
                if not g.kernels:
                    parts.append(f"{title}\n# no generated kernels (fusion off, or Triton cannot run here)")
                for name, src in g.kernels:
                    parts.append(f"{title}: {name}\n{src.strip()}")
        return "\n\n".join(parts) + "\n"

    # ------------------------------------------------------------------------------------------------ text

    def text(self) -> str:
        lines = [f"flashfx report: {len(self.graphs)} graph(s); config {self.config}"]
        for g in self.graphs:
            lines.append("")
            lines.append(f"graph {g.index}: {len(g.captured.graph.nodes)} nodes captured, "
                         f"{len(g.rewritten.graph.nodes)} after torch-level passes")
            lines.append(f"  {'pass':<16}{'stage':<11}{'changed':<9}{'ms':>8}  {'FLOPs before -> after':<30}"
                         f"{'HBM bytes before -> after'}")
            for p in g.passes:
                lines.append(
                    f"  {p.name:<16}{p.stage:<11}{str(p.changed):<9}{p.seconds * 1e3:>8.1f}  "
                    f"{_arrow(p.cost_before.flops_value, p.cost_after.flops_value, cost_model.format_flops):<30}"
                    f"{_arrow(p.cost_before.bytes_value, p.cost_after.bytes_value, cost_model.format_bytes)}"
                )
                if p.changed and p.cost_before.hbm_bytes != p.cost_after.hbm_bytes:
                    lines.append(f"      bytes: {g.readable(p.cost_before.hbm_bytes)}  ->  "
                                 f"{g.readable(p.cost_after.hbm_bytes)}")
                for k, v in sorted(p.counters.items()):
                    lines.append(f"      {k} = {v}")
                for d in p.declined:
                    lines.append(f"      declined: {d.node}  ({d.reason})")
                for note in p.notes:
                    lines.append(f"      note: {note}")
            for stage, (before, after) in g.aten_costs.items():
                lines.append(
                    f"  aten {stage}: HBM bytes {cost_model.format_bytes(before.bytes_value)} unfused -> "
                    f"{cost_model.format_bytes(after.bytes_value)} after fusion; lower bound "
                    f"{cost_model.format_bytes(after.lower_bound_value)}  [{g.readable(after.hbm_bytes)}]"
                )
            for plan in g.remat:
                lines.append("  remat: " + (plan.text() if hasattr(plan, "text") else str(plan)))
            if g.compiled_peaks:
                lines.append("  predicted peak of the compiled graphs (after fusion): " + ", ".join(
                    f"{stage} {cost_model.format_bytes(b)}" for stage, b in g.compiled_peaks.items()))
            if g.kernels:
                uses = collections.Counter(name for name, _ in g.kernels)  # a kernel shared by every layer: once
                lines.append(f"  generated kernels ({len(g.kernels)} groups, {len(uses)} distinct): "
                             + ", ".join(f"{name} x{n}" if n > 1 else name for name, n in uses.items()))
            for f in g.active_fallbacks():
                lines.append(f"  FELL BACK at run time: {f.name} runs its ATen ops ({f.error})")
            for runner in g.cuda_graphs:
                lines.append(f"  {_graph_status(runner)}")
            for note in g.notes:
                lines.append(f"  note: {note}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------ json

    def to_json(self) -> Dict[str, Any]:
        """A plain dict: `passes` (flat, every graph), `graphs` (per-graph detail) and symbolic `totals`."""
        passes, graphs = [], []
        for g in self.graphs:
            records = []
            for p in g.passes:
                entry = p.as_dict()
                entry["graph"] = g.index
                for key in ("flops_before_symbolic", "flops_after_symbolic",
                            "hbm_bytes_before_symbolic", "hbm_bytes_after_symbolic"):
                    entry[key] = g.readable(entry[key])
                records.append(entry)
            passes.extend(records)
            captured = cost_model.graph_cost(g.captured)
            rewritten = cost_model.graph_cost(g.rewritten)
            graphs.append({
                "index": g.index,
                "symbols": {str(k): str(v) for k, v in g.symbol_names.items()},
                "captured": _cost_dict(g, captured),
                "rewritten": _cost_dict(g, rewritten),
                "aten": {stage: {"unfused": _cost_dict(g, b), "fused": _cost_dict(g, a)}
                         for stage, (b, a) in g.aten_costs.items()},
                "kernels": [name for name, _ in g.kernels],
                "fallbacks": [{"kernel": f.name, "error": f.error} for f in g.active_fallbacks()],
                "remat": [plan.as_dict() if hasattr(plan, "as_dict") else str(plan) for plan in g.remat],
                "compiled_peak_bytes": dict(g.compiled_peaks),
                "cuda_graphs": [_graph_status(r) for r in g.cuda_graphs],
                "notes": list(g.notes),
            })
        totals = {
            "flops": " + ".join(gr["rewritten"]["flops_symbolic"] for gr in graphs),
            "hbm_bytes": " + ".join(gr["rewritten"]["hbm_bytes_symbolic"] for gr in graphs),
            "lower_bound_bytes": " + ".join(gr["rewritten"]["lower_bound_bytes_symbolic"] for gr in graphs),
        }
        return {"config": _config_dict(self.config), "passes": passes, "graphs": graphs,
                "counters": self.counters(), "totals": totals}


def _graph_status(runner: Any) -> str:
    return runner if isinstance(runner, str) else runner.status()


def _cost_dict(g: GraphReport, c: cost_model.GraphCost) -> Dict[str, Any]:
    return {
        "flops": c.flops_value, "hbm_bytes": c.bytes_value, "lower_bound_bytes": c.lower_bound_value,
        "flops_symbolic": g.readable(c.flops), "hbm_bytes_symbolic": g.readable(c.hbm_bytes),
        "lower_bound_bytes_symbolic": g.readable(c.lower_bound_bytes),
        "approximate_nodes": list(c.approximate_nodes),
    }


def _config_dict(config: Any) -> Dict[str, Any]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(config).items()} if dataclasses.is_dataclass(config) else {}


def _arrow(before: int, after: int, fmt) -> str:
    return f"{fmt(before)} -> {fmt(after)}" if before != after else fmt(before)
