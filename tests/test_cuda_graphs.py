"""Inference graphs as CUDA graphs: what keeps a graph op by op, the capture / replay bookkeeping, and (on a GPU)
replays that match running the model."""
import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import flashfx
from flashfx import cuda_graphs
from flashfx.cuda_graphs import CudaGraphRunner, decline_reason, graph_hazard


def traced_on_fake_cuda(fn, *shapes):
    """`fn` traced to an ATen graph on fake CUDA tensors (no GPU needed), and those inputs."""
    with FakeTensorMode():
        inputs = [torch.randn(s, device="cuda") for s in shapes]
        return make_fx(fn)(*inputs), inputs


def test_a_plain_inference_graph_is_captured():
    gm, inputs = traced_on_fake_cuda(lambda x, w: torch.relu(x @ w) * 2.0, (4, 8), (8, 8))
    assert decline_reason(gm, inputs) is None


@pytest.mark.parametrize("fn, reason", [
    (lambda x: x.add_(1.0) * 2.0, "in place"),
    (lambda x: x + torch.rand_like(x), "random"),
    (lambda x: x.view(-1), "view of) the input"),
    (lambda x: (lambda y: (y.view(-1), y.t()))(x * 2.0), "share the memory"),
    (lambda x: x * torch.ones((), device="cpu"), "tensor on cpu"),
], ids=["input-written-in-place", "random", "output-views-input", "outputs-alias", "host-tensor"])
def test_what_a_replay_could_change_keeps_the_graph_op_by_op(fn, reason):
    gm, inputs = traced_on_fake_cuda(fn, (4, 8))
    found = decline_reason(gm, inputs)
    assert found is not None and reason in found, found


def test_inputs_off_the_gpu_are_not_captured():
    x = torch.randn(3)
    gm = make_fx(lambda t: t * 2)(x)
    assert "not on one CUDA device" in decline_reason(gm, [x])


def test_attention_with_dropout_is_random_and_without_is_not():
    import flashfx.codegen.attention  # noqa: F401  (defines flashfx::attention_fwd)

    for p, declined in ((0.1, True), (0.0, False)):
        g = fx.Graph()
        q = g.placeholder("q")
        node = g.call_function(torch.ops.flashfx.attention_fwd.default, (q, q, q, None, False, None, p))
        g.output((g.call_function(__import__("operator").getitem, (node, 0)),))
        found = graph_hazard(fx.GraphModule({}, g), torch.device("cuda"))
        assert (found is not None and "random" in found) == declined, (p, found)


def test_attentions_seed_without_dropout_may_be_used_on_the_host():
    # training saves the (host, int64) seed for the backward: without dropout it is always zero, so a replay
    # reusing the value from capture changes nothing; with dropout the graph is random anyway
    import operator

    import flashfx.codegen.attention  # noqa: F401
    with FakeTensorMode():
        q = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float16)
        outs = torch.ops.flashfx.attention_fwd.default(q, q, q, None, False, None, 0.0)
    g = fx.Graph()
    x = g.placeholder("q")
    node = g.call_function(torch.ops.flashfx.attention_fwd.default, (x, x, x, None, False, None, 0.0))
    items = [g.call_function(operator.getitem, (node, i)) for i in range(3)]
    for item, value in zip(items, outs):
        item.meta["val"] = value
    assert outs[2].device.type == "cpu"
    g.output(tuple(items))  # the seed is used: returned for the backward
    assert graph_hazard(fx.GraphModule({}, g), torch.device("cuda"), outputs_may_alias=True) is None


class FakeCapture:
    """Stands in for a CUDA graph on the CPU: records the capture, "replays" by running the function."""
    made = []
    fail = False

    def __init__(self, fn, args, in_place, pool=None):
        self.misses = 0
        if FakeCapture.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.fn, self.in_place = fn, [(i, a.data_ptr()) for i, (a, keep) in enumerate(zip(args, in_place)) if keep]
        FakeCapture.made.append(self)

    def ready(self, args):
        return all(args[i].data_ptr() == p for i, p in self.in_place)

    def replay(self, args):
        return self.fn(args)


@pytest.fixture
def fake_capture(monkeypatch):
    FakeCapture.made, FakeCapture.fail = [], False
    monkeypatch.setattr(cuda_graphs, "Captured", FakeCapture)
    return FakeCapture


def test_a_signature_is_captured_at_its_second_call_and_replayed_after(fake_capture):
    calls = []
    runner = CudaGraphRunner(lambda args: calls.append(len(args)) or (sum(args),))
    w, x = torch.ones(3), torch.ones(3)
    for _ in range(4):
        runner([w, x])
    assert len(fake_capture.made) == 1 and runner.replays == 3 and runner.op_by_op_calls == 1
    assert [i for i, _ in fake_capture.made[0].in_place] == [0, 1]  # same addresses both calls: read in place
    runner([w, torch.ones(3)])  # x moved: this call runs op by op, the graph stays
    assert runner.op_by_op_calls == 2 and len(fake_capture.made) == 1


def test_inputs_read_in_place_that_move_for_good_are_captured_anew(fake_capture):
    runner = CudaGraphRunner(lambda args: (sum(args),))
    w, x = torch.ones(3), torch.ones(3)
    runner([w, x])
    runner([w, x])  # captured, both read in place
    new_w = torch.ones(3)  # the weights were replaced; x is a new tensor at every call from now on
    xs = [torch.ones(3) for _ in range(5)]
    for x in xs:
        runner([new_w, x])
    # two misses run op by op (the second forgets the graph), the third call captures anew and replays after
    assert len(fake_capture.made) == 2 and runner.op_by_op_calls == 3 and runner.replays == 4
    assert [i for i, _ in fake_capture.made[1].in_place] == [0]  # the new weights in place, x copied


def test_growing_shapes_are_never_captured(fake_capture):
    runner = CudaGraphRunner(lambda args: (args[0].sum(),))
    for n in range(1, 20):
        runner([torch.ones(n)])
    assert fake_capture.made == [] and runner.op_by_op_calls == 19


def test_at_most_max_signatures_are_captured(fake_capture):
    runner = CudaGraphRunner(lambda args: (args[0].sum(),))
    xs = [torch.ones(n) for n in range(1, cuda_graphs.MAX_SIGNATURES + 3)]
    for x in xs + xs:
        runner([x])
    assert len(fake_capture.made) == cuda_graphs.MAX_SIGNATURES


def test_a_failed_capture_turns_the_runner_off_and_says_why(fake_capture):
    fake_capture.fail = True
    runner = CudaGraphRunner(lambda args: (args[0] * 2,))
    x = torch.ones(3)
    outs = [runner([x]) for _ in range(3)]
    assert all(torch.equal(o[0], x * 2) for o in outs)
    assert "capture failed" in runner.status() and "stream is capturing" in runner.status()


def test_the_option_is_validated():
    with pytest.raises(ValueError, match="cuda_graphs"):
        flashfx.Config(cuda_graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cuda_graphs_on", [True, False])
def test_replays_match_running_the_model_on_the_gpu(cuda_graphs_on):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.LayerNorm(128),
                                torch.nn.Linear(128, 64)).cuda().half().eval()
    fast = flashfx.optimize(model, cuda_graphs=cuda_graphs_on)
    x = torch.randn(8, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        for step in range(4):
            x.normal_()  # same tensor, new values: read in place by the graph
            fresh = torch.randn(8, 64, device="cuda", dtype=torch.half)  # a new tensor: copied into the graph
            for inp in (x, fresh):
                torch.testing.assert_close(fast(inp), model(inp), atol=2e-2, rtol=2e-2)
    report = fast.report.text()
    assert ("cuda graphs: 1 captured" in report) == cuda_graphs_on, report
