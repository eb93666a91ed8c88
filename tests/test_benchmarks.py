"""The benchmark scripts run end to end on the tiny preset (their numbers only mean something on a GPU)."""

from __future__ import annotations

import json

from benchmarks.pipeline_vs_diffusers import main


def test_pipeline_vs_diffusers_reports_both_and_agrees(tmp_path, capsys):
    report = main(["--preset", "tiny", "--device", "cpu", "--size", "128", "--runs", "1",
                   "--json", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["workload"]["dtype"] == "fp32" and report["workload"]["height"] == 128
    assert report["engine"]["median_s"] > 0 and report["diffusers"]["median_s"] > 0
    assert report["max_image_difference"] < 1e-4
    out = capsys.readouterr().out
    assert "engine" in out and "diffusers" in out and "speedup" in out
