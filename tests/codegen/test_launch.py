"""flashfx.codegen.launch: when a bound kernel is reused and when the launch goes through Triton's fn[grid].

The direct launch only runs on CUDA (the interpreter has no compiled kernels), so these tests drive the Launcher's
bookkeeping with a stand-in JIT function; the attention kernels launched through it are checked on the GPU machine
(`bench/attention_host.py` compares both launches' outputs)."""
import pytest
import torch

from flashfx.codegen import launch


class FakeKernel:
    function, packed_metadata = "cu-function", "meta"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *a):
        self.calls.append(("direct", a[:3], a[9:]))


class FakeJit:
    """Parameters x (tensor), n (int), alpha (float), BLOCK (constexpr)."""
    arg_names = ["x", "n", "alpha", "BLOCK"]

    def __init__(self):
        self.calls, self.compiled = [], 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            self.compiled += 1
            return FakeKernel(self.calls)
        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(launch, "fast_launch_available", lambda: True)
    monkeypatch.setattr(launch, "_on_cuda", lambda args: True)
    monkeypatch.setattr(launch, "_current_device_and_stream", lambda: (0, 7))
    monkeypatch.setattr(launch, "_hooks_installed", lambda: False)


def test_second_call_with_the_same_signature_launches_directly(fake_cuda):
    fn, x = FakeJit(), torch.zeros(8)
    run = launch.Launcher(fn, {"BLOCK": 64, "num_warps": 4})
    run((2,), (x, 8), {"alpha": 0.5})
    run((3,), (x, 8), {"alpha": 0.5})
    assert [c[0] for c in fn.calls] == ["jit", "direct"]
    assert fn.calls[0][3] == {"alpha": 0.5, "BLOCK": 64, "num_warps": 4}
    # grid padded to three dimensions; every parameter in order, the constexpr included, options left out
    assert fn.calls[1][1] == (3, 1, 1) and fn.calls[1][2] == (x, 8, 0.5, 64)


def test_a_new_float_value_or_type_goes_back_through_triton(fake_cuda):
    # Triton does not specialise on a runtime float's value; the signature does (finer: never a wrong kernel).
    # 1, 1.0 and True are equal in Python and compile differently in Triton (i32, fp32, i1): types tell them apart.
    fn, x = FakeJit(), torch.zeros(8)
    run = launch.Launcher(fn, {"BLOCK": 64})
    for alpha in (0.5, 0.25, 1, 1.0, True, 0.25):
        run((1,), (x, 8, alpha))
    assert [c[0] for c in fn.calls] == ["jit", "jit", "jit", "jit", "jit", "direct"]


def test_a_new_int_or_an_unaligned_tensor_goes_back_through_triton(fake_cuda):
    fn, x = FakeJit(), torch.zeros(64)
    run = launch.Launcher(fn, {"BLOCK": 64})
    run((1,), (x, 8, 1.0))
    run((1,), (x, 16, 1.0))           # an int is specialised on (== 1, divisible by 16): new signature
    run((1,), (x[1:], 8, 1.0))        # 4-byte offset: not 16-byte aligned any more
    run((1,), (x.half(), 8, 1.0))     # another dtype
    run((1,), (x, 8, 1.0))            # the first signature again: bound
    assert [c[0] for c in fn.calls] == ["jit", "jit", "jit", "jit", "direct"]


def test_a_parameter_left_to_its_default_never_binds(fake_cuda):
    fn, x = FakeJit(), torch.zeros(8)
    run = launch.Launcher(fn, {"num_warps": 4})  # BLOCK not given: Triton would use its default
    run((1,), (x, 8, 1.0))
    run((1,), (x, 8, 1.0))
    assert [c[0] for c in fn.calls] == ["jit", "jit"]


def test_off_the_gpu_or_when_disabled_every_call_is_triton_s(monkeypatch):
    fn, x = FakeJit(), torch.zeros(8)
    run = launch.Launcher(fn, {"BLOCK": 64})
    run((1,), (x, 8, 1.0))
    run((1,), (x, 8, 1.0))  # a CPU tensor: the interpreter path, nothing bound
    assert [c[0] for c in fn.calls] == ["jit", "jit"]
    monkeypatch.setenv("FLASHFX_FAST_LAUNCH", "0")
    assert not launch.fast_launch_available()
    monkeypatch.setenv("FLASHFX_FAST_LAUNCH", "yes")
    with pytest.raises(ValueError, match="FLASHFX_FAST_LAUNCH"):
        launch.fast_launch_available()


def test_another_device_or_an_installed_hook_goes_back_through_triton(fake_cuda, monkeypatch):
    fn, x = FakeJit(), torch.zeros(8)
    run = launch.Launcher(fn, {"BLOCK": 64})
    run((1,), (x, 8, 1.0))
    monkeypatch.setattr(launch, "_current_device_and_stream", lambda: (1, 7))
    run((1,), (x, 8, 1.0))  # the same arguments on device 1: its own binding
    monkeypatch.setattr(launch, "_hooks_installed", lambda: True)
    run((1,), (x, 8, 1.0))  # a profiler's launch hooks see every launch
    assert [c[0] for c in fn.calls] == ["jit", "jit", "jit"]


def test_bound_signatures_are_capped(fake_cuda):
    fn, x = FakeJit(), torch.zeros(8)
    run = launch.Launcher(fn, {"BLOCK": 64})
    for seed in range(launch.MAX_BOUND + 5):  # an int that changes on every call, like a dropout seed
        run((1,), (x, seed, 1.0))
    assert len(run._bound) == launch.MAX_BOUND


def test_the_guard_reads_the_installed_triton_launch_statement():
    # On this Triton the statement the fast path replays must be found (else the fast path is silently off).
    import inspect
    from triton.runtime.jit import JITFunction
    assert launch._RUN_STATEMENT in "".join(inspect.getsource(JITFunction.run).split())


def test_launchers_are_shared_per_kernel_and_fixed_arguments():
    fn = FakeJit()
    assert launch.launcher(fn, BLOCK=64, num_warps=4) is launch.launcher(fn, num_warps=4, BLOCK=64)
    assert launch.launcher(fn, BLOCK=64) is not launch.launcher(fn, BLOCK=128)


def test_an_empty_hook_chain_is_no_hook(monkeypatch):
    # Triton 3.6+ keeps launch hooks as HookChain objects, never None: an empty one must not turn binding off
    chain = type("HookChain", (), {"calls": []})()
    assert not launch._hook_set(chain) and not launch._hook_set(None)
    chain.calls.append(print)
    assert launch._hook_set(chain) and launch._hook_set(print)
    from triton import knobs
    assert not launch._hooks_installed(), (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)


def test_a_bound_call_takes_only_tensors_and_declines_what_it_was_not_bound_for(fake_cuda, monkeypatch):
    fn, x, y = FakeJit(), torch.zeros(64), torch.zeros(64)
    run = launch.Launcher(fn, {"BLOCK": 64})
    bound = run.bind((2,), (x, 8, 0.5))
    assert bound is not None and [c[0] for c in fn.calls] == ["jit"]
    assert bound([y]) is True  # another tensor, same dtype and alignment: the compiled kernel, the bound scalars
    assert fn.calls[-1] == ("direct", (2, 1, 1), (y, 8, 0.5, 64))
    assert bound.template[0] is None  # the bound tensor is not kept alive
    assert bound([y.half()]) is False and bound([y[1:]]) is False  # another dtype; not 16-byte aligned
    monkeypatch.setattr(launch, "_current_device_and_stream", lambda: (1, 7))
    assert bound([y]) is False  # another device
    monkeypatch.setattr(launch, "_current_device_and_stream", lambda: (0, 7))
    monkeypatch.setattr(launch, "_hooks_installed", lambda: True)
    assert bound([y]) is False  # a profiler's hooks see every launch
    monkeypatch.setattr(launch, "_hooks_installed", lambda: False)
    with pytest.raises(ValueError, match="1 tensor arguments"):
        bound([x, y])
    monkeypatch.setattr(launch, "fast_launch_available", lambda: False)  # FLASHFX_FAST_LAUNCH=0
    assert bound([y]) is False
    assert [c[0] for c in fn.calls] == ["jit", "direct"]


def test_nothing_binds_off_the_gpu(monkeypatch):
    fn, x = FakeJit(), torch.zeros(8)
    assert launch.Launcher(fn, {"BLOCK": 64}).bind((1,), (x, 8, 1.0)) is None  # a CPU tensor: launched, not bound
    assert [c[0] for c in fn.calls] == ["jit"]


def test_environment_values_follow_the_environment(monkeypatch):
    # the attention launch plans key on knobs read this way at every call: a changed knob must show at once
    from flashfx import _compat
    monkeypatch.setenv("FLASHFX_TEST_KNOB", "a")
    assert _compat.environment_values((b"FLASHFX_TEST_KNOB", b"FLASHFX_TEST_UNSET")) == (b"a", None)
    monkeypatch.setenv("FLASHFX_TEST_KNOB", "b")
    assert _compat.environment_values((b"FLASHFX_TEST_KNOB",)) == (b"b",)
    monkeypatch.delenv("FLASHFX_TEST_KNOB")
    assert _compat.environment_values((b"FLASHFX_TEST_KNOB",)) == (None,)
