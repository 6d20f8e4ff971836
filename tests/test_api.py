"""optimize / backend / explain: the behaviours a user relies on (passes off here; each pass has its own tests)."""
import pytest
import torch
import torch.nn as nn

import flashfx
from flashfx import Config

NO_PASSES = dict(attention="off", fusion=False, cross_entropy=False)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(self.norm(h)))) * self.scale
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return h


class WithGraphBreak(Block):
    def forward(self, input_ids):
        h = self.emb(input_ids)
        torch._dynamo.graph_break()
        return self.down(torch.relu(self.up(h)))


def _ids(b=2, s=7):
    return torch.randint(0, 50, (b, s))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_optimize_matches_eager_forward_and_backward():
    model = Block()
    fast = flashfx.optimize(model, **NO_PASSES)
    ids = _ids()
    fast(ids).square().sum().backward()
    got = _grads(model)
    model.zero_grad()
    model(ids).square().sum().backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)


def test_optimize_shares_parameters_and_state_dict_round_trips():
    model = Block()
    fast = flashfx.optimize(model, **NO_PASSES)
    assert {id(p) for p in fast.parameters()} == {id(p) for p in model.parameters()}
    assert list(fast.state_dict()) == list(model.state_dict())
    other = Block()
    fast.load_state_dict(other.state_dict())
    torch.testing.assert_close(model.up.weight, other.up.weight)
    ids = _ids()
    torch.testing.assert_close(fast(ids), other(ids))
    model.load_state_dict(Block().state_dict())  # and the other way: the wrapper sees the change
    torch.testing.assert_close(fast(ids), model(ids))


def test_attributes_fall_through_to_the_model():
    model = Block()
    model.config = {"hidden": 16}
    fast = flashfx.optimize(model, **NO_PASSES)
    assert fast.config == {"hidden": 16}
    assert fast.emb is model.emb


def test_train_and_eval_modes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    fast = flashfx.optimize(model, **NO_PASSES)
    x = torch.randn(4, 8)
    fast.eval()
    assert not model.training
    torch.testing.assert_close(fast(x), model(x))
    fast.train()
    assert model.training
    out = fast(x)
    assert (out == 0).any()  # dropout active in training


def test_varying_sequence_length_does_not_recompile_per_length():
    fast = flashfx.optimize(Block(), **NO_PASSES)
    for s in (5, 9, 13, 31):
        out = fast(_ids(s=s))
        assert out.shape == (2, s, 16)
    for b in (3, 4):
        fast(_ids(b=b))
    assert len(fast.report.graphs) == 1


def test_graph_breaks_compile_each_graph():
    model = WithGraphBreak()
    fast = flashfx.optimize(model, **NO_PASSES)
    ids = _ids()
    torch.testing.assert_close(fast(ids), model(ids))
    assert len(fast.report.graphs) == 2


def test_autocast_matches_eager_autocast():
    model = Block()
    fast = flashfx.optimize(model, **NO_PASSES)
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(ids)
        expected = model(ids)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_keyword_inputs_and_optional_arguments():
    model = Block()
    fast = flashfx.optimize(model, **NO_PASSES)
    ids, mask = _ids(), torch.ones(2, 7)
    mask[0, 3:] = 0
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask))


def test_torch_compile_backend_by_name_and_configured():
    model = Block()
    ids = _ids()
    by_name = torch.compile(model, backend="flashfx", options=NO_PASSES)
    torch.testing.assert_close(by_name(ids), model(ids))
    torch._dynamo.reset()
    configured = torch.compile(model, backend=flashfx.backend(**NO_PASSES))
    torch.testing.assert_close(configured(ids), model(ids))
    with pytest.raises(TypeError, match="did you mean"):
        flashfx.backend(fusoin=True)


def test_explain_reports_symbolic_costs_and_backward():
    model = Block()
    report = flashfx.explain(model, input_ids=_ids(), config=Config(**NO_PASSES))
    data = report.to_json()
    assert set(data) >= {"passes", "graphs", "totals", "counters", "config"}
    graph = data["graphs"][0]
    assert "B" in graph["captured"]["hbm_bytes_symbolic"] and "S" in graph["captured"]["hbm_bytes_symbolic"]
    assert graph["captured"]["hbm_bytes"] > graph["captured"]["lower_bound_bytes"] > 0
    assert set(graph["aten"]) == {"forward", "backward"}
    assert "graph 0" in report.text()
    for stage in ("captured", "rewritten", "aten", "kernels"):
        assert report.stage_text(stage).strip()
    with pytest.raises(ValueError, match="unknown stage"):
        report.stage_text("final")
    assert model.up.weight.grad is None  # explain's backward leaves .grad alone


def test_explain_in_eval_mode_has_an_inference_graph():
    model = Block().eval()
    with torch.no_grad():
        report = flashfx.explain(model, _ids(), config=Config(**NO_PASSES))
    assert list(report.graphs[0].aten) == ["inference"]


class LossAndLogits(nn.Module):
    """A causal-LM-like head: returns the loss and the logits it came from, as Hugging Face models do."""

    def __init__(self, d=16, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        logits = self.head(torch.tanh(self.emb(input_ids)))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten())
        return loss, logits


def test_report_notes_the_zero_gradients_of_outputs_beside_the_loss():
    # the backward takes a gradient for the logits too; autograd fills it with zeros when only the loss is used
    model = LossAndLogits()
    compiled = flashfx.optimize(model, **NO_PASSES)
    loss, logits = compiled(_ids(2, 7))
    loss.backward()
    text = compiled.report.text()
    assert "note: the backward takes gradients for 1 tensor output(s) beside a scalar one (a loss)" in text
    assert "largest [2, 7, 50] float32" in text and "let the loss be the only output" in text
    assert compiled.report.to_json()["graphs"][0]["notes"]


def test_report_has_no_gradient_note_when_the_loss_is_the_only_output():
    model = LossAndLogits()

    class LossOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids)[0]

    compiled = flashfx.optimize(LossOnly(), **NO_PASSES)
    compiled(_ids(2, 7)).backward()
    assert "note: the backward takes gradients" not in compiled.report.text()
    block = flashfx.optimize(Block(), **NO_PASSES)  # no scalar output: nothing to say either
    block(_ids()).sum().backward()
    assert "note: the backward takes gradients" not in block.report.text()
