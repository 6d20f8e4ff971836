"""A generated kernel that fails on its first call (untested Triton / device) falls back to its ATen ops with a
warning; under the interpreter (tests) the failure is raised instead, so tests never pass through the fallback."""
import pytest
import torch
import torch.nn.functional as F

from flashfx import _compat
from flashfx.codegen import kernel as fused_kernel
from flashfx.codegen import matmul_epilogue
from fusion_helpers import assert_close, fuse_function


def _fn(x, w, b, r):
    return F.gelu(F.linear(x, w, b)) + r, torch.softmax(x * 2.0, -1)


def _inputs():
    return [torch.randn(2, 5, 24), torch.randn(36, 24), torch.randn(36), torch.randn(2, 5, 36)]


def _break(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fused_kernel.FusedKernel, "_call_slow", boom)
    monkeypatch.setattr(matmul_epilogue.MatmulKernel, "_run", boom)


def test_failing_kernels_fall_back_to_aten(tmp_path, monkeypatch):
    xs = _inputs()
    gm, ctx = fuse_function(_fn, xs, tmp_path)
    assert ctx.counters["fusion.groups"] == 2
    _break(monkeypatch)
    monkeypatch.setattr(_compat, "triton_interpreting", lambda: False)  # as on a GPU: fallback allowed
    with pytest.warns(UserWarning, match="running its ATen ops instead"):
        got = gm(*xs)
    assert_close(got, _fn(*xs))
    assert_close(gm(*xs), _fn(*xs))  # and from then on, without trying the kernel again


def test_failures_are_raised_under_the_interpreter(tmp_path, monkeypatch):
    xs = _inputs()
    gm, _ = fuse_function(_fn, xs, tmp_path)
    _break(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        gm(*xs)


def test_the_report_names_each_kernel_that_fell_back(tmp_path, monkeypatch):
    import types

    import flashfx
    from flashfx.codegen import fallback as fallback_module

    class Chain(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) * 2.0 + 1.0

    model = Chain()
    fast = flashfx.optimize(model, cache_dir=str(tmp_path), attention="off", cross_entropy=False)
    _break(monkeypatch)
    # as on a GPU, for the fallback only (the compile still sees the interpreter)
    monkeypatch.setattr(fallback_module, "_compat", types.SimpleNamespace(triton_interpreting=lambda: False))
    x = torch.randn(4, 8)
    with torch.no_grad(), pytest.warns(UserWarning, match="running its ATen ops instead"):
        assert_close(fast(x), model(x))
    [(name, error)] = fast.report.fallbacks()
    assert name.startswith("fused_") and error == "RuntimeError: boom"
    assert f"FELL BACK at run time: {name} runs its ATen ops (RuntimeError: boom)" in fast.report.text()
    assert fast.report.to_json()["graphs"][0]["fallbacks"] == [{"kernel": name, "error": "RuntimeError: boom"}]


def test_a_report_without_failures_lists_no_fallbacks(tmp_path):
    import flashfx

    fast = flashfx.optimize(torch.nn.Sequential(torch.nn.Sigmoid(), torch.nn.Tanh()), cache_dir=str(tmp_path))
    with torch.no_grad():
        fast(torch.randn(3, 5))
    assert fast.report.fallbacks() == [] and "FELL BACK" not in fast.report.text()
    assert any(g.fallbacks for g in fast.report.graphs)  # the kernels were registered, none was used
