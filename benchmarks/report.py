"""The bench's outputs: a table on stdout, JSON records, CSV rows to append to, and a plot of where the time
of one image goes. Every output file is checked before anything is measured (`check_output`), so that a
long run never ends in a traceback that loses its results, and written whole or not at all
(`engine.files`)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import WuerstchenError
from engine.files import atomic_writer, write_atomically

BASELINES = ("diffusers", "diffusers-compile")  # the targets that are diffusers: every other is compared with them
STAGE_COLUMNS = ("prior_step", "decoder_step", "vqgan_decode", "prior_text", "decoder_text")
CSV_COLUMNS = (
    "date", "device", "driver", "torch", "git_commit", "target", "source", "backend", "dtype", "height", "width",
    "batch", "prior_evaluations", "decoder_steps", "runs", "latency_median_s", "latency_p90_s", "latency_min_s",
    "latency_max_s", "images_per_s", *(f"{stage}_ms" for stage in STAGE_COLUMNS), "tflops",
    "fraction_of_matmul_peak", "peak_memory_gb", "cold_start_s",
)
PLOT_FORMATS = ("png", "svg", "pdf")  # what `--plot` may end in: matplotlib writes each without extra packages


# --- checking output paths, before any work ---------------------------------------------------------------

def output_problem(value: str, formats: tuple[str, ...] = ()) -> str | None:
    """What stops a file from being written at `value` (a folder that is missing or not writable, a folder in
    its place, a suffix outside `formats`), or None."""
    path = Path(value)
    if formats and path.suffix.lower().lstrip(".") not in formats:
        *others, last = [f".{suffix}" for suffix in formats]
        return f"expected a file name ending in {', '.join(others) + ' or ' if others else ''}{last}"
    if path.is_dir():
        return "is a folder: expected a file name"
    folder = path.parent
    if not folder.is_dir():
        return f"folder {str(folder)!r} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {str(folder)!r} is not writable"
    return None


def check_output(flag: str, value: str, formats: tuple[str, ...] = ()) -> None:
    """A one-line error naming `flag`, `value` and what was expected, if no file can be written there."""
    problem = output_problem(value, formats)
    if problem:
        raise WuerstchenError(f"{flag} {value!r}: {problem}")


def check_csv(value: str) -> None:
    """`--csv`: a file that can be written and, if it already holds rows, holds this bench's columns."""
    check_output("--csv", value)
    path = Path(value)
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with open(path, newline="", encoding="utf-8") as file:
            header = next(csv.reader(file), [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise WuerstchenError(f"--csv {value!r}: cannot read it to append to: {error}") from None
    if header != list(CSV_COLUMNS):
        raise WuerstchenError(f"--csv {value!r}: its header is not this bench's columns: expected a new file or one "
                              "that `wuerstchen bench --csv` wrote")


def check_plot(value: str) -> None:
    """`--plot`: a file of a format in `PLOT_FORMATS`, with matplotlib there to draw it."""
    check_output("--plot", value, PLOT_FORMATS)
    if importlib.util.find_spec("matplotlib") is None:
        raise WuerstchenError(f"--plot {value!r}: needs matplotlib: pip install 'wuerstchen-engine[bench]'")


def json_file(value: str) -> str:
    """An argparse `type` for the `--json FILE` of the kernel benchmarks: the path checked as the command line
    is read, before any GPU work."""
    import argparse

    problem = output_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{value!r}: {problem}")
    return value


# --- the table ----------------------------------------------------------------------------------------------

def significant(value: float | None, digits: int = 3) -> str:
    """`value` to `digits` significant digits: plain from 0.001 up to a million, in scientific notation
    beyond (0.0014 → 0.00140, 34.70 → 34.7, 0.00001234 → 1.23e-05); "–" for None."""
    if value is None:
        return "–"
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    rounded = float(f"{value:.{digits - 1}e}")  # first, so that 9.996 counts as 10.0
    exponent = math.floor(math.log10(abs(rounded)))
    if -3 <= exponent < 6:
        return f"{rounded:.{max(0, digits - 1 - exponent)}f}"
    return f"{rounded:.{digits - 1}e}"


def _stage_ms(record: dict, stage: str) -> float | None:
    stage_ms = record["results"]["stages_ms"].get(stage)
    return stage_ms["median"] if stage_ms else None


def _text_ms(record: dict) -> float | None:
    return sum(filter(None, (_stage_ms(record, s) for s in ("prior_text", "decoder_text")))) or None


# The table's measured columns: header, and the figure of a record (None where it was not measured). Stage
# columns are the median milliseconds of one call.
TABLE_COLUMNS: tuple[tuple[str, Callable[[dict], float | None]], ...] = (
    ("latency s", lambda record: record["results"]["latency_s"]["median"]),
    ("p90 s", lambda record: record["results"]["latency_s"]["p90"]),
    ("img/s", lambda record: record["results"]["images_per_s"]),
    ("prior ms", lambda record: _stage_ms(record, "prior_step")),
    ("decoder ms", lambda record: _stage_ms(record, "decoder_step")),
    ("vqgan ms", lambda record: _stage_ms(record, "vqgan_decode")),
    ("text ms", _text_ms),
    ("TFLOP/s", lambda record: record["results"]["tflops"]),
    ("% peak", lambda record: 100 * record["results"]["fraction_of_matmul_peak"]),
    ("peak GB", lambda record: record["results"]["peak_memory_gb"]),
    ("weights GB", lambda record: record["results"].get("weights_gb")),  # the prior's and decoder's
    ("cold s", lambda record: record["results"].get("cold_start_s")),
)
NUMBER_WIDTH = 11  # "decoder ms" and "-1.23e-05" with room on their left


def table(records: list[dict]) -> str:
    """A readable table: one line per (size, batch, target), with the provenance and workload on top. Every
    measured number has three significant digits."""
    first = records[0]
    origin, workload = first["provenance"], first["workload"]
    recipe = workload["recipe"]
    lines = [
        f"{origin['device']} · torch {origin['versions']['torch']} · {workload['dtype']} · {origin['date']}"
        f" · commit {(origin['git_commit'] or 'unknown')[:10]}",
        f"prior {recipe['prior_evaluations']} evaluations (guidance {recipe['prior_guidance']:g}), decoder "
        f"{recipe['decoder_steps']} steps (guidance {recipe['decoder_guidance']:g}) · median of {workload['runs']} "
        f"after {workload['warmup']} warm-up · stage columns: ms per call · matmul peak "
        f"{significant(first['matmul_peak_tflops'])} TFLOP/s",
        "",
        f"{'size':<11}{'batch':>5}  {'target':<18}"
        + "".join(f"{header:>{NUMBER_WIDTH}}" for header, _ in TABLE_COLUMNS) + "  speedup",
    ]
    for record in records:
        w = record["workload"]
        speedups = ", ".join(f"{significant(v)}× vs {k}" for k, v in record["results"].get("speedup_vs", {}).items())
        lines.append(f"{w['height']}×{w['width']:<6}{w['batch']:>5}  {w['target']:<18}"
                     + "".join(f"{significant(figure(record)):>{NUMBER_WIDTH}}" for _, figure in TABLE_COLUMNS)
                     + f"  {speedups}")
    return "\n".join(lines)


# --- JSON and CSV ---------------------------------------------------------------------------------------------

def write_json(records: list[dict], path: str | Path) -> None:
    write_atomically(path, (json.dumps({"records": records}, indent=1) + "\n").encode())


def csv_row(record: dict) -> dict:
    origin, w, r = record["provenance"], record["workload"], record["results"]
    return {
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


def append_csv(records: list[dict], path: str | Path) -> None:
    """Append one row per record; a new (or empty) file gets the header first. The whole file is written anew
    and renamed over the old one, so an interrupted append leaves the old rows, never half a row."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):  # a last row cut short by an older, non-atomic writer: keep ours apart
        old += b"\r\n"
    new = io.StringIO()
    writer = csv.DictWriter(new, fieldnames=CSV_COLUMNS)
    if not old:
        writer.writeheader()
    writer.writerows(csv_row(record) for record in records)
    write_atomically(path, old + new.getvalue().encode())


# --- the plot: where the time of one image goes, per target ---------------------------------------------------

# The stacked parts of a bar, in the pipeline's order, and the timed stages each one sums (median per call ×
# calls per run). OTHER is the rest of the end-to-end time: Python between the stages, the output's
# conversion. A target without stage timers (diffusers-compile) has one part, UNSPLIT.
PLOT_PARTS = {"text": ("prior_text", "decoder_text"), "prior": ("prior_condition", "prior_step"),
              "decoder": ("decoder_condition", "decoder_step"), "vqgan": ("vqgan_decode",)}
OTHER, UNSPLIT = "other", "end to end (no stage timers)"
PART_STYLE = {"text": {"color": "#9467bd"}, "prior": {"color": "#1f77b4"}, "decoder": {"color": "#ff7f0e"},
              "vqgan": {"color": "#2ca02c"}, OTHER: {"color": "#d0d0d0"},
              UNSPLIT: {"color": "#a0a0a0", "hatch": "//"}}


@dataclass(frozen=True)
class Bar:
    """One target's time per image at one workload, split into parts (stacked in this order), in the plot's
    unit; `label` is written at the bar's end."""

    target: str
    parts: dict[str, float]
    total: float
    label: str


@dataclass(frozen=True)
class Panel:
    """Every target at one (size, batch)."""

    height: int
    width: int
    batch: int
    bars: tuple[Bar, ...]

    @property
    def title(self) -> str:
        return f"{self.height}×{self.width}, batch {self.batch}"


@dataclass(frozen=True)
class PlotData:
    """What the plot shows, apart from how matplotlib draws it: a panel per (size, batch), sizes down and
    batches across, with the workload in the title and the method in a note below."""

    title: str
    unit: str  # "ms" or "s", for every number of the figure
    runs: int
    panels: tuple[Panel, ...]
    note: str

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple(dict.fromkeys((panel.height, panel.width) for panel in self.panels))

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(panel.batch for panel in self.panels))

    def axis_label(self, panel: Panel) -> str:
        return f"{self.unit} per image (one call ÷ batch {panel.batch}; median of {self.runs} runs)"


def _parts_ms(record: dict) -> dict[str, float]:
    """Milliseconds per image of each part of the pipeline, and OTHER, the rest of the end-to-end median."""
    results, batch = record["results"], record["workload"]["batch"]
    total = results["latency_s"]["median"] * 1e3 / batch
    stages = results["stages_ms"]
    if not stages:
        return {UNSPLIT: total}
    parts = {part: sum(stages[s]["median"] * stages[s]["calls_per_run"] for s in names if s in stages) / batch
             for part, names in PLOT_PARTS.items()}
    # The medians of the stages need not add up to the median of the whole: OTHER is never below zero.
    return parts | {OTHER: max(0.0, total - sum(parts.values()))}


def _reference(records: list[dict]) -> str:
    """The target every other is compared with: the first baseline, else the first target."""
    targets = list(dict.fromkeys(record["workload"]["target"] for record in records))
    return next((target for target in targets if target in BASELINES), targets[0])


def _plot_title(records: list[dict]) -> str:
    first = records[0]
    origin, workload, recipe = first["provenance"], first["workload"], first["workload"]["recipe"]
    sizes = ", ".join(dict.fromkeys(f"{r['workload']['height']}×{r['workload']['width']}" for r in records))
    batches = ", ".join(dict.fromkeys(str(r["workload"]["batch"]) for r in records))
    return (f"{workload['source']} · {origin['device']} · {workload['dtype']}\n"
            f"{sizes} · batch {batches} · prior {recipe['prior_evaluations']} evaluations, decoder "
            f"{recipe['decoder_steps']} steps · median of {workload['runs']} runs after {workload['warmup']} warm-up")


def plot_data(records: list[dict]) -> PlotData:
    """The bars, labels and titles of `plot`, from the bench's records."""
    parts = [_parts_ms(record) for record in records]
    seconds = max(sum(p.values()) for p in parts) >= 1000
    unit, scale = ("s", 1e-3) if seconds else ("ms", 1.0)
    reference = _reference(records)
    panels: dict[tuple[int, int, int], list[Bar]] = {}
    for record, record_parts in zip(records, parts, strict=True):
        w, results = record["workload"], record["results"]
        total = results["latency_s"]["median"] * 1e3 / w["batch"] * scale
        label = f"{significant(total)} {unit}"
        if reference in results.get("speedup_vs", {}):
            label += f" · {significant(results['speedup_vs'][reference])}× vs {reference}"
        panels.setdefault((w["height"], w["width"], w["batch"]), []).append(
            Bar(w["target"], {part: ms * scale for part, ms in record_parts.items()}, total, label))
    origin = records[0]["provenance"]
    note = (f"parts: median time of one call × calls per run ÷ batch; {OTHER}: the rest of the end-to-end median; "
            f"bar labels: end-to-end median ÷ batch, and its speedup\n{origin['date']} · commit "
            f"{(origin['git_commit'] or 'unknown')[:10]} · torch {origin['versions']['torch']}")
    return PlotData(
        title=_plot_title(records), unit=unit, runs=records[0]["workload"]["runs"],
        panels=tuple(Panel(height, width, batch, tuple(bars)) for (height, width, batch), bars in panels.items()),
        note=note,
    )


def plot(records: list[dict], path: str | Path) -> None:
    """One stacked horizontal bar per target of where one image's time goes (text encoders, prior, decoder,
    VQGAN, the rest), a panel per (size, batch); written as `path`'s suffix says (see `PLOT_FORMATS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plot_data(records)
    rows, columns = len(data.sizes), len(data.batches)
    targets = max(len(panel.bars) for panel in data.panels)
    figure, axes = plt.subplots(rows, columns, squeeze=False, sharex="row",
                                figsize=(max(11.0, 7.0 * columns), (1.3 + 0.5 * targets) * rows + 1.9))
    for axis in axes.flat:  # a (size, batch) that was not run stays blank
        axis.set_visible(False)
    for row, size in enumerate(data.sizes):
        in_row = [panel for panel in data.panels if (panel.height, panel.width) == size]
        # Room on the right of the longest bar for its label.
        limit = 1.5 * max(max(bar.total, sum(bar.parts.values())) for panel in in_row for bar in panel.bars)
        for panel in in_row:
            axis = axes[row, data.batches.index(panel.batch)]
            axis.set_visible(True)
            _draw_panel(axis, panel, limit)
            axis.set_xlabel(data.axis_label(panel))
            axis.set_title(panel.title)
    shown = [part for part in PART_STYLE if any(part in bar.parts for panel in data.panels for bar in panel.bars)]
    figure.legend([plt.Rectangle((0, 0), 1, 1, **PART_STYLE[part]) for part in shown], shown, loc="lower center",
                  ncol=len(shown), frameon=False, bbox_to_anchor=(0.5, 0.05))
    figure.suptitle(data.title)
    figure.text(0.5, 0.01, data.note, ha="center", fontsize=7.5, color="#505050")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    try:
        with atomic_writer(path) as file:
            figure.savefig(file, format=Path(path).suffix.lower().lstrip("."), dpi=110)
    finally:
        plt.close(figure)


def _draw_panel(axis, panel: Panel, limit: float) -> None:
    """The panel's bars on an axis running from 0 to `limit`: each part with its value where it is wide
    enough to hold it, each bar's label at its end."""
    for y, bar in enumerate(panel.bars):
        left = 0.0
        for part, value in bar.parts.items():
            axis.barh(y, value, left=left, height=0.6, edgecolor="white", linewidth=0.5, **PART_STYLE[part])
            if value >= 0.05 * limit and part != UNSPLIT:  # an unsplit bar's value is its label
                axis.text(left + value / 2, y, significant(value), ha="center", va="center", fontsize=8,
                          color="black" if part in (OTHER, UNSPLIT) else "white")
            left += value
        axis.annotate(bar.label, (max(left, bar.total), y), xytext=(5, 0), textcoords="offset points",
                      va="center", fontsize=9, fontweight="bold")
    axis.set_xlim(0, limit)
    axis.set_yticks(range(len(panel.bars)), [bar.target for bar in panel.bars])
    axis.set_ylim(len(panel.bars) - 0.5, -0.5)  # the first target on top
    axis.spines[["top", "right"]].set_visible(False)
