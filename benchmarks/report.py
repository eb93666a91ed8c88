"""The bench's outputs: a table on stdout, JSON records, CSV rows to append to, and a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

STAGE_COLUMNS = ("prior_step", "decoder_step", "vqgan_decode", "prior_text", "decoder_text")


def _stage_ms(record: dict, stage: str) -> float | None:
    stage_ms = record["results"]["stages_ms"].get(stage)
    return stage_ms["median"] if stage_ms else None


def table(records: list[dict]) -> str:
    """A readable table: one line per (size, batch, target), with the provenance and workload on top."""
    first = records[0]
    origin, workload = first["provenance"], first["workload"]
    recipe = workload["recipe"]
    lines = [
        f"{origin['device']} · torch {origin['versions']['torch']} · {workload['dtype']} · {origin['date']}"
        f" · commit {(origin['git_commit'] or 'unknown')[:10]}",
        f"prior {recipe['prior_evaluations']} evaluations (guidance {recipe['prior_guidance']:g}), decoder "
        f"{recipe['decoder_steps']} steps (guidance {recipe['decoder_guidance']:g}) · median of {workload['runs']} "
        f"after {workload['warmup']} warm-up · matmul peak {first['matmul_peak_tflops']:.3g} TFLOP/s",
        "",
        f"{'size':<11}{'batch':>5}  {'target':<18}{'latency s':>10}{'p90':>8}{'img/s':>8}{'prior ms':>10}"
        f"{'decoder ms':>11}{'vqgan ms':>10}{'text ms':>9}{'TFLOP/s':>9}{'% peak':>8}{'peak GB':>9}{'cold s':>8}"
        f"  speedup",
    ]

    def number(value, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    for record in records:
        w, r = record["workload"], record["results"]
        text = sum(filter(None, (_stage_ms(record, s) for s in ("prior_text", "decoder_text")))) or None
        speedups = ", ".join(f"{v:.2f}× vs {k}" for k, v in r.get("speedup_vs", {}).items())
        lines.append(
            f"{w['height']}×{w['width']:<6}{w['batch']:>5}  {w['target']:<18}{r['latency_s']['median']:>10.3f}"
            f"{r['latency_s']['p90']:>8.3f}{r['images_per_s']:>8.2f}{number(_stage_ms(record, 'prior_step'), 2):>10}"
            f"{number(_stage_ms(record, 'decoder_step'), 2):>11}{number(_stage_ms(record, 'vqgan_decode'), 2):>10}"
            f"{number(text, 2):>9}{r['tflops']:>9.2f}{100 * r['fraction_of_matmul_peak']:>8.1f}"
            f"{number(r['peak_memory_gb'], 2):>9}{number(r.get('cold_start_s'), 1):>8}  {speedups}"
        )
    return "\n".join(lines)


def write_json(records: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"records": records}, indent=1) + "\n")


def csv_row(record: dict) -> dict:
    origin, w, r = record["provenance"], record["workload"], record["results"]
    row = {
        "date": origin["date"], "device": origin["device"], "driver": origin["driver"],
        "torch": origin["versions"]["torch"], "git_commit": origin["git_commit"], "target": w["target"],
        "source": w["source"], "backend": w["backend"], "dtype": w["dtype"], "height": w["height"],
        "width": w["width"], "batch": w["batch"], "prior_evaluations": w["recipe"]["prior_evaluations"],
        "decoder_steps": w["recipe"]["decoder_steps"], "runs": w["runs"],
        **{f"latency_{k}_s": v for k, v in r["latency_s"].items()},
        "images_per_s": r["images_per_s"],
        **{f"{stage}_ms": _stage_ms(record, stage) for stage in STAGE_COLUMNS},
        "tflops": r["tflops"], "fraction_of_matmul_peak": r["fraction_of_matmul_peak"],
        "peak_memory_gb": r["peak_memory_gb"], "cold_start_s": r.get("cold_start_s"),
    }
    return row


def append_csv(records: list[dict], path: str | Path) -> None:
    """Append one row per record; a new file gets the header first."""
    path = Path(path)
    rows = [csv_row(record) for record in records]
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plot(records: list[dict], path: str | Path) -> None:
    """Per-stage latency of every target (at the first size and batch) and throughput against batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (stages_axis, throughput_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    first = records[0]["workload"]
    at_first = [r for r in records if (r["workload"]["height"], r["workload"]["width"], r["workload"]["batch"])
                == (first["height"], first["width"], first["batch"])]
    width = 0.8 / len(at_first)
    for i, record in enumerate(at_first):
        values = [_stage_ms(record, stage) or 0.0 for stage in STAGE_COLUMNS]
        stages_axis.bar([x + i * width for x in range(len(STAGE_COLUMNS))], values, width,
                        label=record["workload"]["target"])
    stages_axis.set_xticks([x + width * (len(at_first) - 1) / 2 for x in range(len(STAGE_COLUMNS))],
                           [s.replace("_", " ") for s in STAGE_COLUMNS])
    stages_axis.set_ylabel("ms per call (median)")
    stages_axis.set_title(f"stages at {first['height']}×{first['width']}, batch {first['batch']}")
    stages_axis.legend()

    series: dict[tuple, list[tuple[int, float]]] = {}
    for record in records:
        w = record["workload"]
        series.setdefault((w["target"], w["height"], w["width"]), []).append(
            (w["batch"], record["results"]["images_per_s"]))
    for (target, height, width_px), points in series.items():
        points.sort()
        throughput_axis.plot([b for b, _ in points], [v for _, v in points], marker="o",
                             label=f"{target} {height}×{width_px}")
    throughput_axis.set_xlabel("batch (images per call)")
    throughput_axis.set_ylabel("images / s")
    throughput_axis.set_title("throughput")
    throughput_axis.legend()
    origin = records[0]["provenance"]
    figure.suptitle(f"{origin['device']} · {first['dtype']} · {origin['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
