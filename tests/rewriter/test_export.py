"""ONNX export and SVG drawing of captured graphs: valid ONNX, exact standard-op mappings checked numerically with
ONNX's reference evaluator, custom-domain nodes with their attributes, symbolic dims as names."""
import math
import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx.reference import ReferenceEvaluator

import flashfx  # noqa: F401  (registers torch.ops.flashfx.*)
from flashfx.rewriter import draw
from flashfx.rewriter.capture import capture
from flashfx.rewriter.onnx_export import to_onnx


class Block(nn.Module):
    """Every op here has an exact ONNX mapping: the export must contain no custom-domain node."""

    def __init__(self, vocab=37, dim=24, heads=3):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim)
        self.w2 = nn.Parameter(0.2 * torch.randn(dim, dim))
        self.b2 = nn.Parameter(0.1 * torch.randn(dim))
        with torch.no_grad():  # norm weights and biases away from 1 and 0, so a dropped one changes the result
            self.ln.weight.add_(0.1 * torch.randn(dim))
            self.ln.bias.normal_(0, 0.1)

    def forward(self, ids, mask):
        x = self.emb(ids)
        b, s, e = x.shape
        q, k, v = self.qkv(self.ln(x)).split(e, dim=-1)
        q, k, v = (t.view(b, s, self.heads, e // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(e // self.heads)
        keep = ((mask == 1) & (ids >= 0)).unsqueeze(1).unsqueeze(2).expand(b, self.heads, s, s)
        scores = scores.masked_fill(~keep, float("-inf"))
        attn = F.softmax(scores, dim=-1) @ v
        y = self.out(attn.permute(0, 2, 1, 3).reshape(b, s, e)) + x
        # [B*S, E] -> [B, S, E]: both sizes must be read from the inputs' shapes at run time
        y = torch.addmm(self.b2, y.reshape(-1, e), self.w2).view(b, s, e) + y
        gate, up = self.up(y).chunk(2, dim=-1)
        y = y + F.silu(gate) * up + F.gelu(up, approximate="tanh") * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        counts = mask.sum(-1) / 2  # int / int: true division, in float
        return torch.tanh(y).flatten(0, 1), counts, y.float().amax(dim=-1)


def _export(model, *args):
    graphs = capture(model, args)
    assert len(graphs) == 1
    g = graphs[0]
    proto = to_onnx(g.gm, g.symbol_names)
    onnx.checker.check_model(proto, full_check=True)
    return g, proto


def _feeds(proto, model, named_inputs):
    params = dict(model.named_parameters())
    feeds = {}
    for inp in proto.graph.input:
        name = inp.name
        if name in named_inputs:
            feeds[name] = named_inputs[name].numpy()
        else:
            key = re.sub(r"^self\.", "", name)
            feeds[name] = params[key].detach().numpy()
    return feeds


def test_exact_ops_match_torch_numerically_at_another_batch_and_length():
    torch.manual_seed(0)
    model = Block().eval()
    ids = torch.randint(0, 37, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    g, proto = _export(model, ids, mask)
    assert {n.domain for n in proto.graph.node} == {""}, [n.op_type for n in proto.graph.node if n.domain]
    ops = {n.op_type for n in proto.graph.node}
    assert {"Gather", "LayerNormalization", "MatMul", "Softmax", "Where", "Split", "Reshape", "Transpose", "Gelu",
            "Sigmoid", "ReduceMean", "ReduceMax", "Cast", "Div", "Gemm", "Expand", "And", "Not", "Shape"} <= ops

    # Symbolic batch and sequence: run the ONNX graph at sizes it was not captured with.
    ids2 = torch.randint(0, 37, (3, 5))
    mask2 = (torch.rand(3, 5) > 0.3).long()
    mask2[:, 0] = 1  # every row keeps one key, so softmax has no all -inf row
    want = model(ids2, mask2)
    got = ReferenceEvaluator(proto).run(None, _feeds(proto, model, {"ids": ids2, "mask": mask2}))
    assert len(got) == len(want)
    for w, o in zip(want, got):
        assert tuple(o.shape) == tuple(w.shape)
        assert o.dtype == w.detach().numpy().dtype
        np.testing.assert_allclose(o, w.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_shapes_and_symbolic_dims_are_annotated():
    model = Block().eval()
    g, proto = _export(model, torch.randint(0, 37, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    assert set(map(str, g.symbol_names.values())) == {"B", "S"}

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    inputs = {vi.name: dims(vi) for vi in proto.graph.input}
    assert inputs["ids"] == ["B", "S"] and inputs["self.qkv.weight"] == [72, 24]
    outputs = [dims(vi) for vi in proto.graph.output]
    assert outputs == [["B*S", 24], ["B"], ["B", "S"]]
    produced = {o for n in proto.graph.node for o in n.output}
    annotated = {vi.name for vi in proto.graph.value_info} | {vi.name for vi in proto.graph.output}
    # Every tensor a node produces has a type and shape except the mapping's own helper values.
    missing = {name for name in produced - annotated if "/" not in name and not name.startswith("size:")}
    assert not missing
    scores = next(vi for vi in proto.graph.value_info if vi.name == "scores")
    assert dims(scores) == ["B", 3, "S", "S"]
    assert scores.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # No weights in the file: parameters are graph inputs, only a few small constants are stored.
    assert sum(np.prod(t.dims) for t in proto.graph.initializer) < 50


class Unmapped(nn.Module):
    def forward(self, x, y):
        a = torch.cumsum(x, dim=1)
        b = a[:, None, ..., :2]
        c = F.scaled_dot_product_attention(x[:, None], y[:, None], y[:, None], is_causal=True)
        return b, c, x.half() * 0.1


def test_ops_without_exact_mapping_are_custom_nodes_with_attributes():
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    _, proto = _export(Unmapped(), x, y)
    by_type = {n.op_type: n for n in proto.graph.node}
    cumsum = by_type["cumsum"]
    assert cumsum.domain == "torch"
    assert {a.name: onnx.helper.get_attribute_value(a) for a in cumsum.attribute} == {"dim": 1}
    getitem = next(n for n in proto.graph.node if n.name == "b")
    assert getitem.op_type == "getitem"
    assert getitem.attribute[0].name == "index"
    index = onnx.helper.get_attribute_value(getitem.attribute[0]).decode()
    assert index == "(:, None, ..., :2)"
    sdpa = by_type["scaled_dot_product_attention"]
    assert sdpa.domain == "torch" and len(sdpa.input) == 3
    assert {a.name: onnx.helper.get_attribute_value(a) for a in sdpa.attribute}["is_causal"] == 1
    # 0.1 is not a float16 number: Mul by an fp16 constant would compute something torch does not, so it stays
    # a torch node (torch multiplies in fp32 and rounds once).
    assert "Mul" not in by_type and by_type["mul"].domain == "torch"
    assert {o.domain for o in proto.opset_import} == {"", "torch"}


def test_flashfx_attention_is_a_flashfx_domain_node():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return torch.ops.flashfx.attention(q, k, v, is_causal=True, scale=0.25)

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    _, proto = _export(Attn(), q, k, v)
    (node,) = [n for n in proto.graph.node if n.op_type == "attention"]
    assert node.domain == "flashfx"
    assert list(node.input) == ["q", "k", "v"]  # the omitted optional bias is trailing: dropped
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["is_causal"] == 1 and attrs["scale"] == 0.25 and "bias" not in attrs
    assert ("flashfx", 1) in {(o.domain, o.version) for o in proto.opset_import}
    out = proto.graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["B", 4, 6, 8]


def test_flashfx_attention_with_bias_keeps_input_positions():
    class Attn(nn.Module):
        def forward(self, q, k, v, bias):
            return torch.ops.flashfx.attention(q, k, v, bias)

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    _, proto = _export(Attn(), q, k, v, torch.randn(2, 1, 6, 6))
    (node,) = [n for n in proto.graph.node if n.op_type == "attention"]
    assert list(node.input) == ["q", "k", "v", "bias"]
    assert "scale" not in {a.name for a in node.attribute}  # None is left out


def test_duplicate_and_passthrough_outputs_are_valid():
    class Twice(nn.Module):
        def forward(self, x):
            y = x + 1
            return y, y, x

    # Dynamo removes duplicate and pass-through outputs itself; a plain fx trace keeps them.
    gm = torch.fx.symbolic_trace(Twice())

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            n.meta["val"] = super().run_node(n)
            return n.meta["val"]

    Record(gm).run(torch.randn(3, 4))
    proto = to_onnx(gm)
    onnx.checker.check_model(proto, full_check=True)
    names = [o.name for o in proto.graph.output]
    assert len(set(names)) == 3 and "x" not in names


def test_svg_draws_every_tensor_node():
    if not draw.graphviz_available():
        pytest.skip("Graphviz (python package and `dot`) not installed")
    g = capture(Block().eval(), (torch.randint(0, 37, (2, 7)), torch.ones(2, 7, dtype=torch.long)))[0]
    svg = draw.to_svg(g.gm, g.symbol_names, title="block")
    assert svg.lstrip().startswith("<?xml") and svg.rstrip().endswith("</svg>")
    assert "self.qkv.weight" in svg and "float32[B, 3, S, S]" in svg and "softmax" in svg


def test_svg_without_graphviz_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(draw.GraphvizMissing, match=r"pip install graphviz.*apt-get install graphviz"):
        draw.to_svg(torch.fx.symbolic_trace(nn.Linear(2, 2)))
    monkeypatch.setitem(__import__("sys").modules, "graphviz", None)  # `import graphviz` now fails
    with pytest.raises(draw.GraphvizMissing, match="Python package 'graphviz' is not installed"):
        draw.require_graphviz()


def test_nodes_without_metadata():
    class M(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1) + 1

    # A node a pass added without meta['val']: its value is computed from its inputs' fake values.
    g = capture(M(), (torch.randn(2, 3),))[0]
    for node in g.gm.graph.nodes:
        if node.op == "call_function":
            node.meta.pop("val", None)
            node.meta.pop("example_value", None)
    proto = to_onnx(g.gm, g.symbol_names)
    onnx.checker.check_model(proto, full_check=True)
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["B", 3]
    # No metadata at all (plain symbolic_trace): still a valid file, types marked unknown.
    proto = to_onnx(torch.fx.symbolic_trace(M()))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED
    assert [n.op_type for n in proto.graph.node] == ["cumsum", "add"]
