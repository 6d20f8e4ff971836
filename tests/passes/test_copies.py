"""The redundant-clone pass: a clone of a private buffer with the same layout goes; every clone someone could tell
apart from its source stays (an input, a second reader, a view of a shared buffer, a layout change)."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from flashfx.config import Config
from flashfx.passes.copies import drop_redundant_clones
from flashfx.rewriter.pass_manager import PassContext

aten = torch.ops.aten


def _run(fn, *inputs):
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    ctx = PassContext(Config(), stage="forward")
    result = drop_redundant_clones(gm, ctx)
    clones = [n for n in result.graph_module.graph.nodes if n.target is aten.clone.default]
    return result.graph_module, ctx.counters.get("copies.clones_dropped", 0), clones


def test_clone_of_a_fresh_single_use_buffer_is_dropped():
    def fn(x):
        return torch.clone(torch.relu(x * 2.0)) + 1.0

    x = torch.randn(4, 6)
    gm, dropped, clones = _run(fn, x)
    assert dropped == 1 and clones == []
    torch.testing.assert_close(gm(x), fn(x))


def test_clone_returned_as_an_output_is_dropped_when_its_source_is_private():
    def fn(x):
        return torch.clone(torch.sigmoid(x))

    x = torch.randn(3, 5)
    gm, dropped, _ = _run(fn, x)
    assert dropped == 1
    out = gm(x)
    torch.testing.assert_close(out, fn(x))
    assert out.data_ptr() != x.data_ptr()


def test_clone_of_an_input_stays():
    gm, dropped, clones = _run(lambda x: torch.clone(x), torch.randn(3))
    assert dropped == 0 and len(clones) == 1


def test_clone_of_a_buffer_with_another_reader_stays():
    def fn(x):
        y = x * 2.0
        return torch.clone(y), y  # two outputs that must not share storage

    gm, dropped, clones = _run(fn, torch.randn(3))
    assert dropped == 0 and len(clones) == 1
    a, b = gm(torch.randn(3))
    assert a.data_ptr() != b.data_ptr()


def test_clone_of_a_view_of_a_shared_buffer_stays():
    def fn(x):
        y = x * 2.0
        return torch.clone(y.t()), y

    gm, dropped, _ = _run(fn, torch.randn(3, 4))
    assert dropped == 0


def test_clone_of_a_view_chain_of_a_private_buffer_is_dropped():
    def fn(x):
        return torch.clone((x * 2.0).view(-1)) + 1.0

    x = torch.randn(3, 4)
    gm, dropped, _ = _run(fn, x)
    assert dropped == 1
    torch.testing.assert_close(gm(x), fn(x))


def test_clone_that_changes_the_layout_stays():
    def fn(x):
        return torch.clone((x * 2.0).t(), memory_format=torch.contiguous_format)

    x = torch.randn(3, 4)
    gm, dropped, clones = _run(fn, x)
    assert dropped == 0 and len(clones) == 1
    assert gm(x).is_contiguous()


def test_eval_dropout_clones_leave_a_bert_style_block(tmp_path):
    # AOTAutograd turns eval-mode dropout into clone; through flashfx they are gone and the output is unchanged
    import flashfx

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.ln, self.drop = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Dropout(0.1)

        def forward(self, x):
            return self.ln(self.drop(self.dense(x)) + x)

    block = Block().eval()
    x = torch.randn(2, 5, 16)
    report = flashfx.explain(block, x)
    assert report.counters().get("copies.clones_dropped", 0) == 1
    assert "clone" not in report.stage_text("aten")
    fast = flashfx.optimize(block, cache_dir=str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), block(x), rtol=1e-5, atol=1e-5)
