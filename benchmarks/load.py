"""`wuerstchen bench --load`: the scheduler under load, in process, against the same pipeline serving one
request at a time, measured in the same run.

Requests come from a mix (sizes, step counts, guidance and images per request, with weights; by default the
recipe at every --sizes entry) with seeds of their own. Three measurements:
- sequential: one request at a time, each waiting for the last: the baseline;
- closed loop: `concurrency` clients, each submitting its next request when its last returns, swept over
  the given concurrencies; the highest images/s is the saturation throughput;
- open loop: Poisson arrivals at a rate (by default 80 % of saturation), the latency a service sees.
Each reports images/s, latency percentiles, queueing against compute (`WuerstchenOutput.compute_s`), batch
occupancy, padding and refusals.

With `--url`, the same measurements run over HTTP against a `wuerstchen serve` on this machine (`HttpPipeline`):
the client threads send the mix to /v1/images/generations, and the batching counters come from /metrics.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from engine.errors import WuerstchenError
from engine.recipe import Recipe
from engine.scheduler import DeadlineInfeasible, QueueFull, Refused, SchedulerUnhealthy

PROMPTS = ("a photograph of a lighthouse on a cliff at dusk", "an astronaut riding a horse, oil painting",
           "a bowl of ramen, studio lighting", "a red fox in the snow")


@dataclass(frozen=True)
class Workload:
    """One kind of request in a mix, drawn with probability proportional to `weight`."""

    height: int
    width: int
    prior_steps: int | None = None  # None: the published schedule
    decoder_steps: int = 12
    prior_guidance: float = 4.0
    decoder_guidance: float = 0.0
    images: int = 1
    weight: float = 1.0

    def call(self) -> dict:
        recipe = Recipe(self.height, self.width, self.prior_steps, self.prior_guidance, self.decoder_steps,
                        self.decoder_guidance)
        return recipe.call(self.images) | {"output_type": "pt"}


def read_mix(path: str | Path) -> list[Workload]:
    """A mix from a JSON file: a list of objects with Workload's fields; one-line errors naming the entry."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WuerstchenError(f"--mix={str(path)!r} is not a readable JSON file: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise WuerstchenError(f"--mix={str(path)!r}: expected a non-empty JSON list of workloads")
    mix = []
    for i, entry in enumerate(entries):
        fields = list(Workload.__annotations__)
        if not isinstance(entry, dict) or not {"height", "width"} <= set(entry) or not set(entry) <= set(fields):
            raise WuerstchenError(f"--mix entry {i}: {json.dumps(entry)[:80]}: expected an object with height, width "
                                  f"and any of {fields[2:]}")
        for name, value in entry.items():
            fits, expected = _MIX_FIELDS[name]
            if not fits(value):
                raise WuerstchenError(f"--mix entry {i}: {name}={value!r}: expected {expected}")
        mix.append(Workload(**entry))
    return mix


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# Each field of a mix entry: its check, and what it expects.
_MIX_FIELDS = {
    "height": (_integer, "a positive integer"), "width": (_integer, "a positive integer"),
    "prior_steps": (lambda v: v is None or _integer(v), "a positive integer, or null for the published schedule"),
    "decoder_steps": (_integer, "a positive integer"), "images": (_integer, "a positive integer"),
    "prior_guidance": (_number, "a finite number of 0 or more"),
    "decoder_guidance": (_number, "a finite number of 0 or more"),
    "weight": (lambda v: _number(v) and v > 0, "a finite number above 0"),
}


@dataclass
class Completed:
    """One finished (or refused) request: when it was submitted, how long it took, its compute share."""

    submitted: float
    latency_s: float
    compute_s: float
    images: int
    refused: str | None = None
    failed: str | None = None


class Traffic:
    """Requests drawn from a mix with seeds of their own, the same sequence for every measurement."""

    def __init__(self, mix: list[Workload], seed: int = 0):
        self.mix, self._random, self._lock = mix, random.Random(seed), threading.Lock()

    def next(self) -> tuple[Workload, dict]:
        with self._lock:
            workload = self._random.choices(self.mix, weights=[w.weight for w in self.mix])[0]
            prompt, seed = self._random.choice(PROMPTS), self._random.randrange(2**32)
        return workload, workload.call() | {"prompt": prompt, "seed": seed}


def _one(pipe, traffic: Traffic, submitted: float, clock: Callable[[], float], wait: bool = True) -> Completed:
    workload, call = traffic.next()
    try:
        future = pipe.submit(**call)
    except Refused as refusal:
        return Completed(submitted, 0.0, 0.0, workload.images, refused=refusal.reason)
    try:
        output = future.result()
    except Exception as error:  # noqa: BLE001 — a failed request is a figure of the run, not its end
        return Completed(submitted, clock() - submitted, 0.0, workload.images, failed=type(error).__name__)
    return Completed(submitted, clock() - submitted, output.compute_s, workload.images)


def sequential(pipe, traffic: Traffic, requests: int, clock=time.perf_counter) -> tuple[list[Completed], float]:
    """One request at a time: the baseline."""
    start = clock()
    done = [_one(pipe, traffic, clock(), clock) for _ in range(requests)]
    return done, clock() - start


def closed_loop(pipe, traffic: Traffic, concurrency: int, requests: int,
                clock=time.perf_counter) -> tuple[list[Completed], float]:
    """`concurrency` clients, each submitting its next request when its last returns, `requests` in all."""
    done: list[Completed] = []
    left = iter(range(requests))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if next(left, None) is None:
                    return
            result = _one(pipe, traffic, clock(), clock)
            with lock:
                done.append(result)

    start = clock()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done, clock() - start


def open_loop(pipe, traffic: Traffic, rate: float, requests: int, seed: int = 1,
              clock=time.perf_counter) -> tuple[list[Completed], float]:
    """Poisson arrivals at `rate` requests per second, each waited for on a thread of its own."""
    gaps = random.Random(seed)
    done: list[Completed] = []
    lock = threading.Lock()

    def request(submitted: float):
        result = _one(pipe, traffic, submitted, clock)
        with lock:
            done.append(result)

    threads = []
    start = arrival = clock()
    for _ in range(requests):
        arrival += gaps.expovariate(rate)
        time.sleep(max(0.0, arrival - clock()))
        thread = threading.Thread(target=request, args=(clock(),))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return done, clock() - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def summarize(name: str, done: list[Completed], seconds: float, stats_before: dict, stats_after: dict) -> dict:
    """The figures of one measurement."""
    served = [c for c in done if c.refused is None and c.failed is None]
    latencies = [c.latency_s for c in served]
    batched = stats_after["batched_ticks"] - stats_before["batched_ticks"]
    rows = stats_after["rows"] - stats_before["rows"]
    padding = stats_after["padding"] - stats_before["padding"]
    return {
        "measurement": name, "requests": len(done), "served": len(served), "seconds": seconds,
        "images_per_s": sum(c.images for c in served) / seconds if seconds else math.nan,
        "latency_s": {"p50": _percentile(latencies, 0.5), "p90": _percentile(latencies, 0.9),
                      "p99": _percentile(latencies, 0.99), "mean": statistics.fmean(latencies) if latencies else
                      math.nan},
        "compute_s_mean": statistics.fmean(c.compute_s for c in served) if served else math.nan,
        # compute_s comes from the measured (averaged) tick times: it can exceed a quick request's latency.
        "queueing_s_mean": statistics.fmean(max(0.0, c.latency_s - c.compute_s) for c in served) if served
        else math.nan,
        "batch_occupancy": rows / batched if batched else 0.0,
        "padding_waste": padding / (rows + padding) if rows + padding else 0.0,
        "refused": {reason: sum(c.refused == reason for c in done) for reason in {c.refused for c in done} if reason},
        "failed": sum(c.failed is not None for c in done),
    }


def run(pipe, mix: list[Workload], concurrencies: list[int], requests: int, rate: float | None = None,
        progress=print) -> list[dict]:
    """The three measurements on one pipeline (warmed up first, so that no figure pays a first call)."""
    traffic = Traffic(mix)
    closed_loop(pipe, Traffic(mix, seed=99), max(concurrencies), max(concurrencies))  # warm-up: every batch size

    def measured(name: str, measure) -> dict:
        progress(f"measuring {name} …")
        before = pipe.stats()
        done, seconds = measure()
        return summarize(name, done, seconds, before, pipe.stats())

    rows = [measured("sequential", lambda: sequential(pipe, traffic, requests))]
    for concurrency in concurrencies:
        rows.append(measured(f"concurrency {concurrency}",
                             lambda c=concurrency: closed_loop(pipe, traffic, c, max(requests, 2 * c))))
    saturation = max(row["images_per_s"] for row in rows)
    images_per_request = statistics.fmean(w.images for w in mix)
    arrivals = rate if rate is not None else 0.8 * saturation / images_per_request
    rows.append(measured(f"poisson {arrivals:.3g} req/s", lambda: open_loop(pipe, traffic, arrivals, requests)))
    rows[-1]["rate_req_per_s"] = arrivals
    return rows


def table(rows: list[dict], header: str) -> str:
    """The measurements as a table, the sequential baseline's images/s and p99 beside each."""
    base = rows[0]
    lines = [header, "", f"{'measurement':<24}{'req':>5}{'img/s':>8}{'× seq':>7}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}"
             f"{'queue s':>9}{'compute s':>10}{'batch':>7}{'pad %':>7}  refused"]
    for row in rows:
        latency = row["latency_s"]
        refused = ", ".join(f"{n} {r}" for r, n in row["refused"].items()) or "–"
        lines.append(
            f"{row['measurement']:<24}{row['requests']:>5}{row['images_per_s']:>8.3g}"
            f"{row['images_per_s'] / base['images_per_s']:>6.2f}×{latency['p50']:>8.3f}{latency['p90']:>8.3f}"
            f"{latency['p99']:>8.3f}{row['queueing_s_mean']:>9.3f}{row['compute_s_mean']:>10.3f}"
            f"{row['batch_occupancy']:>7.2f}{100 * row['padding_waste']:>7.1f}  {refused}")
    return "\n".join(lines)


def default_mix(sizes: list[tuple[int, int]], recipe: Recipe) -> list[Workload]:
    return [Workload(height, width, recipe.prior_steps, recipe.decoder_steps, recipe.prior_guidance,
                     recipe.decoder_guidance) for height, width in sizes]


def describe_mix(mix: list[Workload]) -> str:
    return "; ".join(f"{w.height}×{w.width} ×{w.images}, prior {w.prior_steps or 'published'}, decoder "
                     f"{w.decoder_steps} (w {w.weight:g})" for w in mix)


def record(rows: list[dict], mix: list[Workload], origin: dict, runtime) -> dict:
    """The JSON record of a load run."""
    return {"provenance": origin, "workload": {"runtime": runtime.describe(), "mix": [asdict(w) for w in mix]},
            "measurements": rows}



# --- over HTTP (`--url`): the same mix to a `wuerstchen serve` on this machine ---------------------------

# What a server refuses at submit, by status and error code, as the scheduler's refusals. Ray's proxy answers a
# full queue with a bare 429.
REFUSALS = {(429, "queue_full"): QueueFull, (429, None): QueueFull, (503, "unhealthy"): SchedulerUnhealthy,
            (504, "deadline"): DeadlineInfeasible}


@dataclass(frozen=True)
class ServerRuntime:
    """What a server says it runs (`GET /v1/models`), where a load record names the runtime."""

    description: str
    device: object  # torch.device

    def describe(self) -> str:
        return f"{self.description}, served over HTTP"


@dataclass(frozen=True)
class HttpOutput:
    compute_s: float


class HttpError(RuntimeError):
    """A request the server took and failed (or answered with an error that is not a refusal)."""


class HttpPipeline:
    """The pipeline `run` measures, over HTTP: `submit` sends one request to a server's
    /v1/images/generations and returns its answer as a finished future; `stats` reads the scheduler's
    counters from /metrics. Loopback only: the load test never leaves this machine. An API key is read from
    WUERSTCHEN_API_KEY."""

    def __init__(self, url: str, timeout: float = 600.0):
        import httpx
        import torch

        from engine.serving import API_KEY_VARIABLE, is_loopback

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not is_loopback(parts.hostname):
            raise WuerstchenError(f"--url={url!r}: the load test runs against a server on this machine only: expected "
                                  "http://127.0.0.1:PORT, http://[::1]:PORT or http://localhost:PORT")
        key = os.environ.get(API_KEY_VARIABLE)
        self.client = httpx.Client(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=1024),
                                   headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            model = self.client.get("/v1/models").raise_for_status().json()["data"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
            raise WuerstchenError(f"--url={url!r}: no `wuerstchen serve` answers there ({error})") from None
        self.runtime = ServerRuntime(model["description"], torch.device(model["device"]))

    def submit(self, prompt: str, *, seed: int, height: int, width: int, prior_num_inference_steps: int,
               prior_timesteps, prior_guidance_scale: float, num_inference_steps: int,
               decoder_guidance_scale: float, num_images_per_prompt: int, **_) -> Future:
        body = {"prompt": prompt, "seed": seed, "size": f"{width}x{height}", "n": num_images_per_prompt,
                "decoder_steps": num_inference_steps, "prior_guidance": prior_guidance_scale,
                "decoder_guidance": decoder_guidance_scale}
        if prior_timesteps is None:  # evenly spaced steps; else the published schedule, the server's default
            body["prior_steps"] = prior_num_inference_steps
        response = self.client.post("/v1/images/generations", json=body)
        future = Future()
        if response.status_code == 200:
            future.set_result(HttpOutput(_compute_seconds(response.headers.get("server-timing", ""))))
            return future
        error = response.json().get("error", {}) if response.headers.get("content-type") == "application/json" \
            else {}
        message = error.get("message") or response.text[:200]
        refusal = REFUSALS.get((response.status_code, error.get("code")))
        if refusal is not None:
            raise refusal(message, retry_after=float(response.headers.get("retry-after", 0)) or None)
        future.set_exception(HttpError(f"HTTP {response.status_code}: {message}"))
        return future

    def stats(self) -> dict:
        """The scheduler's batching counters, from the server's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.client.get("/metrics").raise_for_status().text
        values = {sample.name: sample.value for family in text_string_to_metric_families(text)
                  for sample in family.samples}
        return {name: values.get(f"wuerstchen_scheduler_{name}_total", 0.0) for name in ("batched_ticks", "rows",
                                                                                         "padding")}

    def close(self) -> None:
        self.client.close()


def _compute_seconds(server_timing: str) -> float:
    """The request's share of the device's time, from the `compute;dur=MS` entry of a Server-Timing header."""
    for entry in server_timing.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if name == "compute" and duration:
            return float(duration) / 1e3
    return math.nan
