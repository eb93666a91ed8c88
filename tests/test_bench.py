"""`wuerstchen bench` end to end on the tiny preset (its numbers mean something only on a GPU)."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import torch

from benchmarks import attention, bench, fusions, kernel_profile, report
from engine import preset
from engine.cli import main
from engine.quantization import QuantRecipe

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
            "dtype": "fp32", "quantization": None, "quantization_recipe": None, "height": 128, "width": 128,
            "batch": workload["batch"], "warmup": 1, "runs": 2, "recipe": None}
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
    assert list(rows[0]) == list(report.CSV_COLUMNS)
    assert float(rows[0]["latency_median_s"]) > 0 and rows[0]["device"].startswith("CPU")
    assert (bench_run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in bench_run.iterdir()) == ["out.json", "plot.png", "rows.csv"]  # no temp files


def test_the_plot_shows_each_target_per_image_from_the_json(bench_run):
    """One panel per batch, one bar per target: its parts are the stages' time per image, its total the
    end-to-end median ÷ batch."""
    records = json.loads((bench_run / "out.json").read_text())["records"]
    data = report.plot_data(records)
    assert data.unit == "ms"  # a tiny image takes milliseconds
    assert data.title.startswith("tiny demo (random weights, seed 0) · CPU ")
    assert data.title.endswith(" · fp32\n128×128 · batch 1, 2 · prior 3 evaluations, decoder 2 steps · median of 2 "
                               "runs after 1 warm-up")
    assert [panel.title for panel in data.panels] == ["128×128, batch 1", "128×128, batch 2"]
    assert data.axis_label(data.panels[1]) == "ms per image (one call ÷ batch 2; median of 2 runs)"
    for panel, at_batch in zip(data.panels, (records[:2], records[2:]), strict=True):
        assert [bar.target for bar in panel.bars] == ["torch", "diffusers"]
        for bar, record in zip(panel.bars, at_batch, strict=True):
            results, batch = record["results"], record["workload"]["batch"]
            assert bar.total == pytest.approx(results["latency_s"]["median"] * 1e3 / batch)
            assert list(bar.parts) == ["text", "prior", "decoder", "vqgan", "other"]
            stages = results["stages_ms"]
            assert bar.parts["decoder"] == pytest.approx(
                (stages["decoder_step"]["median"] * 2 + stages.get("decoder_condition", {"median": 0})["median"])
                / batch)
            assert sum(bar.parts.values()) >= bar.total * (1 - 1e-9)
        torch_bar, diffusers_bar = panel.bars
        speedup = at_batch[0]["results"]["speedup_vs"]["diffusers"]
        assert torch_bar.label == f"{report.significant(torch_bar.total)} ms · {report.significant(speedup)}× vs " \
                                  "diffusers"
        assert diffusers_bar.label == f"{report.significant(diffusers_bar.total)} ms"  # the reference


def _record(target: str, latency_s: float, stages: dict[str, tuple[float, float]], speedup_vs: dict, *,
            size: tuple[int, int] = (1024, 1024), batch: int = 2, tflops: float = 0.0014) -> dict:
    """A bench record made up for the report's tests: `stages` maps a stage to (median ms, calls per run)."""
    return {
        "provenance": {"date": "2025-01-02T03:04:05+00:00", "device": "a test device", "driver": None, "cuda": None,
                       "versions": {"torch": "2.0"}, "git_commit": "0123456789abcdef"},
        "workload": {"target": target, "source": "wuerstchen-v2 (random weights, seed 0)", "backend": "torch",
                     "dtype": "fp16", "height": size[0], "width": size[1], "batch": batch, "warmup": 2, "runs": 5,
                     "recipe": {"prior_steps": None, "prior_guidance": 4.0, "decoder_steps": 12,
                                "decoder_guidance": 0.0, "prior_evaluations": 29}},
        "matmul_peak_tflops": 700.0,
        "results": {"latency_s": {"median": latency_s, "p90": latency_s, "min": latency_s, "max": latency_s},
                    "images_per_s": batch / latency_s, "peak_memory_gb": None, "tflops": tflops,
                    "fraction_of_matmul_peak": tflops / 700.0, "speedup_vs": speedup_vs,
                    "stages_ms": {stage: {"median": ms, "calls_per_run": calls} for stage, (ms, calls) in
                                  stages.items()}},
    }


STAGES = {"prior_text": (10.0, 2), "prior_condition": (5.0, 1), "prior_step": (20.0, 29), "decoder_text": (20.0, 1),
          "decoder_condition": (10.0, 1), "decoder_step": (100.0, 12), "vqgan_decode": (400.0, 1)}
RECORDS = [
    _record("torch", 3.0, STAGES, {"diffusers": 1.5, "diffusers-compile": 1.2}),
    _record("diffusers", 4.5, STAGES, {"torch": 1 / 1.5, "diffusers-compile": 0.8}),
    _record("diffusers-compile", 3.6, {}, {"torch": 1 / 1.2, "diffusers": 1.25}),
    _record("torch", 2.0, STAGES, {}, size=(768, 1280), batch=1, tflops=1234.5),
]


def test_the_plot_stacks_the_parts_of_one_image_and_compares_with_the_baseline():
    data = report.plot_data(RECORDS)
    assert data.unit == "s"  # an image takes over a second
    assert data.title == ("wuerstchen-v2 (random weights, seed 0) · a test device · fp16\n1024×1024, 768×1280 · "
                          "batch 2, 1 · prior 29 evaluations, decoder 12 steps · median of 5 runs after 2 warm-up")
    assert data.note.endswith("2025-01-02T03:04:05+00:00 · commit 0123456789 · torch 2.0")
    assert data.sizes == ((1024, 1024), (768, 1280)) and data.batches == (2, 1)
    first, second = data.panels
    assert (first.title, second.title) == ("1024×1024, batch 2", "768×1280, batch 1")
    torch_bar, diffusers_bar, compiled_bar = first.bars
    # per run: text 10·2 + 20 ms, prior 5 + 20·29 ms, decoder 10 + 100·12 ms, VQGAN 400 ms; per image: ÷ 2
    assert torch_bar.parts == pytest.approx({"text": 0.02, "prior": 0.2925, "decoder": 0.605, "vqgan": 0.2,
                                             "other": 1.5 - 1.1175})
    assert (torch_bar.total, torch_bar.label) == (1.5, "1.50 s · 1.50× vs diffusers")
    assert (diffusers_bar.total, diffusers_bar.label) == (2.25, "2.25 s")
    assert diffusers_bar.parts["other"] == pytest.approx(2.25 - 1.1175)
    assert compiled_bar.parts == {report.UNSPLIT: 1.8} and compiled_bar.label == "1.80 s · 1.25× vs diffusers"
    assert second.bars[0].label == "2.00 s"  # no baseline at this size
    assert data.axis_label(second) == "s per image (one call ÷ batch 1; median of 5 runs)"


def test_the_plot_of_several_sizes_and_batches_is_written(tmp_path):
    for name in ("plot.png", "plot.svg"):
        report.plot(RECORDS, tmp_path / name)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:400]


@pytest.mark.parametrize("value, text", [
    (0.0014, "0.00140"), (34.70, "34.7"), (0.0288174, "0.0288"), (1234.5, "1230"), (9.996, "10.0"),
    (0.00001234, "1.23e-05"), (2.5e7, "2.50e+07"), (0, "0"), (None, "–"),
])
def test_numbers_have_three_significant_digits(value, text):
    assert report.significant(value) == text


def test_the_table_prints_small_rates_with_significant_digits():
    lines = report.table(RECORDS).splitlines()
    assert "matmul peak 700 TFLOP/s" in lines[1]
    torch_line = lines[4]
    assert torch_line.split()[:8] == ["1024×1024", "2", "torch", "3.00", "3.00", "0.667", "20.0", "100"]
    assert " 0.00140 " in torch_line and "2.00e-04" in torch_line  # TFLOP/s and its % of peak, not 0.00
    assert torch_line.endswith("1.50× vs diffusers, 1.20× vs diffusers-compile")
    assert lines[6].split()[3:12] == ["3.60", "3.60", "0.556", "–", "–", "–", "–", "0.00140", "2.00e-04"]
    assert "1230" in lines[7]  # 1234.5 TFLOP/s


def test_csv_appends_rows_after_one_header(tmp_path):
    path = tmp_path / "rows.csv"
    report.append_csv(RECORDS[:1], path)
    report.append_csv(RECORDS[1:], path)
    rows = list(csv.reader(path.open(newline="")))
    assert rows[0] == list(report.CSV_COLUMNS) and len(rows) == 1 + len(RECORDS)
    assert [row[report.CSV_COLUMNS.index("target")] for row in rows[1:]] == [r["workload"]["target"] for r in RECORDS]


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
    (["--backend", "torch", "torch-fast"], "--load measures one backend, one --quantize and no baseline"),
    (["--dtype", "bf16", "--quantize", "none", "int8"], "--load measures one backend, one --quantize and no baseline"),
    (["--requests", "0"], "--requests 0: expected a positive number"),
])
@pytest.mark.filterwarnings("ignore::engine.runtime.SlowPrecisionWarning")
def test_bad_load_arguments_are_one_line(capsys, args, message):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--load", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("entry, message", [
    ({"height": 128, "width": 128, "weight": 0}, "--mix entry 1: weight=0: expected a finite number above 0"),
    ({"height": 128, "width": 128, "images": 0}, "--mix entry 1: images=0: expected a positive integer"),
    ({"height": 128, "width": 128, "prior_steps": 2.5}, "--mix entry 1: prior_steps=2.5: expected a positive integer"),
    ({"height": 128, "width": 128, "prior_guidance": float("nan")}, "prior_guidance=nan: expected a finite number"),
    ({"height": 128, "width": 128, "decoder_steps": True}, "decoder_steps=True: expected a positive integer"),
    ({"height": 128, "width": 128, "colour": "red"}, "--mix entry 1: {\"height\": 128, \"width\": 128, \"colour\": "),
    ({"height": 128}, "--mix entry 1: {\"height\": 128}: expected an object with height, width and any of"),
    ([128, 128], "--mix entry 1: [128, 128]: expected an object"),
])
def test_each_bad_mix_field_is_named(tmp_path, capsys, entry, message):
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps([{"height": 128, "width": 128}, entry]))
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--load", "--mix", str(mix)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_the_load_benchmark_runs_over_http_against_a_server_on_this_machine(tmp_path, capsys):
    pytest.importorskip("fastapi")
    from engine import Recipe, WuerstchenPipeline
    from engine.serving.api import ServerOptions
    from engine.serving.app import BackgroundServer, Service, create_app

    pipe = WuerstchenPipeline.from_preset("tiny", device="cpu")
    service = Service(pipe, ServerOptions(warmup=Recipe(128, 128, prior_steps=1, decoder_steps=1)))
    with BackgroundServer(create_app(service)) as url:
        assert service.ready.wait(120)  # the warm-up done, not beside the sequential measurement
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


# --- outputs: checked before any work, written whole or not at all ---------------------------------------------

@pytest.fixture
def nothing_measured(monkeypatch):
    """Fail the test if the bench builds or measures anything."""
    def measured(*args, **kwargs):
        raise AssertionError("the bench started work")

    for name in ("run", "build_engine", "build_diffusers"):
        monkeypatch.setattr(bench, name, measured)


@pytest.mark.parametrize("args, message", [
    (["--json", "missing/dir/x.json"], "--json 'missing/dir/x.json': folder 'missing/dir' does not exist"),
    (["--json", "folder"], "--json 'folder': is a folder: expected a file name"),
    (["--csv", "missing/rows.csv"], "--csv 'missing/rows.csv': folder 'missing' does not exist"),
    (["--csv", "other.csv"], "--csv 'other.csv': its header is not this bench's columns: expected a new file or "
                             "one that `wuerstchen bench --csv` wrote"),
    (["--plot", "plot.jpg"], "--plot 'plot.jpg': expected a file name ending in .png, .svg or .pdf"),
    (["--plot", "missing/plot.png"], "--plot 'missing/plot.png': folder 'missing' does not exist"),
    (["--json", "out.png", "--plot", "out.png"], "--json 'out.png' --plot 'out.png': expected a different file for "
                                                 "each"),
    (["--load", "--json", "missing/load.json"], "--json 'missing/load.json': folder 'missing' does not exist"),
    (["--load", "--csv", "rows.csv"], "--csv does not apply with --load: it writes --json only"),
])
def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch, capsys, nothing_measured, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "other.csv").write_text("name,seconds\nx,1\n")
    assert main(["bench", *TINY, "--no-cold-start", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"wuerstchen bench: error: {message}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder", "other.csv"]


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys, nothing_measured):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    # os.access, not the folder's mode: this may run as root, who may write anywhere.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    assert main(["bench", *TINY, "--json", str(locked / "out.json")]) == 2
    assert f"folder {str(locked)!r} is not writable" in capsys.readouterr().err


def _no_space(*args):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("write, name", [(report.write_json, "out.json"), (report.append_csv, "rows.csv"),
                                         (report.plot, "plot.png")])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, write, name):
    path = tmp_path / name
    path.write_bytes(b"the results of an earlier run\n")
    monkeypatch.setattr(os, "fsync", _no_space)  # the disk fills up as the new content is flushed
    with pytest.raises(OSError, match="No space left"):
        write(RECORDS, path)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert path.read_bytes() == b"the results of an earlier run\n"


@pytest.mark.parametrize("script", [attention, fusions, kernel_profile])
def test_the_kernel_benchmarks_check_their_json_path_first(tmp_path, capsys, script):
    with pytest.raises(SystemExit) as raised:
        script.main(["--json", str(tmp_path / "missing" / "out.json")])
    assert raised.value.code == 2
    assert f"argument --json: {str(tmp_path / 'missing' / 'out.json')!r}: folder " in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without a GPU")
@pytest.mark.parametrize("script", [attention, fusions, kernel_profile])
def test_the_kernel_benchmarks_say_in_one_line_that_they_need_a_gpu(script):
    with pytest.raises(SystemExit, match=r"^benchmarks\.\w+ \w+ GPU kernels: no CUDA GPU is available here$"):
        script.main([])


def test_a_quantized_bench_measures_the_quantized_engine_beside_diffusers(tmp_path, monkeypatch):
    """--quantize none int8 measures the unquantized and the quantized engine on diffusers' weights in one run,
    and each record, and each cold-start child, says what ran: the recipe, diffusers unquantized."""
    from engine.models import quantized

    monkeypatch.setattr(quantized, "interpreted", lambda: False)  # the kernels' references, not the interpreter
    specs = []

    popen = bench.subprocess.Popen

    class Child:  # the cold-start process: its spec kept, its first image at once
        def __init__(self, argv, **_):
            specs.append(json.loads(argv[-1]))
            self.stdout = iter(["first image\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(bench.subprocess, "Popen", lambda argv, **kw: (Child if "benchmarks.cold_start" in argv
                                                                       else popen)(argv, **kw))
    argv = ["bench", *TINY, "--dtype", "bf16", "--quantize", "none", "int8", "--baseline", "diffusers", "--json",
            str(tmp_path / "o.json")]
    assert main(argv) == 0
    records = {r["workload"]["target"]: r for r in json.loads((tmp_path / "o.json").read_text())["records"]}
    assert list(records) == ["torch", "torch int8", "diffusers"]
    workloads = {target: record["workload"] for target, record in records.items()}
    assert workloads["torch int8"]["quantization"].startswith("int8 (prior ")
    recipe = QuantRecipe.from_dict(workloads["torch int8"]["quantization_recipe"])  # the recipe file's form
    assert recipe.scheme.value == "int8" and recipe.scan["prior"]["step_error"] > 0
    assert workloads["torch"]["quantization_recipe"] is None
    assert workloads["torch int8"]["backend"] == "torch" and workloads["torch int8"]["dtype"] == "bf16"
    assert workloads["torch"]["quantization"] is None and workloads["diffusers"]["quantization"] is None
    weights = {target: record["results"]["weights_gb"] for target, record in records.items()}
    assert weights["torch"] == pytest.approx(weights["diffusers"]) and weights["torch int8"] < weights["torch"]
    assert records["torch int8"]["results"]["speedup_vs"].keys() == {"torch", "diffusers"}
    assert [(spec["target"], spec["quantize"]) for spec in specs] == [("torch", None), ("torch", "int8"),
                                                                      ("diffusers", None)]


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8", "RECIPE"], "--quantize int8 RECIPE: expected each scheme once"),
    (["--device", "cpu", "--quantize", "none", "int8"],
     "--quantize none int8: these run on different devices or precisions (torch cpu fp32, torch int8 cpu bf16); "
     "pass --dtype"),
    (["--quantize", "fp4"], "--quantize 'fp4' is not supported: expected none, fp8"),
])
def test_bad_quantize_arguments_are_one_line(tmp_path, capsys, args, message):
    recipe = tmp_path / "int8.json"
    recipe.write_text(json.dumps(QuantRecipe.every("int8").to_dict()))
    args = [str(recipe) if arg == "RECIPE" else arg for arg in args]
    assert main(["bench", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wuerstchen bench: error: ")
    assert message.replace("RECIPE", str(recipe)) in err


def test_the_cold_start_child_builds_the_quantized_engine(monkeypatch, capsys):
    from benchmarks import cold_start
    from engine.models import quantized
    from engine.quantization import QuantRecipe

    monkeypatch.setattr(quantized, "interpreted", lambda: False)
    built, build_engine = [], bench.build_engine
    monkeypatch.setattr(bench, "build_engine", lambda runtime: built.append(runtime) or build_engine(runtime))
    recipe = QuantRecipe.every("int8")
    cold_start.main({"target": "torch", "source": {"preset": "tiny"}, "device": "cpu", "dtype": "bf16", "height": 128,
                     "width": 128, "batch": 1, "recipe": {"prior_steps": 2, "decoder_steps": 2},
                     "quantize": recipe.to_dict()})
    assert capsys.readouterr().out == "first image\n"
    assert built[0].quantization == recipe and built[0].precision.value == "bf16"



def test_a_given_target_is_recorded_as_the_engine_that_ran_it():
    """`run` with targets of the caller's (as benchmarks.tensorrt_check passes them): each record names the
    backend, precision and source of the pipeline that ran, not those of the options' first runtime."""
    from engine import WuerstchenPipeline
    from engine.recipe import Recipe
    from engine.runtime import ModelSource, resolve

    options = bench.Options(runtimes=(resolve(ModelSource.choose(preset="tiny"), "torch", "cpu", "fp32"),),
                            sizes=((128, 128),), batches=(1,), recipe=Recipe(prior_steps=2, decoder_steps=2),
                            warmup=1, runs=1, cold_start=False)
    pipe = WuerstchenPipeline.from_preset("tiny", "cpu", torch.bfloat16, seed=3)
    [record] = bench.run(options, progress=lambda line: None, targets={"mine": bench.engine_target(pipe)})
    workload = record["workload"]
    assert (workload["target"], workload["backend"], workload["dtype"]) == ("mine", "torch", "bf16")
    assert workload["source"] == "tiny demo (random weights, seed 3)" and workload["quantization"] is None
