"""The cost model against hand-computed FLOPs and bytes."""

import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from flashfx.rewriter.capture import capture
from flashfx.rewriter.cost import graph_cost, node_cost


def _aten_graph(fn, *args):
    return make_fx(fn, tracing_mode="fake")(*args)


def _only(gm, name):
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]
    assert len(nodes) == 1, [str(n.target) for n in gm.graph.nodes]
    return nodes[0]


def test_matmul_flops_and_bytes():
    M, K, N = 37, 19, 23
    gm = _aten_graph(torch.mm, torch.randn(M, K), torch.randn(K, N))
    c = node_cost(_only(gm, "mm"))
    assert c.flops == 2 * M * N * K
    assert c.read_bytes == 4 * (M * K + K * N)
    assert c.write_bytes == 4 * M * N
    assert c.exact


def test_addmm_counts_the_bias_add():
    gm = _aten_graph(lambda b, x, w: torch.addmm(b, x, w), torch.randn(5), torch.randn(3, 4), torch.randn(4, 5))
    c = node_cost(_only(gm, "addmm"))
    assert c.flops == 2 * 3 * 5 * 4 + 3 * 5
    assert c.read_bytes == 4 * (5 + 12 + 20)


def test_softmax_bytes_read_once_written_once():
    x = torch.randn(6, 41, dtype=torch.float16)
    gm = _aten_graph(lambda t: torch.softmax(t, -1), x)
    c = node_cost(_only(gm, "softmax"))
    assert c.read_bytes == 2 * 6 * 41 and c.write_bytes == 2 * 6 * 41
    assert c.flops == 5 * 6 * 41


def test_views_move_no_bytes_and_broadcast_reads_own_size():
    gm = _aten_graph(lambda a, b: (a.view(4, 6) + b).t(), torch.randn(24), torch.randn(6))
    total = graph_cost(gm)
    # add reads a (24) and b (6) once, writes 24; view and t are free.
    assert total.hbm_bytes == 4 * (24 + 6 + 24)
    assert total.flops == 24
    assert total.lower_bound_bytes == 4 * (24 + 6 + 24)


def test_embedding_reads_only_touched_rows():
    weight, ids = torch.randn(1000, 16), torch.randint(0, 1000, (2, 5))
    gm = _aten_graph(lambda i, w: torch.nn.functional.embedding(i, w), ids, weight)
    c = node_cost(_only(gm, "embedding"))
    assert c.read_bytes == 10 * 16 * 4 + 10 * 8
    assert c.write_bytes == 10 * 16 * 4


def test_sdpa_counts_two_products_and_halves_when_causal():
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    for causal in (False, True):
        gm = _aten_graph(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=causal),
                         q, k, v)
        node = next(n for n in gm.graph.nodes if "attention" in str(n.target))
        c = node_cost(node)
        full = 4 * 2 * 3 * 17 * 17 * 8
        assert c.flops == (full // 2 if causal else full)


def test_symbolic_attention_scores_grow_with_s_squared():
    class Scores(torch.nn.Module):
        def forward(self, input_ids):
            h = torch.nn.functional.one_hot(input_ids, 8).float()  # [B, S, 8]
            return torch.softmax(h @ h.transpose(-2, -1), dim=-1)

    (g,) = capture(Scores(), kwargs={"input_ids": torch.randint(0, 8, (2, 16))})
    B, S = sympy.symbols("B S", positive=True, integer=True)
    c = graph_cost(g.gm)
    flops = sympy.expand(c.flops.subs(g.symbol_names))
    # matmul 2*B*S*S*8, softmax 5*B*S*S, one_hot/float pointwise terms linear in B*S
    assert flops.coeff(B * S**2) == 2 * 8 + 5
    assert c.flops_value == int(flops.subs({B: 2, S: 16}))
    assert sympy.expand(c.lower_bound_bytes.subs(g.symbol_names)) == 8 * B * S + 4 * B * S**2


def test_unknown_op_is_flagged_approximate():
    gm = _aten_graph(lambda x: torch.fft.fft(x).real, torch.randn(8))
    assert graph_cost(gm).approximate_nodes


def test_lower_bound_counts_only_the_sliced_part_of_a_buffer():
    mask, table = torch.ones(64, 64, dtype=torch.bool), torch.randn(100, 8)
    pos = torch.arange(5)
    gm = _aten_graph(lambda m, t, p: (m[:5, :5].float().sum(), torch.nn.functional.embedding(p, t)), mask, table, pos)
    lower = graph_cost(gm).lower_bound_value
    # the 5x5 slice of the mask, 5 rows of the table, the 5 indices; outputs: a scalar and 5 rows
    assert lower == 25 + 5 * 8 * 4 + 5 * 8 + (4 + 5 * 8 * 4)


def test_lower_bound_writes_aliased_outputs_once():
    x = torch.randn(6, 8)
    gm = _aten_graph(lambda a: ((a + 1).view(48), (a + 1).view(8, 6), a.t()), x)
    # a + 1 is computed twice here (two nodes), so two tensors are written; a.t() is a view of the input
    assert graph_cost(gm).lower_bound_value == 6 * 8 * 4 + 2 * 6 * 8 * 4

    gm = _aten_graph(lambda a: (lambda y: (y.view(48), y.view(8, 6), y))(a * 2), x)
    assert graph_cost(gm).lower_bound_value == 6 * 8 * 4 + 6 * 8 * 4
