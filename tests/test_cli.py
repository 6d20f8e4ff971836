"""The `flashfx` command through subprocesses: every command, every format, and every bad input (exit 2, one line
on stderr naming the problem and the fix, no traceback)."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import onnx
import pytest
import torch

from flashfx import zoo
from flashfx.rewriter.draw import graphviz_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "flashfx", *args], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd or REPO, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "mymodels.py"
    path.write_text(
        "import torch\n\n"
        "def make_mlp(batch=2):\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))\n"
        "    return model, {'input': torch.randn(batch, 8)}\n"
    )
    return str(path)


# Each case: argv, and words the one-line message must contain.
BAD_INPUTS = {
    "unknown model": (["dump", "nosuchmodel"], ["unknown model 'nosuchmodel'", "llama-tiny"]),
    "misspelt model": (["demo", "llama-tny"], ["did you mean 'llama-tiny'"]),
    "batch 0": (["dump", "llama-tiny", "--batch", "0"], ["--batch", "positive integer"]),
    "batch -1": (["dump", "llama-tiny", "--batch", "-1"], ["--batch", "positive integer"]),
    "batch x": (["demo", "llama-tiny", "--batch", "x"], ["--batch", "'x' is not an integer"]),
    "seq 0": (["dump", "gpt2-tiny", "--seq", "0"], ["--seq", "positive integer"]),
    "bad stage": (["dump", "llama-tiny", "--stage", "optimized"], ["--stage", "invalid choice", "rewritten"]),
    "bad format": (["dump", "llama-tiny", "--format", "png"], ["--format", "invalid choice", "onnx"]),
    "svg of aten": (["dump", "llama-tiny", "--format", "svg", "--stage", "aten"], ["--stage captured"]),
    "missing file": (["dump", "no/such/dir/model.py:make"], ["'no/such/dir/model.py' does not exist"]),
    "missing factory": (["dump", "{factory}:make_mpl"], ["no function 'make_mpl'", "did you mean", "make_mlp"]),
    "file without factory": (["dump", "{factory}"], ["names no factory", ":make_model"]),
    "bad config key": (["dump", "llama-tiny", "--config", "fusoin=false"], ["unknown option 'fusoin'", "'fusion'"]),
    "bad config value": (["demo", "--config", "attention=fast"], ["attention='fast'", "'exact'"]),
    "config not key=value": (["dump", "llama-tiny", "--config", "fusion"], ["KEY=VALUE"]),
    "out is a file": (["dump", "llama-tiny", "--out", "{factory}"], ["is a file, not a directory"]),
    "no command": ([], ["required", "COMMAND"]),
    "unknown command": (["bench2"], ["invalid choice: 'bench2'"]),
    "unknown flag": (["models", "--verbose"], ["unrecognized arguments: --verbose"]),
    "train and inference": (["dump", "gpt2-tiny", "--train", "--inference"], ["not allowed with argument --train"]),
    "svg without dot": (["dump", "gpt2-tiny", "--format", "svg", "--stage", "captured"],
                        ["'dot' is not on PATH", "pip install graphviz", "apt-get install graphviz"]),
}
HELP = {"flashfx": [], "models": ["models"], "dump": ["dump"], "demo": ["demo"]}


def run_inprocess(argv, capsys):
    """`main(argv)` in this process: the same code as the command minus starting Python (≈3 s a run here)."""
    from flashfx.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits by itself
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, factory_file, capsys, monkeypatch):
    argv, words = BAD_INPUTS[case]
    if case == "svg without dot":
        monkeypatch.setenv("PATH", "/nonexistent")
    code, out, err = run_inprocess([a.replace("{factory}", factory_file) for a in argv], capsys)
    assert code == 2, (out, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and err.startswith("flashfx")
    for word in words:
        assert word.replace("{factory}", factory_file) in err, (word, err)


def test_bad_input_through_the_command():
    # The real entry point: exit status and one line, no traceback, for an argparse error and a zoo error.
    cases = [(["dump", "nosuchmodel"], "unknown model 'nosuchmodel'"),
             (["demo", "llama-tiny", "--batch", "0"], "--batch: 0 is not positive")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: run_cli(*c[0]), cases))
    for (argv, words), result in zip(cases, results):
        assert result.returncode == 2 and result.stdout == "", (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr


def test_svg_without_graphviz_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)  # `import graphviz` now fails
    code, out, err = run_inprocess(["dump", "gpt2-tiny", "--format", "svg", "--out", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Python package 'graphviz' is not installed" in err
    assert "pip install graphviz" in err


HELP_WORDS = {"flashfx": ["models", "dump", "demo", "hf:<Architecture>"], "models": [],
              "dump": ["--batch", "--seq", "--stage", "--format", "--out", "captured", "kernels", "onnx", "svg"],
              "demo": ["--batch", "--seq", "--dtype", "PASS", "interpreter"]}


@pytest.mark.parametrize("command", list(HELP))
def test_help(command, capsys):
    code, out, err = run_inprocess([*HELP[command], "--help"], capsys)
    assert code == 0, err
    assert out.startswith("usage: flashfx" + ("" if command == "flashfx" else f" {command}"))
    for word in HELP_WORDS[command]:
        assert word in out, word


def test_help_through_the_command():
    result = run_cli("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: flashfx")


def test_models_lists_the_zoo():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, description in zoo.list_models():
        assert any(line.split()[:1] == [name] and description in line for line in lines), name


def test_dump_captured_text_and_json(factory_file):
    text = run_cli("dump", "llama-tiny", "--stage", "captured")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("# ---- graph 0: captured\ndef forward(")
    assert "embedding" in text.stdout and "softmax" in text.stdout

    # A user's file:factory, at a batch size of our choosing.
    doc = run_cli("dump", f"{factory_file}:make_mlp", "--batch", "3", "--stage", "captured", "--format", "json")
    assert doc.returncode == 0, doc.stderr
    parsed = json.loads(doc.stdout)
    assert parsed["stage"] == "captured" and parsed["batch"] == 3
    (graph,) = parsed["graphs"]
    assert "gelu" in graph["code"] and graph["symbols"] and list(graph["symbols"].values()) == ["B"]
    # Two linears at B=3 (2·M·N·K for the product and M·N for the bias), plus one per GELU output element.
    assert graph["flops"] == (2 * 3 * 8 * 16 + 3 * 16) + (2 * 3 * 16 * 4 + 3 * 4) + 3 * 16
    assert "B" in graph["flops_symbolic"]


def test_dump_all_text_has_every_stage_and_the_report():
    result = run_cli("dump", "gpt2-tiny", "--batch", "2", "--seq", "8", "--inference")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert [line for line in out.splitlines() if line.startswith("# ---- graph 0: aten")] == [
        "# ---- graph 0: aten (inference)"]  # under no_grad: one inference graph, no backward
    assert "@triton.jit" in out.split("######## kernels")[1]
    sections = [line for line in out.splitlines() if line.startswith("######## ")]
    assert sections == [f"######## {s}" for s in ("captured", "rewritten", "aten", "kernels", "report")]
    assert "flashfx.attention" in out.split("######## rewritten")[1].split("######## aten")[0]
    assert "flashfx report" in out.split("######## report")[1]


def test_dump_json_rewritten_to_out_dir(tmp_path):
    result = run_cli("dump", "gpt2-tiny", "--stage", "rewritten", "--format", "json", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert path == str(tmp_path / "gpt2-tiny.json")
    doc = json.loads(open(path).read())
    assert list(doc["stages"]) == ["rewritten"] and "flashfx.attention" in doc["stages"]["rewritten"]
    names = [p["name"] for p in doc["report"]["passes"]]
    assert "attention" in names
    for p in doc["report"]["passes"]:
        assert {"name", "changed", "counters", "declined", "flops_before", "flops_after", "hbm_bytes_before",
                "hbm_bytes_after"} <= set(p)


def test_dump_onnx_is_valid_with_shapes_and_flashfx_ops(tmp_path):
    result = run_cli("dump", "llama-tiny", "--format", "onnx", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert paths == [str(tmp_path / "llama-tiny-graph0-rewritten.onnx")]
    model = onnx.load(paths[0])
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node}
    assert "flashfx" in domains and "" in domains
    assert any(n.op_type == "attention" and n.domain == "flashfx" for n in model.graph.node)
    ids = next(i for i in model.graph.input if i.name == "input_ids")
    assert [d.dim_param for d in ids.type.tensor_type.shape.dim] == ["B", "S"]
    logits = model.graph.output[0].type.tensor_type
    assert [d.dim_param or d.dim_value for d in logits.shape.dim] == ["B", "S", 512]
    assert len(model.graph.value_info) > 20
    assert os.path.getsize(paths[0]) < 200_000  # no weights inside


@pytest.mark.skipif(not graphviz_available(), reason="Graphviz (python package and `dot`) not installed")
def test_dump_svg_draws_captured_and_rewritten(tmp_path):
    result = run_cli("dump", "gpt2-tiny", "--format", "svg", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert paths == [str(tmp_path / f"gpt2-tiny-graph0-{stage}.svg") for stage in ("captured", "rewritten")]
    captured, rewritten = (open(p).read() for p in paths)
    for svg in (captured, rewritten):
        assert svg.rstrip().endswith("</svg>") and "[B, S, 64]" in svg
    assert "softmax" in captured and "flashfx.attention" not in captured
    assert "flashfx.attention.default" in rewritten and 'fill="#fdba74"' in rewritten  # flashfx ops in orange


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on without a GPU")
def test_without_gpu_the_command_switches_the_triton_interpreter_on(tmp_path):
    # Kernels imported before the command runs were defined for a GPU: the command must start again with
    # TRITON_INTERPRET=1. A sitecustomize imports a kernel module first and reports the setting at each start.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "print('TRITON_INTERPRET=' + str(os.environ.get('TRITON_INTERPRET')), file=sys.stderr)\n"
        "import flashfx.codegen.attention_kernels\n")
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    result = run_cli("dump", "gpt2-tiny", "--stage", "captured", env=env)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("TRITON_INTERPRET=")] == [
        "TRITON_INTERPRET=None", "TRITON_INTERPRET=1"]
    assert result.stdout.startswith("# ---- graph 0: captured")


def test_demo_passes_on_a_tiny_model():
    env = _env()
    env.pop("TRITON_INTERPRET", None)  # the command sets it itself without a GPU
    result = run_cli("demo", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "llama-tiny" in out.splitlines()[0] and "interpreter" in out.splitlines()[0]
    checks = [line for line in out.splitlines() if line.startswith(("output", "grad "))]
    assert len(checks) > 10 and all(line.endswith("PASS") for line in checks)
    assert "grad model.embed_tokens.weight" in out or "grad embed_tokens.weight" in out
    assert "flashfx report" in out and out.rstrip().splitlines()[-1].startswith("PASS")


def test_demo_fails_with_exit_1_when_flashfx_is_wrong(capsys, monkeypatch):
    # A stand-in for flashfx.optimize that is off by 1e-3 relative: every output and gradient must FAIL.
    import flashfx

    class Off(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            return self.model(**inputs) * 1.001

        @property
        def report(self):
            return type("R", (), {"text": lambda self: "stand-in report"})()

    monkeypatch.setattr(flashfx, "optimize", lambda model, config=None: Off(model))
    code, out, err = run_inprocess(["demo", "gpt2-tiny", "--batch", "1", "--seq", "4"], capsys)
    assert code == 1, err
    checks = [line for line in out.splitlines() if line.startswith(("output", "grad "))]
    assert checks and all(line.endswith("FAIL") for line in checks)
    assert "stand-in report" in out and out.rstrip().splitlines()[-1].startswith("FAIL")


def test_bench_dispatches_to_the_suite(capsys):
    from flashfx.cli import main

    assert main(["bench", "--list"]) == 0
    assert "llama-train" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_bench_without_cuda_is_one_line_exit_2(capsys):
    from flashfx.cli import main

    assert main(["bench", "llama-train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and len(err.splitlines()) == 1
