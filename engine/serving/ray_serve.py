"""Scale-out on Ray Serve: one replica per GPU, each holding a pipeline and its step scheduler behind the same
HTTP API (`engine.serving.app`), with Ray's proxy in front.

- A replica takes up to `max_ongoing_requests` (64) requests at once: the scheduler batches their steps, so a
  replica needs many more than Ray's default of 5, which would starve the batches.
- Beyond that, each Ray router queues up to `max_queued_requests` (256) and answers 429 with Retry-After
  beyond them; the scheduler's own queue answers 429 the same way.
- `check_health` fails once the scheduler has stopped after a sticky device error, or ran no step for a minute
  while holding requests: Ray then replaces the replica. A replica whose process dies fails the requests it
  held with 5xx at once, and is replaced the same way.
- A replica is ready when its constructor returns, after the warm-up request (graphs captured on torch-fast).
- Through Ray's proxy, `/metrics` reaches one replica per scrape; each replica therefore also republishes its
  metrics through Ray's (`RayMetrics`, at each health check), which every node's metrics agent exports with
  the replica's tags for a Prometheus that scrapes Ray.

`wuerstchen serve --ray` deploys it from the command line; `engine/serving/ray_serve.yaml` deploys it with
`serve deploy`, through `build_app`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import NoReturn

import ray
from ray import serve
from ray.serve import metrics as ray_metrics
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from engine.errors import WuerstchenError
from engine.scheduler import SchedulerOptions
from engine.serving import API_KEY_VARIABLE
from engine.serving.api import ServerOptions
from engine.serving.app import Service, create_app, for_model, options_from_args
from engine.serving.telemetry import log_event, log_json_lines

APP_NAME = "wuerstchen"
MODEL_FLAGS = ("preset", "prior", "decoder", "variant", "bundle", "backend", "build_engines", "device", "dtype",
               "quantize", "default_preset")
# A replica's scheduler batches up to 8 requests' steps in each stage, and newcomers join at the next step: it
# needs many requests at once, where Ray's default lets 5 in.
MAX_ONGOING_REQUESTS = 64
MAX_QUEUED_REQUESTS = 256
TARGET_ONGOING_REQUESTS = 16  # autoscaling: enough requests in a replica for full batches in both stages


@serve.deployment(
    name="Wuerstchen",
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_queued_requests=MAX_QUEUED_REQUESTS,
    backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
)
@serve.ingress()
class Wuerstchen:
    """A replica: the pipeline that `flags` (`wuerstchen serve`'s model flags) resolve to on this replica's
    device, its scheduler, and the HTTP API over them."""

    def __init__(self, flags: dict, server: ServerOptions, scheduler: SchedulerOptions):
        from engine.cli import resolve_flags

        log_json_lines()
        # Resolved here, not on the driver: "auto" means this replica's GPU, which the driver may not have.
        runtime = resolve_flags(argparse.Namespace(**flags))
        # The key from the command line, else from the replica's environment (a config file's runtime_env). No
        # X-Request-Id of our own: Ray's proxy sets it on every answer (the id it passed to this replica).
        server = replace(for_model(server, runtime), api_key=server.api_key or os.environ.get(API_KEY_VARIABLE),
                         echo_request_id=False)
        self.service = Service.load(runtime, scheduler, server)
        self.service.warm_up()  # Ray routes requests to a replica only once its constructor has returned

    def __serve_build_asgi_app__(self):
        app = create_app(self.service)
        self.metrics = RayMetrics(app.state.metrics.registry)
        return app

    def check_health(self) -> None:
        """Called by Ray every `health_check_period_s`: publish the metrics, then raise if the service cannot serve."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.publish()  # logs what it cannot publish: no reason to replace the replica
        problem = self.service.problem()
        if problem is not None:
            log_event("unhealthy", logging.ERROR, reason=problem)
            raise RuntimeError(problem)


class RayMetrics:
    """A replica's Prometheus registry republished through Ray Serve's metrics, which Ray exports from each
    node with the application's, deployment's and replica's tags. A counter becomes a Ray counter (exported
    with `_total` appended) that advances by what it gained since the last `publish` (all of its value after
    a reset); a gauge stays a gauge; a histogram's cumulative series (each bucket by `le`, the sum, the count)
    become gauges holding their value, so that every bucket exists from the start, as `histogram_quantile`
    needs, and `rate()` reads them as the counters they are. A family that fails to publish is logged once
    and skipped; the others are published."""

    def __init__(self, registry):
        self.registry = registry
        self._metrics: dict[str, object] = {}  # sample name → Ray metric
        self._published: dict[tuple, float] = {}  # (counter, labels) → its value at the last publish
        self._failed: set[str] = set()  # families whose failure was logged

    def publish(self) -> None:
        try:
            families = list(self.registry.collect())
        except Exception as error:
            self._log_once("(collecting)", error)
            return
        for family in families:
            try:
                self._publish(family)
            except Exception as error:
                self._log_once(family.name, error)

    def _log_once(self, name: str, error: Exception) -> None:
        if name not in self._failed:
            self._failed.add(name)
            log_event("metric not published", logging.WARNING, metric=name, error=f"{type(error).__name__}: {error}")

    def _publish(self, family) -> None:
        counter = family.type == "counter"
        for sample in family.samples:
            if sample.name.endswith("_created"):  # a counter's creation time: nothing to add up
                continue
            name = sample.name.removesuffix("_total") if counter else sample.name
            if name not in self._metrics:
                kind = ray_metrics.Counter if counter else ray_metrics.Gauge
                self._metrics[name] = kind(name, description=family.documentation,
                                           tag_keys=tuple(sorted(sample.labels)) or None)
            metric = self._metrics[name]
            tags = {key: _ascii(value) for key, value in sample.labels.items()} or None
            if not counter:
                metric.set(sample.value, tags=tags)
                continue
            key = (name, tuple(sorted(sample.labels.items())))
            last = self._published.get(key, 0.0)
            gained = sample.value - last if sample.value >= last else sample.value
            if gained > 0:
                metric.inc(gained, tags=tags)
            self._published[key] = sample.value


def _ascii(text: str) -> str:
    """A tag value as Ray takes it, in ASCII: "decoder 32×32" becomes "decoder 32x32"."""
    return text.replace("×", "x").encode("ascii", "replace").decode("ascii")


def application(flags: dict, server: ServerOptions, scheduler: SchedulerOptions, *, replicas: int = 1,
                max_replicas: int | None = None, gpus_per_replica: float = 0, cpus_per_replica: float = 1):
    """The Ray Serve application: `replicas` replicas (autoscaled up to `max_replicas` when given), each on
    `gpus_per_replica` GPUs (Ray's logical GPUs work too: each replica sees its own CUDA_VISIBLE_DEVICES)."""
    options = {"ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}}
    if max_replicas is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=replicas, max_replicas=max_replicas, target_ongoing_requests=TARGET_ONGOING_REQUESTS)
    return Wuerstchen.options(**options).bind(flags, server, scheduler)


def build_app(args: dict):
    """The application of a Ray Serve config file (`import_path: engine.serving.ray_serve:build_app`), whose
    `args` `config_options` reads. Replicas, GPUs and autoscaling are the config file's `deployments` section."""
    return Wuerstchen.bind(*config_options(args))


def config_options(args: dict) -> tuple[dict, ServerOptions, SchedulerOptions]:
    """The model flags, server and scheduler options of a config file's `args`: the model flags of `wuerstchen
    serve` by their Python names (preset, prior, decoder, variant, bundle, backend, device, dtype, quantize), and
    optionally max_images, max_queued, max_in_flight and warmup (true or false)."""
    limits = ("max_images", "max_queued", "max_in_flight", "warmup")
    unknown = sorted(set(args) - {*MODEL_FLAGS, *limits})
    if unknown:
        raise WuerstchenError(f"args {', '.join(unknown)}: unknown; expected any of {', '.join(MODEL_FLAGS[:-1])}, "
                              f"{', '.join(limits)}")
    flags = {"preset": None, "prior": None, "decoder": None, "variant": None, "bundle": None, "backend": None,
             "build_engines": False, "device": "auto", "dtype": "auto", "quantize": None, "default_preset": "tiny"}
    flags.update((name, args[name]) for name in MODEL_FLAGS if name in args)
    _check_device(flags["device"])
    server = ServerOptions(max_images=int(args.get("max_images", 4)),
                           **({} if args.get("warmup", True) else {"warmup": None}))
    scheduler = SchedulerOptions(max_queued=int(args.get("max_queued", 256)),
                                 max_in_flight=int(args.get("max_in_flight", 64)))
    return flags, server, scheduler


def serve_command(args: argparse.Namespace) -> NoReturn:
    """`wuerstchen serve --ray`: start Ray (or join the cluster that RAY_ADDRESS names), deploy, serve until
    interrupted (then the application is deleted). Ray's proxy listens on --host and --port."""
    _check_device(args.device)
    flags = {name: getattr(args, name, None) for name in MODEL_FLAGS}
    server, scheduler = options_from_args(args)
    ray.init()
    gpus = 1 if _wants_gpus(args.device, ray.cluster_resources().get("GPU", 0)) else 0
    serve.start(http_options={"host": args.host, "port": args.port})
    app = application(flags, server, scheduler, replicas=args.replicas, max_replicas=args.max_replicas,
                      gpus_per_replica=gpus)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop` and systemd stop it as Ctrl-C does
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")  # returns once every replica has loaded and warmed up
        replicas = f"{args.replicas} to {args.max_replicas}" if args.max_replicas else str(args.replicas)
        print(f"wuerstchen: serving on http://{args.host}:{args.port} with Ray Serve ({replicas} replicas, {gpus} "
              "GPU each); Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            signal.pause()
    finally:
        serve.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_device(device: str) -> None:
    if device.startswith("cuda:"):
        raise WuerstchenError(f"--device {device}: Ray gives each replica a GPU of its own, which it sees as cuda: "
                              "pass --device cuda (or auto)")


def _wants_gpus(device: str, cluster_gpus: float) -> bool:
    """Whether each replica takes a GPU: on --device cuda, and on auto where the cluster has GPUs."""
    if device.startswith("cuda"):
        if not cluster_gpus:
            raise WuerstchenError(f"--device {device}: the Ray cluster has no GPUs")
        return True
    return device == "auto" and cluster_gpus > 0
