"""Measuring a pipeline: end-to-end latency, per-stage times, throughput, peak memory and efficiency.

The same measurement drives this engine and diffusers' `WuerstchenCombinedPipeline`, which take the same
call. Per-stage times come from CUDA events recorded around every stage call and read once the run has
finished (so timing adds no host sync inside the loop); on a CPU, from the wall clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

STAGES = ("prior_text", "prior_condition", "prior_step", "decoder_text", "decoder_condition", "decoder_step",
          "vqgan_decode")


PROMPT = "a photograph of a lighthouse on a cliff at dusk"  # what every measured call asks for


class StageTimer:
    """Times every call made through `timed`, per stage name."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending: list[tuple[str, object, object, int]] = []

    @contextlib.contextmanager
    def timed(self, stage: str, calls: int = 1) -> Iterator[None]:
        """Time the block as `calls` calls of `stage` of equal length (a loop replayed as a whole)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._pending.append((stage, start, end, calls))

    def collect(self) -> dict[str, list[float]]:
        """Milliseconds of each call since the last collect, by stage (synchronises the device once)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times: dict[str, list[float]] = {}
        for stage, start, end, calls in self._pending:
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            times.setdefault(stage, []).extend([ms / calls] * calls)
        self._pending = []
        return times


class _TimedStage:
    """A stage object whose call (unless `name` is None) and `condition` run under a timer; everything else
    passes through."""

    def __init__(self, stage, timer: StageTimer, name: str | None, condition_name: str | None = None):
        self._stage, self._timer, self._name, self._condition_name = stage, timer, name, condition_name

    def __call__(self, *args, **kwargs):
        if self._name is None:
            return self._stage(*args, **kwargs)
        with self._timer.timed(self._name):
            return self._stage(*args, **kwargs)

    def condition(self, *args, **kwargs):
        with self._timer.timed(self._condition_name):
            return self._stage.condition(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._stage, name)


class _TimedGraphs:
    """A cache of captured steps whose replays run under a timer, as "<stage>_step": a replay makes no call
    of the model to time."""

    def __init__(self, graphs, timer: StageTimer):
        self._graphs, self._timer = graphs, timer

    def get(self, key: tuple, build):
        return _TimedGraph(self._graphs.get(key, build), self._timer, f"{key[0]}_step")

    def memory_pool(self, device):
        return self._graphs.memory_pool(device)


class _TimedGraph:
    def __init__(self, graph, timer: StageTimer, name: str):
        self._graph, self._timer, self._name = graph, timer, name

    def load_conditioning(self, *args) -> None:
        self._graph.load_conditioning(*args)

    def replay(self, *inputs):
        with self._timer.timed(self._name):
            return self._graph.replay(*inputs)


@contextlib.contextmanager
def instrument_engine(pipe, timer: StageTimer) -> Iterator[object]:
    """This engine's pipeline (any backend) with every stage timed: the same pipeline over timed stage
    objects (`WuerstchenPipeline.with_stages`), the original left as it was. Eager steps time the model's
    call; captured steps their replay."""
    stages = pipe.stages
    captured = stages.graphs is not None
    timed = pipe.with_stages(dataclasses.replace(
        stages,
        prior_text=_TimedStage(stages.prior_text, timer, "prior_text"),
        prior=_TimedStage(stages.prior, timer, None if captured else "prior_step", "prior_condition"),
        decoder_text=_TimedStage(stages.decoder_text, timer, "decoder_text"),
        decoder=_TimedStage(stages.decoder, timer, None if captured else "decoder_step", "decoder_condition"),
        vqgan=_TimedStage(stages.vqgan, timer, "vqgan_decode"),
        graphs=_TimedGraphs(stages.graphs, timer) if captured else None,
    ))
    try:
        yield timed
    finally:
        timed.close()


@contextlib.contextmanager
def instrument_diffusers(pipe, timer: StageTimer) -> Iterator[object]:
    """diffusers' pipeline with its stages timed, for the duration of the block: forward hooks on its modules,
    and its VQGAN's `decode`."""
    handles, open_calls = [], {}
    modules = {"prior_text": pipe.prior_pipe.text_encoder, "prior_step": pipe.prior_pipe.prior,
               "decoder_text": pipe.decoder_pipe.text_encoder, "decoder_step": pipe.decoder_pipe.decoder}
    for stage, module in modules.items():
        def enter(_module, _args, stage=stage):
            open_calls[stage] = timer.timed(stage)
            open_calls[stage].__enter__()

        def leave(_module, _args, _output, stage=stage):
            open_calls.pop(stage).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    vqgan = pipe.decoder_pipe.vqgan
    decode = vqgan.decode

    def timed_decode(*args, **kwargs):
        with timer.timed("vqgan_decode"):
            return decode(*args, **kwargs)

    vqgan.decode = timed_decode
    try:
        yield pipe
    finally:
        for handle in handles:
            handle.remove()
        del vqgan.decode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Measurement:
    """What `measure` found: end-to-end seconds of every timed run, per-stage milliseconds of every call,
    and the peak device memory (GB, None on a CPU)."""

    seconds: list[float]
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_memory_gb: float | None = None

    def summary(self, batch: int) -> dict:
        s = self.seconds
        return {
            "latency_s": {"median": statistics.median(s), "p90": _percentile(s, 0.9), "min": min(s), "max": max(s)},
            "images_per_s": batch / statistics.median(s),
            "stages_ms": {stage: {"median": statistics.median(ms), "calls_per_run": len(ms) / len(s)}
                          for stage, ms in self.stage_ms.items()},
            "peak_memory_gb": self.peak_memory_gb,
        }


def measure(
    pipe, run: Callable[[object], object],
    instrument: Callable[[object, StageTimer], contextlib.AbstractContextManager] | None,
    device: torch.device, warmup: int, runs: int,
) -> Measurement:
    """Time `run(pipe)` `runs` times after `warmup` untimed calls; per stage too when `instrument` is given
    (`instrument(pipe, timer)` yields the pipeline to run with its stages timed)."""
    for _ in range(warmup):
        run(pipe)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StageTimer(device)
    seconds, stage_ms = [], {}
    with instrument(pipe, timer) if instrument else contextlib.nullcontext(pipe) as target:
        for _ in range(runs):
            start = time.perf_counter()
            run(target)
            _sync(device)
            seconds.append(time.perf_counter() - start)
            for stage, ms in timer.collect().items():
                stage_ms.setdefault(stage, []).extend(ms)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return Measurement(seconds, stage_ms, peak)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's measured dense matmul rate in `dtype`: the bar for efficiency figures."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    runs, start = 10, time.perf_counter()
    for _ in range(runs):
        a @ b
    _sync(device)
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e12


def cuda_median_ms(function: Callable[[], object], warmup: int = 10, runs: int = 50) -> float:
    """Median milliseconds of `function` on the GPU, each run between two CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
