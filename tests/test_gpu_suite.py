"""The GPU suite without a GPU: its plan and time limits, a run of stand-in steps that pass, fail and time out,
the results files and their summary, the fusion verdicts, the wheel folder, the README's generated table, and
the dry run end to end."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from benchmarks import gpu_suite, results, wheels
from benchmarks.gpu_suite import Step, Suite, fusion_verdicts, parse_attention, parse_tests, plan, select, time_limits
from engine.errors import WuerstchenError

REPOSITORY = Path(__file__).resolve().parents[1]
H100 = {"date": "2026-12-01T10:00:00+00:00", "device": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
        "cuda": "13.0", "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "diffusers": "0.42.1"},
        "git_commit": "0123456789abcdef0123456789abcdef01234567"}


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def gpu_plan(tmp_path: Path) -> list[Step]:
    return plan(tmp_path / "raw", tmp_path / "site", tmp_path / ".whl")


# 1. The plan


def test_the_plan_runs_the_issue_commands_in_order_within_eight_minutes(tmp_path):
    steps = gpu_plan(tmp_path)
    assert [step.name for step in steps] == ["install", "tests", "fusions", "e2e", "attention", "kernels", "quant",
                                             "quant-e2e", "load", "e2e-compile"]
    commands = {step.name: " ".join(step.command) for step in steps}
    assert "-m pytest" in commands["tests"]
    assert "tests/test_fast.py tests/test_fused.py tests/test_quant_kernels.py" in commands["tests"]
    assert "-m benchmarks.fusions --dtype fp16 --json" in commands["fusions"]
    for flags in ("bench --preset wuerstchen-v2 --device cuda --dtype fp16 --sizes 1024", "--batch 1 4",
                  "--backend torch torch-fast --baseline diffusers --json"):
        assert flags in commands["e2e"]
    assert "--backend torch-fast --baseline diffusers-compile" in commands["e2e-compile"]
    assert "-m benchmarks.attention --dtype fp16" in commands["attention"]
    assert "-m benchmarks.kernel_profile --dtype fp16" in commands["kernels"]
    assert "--sizes 1024 --backend torch-fast --load --concurrency 1 2 4 8" in commands["load"]
    assert all(step.output is not None and step.parse is not None for step in steps)
    assert "-m benchmarks.quant_kernels --json" in commands["quant"]
    for flags in ("bench --preset wuerstchen-v2 --device cuda --dtype bf16 --sizes 1024", "--batch 1",
                  "--backend torch-fast --quantize none fp8 --baseline diffusers --json"):
        assert flags in commands["quant-e2e"]
    assert [step.name for step in steps if step.optional] == ["quant", "quant-e2e", "load", "e2e-compile"]

    limits = time_limits(steps, gpu_suite.DEFAULT_BUDGET_S)
    assert limits == {"install": 20, "tests": 120, "fusions": 80, "e2e": 170, "attention": 25, "kernels": 65,
                      "quant": 40, "quant-e2e": 120, "load": 150, "e2e-compile": 240}
    assert sum(limit for step, (name, limit) in zip(steps, limits.items(), strict=True) if not step.optional) == 480
    halved = time_limits(steps, 240)
    assert halved["e2e"] == 85 and halved["tests"] == 60 and halved["e2e-compile"] == 240


def test_only_picks_steps_in_order_after_the_install(tmp_path):
    steps = gpu_plan(tmp_path)
    assert [s.name for s in select(steps, ["e2e,tests"])] == ["install", "tests", "e2e"]
    assert [s.name for s in select(steps, ["kernels", "attention"])] == ["install", "attention", "kernels"]
    assert [s.name for s in select(steps, ["install"])] == ["install"]
    named = select(steps, ["e2e-compile"])
    assert [(s.name, s.optional) for s in named] == [("install", False), ("e2e-compile", False)]
    limits = time_limits(named, 260)
    assert limits == {"install": 20, "e2e-compile": 240}
    with pytest.raises(WuerstchenError, match=r"^--only nope: expected any of install, tests, fusions, e2e, "
                                              r"attention, kernels, quant, quant-e2e, load, e2e-compile$"):
        select(steps, ["tests,nope"])
    with pytest.raises(WuerstchenError, match=r"^--budget -5: expected a positive number of seconds$"):
        time_limits(steps, -5)


def test_the_dry_plan_has_the_same_steps_and_shares(tmp_path):
    dry = plan(tmp_path / "raw", tmp_path / "site", tmp_path / "wheels", dry_run=True)
    assert [(s.name, s.share_s, s.optional) for s in dry] == [(s.name, s.share_s, s.optional)
                                                              for s in gpu_plan(tmp_path)]
    commands = {step.name: " ".join(step.command) for step in dry}
    assert "--collect-only" in commands["tests"] and "--preset tiny --device cpu" in commands["e2e"]
    assert "--require wuerstchen_probe==0.0.0" in commands["install"]
    assert "cuda" not in " ".join(commands.values())


# 2. Running: a failing or timed-out step is recorded and the next one runs


@pytest.fixture(scope="module")
def stand_in_run(tmp_path_factory):
    """Four stand-in steps under a 12-second budget: one passes and writes output, one fails, one outlives
    its limit (leaving a grandchild behind), and the last reads the results file the suite has written so
    far."""
    folder = tmp_path_factory.mktemp("suite")
    out, raw = folder / "out", folder / "raw"
    raw.mkdir()
    name = f"{datetime.now(timezone.utc).date().isoformat()}-h100-80gb-hbm3"
    child = folder / "grandchild.pid"
    writes = (f"import json; print('installing'); "
              f"json.dump({{'versions': {{'x': '1'}}}}, open({str(raw / 'i.json')!r}, 'w'))")
    steps = [
        Step("install", "writes a JSON file", python(writes), 1, raw / "i.json", gpu_suite.parse_install),
        Step("tests", "fails", python("import sys; print('boom here'); sys.exit(3)"), 1),
        Step("fusions", "sleeps past its limit",
             python(f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                    f"open({str(child)!r}, 'w').write(str(p.pid)); print('sleeping', flush=True); time.sleep(60)"),
             1),
        Step("e2e", "reads the results written so far",
             python(f"import json; run = json.load(open({str(out / (name + '.json'))!r})); "
                    "print('so far:', [s['status'] for s in run['steps']])"), 3),
    ]
    lines: list[str] = []
    start = time.monotonic()
    run = Suite(steps, 12.0, out, provenance=lambda environment: dict(H100), echo=lines.append).run()
    return run, out, name, lines, time.monotonic() - start, child


def test_each_step_is_recorded_and_a_failure_or_timeout_does_not_stop_the_next(stand_in_run):
    run, _, _, lines, seconds, _ = stand_in_run
    steps = {step["name"]: step for step in run["steps"]}
    assert [s["status"] for s in run["steps"]] == ["passed", "failed", "timed out", "passed"]
    assert steps["install"]["results"] == {"versions": {"x": "1"}} and steps["install"]["tail"] is None
    assert steps["tests"]["returncode"] == 3 and steps["tests"]["note"] == "exit status 3"
    assert steps["tests"]["tail"] == "boom here"
    assert steps["fusions"]["returncode"] is None and steps["fusions"]["note"].startswith("stopped at its limit")
    assert steps["fusions"]["tail"] == "sleeping"
    # Steps that were quick left their time to the next: the sleeper had more than its 2-second share.
    assert 3 < steps["fusions"]["limit_s"] <= 6.1 and steps["fusions"]["seconds"] >= steps["fusions"]["limit_s"]
    assert seconds < 12.0 + 2 * gpu_suite.KILL_GRACE_S
    assert all(s["git_commit"] == H100["git_commit"] for s in run["steps"])
    assert "so far: ['passed', 'failed', 'timed out', 'pending']" in lines
    assert any(re.fullmatch(r"==> tests failed, \d+ s \(exit status 3\)", line) for line in lines)
    assert not gpu_suite.succeeded(run, [])


def test_a_timed_out_step_takes_its_children_with_it(stand_in_run):
    pid = int(stand_in_run[5].read_text())
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] in "ZX", "the grandchild outlived its step"


def test_results_file_and_summary_hold_provenance_statuses_and_output(stand_in_run):
    run, out, name, lines, _, _ = stand_in_run
    assert sorted(path.name for path in out.iterdir()) == [f"{name}.json", f"{name}.md", "gpu-suite.log"]
    written = json.loads((out / f"{name}.json").read_text())
    assert written["format"] == "wuerstchen-gpu-suite" and written["dry_run"] is False
    assert written["provenance"] == H100 and written["budget_s"] == 12.0 and written["finished"]
    assert [(s["name"], s["status"]) for s in written["steps"]] == [
        ("install", "passed"), ("tests", "failed"), ("fusions", "timed out"), ("e2e", "passed")]
    assert all(s["seconds"] is not None and s["limit_s"] > 0 and s["started"] for s in written["steps"])
    summary = (out / f"{name}.md").read_text()
    assert summary.startswith(f"# GPU suite: NVIDIA H100 80GB HBM3, {name[:10]}\n")
    assert "| tests | failed: exit status 3 |" in summary
    assert "## tests: failed, the end of its output\n\n```\nboom here\n```" in summary
    assert "## fusions: timed out, the end of its output\n\n```\nsleeping\n```" in summary
    log = (out / "gpu-suite.log").read_text().splitlines()
    assert "installing" in log and "boom here" in log and log[-1].startswith("written: ")


def test_a_rerun_of_one_step_keeps_the_others_of_the_same_day(tmp_path):
    name = f"{datetime.now(timezone.utc).date().isoformat()}-h100-80gb-hbm3"
    earlier = {"format": "wuerstchen-gpu-suite", "steps": [
        {"name": "install", "status": "passed", "seconds": 9.0, "command": "python -m benchmarks.wheels install"},
        {"name": "tests", "status": "failed", "seconds": 100.0, "command": "python -m pytest"},
        {"name": "e2e", "status": "timed out", "seconds": 170.0, "command": "python -m engine.cli bench"},
        {"name": "kernels", "status": "pending", "seconds": None, "command": "python -m benchmarks.kernel_profile"}]}
    (tmp_path / f"{name}.json").write_text(json.dumps(earlier))
    steps = [Step("install", "", python("pass"), 1), Step("e2e", "", python("pass"), 1)]
    run = Suite(steps, 20.0, tmp_path / "out", results=tmp_path, provenance=lambda environment: dict(H100),
                echo=lambda line: None).run()
    assert [(s["name"], s["status"], s.get("carried_over")) for s in run["steps"]] == [
        ("install", "passed", False), ("tests", "failed", True), ("e2e", "passed", False)]
    for folder in (tmp_path, tmp_path / "out"):
        assert json.loads((folder / f"{name}.json").read_text())["steps"] == run["steps"]
    assert "| tests (earlier run) | failed |" in (tmp_path / f"{name}.md").read_text()
    assert gpu_suite.succeeded(run, steps)


def test_an_optional_step_runs_only_when_time_is_left(tmp_path):
    steps = [Step("install", "", python("pass"), 1), Step("e2e-compile", "", python("pass"), 30, optional=True)]
    run = Suite(steps, 5.0, tmp_path, provenance=lambda environment: dict(H100), echo=lambda line: None).run()
    assert run["steps"][1]["status"] == "skipped" and run["steps"][1]["note"].endswith("it needs 30 s")
    assert gpu_suite.succeeded(run, steps)
    steps[1] = Step("e2e-compile", "", python("pass"), 3, optional=True)
    run = Suite(steps, 5.0, tmp_path, provenance=lambda environment: dict(H100), echo=lambda line: None).run()
    assert run["steps"][1]["status"] == "passed" and run["steps"][1]["limit_s"] > 3


def test_a_step_that_writes_no_output_or_a_bad_one_fails(tmp_path):
    missing = Step("install", "", python("pass"), 1, tmp_path / "never.json", gpu_suite.parse_install)
    outcome = gpu_suite.run_step(missing, 20, dict(os.environ), lambda line: None)
    assert (outcome.status, outcome.note) == ("failed", "wrote no never.json")
    bad = tmp_path / "bad.json"
    broken = Step("install", "", python(f"open({str(bad)!r}, 'w').write('{{not json')"), 1, bad,
                  gpu_suite.parse_install)
    outcome = gpu_suite.run_step(broken, 20, dict(os.environ), lambda line: None)
    assert outcome.status == "failed" and outcome.note.startswith("could not read bad.json: Expecting property name")


def test_results_are_written_even_where_their_summary_fails(tmp_path):
    run = {"format": "wuerstchen-gpu-suite", "dry_run": False, "started": "2026-12-01T10:00:00+00:00",
           "budget_s": 480.0, "provenance": H100, "steps": [
               {"name": "load", "status": "passed", "results": {"workload": {}, "measurements": [{"odd": 1}]}}]}
    json_path, summary_path = gpu_suite.write_results(run, [tmp_path])
    assert json.loads(json_path.read_text()) == run
    assert summary_path.read_text() == ("# GPU suite, 2026-12-01-h100-80gb-hbm3\n\nThe summary could not be written "
                                        "(KeyError: 'runtime'); the results are in 2026-12-01-h100-80gb-hbm3.json.\n")


def test_results_are_named_by_date_and_gpu():
    assert gpu_suite.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_suite.gpu_slug("NVIDIA H200") == "h200"
    assert gpu_suite.gpu_slug("") == "unknown-device"
    run = {"started": "2026-12-01T10:00:00+00:00", "provenance": H100, "dry_run": True}
    assert gpu_suite.results_name(run) == "2026-12-01-h100-80gb-hbm3-dry-run"


# 3. Reading the steps' outputs


def test_pytest_junit_is_read_into_counts_and_failures(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_fast" name="test_kernel[fp16]" time="0.1">'
        '<failure message="AssertionError: 0.3 &gt; 0.01&#10;second line">trace line 1\nassert 0.3 &lt; 0.01'
        '</failure></testcase>'
        '<testcase classname="tests.test_fused" name="test_compile" time="0.2"><error message="RuntimeError: CUDA">'
        'boom</error></testcase>'
        '<testcase classname="tests.test_fused" name="test_skip"><skipped message="no"/></testcase>'
        '<testcase classname="tests.test_fused" name="a"/><testcase classname="tests.test_fused" name="b"/>'
        '</testsuite></testsuites>')
    found = parse_tests(xml)
    assert {k: v for k, v in found.items() if k != "failures"} == {"tests": 5, "passed": 2, "failed": 1,
                                                                   "errors": 1, "skipped": 1}
    assert found["failures"] == [
        {"test": "tests/test_fast.py::test_kernel[fp16]", "kind": "failure", "message": "AssertionError: 0.3 > 0.01",
         "output": "trace line 1\nassert 0.3 < 0.01"},
        {"test": "tests/test_fused.py::test_compile", "kind": "error", "message": "RuntimeError: CUDA",
         "output": "boom"}]


def fusion_rows(fast_prior: float, kernels_prior: float, gemm_vqgan: float, gemm_speedups=(1.2, 1.1)) -> dict:
    """`benchmarks.fusions`' JSON with the given prior kernel times (torch-fast, kernels) and VQGAN wall time
    with linear_gelu (against 5.0 without)."""
    def stage(stage, variant, wall, kernel):
        return {"stage": stage, "variant": variant, "wall_ms": wall, "kernel_ms": kernel, "kernels": 10,
                "by_kind_ms": {}, "relative_difference": 1e-3}

    kernels = [{"kernel": f"linear + GELU, VQGAN {side}", "shape": [1, 2, 3], "unfused_ms": s * 0.1,
                "fused_ms": 0.1, "speedup": s, "max_diff": 1e-3, "fused_gb_per_s": 100.0}
               for side, s in zip(("256×256", "512×512"), gemm_speedups, strict=True)]
    kernels.append({"kernel": "residual + FiLM, decoder 64×64", "shape": [1, 4096, 320], "unfused_ms": 0.05,
                    "fused_ms": 0.1, "speedup": 0.5, "max_diff": 1e-3, "fused_gb_per_s": 100.0})
    return {"dtype": "fp16", "size": 1024, "kernels": kernels, "stages": [
        stage("prior_step", "torch", 30.0, 14.0), stage("decoder_step", "torch", 40.0, 16.0),
        stage("vqgan_decode", "torch", 26.0, 26.0),
        stage("prior_step", "kernels", 25.0, kernels_prior), stage("decoder_step", "kernels", 35.0, 12.0),
        stage("vqgan_decode", "kernels", 8.0, 7.0),
        stage("prior_step", "torch-fast", 20.0, fast_prior), stage("decoder_step", "torch-fast", 30.0, 10.0),
        stage("vqgan_decode", "torch-fast", 5.0, 4.5),
        stage("vqgan_decode", "torch-fast + linear_gelu", gemm_vqgan, 4.0)]}


def test_fusion_verdicts_say_which_switches_to_turn_on_or_off():
    kept = fusion_verdicts(fusion_rows(fast_prior=6.0, kernels_prior=9.0, gemm_vqgan=5.5))
    assert [row["verdict"] for row in kept["kernels"]] == ["wins", "wins", "loses"]
    chains, gemm = kept["switches"]["chains"], kept["switches"]["gemm_gelu"]
    # An image: 29 prior steps and 12 decoder steps at their kernel time (graph replays), the VQGAN's wall time.
    assert chains == {"verdict": "wins", "default": True, "change": None,
                      "evidence": f"an image's steps and decode: {29 * 6 + 12 * 10 + 5:.1f} ms with the chains, "
                                  f"{29 * 9 + 12 * 12 + 8:.1f} ms without"}
    assert gemm["verdict"] == "loses" and gemm["change"] is None and gemm["default"] is False
    assert gemm["evidence"] == ("VQGAN decode 5.50 ms with it, 5.00 ms without; GEMM + GELU 1.20×, 1.10× against "
                                "cuBLAS + GELU")

    changed = fusion_verdicts(fusion_rows(fast_prior=12.0, kernels_prior=9.0, gemm_vqgan=4.0))
    assert changed["switches"]["chains"]["change"] == "turn off"
    assert changed["switches"]["gemm_gelu"] == changed["switches"]["gemm_gelu"] | {"verdict": "wins",
                                                                                   "change": "turn on"}
    # The stage alone does not ship the GEMM: it must also beat cuBLAS at both shapes.
    slower_kernel = fusion_verdicts(fusion_rows(6.0, 9.0, gemm_vqgan=4.0, gemm_speedups=(1.3, 0.9)))
    assert slower_kernel["switches"]["gemm_gelu"]["verdict"] == "loses"


def test_attention_rows_get_a_speedup_and_verdict(tmp_path):
    path = tmp_path / "attention.json"
    path.write_text(json.dumps({"provenance": H100, "rows": [
        {"shape": "prior 24×24", "sdpa_us": 36.0, "triton_us": 24.0},
        {"shape": "decoder 64×64", "sdpa_us": 147.0, "triton_us": 210.0}]}))
    rows = parse_attention(path)["rows"]
    assert [(row["speedup"], row["verdict"]) for row in rows] == [(1.5, "wins"), (0.7, "loses")]


# 4. The wheel folder


def test_wheels_download_with_the_flags_of_the_gpu_machine(tmp_path):
    command = wheels.download_command(tmp_path, "diffusers", "0.42.1")
    assert command[1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                           "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
                           "manylinux2014_x86_64", "--platform", "manylinux1_x86_64", "-d", str(tmp_path),
                           "diffusers==0.42.1"]
    install = wheels.install_command([tmp_path / "a.whl"], tmp_path / "project", tmp_path / "site")
    assert install[1:] == ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(tmp_path / "site"),
                           str(tmp_path / "a.whl"), str(tmp_path / "project")]
    assert wheels.WHEELS == {"diffusers": "0.42.1", "importlib_metadata": "8.7.1"}


def test_the_wheel_folder_holds_each_wheel_once_for_the_gpu_machine(tmp_path):
    for name in ("diffusers-0.42.1-py3-none-any.whl", "importlib_metadata-8.7.1-py3-none-any.whl",
                 "regex-2026.1.1-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in wheels.check_wheel_folder(tmp_path, wheels.WHEELS)][:2] == [
        "diffusers-0.42.1-py3-none-any.whl", "importlib_metadata-8.7.1-py3-none-any.whl"]
    (tmp_path / "diffusers-0.41.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(WuerstchenError, match=r"diffusers is there 2 times \(0.41.0, 0.42.1\); expected one version"):
        wheels.check_wheel_folder(tmp_path, wheels.WHEELS)
    (tmp_path / "diffusers-0.41.0-py3-none-any.whl").unlink()
    (tmp_path / "importlib_metadata-8.7.1-py3-none-any.whl").unlink()
    with pytest.raises(WuerstchenError, match=r"no importlib_metadata wheel; expected importlib_metadata==8.7.1"):
        wheels.check_wheel_folder(tmp_path, wheels.WHEELS)
    (tmp_path / "importlib_metadata-8.7.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "numpy-2.5.0-cp311-cp311-macosx_14_0_arm64.whl").write_bytes(b"")
    with pytest.raises(WuerstchenError, match=r"numpy-2.5.0-cp311-cp311-macosx_14_0_arm64.whl: built for "
                                              r"cp311-cp311-macosx_14_0_arm64; expected CPython 3.12"):
        wheels.check_wheel_folder(tmp_path, wheels.WHEELS)
    with pytest.raises(WuerstchenError, match=r"no such folder; prepare it on a networked machine with "
                                              r"`python -m benchmarks.wheels download"):
        wheels.check_wheel_folder(tmp_path / "absent", wheels.WHEELS)


# 5. The README's table


def bench_record(target: str, batch: int, latency: float, stages: dict[str, float] | None = None) -> dict:
    return {"workload": {"target": target, "batch": batch, "height": 1024, "width": 1024, "dtype": "fp16"},
            "results": {"latency_s": {"median": latency},
                        "stages_ms": {stage: {"median": ms} for stage, ms in (stages or {}).items()}}}


def results_file(folder: Path, started: str, device: str, records: list[dict], dry_run: bool = False) -> Path:
    run = {"format": "wuerstchen-gpu-suite", "format_version": 1, "dry_run": dry_run, "started": started,
           "budget_s": 480.0, "seconds": 400.0, "finished": started, "provenance": H100 | {"device": device},
           "steps": [
               {"name": "install", "status": "passed", "seconds": 8.0, "results": {}},
               {"name": "tests", "status": "failed", "seconds": 101.0, "results": {
                   "tests": 156, "passed": 153, "failed": 3, "errors": 0, "skipped": 0, "failures": []}},
               {"name": "fusions", "status": "passed", "seconds": 70.0,
                "results": fusion_verdicts(fusion_rows(6.0, 9.0, 5.5))},
               {"name": "e2e", "status": "passed", "seconds": 150.0, "results": {"records": records}},
               {"name": "e2e-compile", "status": "passed", "seconds": 200.0, "results": {"records": [
                   bench_record("torch-fast", 1, 0.40), bench_record("diffusers-compile", 1, 0.58)]}}]}
    path = folder / f"{started[:10]}-{gpu_suite.gpu_slug(device)}{'-dry-run' if dry_run else ''}.json"
    path.write_text(json.dumps(run))
    return path


RECORDS = [
    bench_record("torch", 1, 1.25, {"prior_step": 21.0, "decoder_step": 30.5, "vqgan_decode": 25.0}),
    bench_record("torch-fast", 1, 0.42, {"prior_step": 7.5, "decoder_step": 11.25, "vqgan_decode": 6.0}),
    bench_record("diffusers", 1, 1.30, {"prior_step": 22.2, "decoder_step": 33.4, "vqgan_decode": 26.4}),
    bench_record("torch", 4, 4.0), bench_record("torch-fast", 4, 1.2), bench_record("diffusers", 4, 2.4),
]
README = "# Title\n\nBefore.\n\n<!-- gpu-results:begin -->\nan old table\n<!-- gpu-results:end -->\n\nAfter.\n"


def test_the_readme_block_without_a_run_says_how_to_make_one(tmp_path):
    block = results.readme_block(tmp_path)
    assert block == results.performance_block(None)
    lines = block.splitlines()
    assert lines[0] == "<!-- gpu-results:begin -->" and lines[-1] == "<!-- gpu-results:end -->"
    assert lines[2].startswith("No GPU run yet: run `python -m benchmarks.gpu_suite` on an H100/H200. The machine "
                               "needs no network: on a networked machine, `python -m benchmarks.wheels download`")
    assert "prior step ≤ 8 ms, decoder step ≤ 10 ms, VQGAN decode ≤ 8 ms" in block
    assert "1.326 s eager, 0.556–0.602 s with torch.compile" in block
    updated = results.replace_block(README, block)
    assert updated.startswith("# Title\n\nBefore.\n\n<!-- gpu-results:begin -->\n")
    assert updated.endswith("<!-- gpu-results:end -->\n\nAfter.\n") and "an old table" not in updated
    with pytest.raises(WuerstchenError, match=r"^README: no <!-- gpu-results:begin --> … <!-- gpu-results:end --> "
                                              r"block; expected the two markers, in that order$"):
        results.replace_block("# no markers\n", block)


def test_the_readme_block_shows_the_newest_run_against_the_targets(tmp_path):
    results_file(tmp_path, "2026-11-30T09:00:00+00:00", "NVIDIA H200", RECORDS[:1])
    newest = results_file(tmp_path, "2026-12-01T10:00:00+00:00", "NVIDIA H100 80GB HBM3", RECORDS)
    results_file(tmp_path, "2026-12-02T10:00:00+00:00", "CPU x86_64, 2 cores", RECORDS, dry_run=True)
    assert results.newest(tmp_path) == newest
    block = results.readme_block(tmp_path)
    assert f"from `{newest}`" in block
    assert ("Measured on NVIDIA H100 80GB HBM3 on 2026-12-01 (driver 580.159.04, CUDA 13.0, torch 2.11.0+cu130, "
            "triton 3.6.0, diffusers 0.42.1), commit `0123456789`") in block
    table = block.splitlines()
    start = table.index("| 1024×1024, fp16 | target | torch | torch-fast | diffusers | diffusers + compile "
                        "| torch-fast meets it |")
    assert table[start + 2:start + 7] == [
        "| prior step (guidance batch 2), ms | ≤ 8 | 21.0 | 7.5 | 22.2 | – | yes |",
        "| decoder step, ms | ≤ 10 | 30.5 | 11.2 | 33.4 | – | no |",
        "| VQGAN decode, ms | ≤ 8 | 25.0 | 6.0 | 26.4 | – | yes |",
        "| end to end, batch 1, s | below diffusers + compile (0.556–0.602 on an H200) | 1.250 | 0.420 | 1.300 "
        "| 0.580 | yes: 1.38× diffusers + compile, this run |",
        "| end to end, batch 4, s | below diffusers eager (2.379 on an H200) | 4.000 | 1.200 | 2.400 | – "
        "| yes: 2.00× diffusers, this run |"]
    assert "Fusions: `chains` wins (keep on); `gemm_gelu` loses (keep off)." in block
    assert "Steps: install passed, 8 s · tests failed, 101 s (153 passed, 3 failed of 156) · fusions passed, 70 s" \
        in block

    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert results.main(["--check", str(readme), "--results", str(tmp_path)]) == 1
    assert results.main(["--readme", str(readme), "--results", str(tmp_path)]) == 0
    assert readme.read_text() == results.replace_block(README, block)
    assert results.main(["--check", str(readme), "--results", str(tmp_path)]) == 0


def test_the_summary_has_the_fusion_verdicts_attention_rows_and_kernel_split(tmp_path):
    run = json.loads(results_file(tmp_path, "2026-12-01T10:00:00+00:00", "NVIDIA H100 80GB HBM3", RECORDS)
                     .read_text())
    run["steps"] += [
        {"name": "attention", "status": "passed", "seconds": 9.0, "results": {"rows": [
            {"shape": "prior 24×24, guidance batch", "batch": 2, "heads": 24, "queries": 576, "keys": 653,
             "sdpa_us": 36.0, "triton_us": 24.0, "speedup": 1.5, "verdict": "wins", "max_difference": 2e-3}]}},
        {"name": "kernels", "status": "timed out", "seconds": 65.0, "note": "stopped at its limit of 65 s",
         "tail": "Traceback …\nKeyboardInterrupt", "results": {"rows": {"torch-fast": {"prior_step": {
             "wall_ms": 7.0, "kernel_ms": 6.5, "kernels": 300, "by_kind_ms": {"gemm": 4.0, "attention": 1.0}}}}}}]
    summary = results.summary_markdown(run).splitlines()
    assert summary[0] == "# GPU suite: NVIDIA H100 80GB HBM3, 2026-12-01"
    assert "Decision: `chains` wins (keep on); `gemm_gelu` loses (keep off)." in summary
    assert "| `gemm_gelu` | loses | off | none | VQGAN decode 5.50 ms with it, 5.00 ms without; GEMM + GELU 1.20×, " \
           "1.10× against cuBLAS + GELU |" in summary
    assert "| residual + FiLM, decoder 64×64 | 50.0 | 100.0 | 0.50× | loses |" in summary
    assert "| prior 24×24, guidance batch | (2, 24, 576, 653) | 36.0 | 24.0 | 1.50× | wins | 2.0e-03 |" in summary
    assert "| target | stage | wall | kernels | count | attention | gemm |" in summary
    assert "| torch-fast | prior_step | 7.00 | 6.50 | 300 | 1.00 | 4.00 |" in summary
    assert "153 passed, 3 failed, 0 errors, 0 skipped of 156." in summary
    end = summary.index("## kernels: timed out, the end of its output")
    assert summary[end + 2:end + 6] == ["```", "Traceback …", "KeyboardInterrupt", "```"]


def test_the_summary_compares_each_quantized_target_with_the_unquantized_one_at_its_workload():
    def record(target: str, batch: int, quantization: str | None, latency: float, weights_gb: float) -> dict:
        found = bench_record(target, batch, latency, {"prior_step": latency * 10, "decoder_step": latency * 20})
        found["workload"] |= {"backend": "torch-fast", "quantization": quantization, "dtype": "bf16"}
        found["results"]["weights_gb"] = weights_gb
        return found

    fp8 = "fp8 (prior 40, decoder 60 Linears, from a scan)"
    run = {"started": "2026-12-01T10:00:00+00:00", "budget_s": 480.0, "provenance": H100, "steps": [
        {"name": "quant-e2e", "status": "passed", "results": {"records": [
            record("torch-fast", 1, None, 0.5, 4.0), record("torch-fast fp8", 1, fp8, 0.4, 2.2),
            record("torch-fast", 4, None, 1.6, 4.0), record("torch-fast fp8", 4, fp8, 1.0, 2.2)]}}]}
    summary = results.summary_markdown(run).splitlines()
    start = summary.index("## Quantized end to end")
    assert summary[start + 4:start + 8] == [
        "| torch-fast | none | 1024×1024, bf16, batch 1 | 0.500 | 5.00 | 10.00 | 4.00 | – | – |",
        f"| torch-fast fp8 | {fp8} | 1024×1024, bf16, batch 1 | 0.400 | 4.00 | 8.00 | 2.20 | 1.25× (≥ 1.25) "
        "| 55 % (≤ 55 %) |",
        "| torch-fast | none | 1024×1024, bf16, batch 4 | 1.600 | 16.00 | 32.00 | 4.00 | – | – |",
        f"| torch-fast fp8 | {fp8} | 1024×1024, bf16, batch 4 | 1.000 | 10.00 | 20.00 | 2.20 | 1.60× (≥ 1.25) "
        "| 55 % (≤ 55 %) |"]


def load_row(name: str, images_per_s: float, p50: float, p99: float) -> dict:
    return {"measurement": name, "images_per_s": images_per_s, "latency_s": {"p50": p50, "p99": p99}}


def test_the_scheduler_under_load_is_shown_against_its_targets_in_the_summary_and_the_readme(tmp_path):
    path = results_file(tmp_path, "2026-12-01T10:00:00+00:00", "NVIDIA H200", RECORDS)
    run = json.loads(path.read_text())
    run["steps"].append({"name": "load", "status": "passed", "seconds": 140.0, "results": {
        "workload": {"runtime": "wuerstchen-v2 (random weights, seed 0) on torch-fast, cuda, fp16"},
        "measurements": [load_row("sequential", 1.25, 0.79, 0.81), load_row("concurrency 1", 1.3, 0.77, 0.8),
                         load_row("concurrency 4", 4.5, 0.9, 1.1), load_row("concurrency 8", 6.0, 1.3, 1.5),
                         load_row("poisson 4.8 req/s", 4.7, 1.2, 1.9)]}})
    path.write_text(json.dumps(run))
    expected = [
        "| scheduler under load | measured | target | meets it |",
        "|---|---|---|---|",
        "| images/s at saturation | 6.00 | ≥ 5 on an H200 | yes |",
        "| saturation against one request at a time | 4.80× (1.25 images/s) | ≥ 1.5× | yes |",
        "| p99 latency at 80 % of saturation (poisson 4.8 req/s) | 1.900 s = 2.41× solo (0.790 s) | ≤ 2× solo | no |"]
    summary = results.summary_markdown(run).splitlines()
    start = summary.index("## The step scheduler under load")
    assert summary[start + 2] == "wuerstchen-v2 (random weights, seed 0) on torch-fast, cuda, fp16."
    assert summary[start + 4:start + 9] == expected
    block = results.readme_block(tmp_path).splitlines()
    start = block.index("The step scheduler under load (`load`: wuerstchen-v2 (random weights, seed 0) on torch-fast, "
                        "cuda, fp16):")
    assert block[start + 2:start + 7] == expected


def test_without_diffusers_compile_the_target_is_the_h200_figure():
    run = {"steps": [{"name": "e2e", "status": "passed", "results": {"records": RECORDS}}]}
    row = results.performance_table(run)[5]
    assert row.endswith("| 1.250 | 0.420 | 1.300 | – | yes: 1.32× the H200 figure |")


def test_the_readmes_table_is_the_generated_one():
    """Once the README has its markers, its table is never typed by hand."""
    if results.BEGIN not in (REPOSITORY / "README.md").read_text(encoding="utf-8"):
        pytest.skip("README.md has no GPU results block yet")
    assert results.main(["--check"]) == 0


# 6. The dry run, end to end


def test_the_dry_run_installs_runs_every_step_and_writes_outside_the_repository(tmp_path, capsys, monkeypatch):
    # As on a CPU outside the tests: int8 runs its PyTorch reference, not the kernel in Triton's interpreter.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = sorted(path.name for path in results.RESULTS.iterdir())
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert sorted(path.name for path in results.RESULTS.iterdir()) == before
    assert "the plan on an H100/H200 (budget 480 s): 10 steps, 480 s planned" in output
    assert "  e2e-compile   ≥240 s if left  python -m engine.cli bench --preset wuerstchen-v2 --device cuda" in output
    [path] = tmp_path.glob("*-dry-run.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".md").name,
                                                                 "gpu-suite.log"])
    run = json.loads(path.read_text())
    assert run["dry_run"] is True and run["finished"] and run["provenance"]["device"].startswith("CPU")
    assert [(s["name"], s["status"]) for s in run["steps"]] == [(name, "passed") for name in gpu_suite.STEPS]
    steps = {s["name"]: s for s in run["steps"]}
    versions = steps["install"]["results"]["versions"]
    assert set(versions) == {"wuerstchen_probe", "wuerstchen-engine"} and versions["wuerstchen_probe"] == "0.0.0"
    assert Path(steps["install"]["results"]["console_script"]).name == "wuerstchen"
    assert steps["tests"]["results"]["tests"] == 0  # collected, not run
    records = steps["e2e"]["results"]["records"]
    assert [(r["workload"]["target"], r["workload"]["batch"]) for r in records] == [("torch", 1), ("diffusers", 1)]
    assert all(r["results"]["latency_s"]["median"] > 0 for r in records)
    quantized = steps["quant-e2e"]["results"]["records"]
    assert [(r["workload"]["target"], r["workload"]["quantization"] is None) for r in quantized] == [
        ("torch", True), ("torch int8", False)]
    load = steps["load"]["results"]["measurements"]
    assert [row["measurement"] for row in load][:3] == ["sequential", "concurrency 1", "concurrency 2"]
    summary = path.with_suffix(".md").read_text()
    assert "**Dry run on a CPU: the commands ran in their cheap forms; no figure here is a GPU measurement.**" \
        in summary
    assert results.newest(tmp_path) is None  # a dry run never stands for a GPU run
