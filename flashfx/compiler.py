"""The backend: capture -> torch-level passes -> AOTAutograd (remat partitions) -> fusion + codegen on ATen graphs.

This is the one module that knows every pass; it orders them. Passes are imported when enabled, so a disabled
pass costs nothing (and its Triton code is never imported).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import default_partition

from flashfx._compat import boxed_graph_module
from flashfx.config import Config
from flashfx.report import GraphReport
from flashfx.rewriter import cost as cost_model
from flashfx.rewriter.capture import attach_metadata, name_symbols
from flashfx.rewriter.pass_manager import Pass, PassManager, copy_graph_module


def on_cuda(example_inputs: Sequence[Any]) -> bool:
    """Whether the graph runs on a GPU (CUDA graphs are considered only then)."""
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def torch_passes(config: Config) -> List[Tuple[str, Pass]]:
    """The passes over the Dynamo (torch-level) graph, in order, for this config."""
    passes: List[Tuple[str, Pass]] = []
    wants_patterns = config.attention != "off" or config.cross_entropy
    if wants_patterns:
        from flashfx.rewriter.canonicalize import canonicalize

        passes.append(("canonicalize", canonicalize))
    if config.attention != "off":
        from flashfx.passes.attention import attention

        passes.append(("attention", attention))
    if config.cross_entropy:
        from flashfx.passes.cross_entropy import cross_entropy

        passes.append(("cross_entropy", cross_entropy))
    return passes


def aten_passes(config: Config) -> List[Tuple[str, Pass]]:
    """The passes over each ATen graph AOTAutograd produces (forward, backward, inference)."""
    if not config.fusion:
        return []
    from flashfx.passes.copies import drop_redundant_clones
    from flashfx.passes.fusion import fusion

    # copies first: a dropped clone frees its neighbours to fuse (a cuBLAS addmm keeps its bias, no epilogue kernel)
    return [("copies", drop_redundant_clones), ("fusion", fusion)]


def partition_fn(config: Config, report: GraphReport) -> Callable[..., Any]:
    """The AOTAutograd partitioner: flashfx's remat under a budget, or save-everything-needed without one."""
    if config.remat is None:
        return default_partition
    from flashfx.passes.remat import make_partition_fn

    return make_partition_fn(config, report.remat)


def unused_output_gradients(backward: fx.GraphModule) -> Optional[str]:
    """A note for a backward whose forward returned a scalar (a loss) and tensors beside it (logits, a KV cache).
    The backward takes a gradient for every output, and autograd fills zeros for those the loss does not use, where
    eager autograd allocates nothing: a [tokens, vocab] tensor of zeros, and an add into the logits' gradient."""
    grads = [n.meta.get("val") for n in backward.graph.nodes
             if n.op == "placeholder" and str(n.target).startswith("tangents")]
    grads = [g for g in grads if isinstance(g, torch.Tensor)]
    others = [g for g in grads if g.dim() > 0]
    if not others or len(others) == len(grads):
        return None
    largest = max(others, key=lambda g: _size_hint(g.numel()))
    total = sum(_size_hint(g.numel()) * g.element_size() for g in others)
    return (f"the backward takes gradients for {len(others)} tensor output(s) beside a scalar one (a loss): "
            f"autograd fills zeros for each the loss does not use (~{cost_model.format_bytes(total)} at the "
            f"traced sizes; largest [{', '.join(str(_size_hint(d)) for d in largest.shape)}] {str(largest.dtype)[6:]}); return only "
            f"the loss to avoid them (docs/guide.md, 'let the loss be the only output')")


def _size_hint(n: Any) -> int:
    """An element count as an int; a symbolic one by its example value."""
    if isinstance(n, torch.SymInt):
        return int(n.node.hint) if n.node.hint is not None else 0
    return int(n)


class Compiler:
    """A Dynamo backend. Each Dynamo frame it compiles adds a `GraphReport` to `self.reports`."""

    def __init__(self, config: Optional[Config] = None) -> None:
        self.config = config or Config()
        self.reports: List[GraphReport] = []
        self._training_graphs: Dict[int, Any] = {}  # report index -> its TrainingGraphs (cuda_graphs="training")

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        attach_metadata(gm)
        report = GraphReport(index=len(self.reports), captured=copy_graph_module(gm), rewritten=gm,
                             symbol_names=name_symbols(gm))
        self.reports.append(report)
        manager = PassManager(torch_passes(self.config), self.config)
        gm = manager.run(gm, example_inputs, stage="torch")
        report.rewritten = gm
        report.passes.extend(manager.records)

        compile_aten = functools.partial(self._compile_aten, report)
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=functools.partial(compile_aten, "forward"),
            bw_compiler=functools.partial(compile_aten, "backward"),
            inference_compiler=functools.partial(compile_aten, "inference"),
            partition_fn=partition_fn(self.config, report),
        )

    def _compile_aten(self, report: GraphReport, stage: str, gm: fx.GraphModule,
                      example_inputs: Sequence[Any]) -> Callable[..., Any]:
        if stage == "backward":
            note = unused_output_gradients(gm)
            if note:
                report.notes.append(note)
        before = cost_model.graph_cost(gm)
        manager = PassManager(aten_passes(self.config), self.config)
        gm = manager.run(gm, example_inputs, stage=stage)
        report.passes.extend(manager.records)
        for record in manager.records:
            report.kernels.extend(record.artifacts.get("kernels", []))
            report.fallbacks.extend(record.artifacts.get("fallbacks", []))
        report.aten[stage] = gm.code
        report.aten_costs[stage] = (before, cost_model.graph_cost(gm))
        if stage in ("forward", "backward"):
            from flashfx.passes.remat_memory import compiled_peak

            # the remat plan predicts on the graphs before fusion; this checks the graphs that will run
            report.compiled_peaks[stage] = compiled_peak(gm, stage)
        compiled = boxed_graph_module(gm)  # inputs (saved activations in the backward) freed at their last use
        if not self.config.cuda_graphs or not on_cuda(example_inputs):
            return compiled  # nothing to capture off the GPU; not worth a line in every CPU report
        if stage == "inference":
            return self._cuda_graphs(report, gm, compiled, example_inputs)
        if self.config.cuda_graphs == "training":
            return self._training_graphs_for(report, stage, gm, compiled, example_inputs)
        return compiled

    def _training_graphs_for(self, report: GraphReport, stage: str, gm: fx.GraphModule, compiled: Callable[..., Any],
                             example_inputs: Sequence[Any]) -> Callable[..., Any]:
        """The forward / backward graph as one side of a `TrainingGraphs`, or as it is (the report says why)."""
        from flashfx.cuda_graphs import graph_hazard
        from flashfx.cuda_graphs_training import Runner, TrainingGraphs, saved_slice

        tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
        # the GPU's (a host input such as attention's saved seed may come first in a backward's inputs)
        device = next((t.device for t in tensors if t.is_cuda), tensors[0].device)
        hazard = graph_hazard(gm, device, outputs_may_alias=True)
        if stage == "forward":
            saved = saved_slice()
            reason = hazard or (None if saved is not None else
                                "AOTAutograd's metadata does not say which outputs are saved for the backward")
            if reason is not None:
                report.cuda_graphs.append(f"cuda graphs (training) off: forward: {reason}")
                return compiled
            graphs = self._training_graphs[report.index] = TrainingGraphs(compiled, saved)
            report.cuda_graphs.append(graphs)
            return Runner(graphs, "forward")
        graphs = self._training_graphs.get(report.index)
        if graphs is None:
            return compiled
        graphs.backward_fn = compiled
        if hazard is not None:
            graphs.backward_off = hazard
            return compiled
        return Runner(graphs, "backward")

    @staticmethod
    def _cuda_graphs(report: GraphReport, gm: fx.GraphModule, compiled: Callable[..., Any],
                     example_inputs: Sequence[Any]) -> Callable[..., Any]:
        """The inference graph as a CUDA-graph runner, or as it is (with the reason in the report)."""
        from flashfx.cuda_graphs import CudaGraphRunner, decline_reason

        reason = decline_reason(gm, example_inputs)
        if reason is not None:
            report.cuda_graphs.append(f"cuda graphs off: {reason}")
            return compiled
        runner = CudaGraphRunner(compiled)
        report.cuda_graphs.append(runner)
        return runner


def flashfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                    options: Optional[dict] = None) -> Callable[..., Any]:
    """`torch.compile(model, backend="flashfx", options={...})`: options are `Config` fields."""
    return Compiler(Config(**(options or {})))(gm, example_inputs)
