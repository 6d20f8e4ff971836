"""The benchmark harness's logic on the CPU: statistics, tables, the doc update, failure handling, no-CUDA exit."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, measure, providers, run  # noqa: E402


# ----------------------------------------------------------------------------------------- statistics

def test_quantile_interpolates_like_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert measure.quantile(xs, 0.5) == 3.0
    assert measure.quantile(xs, 0.2) == pytest.approx(1.8)
    assert measure.quantile(xs, 0.8) == pytest.approx(4.2)
    assert measure.quantile(xs, 0.0) == 1.0 and measure.quantile(xs, 1.0) == 5.0
    assert measure.quantile([7.0], 0.2) == 7.0
    assert measure.quantile([1.0, 2.0], 0.5) == 1.5


def test_quantile_matches_sorted_reference_on_random_samples():
    gen = torch.Generator().manual_seed(3)
    xs = torch.rand(37, generator=gen).tolist()
    for q in (0.2, 0.5, 0.8):
        assert measure.quantile(xs, q) == pytest.approx(torch.quantile(torch.tensor(xs, dtype=torch.float64), q)
                                                       .item(), rel=1e-12)


def test_quantile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="empty"):
        measure.quantile([], 0.5)
    with pytest.raises(ValueError, match="q=1.5"):
        measure.quantile([1.0], 1.5)


def test_summarize_reports_median_and_20_80():
    s = measure.summarize([10.0, 12.0, 11.0, 30.0, 9.0])
    assert s == {"ms": 11.0, "ms_p20": pytest.approx(9.8), "ms_p80": pytest.approx(15.6), "repeats": 5}


def test_max_rel_error_is_relative_to_reference_scale():
    ref = torch.tensor([0.0, 2.0, -4.0])
    assert measure.max_rel_error(torch.tensor([0.1, 2.0, -4.0]), ref) == pytest.approx(0.025)
    assert measure.max_rel_error(ref.clone(), ref) == 0.0
    assert measure.max_rel_error(torch.tensor([float("nan"), 0.0, 0.0]), ref) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        measure.max_rel_error(torch.zeros(2), ref)


def test_time_ms_on_cpu_returns_one_sample_per_repeat():
    calls = []
    samples = measure.time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeat=4)
    assert len(samples) == 4 and len(calls) == 6 and all(s >= 0 for s in samples)


# ----------------------------------------------------------------------------------------- errors

def test_one_line_names_the_error_under_dynamo_wrappers():
    from torch._dynamo.exc import BackendCompilerFailed
    try:
        try:
            raise AssertionError("Mixing fake modes <torch._subclasses.fake_tensor.FakeTensorMode object at 0x7f1>")
        except AssertionError as inner:
            raise RuntimeError(f"flashfx pass 'attention' failed: {inner}\nsecond line") from inner
    except RuntimeError as mid:
        wrapped = BackendCompilerFailed("<flashfx.compiler.Compiler object at 0x7f2>", mid, None)
        wrapped.__cause__ = mid
    text = measure.one_line(wrapped)
    assert text == ("BackendCompilerFailed ← RuntimeError: flashfx pass 'attention' failed: Mixing fake modes "
                    "<FakeTensorMode>")
    assert len(measure.one_line(ValueError("x" * 500))) == 200


def test_no_cuda_exits_2_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.main(["llama-train", "--no-docs"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--device cpu --tiny" in err


def test_unknown_workload_and_provider_are_usage_errors(capsys):
    assert run.main(["llama-trian"]) == 2
    assert "unknown workload 'llama-trian'" in capsys.readouterr().err
    with pytest.raises(measure.BenchError, match="unknown provider"):
        providers.parse_providers("eager,flashfxx", [])


def test_liger_runs_last_and_order_is_kept():
    assert providers.order_providers(["liger", "eager", "flashfx", "eager"]) == ["eager", "flashfx", "liger"]


# ----------------------------------------------------------------------------------------- run_case

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def _tiny_case(training, dtype=torch.float32):
    torch.manual_seed(0)  # a rebuilt case has the same weights, as build_hf's seeded models do
    model = _Tiny().to(dtype)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def step(fn):
        if training:
            model.zero_grad(set_to_none=True)
            loss = fn(x.to(next(model.parameters()).dtype)).float().square().mean()
            loss.backward()
            return loss.detach()
        with torch.no_grad():
            return fn(x)
    return common.Case(name="tiny", model=model, step=step, training=training, flops=2.0 * 4 * 8 * 8, tokens=4,
                       grad_params=("lin.weight",))


def test_run_case_records_a_failure_and_goes_on(monkeypatch):
    def boom(model, case, opts):
        raise RuntimeError("kernel exploded\nwith a traceback")
    table = {"eager": providers.Provider("eager", "plain"),
                 "boom": providers.Provider("boom", "fails", wrap=boom, compiles=True),
                 "sdpa": providers.Provider("sdpa", "plain again")}
    monkeypatch.setattr(providers, "PROVIDERS", table)
    records = []
    opts = common.Options(device=torch.device("cpu"), tiny=True)
    common.run_case(_tiny_case(training=True), ["eager", "boom", "sdpa"], opts, {}, records.append)
    final = {r["provider"]: r for r in records if r["status"] != "started"}
    assert final["boom"]["status"] == "failed"
    assert final["boom"]["error"] == "RuntimeError: kernel exploded"
    assert final["eager"]["status"] == "ok" and final["sdpa"]["status"] == "ok"
    assert final["sdpa"]["reference"] == "eager"
    assert final["sdpa"]["loss"] == final["eager"]["loss"] and final["sdpa"]["grad_rel_err"] == 0.0
    assert final["eager"]["tokens_per_s"] > 0 and final["eager"]["repeats"] == 3


def test_16bit_training_rows_are_also_compared_with_the_fp32_step(monkeypatch):
    table = {"eager": providers.Provider("eager", "plain"), "sdpa": providers.Provider("sdpa", "plain again")}
    monkeypatch.setattr(providers, "PROVIDERS", table)
    records = []
    case = _tiny_case(training=True, dtype=torch.bfloat16)
    common.run_case(case, ["eager", "sdpa"], common.Options(device=torch.device("cpu"), tiny=True), {}, records.append)
    final = {r["provider"]: r for r in records if r["status"] != "started"}
    # eager's own bf16 rounding is the yardstick: nonzero, and the same model run again scores the same
    assert 0.0 < final["eager"]["grad_rel_err_fp32"] < 0.05
    assert final["sdpa"]["grad_rel_err_fp32"] == final["eager"]["grad_rel_err_fp32"]
    assert final["eager"]["grad_worst_fp32"] == "lin.weight" and final["eager"]["loss_rel_err_fp32"] < 0.05
    assert all(p.dtype == torch.bfloat16 for p in case.model.parameters())  # cast back after the fp32 step


def test_run_case_skips_past_the_deadline_and_training_only_on_inference(monkeypatch):
    table = {"eager": providers.Provider("eager", "plain", est_s=1.0),
                 "amb": providers.Provider("amb", "train only", training_only=True)}
    monkeypatch.setattr(providers, "PROVIDERS", table)
    records = []
    opts = common.Options(device=torch.device("cpu"), deadline=0.0)  # long past
    common.run_case(_tiny_case(training=False), ["eager", "amb"], opts, {}, records.append)
    assert [(r["provider"], r["status"], r["error"]) for r in records] == [
        ("eager", "skipped", "time budget spent"),
        ("amb", "skipped", "training-only provider on an inference workload")]


def test_plan_runs_liger_last_and_keeps_the_eager_reference(monkeypatch, tmp_path):
    table = {"eager": providers.Provider("eager", "plain"), "liger": providers.Provider("liger", "patches classes"),
                 "sdpa": providers.Provider("sdpa", "plain")}
    monkeypatch.setattr(providers, "PROVIDERS", table)
    table = {n: common.Workload(n, n, lambda opts, t=t: _tiny_case(training=t), ("eager", "liger", "sdpa"),
                                ("eager", "liger", "sdpa")) for n, t in (("a", True), ("b", False))}
    monkeypatch.setattr(run, "workloads", lambda: table)
    args = run.parse_args(["a", "b", "--device", "cpu", "--tiny", "--no-docs"])
    plan = run.make_plan(["a", "b"], args)
    assert plan == [("a", "eager"), ("a", "sdpa"), ("b", "eager"), ("b", "sdpa"), ("a", "liger"), ("b", "liger")]
    out = tmp_path / "r.jsonl"
    run.execute_plan(plan, args, torch.device("cpu"), str(out), "r1", None, {})
    results = [r for r in common.read_jsonl(str(out)) if r["type"] == "result"]
    assert [(r["workload"], r["provider"]) for r in results] == plan
    liger = {r["workload"]: r for r in results if r["provider"] == "liger"}
    assert liger["a"]["reference"] == "eager" and liger["a"]["loss_rel_err"] == 0.0
    assert liger["b"]["reference"] == "eager" and liger["b"]["max_rel_err"] == 0.0


def test_loss_only_wrapper_returns_the_models_loss_and_shares_parameters():
    class Out:
        def __init__(self, loss, logits):
            self.loss, self.logits = loss, logits

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x, labels):
            logits = self.head(x)
            return Out(torch.nn.functional.cross_entropy(logits, labels), logits)
    lm = LM()
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    wrapped = providers.LossOnly(lm)
    assert torch.equal(wrapped(x=x, labels=y), lm(x, labels=y).loss)
    assert [p is q for p, q in zip(wrapped.parameters(), lm.parameters())] == [True, True]
    plain = torch.nn.Linear(4, 1)  # a model that returns its loss itself (flashfx.zoo) passes through
    assert torch.equal(providers.LossOnly(plain)(input=x), plain(x))


def test_isolated_runner_records_a_crash_and_restarts_for_the_rest(monkeypatch, tmp_path):
    """A child that dies mid-provider costs that provider alone; a fresh child gets the remaining pairs."""
    out = str(tmp_path / "r.jsonl")
    plans = []

    def fake_spawn(cmd, timeout):
        plan = [tuple(p) for p in json.loads(cmd[cmd.index("--plan") + 1])]
        plans.append(plan)
        for i, (wl, p) in enumerate(plan):
            common.append_jsonl(out, {"type": "event", "run_id": "r1", "workload": wl, "provider": p,
                                      "status": "started"})
            if len(plans) == 1 and i == 1:  # the first child dies in its second provider
                return -11, ["[bench 3.0s] a · sdpa: compiling\n", "Segmentation fault\n"], False
            common.append_jsonl(out, {"type": "result", "run_id": "r1", "workload": wl, "provider": p,
                                      "status": "ok", "ms": 1.0})
        return 0, [], False
    monkeypatch.setattr(run, "_spawn", fake_spawn)
    args = run.parse_args(["llama-train", "--no-docs"])
    plan = [("a", "eager"), ("a", "sdpa"), ("b", "eager"), ("a", "liger")]
    run._run_isolated(plan, args, out, "r1", None, {})
    assert plans == [plan, [("b", "eager"), ("a", "liger")]]
    results = {(r["workload"], r["provider"]): r for r in common.read_jsonl(out) if r["type"] == "result"}
    assert set(results) == set(plan)
    assert results[("a", "sdpa")]["status"] == "failed"
    assert results[("a", "sdpa")]["error"] == "process died (exit -11): Segmentation fault"


def test_isolated_runner_marks_the_rest_skipped_at_the_budget(monkeypatch, tmp_path):
    out = str(tmp_path / "r.jsonl")

    def fake_spawn(cmd, timeout):
        common.append_jsonl(out, {"type": "event", "run_id": "r1", "workload": "a", "provider": "eager",
                                  "status": "started"})
        return -9, ["[bench 99.0s] a · eager: compiling\n"], True
    monkeypatch.setattr(run, "_spawn", fake_spawn)
    run._run_isolated([("a", "eager"), ("a", "sdpa")], run.parse_args(["--no-docs"]), out, "r1", 0.0, {})
    results = [(r["provider"], r["status"], r["error"]) for r in common.read_jsonl(out) if r["type"] == "result"]
    assert results == [("eager", "timeout", "unfinished at the time budget (was compiling)"),
                       ("sdpa", "skipped", "time budget spent")]


def test_hf_llama_tiny_end_to_end_on_cpu(tmp_path):
    """The real workload path (HF model build, providers, JSON lines) at tiny size: eager vs SDPA agree."""
    out = tmp_path / "r.jsonl"
    rc = run.main(["llama-train", "--device", "cpu", "--tiny", "--providers", "eager,sdpa", "--warmup", "0",
                   "--repeat", "1", "--no-docs", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    results = {r["provider"]: r for r in recs if r["type"] == "result"}
    assert results["eager"]["status"] == "ok" and results["sdpa"]["status"] == "ok", results
    assert results["sdpa"]["loss_rel_err"] < 1e-5 and results["sdpa"]["grad_rel_err"] < 1e-4
    assert {r["type"] for r in recs} >= {"run", "ceilings", "event", "result"}


def test_zoo_training_workloads_run_on_cpu(tmp_path):
    """The plain-PyTorch zoo models as training workloads (they return the loss itself, not an HF output)."""
    out = tmp_path / "z.jsonl"
    rc = run.main(["zoo-gpt2-train", "zoo-llama-train", "--device", "cpu", "--tiny", "--providers", "eager",
                   "--warmup", "0", "--repeat", "1", "--no-docs", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    results = {r["workload"]: r for r in recs if r["type"] == "result"}
    assert {w: r["status"] for w, r in results.items()} == {"zoo-gpt2-train": "ok", "zoo-llama-train": "ok"}


def test_layers_option_shrinks_every_workload_model():
    from bench.run import workloads

    def blocks(model):  # the transformer layers actually built (HF and zoo class names)
        names = ("DecoderLayer", "GPT2Block", "LlamaBlock", "BertLayer", "ViTLayer")
        return sum(type(m).__name__.endswith(names) for m in model.modules())

    built = {}
    for layers in (1, 2):
        opts = common.Options(device=torch.device("cpu"), tiny=True, layers=layers)
        for name in workloads():
            model = workloads()[name].build(opts).model
            assert model.config.num_hidden_layers == layers, name
            built.setdefault(name, []).append(blocks(model))
    assert all(counts[0] >= 1 and counts[1] == 2 * counts[0] for counts in built.values()), built


# ----------------------------------------------------------------------------------------- tables and doc

def test_markdown_table_escapes_pipes_and_checks_width():
    table = common.markdown_table(["a", "b"], [[1, "x|y"], [None, "two\nlines"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "|  | two lines |"]
    with pytest.raises(ValueError, match="3 cells"):
        common.markdown_table(["a", "b"], [[1, 2, 3]])


def _records():
    base = {"type": "result", "run_id": "r1", "workload": "llama-train"}
    ok = dict(status="ok", ms_p20=1.0, ms_p80=3.0, repeats=10, tokens_per_s=5e4, tflops=100.0, mfu=0.125)
    return [
        {"type": "run", "run_id": "r1", "device": "NVIDIA H100", "date": "2026-11-23", "quick": True,
         "versions": {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}},
        {"type": "ceilings", "run_id": "r1", "matmul_tflops": 800.0, "copy_gbps": 3000.0},
        {"type": "event", "run_id": "r1", "workload": "llama-train", "provider": "-", "status": "started",
         "describe": "tiny llama", "flops": 3.26e13},
        {**base, **ok, "provider": "eager", "ms": 2.0, "peak_gb": 9.0, "loss": 12.0},
        {**base, **ok, "provider": "compile", "ms": 1.5, "peak_gb": 6.0, "loss": 12.0, "loss_rel_err": 0.0,
         "grad_rel_err": 1e-3, "compile_s_cold": 30.0, "compile_s_warm": 5.0},
        {**base, **ok, "provider": "flashfx", "ms": 1.8, "peak_gb": 5.0, "loss": 12.01, "loss_rel_err": 8e-4,
         "grad_rel_err": 2e-3, "compile_s_cold": 40.0},
        {**base, "provider": "flashfx-attention", "status": "failed", "error": "RuntimeError: a|b"},
    ]


def test_workload_table_bolds_the_best_and_shows_failures():
    _, _, results, _ = run.latest(_records())
    table = run.workload_table("llama-train", results["llama-train"]).splitlines()
    assert table[0].startswith("| provider | ms (p20–p80) | tok/s | TFLOP/s (MFU) | peak GB |")
    compile_row = next(r for r in table if r.startswith("| compile "))
    assert "**1.50 (1.00–3.00)**" in compile_row and "30.0 / 5.0" in compile_row
    flashfx_row = next(r for r in table if r.startswith("| flashfx "))
    assert "**5.00**" in flashfx_row and "12.0100 (8.0e-04) / 2.0e-03" in flashfx_row
    failed = next(r for r in table if r.startswith("| flashfx-attention "))
    assert "failed: RuntimeError: a\\|b" in failed
    assert all(r.count(" | ") == table[0].count(" | ") for r in table if not r.startswith("|---"))


def test_verdicts_say_where_flashfx_loses_and_issue5_targets():
    _, _, results, _ = run.latest(_records())
    (line,) = run.verdicts(results)
    assert "1.20× slower" in line and "flashfx loses" in line and "Failed: flashfx-attention" in line
    (target,) = run.issue5_targets(results)
    assert "meets ≤ 7.0 GB" in target and "misses ≤ compile" in target
    # a single-pass variant shows what one pass gives; issue 5 judges flashfx as users run it
    one_pass = {**results["llama-train"]["flashfx"], "provider": "flashfx-fusion"}
    results["llama-train"]["flashfx-fusion"] = one_pass
    assert [t for t in run.issue5_targets(results) if "flashfx-fusion" in t] == []


def test_update_doc_replaces_only_the_generated_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    run.update_doc(str(doc), run.render_section(_records()))
    first = doc.read_text()
    assert first.startswith("# Benchmarks") and "NVIDIA H100" in first and "800 TFLOP/s" in first
    assert run.SECTION_HEADING in first
    # Another engineer's section after ours, and a hand-written note before it, must survive a regeneration.
    doc.write_text(first.replace("## Models", "Hand note.\n\n## Models") + "\n## Attention kernel\n\nTheirs.\n")
    records = _records()
    records[3]["ms"] = 0.5
    run.update_doc(str(doc), run.render_section(records))
    second = doc.read_text()
    assert "Hand note." in second and second.endswith("## Attention kernel\n\nTheirs.\n")
    assert second.count(run.DOC_BEGIN) == 1 and "**0.50 (1.00–3.00)**" in second


def test_update_doc_appends_after_existing_sections(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Fusion kernels\n\n| a |\n|---|\n| 1 |\n")
    run.update_doc(str(doc), run.render_section(_records()))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n## Fusion kernels\n\n| a |\n|---|\n| 1 |\n\n" + run.SECTION_HEADING)
    assert text.rstrip().endswith(run.DOC_END)


def test_progress_writes_plain_lines_when_not_a_terminal(tmp_path):
    path = tmp_path / "err.txt"
    with open(path, "w") as f:
        p = common.Progress(stream=f)
        p.update("llama-train · eager: timing")
        p.done()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[bench") and lines[0].endswith("llama-train · eager: timing")


# ----------------------------------------------------------------------------------------- remat curve

def test_remat_curve_budgets_are_checked():
    from bench import remat_curve

    assert remat_curve.parse_budgets("1.0,0.5, 0.05,speed") == [1.0, 0.5, 0.05, "speed"]
    for bad in ("0.5,0", "1.5", "half", "", "fast"):
        with pytest.raises(SystemExit, match="--budgets"):
            remat_curve.parse_budgets(bad)


def test_remat_curve_table_shows_measured_and_predicted_side_by_side():
    from bench import remat_curve

    ok = {"provider": "flashfx", "budget": 0.3, "ms": 70.1, "ms_p20": 69.9, "ms_p80": 70.4, "compile_s": 12.0,
          "loss": 12.16, "measured_peak_bytes": 6.2e9, "predicted_peak_bytes": 5.9e9,
          "predicted_compiled_peak_bytes": 6.0e9, "predicted_activation_bytes": 3.1e9, "extra_flops": 4.2e11}
    failed = {"provider": "compile", "budget": 0.3, "error": "RuntimeError: out of memory"}
    lines = remat_curve.table([ok, failed]).splitlines()
    assert lines[2] == ("| flashfx | 0.3 | 70.10 (69.90–70.40) | 6.20 GB | 5.90 GB; 6.00 GB | 3.10 GB | 420 | 12.0 | "
                        "12.1600 |")
    assert "failed: RuntimeError: out of memory" in lines[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_remat_curve_without_cuda_exits_with_the_bench_code(capsys):
    from bench import remat_curve

    assert remat_curve.main(["--budgets", "0.5"]) == measure.EXIT_NO_CUDA
    assert "CUDA" in capsys.readouterr().err


def test_fresh_compile_caches_point_the_caches_at_a_folder_and_put_the_environment_back(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with providers.fresh_compile_caches(str(tmp_path), "compile") as path:
        assert os.environ["TRITON_CACHE_DIR"] == os.path.join(path, "triton")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(path, "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    with pytest.raises(RuntimeError):
        with measure.environment_restored(["TRITON_CACHE_DIR"]):
            os.environ["TRITON_CACHE_DIR"] = "/changed"
            raise RuntimeError("a failing provider")
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"


def test_attention_tma_ab_without_cuda_exits_with_the_bench_code(capsys):
    from bench import attention_tma

    assert attention_tma.main(["--quick"]) == measure.EXIT_NO_CUDA
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- Nsight Compute bytes

NCU_CSV = '''==PROF== Connected to process 4242
==PROF== Profiling "fused_softmax_4f2a" - 0: 0%....50%....100% - 9 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3","127.0.0.1","fused_softmax_4f2a","1","7","(128, 1, 1)","(16384, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","Mbyte","134.28"
"0","4242","python3","127.0.0.1","fused_softmax_4f2a","1","7","(128, 1, 1)","(16384, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Kbyte","134,217.73"
"0","4242","python3","127.0.0.1","fused_softmax_4f2a","1","7","(128, 1, 1)","(16384, 1, 1)","0","9.0","Command line profiler metrics","sm__cycles_elapsed.avg","cycle","1234"
==PROF== Disconnected from process 4242
'''


def test_ncu_csv_is_parsed_with_units_and_compared():
    from bench import ncu_bytes

    parsed = ncu_bytes.parse_ncu_csv(NCU_CSV)
    assert parsed == {"fused_softmax_4f2a": {"dram__bytes_read.sum": pytest.approx(134.28e6),
                                             "dram__bytes_write.sum": pytest.approx(134.21773e6)}}
    row = ncu_bytes.compare(2 * 16384 * 4096 * 2, parsed)
    assert row["ratio"] == pytest.approx((134.28e6 + 134.21773e6) / (2 * 16384 * 4096 * 2))
    assert ncu_bytes.parse_ncu_csv("==ERROR== no kernels were profiled\n") == {}
    with pytest.raises(ValueError, match="unit 'furlong'"):
        ncu_bytes.parse_ncu_csv(NCU_CSV.replace('"Mbyte"', '"furlong"'))


def test_ncu_cases_predict_the_bytes_a_fused_softmax_must_move():
    # the cost model's HBM bytes for the fused softmax graph: read x once, write y once (bf16)
    from bench import ncu_bytes

    assert {"softmax", "rmsnorm", "add-layernorm", "attention"} <= set(ncu_bytes.cases())
    _, predicted = ncu_bytes.build("softmax", torch.device("cpu"))
    assert predicted == 2 * 16384 * 4096 * 2


def test_ncu_step_mode_takes_flashfx_bytes_from_the_report(tmp_path):
    # the per-step prediction is the report's after-fusion HBM bytes, summed over compiled graphs and stages
    import flashfx
    from bench import ncu_bytes

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    fn = flashfx.optimize(model, cache_dir=str(tmp_path))
    fn(torch.randn(4, 8)).sum().backward()
    costs = [pair for g in fn.report.graphs for pair in g.aten_costs.values()]
    expected = sum(after.bytes_value for _, after in costs)
    got = ncu_bytes._report_costs(fn)
    assert expected > 0 and got["predicted_bytes"] == expected
    assert got["unfused_bytes"] == sum(before.bytes_value for before, _ in costs) >= expected
    assert 0 < got["lower_bound_bytes"] <= expected
    assert ncu_bytes._report_costs(model) == {"predicted_bytes": 0.0, "unfused_bytes": 0.0, "lower_bound_bytes": 0.0}
    row = {"case": "flashfx", **{k: v for k, v in got.items() if k != "predicted_bytes"},
           **ncu_bytes.compare(got["predicted_bytes"], {"k": {"dram__bytes_read.sum": expected}})}
    assert f"{got['unfused_bytes'] / 1e6:.1f} MB / " in ncu_bytes.table([row])


def test_ncu_profiles_between_profiler_start_and_stop_not_an_nvtx_range():
    # NVTX push/pop ranges are per thread: autograd's CUDA worker thread launches the backward outside them
    from bench import ncu_bytes

    cmd = ncu_bytes.ncu_command("ncu", ["--step", "gpt2-train", "--child-provider", "compile"])
    assert cmd[cmd.index("--profile-from-start") + 1] == "off"
    assert not any("nvtx" in word for word in cmd)
    assert cmd[-4:] == ["--step", "gpt2-train", "--child-provider", "compile"]
    measured = {"k1": {"dram__bytes_read.sum": 3.0, "dram__bytes_write.sum": 1.0},
                "k2": {"dram__bytes_read.sum": 2.0}}
    row = ncu_bytes.compare(3.0, measured)
    assert row["kernel_bytes"] == {"k1": 4.0, "k2": 2.0} and row["measured_bytes"] == 6.0 and row["ratio"] == 2.0


def test_render_of_two_runs_names_each_and_flags_a_table_mixed_from_both():
    # two calls fill the suite: each workload's table says which run it came from; a workload whose rows came
    # from two runs is flagged as not side by side
    first = _records()
    second = [dict(r, run_id="r2") for r in _records()]
    second[0]["date"] = "2026-11-24"
    for r in second[2:]:
        r["workload"] = "bert-infer"
    second.append({"type": "result", "run_id": "r2", "workload": "llama-train", "provider": "liger", "status": "ok",
                   "ms": 1.7, "ms_p20": 1.6, "ms_p80": 1.8, "peak_gb": 4.0, "loss": 12.0})
    text = run.render_section(first + second)
    assert "Run `r1`" in text and "Run `r2`" in text and "2026-11-24" in text
    llama = text[text.index("### llama-train"):text.index("### bert-infer")]
    assert "**Not one process:** run `r1`: eager, compile, flashfx, flashfx-attention; run `r2`: liger." in llama
    bert = text[text.index("### bert-infer"):]
    assert "Measured in run `r2`." in bert and "Not one process" not in bert
    single = run.render_section(_records())
    assert "Measured in run" not in single and "Not one process" not in single
    assert "not side by side" not in single


def test_verdicts_flag_a_comparison_across_runs():
    # the best flashfx row from one run against the best other row from another: the sentence says so
    later = [dict(r, run_id="r2") for r in _records() if r.get("provider") in ("flashfx", "flashfx-attention")]
    _, _, results, _ = run.latest(_records() + later)
    (line,) = run.verdicts(results)
    assert "(runs `r2` and `r1`: not side by side)" in line
    targets = run.issue5_targets(results)
    assert all("(runs `r2` and `r1`: not side by side)" in t for t in targets)


def test_a_later_skipped_row_does_not_hide_an_earlier_measurement():
    first = _records()
    skipped = {"type": "result", "run_id": "r2", "workload": "llama-train", "provider": "compile",
               "status": "skipped", "error": "time budget spent"}
    _, _, results, _ = run.latest(first + [skipped])
    assert results["llama-train"]["compile"]["status"] == "ok"
    failed = dict(skipped, status="failed", error="boom")  # a failure is a result: the latest one wins
    _, _, results, _ = run.latest(first + [failed])
    assert results["llama-train"]["compile"]["status"] == "failed"


def test_breakdown_classes_kernel_names():
    from bench.breakdown import kernel_class

    assert kernel_class("fused_mm2_silu_mul_7206044398") == "flashfx matmul epilogue"
    assert kernel_class("fused_rmsnorm_pow_mean_a8f4468b04") == "flashfx generated"
    assert kernel_class("_bwd_dkdv_kernel") == "attention"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
    assert kernel_class("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_class("_ce_rows_kernel") == "cross-entropy"
    assert kernel_class("triton_red_fused__log_softmax_0") == "inductor generated"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<8>") == "other ATen / copies"


def test_remat_prediction_is_recorded_and_rendered_beside_the_measured_peak(tmp_path):
    import flashfx

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    fn = flashfx.optimize(model, cache_dir=str(tmp_path), remat=0.5)
    fn(torch.randn(16, 8)).sum().backward()
    pred = common.remat_prediction(fn)
    assert pred["remat_predicted_peak_gb"] > 0 and pred["remat_saved_gb"] > 0
    assert common.remat_prediction(model) == {}
    assert common.remat_prediction(flashfx.optimize(model, cache_dir=str(tmp_path))) == {}  # not compiled yet
    records = _records()
    records[5].update(remat_predicted_peak_gb=3.25, remat_saved_gb=1.5)
    _, _, results, _ = run.latest(records)
    (line,) = run.issue5_targets(results)
    assert "predicted peak of the graphs' own allocations 3.25 GB" in line and "1.50 GB of activations saved" in line


def test_graph_pool_bytes_counts_the_free_part_of_private_pools_only():
    from bench.measure import graph_pool_bytes

    segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 1000, "allocated_size": 100},  # default pool
        {"device": 0, "segment_pool_id": (1, 2), "total_size": 500, "allocated_size": 200},   # a CUDA graph's
        {"device": 0, "segment_pool_id": [1, 3], "total_size": 64, "allocated_size": 0},
        {"device": 1, "segment_pool_id": (1, 4), "total_size": 999, "allocated_size": 0},     # another GPU
    ]
    assert graph_pool_bytes(segments, 0) == 300 + 64
    assert graph_pool_bytes([], 0) == 0


def test_training_numerics_cover_every_gradient_when_asked(monkeypatch):
    table = {"eager": providers.Provider("eager", "plain"), "sdpa": providers.Provider("sdpa", "plain again")}
    monkeypatch.setattr(providers, "PROVIDERS", table)
    case = _tiny_case(training=True)
    case.grad_params = None  # every parameter
    records = []
    common.run_case(case, ["eager", "sdpa"], common.Options(device=torch.device("cpu"), tiny=True), {},
                    records.append)
    sdpa = [r for r in records if r["provider"] == "sdpa" and r["status"] == "ok"][0]
    assert sdpa["grads_compared"] == len(list(case.model.parameters())) and sdpa["grads_missing"] == 0
    assert sdpa["grad_rel_err"] == 0.0 and sdpa["grad_worst"] in dict(case.model.named_parameters())


def _started(run_id, workload, provider):
    return {"type": "event", "run_id": run_id, "workload": workload, "provider": provider, "status": "started"}


def test_a_flashfx_compile_after_another_in_the_same_process_is_not_called_cold():
    # Triton and flashfx keep compiled kernels and autotune choices in memory: only a process's first flashfx
    # provider compiles cold; a child that died starts cold again; other runs and torch.compile are unaffected
    ok = dict(status="ok", ms=2.0, ms_p20=1.9, ms_p80=2.1, peak_gb=1.0, compile_s_cold=30.0, max_rel_err=1e-3)

    def res(run_id, wl, p):
        return {"type": "result", "run_id": run_id, "workload": wl, "provider": p, **ok}
    records = [
        _started("r1", "bert-infer", "compile"), res("r1", "bert-infer", "compile"),
        _started("r1", "bert-infer", "flashfx"), res("r1", "bert-infer", "flashfx"),
        _started("r1", "vit-infer", "flashfx-nographs"), res("r1", "vit-infer", "flashfx-nographs"),
        _started("r1", "vit-infer", "flashfx"),
        {"type": "result", "run_id": "r1", "workload": "vit-infer", "provider": "flashfx", "status": "failed",
         "error": "process died (exit -11): segfault"},
        _started("r1", "llama-decode", "flashfx"), res("r1", "llama-decode", "flashfx"),
        _started("r2", "llama-prefill", "flashfx"), res("r2", "llama-prefill", "flashfx"),
    ]
    _, _, results, _ = run.latest(records)
    assert results["vit-infer"]["flashfx-nographs"]["compiled_after"] == "bert-infer flashfx"
    for wl, p in (("bert-infer", "compile"), ("bert-infer", "flashfx"), ("llama-decode", "flashfx"),
                  ("llama-prefill", "flashfx")):
        assert "compiled_after" not in results[wl][p], (wl, p)
    text = run.render_section(records)
    vit = text[text.index("### vit-infer"):text.index("### llama-decode")]
    assert "30.0† / —" in vit
    assert "† Not a cold compile: `flashfx-nographs` after `bert-infer flashfx` in the same process" in vit
    assert "†" not in text[text.index("### bert-infer"):text.index("### vit-infer")]


def test_todo_plans_only_unmeasured_rows_with_a_reference_and_fits_each_call():
    from bench import todo
    wl = run.workloads()["bert-infer"]
    measured = [p for p in wl.providers if p not in ("compile-max-autotune", "flashfx-fusion")]
    records = [{"type": "result", "run_id": "r", "workload": "bert-infer", "provider": p, "status": "ok"}
               for p in measured]
    # a failed attempt counts as unmeasured, and its wall time replaces the estimate
    records.append({"type": "result", "run_id": "r", "workload": "bert-infer", "provider": "compile-max-autotune",
                    "status": "timeout", "wall_s": 500.0})
    calls = todo.plan_calls(records, ["bert-infer"], call_s=540.0)
    assert [ps for _, ps, _ in calls] == [["sdpa", "compile-max-autotune"], ["sdpa", "flashfx-fusion"]]
    assert all(s <= 540.0 for *_, s in calls[1:]) and calls[0][2] > 500.0
    bins = todo.pack(calls + [("vit-infer", ["sdpa", "flashfx"], 30.0)], call_s=540.0)
    assert all(sum(c[2] for c in b) <= 540.0 or len(b) == 1 for b in bins)
    assert sorted(c[0] for b in bins for c in b) == ["bert-infer", "bert-infer", "vit-infer"]
    everything = [{"type": "result", "run_id": "r", "workload": "bert-infer", "provider": p, "status": "ok"}
                  for p in wl.providers]
    assert todo.plan_calls(everything, ["bert-infer"], call_s=540.0) == []


def test_todo_command_line(tmp_path, capsys):
    from bench import todo
    path = tmp_path / "r.jsonl"
    path.write_text("")
    assert todo.main([str(path), "--workloads", "vit-infer"]) == 0
    out = capsys.readouterr().out
    assert "python bench/run.py vit-infer --providers sdpa," in out and "# call 1:" in out
    assert todo.main([str(path), "--workloads", "nope"]) == 2
    assert "unknown workload(s) nope" in capsys.readouterr().err
