"""Which nodes share their input's storage."""
import operator

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from flashfx.rewriter.aliasing import shares_storage, storage_owner


def test_views_split_elements_and_unsafe_view_share_storage_and_compute_does_not():
    def fn(x):
        a = x.t().reshape(-1)
        parts = x.split(2, dim=0)
        return a, parts[0] * 2.0, torch.ops.aten._unsafe_view(x, [16])

    gm = make_fx(fn)(torch.randn(4, 4))
    by_target = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            by_target.setdefault(getattr(n.target, "__name__", str(n.target)), n)
    assert shares_storage(by_target["t.default"])
    assert shares_storage(by_target["split.Tensor"])
    assert shares_storage(by_target["getitem"]) and by_target["getitem"].target is operator.getitem
    assert shares_storage(by_target["_unsafe_view.default"])
    assert not shares_storage(by_target["mul.Tensor"])
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert storage_owner(by_target["getitem"]) is x
    assert storage_owner(by_target["mul.Tensor"]) is by_target["mul.Tensor"]
