"""`wuerstchen serve`: the real server (uvicorn on 127.0.0.1, a free port) over the demo model. OpenAI's client
gets the files generate writes, byte for byte; 32 concurrent requests complete and share batches; a full queue
answers 429 and recovers; a disconnect cancels; bad bodies are 4xx JSON errors naming the field; /metrics
parses; a stalled or broken scheduler fails /health; one request id runs through headers, errors and the log."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from engine import Recipe, WuerstchenPipeline  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.scheduler import SchedulerOptions  # noqa: E402
from engine.serving.api import ServerOptions  # noqa: E402
from engine.serving.app import BackgroundServer, Service, create_app  # noqa: E402
from engine.serving.telemetry import JsonLines  # noqa: E402

FAST = {"size": "128x128", "prior_steps": 2, "decoder_steps": 2}
GENERATE_FAST = ["--height", "128", "--width", "128", "--prior-steps", "2", "--decoder-steps", "2"]
WARMUP = Recipe(128, 128, prior_steps=1, decoder_steps=1)
TIMEOUT = 120  # seconds for one HTTP call: generous, for a loaded 2-core machine
IMAGES = "/v1/images/generations"


def wait_for(condition, timeout: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return result


def sibling(pipe: WuerstchenPipeline, **scheduler) -> WuerstchenPipeline:
    """Another pipeline over the same loaded modules, with a scheduler of its own."""
    other = WuerstchenPipeline(pipe.config, pipe.stages, pipe.runtime)
    other.set_scheduler_options(SchedulerOptions(**scheduler))
    return other


@contextmanager
def serving(pipe: WuerstchenPipeline, **options):
    """(client, service) of a real server over `pipe`, once it is ready."""
    service = Service(pipe, ServerOptions(**{"warmup": WARMUP} | options))
    with BackgroundServer(create_app(service)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, TIMEOUT, "/ready")
        yield client, service


@pytest.fixture(scope="module")
def demo():
    """The demo model, as `wuerstchen serve` serves it without weights."""
    pipe = WuerstchenPipeline.from_preset("tiny", device="cpu")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def server(demo):
    with serving(demo) as running:
        yield running


@pytest.fixture
def client(server):
    return server[0]


@pytest.fixture
def log_records():
    """The server's structured log, as written (JSON lines), parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("wuerstchen.server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(level)


def logged(log_records, request_id: str) -> list[dict]:
    """A request's log records once its last one is written: the middleware logs the response after the
    client has it, so the test waits for that record rather than racing it."""
    def records():
        events = [record for record in log_records() if record.get("request_id") == request_id]
        return events if events and events[-1]["event"] == "response" else None
    return wait_for(records, 10, f"the response record of request {request_id}")


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def metric_samples(text: str) -> dict:
    """(sample name, labels) → value, from Prometheus' text format read by prometheus_client's own parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in prometheus_parser.text_string_to_metric_families(text) for sample in family.samples}


def test_an_openai_client_gets_the_files_generate_writes(client, tmp_path):
    openai = pytest.importorskip("openai")
    prompt = "a corgi on the beach"
    assert main(["generate", prompt, "--out", str(tmp_path / "one.png"), "--seed", "7", *GENERATE_FAST]) == 0
    assert main(["generate", prompt, "--out", str(tmp_path / "two.png"), "--seed", "7", "--num-images", "2",
                 *GENERATE_FAST]) == 0

    api = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    fast = {"seed": 7, "prior_steps": 2, "decoder_steps": 2}
    one = api.images.generate(model="wuerstchen", prompt=prompt, size="128x128", response_format="b64_json",
                              extra_body=fast)
    assert [base64.b64decode(item.b64_json) for item in one.data] == [(tmp_path / "one.png").read_bytes()]
    # Image i of a request with seed s has the seed s + i, as generate numbers them, in a batch of n as there.
    two = api.images.generate(prompt=prompt, n=2, size="128x128", extra_body=fast)
    assert [base64.b64decode(item.b64_json) for item in two.data] == \
        [(tmp_path / f"two-{index}.png").read_bytes() for index in range(2)]
    image = png(base64.b64decode(two.data[1].b64_json))
    assert image.size == (128, 128) and image.text["seed"] == "8" and image.text["image_index"] == "1"
    assert json.loads(image.text["settings"])["model"] == "tiny demo (random weights, seed 0) on torch, cpu, fp32"

    # The native endpoint: the same file as image/png, with its seed and the request's share of the device's time.
    response = client.post("/generate", json={"prompt": prompt, **FAST, **fast})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == (tmp_path / "one.png").read_bytes() and response.headers["x-seed"] == "7"
    timing = dict(part.split(";dur=") for part in response.headers["server-timing"].split(", "))
    assert set(timing) == {"compute", "text", "prior", "decoder", "vqgan"} and float(timing["compute"]) > 0


def test_32_concurrent_requests_all_complete_in_shared_batches(client, server, demo):
    service = server[1]
    before = service.pipe.stats()

    async def many():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=client.base_url, timeout=TIMEOUT, limits=limits) as pool:
            return await asyncio.gather(*(pool.post(IMAGES, json={"prompt": f"lighthouse {seed % 4}", "seed": seed,
                                                                  **FAST}) for seed in range(32)))

    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 32
    images = [png(base64.b64decode(r.json()["data"][0]["b64_json"])) for r in responses]
    assert [image.text["seed"] for image in images] == [str(seed) for seed in range(32)]
    assert len({r.headers["x-request-id"] for r in responses}) == 32
    after = service.pipe.stats()
    rows, batched = after["rows"] - before["rows"], after["batched_ticks"] - before["batched_ticks"]
    assert rows == 32 * 4 and batched < rows  # 2 prior and 2 decoder steps each, some of them side by side
    for seed in (0, 31):  # batched equals alone, within the rounding of batched GEMMs
        alone = demo(f"lighthouse {seed % 4}", height=128, width=128, prior_num_inference_steps=2,
                     num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
        difference = np.abs(np.asarray(images[seed], dtype=int) - np.asarray(alone, dtype=int))
        assert difference.max() <= 1


def test_a_saturated_server_answers_429_with_retry_after_and_recovers(demo):
    with serving(sibling(demo, max_queued=1, max_in_flight=1), warmup=None) as (client, service):
        body = {"prompt": "a crowd", "size": "128x128", "prior_steps": 6, "decoder_steps": 2}
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda seed: client.post(IMAGES, json=body | {"seed": seed}), range(8)))
        codes = [r.status_code for r in responses]
        refused = [r for r in responses if r.status_code == 429]
        assert set(codes) == {200, 429} and refused, codes
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            assert "queue holds 1 requests, its limit" in error["message"]
        assert client.post(IMAGES, json=body | {"seed": 99}).status_code == 200  # recovered
        samples = metric_samples(client.get("/metrics").text)
        assert samples[("wuerstchen_refused_requests_total", (("reason", "queue_full"),))] == len(refused)
        assert service.pipe.stats()["refused"] == {"queue_full": len(refused)}


def test_a_client_that_disconnects_cancels_its_request(client, server, log_records):
    stats = server[1].pipe.stats
    before = stats()
    body = json.dumps({"prompt": "a very long one", "size": "1024x1024", "prior_steps": 200, "decoder_steps": 2})
    request = (f"POST {IMAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"X-Request-Id: gone-1\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    with socket.create_connection((client.base_url.host, client.base_url.port)) as connection:
        connection.sendall(request)
        wait_for(lambda: stats()["in_flight"] == 1, TIMEOUT, "the request to start")
    closed = time.monotonic()
    wait_for(lambda: stats()["cancelled"] == before["cancelled"] + 1 and stats()["in_flight"] == 0, TIMEOUT,
             "the request to be cancelled")
    assert time.monotonic() - closed < 30 and stats()["completed"] == before["completed"]
    events = logged(log_records, "gone-1")
    assert [record["event"] for record in events] == ["submitted", "cancelled", "response"]
    assert events[1]["reason"] == "the client disconnected" and events[2]["status"] == 499


def test_a_client_that_leaves_a_progress_stream_cancels_its_request(client, server):
    stats = server[1].pipe.stats
    before = stats()
    body = {"prompt": "a very long one", "size": "1024x1024", "prior_steps": 200, "decoder_steps": 2, "stream": True}
    with httpx.Client(base_url=client.base_url, timeout=TIMEOUT) as leaving:
        with leaving.stream("POST", "/generate", json=body) as response:
            lines = response.iter_lines()
            assert [next(lines), next(lines)] == ["event: progress", 'data: {"stage": "queued", "step": 0, "steps": '
                                                                     '0, "fraction": 0.0}']
            assert next(lines) == "" and next(lines) == "event: progress"  # a step has run
    wait_for(lambda: stats()["cancelled"] == before["cancelled"] + 1 and stats()["in_flight"] == 0, TIMEOUT,
             "the streamed request to be cancelled")
    assert stats()["completed"] == before["completed"]


BAD_BODIES = [
    (b"{not json", 400, None, "the body is not valid JSON"),
    (b"[1, 2]", 400, None, "the body is a JSON list: expected an object"),
    ({}, 400, "prompt", "prompt is missing: it is required"),
    ({"prompt": 3}, 400, "prompt", "prompt=3: input should be a valid string"),
    ({"prompt": "a", "colour": "red"}, 400, "colour", "colour is not a field of this endpoint"),
    ({"prompt": "a", "size": "1000x128"}, 400, "size",
     "size='1000x128': width=1000 is off the model's size grid: expected a multiple of 128 from 128 to 4096"),
    ({"prompt": "a", "size": "8192x128"}, 400, "size", "width=8192 is outside the sizes served here"),
    ({"prompt": "a", "size": "large"}, 400, "size", "size='large': expected WIDTHxHEIGHT in pixels"),
    ({"prompt": "a", "n": 0}, 400, "n", "n=0: expected an integer from 1 to 4"),
    ({"prompt": "a", "n": 5}, 400, "n", "n=5: expected an integer from 1 to 4"),
    ({"prompt": "a", "n": "2"}, 400, "n", "n='2': input should be a valid integer"),
    ({"prompt": "a" * 2001}, 400, "prompt", "prompt has 2001 characters: expected at most 2000"),
    ({"prompt": "a", "negative_prompt": "b" * 5000}, 400, "negative_prompt", "negative_prompt has 5000 characters"),
    ({"prompt": "a", "response_format": "url"}, 400, "response_format", "response_format='url': expected 'b64_json'"),
    ({"prompt": "a", "seed": -1}, 400, "seed", "seed=-1: expected an integer from 0 to 2**64 - 1"),
    ({"prompt": "a", "prior_steps": 0}, 400, "prior_steps", "prior_steps=0: expected an integer from 1 to 200"),
    ({"prompt": "a", "prior_guidance": "high"}, 400, "prior_guidance", "input should be a valid number"),
    ({"prompt": "a", "deadline": -1, **FAST}, 400, "deadline", "deadline=-1.0: expected a positive number"),
    ({"prompt": "a", "priority": "urgent", **FAST}, 400, "priority", "priority='urgent': expected one of"),
    (b"{" + b" " * 2**20 + b"}", 413, None, "the body has 1048578 bytes: expected at most 1048576"),
]


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD_BODIES)
def test_bad_bodies_are_4xx_json_errors_naming_the_field(client, body, status, param, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(IMAGES, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_the_native_endpoint_checks_its_body_the_same_way(client):
    response = client.post("/generate", json={"prompt": "a", "n": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"  # one image per /generate
    response = client.get("/generate")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
    assert client.get("/nowhere").json()["error"]["message"] == "GET /nowhere: Not Found"


def test_an_infeasible_deadline_is_504_at_once(client):
    assert client.post(IMAGES, json={"prompt": "a", **FAST}).status_code == 200  # measures the step times
    start = time.monotonic()
    response = client.post(IMAGES, json={"prompt": "a", "size": "128x128", "prior_steps": 200, "deadline": 0.001})
    assert response.status_code == 504 and time.monotonic() - start < 10
    error = response.json()["error"]
    assert error["code"] == "deadline" and error["param"] == "deadline" and "its deadline is in" in error["message"]


def test_progress_streams_as_server_sent_events_then_the_image(client):
    request = {"prompt": "a fox", "seed": 5, **FAST}
    with client.stream("POST", "/generate", json=request | {"stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    events = [(kind.removeprefix("event: "), json.loads(data.removeprefix("data: ")))
              for kind, data in zip(lines[::3], lines[1::3], strict=True)]
    assert [kind for kind, _ in events] == ["progress"] * 5 + ["image"]
    assert [(e["stage"], e["step"], e["steps"], e["fraction"]) for _, e in events[:-1]] == [
        ("queued", 0, 0, 0.0), ("prior", 1, 2, 0.25), ("prior", 2, 2, 0.5), ("decoder", 1, 2, 0.75),
        ("decoder", 2, 2, 1.0)]
    image = events[-1][1]
    assert image["seed"] == 5 and image["request_id"] == response.headers["x-request-id"]
    assert base64.b64decode(image["b64_json"]) == client.post("/generate", json=request).content


def test_metrics_parse_and_count_what_was_served(client):
    before = metric_samples(client.get("/metrics").text)
    assert client.post(IMAGES, json={"prompt": "two", "n": 2, **FAST}).status_code == 200
    assert client.post(IMAGES, json={"prompt": "none", "n": 0}).status_code == 400

    # The middleware counts a response once the client has it: wait for the last one to be counted.
    responses = ("wuerstchen_http_responses_total", (("code", "400"), ("endpoint", IMAGES)))

    def counted():
        samples = metric_samples(client.get("/metrics").text)
        return samples if samples.get(responses, 0.0) > before.get(responses, 0.0) else None

    after = wait_for(counted, 10, "the refused request to be counted")

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("wuerstchen_images_total") == 2
    assert delta("wuerstchen_request_latency_seconds_count", endpoint=IMAGES) == 1
    assert delta("wuerstchen_http_responses_total", endpoint=IMAGES, code="200") == 1
    assert delta("wuerstchen_http_responses_total", endpoint=IMAGES, code="400") == 1
    assert delta("wuerstchen_scheduler_requests_total", outcome="completed") == 1
    assert after[("wuerstchen_queued_requests", ())] == 0 and after[("wuerstchen_in_flight_requests", ())] == 0
    assert after[("wuerstchen_healthy", ())] == 1 and after[("wuerstchen_ready", ())] == 1
    assert after[("wuerstchen_batch_occupancy", ())] >= 1
    steps = {dict(labels)["group"]: value for (name, labels), value in after.items()
             if name == "wuerstchen_step_seconds" and dict(labels)["batch"] == "1"}
    assert steps["prior 3×3, guided"] > 0 and steps["decoder 32×32"] > 0
    assert after[("wuerstchen_refused_requests_total", (("reason", "queue_full"),))] == 0


def test_health_ready_and_one_request_id_end_to_end(client, log_records):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready",
                                           "model": "tiny demo (random weights, seed 0) on torch, cpu, fp32"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"

    response = client.post("/generate", json={"prompt": "traced", "seed": 3, **FAST},
                           headers={"X-Request-Id": "trace-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    events = logged(log_records, "trace-42")
    assert [record["event"] for record in events] == ["submitted", "finished", "response"]
    assert events[0]["seed"] == 3 and events[0]["size"] == "128x128" and isinstance(events[0]["engine_request_id"], int)
    assert events[1]["engine_request_id"] == events[0]["engine_request_id"]
    assert events[2] | {"time": None, "seconds": None} == {
        "time": None, "level": "info", "event": "response", "request_id": "trace-42", "method": "POST",
        "path": "/generate", "status": 200, "seconds": None}

    refused = client.post(IMAGES, json={"prompt": "x", "n": 9}, headers={"X-Request-Id": "not a sane id"})
    request_id = refused.headers["x-request-id"]
    assert len(request_id) == 32 and refused.json()["error"]["request_id"] == request_id
    assert [record["status"] for record in logged(log_records, request_id)] == [400]


def test_a_stalled_loop_fails_health_until_it_moves_again(demo):
    pipe = sibling(demo)
    release = threading.Event()
    runner = pipe.scheduler.runner
    step = runner.step

    def stuck(*args):
        release.wait(TIMEOUT)
        return step(*args)

    runner.step = stuck
    with serving(pipe, warmup=None, stall_seconds=1.0) as (client, service), ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/generate", json={"prompt": "stuck", **FAST})
        unhealthy = wait_for(lambda: (r := client.get("/health")).status_code == 503 and r, 30, "/health to fail")
        assert unhealthy.json()["status"] == "unhealthy"
        assert "the scheduler's loop has stalled: no step for" in unhealthy.json()["reason"]
        assert service.problem() is not None  # what Ray's health check raises on
        release.set()
        assert pending.result().status_code == 200
        assert client.get("/health").status_code == 200


def test_a_sticky_device_error_fails_its_requests_health_and_newcomers_with_503(demo):
    pipe = sibling(demo)

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    pipe.scheduler.runner.step = broken
    with serving(pipe, warmup=None) as (client, service):
        failed = client.post(IMAGES, json={"prompt": "doomed", **FAST})
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "failed" and "retry it on another process" in \
            failed.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "device error" in health.json()["reason"]
        refused = client.post(IMAGES, json={"prompt": "next", **FAST})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unhealthy"


def test_an_api_key_guards_everything_but_the_probes(demo):
    with serving(sibling(demo), warmup=None, api_key="s3cret") as (client, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer clé".encode()}):
            response = client.post(IMAGES, json={"prompt": "a"}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        response = client.post(IMAGES, json={"prompt": "a", "n": 0}, headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 400  # past the key, to the body's check


def test_where_steps_are_captured_the_warm_up_runs_every_batch_size_before_ready(demo, monkeypatch):
    monkeypatch.setattr(Runner, "captures", property(lambda runner: True))  # as torch-fast on a GPU
    service = Service(sibling(demo), ServerOptions(warmup=WARMUP))
    assert not service.ready.is_set()
    service.warm_up()
    stats = service.pipe.stats()
    # One request per size, its images one batch at each of its steps (one prior step, one decoder step).
    assert service.ready.is_set() and stats["completed"] == 4 and stats["rows"] == (1 + 2 + 4 + 8) * 2
    assert sorted(stats["tick_ms"]["prior 3×3, guided"]) == [1, 2, 4, 8]  # one CUDA graph each, on a GPU


def test_a_non_local_address_needs_an_api_key_or_insecure(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--api-key KEY" in error and "--insecure" in error


def test_ray_serve_without_ray_is_a_one_line_error_naming_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as it does where it is not installed
    monkeypatch.delitem(sys.modules, "engine.serving.ray_serve", raising=False)
    assert main(["serve", "--ray", "--replicas", "2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and 'pip install "wuerstchen-engine[ray]"' in error


def test_the_demo_models_requests_and_warm_up_default_to_its_small_size():
    from engine.runtime import ModelSource, resolve
    from engine.serving.app import for_model

    options = ServerOptions()
    demo = for_model(options, resolve(ModelSource.choose(preset="tiny"), "torch", "cpu"))
    assert (demo.recipe.height, demo.recipe.width, demo.warmup.height, demo.warmup.decoder_steps) == (256, 256, 256, 2)
    assert demo.recipe.decoder_steps == options.recipe.decoder_steps
    assert for_model(ServerOptions(warmup=None), resolve(ModelSource.choose(preset="tiny"), "torch", "cpu")).warmup \
        is None
    assert for_model(options, resolve(ModelSource.choose(preset="wuerstchen-v2"), "torch", "cpu")) is options


def test_the_serve_command_serves_the_demo_model_and_logs_json_lines():
    command = [sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--no-warmup"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        try:
            lines = iter(process.stderr.readline, "")
            listening = next(json.loads(line) for line in lines if '"listening"' in line)
            assert listening["url"].startswith("http://127.0.0.1:") and not listening["authenticated"]
            with httpx.Client(base_url=listening["url"], timeout=TIMEOUT) as client:
                wait_for(lambda: client.get("/ready").json()["status"] == "ready", TIMEOUT, "the server to be ready")
                response = client.post(IMAGES, json={"prompt": "a corgi", **FAST})
                assert response.status_code == 200 and len(response.json()["data"]) == 1
            record = json.loads(next(line for line in lines if '"response"' in line and IMAGES in line))
            assert record["status"] == 200 and record["request_id"] == response.headers["x-request-id"]
        finally:
            process.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal so that the exit status tells it.
        assert process.wait(60) == -signal.SIGTERM
