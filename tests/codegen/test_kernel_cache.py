"""The on-disk kernel cache: a second process finds the generated modules and the autotune choices that the
first one wrote, and keys change with the source."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from flashfx.codegen import kernel_cache

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    from flashfx.config import Config
    from flashfx.rewriter.pass_manager import PassContext
    from flashfx.passes.fusion import fusion
    from flashfx.codegen.kernel import cache_stats

    def fn(x, w):
        return torch.softmax(x * w, -1), torch.sigmoid(x) * 3.0 + 1.0

    torch.manual_seed(0)
    x, w = torch.randn(5, 33), torch.randn(33)
    gm = make_fx(fn, tracing_mode="fake")(x, w)
    ctx = PassContext(Config(cache_dir=sys.argv[1]), stage="forward")
    gm = fusion(gm, ctx).graph_module
    got = gm(x, w)
    ok = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, fn(x, w)))
    print(json.dumps({"stats": cache_stats(), "groups": ctx.counters["fusion.groups"], "ok": ok}))
""")


def _run(cache_dir):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_reuses_the_disk_cache(tmp_path):
    from flashfx.codegen.kernel import cache_stats

    before = cache_stats()
    namespace = {"__name__": "first_process"}
    sys_argv, sys.argv = sys.argv, ["x", str(tmp_path)]
    try:  # the first "process" is this one: the script writes the cache
        exec(compile(SCRIPT.replace("print(", "result = ("), "first", "exec"), namespace)
    finally:
        sys.argv = sys_argv
    first = json.loads(namespace["result"])
    assert first["ok"] and first["groups"] == 2
    assert first["stats"]["cache_misses"] - before["cache_misses"] == 2
    files = sorted(os.listdir(tmp_path / "kernels"))
    assert len(files) == 2 and all(f.startswith("fused_") and f.endswith(".py") for f in files)
    assert len(os.listdir(tmp_path / "autotune")) == 2
    second = _run(tmp_path)
    assert second["ok"]
    assert second["stats"]["cache_hits"] == 2 and second["stats"]["cache_misses"] == 0
    assert sorted(os.listdir(tmp_path / "kernels")) == files


def test_key_depends_on_source_and_device():
    a = kernel_cache.cache_key("def k(): pass\n")
    assert a == kernel_cache.cache_key("def k(): pass\n")
    assert a != kernel_cache.cache_key("def k(): return\n")
    assert "torch-" + torch.__version__ in kernel_cache.device_tag()


def test_autotune_choices_round_trip(tmp_path):
    kernel_cache.save_choice(str(tmp_path), "abc", "pointwise:x1024:r1", {"XBLOCK": 1024, "num_warps": 4})
    kernel_cache.save_choice(str(tmp_path), "abc", "pointwise:x4096:r1", {"XBLOCK": 2048, "num_warps": 8})
    assert kernel_cache.load_choices(str(tmp_path), "abc") == {
        "pointwise:x1024:r1": {"XBLOCK": 1024, "num_warps": 4}, "pointwise:x4096:r1": {"XBLOCK": 2048, "num_warps": 8}}
    assert json.loads((tmp_path / "autotune" / "abc.json").read_text())


def test_the_same_group_in_two_layers_is_one_kernel(tmp_path):
    # Two layers' groups differ only in node names (the kernel's name index and its comments): one module, one
    # compile, one autotune entry, not one per layer.
    from torch.fx.experimental.proxy_tensor import make_fx

    from flashfx.config import Config
    from flashfx.passes.fusion import fusion
    from flashfx.rewriter.pass_manager import PassContext

    def two_layers(x):
        h = torch.sigmoid(x) * 3.0 + 1.0
        h = torch.cumsum(h, -1)  # no codegen for it: it keeps the layers' groups apart
        return torch.sigmoid(h) * 3.0 + 1.0

    x = torch.randn(5, 33)
    gm = make_fx(two_layers, tracing_mode="fake")(x)
    ctx = PassContext(Config(cache_dir=str(tmp_path)), stage="forward")
    gm = fusion(gm, ctx).graph_module
    kernels = [n.target for n in gm.graph.nodes if type(n.target).__name__ == "FusedKernel"]
    assert len(kernels) == 2 and kernels[0].plan.name != kernels[1].plan.name
    torch.testing.assert_close(gm(x), two_layers(x))
    fns = {id(fn) for k in kernels for _, fn in k._variants.values()}
    assert len(fns) == 1
    assert len({kernel_cache.cache_key(src.source) for k in kernels for src, _ in k._variants.values()}) == 1


def test_shared_name_ignores_the_index_and_comments():
    a = kernel_cache.shared_name("fused_add_3", "# covers %add_3\ndef fused_add_3(x):\n    return x  # add_3\n")
    b = kernel_cache.shared_name("fused_add_17", "# covers %add_17\ndef fused_add_17(x):\n    return x  # add_17\n")
    c = kernel_cache.shared_name("fused_add_4", "def fused_add_4(x):\n    return -x\n")
    assert a[0] == b[0] and a[0].startswith("fused_add_") and a[0] != c[0]
    assert f"def {a[0]}(x)" in a[1] and "# covers %add_3" in a[1]
    assert kernel_cache.cache_key(a[1]) == kernel_cache.cache_key(b[1])
