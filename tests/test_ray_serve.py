"""`wuerstchen serve --ray` on the CPU: two replicas of the demo model on Ray's logical GPUs behind the same
HTTP API. One replica's process is killed mid-load: its requests fail at once with 5xx (none hangs), Ray
replaces it, later requests succeed, and every request is answered once. Under a minute on two cores."""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from engine import Recipe, WuerstchenPipeline  # noqa: E402
from engine.errors import WuerstchenError  # noqa: E402
from engine.scheduler import RequestFailed, SchedulerOptions  # noqa: E402
from engine.serving.api import ServerOptions  # noqa: E402
from engine.serving.app import Service  # noqa: E402
from engine.serving.ray_serve import APP_NAME, Wuerstchen, application, build_app, config_options  # noqa: E402

DEMO = {"preset": "tiny", "prior": None, "decoder": None, "variant": None, "bundle": None, "backend": None,
        "build_engines": False, "device": "cpu", "dtype": "fp32", "quantize": None, "default_preset": "tiny"}
REQUEST = {"prompt": "a fox in the snow", "size": "128x128", "prior_steps": 12, "decoder_steps": 2}
TIMEOUT = 60  # seconds a client waits for one answer
CONFIG = Path(__file__).resolve().parents[1] / "engine" / "serving" / "ray_serve.yaml"


def test_the_health_check_raises_when_the_scheduler_stopped():
    pipe = WuerstchenPipeline.from_preset("tiny", device="cpu")
    replica = SimpleNamespace(service=Service(pipe, ServerOptions(warmup=None)))
    check_health = Wuerstchen.func_or_class.check_health
    check_health(replica)  # healthy: returns

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    pipe.scheduler.runner.step = broken
    with pytest.raises(RequestFailed):
        pipe.submit("doomed", height=128, width=128, prior_num_inference_steps=1, num_inference_steps=1).result()
    with pytest.raises(RuntimeError, match="the scheduler stopped after a device error"):
        check_health(replica)


class RayMetric:
    """A stand-in for `ray.serve.metrics`' Counter and Gauge: what it is given lands in `published`, checked
    as Ray checks it (declared tag keys, ASCII values, a positive increment)."""

    published: list[tuple] = []
    refuse: set[str] = set()  # names whose records raise

    def __init__(self, name, description="", tag_keys=None):
        self.name, self.tag_keys = name, tag_keys

    def _record(self, kind, value, tags):
        assert set(tags or {}) == set(self.tag_keys or ()) and all(v.isascii() for v in (tags or {}).values())
        if self.name in self.refuse:
            raise ValueError(f"{self.name}: refused")
        self.published.append((kind, self.name, tags, value))

    def set(self, value, tags=None):
        self._record("set", value, tags)

    def inc(self, value=1.0, tags=None):
        assert value > 0
        self._record("inc", value, tags)


@pytest.fixture
def ray_metrics(monkeypatch):
    from engine.serving import ray_serve

    monkeypatch.setattr(ray_serve, "ray_metrics", SimpleNamespace(Counter=RayMetric, Gauge=RayMetric))
    monkeypatch.setattr(RayMetric, "published", [])
    monkeypatch.setattr(RayMetric, "refuse", set())
    return RayMetric


def test_a_replica_republishes_its_metrics_through_rays(ray_metrics):
    """Gauges are set; counters advance by what they gained since the last publish; a histogram's buckets are
    gauges of their cumulative counts, the empty ones too, so that Ray holds what the replica's /metrics holds."""
    from engine.serving.ray_serve import RayMetrics
    from engine.serving.telemetry import Metrics

    pipe = WuerstchenPipeline.from_preset("tiny", device="cpu")
    pipe("a lighthouse", height=128, width=128, prior_num_inference_steps=1, num_inference_steps=1)
    metrics = Metrics(pipe.stats, lambda: True)
    exported = RayMetrics(metrics.registry)
    metrics.responses.labels("/v1/images/generations", "200").inc()
    metrics.latency.labels("/v1/images/generations").observe(0.3)
    exported.publish()
    published = ray_metrics.published
    assert ("set", "wuerstchen_queued_requests", None, 0.0) in published
    assert ("set", "wuerstchen_ready", None, 1.0) in published
    assert ("inc", "wuerstchen_http_responses", {"endpoint": "/v1/images/generations", "code": "200"}, 1.0) \
        in published
    buckets = {tags["le"]: value for kind, name, tags, value in published
               if name == "wuerstchen_request_latency_seconds_bucket"}
    assert buckets == {"0.1": 0.0, "0.25": 0.0} | {le: 1.0 for le in ("0.5", "1.0", "2.0", "4.0", "8.0", "16.0",
                                                                       "32.0", "64.0", "128.0", "256.0", "+Inf")}
    assert not any(name.endswith("_created") for _, name, _, _ in published)
    assert {tags["group"] for kind, name, tags, _ in published if name == "wuerstchen_step_seconds"} >= {
        "prior 3x3, guided", "decoder 32x32"}  # Ray takes ASCII only

    published.clear()
    metrics.responses.labels("/v1/images/generations", "200").inc(2)
    exported.publish()
    assert [(kind, value) for kind, name, _, value in published if name == "wuerstchen_http_responses"] == [
        ("inc", 2.0)]


def test_a_counter_that_restarts_counts_again_and_a_refused_metric_leaves_the_others(ray_metrics, caplog,
                                                                                      monkeypatch):
    # A replica made in this process (an earlier test) turned the server's log to JSON lines of its own.
    monkeypatch.setattr(logging.getLogger("wuerstchen.server"), "propagate", True)
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from engine.serving.ray_serve import RayMetrics

    class Collector:
        value = 5.0

        def collect(self):
            yield GaugeMetricFamily("wuerstchen_refused_gauge", "refused by Ray", value=1.0)
            yield CounterMetricFamily("wuerstchen_things", "things counted", value=self.value)

    collector, registry = Collector(), CollectorRegistry()
    registry.register(collector)
    exported = RayMetrics(registry)
    ray_metrics.refuse.add("wuerstchen_refused_gauge")
    for value in (5.0, 7.0, 3.0):  # 3 after 7: the counter restarted, and counted 3 since
        collector.value = value
        exported.publish()
    assert [(kind, value) for kind, name, _, value in ray_metrics.published] == [("inc", 5.0), ("inc", 2.0),
                                                                                  ("inc", 3.0)]
    refusals = [r for r in caplog.records if r.getMessage() == "metric not published"]
    assert len(refusals) == 1 and refusals[0].fields["metric"] == "wuerstchen_refused_gauge"


def test_the_config_file_is_a_valid_deployment_of_build_app():
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application_config,) = config.applications
    assert application_config.import_path == "engine.serving.ray_serve:build_app"
    (deployment,) = application_config.deployments
    assert deployment.name == "Wuerstchen" and deployment.ray_actor_options.num_gpus == 1
    assert deployment.max_ongoing_requests == 64 and deployment.autoscaling_config["max_replicas"] == 8
    flags, server, scheduler = config_options(application_config.args)
    assert flags | {"decoder": None} == DEMO | {"preset": None, "backend": "torch-fast", "device": "auto",
                                               "dtype": "auto"}
    assert flags["decoder"] == "warp-ai/wuerstchen" and server.max_images == 4 and server.warmup is not None
    assert (scheduler.max_queued, scheduler.max_in_flight) == (256, 64)
    assert isinstance(build_app(application_config.args), serve.Application)  # each replica loads its own model
    with pytest.raises(WuerstchenError, match="args colour: unknown"):
        build_app({"preset": "tiny", "colour": "red"})
    with pytest.raises(WuerstchenError, match="--device cuda:1: Ray gives each replica a GPU of its own"):
        build_app({"device": "cuda:1"})


def test_a_replica_of_the_demo_model_makes_its_small_images_as_wuerstchen_serve_does():
    replica_class = Wuerstchen.func_or_class
    replica = replica_class.__new__(replica_class)
    defined = replica_class.__mro__[1]  # ours: serve.ingress wraps it in a subclass whose __init__ is async
    defined.__init__(replica, DEMO, ServerOptions(warmup=None), SchedulerOptions())
    try:
        assert (replica.service.options.recipe.height, replica.service.options.recipe.width) == (256, 256)
    finally:
        replica.service.pipe.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replica_names() -> set[str]:
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")}


def _process_id(name: str) -> int:
    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda replica: os.getpid()), timeout=TIMEOUT)


def _running() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["Wuerstchen"]
    return deployment.replica_states.get("RUNNING", 0)


def _seed(answer: httpx.Response) -> int:
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    return int(image.text["seed"])


def test_two_replicas_survive_one_killed_mid_load():
    start = time.monotonic()
    port = _free_port()
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init installs its own, for good
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)  # logical GPUs on a CPU
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = application(DEMO, ServerOptions(warmup=Recipe(128, 128, prior_steps=1, decoder_steps=1)),
                          SchedulerOptions(), replicas=2, gpus_per_replica=1, cpus_per_replica=0.5)
        serve.run(app, name=APP_NAME, route_prefix="/")
        deployed = time.monotonic()
        url = f"http://127.0.0.1:{port}"
        replicas = _replica_names()
        process_ids = {name: _process_id(name) for name in replicas}
        assert len(set(process_ids.values())) == 2

        # (request id, seed, status or exception, seconds, answered at, echoed id, the PNG's seed)
        answers, lock, stop = [], threading.Lock(), threading.Event()

        def client(number: int) -> None:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
                sent = 0
                while not stop.is_set():
                    request_id, seed = f"client{number}-{sent}", number * 1000 + sent
                    sent += 1
                    began = time.monotonic()
                    try:
                        response = http.post("/v1/images/generations", json=REQUEST | {"seed": seed},
                                             headers={"X-Request-Id": request_id})
                        outcome, echoed = response.status_code, response.headers.get("x-request-id")
                        served = _seed(response) if outcome == 200 else None
                    except Exception as error:  # noqa: BLE001 — a timeout is a finding of the test
                        outcome, echoed, served = type(error).__name__, None, None
                    with lock:
                        answers.append((request_id, seed, outcome, time.monotonic() - began, time.monotonic(),
                                        echoed, served))

        clients = [threading.Thread(target=client, args=(number,)) for number in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(3)  # both replicas busy
        victim = sorted(replicas)[0]
        os.kill(process_ids[victim], signal.SIGKILL)
        killed = time.monotonic()
        time.sleep(3)
        stop.set()
        for thread in clients:
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in clients)

        # Every request was answered once, none by a client's timeout; every success is its own request's.
        assert len({answer[0] for answer in answers}) == len(answers)
        assert all(isinstance(outcome, int) for _, _, outcome, *_ in answers), answers
        served = [a for a in answers if a[2] == 200]
        failed = [a for a in answers if a[2] != 200]
        assert len(served) >= 8 and failed, answers
        assert all(echoed == request_id and png_seed == seed for request_id, seed, _, _, _, echoed, png_seed in served)
        # The victim's requests failed at once with a 5xx, not after a timeout.
        assert all(500 <= outcome < 600 and seconds < 15 and at - killed < 15
                   for _, _, outcome, seconds, at, *_ in failed), failed

        # Ray replaces the replica, and the service is whole again.
        # (Serve's status may count the dead replica as running for a moment: wait for the new one's actor too.)
        deadline = time.monotonic() + max(45, 3 * (deployed - start))  # a replica's start, on a slow machine
        while len(names := _replica_names()) < 2 or victim in names or _running() < 2:
            assert time.monotonic() < deadline, serve.status().applications[APP_NAME]
            time.sleep(0.5)
        assert len(names - replicas) == 1
        replaced = time.monotonic()
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            later = [http.post("/v1/images/generations", json=REQUEST | {"seed": seed}) for seed in range(4)]
        assert [response.status_code for response in later] == [200] * 4
        assert [_seed(response) for response in later] == [0, 1, 2, 3]
        print(f"ray test: {time.monotonic() - start:.1f} s (deployed after {deployed - start:.1f} s, replaced "
              f"{replaced - killed:.1f} s after the kill); {len(served)} served, {len(failed)} failed at the kill")
    finally:
        serve.shutdown()
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)
