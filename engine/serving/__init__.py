"""`wuerstchen serve`: the HTTP service over the step scheduler, in one process or on Ray Serve.

The command is registered as an entry point of `wuerstchen.commands` (setup.py), so this module is imported
by every `wuerstchen` invocation: it imports nothing heavy. The service is `engine.serving.app` (FastAPI on
uvicorn, the `serve` extra), with what it accepts and answers in `engine.serving.api` and its logs and metrics
in `engine.serving.telemetry`; its scale-out is `engine.serving.ray_serve` (Ray Serve, the `ray` extra).
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os

from engine.errors import WuerstchenError

API_KEY_VARIABLE = "WUERSTCHEN_API_KEY"
SERVICE_PACKAGES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic")


def add_parser(commands) -> None:
    """`wuerstchen serve`, registered as an entry point of `wuerstchen.commands` (setup.py)."""
    from engine.cli import model_flags

    serve = commands.add_parser(
        "serve", help="serve images over HTTP (OpenAI's Images API, PNG, progress events, metrics)",
        description="Serve images over HTTP: POST /v1/images/generations (OpenAI's Images API), POST /generate "
                    "(PNG, or progress events), GET /health, /ready, /metrics. Without --prior/--decoder, serves "
                    "the tiny demo model with random weights.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; any other needs --api-key or --insecure)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: a free one)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE), metavar="KEY",
                       help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE})")
    serve.add_argument("--insecure", action="store_true", help="listen on a non-local address without an API key")
    model_flags(serve, default_preset="tiny")
    serve.add_argument("--max-queued", type=int, default=256, metavar="N",
                       help="requests waiting for a slot before the server answers 429 (default 256)")
    serve.add_argument("--max-in-flight", type=int, default=64, metavar="N",
                       help="requests on the device at once (default 64)")
    serve.add_argument("--max-images", type=int, default=4, metavar="N", help="largest n of one request (default 4)")
    serve.add_argument("--no-warmup", action="store_true",
                       help="ready without the warm-up requests (which capture the CUDA graphs on torch-fast)")
    ray = serve.add_argument_group("Ray Serve (--ray): one replica per GPU, the same HTTP API through Ray's proxy")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve (RAY_ADDRESS=auto joins a cluster)")
    ray.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas, one per GPU (default 1)")
    ray.add_argument("--max-replicas", type=int, metavar="N",
                     help="autoscale from --replicas to N replicas on the requests each one holds")
    serve.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Check the flags, then serve until interrupted."""
    from engine.cli import resolve_flags

    for name in ("max_queued", "max_in_flight", "max_images", "replicas"):
        if getattr(args, name) < 1:
            raise WuerstchenError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if not args.ray and (args.replicas != 1 or args.max_replicas is not None):
        raise WuerstchenError("--replicas and --max-replicas apply to --ray: one process serves one scheduler")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise WuerstchenError(f"--max-replicas {args.max_replicas}: expected at least --replicas ({args.replicas})")
    if not 0 <= args.port < 65536:
        raise WuerstchenError(f"--port {args.port}: expected a port number from 0 to 65535")
    check_bind(args.host, args.api_key, args.insecure)
    if args.ray:
        ray_serve = _optional("engine.serving.ray_serve", ("ray", *SERVICE_PACKAGES), "Ray Serve", "ray")
        return ray_serve.serve_command(args)
    app = _optional("engine.serving.app", SERVICE_PACKAGES, "FastAPI, uvicorn and prometheus_client", "serve")
    runtime = resolve_flags(args)
    return app.serve_command(args, runtime)


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """A non-local address serves whoever reaches it: refuse it without an API key or an explicit --insecure."""
    if is_loopback(host) or api_key or insecure:
        return
    raise WuerstchenError(f"--host {host} accepts connections from other machines: pass --api-key KEY (or set "
                          f"{API_KEY_VARIABLE}) to require it from clients, or --insecure to serve without one")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _optional(module: str, packages: tuple[str, ...], what: str, extra: str):
    """Import `module`, or a one-line error naming what to install when one of `packages` is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in packages:
            raise
        raise WuerstchenError(f"serving needs {what} ({missing} is not installed): pip install "
                              f"\"wuerstchen-engine[{extra}]\" (pip install -e \".[{extra}]\" in a checkout)") from None
