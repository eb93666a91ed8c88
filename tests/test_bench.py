"""`wuerstchen bench` end to end on the tiny preset (its numbers mean something only on a GPU)."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from benchmarks import fusions
from engine import preset
from engine.cli import main

TINY = ["--preset", "tiny", "--sizes", "128", "--warmup", "1", "--runs", "2", "--prior-steps", "3",
        "--decoder-steps", "2"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One bench of the tiny preset against diffusers at two batch sizes, with every output written."""
    folder = tmp_path_factory.mktemp("bench")
    argv = ["bench", *TINY, "--batch", "1", "2", "--baseline", "diffusers", "--json", str(folder / "out.json"),
            "--csv", str(folder / "rows.csv"), "--plot", str(folder / "plot.png")]
    assert main(argv) == 0
    return folder


def test_json_records_hold_provenance_workload_and_results(bench_run):
    records = json.loads((bench_run / "out.json").read_text())["records"]
    assert [(r["workload"]["target"], r["workload"]["batch"]) for r in records] == [
        ("torch", 1), ("diffusers", 1), ("torch", 2), ("diffusers", 2)]
    for record in records:
        origin, workload, results = record["provenance"], record["workload"], record["results"]
        assert set(origin) >= {"date", "device", "driver", "cuda", "versions", "git_commit"}
        assert set(origin["versions"]) >= {"torch", "triton", "onnxruntime", "diffusers", "python"}
        assert origin["versions"]["torch"] and origin["device"].startswith("CPU")
        assert workload | {"recipe": None} == {
            "target": workload["target"], "source": "tiny demo (random weights, seed 0)", "backend": "torch",
            "dtype": "fp32", "height": 128, "width": 128, "batch": workload["batch"], "warmup": 1, "runs": 2,
            "recipe": None}
        assert workload["recipe"] == {"prior_steps": 3, "prior_guidance": 4.0, "decoder_steps": 2,
                                      "decoder_guidance": 0.0, "prior_evaluations": 3}
        latency = results["latency_s"]
        assert 0 < latency["min"] <= latency["median"] <= latency["p90"] <= latency["max"]
        assert results["images_per_s"] == pytest.approx(workload["batch"] / latency["median"])
        assert set(results["stages_ms"]) >= {"prior_text", "prior_step", "decoder_text", "decoder_step",
                                             "vqgan_decode"}
        assert results["stages_ms"]["prior_step"]["calls_per_run"] == 3
        assert results["stages_ms"]["decoder_step"]["calls_per_run"] == 2
        assert results["stages_ms"]["prior_text"]["calls_per_run"] == 2  # prompts, then negative prompts
        assert results["stages_ms"]["prior_step"]["tflops"] > 0
        assert results["peak_memory_gb"] is None  # no device memory on a CPU
        assert results["tflops"] > 0 and 0 < results["fraction_of_matmul_peak"]
        assert record["matmul_peak_tflops"] > 0 and record["flops"]["request"]["total"] > 0
        other = "diffusers" if workload["target"] == "torch" else "torch"
        assert results["speedup_vs"][other] > 0
    assert all(r["results"]["cold_start_s"] > 0 for r in records[:2])  # at the first size and batch only
    assert "cold_start_s" not in records[2]["results"]
    engine = records[0]["results"]["stages_ms"]
    assert engine["prior_condition"]["calls_per_run"] == 1 and engine["decoder_condition"]["calls_per_run"] == 1


def test_csv_rows_and_plot(bench_run, capsys):
    rows = list(csv.DictReader(open(bench_run / "rows.csv")))
    assert [row["target"] for row in rows] == ["torch", "diffusers", "torch", "diffusers"]
    assert float(rows[0]["latency_median_s"]) > 0 and rows[0]["device"].startswith("CPU")
    assert (bench_run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_appends(tmp_path):
    for _ in range(2):
        assert main(["bench", *TINY, "--no-cold-start", "--csv", str(tmp_path / "rows.csv")]) == 0
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("date,device")


def test_table_on_stdout(tmp_path, capsys):
    assert main(["bench", *TINY, "--no-cold-start"]) == 0
    out = capsys.readouterr().out
    assert "prior 3 evaluations (guidance 4), decoder 2 steps (guidance 0)" in out
    assert "128×128" in out and "torch" in out and "TFLOP/s" in out


def test_bench_runs_a_bundle_on_onnxruntime(tiny_bundle, tmp_path):
    argv = ["bench", "--bundle", str(tiny_bundle), "--sizes", "256x128", "--warmup", "1", "--runs", "1",
            "--prior-steps", "2", "--decoder-steps", "2", "--no-cold-start", "--json", str(tmp_path / "o.json")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "o.json").read_text())["records"][0]
    assert record["workload"]["backend"] == "onnxruntime" and record["workload"]["source"].startswith("bundle")
    assert record["results"]["stages_ms"]["decoder_step"]["calls_per_run"] == 2


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "--preset 'huge' is unknown: expected one of ['tiny', 'wuerstchen-v2']"),
    (["--preset", "tiny", "--backend", "tensorrt-llm"], "--backend 'tensorrt-llm' is unknown: expected one of"),
    (["--preset", "tiny", "--dtype", "fp8"], "--dtype 'fp8' is not supported: expected auto, fp32, fp16 or bf16"),
    (["--preset", "tiny", "--batch", "0"], "--batch 0: expected positive integers"),
    (["--preset", "tiny", "--runs", "0"], "--runs 0: expected a positive integer"),
    (["--preset", "tiny", "--sizes", "1000"], "--sizes 1000: height=1000 is off the model's size grid"),
    (["--preset", "tiny", "--sizes", "big"], "--sizes 'big': expected a side such as 1024 or HEIGHTxWIDTH"),
    (["--preset", "tiny", "--baseline", "xformers"], "--baseline xformers: expected any of diffusers, "
                                                     "diffusers-compile"),
    (["--preset", "tiny", "--backend", "onnxruntime"], "--backend 'onnxruntime' runs a bundle: make one with "
                                                       "`wuerstchen export`"),
    (["--bundle", "b", "--baseline", "diffusers"], "--baseline needs the weights"),
])
def test_bad_arguments_are_one_line(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wuerstchen bench: error: ") and message in err


def test_several_backends_in_one_run(tmp_path):
    """torch and torch-fast side by side; torch-fast replays whole steps, so its step times are each loop's
    time shared among its steps."""
    argv = ["bench", *TINY, "--backend", "torch", "torch-fast", "--no-cold-start", "--json", str(tmp_path / "o.json")]
    assert main(argv) == 0
    records = json.loads((tmp_path / "o.json").read_text())["records"]
    assert [r["workload"]["target"] for r in records] == ["torch", "torch-fast"]
    fast = records[1]["results"]["stages_ms"]
    assert fast["prior_step"]["calls_per_run"] == 3 and fast["decoder_step"]["calls_per_run"] == 2
    assert records[1]["results"]["speedup_vs"]["torch"] > 0


def test_fusion_benchmark_compares_every_kernel_and_variant(monkeypatch):
    """The GPU script's plumbing on the tiny preset (on a CPU in Triton's interpreter), with wall-clock
    timers: each fused kernel agrees with the ops it replaces, and every variant of every stage with the
    reference."""
    def wall_ms(function, *args, **kwargs):
        start = time.perf_counter()
        function()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(fusions, "cuda_median_ms", wall_ms)
    monkeypatch.setattr(fusions, "profile", lambda function: {"wall_ms": wall_ms(function), "kernel_ms": 0.0,
                                                              "kernels": 0, "by_kind_ms": {}})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = fusions.kernel_rows(preset("tiny"), 128, device, torch.float32)
    assert [row["kernel"] for row in kernels] == [
        "linear + GELU, VQGAN 32×32", "linear + GELU, VQGAN 64×64", "LayerNorm + modulation + replicate pad, "
        "VQGAN 32×32", "residual + FiLM + LayerNorm, prior 3×3, guidance batch", "residual + FiLM, decoder 16×16",
        "residual + FiLM + LayerNorm, decoder 8×8", "residual + FiLM + LayerNorm, decoder 4×4",
        "residual + FiLM + LayerNorm, decoder 2×2"]
    assert all(row["max_diff"] < 1e-4 and row["fused_ms"] > 0 for row in kernels), kernels
    stages = fusions.stage_rows("tiny", 128, device, torch.float32)
    assert [(row["stage"], row["variant"]) for row in stages] == [
        (stage, variant) for variant in fusions.VARIANTS for stage in ("prior_step", "decoder_step", "vqgan_decode")
        if variant != "torch-fast + linear_gelu" or stage == "vqgan_decode"]
    assert all(row["relative_difference"] < 1e-4 for row in stages), stages


def test_the_load_benchmark_measures_the_scheduler_against_one_request_at_a_time(tmp_path, capsys):
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps([{"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2, "weight": 3},
                               {"height": 256, "width": 128, "prior_steps": 3, "decoder_steps": 1, "images": 2}]))
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--load", "--mix", str(mix), "--concurrency", "1", "4",
            "--requests", "8", "--json", str(tmp_path / "load.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sequential" in out and "concurrency 4" in out and "poisson" in out and "mix: 128×128 ×1" in out
    record = json.loads((tmp_path / "load.json").read_text())
    rows = {row["measurement"].split(" ")[0]: row for row in record["measurements"]}
    assert [row["measurement"] for row in record["measurements"]][:3] == ["sequential", "concurrency 1",
                                                                         "concurrency 4"]
    assert all(row["served"] == row["requests"] and row["failed"] == 0 for row in record["measurements"])
    assert rows["sequential"]["batch_occupancy"] >= 1 and rows["sequential"]["images_per_s"] > 0
    assert record["measurements"][2]["batch_occupancy"] > 1  # four clients share batches
    poisson = record["measurements"][-1]
    assert poisson["rate_req_per_s"] > 0 and poisson["latency_s"]["p99"] >= poisson["latency_s"]["p50"] > 0
    assert record["workload"]["mix"][1]["images"] == 2 and record["provenance"]["device"].startswith("CPU")


@pytest.mark.parametrize("args, message", [
    (["--mix", "/no/such.json"], "--mix='/no/such.json' is not a readable JSON file"),
    (["--backend", "torch", "torch-fast"], "--load measures one backend and no baseline"),
    (["--requests", "0"], "--requests 0: expected a positive number"),
])
def test_bad_load_arguments_are_one_line(capsys, args, message):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--load", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_load_benchmark_runs_over_http_against_a_server_on_this_machine(tmp_path, capsys):
    pytest.importorskip("fastapi")
    from engine import Recipe, WuerstchenPipeline
    from engine.serving.api import ServerOptions
    from engine.serving.app import BackgroundServer, Service, create_app

    pipe = WuerstchenPipeline.from_preset("tiny", device="cpu")
    service = Service(pipe, ServerOptions(warmup=Recipe(128, 128, prior_steps=1, decoder_steps=1)))
    with BackgroundServer(create_app(service)) as url:
        argv = ["bench", "--load", "--url", url, "--sizes", "128", "--prior-steps", "2", "--decoder-steps", "2",
                "--concurrency", "1", "4", "--requests", "6", "--json", str(tmp_path / "load.json")]
        assert main(argv) == 0
    pipe.close()
    out = capsys.readouterr().out
    assert "sequential" in out and "concurrency 4" in out and "served over HTTP" in out
    record = json.loads((tmp_path / "load.json").read_text())
    assert record["workload"]["runtime"] == "tiny demo (random weights, seed 0) on torch, cpu, fp32, served over HTTP"
    rows = record["measurements"]
    assert [row["measurement"] for row in rows][:3] == ["sequential", "concurrency 1", "concurrency 4"]
    assert all(row["served"] == row["requests"] and row["failed"] == 0 and not row["refused"] for row in rows)
    assert all(row["images_per_s"] > 0 and row["latency_s"]["p99"] >= row["latency_s"]["p50"] > 0 for row in rows)
    assert rows[0]["batch_occupancy"] == 1 and rows[0]["compute_s_mean"] > 0  # from the server's Server-Timing
    assert rows[2]["batch_occupancy"] > 1  # the server's scheduler batched the four clients' steps


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.2:8000", "ftp://127.0.0.1:8000"])
def test_the_load_benchmark_over_http_stays_on_this_machine(capsys, url):
    assert main(["bench", "--load", "--url", url, "--sizes", "128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--url={url!r}: the load test runs against a server on this machine only" in err
