"""Training graphs as CUDA graphs (cuda_graphs="training"): on the CPU a stand-in graph keeps the memory behaviour
that matters (outputs are fixed tensors that each replay overwrites), so the bookkeeping that keeps a replay from
overwriting activations still needed is tested against running without graphs; on a GPU the real thing."""
import copy
import types

import pytest
import torch

import flashfx
from flashfx import compiler, cuda_graphs_training


class OverwritingCapture:
    """A CUDA graph's memory on the CPU: inputs read in place or copied into buffers, and outputs that are the same
    tensors at every replay, overwritten by it (as a graph's outputs live at fixed addresses in its pool)."""
    made = []

    def __init__(self, fn, args, in_place, pool=None):
        self.fn = fn
        self.in_place = [(i, a.data_ptr()) for i, (a, keep) in enumerate(zip(args, in_place)) if keep]
        kept = {i for i, _ in self.in_place}
        self.buffers = {i: a.clone() for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in kept}
        self.outputs = list(fn(self._graph_args(args)))
        self.graph = types.SimpleNamespace(pool=lambda: None)
        OverwritingCapture.made.append(self)

    def _graph_args(self, args):
        return [self.buffers.get(i, a) for i, a in enumerate(args)]

    def ready(self, args):
        return all(args[i].data_ptr() == p for i, p in self.in_place)

    def replay(self, args):
        for i, buf in self.buffers.items():
            buf.copy_(args[i])
        fresh = self.fn(self._graph_args(args))
        args.clear()
        for static, new in zip(self.outputs, fresh):
            if isinstance(static, torch.Tensor) and static is not new:
                static.copy_(new)
        return self.outputs


@pytest.fixture
def fake_gpu(monkeypatch):
    OverwritingCapture.made = []
    monkeypatch.setattr(compiler, "on_cuda", lambda inputs: True)
    monkeypatch.setattr(cuda_graphs_training, "Captured", OverwritingCapture)
    return OverwritingCapture


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.down(torch.nn.functional.gelu(self.up(x))), y)


def pair(**config):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    config = {"fusion": False, **config}
    graphed = flashfx.optimize(model, cuda_graphs="training", **config)
    plain = flashfx.optimize(reference, cuda_graphs=False, **config)
    return model, graphed, reference, plain


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)) for _ in range(n)]


def sgd(model):
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad  # in place: the weights keep their addresses, as an optimizer's step does
            p.grad = None


def training_graphs(fn):
    found = [r for report in fn.compiler.reports for r in report.cuda_graphs]
    assert len(found) == 1 and isinstance(found[0], cuda_graphs_training.TrainingGraphs), found
    return found[0]


@pytest.mark.parametrize("fusion", [False, True], ids=["aten", "generated-kernels"])
def test_a_training_loop_replays_forward_and_backward_and_matches(fake_gpu, fusion):
    model, graphed, reference, plain = pair(fusion=fusion)
    for x, y in batches(5):
        loss, ref = graphed(x, y), plain(x, y)
        loss.backward()
        ref.backward()
        assert torch.equal(loss, ref)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        sgd(model)
        sgd(reference)
    graphs = training_graphs(graphed)
    assert len(fake_gpu.made) == 2  # one forward and one backward graph
    assert graphs.replays == 2 * 4 and graphs.op_by_op_calls == 2  # the first step compiles, op by op


def test_two_forwards_before_their_backwards_never_overwrite_activations(fake_gpu):
    model, graphed, reference, plain = pair()
    data = batches(4)
    for x, y in data[:2]:  # capture happens in the second step
        graphed(x, y).backward()
        plain(x, y).backward()
    (x1, y1), (x2, y2) = data[2:]
    a, b = graphed(x1, y1), graphed(x2, y2)  # the second forward must not overwrite the first's activations
    ra, rb = plain(x1, y1), plain(x2, y2)
    b.backward()
    a.backward()
    rb.backward()
    ra.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert training_graphs(graphed).op_by_op_calls >= 2


def test_a_forward_without_backward_holds_its_activations_until_dropped(fake_gpu):
    model, graphed, reference, plain = pair()
    kept, kept_ref = [], []
    for step, (x, y) in enumerate(batches(6)):
        loss, ref = graphed(x, y), plain(x, y)
        if step == 2:
            pending = loss  # no backward yet: its activations must survive the next forward
            kept.append(loss.detach())
            kept_ref.append(ref.detach())
            continue
        loss.backward()
        ref.backward()
        kept.append(loss)  # with its (released) graph: the caller holds it across later replays
        kept_ref.append(ref)
        if step == 3:
            pending.backward()
            plain(*batches(6)[2]).backward()
            del pending
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        sgd(model)
        sgd(reference)
    assert all(torch.equal(a, b) for a, b in zip(kept, kept_ref))  # losses were copied out, never overwritten
    graphs = training_graphs(graphed)
    assert graphs.op_by_op_calls >= 3 and graphs.replays >= 4  # step 3 ran op by op; replays resumed after


def test_weights_that_move_are_read_where_they_are_then_captured_anew(fake_gpu):
    model, graphed, reference, plain = pair()
    for step, (x, y) in enumerate(batches(7)):
        if step == 3:  # new storage for every weight, same Parameter objects (as a re-materialised model)
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.clone()
        loss, ref = graphed(x, y), plain(x, y)
        loss.backward()
        ref.backward()
        assert torch.equal(loss, ref), step
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), step
        sgd(model)
        sgd(reference)
    graphs = training_graphs(graphed)
    # steps 0, 3 and 4 op by op (first call; two misses); 5 captures anew; 1, 2, 5, 6 replay forward and backward
    assert len(fake_gpu.made) == 4 and graphs.replays == 2 * 4 and graphs.op_by_op_calls == 2 * 3


def test_training_graphs_are_opt_in_and_checked():
    assert flashfx.Config().cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs='train'.*'training'"):
        flashfx.Config(cuda_graphs="train")


def test_random_numbers_keep_the_training_graphs_op_by_op(fake_gpu):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
    fn = flashfx.optimize(model, fusion=False, cuda_graphs="training")
    for _ in range(3):
        fn(torch.randn(4, 8)).sum().backward()
    statuses = [r for report in fn.compiler.reports for r in report.cuda_graphs]
    assert any(isinstance(s, str) and "random" in s for s in statuses), statuses
    assert fake_gpu.made == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_training_replays_match_running_the_model_on_the_gpu():
    torch.manual_seed(0)
    model = MLP().cuda()
    reference = copy.deepcopy(model)
    graphed = flashfx.optimize(model, cuda_graphs="training")
    plain = flashfx.optimize(reference, cuda_graphs=False)
    for x, y in [(torch.randn(64, 16, device="cuda"), torch.randn(64, 16, device="cuda")) for _ in range(5)]:
        loss, ref = graphed(x, y), plain(x, y)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss, ref)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        sgd(model)
        sgd(reference)
    assert training_graphs(graphed).replays == 2 * 4  # steps 2-5: a forward and a backward each


def test_outside_aot_autograd_nothing_says_which_outputs_are_saved():
    # the forward runner needs AOTAutograd's metadata; without it the compiler keeps the graph op by op
    assert cuda_graphs_training.saved_slice() is None
