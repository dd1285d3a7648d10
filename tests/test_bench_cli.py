"""The benchmark command end to end on the CPU quick configuration (tiny models, batch 2)."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchmarks  # noqa: E402
from benchmarks import compare  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the interpreter is for correctness tests, far too slow to time
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json", encoding="utf-8") as f:
        data = json.load(f)
    return out, data, proc


def test_quick_run_writes_json_markdown_and_plots(quick_run):
    out, data, proc = quick_run
    meta = data["meta"]
    for key in ("date", "device", "device_name", "torch", "triton", "transformers", "git_commit", "command",
                "backends_run", "sizes", "settings"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["sizes"]["name"] == "tiny"
    assert "reference" in meta["backends_run"] and "auto" in meta["backends_run"]
    rows = data["results"]
    groups = {r["group"] for r in rows}
    assert {"pretrain", "itm", "itc", "vit", "text", "attention"} <= groups
    for r in rows:
        if r["impl"] == "blip_fast" and r["backend"] == "reference":
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["throughput"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["speedup_vs_reference"] == pytest.approx(1.0)
            assert r["flops_per_step"] > 0
    # a non-reference backend records which ops it ran
    sdpa = [r for r in rows if r["group"] == "vit" and r["backend"] == "sdpa" and r["status"] == "ok"]
    assert sdpa and all("sdpa" in r["ops_used"]["attention"] for r in sdpa)
    # every row has a status; failures carry a reason
    assert all(r["status"] in ("ok", "oom", "error", "unsupported", "skipped") for r in rows)
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## pretrain" in report and "| reference |" in report
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("throughput.png", "memory.png"):
            with open(out / png, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "== pretrain" in proc.stdout  # the console table


def test_compare_flags_an_injected_regression(quick_run, tmp_path, capsys):
    out, data, _ = quick_run
    old = out / "results.json"
    assert benchmarks.main(["--compare", str(old), str(old)]) == 0
    slower = copy.deepcopy(data)
    victim = next(r for r in slower["results"] if r["status"] == "ok" and r["group"] == "pretrain")
    victim["throughput"] *= 0.8
    new = tmp_path / "new.json"
    new.write_text(json.dumps(slower), encoding="utf-8")
    assert benchmarks.main(["--compare", str(old), str(new)]) == 1
    text = capsys.readouterr().out
    assert "REGRESSION" in text and "1 regression(s)" in text
    # within the threshold: not a regression
    victim["throughput"] = next(r for r in data["results"] if r["label"] == victim["label"]
                                and r["group"] == "pretrain" and r["dtype"] == victim["dtype"])["throughput"] * 0.97
    new.write_text(json.dumps(slower), encoding="utf-8")
    assert benchmarks.main(["--compare", str(old), str(new), "--threshold", "0.05"]) == 0
    # a row that ran before and fails now is a regression
    victim["status"], victim["reason"] = "oom", "OutOfMemoryError"
    new.write_text(json.dumps(slower), encoding="utf-8")
    result = compare.compare(data, slower, 0.05)
    assert len(result["regressions"]) == 1 and "oom" in result["regressions"][0]["flag"]


def test_cli_dispatches_to_the_benchmarks(capsys):
    from blip_fast import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "blip-fast bench" in capsys.readouterr().out
    assert cli.main(["bench", "--quick", "--device", "cpu", "--list", "--workloads", "pretrain,vit"]) == 0
    listing = capsys.readouterr().out
    assert "pretrain:" in listing and "vit:" in listing and "reference" in listing


def test_report_can_be_rebuilt_from_json(quick_run, tmp_path):
    out, _, _ = quick_run
    assert benchmarks.main(["--report-from", str(out / "results.json"), "--out", str(tmp_path), "--no-plots"]) == 0
    assert "## itm" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_a_backend_registered_later_is_benchmarked(tmp_path):
    """Backends are discovered when the run starts: a new one (here a stand-in with only a
    LayerNorm) gets its own rows, running its op and falling back to reference for the rest."""
    from blip_fast.ops import _dispatch, reference

    calls = []

    def layer_norm(*args, **kwargs):
        calls.append(1)
        return reference.layer_norm(*args, **kwargs)

    _dispatch.register_backend(_dispatch.Backend("bench_standin", ops={"layer_norm": layer_norm}))
    try:
        out = tmp_path / "out"
        assert benchmarks.main(["--quick", "--device", "cpu", "--workloads", "vit,attention", "--no-peers",
                                "--attention-patterns", "cross", "--no-plots", "--out", str(out)]) == 0
    finally:
        _dispatch._REGISTRY.pop("bench_standin", None)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "bench_standin" in data["meta"]["backends_run"]
    vit = [r for r in data["results"] if r["group"] == "vit" and r["backend"] == "bench_standin"]
    assert vit and all(r["status"] == "ok" for r in vit)
    assert all(r["ops_used"]["layer_norm"] == {"bench_standin": max(r["ops_used"]["layer_norm"].values())}
               for r in vit)
    assert all(set(r["ops_used"]["attention"]) == {"reference"} for r in vit)
    assert calls
    # it has no attention: the attention rows say so instead of timing the reference again
    att = [r for r in data["results"] if r["group"] == "attention" and r["backend"] == "bench_standin"]
    assert att and all(r["status"] == "skipped" and "supports none" in r["reason"] for r in att)


def test_flop_count_matches_the_design_card():
    from benchmarks import flops

    per_image = flops.pretrain_step_flops(flops.VIT_B, flops.BERT_BASE, 224, 30, 1, 57600)
    assert per_image["total"] / 1e9 == pytest.approx(305, rel=0.01)  # design card: ~305 GFLOP
    assert 2 * flops.vit_forward_macs(flops.VIT_B, 224) / 1e9 == pytest.approx(35.1, rel=0.01)  # timm: 17.6 GMACs
    # linear in the batch (up to the B x B similarities)
    eight = flops.pretrain_step_flops(flops.VIT_B, flops.BERT_BASE, 224, 30, 8, 57600)["total"]
    assert eight == pytest.approx(8 * per_image["total"], rel=1e-3)


def test_compile_and_graph_together_add_a_compiled_graph_row():
    """--compile and --cuda-graph together: every graph-capable workload also gets the compiled
    model captured in one CUDA graph ('compile+graph'); the reference path stays eager."""
    from types import SimpleNamespace

    import torch

    from benchmarks.runner import Runner

    def variants(compile_, graph, device="cuda", backend="auto", supports_graph=True):
        runner = SimpleNamespace(args=SimpleNamespace(compile=compile_, cuda_graph=graph),
                                 device=torch.device(device))
        work = SimpleNamespace(supports_compile=True, supports_graph=supports_graph)
        return Runner.execution_variants(runner, work, backend)

    assert variants("also", "also") == ["eager", "compile", "graph", "compile+graph"]
    assert variants("only", "only") == ["compile", "graph", "compile+graph"]
    assert variants("off", "also") == ["eager", "graph"]
    assert variants("also", "also", supports_graph=False) == ["eager", "compile"]
    assert variants("also", "also", device="cpu") == ["eager", "compile"]
    assert variants("also", "also", backend="reference") == ["eager"]
