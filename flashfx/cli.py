"""The `flashfx` command line: `models`, `dump`, `demo`.

    flashfx models                                        # the built-in models
    flashfx dump llama-tiny --stage all --format text     # graphs before/after the passes, and the IO report
    flashfx dump gpt2-tiny --format onnx --out dump/      # the rewritten graph for Netron
    flashfx demo                                          # optimize a model, check it against eager

MODEL is a zoo name, `hf:<Architecture>` or `path/to/file.py:factory` (see `flashfx.zoo.load`).
A bad input exits with status 2 and one line on stderr naming the problem and the fix.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

STAGES = ("captured", "rewritten", "aten", "kernels")
FORMATS = ("text", "json", "svg", "onnx")
DEFAULT_OUT = "flashfx-dump"
# Largest error allowed relative to the reference's largest magnitude, by dtype. fp32 on the GPU allows for TF32
# tensor-core dots in the generated kernels; on the CPU (Triton interpreter) fp32 is computed in fp32.
TOLERANCE = {"float32": 1e-5, "float32-tf32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2, "float64": 1e-10}


class UsageError(Exception):
    """A bad input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a positive integer such as 2") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give a positive integer such as 2")
    return value


def _config_option(text: str) -> Tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE; write e.g. --config fusion=false")
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    if lowered in ("none", "null"):
        return key.strip(), None
    for kind in (int, float):
        try:
            return key.strip(), kind(raw)
        except ValueError:
            pass
    return key.strip(), raw


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flashfx", description="flashfx: a graph compiler for PyTorch transformer models.",
                     epilog="MODEL is a zoo name (flashfx models), hf:<Architecture> (e.g. hf:LlamaForCausalLM) "
                            "or path/to/file.py:factory.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="list the built-in models",
                                 description="List the built-in (zoo) models with their sizes.")
    models.set_defaults(run=cmd_models)

    dump = commands.add_parser(
        "dump", help="print or write a model's graphs at each stage, and the report",
        description="Capture MODEL, run flashfx's passes, and show the graphs: captured (Dynamo), rewritten (after "
                    "the torch-level passes), aten (forward/backward after AOTAutograd and fusion) and kernels "
                    "(generated Triton source). text/json go to stdout unless --out is given; svg and onnx write "
                    f"files into --out (default ./{DEFAULT_OUT}/) and print their paths.")
    dump.add_argument("model", metavar="MODEL", help="zoo name, hf:<Architecture> or path/to/file.py:factory")
    _add_size_options(dump)
    dump.add_argument("--stage", choices=(*STAGES, "all"), default="all",
                      help="which graphs (default: all; svg/onnx draw the torch-level graphs, 'all' meaning both "
                           "for svg and the rewritten one for onnx)")
    dump.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    dump.add_argument("--out", metavar="DIR", help=f"directory to write into (default for svg/onnx: ./{DEFAULT_OUT}/)")
    mode = dump.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true",
                      help="trace the model in training mode (dropout on); the aten stage shows forward and backward")
    mode.add_argument("--inference", action="store_true",
                      help="trace under torch.no_grad(): the aten stage shows the one inference graph")
    _add_config_option(dump)
    dump.set_defaults(run=cmd_dump)

    demo = commands.add_parser(
        "demo", help="optimize a built-in model and check it against eager",
        description="Optimize MODEL with flashfx, check every output and every parameter gradient against eager "
                    "PyTorch (max abs / rel error, PASS or FAIL; exit status 1 on FAIL) and print flashfx's report. "
                    "Without a GPU the generated kernels run in the Triton interpreter at a small size; on a GPU the "
                    "model runs at a real size and eager and flashfx are timed.")
    demo.add_argument("model", metavar="MODEL", nargs="?", default=None,
                      help="default: llama-tiny (CPU), gpt2 (GPU)")
    _add_size_options(demo)
    demo.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                      help="parameter/activation dtype (default fp32; fp16/bf16 need a GPU)")
    demo.add_argument("--iters", type=_positive_int, default=20, help="timed iterations on a GPU (default: 20)")
    _add_config_option(demo)
    demo.set_defaults(run=cmd_demo)

    # Listed here for --help; main() hands everything after `bench` to bench/run.py unparsed.
    commands.add_parser("bench", add_help=False, help="run the GPU benchmark suite (bench/run.py; needs CUDA)",
                        description="See `flashfx bench --help`.")
    return parser


def _add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=_positive_int, metavar="B", help="batch size (default: the model's own)")
    p.add_argument("--seq", type=_positive_int, metavar="S", help="sequence length (default: the model's own)")


def _add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=_config_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a flashfx.Config option, repeatable (e.g. --config fusion=false --config attention=off)")


# ---------------------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:
        return cmd_bench(raw[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("dump", "demo"):
        _use_triton_interpreter_without_gpu(reexec=argv is None)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"flashfx {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flashfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flashfx dump ... | head`: the reader has gone; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 0


def _use_triton_interpreter_without_gpu(reexec: bool) -> None:
    """Without a GPU, flashfx's Triton kernels can only run through the interpreter, which Triton picks when each
    kernel is defined: TRITON_INTERPRET=1 must be set before flashfx's kernel modules are imported."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if not _compiled_mode_kernels_loaded():
        os.environ["TRITON_INTERPRET"] = "1"
    elif reexec:
        # Some kernel module was imported (with `import flashfx`) before this point: start again with the
        # interpreter on from the first import.
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "flashfx", *sys.argv[1:]])
    # Called in-process (main(argv)) after kernels were defined for a GPU: leave the interpreter off, so
    # flashfx's ops use their ATen reference implementations on the CPU rather than fail.


def _compiled_mode_kernels_loaded() -> bool:
    """Whether Triton's language module (imported by torch or flashfx already) made its functions for compiled mode;
    then an interpreted kernel cannot call them (tl.sum and friends), and the interpreter must be on from the start."""
    language = sys.modules.get("triton.language")
    if language is None:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(language, "sum", None), JITFunction)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------- bench

def cmd_bench(argv: List[str]) -> int:
    """`flashfx bench [WORKLOAD ...] [--quick] ...`: bench/run.py of a source checkout, arguments passed through."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "run.py").is_file():
        print("flashfx bench: error: needs a source checkout of flashfx (bench/ is not installed with the package); "
              "clone the repository and `pip install -e .`", file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo))
    from bench.run import main as bench_main

    return bench_main(argv)


# ---------------------------------------------------------------------------------------------------- models

def cmd_models(args: argparse.Namespace) -> int:
    from flashfx import zoo

    rows = zoo.list_models()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    print("\nAlso: hf:<Architecture> (e.g. hf:LlamaForCausalLM, built small with random weights) and "
          "path/to/file.py:factory.")
    return 0


# ---------------------------------------------------------------------------------------------------- dump

def cmd_dump(args: argparse.Namespace) -> int:
    if args.format in ("svg", "onnx") and args.stage in ("aten", "kernels"):
        raise UsageError(f"--format {args.format} draws the torch-level graphs; use --stage captured, rewritten or "
                         f"all (or --format text/json for the {args.stage} stage)")
    out_dir = args.out if args.out is not None else (DEFAULT_OUT if args.format in ("svg", "onnx") else None)
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir!r} is a file, not a directory; give a directory path")
    if args.format == "svg":
        from flashfx.rewriter.draw import GraphvizMissing, require_graphviz

        try:
            require_graphviz()  # before the model is traced, so a missing install costs no waiting
        except GraphvizMissing as e:
            raise UsageError(str(e)) from None
    config = _config(args.config)
    import torch

    # On a GPU the model runs there, so the kernels stage shows what flashfx compiles for it.
    model, inputs = _load(args.model, args.batch, args.seq, device="cuda" if torch.cuda.is_available() else "cpu")
    if args.train:
        model.train()

    with torch.no_grad() if args.inference else contextlib.nullcontext():
        graphs, report = _trace(model, inputs, config, captured_only=args.stage == "captured")
    if out_dir is not None:
        _check_out_dir(out_dir)  # created only now, so that a typo in MODEL leaves no empty directory behind
    slug = _slug(args.model)
    if args.format == "text":
        return _emit(_dump_text(graphs, report, args.stage), out_dir, f"{slug}.txt")
    if args.format == "json":
        doc = _dump_json(graphs, report, args)
        return _emit(json.dumps(doc, indent=2, default=str) + "\n", out_dir, f"{slug}.json")

    stages = ("captured", "rewritten") if args.format == "svg" and args.stage == "all" else \
        ("captured",) if args.stage == "captured" else ("rewritten",)
    paths = []
    for g in graphs:
        for stage in stages:
            gm = getattr(g, stage)
            path = os.path.join(out_dir, f"{slug}-graph{g.index}-{stage}.{args.format}")
            if args.format == "svg":
                from flashfx.rewriter.draw import to_svg

                _write(path, to_svg(gm, g.symbol_names, title=f"{args.model}: graph {g.index}, {stage}"))
            else:
                import onnx

                from flashfx.rewriter.onnx_export import to_onnx

                model_proto = to_onnx(gm, g.symbol_names, name=f"{slug}_graph{g.index}_{stage}")
                onnx.checker.check_model(model_proto, full_check=True)
                _write(path, model_proto.SerializeToString())
            paths.append(path)
    print("\n".join(paths))
    return 0


class _Frame:
    """One captured graph, shaped like the report's per-graph entries (index, captured, symbol_names)."""

    def __init__(self, index: int, gm: Any, symbol_names: Dict[Any, Any]) -> None:
        self.index, self.captured, self.symbol_names = index, gm, symbol_names


def _trace(model: Any, inputs: Dict[str, Any], config: Any, captured_only: bool) -> Tuple[List[Any], Any]:
    """The graphs of `model(**inputs)`: captured only (fast: no passes, no compilation), or the whole report."""
    if captured_only:
        from flashfx.rewriter.capture import capture

        captured = capture(model, (), inputs, dynamic=True)
        return [_Frame(i, g.gm, g.symbol_names) for i, g in enumerate(captured)], None
    import flashfx

    report = flashfx.explain(model, config=config, **inputs)
    return list(report.graphs), report


def _dump_text(graphs: List[Any], report: Any, stage: str) -> str:
    if report is None:  # --stage captured
        return "\n\n".join(f"# ---- graph {g.index}: captured\n{g.captured.code.strip()}" for g in graphs) + "\n"
    if stage != "all":
        return report.stage_text(stage)
    parts = [f"######## {s}\n{report.stage_text(s).rstrip()}" for s in STAGES]
    parts.append(f"######## report\n{report.text()}")
    return "\n\n".join(parts) + "\n"


def _dump_json(graphs: List[Any], report: Any, args: argparse.Namespace) -> Dict[str, Any]:
    doc: Dict[str, Any] = {"model": args.model, "batch": args.batch, "seq": args.seq, "stage": args.stage}
    if report is None:
        from flashfx.rewriter import cost as cost_model

        doc["graphs"] = []
        for g in graphs:
            c = cost_model.graph_cost(g.captured)
            readable = {str(k): str(v) for k, v in g.symbol_names.items()}
            doc["graphs"].append({
                "index": g.index, "symbols": readable, "code": g.captured.code.strip(),
                "flops": c.flops_value, "hbm_bytes": c.bytes_value,
                "flops_symbolic": str(c.flops.subs(g.symbol_names)),
                "hbm_bytes_symbolic": str(c.hbm_bytes.subs(g.symbol_names)),
            })
        return doc
    stages = STAGES if args.stage == "all" else (args.stage,)
    doc["stages"] = {s: report.stage_text(s) for s in stages}
    doc["report"] = report.to_json()
    return doc


def _emit(text: str, out_dir: Optional[str], filename: str) -> int:
    if out_dir is None:
        sys.stdout.write(text)
        return 0
    path = os.path.join(out_dir, filename)
    _write(path, text)
    print(path)
    return 0


def _check_out_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out directory {path!r} ({e.strerror}); give a writable directory")
    if not os.access(path, os.W_OK):
        raise UsageError(f"--out directory {path!r} is not writable; give a writable directory")


def _write(path: str, data: Any) -> None:
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _slug(spec: str) -> str:
    spec = spec.strip()
    if ".py:" in spec:
        path, _, factory = spec.rpartition(":")
        spec = f"{os.path.splitext(os.path.basename(path))[0]}-{factory}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec).strip("-") or "model"


# ---------------------------------------------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    gpu = torch.cuda.is_available()
    dtype_name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", None: "float32"}[args.dtype]
    if dtype_name != "float32" and not gpu:
        raise UsageError(f"--dtype {args.dtype} needs a GPU (the Triton interpreter computes fp16/bf16 inexactly "
                         "on the CPU); leave --dtype out on this machine")
    config = _config(args.config)
    spec = args.model or _default_demo_model(gpu)
    device = "cuda" if gpu else "cpu"
    model, inputs = _load(spec, args.batch, args.seq, dtype=dtype_name, device=device)
    import flashfx

    print(f"flashfx demo: {spec} on {_device_name(device)}, {dtype_name}, "
          f"{'Triton kernels compiled for the GPU' if gpu else 'Triton kernels in the interpreter (no GPU)'}")
    print(f"inputs: {', '.join(f'{k}{_shape(v)}' for k, v in inputs.items())}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    print(f"parameters: {sum(p.numel() for _, p in params):,} in {len(params)} tensors")

    torch.manual_seed(0)
    ref_outs, ref_grads, weights = _run_step(model, inputs, params, weights=None)
    fast = flashfx.optimize(model, config=config)
    start = time.perf_counter()
    outs, grads, _ = _run_step(fast, inputs, params, weights=weights)
    compile_s = time.perf_counter() - start

    tol_key = "float32-tf32" if gpu and dtype_name == "float32" else dtype_name
    tol = TOLERANCE[tol_key]
    rows = [(f"output {name}", ref, got) for (name, ref), (_, got) in zip(ref_outs, outs)]
    rows += [(f"grad {name}", ref, got) for (name, _), ref, got in zip(params, ref_grads, grads)]
    ok = _print_checks(rows, tol, tol_key)
    print(f"\nfirst call (compile + run, forward and backward): {compile_s:.1f} s")
    if gpu:
        _print_timings(model, fast, inputs, params, weights, args.iters)
    print()
    print(fast.report.text())
    print(f"\n{'PASS' if ok else 'FAIL'}: {len(rows)} tensors checked against eager "
          f"(max error <= {tol:g} x the largest reference magnitude, {tol_key})")
    return 0 if ok else 1


def _default_demo_model(gpu: bool) -> str:
    from flashfx import zoo

    names = [name for name, _ in zoo.list_models()]
    wanted = "gpt2" if gpu else "llama-tiny"  # a real size on the GPU, the interpreter's size on the CPU
    return wanted if wanted in names else names[0]


def _run_step(model: Any, inputs: Dict[str, Any], params: List[Tuple[str, Any]],
              weights: Optional[List[Any]]) -> Tuple[List[Tuple[str, Any]], List[Any], List[Any]]:
    """Outputs, and the gradient of sum(w_i * output_i) for every parameter (w_i random, fixed across runs, so that
    every output element matters with its own weight). `.grad` is left untouched."""
    import torch

    out = model(**inputs)
    named = _float_outputs(out)
    if weights is None:
        gen = torch.Generator(device="cpu").manual_seed(1)
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device) for _, t in named]
    grads: List[Any] = [None] * len(params)
    differentiable = [(t, w) for (_, t), w in zip(named, weights) if t.requires_grad]
    if differentiable and params:
        loss = sum((t.float() * w).sum() for t, w in differentiable)
        grads = list(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))
    return [(n, t.detach()) for n, t in named], [None if g is None else g.detach() for g in grads], weights


def _float_outputs(out: Any) -> List[Tuple[str, Any]]:
    import torch
    from torch.utils import _pytree as pytree

    if hasattr(out, "to_tuple") and not isinstance(out, torch.Tensor):  # Hugging Face ModelOutput
        out = out.to_tuple()
    leaves, _ = pytree.tree_flatten_with_path(out)
    return [(pytree.keystr(path), t) for path, t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _errors(ref: Any, got: Any) -> Tuple[float, float]:
    import torch

    if ref is None or got is None:
        return (0.0, 0.0) if ref is None and got is None else (float("inf"), float("inf"))
    ref64, got64 = ref.double(), got.double()
    if ref64.shape != got64.shape:
        return float("inf"), float("inf")
    if not torch.isfinite(got64).eq(torch.isfinite(ref64)).all():
        return float("inf"), float("inf")
    finite = torch.isfinite(ref64)
    diff = (ref64 - got64)[finite].abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = ref64[finite].abs().max().item() if diff.numel() else 0.0
    return max_abs, max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))


def _print_checks(rows: List[Tuple[str, Any, Any]], tol: float, tol_key: str) -> bool:
    width = max(len(name) for name, _, _ in rows) if rows else 10
    print(f"\n{'tensor':<{width}}  {'shape':<22}{'max abs err':>13}{'max rel err':>13}  result")
    ok = True
    for name, ref, got in rows:
        max_abs, max_rel = _errors(ref, got)
        passed = max_rel <= tol
        ok &= passed
        shape = "none" if ref is None else "x".join(map(str, ref.shape)) or "scalar"
        print(f"{name:<{width}}  {shape:<22}{max_abs:>13.3e}{max_rel:>13.3e}  {'PASS' if passed else 'FAIL'}")
    print(f"(max rel err = max |flashfx - eager| / max |eager|; PASS when <= {tol:g} for {tol_key})")
    return ok


def _print_timings(model: Any, fast: Any, inputs: Dict[str, Any], params: List[Tuple[str, Any]],
                   weights: List[Any], iters: int) -> None:
    import torch

    def step(m: Any) -> None:
        _run_step(m, inputs, params, weights)

    print(f"\ntime per training step (forward + backward), median of {iters} after warm-up:")
    results = {}
    for label, m in (("eager", model), ("flashfx", fast)):
        for _ in range(3):
            step(m)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(m)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        results[label] = statistics.median(times)
        p20, _, _, p80 = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"  {label:<8} {results[label]:9.2f} ms   (p20 {p20:.2f}, p80 {p80:.2f})   peak memory {peak:.2f} GiB")
    print(f"  speedup  {results['eager'] / results['flashfx']:.2f}x")


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return "CPU"


def _shape(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"[{', '.join(map(str, value.shape))}] {str(value.dtype).removeprefix('torch.')}"
    return f"={value!r}"


# ---------------------------------------------------------------------------------------------------- shared

def _load(spec: str, batch: Optional[int], seq: Optional[int], **kwargs: Any) -> Tuple[Any, Dict[str, Any]]:
    from flashfx import zoo

    try:
        return zoo.load(spec, batch=batch, seq=seq, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def _config(options: List[Tuple[str, Any]]) -> Any:
    import flashfx

    try:
        return flashfx.Config(**dict(options))
    except (ValueError, TypeError) as e:
        raise UsageError(f"--config: {e}") from None
