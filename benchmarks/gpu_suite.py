"""One command that turns a short GPU slot into committed, comparable numbers: on a bare H100 or H200 without
network it installs this project and the carried wheels, then runs every check of the fast paths in order,
each step a subprocess under its own time limit, and writes the results after every step.

    python -m benchmarks.gpu_suite [--only STEP[,STEP]] [--budget SECONDS] [--out DIR] [--commit SHA]
    python -m benchmarks.gpu_suite --dry-run       # on a CPU: the plan, the install, the result writing

Steps, in order (`STEPS`): install (`benchmarks.wheels install`: the wheels of `.whl/` and this project into a
folder of their own, offline); tests (tests/test_fast.py and tests/test_fused.py on the GPU: the kernels'
numbers, autotuning, graph capture); fusions (`benchmarks.fusions`: which fusion switches ship); e2e
(`wuerstchen bench`: torch, torch-fast and diffusers eager in one process, 1024², batch 1 and 4, fp16);
attention (`benchmarks.attention`: the Triton kernel against SDPA); kernels (`benchmarks.kernel_profile`:
kernel time by kind); then, only when time is left, quant (`benchmarks.quant_kernels`: the fp8 and int8
GEMMs against cuBLAS bf16), quant-e2e (`wuerstchen bench --quantize none fp8`: torch-fast in bf16 against fp8,
and diffusers, 1024², batch 1), load (`wuerstchen bench --load`: the step scheduler's
images/s at saturation and p99 at 80 % of it, against one request at a time) and e2e-compile (diffusers +
torch.compile).

GPU time comes in short slots (about 15 minutes with the machine's start, 10 at most per command): the
default budget, 480 s, fits 8 minutes on an H100 with the install. Each step's limit is its share of the
budget plus whatever the steps before it left unused. `--only` names steps to rerun (the install runs first
whatever is named); a rerun's results join the same day's file for that GPU. Results: `<date>-<gpu>.json`
and its summary `.md` in benchmarks/results/ and in --out (default $OUT when set: three files, the third
gpu-suite.log, the whole output). Prepare the wheels first on a networked machine:
`python -m benchmarks.wheels download`; pass `--commit SHA` where the working tree's copy has no .git.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from xml.etree import ElementTree

from benchmarks import wheels
from benchmarks.results import FORMAT, RESULTS, performance_table, records_of, step_line, summary_markdown
from engine.errors import WuerstchenError
from engine.files import write_atomically

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
STATUSES = ("passed", "failed", "timed out", "skipped", "pending")
TAIL_LINES = 60  # of a step's output, kept in the results: the end of a failure's traceback
KILL_GRACE_S = 5.0  # between asking a timed-out step to stop and killing it
LOG_NAME = "gpu-suite.log"
E2E = ("--preset", "wuerstchen-v2", "--device", "cuda", "--dtype", "fp16", "--sizes", "1024", "--runs", "5",
       "--warmup", "2", "--no-cold-start")  # cold starts (a fresh process per target) do not fit the slot


@dataclass(frozen=True)
class Step:
    """One command of the suite. `share_s` is its seconds in the default plan, scaled to the budget; for an
    optional step, the least time it must be left to start. `output` is the file the command writes and
    `parse` reads into the step's results."""

    name: str
    what: str
    command: tuple[str, ...]
    share_s: float
    output: Path | None = None
    parse: Callable[[Path], dict] | None = None
    optional: bool = False


@dataclass
class Outcome:
    """What a step did: its status (one of `STATUSES`), time, and parsed results or the end of its output."""

    name: str
    command: str
    status: str = "pending"
    limit_s: float | None = None
    seconds: float | None = None
    returncode: int | None = None
    note: str | None = None
    started: str | None = None
    git_commit: str | None = None
    results: dict | None = None
    tail: str | None = None
    carried_over: bool = False


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def shown(command: tuple[str, ...] | list[str]) -> str:
    """A command as a person would type it: `python` for this interpreter, paths inside the repository relative."""
    words = ["python" if word == sys.executable else word.replace(f"{REPOSITORY}/", "") for word in command]
    return shlex.join(words)


# 1. The steps and their parsers


def parse_install(path: Path) -> dict:
    return json.loads(path.read_text())


def parse_tests(path: Path) -> dict:
    """Counts and failures from pytest's JUnit XML; each failure with the end of its traceback."""
    root = ElementTree.parse(path).getroot()
    counts = collections.Counter()
    for suite in root.iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    failures = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            found = case.find(kind)
            if found is not None:
                module, name = case.get("classname", ""), case.get("name", "")
                message = (found.get("message") or "").strip().splitlines()
                failures.append({"test": f"{module.replace('.', '/')}.py::{name}", "kind": kind,
                                 "message": message[0][:300] if message else "", "output": (found.text or "")[-2000:]})
    return {"tests": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failures": failures}


def fusion_verdicts(raw: dict) -> dict:
    """`benchmarks.fusions`' rows with a verdict on each, and on each switch of `FastOptions` that chooses
    fusions: `chains` wins when the fused chains make an image's kernel time smaller than the kernels alone,
    `gemm_gelu` when its Triton GEMM beats cuBLAS plus GELU at both VQGAN shapes and in the VQGAN decode."""
    from engine.backends import FastOptions
    from engine.recipe import Recipe

    recipe, defaults = Recipe(), FastOptions()
    calls = {"prior_step": recipe.prior_evaluations, "decoder_step": recipe.decoder_steps, "vqgan_decode": 1}
    stages = {(row["stage"], row["variant"]): row for row in raw["stages"]}
    kernels = [row | {"verdict": "wins" if row["speedup"] > 1 else "loses"} for row in raw["kernels"]]

    def image_ms(variant: str) -> float:
        """One image's time in a variant: denoising steps replay as CUDA graphs, so they cost their kernel
        time; the VQGAN runs eagerly, so it costs its wall time. A variant that changes only the VQGAN
        borrows torch-fast's steps."""
        total = 0.0
        for stage, count in calls.items():
            row = stages.get((stage, variant)) or stages[(stage, "torch-fast")]
            ms = row["kernel_ms"] if stage != "vqgan_decode" and row["kernel_ms"] > 0 else row["wall_ms"]
            total += count * ms
        return total

    def switch(wins: bool, default: bool, evidence: str) -> dict:
        change = None if wins == default else "turn on" if wins else "turn off"
        return {"verdict": "wins" if wins else "loses", "default": default, "change": change, "evidence": evidence}

    fused, unfused = image_ms("torch-fast"), image_ms("kernels")
    gemm_rows = [row for row in kernels if row["kernel"].startswith("linear + GELU")]
    with_gemm = stages[("vqgan_decode", "torch-fast + linear_gelu")]["wall_ms"]
    without = stages[("vqgan_decode", "torch-fast")]["wall_ms"]
    gemm_wins = with_gemm < without and bool(gemm_rows) and all(row["verdict"] == "wins" for row in gemm_rows)
    switches = {
        "chains": switch(fused < unfused, defaults.chains,
                         f"an image's steps and decode: {fused:.1f} ms with the chains, {unfused:.1f} ms without"),
        "gemm_gelu": switch(gemm_wins, defaults.gemm_gelu,
                            f"VQGAN decode {with_gemm:.2f} ms with it, {without:.2f} ms without; GEMM + GELU "
                            + ", ".join(f"{row['speedup']:.2f}×" for row in gemm_rows) + " against cuBLAS + GELU"),
    }
    return {"dtype": raw.get("dtype"), "size": raw.get("size"), "kernels": kernels, "stages": raw["stages"],
            "switches": switches}


def parse_fusions(path: Path) -> dict:
    return fusion_verdicts(json.loads(path.read_text()))


def parse_bench(path: Path) -> dict:
    return {"records": json.loads(path.read_text())["records"]}


def parse_attention(path: Path) -> dict:
    rows = json.loads(path.read_text())["rows"]
    for row in rows:
        row["speedup"] = row["sdpa_us"] / row["triton_us"]
        row["verdict"] = "wins" if row["speedup"] > 1 else "loses"
    return {"rows": rows}


def parse_kernels(path: Path) -> dict:
    raw = json.loads(path.read_text())
    return {"size": raw["size"], "dtype": raw["dtype"], "rows": raw["rows"]}


def parse_quant(path: Path) -> dict:
    raw = json.loads(path.read_text())
    return {"size": raw["size"], "rows": raw["rows"], "fp8_gemm_measured": raw["fp8_gemm_measured"]}


def parse_load(path: Path) -> dict:
    raw = json.loads(path.read_text())
    return {"workload": raw["workload"], "measurements": raw["measurements"]}


def plan(raw: Path, site: Path, wheel_folder: Path, dry_run: bool = False) -> list[Step]:
    """The suite's steps, in order, writing their outputs into `raw`. A dry run runs each command in a form
    that a CPU finishes in seconds: the install of a stand-in wheel, test collection, `--help`, and a bench
    of the tiny preset."""
    python = sys.executable
    bench = (python, "-m", "engine.cli", "bench")  # `wuerstchen bench`, run from the working tree
    install = (python, "-m", "benchmarks.wheels", "install", "--wheels", str(wheel_folder), "--site", str(site),
               "--json", str(raw / "install.json"))
    tests = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "tests/test_fast.py",
             "tests/test_fused.py", "tests/test_quant_kernels.py", "--junitxml", str(raw / "tests.xml"))
    if dry_run:
        install += ("--require", "wuerstchen_probe==0.0.0")
        tests = (*tests[:3], "--collect-only", "-qq", *tests[4:])  # -qq: a count per file, not every test's name
        tiny = ("--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--sizes", "128", "--batch", "1",
                "--backend", "torch", "--baseline", "diffusers", "--prior-steps", "2", "--decoder-steps", "2",
                "--runs", "1", "--warmup", "1", "--no-cold-start", "--json", str(raw / "e2e.json"))
        return [
            Step("install", "a stand-in wheel and this project, installed offline", install, 20,
                 raw / "install.json", parse_install),
            Step("tests", "the GPU tests, collected only", tests, 120, raw / "tests.xml", parse_tests),
            Step("fusions", "the fusion ablation's command line", (python, "-m", "benchmarks.fusions", "--help"), 80),
            Step("e2e", "the tiny preset on the CPU against diffusers", (*bench, *tiny), 170, raw / "e2e.json",
                 parse_bench),
            Step("attention", "the attention benchmark's command line",
                 (python, "-m", "benchmarks.attention", "--help"), 25),
            Step("kernels", "the kernel profile's command line", (python, "-m", "benchmarks.kernel_profile", "--help"),
                 65),
            Step("quant", "the quantized GEMM benchmark's command line",
                 (python, "-m", "benchmarks.quant_kernels", "--help"), 40, optional=True),
            Step("quant-e2e", "the tiny preset on the CPU, unquantized and int8 in one run",
                 (*bench, "--preset", "tiny", "--device", "cpu", "--dtype", "bf16", "--sizes", "128", "--backend",
                  "torch", "--quantize", "none", "int8", "--prior-steps", "2", "--decoder-steps", "2", "--runs", "1",
                  "--warmup", "1", "--no-cold-start", "--json", str(raw / "quant-e2e.json")), 120,
                 raw / "quant-e2e.json", parse_bench, optional=True),
            Step("load", "the scheduler under load, the tiny preset on the CPU",
                 (*bench, "--preset", "tiny", "--device", "cpu", "--load", "--sizes", "128", "--prior-steps", "2",
                  "--decoder-steps", "2", "--concurrency", "1", "2", "--requests", "2", "--json",
                  str(raw / "load.json")), 150, raw / "load.json", parse_load, optional=True),
            Step("e2e-compile", "the bench's command line", (*bench, "--help"), 240, optional=True),
        ]
    return [
        Step("install", "the wheels of the wheel folder and this project, installed offline", install, 20,
             raw / "install.json", parse_install),
        Step("tests", "the kernel and fast-path tests on the GPU: numbers, autotuning, graph capture", tests, 120,
             raw / "tests.xml", parse_tests),
        Step("fusions", "each fusion against what it replaces; which switches ship",
             (python, "-m", "benchmarks.fusions", "--dtype", "fp16", "--json", str(raw / "fusions.json")), 80,
             raw / "fusions.json", parse_fusions),
        Step("e2e", "torch, torch-fast and diffusers eager in one process, 1024², batch 1 and 4",
             (*bench, *E2E, "--batch", "1", "4", "--backend", "torch", "torch-fast", "--baseline", "diffusers",
              "--json", str(raw / "e2e.json")), 170, raw / "e2e.json", parse_bench),
        Step("attention", "the Triton attention kernel against SDPA at the model's shapes",
             (python, "-m", "benchmarks.attention", "--dtype", "fp16", "--json", str(raw / "attention.json")), 25,
             raw / "attention.json", parse_attention),
        Step("kernels", "each step's kernel time by kind, for torch, torch-fast and diffusers",
             (python, "-m", "benchmarks.kernel_profile", "--dtype", "fp16", "--json", str(raw / "kernels.json")), 65,
             raw / "kernels.json", parse_kernels),
        Step("quant", "the fp8 and int8 GEMMs against cuBLAS bf16 at the model's Linears, 1024² (when time is left)",
             (python, "-m", "benchmarks.quant_kernels", "--json", str(raw / "quant.json")), 40, raw / "quant.json",
             parse_quant, optional=True),
        # With diffusers beside them, both engines hold the weights diffusers' modules drew on the GPU, where
        # the preset would draw them twice on the CPU (about a minute each at full size).
        Step("quant-e2e", "torch-fast in bf16 against the same with fp8 weights and activations, and diffusers, in "
                          "one run, 1024², batch 1 (when time is left)",
             (*bench, *("bf16" if word == "fp16" else word for word in E2E), "--batch", "1", "--backend",
              "torch-fast", "--quantize", "none", "fp8", "--baseline", "diffusers", "--json",
              str(raw / "quant-e2e.json")), 120, raw / "quant-e2e.json", parse_bench, optional=True),
        Step("load", "the step scheduler under load on torch-fast at 1024²: images/s at saturation, p99 at 80 % "
                     "of it, against one request at a time (when time is left)",
             (*bench, *E2E[:6], "--sizes", "1024", "--backend", "torch-fast", "--load", "--concurrency", "1", "2",
              "4", "8", "--requests", "8", "--json", str(raw / "load.json")), 150, raw / "load.json", parse_load,
             optional=True),
        Step("e2e-compile", "torch-fast against diffusers + torch.compile, batch 1 (when time is left)",
             (*bench, *E2E, "--batch", "1", "--backend", "torch-fast", "--baseline", "diffusers-compile",
              "--json", str(raw / "e2e-compile.json")), 240, raw / "e2e-compile.json", parse_bench, optional=True),
    ]


STEPS = tuple(step.name for step in plan(Path("raw"), Path("site"), Path(".whl")))


def select(steps: list[Step], only: list[str] | None) -> list[Step]:
    """The steps named in `only` (comma-separated or repeated), in the suite's order, the install first; a
    step named outright is no longer optional."""
    if not only:
        return steps
    names = [name.strip() for text in only for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise WuerstchenError(f"--only {','.join(unknown) or '(empty)'}: expected any of {', '.join(STEPS)}")
    return [replace(step, optional=False) if step.name in names else step for step in steps
            if step.name in names or step.name == "install"]


def time_limits(steps: list[Step], budget_s: float) -> dict[str, float]:
    """Each required step's share of the budget; an optional step's least time, as it is."""
    if budget_s <= 0:
        raise WuerstchenError(f"--budget {budget_s:g}: expected a positive number of seconds")
    total = sum(step.share_s for step in steps if not step.optional)
    return {step.name: step.share_s if step.optional else budget_s * step.share_s / total for step in steps}


# 2. Running one step


def run_command(command: tuple[str, ...], limit_s: float, environment: dict, echo: Callable[[str], None]
                ) -> tuple[int | None, float, list[str]]:
    """Run `command` from the repository's root, streaming its output line by line through `echo`, for at
    most `limit_s` seconds: (its exit status, or None when it ran out of time; seconds; its last lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    start = time.monotonic()
    # Its own session and process group: at the limit, the whole group goes (pytest's or the bench's children too).
    process = subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                               start_new_session=True)

    def pump():
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            echo(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        _stop(process)  # also when it exited: a step's children must not outlive it
    reader.join(timeout=KILL_GRACE_S)
    return returncode, time.monotonic() - start, list(tail)


def _stop(process: subprocess.Popen) -> None:
    """End what is left of the step's process group: asked to stop first, then killed."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def run_step(step: Step, limit_s: float, environment: dict, echo: Callable[[str], None]) -> Outcome:
    """Run one step and read its output: passed only when it exits 0 and its output file parses."""
    outcome = Outcome(step.name, shown(step.command), status="failed", limit_s=round(limit_s, 1), started=now())
    if step.output is not None:
        step.output.unlink(missing_ok=True)  # a stale file must not pass for this run's output
    returncode, seconds, tail = run_command(step.command, limit_s, environment, echo)
    outcome.returncode, outcome.seconds = returncode, round(seconds, 1)
    if returncode is None:
        outcome.status, outcome.note = "timed out", f"stopped at its limit of {limit_s:.0f} s"
    elif returncode != 0:
        outcome.note = f"exit status {returncode}"
    if step.parse is not None and step.output is not None:
        if step.output.is_file():
            try:
                outcome.results = step.parse(step.output)
            except Exception as error:  # a malformed output is this step's failure, never the suite's end
                outcome.status, outcome.note = "failed", f"could not read {step.output.name}: {error}"
        elif returncode == 0:
            outcome.note = f"wrote no {step.output.name}"
    if returncode == 0 and outcome.note is None:
        outcome.status = "passed"
    if outcome.status != "passed":
        outcome.tail = "\n".join(tail)
    return outcome


# 3. The run: provenance, results files, the whole plan


PROVENANCE = ("import json, torch\n"
              "from benchmarks.bench import provenance\n"
              "print(json.dumps(provenance(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))))")


def measure_provenance(environment: dict) -> dict:
    """`benchmarks.bench.provenance` in a child process, so this one never holds a CUDA context."""
    try:
        found = subprocess.run([sys.executable, "-c", PROVENANCE], cwd=REPOSITORY, env=environment,
                               capture_output=True, text=True, timeout=120, check=True)
        return json.loads(found.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError) as error:
        return {"device": "unknown device", "error": f"provenance failed: {error}", "versions": {}}


def gpu_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100-80gb-hbm3': the GPU part of a results file's name."""
    words = re.sub(r"[^a-z0-9]+", "-", device.lower().replace("nvidia", "")).strip("-")
    return words or "unknown-device"


def results_name(run: dict) -> str:
    name = f"{run['started'][:10]}-{gpu_slug(run['provenance'].get('device', ''))}"
    return f"{name}-dry-run" if run["dry_run"] else name


def earlier_steps(folder: Path | None, name: str, rerun: set[str]) -> list[dict]:
    """The steps of an earlier run's file of the same name (same day, same GPU) that this run does not redo:
    a rerun of one step leaves the day's file whole."""
    path = folder / f"{name}.json" if folder else None
    if path is None or not path.is_file():
        return []
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if earlier.get("format") != FORMAT:
        return []
    return [step | {"carried_over": True} for step in earlier["steps"]
            if step["name"] not in rerun and step["status"] != "pending"]


def write_results(run: dict, folders: list[Path]) -> list[Path]:
    """The run's JSON and its markdown summary, each written whole, into every folder."""
    name = results_name(run)
    text = json.dumps(run, indent=1, ensure_ascii=False) + "\n"
    try:
        summary = summary_markdown(run)
    except Exception as error:  # noqa: BLE001 - the results must be written whatever their summary trips on
        summary = (f"# GPU suite, {name}\n\nThe summary could not be written ({type(error).__name__}: {error}); "
                   f"the results are in {name}.json.\n")
    written = []
    for folder in dict.fromkeys(folders):
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / f"{name}.json", text.encode("utf-8"))
        write_atomically(folder / f"{name}.md", summary.encode("utf-8"))
        written += [folder / f"{name}.json", folder / f"{name}.md"]
    return written


def step_environment(site: Path) -> dict:
    """The steps' environment: the installed folder first on the path, unbuffered output, and no network."""
    environment = dict(os.environ)
    environment.update(
        PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        PATH=os.pathsep.join(filter(None, [str(site / "bin"), os.environ.get("PATH")])),
    )
    return environment


@dataclass
class Suite:
    """One run of a plan under a budget: where it writes and how it learns its provenance."""

    steps: list[Step]
    budget_s: float
    out: Path
    results: Path | None = None  # also write the results file here (benchmarks/results); never for a dry run
    environment: dict = field(default_factory=lambda: dict(os.environ))
    dry_run: bool = False
    commit: str | None = None
    provenance: Callable[[dict], dict] = measure_provenance
    echo: Callable[[str], None] = print
    wheel_folder: dict | None = None  # what `check_wheel_folder` said of the real wheel folder

    def run(self) -> dict:
        """Run every step in order, each under its limit, writing the results after each: the run's record,
        with the steps of an earlier run of the same day and GPU that this one did not redo."""
        limits = time_limits(self.steps, self.budget_s)
        self.out.mkdir(parents=True, exist_ok=True)
        run = {"format": FORMAT, "format_version": 1, "dry_run": self.dry_run, "started": now(), "finished": None,
               "seconds": 0.0, "budget_s": self.budget_s, "provenance": {}, "wheel_folder": self.wheel_folder,
               "steps": [asdict(Outcome(step.name, shown(step.command))) for step in self.steps]}
        carried: list[dict] = []
        start = time.monotonic()
        deadline = start + self.budget_s
        # Appended line by line, not written whole: a run killed from outside keeps its log.
        with open(self.out / LOG_NAME, "a", encoding="utf-8") as log:
            def echo(line: str) -> None:
                self.echo(line)
                log.write(line + "\n")
                log.flush()

            print_plan(self.steps, limits, echo, "dry run, each command in a cheap form" if self.dry_run
                       else "GPU suite")
            echo(f"results after every step into {self.out}" + (f" and {self.results}" if self.results else ""))
            for index in range(len(self.steps)):
                outcome = self._run_step(index, limits, deadline, echo)
                if not run["provenance"]:  # measured after the install, so that it names the installed versions
                    run["provenance"] = self.provenance(self.environment) | (
                        {"git_commit": self.commit} if self.commit else {})
                    if not self.dry_run:
                        carried = earlier_steps(self.results, results_name(run), {s.name for s in self.steps})
                    if carried:
                        echo(f"keeping {', '.join(s['name'] for s in carried)} from the earlier run in "
                             f"{results_name(run)}.json")
                outcome.git_commit = run["provenance"].get("git_commit")
                run["steps"][index] = asdict(outcome)
                run["seconds"] = round(time.monotonic() - start, 1)
                self._write(run, carried)
            run["finished"] = now()
            written = self._write(run, carried)
            self._print_summary(run, written, echo)
        return self._merged(run, carried)

    def _run_step(self, index: int, limits: dict[str, float], deadline: float, echo: Callable[[str], None]
                  ) -> Outcome:
        """Step `index` under its limit: its share, plus what the steps before it left unused, never the time
        promised to the steps after it."""
        step = self.steps[index]
        later = sum(limits[s.name] for s in self.steps[index + 1:] if not s.optional)
        left = deadline - time.monotonic()
        limit = min(max(limits[step.name], left - later), left)
        if step.optional and left - later < limits[step.name]:
            outcome = Outcome(step.name, shown(step.command), status="skipped", limit_s=0,
                              note=f"{max(left - later, 0):.0f} s left, it needs {limits[step.name]:.0f} s")
        elif limit < 1:
            outcome = Outcome(step.name, shown(step.command), status="skipped", limit_s=0, note="the budget was spent")
        else:
            echo(f"==> [{index + 1}/{len(self.steps)}] {step.name}: {step.what} (limit {limit:.0f} s, {left:.0f} s "
                 "of the budget left)")
            echo(f"$ {shown(step.command)}")
            outcome = run_step(step, limit, self.environment, echo)
        echo(f"==> {step_line(asdict(outcome))}")
        return outcome

    def _merged(self, run: dict, carried: list[dict]) -> dict:
        order = {name: index for index, name in enumerate(STEPS)}
        steps = sorted([*run["steps"], *carried], key=lambda s: order.get(s["name"], len(order)))
        return run | {"steps": steps}

    def _write(self, run: dict, carried: list[dict]) -> list[Path]:
        folders = [self.out] if self.dry_run or self.results is None else [self.results, self.out]
        return write_results(self._merged(run, carried), folders)

    def _print_summary(self, run: dict, written: list[Path], echo: Callable[[str], None]) -> None:
        """The end of the output, all that a remote run may return: statuses, the table, the decisions."""
        merged = self._merged(run, [])
        echo(f"==> done in {run['seconds']:.0f} s of {self.budget_s:.0f}: "
             + " · ".join(step_line(s) for s in merged["steps"]))
        if records_of(merged):
            for line in performance_table(merged):
                echo(line)
        fusions = next((s.get("results") for s in merged["steps"] if s["name"] == "fusions"), None) or {}
        for name, switch in fusions.get("switches", {}).items():
            echo(f"fusion switch {name}: {switch['verdict']}, {switch['change'] or 'no change'} ({switch['evidence']})")
        tests = next((s.get("results") for s in merged["steps"] if s["name"] == "tests"), None) or {}
        for failure in tests.get("failures", [])[:15]:
            echo(f"FAILED {failure['test']}: {failure['message']}")
        echo("written: " + ", ".join(str(path) for path in written))


def print_plan(steps: list[Step], limits: dict[str, float], echo: Callable[[str], None], title: str) -> None:
    """Each step's time limit and command, one line each."""
    planned = sum(limits[s.name] for s in steps if not s.optional)
    echo(f"{title}: {len(steps)} steps, {planned:.0f} s planned")
    for step in steps:
        limit = f"≥{limits[step.name]:.0f} s if left" if step.optional else f"{limits[step.name]:.0f} s"
        echo(f"  {step.name:<12}{limit:>16}  {shown(step.command)}")


def succeeded(run: dict, steps: list[Step]) -> bool:
    """Every step of this run passed, but an optional one, which may have been skipped for want of time."""
    optional = {step.name for step in steps if step.optional}
    return all(s["status"] == "passed" or (s["status"] == "skipped" and s["name"] in optional)
               for s in run["steps"] if not s.get("carried_over"))


def check_wheels(folder: Path) -> dict:
    """Whether the real wheel folder is ready for the GPU machine, as a dry run reports it."""
    try:
        found = wheels.check_wheel_folder(folder, wheels.WHEELS)
        return {"path": str(folder), "ready": True, "wheels": [path.name for path in found]}
    except WuerstchenError as error:
        return {"path": str(folder), "ready": False, "error": str(error)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="STEP[,STEP]",
                        help=f"run these steps (and the install) only: {', '.join(STEPS)}; repeatable")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"seconds for the whole run, shared among the steps (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--out", type=Path, help="folder for the results, the summary and the log (default $OUT, "
                                                 "else a new temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="also write the results file here (default benchmarks/results; never on a dry run)")
    parser.add_argument("--wheels", type=Path, default=wheels.DEFAULT_FOLDER, help="wheel folder (default .whl)")
    parser.add_argument("--site", type=Path, help=f"install folder (default {wheels.DEFAULT_SITE}; a temporary one "
                                                  "on a dry run)")
    parser.add_argument("--commit", help="the commit measured, where this copy of the working tree has no .git")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU: print the plan, install a stand-in wheel, run each step's cheap form, and "
                             "write the results into --out only")
    args = parser.parse_args(argv)
    # Line by line even into a pipe: a run stopped from outside has shown all that it did.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT")
                           else Path(tempfile.mkdtemp(prefix="gpu-suite-out-")))
        # The steps' raw outputs live only as long as the run: what they say is in the results file.
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
            raw = Path(scratch) / "raw"
            raw.mkdir()
            site = args.site or (Path(scratch) / "site" if args.dry_run else wheels.DEFAULT_SITE)
            wheel_folder = wheels.write_probe_wheel(Path(scratch) / "wheels").parent if args.dry_run else args.wheels
            steps = select(plan(raw, site, wheel_folder, dry_run=args.dry_run), args.only)
            limits = time_limits(steps, args.budget)
            if args.dry_run:
                gpu_steps = select(plan(raw, wheels.DEFAULT_SITE, args.wheels), args.only)
                print_plan(gpu_steps, limits, print, f"the plan on an H100/H200 (budget {args.budget:.0f} s)")
            ready = check_wheels(args.wheels)
            print(f"wheel folder {ready['path']}: "
                  + (", ".join(ready["wheels"]) if ready["ready"] else ready["error"]))
            suite = Suite(steps, args.budget, out, results=None if args.dry_run else args.results,
                          environment=step_environment(site), dry_run=args.dry_run, commit=args.commit,
                          wheel_folder=ready)
            return 0 if succeeded(suite.run(), steps) else 1
    except WuerstchenError as error:
        print(f"benchmarks.gpu_suite: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
