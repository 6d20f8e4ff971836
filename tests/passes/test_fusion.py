"""The fusion partitioner: exact group counts, and a negative test for each barrier (mutation, an aliasing view,
an op without codegen, a path through an unfusable node, a device Triton cannot run on)."""
import operator
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "codegen"))
from fusion_helpers import assert_close, fuse_function, run_fusion  # noqa: E402

from flashfx import _compat  # noqa: E402
from flashfx.passes import fusion as fusion_pass  # noqa: E402


def _aten_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem
            and type(n.target).__name__ != "FusedKernel"]


def test_softmax_is_one_group(tmp_path):
    xs = [torch.randn(5, 19)]
    gm, ctx = fuse_function(lambda x: torch.softmax(x * 0.5, -1), xs, tmp_path)
    assert ctx.counters["fusion.decomposed"] == 1
    assert ctx.counters["fusion.groups"] == 1
    assert ctx.counters["fusion.nodes_fused"] == 6  # mul, amax, sub, exp, sum, div
    assert _aten_targets(gm) == []
    assert_close(gm(*xs), torch.softmax(xs[0] * 0.5, -1))


def test_no_fusion_across_a_mutation(tmp_path):
    def fn(x, y):
        a = x * 2.0
        b = a + 1.0
        x.add_(y)  # in-place: what x holds changes here
        c = x * 3.0
        return b, c + 1.0

    xs = [torch.randn(4, 6), torch.randn(4, 6)]
    gm, ctx = fuse_function(fn, [t.clone() for t in xs], tmp_path, tracing_mode="real")
    assert ctx.counters["fusion.groups"] == 2  # one group on each side of add_
    assert torch.ops.aten.add_.Tensor in _aten_targets(gm)
    assert any("mutates" in d.reason for d in ctx.declined)
    a, b = [t.clone() for t in xs], [t.clone() for t in xs]
    assert_close(gm(*a), fn(*b))
    assert_close(a[0], b[0])  # the mutation itself still happens


def test_view_aliasing_an_output_stays_a_view(tmp_path):
    def fn(x):
        a = torch.exp(x) * 2.0
        return a.unsqueeze(0), a + 1.0  # output 0 aliases a

    xs = [torch.randn(3, 7)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.groups"] == 1
    assert torch.ops.aten.unsqueeze.default in _aten_targets(gm)
    v, _ = gm(*xs)
    assert v._base is not None  # still a view of the kernel's output, not a copy
    assert_close(gm(*xs), fn(*xs))


def test_op_without_codegen_splits_the_group(tmp_path):
    def fn(x):
        a = torch.sigmoid(x) * 2.0
        c = torch.cumsum(a, -1)  # no generator for scans
        return torch.tanh(c) + 1.0

    xs = [torch.randn(4, 9)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters["fusion.groups"] == 2
    assert torch.ops.aten.cumsum.default in _aten_targets(gm)
    assert any("no Triton codegen for aten.cumsum" in d.reason for d in ctx.declined)
    assert_close(gm(*xs), fn(*xs))


def test_no_group_through_an_outside_path(tmp_path):
    def fn(x):
        a = torch.sigmoid(x) * 2.0
        m = torch.cumsum(a, -1)  # a -> cumsum -> b and a -> b: one kernel for a and b would need cumsum inside
        return (a + m).relu()

    xs = [torch.randn(6, 6)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert torch.ops.aten.cumsum.default in _aten_targets(gm)
    assert ctx.counters.get("fusion.groups", 0) == 2  # sigmoid+mul, then add+relu: never one group
    assert_close(gm(*xs), fn(*xs))


def test_single_ops_are_left_alone(tmp_path):
    xs = [torch.randn(4, 4)]
    gm, ctx = fuse_function(lambda x: torch.exp(x), xs, tmp_path)
    assert ctx.counters.get("fusion.groups", 0) == 0
    assert _aten_targets(gm) == [torch.ops.aten.exp.default]


def test_device_triton_cannot_run_on_leaves_the_graph(tmp_path, monkeypatch):
    monkeypatch.setattr(_compat, "triton_runs_on", lambda device: False)
    xs = [torch.randn(4, 4)]
    gm, ctx = fuse_function(lambda x: torch.exp(x) * 2.0 + 1.0, xs, tmp_path)
    assert ctx.counters.get("fusion.groups", 0) == 0
    assert any("Triton cannot run on cpu" in n for n in ctx.notes)
    assert len(_aten_targets(gm)) == 3


def test_tensors_on_another_device_only_stop_their_own_ops(tmp_path):
    # A CUDA graph also holds CPU tensors (the attention op's seed): those must not turn fusion off for the whole
    # graph, as they once did on the GPU. Here the runnable device is the CPU (interpreter), the other is "meta".
    def fn(x, other):
        return torch.exp(x) * 2.0 + 1.0, other * 3.0 + 1.0

    xs = [torch.randn(4, 4), torch.randn(4, 4, device="meta")]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert ctx.counters.get("fusion.groups", 0) == 1
    kernel = next(n for n in gm.graph.nodes if type(n.target).__name__ == "FusedKernel")
    assert all(a.meta["val"].device.type == "cpu" for a in kernel.all_input_nodes)
    assert [t for t in _aten_targets(gm)] == [torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor]
    got = gm(*xs)
    assert_close(got[0], fn(*xs)[0])
    assert got[1].device.type == "meta"


def test_cat_with_a_legacy_empty_part_stays_aten(tmp_path):
    # torch.cat accepts 1-D empty parts next to N-D ones (Hugging Face's loss shift made one): not a fusable cat
    def fn(x, empty):
        return torch.cat([torch.exp(x), empty], dim=1) * 2.0

    xs = [torch.randn(3, 5), torch.empty(0)]
    gm, ctx = fuse_function(fn, xs, tmp_path)
    assert torch.ops.aten.cat.default in _aten_targets(gm)
    assert_close(gm(*xs), fn(*xs))


def test_fusion_off_does_nothing(tmp_path):
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x: torch.exp(x) * 2.0, tracing_mode="fake")(torch.randn(3))
    code = gm.code
    gm, ctx = run_fusion(gm, tmp_path, fusion=False)
    assert gm.code == code and not ctx.counters


def test_a_lone_large_broadcast_op_gets_a_kernel(tmp_path, monkeypatch):
    # ATen's broadcast kernel is not vectorized (half the bandwidth on the H100): a generated kernel pays alone
    monkeypatch.setattr(fusion_pass, "LONE_BROADCAST_MIN_ELEMENTS", 64)
    xs = [torch.randn(16, 24), torch.randn(24)]
    gm, ctx = fuse_function(lambda x, w: x * w, xs, tmp_path)
    assert ctx.counters.get("fusion.groups", 0) == 1
    assert_close(gm(*xs), xs[0] * xs[1])
    same_shape = [torch.randn(16, 24), torch.randn(16, 24)]  # no broadcast: stays ATen
    gm, ctx = fuse_function(lambda x, w: x * w, same_shape, tmp_path)
    assert ctx.counters.get("fusion.groups", 0) == 0


def test_slice_backward_fuses_with_its_operands_and_consumers(tmp_path):
    # RoPE's rotate_half in a backward: two half-width gradients placed at offsets, zeros elsewhere, then summed
    def rope_grad(a, b, c):
        left = torch.ops.aten.slice_backward(a.neg(), [3, 5, 16], 2, 8, 9223372036854775807, 1)
        right = torch.ops.aten.slice_backward(b * 2.0, [3, 5, 16], 2, 0, 8, 1)
        return left + right + c

    xs = [torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 16)]
    gm, ctx = fuse_function(rope_grad, xs, tmp_path)
    assert ctx.counters.get("fusion.groups", 0) == 1
    assert torch.ops.aten.slice_backward.default not in _aten_targets(gm)
    assert_close(gm(*xs), rope_grad(*xs))


def test_slice_backward_with_a_step_stays_aten(tmp_path):
    xs = [torch.randn(4, 4)]
    gm, ctx = fuse_function(lambda a: torch.ops.aten.slice_backward(a.exp(), [4, 8], 1, 0, 8, 2) * 2.0, xs, tmp_path)
    assert torch.ops.aten.slice_backward.default in _aten_targets(gm)
    assert_close(gm(*xs), torch.ops.aten.slice_backward(xs[0].exp(), [4, 8], 1, 0, 8, 2) * 2.0)


def test_a_lone_broadcast_op_keeps_symbolic_sizes_symbolic(tmp_path, monkeypatch):
    # deciding on a size must not specialise it: the fused graph still runs at another batch size
    monkeypatch.setattr(fusion_pass, "LONE_BROADCAST_MIN_ELEMENTS", 64)
    def fn(x, w):
        return x * w, (x.exp() + 1.0) * 2.0  # a lone broadcast op, then a group partitioned before it is lowered

    xs = [torch.randn(16, 24), torch.randn(24)]
    gm, ctx = fuse_function(fn, xs, tmp_path, tracing_mode="symbolic")
    assert ctx.counters.get("fusion.groups", 0) == 2, ctx.declined
    other = [torch.randn(7, 24), xs[1]]
    assert_close(gm(*other), fn(*other))


def test_judging_a_lone_op_adds_no_guard_on_symbolic_sizes():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x, w: x * w, tracing_mode="symbolic")(torch.randn(2048, 1024), torch.randn(1024))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    env = node.meta["val"].shape[0].node.shape_env
    before = (len(env.guards), dict(env.replacements))
    assert fusion_pass._broadcasts(node)
    assert (len(env.guards), dict(env.replacements)) == before  # the batch size is still free
