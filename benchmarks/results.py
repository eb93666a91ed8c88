"""The GPU suite's results files (`benchmarks/results/<date>-<gpu>.json`) as markdown: each run's summary, and
the README's performance table, generated from the newest results file and never typed by hand.

    python -m benchmarks.results --readme [README.md]     # rewrite the table between the README's markers
    python -m benchmarks.results --check [README.md]      # exit 1 if the README's table is not the generated one
    python -m benchmarks.results --print                  # the generated block on stdout
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from engine.errors import WuerstchenError
from engine.files import write_atomically

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
FORMAT = "wuerstchen-gpu-suite"
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"

# The targets that earlier work set, per call of each stage at 1024², fp16 (ms).
STAGE_TARGETS_MS = {"prior_step": 8.0, "decoder_step": 10.0, "vqgan_decode": 8.0}
STAGE_NAMES = {"prior_step": "prior step (guidance batch 2)", "decoder_step": "decoder step",
               "vqgan_decode": "VQGAN decode"}
# The scheduler's targets on an H200 at 1024², fp16, the published recipe: images/s at saturation, saturation
# against one request at a time, and p99 latency at 80 % of saturation against the solo latency.
LOAD_TARGETS = {"images_per_s": 5.0, "versus_sequential": 1.5, "p99_versus_solo": 2.0}
# Quantization's targets on an H100/H200: end to end against the unquantized model, and its weights' share.
QUANT_TARGETS = {"speedup": 1.25, "weights": 0.55}
# diffusers 0.42.1 measured on one H200 (driver 580.159.04, torch 2.11.0+cu130) on 2026-11-26, fp16, 1024², the
# published recipe, random full-size weights: the figures to beat until a run measures diffusers beside us.
DIFFUSERS_H200 = {"eager_s": 1.326, "compiled_s": (0.556, 0.602), "eager_batch4_s": 2.379}
PREPARE = ("on a networked machine, `python -m benchmarks.wheels download` saves diffusers 0.42.1 and "
           "importlib_metadata as CPython 3.12 manylinux wheels into `.whl/`; carry `.whl/` with the working tree "
           "to the GPU machine and run `python -m benchmarks.gpu_suite` there (about 8 minutes; `--budget SECONDS`, "
           "`--only STEP`; `--commit SHA` where the copy of the working tree has no .git). Copy the results "
           "file and its summary into `benchmarks/results/`, then run `python -m benchmarks.results --readme`")


def results_files(folder: Path = RESULTS) -> list[Path]:
    """The suite's results files in `folder` (dry runs left out), oldest first by the date each run began."""
    found = []
    for path in folder.glob("*.json"):
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise WuerstchenError(f"{path}: not a readable results file ({error})") from None
        if isinstance(run, dict) and run.get("format") == FORMAT and not run.get("dry_run"):
            found.append((run.get("started") or "", path.name, path))
    return [path for *_, path in sorted(found)]


def newest(folder: Path = RESULTS) -> Path | None:
    files = results_files(folder)
    return files[-1] if files else None


def step(run: dict, name: str) -> dict | None:
    return next((s for s in run["steps"] if s["name"] == name), None)


def step_results(run: dict, name: str) -> dict:
    found = step(run, name)
    return (found or {}).get("results") or {}


def bench_record(records: list[dict], target: str, batch: int) -> dict | None:
    """The record of `target` at `batch` and the first size measured."""
    if not records:
        return None
    first = records[0]["workload"]
    return next((r for r in records if r["workload"]["target"] == target and r["workload"]["batch"] == batch
                 and (r["workload"]["height"], r["workload"]["width"]) == (first["height"], first["width"])), None)


def _stage_ms(record: dict | None, stage: str) -> float | None:
    found = (record or {}).get("results", {}).get("stages_ms", {}).get(stage)
    return found["median"] if found else None


def _latency_s(record: dict | None) -> float | None:
    return record["results"]["latency_s"]["median"] if record else None


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _versus(fast: float | None, bar: float | None, against: str) -> str:
    if fast is None or bar is None:
        return "–"
    return f"{'yes' if fast < bar else 'no'}: {bar / fast:.2f}× {against}"


def records_of(run: dict) -> list[dict]:
    """The end-to-end records of a run: the eager comparison, and diffusers + torch.compile where it ran."""
    return [*step_results(run, "e2e").get("records", []), *step_results(run, "e2e-compile").get("records", [])]


def performance_table(run: dict) -> list[str]:
    """Per-stage milliseconds and end-to-end seconds of torch, torch-fast and diffusers against the targets."""
    records = records_of(run)
    b1 = {t: bench_record(records, t, 1) for t in ("torch", "torch-fast", "diffusers", "diffusers-compile")}
    b4 = {t: bench_record(records, t, 4) for t in ("torch", "torch-fast", "diffusers")}
    first = records[0]["workload"] if records else {"height": 1024, "width": 1024, "dtype": "fp16"}
    lines = [f"| {first['height']}×{first['width']}, {first['dtype']} | target | torch | torch-fast | diffusers "
             "| diffusers + compile | torch-fast meets it |", "|---|---|---|---|---|---|---|"]
    for stage, target in STAGE_TARGETS_MS.items():
        fast = _stage_ms(b1["torch-fast"], stage)
        lines.append(f"| {STAGE_NAMES[stage]}, ms | ≤ {target:g} | {_number(_stage_ms(b1['torch'], stage), 1)} "
                     f"| {_number(fast, 1)} | {_number(_stage_ms(b1['diffusers'], stage), 1)} | – "
                     f"| {'–' if fast is None else 'yes' if fast <= target else 'no'} |")
    low, high = DIFFUSERS_H200["compiled_s"]
    compiled = _latency_s(b1["diffusers-compile"])
    bar, against = (compiled, "diffusers + compile, this run") if compiled else (low, "the H200 figure")
    lines.append(f"| end to end, batch 1, s | below diffusers + compile ({low}–{high} on an H200) "
                 f"| {_number(_latency_s(b1['torch']), 3)} | {_number(_latency_s(b1['torch-fast']), 3)} "
                 f"| {_number(_latency_s(b1['diffusers']), 3)} | {_number(compiled, 3)} "
                 f"| {_versus(_latency_s(b1['torch-fast']), bar, against)} |")
    eager = _latency_s(b4["diffusers"])
    bar, against = (eager, "diffusers, this run") if eager else (DIFFUSERS_H200["eager_batch4_s"], "the H200 figure")
    lines.append(f"| end to end, batch 4, s | below diffusers eager ({DIFFUSERS_H200['eager_batch4_s']} on an H200) "
                 f"| {_number(_latency_s(b4['torch']), 3)} | {_number(_latency_s(b4['torch-fast']), 3)} "
                 f"| {_number(eager, 3)} | – | {_versus(_latency_s(b4['torch-fast']), bar, against)} |")
    return lines


def quantized_table(records: list[dict]) -> list[str]:
    """Each record, and for a quantized target its ratios to the unquantized one of its backend at the same
    workload, measured in the same run, against `QUANT_TARGETS`."""
    def workload(record: dict) -> tuple:
        w = record["workload"]
        return w["height"], w["width"], w["batch"]

    by_key = {(record["workload"]["target"], workload(record)): record for record in records}
    rows = []
    for record in records:
        w, found = record["workload"], record["results"]
        plain = by_key.get((w["backend"], workload(record))) if w.get("quantization") else None
        speedup = weights = "–"
        if plain is not None:
            speedup = f"{_latency_s(plain) / _latency_s(record):.2f}× (≥ {QUANT_TARGETS['speedup']:g})"
            if found.get("weights_gb") and plain["results"].get("weights_gb"):
                weights = (f"{100 * found['weights_gb'] / plain['results']['weights_gb']:.0f} % "
                           f"(≤ {100 * QUANT_TARGETS['weights']:.0f} %)")
        rows.append([w["target"], w["quantization"] or "none", f"{w['height']}×{w['width']}, {w['dtype']}, batch "
                     f"{w['batch']}", _number(_latency_s(record), 3), _number(_stage_ms(record, "prior_step"), 2),
                     _number(_stage_ms(record, "decoder_step"), 2), _number(found.get("weights_gb"), 2), speedup,
                     weights])
    return _table(["target", "quantization", "workload", "end to end s", "prior step ms", "decoder step ms",
                   "prior + decoder weights GB", "speedup vs unquantized", "weights vs unquantized"], rows)


def load_table(measurements: list[dict]) -> list[str]:
    """The scheduler under load against its targets: saturation (the most images/s of any measurement before the
    Poisson arrivals, as `benchmarks.load` finds it) and its ratio to the sequential run's, and the p99 latency
    of Poisson arrivals at 80 % of saturation against the solo latency (the sequential run's median)."""
    def ratio(a: float, b: float) -> float:  # nan where a measurement served nothing
        return a / b if b and math.isfinite(b) else math.nan

    sequential, poisson = measurements[0], measurements[-1]
    saturation = max(row["images_per_s"] for row in measurements[:-1])
    solo_s, p99_s = sequential["latency_s"]["p50"], poisson["latency_s"]["p99"]
    speedup, slowdown = ratio(saturation, sequential["images_per_s"]), ratio(p99_s, solo_s)
    figures = [
        ("images/s at saturation", f"{saturation:.2f}", f"≥ {LOAD_TARGETS['images_per_s']:g} on an H200",
         saturation >= LOAD_TARGETS["images_per_s"]),
        ("saturation against one request at a time", f"{speedup:.2f}× ({sequential['images_per_s']:.2f} images/s)",
         f"≥ {LOAD_TARGETS['versus_sequential']:g}×", speedup >= LOAD_TARGETS["versus_sequential"]),
        (f"p99 latency at 80 % of saturation ({poisson['measurement']})",
         f"{p99_s:.3f} s = {slowdown:.2f}× solo ({solo_s:.3f} s)", f"≤ {LOAD_TARGETS['p99_versus_solo']:g}× solo",
         slowdown <= LOAD_TARGETS["p99_versus_solo"]),
    ]
    return _table(["scheduler under load", "measured", "target", "meets it"],
                  [[name, value, target, "yes" if met else "no"] for name, value, target, met in figures])


def measured_beyond_the_table(run: dict) -> list[tuple[str, str, str | None, list[str]]]:
    """The quantized comparison and the scheduler under load, where the run measured them: (step, title, what
    ran where the step says, table) each."""
    sections = []
    quantized = step_results(run, "quant-e2e").get("records")
    if quantized:
        sections.append(("quant-e2e", "Quantized end to end", None, quantized_table(quantized)))
    load = step_results(run, "load")
    if load.get("measurements"):
        sections.append(("load", "The step scheduler under load", load["workload"]["runtime"],
                         load_table(load["measurements"])))
    return sections


def provenance_line(run: dict) -> str:
    origin = run["provenance"]
    versions = origin.get("versions") or {}
    details = ", ".join(f"{name} {versions[name]}" for name in ("torch", "triton", "diffusers") if versions.get(name))
    return (f"{origin.get('device', 'unknown device')} on {run['started'][:10]} (driver {origin.get('driver') or '–'}, "
            f"CUDA {origin.get('cuda') or '–'}, {details}), commit `{(origin.get('git_commit') or 'unknown')[:10]}`")


def step_line(found: dict) -> str:
    """'tests failed, 101 s (3 of 212 failed)': one step's status as a phrase."""
    text = f"{found['name']} {found['status']}"
    if found.get("seconds") is not None:
        text += f", {found['seconds']:.0f} s"
    tests = found.get("results") or {}
    if found["name"] == "tests" and tests.get("tests"):
        text += f" ({tests['passed']} passed, {tests['failed'] + tests['errors']} failed of {tests['tests']})"
    elif found["name"] == "tests" and "tests" in tests:
        text += " (no test ran)"
    elif found.get("note"):
        text += f" ({found['note']})"
    return text


def fusion_decision(run: dict) -> str | None:
    """Which fusion switches the run says to ship, turn on or turn off."""
    switches = step_results(run, "fusions").get("switches")
    if not switches:
        return None
    parts = []
    for name, switch in switches.items():
        change = switch["change"] or f"keep {'on' if switch['default'] else 'off'}"
        parts.append(f"`{name}` {switch['verdict']} ({change})")
    return "; ".join(parts)


def performance_block(run: dict | None, source: str | None = None) -> str:
    """The README's block, markers included: the newest run's table, or how to make the first run."""
    low, high = DIFFUSERS_H200["compiled_s"]
    if run is None:
        body = [
            f"No GPU run yet: run `python -m benchmarks.gpu_suite` on an H100/H200. The machine needs no network: "
            f"{PREPARE}.",
            "",
            f"Targets at 1024², fp16: prior step ≤ {STAGE_TARGETS_MS['prior_step']:g} ms, decoder step ≤ "
            f"{STAGE_TARGETS_MS['decoder_step']:g} ms, VQGAN decode ≤ {STAGE_TARGETS_MS['vqgan_decode']:g} ms; end "
            f"to end, diffusers 0.42.1 measured on an H200 on 2026-11-26: {DIFFUSERS_H200['eager_s']} s eager, "
            f"{low}–{high} s with torch.compile (batch 1).",
        ]
    else:
        body = [f"Measured on {provenance_line(run)}: the published recipe (29 prior evaluations, 12 decoder "
                "steps), random full-size weights, median of timed runs after warm-up.", "", *performance_table(run),
                "", f"diffusers 0.42.1 on an H200 (2026-11-26, same recipe): {DIFFUSERS_H200['eager_s']} s eager, "
                f"{low}–{high} s with torch.compile, {DIFFUSERS_H200['eager_batch4_s']} s at batch 4."]
        for step, title, ran, table in measured_beyond_the_table(run):
            body += ["", f"{title} (`{step}`{': ' + ran if ran else ''}):", "", *table]
        decision = fusion_decision(run)
        if decision:
            body.append(f"Fusions: {decision}.")
        body.append("Steps: " + " · ".join(step_line(s) for s in run["steps"]) + ".")
    origin = f"from `{source}`" if source else "from the newest file in `benchmarks/results/`"
    note = f"<!-- generated by `python -m benchmarks.results --readme` {origin}; do not edit by hand -->"
    return "\n".join([BEGIN, note, *body, END])


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the markers (the markers included) replaced by `block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise WuerstchenError(f"README: no {BEGIN} … {END} block; expected the two markers, in that order")
    return text[:start] + block + text[end + len(END):]


def readme_block(folder: Path = RESULTS) -> str:
    path = newest(folder)
    if path is None:
        return performance_block(None)
    source = path.relative_to(REPOSITORY) if path.is_relative_to(REPOSITORY) else path
    return performance_block(json.loads(path.read_text()), str(source))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def summary_markdown(run: dict) -> str:
    """A run's summary: provenance, every step's status, the performance table, the fusion verdicts, the
    tests that failed, the attention kernel against SDPA, the kernel-time split, and the output of each step
    that failed."""
    lines = [f"# GPU suite: {run['provenance'].get('device', 'unknown device')}, {run['started'][:10]}", ""]
    if run.get("dry_run"):
        lines += ["**Dry run on a CPU: the commands ran in their cheap forms; no figure here is a GPU "
                  "measurement.**", ""]
    lines += [f"Measured on {provenance_line(run)}; budget {run['budget_s']:.0f} s, "
              f"{'finished' if run.get('finished') else 'still running'} after {run.get('seconds') or 0:.0f} s.", ""]
    lines += ["## Steps", ""] + _table(["step", "status", "seconds", "limit s", "command"], [
        [s["name"] + (" (earlier run)" if s.get("carried_over") else ""),
         s["status"] + (f": {s['note']}" if s.get("note") else ""), _number(s.get("seconds"), 0),
         _number(s.get("limit_s"), 0), f"`{s.get('command', '')}`"] for s in run["steps"]])
    lines += ["", "## Performance", "", *performance_table(run)]

    fusions = step_results(run, "fusions")
    if fusions.get("switches"):
        lines += ["", "## Fusions", "", f"Decision: {fusion_decision(run)}.", ""]
        lines += _table(["switch", "verdict", "default now", "change", "evidence"], [
            [f"`{name}`", s["verdict"], "on" if s["default"] else "off", s["change"] or "none", s["evidence"]]
            for name, s in fusions["switches"].items()])
        lines += [""] + _table(["kernel", "unfused µs", "fused µs", "speedup", "verdict"], [
            [row["kernel"], f"{row['unfused_ms'] * 1e3:.1f}", f"{row['fused_ms'] * 1e3:.1f}",
             f"{row['speedup']:.2f}×", row["verdict"]] for row in fusions.get("kernels", [])])
        lines += [""] + _table(["stage", "variant", "wall ms", "kernel ms", "kernels", "difference vs torch"], [
            [row["stage"], row["variant"], f"{row['wall_ms']:.2f}", f"{row['kernel_ms']:.2f}", str(row["kernels"]),
             f"{row['relative_difference']:.1e}"] for row in fusions.get("stages", [])])

    tests = step_results(run, "tests")
    if tests.get("tests") == 0:
        lines += ["", "## Tests", "", "No test ran (a dry run only collects them)."]
    elif "tests" in tests:
        lines += ["", "## Tests", "", f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
                  f"errors, {tests['skipped']} skipped of {tests['tests']}."]
        for failure in tests["failures"]:
            lines += ["", f"- `{failure['test']}` ({failure['kind']}): {failure['message']}", "", "```",
                      failure["output"].rstrip(), "```"]

    attention = step_results(run, "attention").get("rows")
    if attention:
        lines += ["", "## Attention kernel against SDPA", ""] + _table(
            ["shape", "(B, heads, Nq, Nk)", "SDPA µs", "Triton µs", "speedup", "verdict", "max diff"], [
                [row["shape"], f"({row['batch']}, {row['heads']}, {row['queries']}, {row['keys']})",
                 f"{row['sdpa_us']:.1f}", f"{row['triton_us']:.1f}", f"{row['speedup']:.2f}×", row["verdict"],
                 f"{row['max_difference']:.1e}"] for row in attention])

    kernels = step_results(run, "kernels").get("rows")
    if kernels:
        kinds = sorted({kind for stages in kernels.values() for row in stages.values() for kind in row["by_kind_ms"]})
        lines += ["", "## Kernel time by kind (ms)", ""] + _table(
            ["target", "stage", "wall", "kernels", "count", *kinds], [
                [target, stage, f"{row['wall_ms']:.2f}", f"{row['kernel_ms']:.2f}", str(row["kernels"]),
                 *(f"{row['by_kind_ms'].get(kind, 0.0):.2f}" for kind in kinds)]
                for target, stages in kernels.items() for stage, row in stages.items()])

    quant = step_results(run, "quant").get("rows")
    if quant:
        lines += ["", "## Quantized GEMMs against cuBLAS bf16 (µs, speedup)", ""] + _table(
            ["stage", "layers", "(M, N, K)", "bf16", "cuBLAS fp8", "Triton fp8", "int8 weight-only", "quantize"], [
                [row["stage"], str(row["layers"]), f"({row['m']}, {row['n']}, {row['k']})",
                 f"{row['ms']['bf16'] * 1e3:.1f}",
                 *(f"{row['ms'][key] * 1e3:.1f} ({row['ms']['bf16'] / row['ms'][key]:.2f}×)" if key in row["ms"]
                   else "–" for key in ("cublas_fp8", "triton_fp8", "int8")),
                 f"{row['ms']['quantize'] * 1e3:.1f}" if "quantize" in row["ms"] else "–"] for row in quant])

    for _, title, ran, table in measured_beyond_the_table(run):
        lines += ["", f"## {title}", "", *([f"{ran}.", ""] if ran else []), *table]

    for found in run["steps"]:
        if found["status"] in ("failed", "timed out") and found.get("tail"):
            lines += ["", f"## {found['name']}: {found['status']}, the end of its output", "", "```",
                      found["tail"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--readme", nargs="?", const=REPOSITORY / "README.md", type=Path, metavar="FILE",
                        help="rewrite the block between the markers of FILE (default README.md)")
    action.add_argument("--check", nargs="?", const=REPOSITORY / "README.md", type=Path, metavar="FILE",
                        help="exit 1 if FILE's block is not what --readme would write")
    action.add_argument("--print", action="store_true", help="print the generated block")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    try:
        block = readme_block(args.results)
        if args.print:
            print(block)
            return 0
        path = args.readme or args.check
        text = path.read_text(encoding="utf-8")
        updated = replace_block(text, block)
        if args.check:
            if updated != text:
                print(f"{path}: the GPU results table is not the generated one; run python -m benchmarks.results "
                      "--readme", file=sys.stderr)
                return 1
            return 0
        write_atomically(path, updated.encode("utf-8"))
        print(f"{path}: GPU results table {'rewritten' if updated != text else 'already current'}")
        return 0
    except WuerstchenError as error:
        print(f"benchmarks.results: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
