"""`llmprune bench-speed`: the CPU path end to end on a tiny model, the CUDA decisions with mocks."""

import json
import statistics

import pytest
import torch
from conftest import tiny_model

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.speed import sparse24
from llmprune.speed.bench import SpeedOptions, bench_model, format_report, plan_sparse
from llmprune.speed.measure import measure_speed, sync

CUDA = torch.device("cuda", 0)
FAST = ["--prompt-len", "8", "--new-tokens", "2", "--repeats", "2"]


def model_24(layers: int = 2):
    """A tiny llama whose decoder linears keep inputs 0,1 of every 4 (exactly 2:4)."""
    model = tiny_model("llama", layers=layers)
    with torch.no_grad():
        for lin in sparse24.sparse_linears(model).values():
            lin.weight[:, 2::4] = 0
            lin.weight[:, 3::4] = 0
    return model


@pytest.fixture(scope="module")
def dir_24(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny24")
    model_24().save_pretrained(d)
    return d


# --- measuring ----------------------------------------------------------------------------------
def test_measure_speed_warms_up_then_times_each_repeat():
    model = tiny_model("llama", layers=2)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    s = measure_speed(model, prompt_len=8, new_tokens=3, batch_size=2, repeats=3, warmup=2)
    assert len(calls) == (2 + 3) * (1 + 3)  # warm-up runs are full runs, not timed
    assert len(s["prefill_runs"]) == len(s["decode_runs"]) == 3
    assert s["prefill_tok_s"] == statistics.median(s["prefill_runs"]) > 0
    assert s["decode_tok_s"] == statistics.median(s["decode_runs"]) > 0


def test_sync_waits_on_cuda_only(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: seen.append(d))
    sync(torch.device("cpu"))
    assert seen == []
    sync(CUDA)
    assert seen == [CUDA]


def test_old_import_path_still_works():
    from llmprune.structured.speed import measure_speed as old

    assert old is measure_speed


# --- decisions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device,cap,expect", [
    (torch.device("cpu"), None, "no speed on CPUs"),
    (CUDA, (7, 5), "compute capability >= 8.0 (Ampere or newer); cuda:0 has 7.5"),
    (CUDA, (8, 0), None),
    (CUDA, (8, 9), None),
    (CUDA, (9, 0), None),
    (torch.device("mps"), None, "only on CUDA GPUs"),
])
def test_unsupported_reason(device, cap, expect):
    why = sparse24.unsupported_reason(device, cap)
    if expect is None:
        assert why is None
    else:
        assert expect in why and "\n" not in why


def test_cpu_note_points_to_structured_pruning():
    assert "llmprune structured" in sparse24.CPU_NOTE


@pytest.mark.parametrize("wanted,has,expect", [
    ("auto", True, "torchao"), ("auto", False, "torch"), ("torch", True, "torch"), ("torchao", True, "torchao"),
])
def test_choose_backend(wanted, has, expect):
    assert sparse24.choose_backend(wanted, has_torchao=has) == expect


def test_choose_backend_torchao_missing_is_one_line():
    with pytest.raises(LLMPruneError, match="torchao is not installed"):
        sparse24.choose_backend("torchao", has_torchao=False)


@pytest.mark.parametrize("opts,cap,has,expect", [
    (dict(dense_only=True), (9, 0), True, (None, "--dense-only")),
    ({}, (9, 0), False, ("torch", None)),
    ({}, (8, 0), True, ("torchao", None)),
    (dict(backend="torch"), (8, 6), True, ("torch", None)),
])
def test_plan_sparse_on_cuda(monkeypatch, opts, cap, has, expect):
    monkeypatch.setattr(sparse24, "torchao_available", lambda: has)
    assert plan_sparse(CUDA, SpeedOptions(**opts), cap) == expect


def test_plan_sparse_skips_old_gpus_and_cpus():
    backend, why = plan_sparse(CUDA, SpeedOptions(), (7, 0))
    assert backend is None and "7.0" in why
    backend, why = plan_sparse(torch.device("cpu"), SpeedOptions(), None)
    assert backend is None and why == sparse24.CPU_NOTE


# --- the 2:4 check ------------------------------------------------------------------------------
def test_sparse_linears_are_the_decoder_linears():
    names = set(sparse24.sparse_linears(tiny_model("llama", layers=2)))
    assert len(names) == 2 * 7 and "model.layers.1.mlp.down_proj" in names
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_check_24_accepts_2_4_and_sparser_groups():
    model = model_24()
    lins = sparse24.sparse_linears(model)
    with torch.no_grad():
        lins["model.layers.0.self_attn.q_proj"].weight[0, 0] = 0  # 1 of 4 kept: still storable as 2:4
    sparse24.check_24(lins)


def test_check_24_names_the_first_linear_that_is_not_2_4():
    model = model_24()
    lins = sparse24.sparse_linears(model)
    with torch.no_grad():
        lins["model.layers.1.mlp.up_proj"].weight[3, 6] = 1.0  # inputs 4..7 of row 3: 3 nonzeros
        lins["model.layers.1.mlp.down_proj"].weight[0, 2] = 1.0
    with pytest.raises(LLMPruneError) as e:
        sparse24.check_24(lins)
    msg = str(e.value)
    assert msg.startswith("model.layers.1.mlp.up_proj is not 2:4") and "row 3, inputs 4..7 hold 3" in msg
    assert "\n" not in msg and "--dense-only" in msg


def test_check_24_refuses_a_dense_model_and_odd_widths():
    with pytest.raises(LLMPruneError, match="model.layers.0.self_attn.q_proj is not 2:4"):
        sparse24.check_24(sparse24.sparse_linears(tiny_model("llama", layers=1)))
    assert "not a multiple of 4" in sparse24.not_24(torch.zeros(4, 6))


# --- the CUDA branch with mocks: measured, never assumed ------------------------------------------
def fake_measure(numbers):
    """A measure that returns the next (prefill, decode) pair: dense first, then 2:4."""
    it = iter(numbers)

    def measure(model, **kw):
        p, d = next(it)
        return {"prefill_tok_s": p, "decode_tok_s": d, **kw}
    return measure


def fake_convert(model, linears, backend):
    return "SparseSemiStructuredTensorCUSPARSELT"


def _report(result):
    return {"device_name": "NVIDIA H200", "device": "cuda:0", "capability": [9, 0], "dtype": "bfloat16",
            "torch": "2.11", "backend": "torch", **result}


def test_slower_2_4_is_measured_and_said():
    opts = SpeedOptions(repeats=1)
    r = bench_model(model_24(), CUDA, opts, "torch", None, fake_measure([(1000, 50), (140, 25)]), fake_convert)
    assert r["speedup"] == pytest.approx({"prefill": 0.14, "decode": 0.5})
    assert r["sparse24"]["tensor"] == "SparseSemiStructuredTensorCUSPARSELT" and r["sparse24"]["linears"] == 14
    lines = format_report(_report(r))
    assert "speedup prefill x0.14, decode x0.50" in lines[2]
    assert lines[3].startswith("2:4 is SLOWER than dense here (prefill x0.14, decode x0.50)")


def test_faster_2_4_has_no_slower_line():
    r = bench_model(model_24(), CUDA, SpeedOptions(), "torch", None, fake_measure([(100, 50), (130, 60)]),
                    fake_convert)
    lines = format_report(_report(r))
    assert "prefill x1.30, decode x1.20" in lines[-1] and not any("SLOWER" in x for x in lines)


def test_not_2_4_fails_before_any_timing():
    calls = []
    with pytest.raises(LLMPruneError, match="is not 2:4"):
        bench_model(tiny_model("llama", layers=1), CUDA, SpeedOptions(), "torch", None,
                    lambda *a, **k: calls.append(1), fake_convert)
    assert calls == []


@pytest.mark.parametrize("stage", ["convert", "measure"])
def test_sparse_errors_are_reported_and_dense_numbers_kept(stage):
    def convert(model, linears, backend):
        if stage == "convert":
            raise RuntimeError("Supported only on GPUs with compute capability 8.x\nmore")
        return "X"

    measure = fake_measure([(1000, 50)])  # a second call (the 2:4 timing) raises StopIteration
    r = bench_model(model_24(), CUDA, SpeedOptions(), "torch", None, measure, convert)
    assert r["dense"]["prefill_tok_s"] == 1000 and r["speedup"] is None
    assert r["sparse24"]["stage"] == stage and r["sparse24"]["backend"] == "torch"
    if stage == "convert":
        assert r["sparse24"]["error"] == "RuntimeError: Supported only on GPUs with compute capability 8.x"
    assert f"failed at {stage}" in format_report(_report(r))[-1]


def test_real_torch_conversion_off_cuda_is_captured():
    model = model_24(layers=1)
    r = sparse24.try_sparse(model, sparse24.sparse_linears(model), "torch", lambda m: {})
    assert r["stage"] == "convert" and "cuda" in r["error"].lower()


def test_silent_no_op_conversion_is_an_error(monkeypatch):
    model = model_24(layers=1)
    lins = sparse24.sparse_linears(model)
    import torch.sparse as ts

    monkeypatch.setattr(ts, "to_sparse_semi_structured", lambda w: w)  # leaves the weight dense
    with pytest.raises(RuntimeError, match="left model.layers.0.self_attn.q_proj dense"):
        sparse24.convert_24(model, lins, "torch")


# --- the command on a CPU -----------------------------------------------------------------------
def test_cli_cpu_end_to_end(dir_24, tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = main(["bench-speed", str(dir_24), *FAST, "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    lines = printed.out.splitlines()
    assert lines[0].startswith("device: ") and "dtype float32" in lines[0] and f"torch {torch.__version__}" in lines[0]
    assert "2:4 backend: none" in lines[0]
    assert lines[1].startswith("dense: prefill ") and "median of 2" in lines[1]
    assert lines[2] == sparse24.CPU_NOTE
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["torch"] == torch.__version__
    assert report["dense"]["prefill_tok_s"] > 0 and report["dense"]["decode_tok_s"] > 0
    assert len(report["dense"]["prefill_runs"]) == 2 and report["dense"]["prompt_len"] == 8
    assert report["sparse24"] == {"skipped": sparse24.CPU_NOTE} and report["speedup"] is None
    assert report["options"]["new_tokens"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"]  # no temp file left


def test_cli_dense_only_prints_no_note(dir_24, capsys):
    assert main(["bench-speed", str(dir_24), *FAST, "--device", "cpu", "--dense-only", "--warmup", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("args,msg", [
    (["--prompt-len", "0"], "prompt_len must be a positive integer"),
    (["--repeats", "0"], "repeats must be a positive integer"),
    (["--dtype", "int3"], "dtype"),
    (["--backend", "cusparse"], "backend"),
])
def test_cli_bad_options_are_one_line(dir_24, tmp_path, capsys, args, msg):
    out = tmp_path / "r.json"
    rc = main(["bench-speed", str(dir_24), *args, "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_cuda_on_a_cpu_host_and_bad_json_path(dir_24, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench-speed", str(dir_24), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench-speed", str(dir_24), "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_cli_pretend_h200_reports_the_sparse_error_and_keeps_dense(dir_24, tmp_path, capsys, monkeypatch):
    """The whole CUDA branch of the command, on this CPU: capability 9.0 is mocked, the model
    stays here, so torch's real 2:4 conversion refuses it (CPU tensor) as a GPU kernel might."""
    from llmprune.speed import bench

    monkeypatch.setattr(bench, "resolve_device", lambda d: CUDA)
    monkeypatch.setattr(sparse24, "capability", lambda d: (9, 0))
    monkeypatch.setattr(sparse24, "torchao_available", lambda: False)
    monkeypatch.setattr(bench, "device_name", lambda d: "NVIDIA H200 (mock)")
    monkeypatch.setattr(bench, "place", lambda model, device: None)
    out = tmp_path / "r.json"
    rc = main(["bench-speed", str(dir_24), *FAST, "--dtype", "bfloat16", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    lines = printed.out.splitlines()
    assert "NVIDIA H200 (mock) (cuda:0, compute capability 9.0), dtype bfloat16" in lines[0]
    assert "2:4 backend: torch" in lines[0]
    assert lines[2].startswith("2:4 (torch) failed at convert: RuntimeError:")
    report = json.loads(out.read_text())
    assert report["capability"] == [9, 0] and report["backend"] == "torch"
    assert report["dense"]["decode_tok_s"] > 0 and report["speedup"] is None
    assert report["sparse24"]["stage"] == "convert" and "CUDA" in report["sparse24"]["error"]


def test_cli_pretend_h200_refuses_a_dense_model_in_one_line(tiny_dirs, capsys, monkeypatch):
    from llmprune.speed import bench

    monkeypatch.setattr(bench, "resolve_device", lambda d: CUDA)
    monkeypatch.setattr(sparse24, "capability", lambda d: (8, 0))
    monkeypatch.setattr(bench, "place", lambda model, device: None)
    monkeypatch.setattr(bench, "measure_speed", lambda *a, **k: pytest.fail("timed a model that is not 2:4"))
    assert main(["bench-speed", str(tiny_dirs["llama"]), *FAST]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("llmprune: error: model.layers.0.self_attn.q_proj is not 2:4 sparse")


@pytest.mark.parametrize("stub,expect", [
    ({"__init__.py": "__version__ = '0.18.0'\n"}, False),  # torchao.sparsity deleted (pytorch/ao #4728)
    ({"__init__.py": "", "sparsity/__init__.py": "def sparsify_(m, c, filter_fn=None): pass\n"}, False),
    ({"__init__.py": "", "sparsity/__init__.py": "def sparsify_(m, c, filter_fn=None): pass\n"
                                                  "def semi_sparse_weight(): pass\n"}, True),
])
def test_a_torchao_without_its_2_4_path_falls_back_to_torch_core(tmp_path, monkeypatch, stub, expect):
    import sys

    for name, text in stub.items():
        f = tmp_path / "torchao" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, mod)
    assert sparse24.torchao_available() is expect
    assert sparse24.choose_backend("auto") == ("torchao" if expect else "torch")
    if not expect:
        with pytest.raises(LLMPruneError, match="has no 2:4 path .*use --backend torch"):
            sparse24.choose_backend("torchao")
    for mod in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        del sys.modules[mod]  # the stub must not outlive the test
