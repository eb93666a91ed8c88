"""The HTTP service: one pipeline and its step scheduler behind FastAPI, on uvicorn.

Thin by design. A handler checks the body (`engine.serving.api`), submits one request to the pipeline's
scheduler, maps what the engine raises to an HTTP status, and encodes or streams the result; the queue, the
requests in flight and the measured step times live in the scheduler below it.

    POST /v1/images/generations   OpenAI's Images API (prompt, n, size "WxH", response_format b64_json), with
                                  this engine's fields: negative_prompt, seed, prior_steps, decoder_steps,
                                  prior_guidance, decoder_guidance, deadline, priority, deterministic
    POST /generate                one image/png with its settings in its text chunks; with "stream": true,
                                  text/event-stream progress events, then the image
    GET  /v1/models               the model served
    GET  /health                  liveness: 503 once the scheduler stopped (a sticky device error) or stalled
    GET  /ready                   200 once the weights are loaded and the warm-up request has run
    GET  /metrics                 Prometheus: queue, in flight, batch occupancy, step times, latencies, refusals

Every request gets one id (the caller's X-Request-Id when it sends a sane one): it comes back in the
X-Request-Id header and in error bodies, and every structured log record (JSON lines) of the request
carries it, beside the scheduler's own request id. A client that disconnects cancels its request, which
frees its slot at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from engine.errors import WuerstchenError
from engine.pipeline import WuerstchenPipeline
from engine.scheduler import Refused, SchedulerOptions
from engine.serving.api import (
    ApiError,
    Body,
    GenerateRequest,
    ImagesRequest,
    Job,
    ServerOptions,
    check,
    failure,
    invalid,
    parse_body,
    png_files,
    refusal,
    server_timing,
)
from engine.serving.telemetry import REQUEST_ID, Metrics, log_event, log_json_lines

CLIENT_GONE = 499  # nginx's status for a client that closed the connection first: counted, never sent


class Service:
    """One pipeline behind the API: its warm-up (ready after it), its liveness, and its requests."""

    def __init__(self, pipe: WuerstchenPipeline, options: ServerOptions | None = None):
        self.pipe, self.options = pipe, options or ServerOptions()
        self.ready = threading.Event()
        self.warm_up_error: str | None = None
        self._warming: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ticks_seen = (-1, time.monotonic())  # the scheduler's tick count when last seen, and when

    @classmethod
    def load(cls, runtime, scheduler: SchedulerOptions, options: ServerOptions) -> Service:
        pipe = WuerstchenPipeline.load(runtime)
        pipe.set_scheduler_options(scheduler)
        return cls(pipe, options)

    @property
    def runtime(self):
        return self.pipe.runtime

    def warm_up(self) -> None:
        """Run the warm-up requests, then be ready: one request, or where the backend captures steps as CUDA
        graphs (torch-fast), one at each of the scheduler's batch sizes (as many images as the size: one batch
        of that size at every step, however the worker's ticks fall), so that no client's request pays for a
        capture at the warm-up's size."""
        recipe = self.options.warmup
        start = time.perf_counter()
        if recipe is not None:
            scheduler = self.pipe.scheduler
            rounds = scheduler.policy.buckets if scheduler.runner.captures else (1,)
            try:
                for size in rounds:
                    self.pipe.submit("warm-up", **recipe.call(images_per_prompt=size), output_type="pt",
                                     seed=0).result()
            except Exception as error:
                self.warm_up_error = f"{type(error).__name__}: {error}"
                log_event("warm-up failed", logging.ERROR, error=self.warm_up_error)
                raise
        self.ready.set()
        log_event("ready", seconds=round(time.perf_counter() - start, 3), model=self.runtime.describe())

    def start_warm_up(self) -> None:
        """`warm_up` on a thread of its own, once: the server answers /health meanwhile, and /ready after."""
        with self._lock:
            if self._warming is None and not self.ready.is_set():
                self._warming = threading.Thread(target=self._warm_up_quietly, name="wuerstchen-warm-up",
                                                 daemon=True)
                self._warming.start()

    def _warm_up_quietly(self) -> None:
        try:
            self.warm_up()
        except Exception:  # noqa: BLE001 — logged by warm_up; /ready reports it
            pass

    def problem(self) -> str | None:
        """Why the service is not alive, or None: its scheduler stopped after a sticky device error, or ran no
        step for `stall_seconds` while holding requests (between two looks; each /health call is one)."""
        stats = self.pipe.stats()
        if not stats["healthy"]:
            return "the scheduler stopped after a device error: restart the process"
        waiting = stats["in_flight"] + stats["queued"]
        now = time.monotonic()
        with self._lock:
            ticks, since = self._ticks_seen
            if not waiting or stats["ticks"] != ticks:
                self._ticks_seen = (stats["ticks"], now)
                return None
        if now - since > self.options.stall_seconds:
            return f"the scheduler's loop has stalled: no step for {now - since:.0f} s with {waiting} requests held"
        return None

    def submit(self, job: Job):
        """Queue a checked request; a refusal or a field the pipeline refuses is an `ApiError`."""
        try:
            future = self.pipe.submit(**job.submit_args())
        except Refused as error:
            log_event("refused", reason=error.reason, message=str(error))
            raise refusal(error) from None
        except WuerstchenError as error:
            raise invalid(error) from None
        recipe = job.recipe
        log_event("submitted", engine_request_id=future.request_id, size=f"{recipe.width}x{recipe.height}",
                  images=job.images, seed=job.seed, prior_steps=recipe.prior_evaluations,
                  decoder_steps=recipe.decoder_steps, deadline=job.deadline, priority=job.priority)
        return future


def _request_id(given: str | None) -> str:
    """The caller's id when it is a sane one (Ray's proxy and most gateways send one), else a new one."""
    if given and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", given):
        return given
    return uuid.uuid4().hex


class RequestContext:
    """ASGI middleware around the app: the request id, the API key, one log record and one metric per
    response, and a JSON 500 for anything unexpected (with the id, like every other answer)."""

    OPEN = ("/health", "/ready")  # probes carry no data and no key

    def __init__(self, app, options: ServerOptions, metrics: Metrics):
        self.app, self.options, self.metrics = app, options, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        request_id = _request_id(headers.get("x-request-id"))
        token = REQUEST_ID.set(request_id)
        status, started, start = CLIENT_GONE, False, time.perf_counter()

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if self.options.echo_request_id:
                    MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        try:
            key = self.options.api_key
            if key and scope["path"] not in self.OPEN and \
                    not secrets.compare_digest(headers.get("authorization", "").encode("utf-8", "surrogatepass"),
                                               f"Bearer {key}".encode("utf-8", "surrogatepass")):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as error:  # noqa: BLE001 — the answer to a bug is a 500 with the request id, and a log
            log_event("unexpected error", logging.ERROR, exc_info=True, error=f"{type(error).__name__}: {error}")
            if not started:
                await error_response(ApiError(500, "internal error: see the server's log for this request id",
                                              code="internal_error"))(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            seconds = time.perf_counter() - start
            self.metrics.responses.labels(endpoint, str(status)).inc()
            log_event("response", method=scope["method"], path=scope["path"], status=status,
                      seconds=round(seconds, 4))
            REQUEST_ID.reset(token)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(REQUEST_ID.get()), status_code=error.status, headers=error.headers())


def _routing_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such path, a method the path does not take) in the API's error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    response = error_response(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code))
    response.headers.update(error.headers or {})  # Allow, for a 405
    return response


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body has {declared} bytes: expected at most {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body passes {limit} bytes, the limit", code="body_too_large")
    return bytes(body)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_unless_disconnected(request: Request, future):
    """The request's output; if the client leaves first (or the handler is cancelled, as Ray Serve does on a
    disconnect), the request is cancelled, and its slot freed at the scheduler's next step."""
    result = asyncio.wrap_future(future)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not result.done():
            result.cancel()  # cancels the request too (asyncio passes it on to the concurrent future)
            log_event("cancelled", engine_request_id=future.request_id, reason="the client disconnected")
    if result.cancelled():
        raise ClientGone
    return result.result()


async def submitted(service: Service, job: Job):
    """`service.submit(job)` off the event loop (a request's noise is drawn as it is queued: for a large one,
    seconds that every other connection would wait); a handler cancelled meanwhile cancels the request once it
    is queued."""
    submission = asyncio.ensure_future(asyncio.to_thread(service.submit, job))
    try:
        return await asyncio.shield(submission)
    except asyncio.CancelledError:
        submission.add_done_callback(lambda done: done.exception() is None and done.result().cancel())
        raise


async def _output(request: Request, service: Service, job: Job):
    future = await submitted(service, job)
    try:
        output = await result_unless_disconnected(request, future)
    except ClientGone:
        raise
    except Exception as error:  # noqa: BLE001 — the request's failure becomes its answer
        answer = failure(error)
        log_event("failed", engine_request_id=future.request_id, status=answer.status, error=answer.message)
        raise answer from None
    log_event("finished", engine_request_id=future.request_id, compute_s=round(output.compute_s, 4))
    return output


def _seed(body: Body) -> int:
    """The body's seed, or a random one (its first image's; written into each PNG, as `wuerstchen generate`
    does)."""
    return secrets.randbelow(2**31) if body.seed is None else body.seed


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _progress_events(service: Service, job: Job, future):
    """Server-sent events of one request: `progress` after each denoising step (stage, step, steps, and the
    fraction of all its steps done), then `image` (the PNG, base64) or `error` (the JSON error's body). If the
    client leaves, the stream is cancelled, and the request with it."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()

    def post(update) -> None:  # on the scheduler's thread: never raise into it
        try:
            loop.call_soon_threadsafe(updates.put_nowait, update)
        except RuntimeError:
            pass  # the event loop has closed: nobody is listening

    future.add_progress_callback(lambda stage, step, steps: post((stage, step, steps)))
    future.add_done_callback(lambda _: post(None))
    done = 0
    try:
        yield _event("progress", {"stage": "queued", "step": 0, "steps": 0, "fraction": 0.0})
        while (update := await updates.get()) is not None:
            done += 1
            stage, step, steps = update
            yield _event("progress", {"stage": stage, "step": step, "steps": steps,
                                      "fraction": round(done / job.steps, 4)})
        try:
            output = future.result()
        except Exception as error:  # noqa: BLE001 — the request's failure is its last event
            yield _event("error", failure(error).body(REQUEST_ID.get()))
            return
        png = (await asyncio.to_thread(png_files, output.images, job, service.runtime))[0]
        yield _event("image", {"b64_json": base64.b64encode(png).decode(), "seed": job.seed,
                               "request_id": REQUEST_ID.get()})
    finally:
        if future.cancel():
            log_event("cancelled", engine_request_id=future.request_id, reason="the client disconnected")


async def _in_thread(function, timeout: float = 10.0):
    """`function()` off the event loop: a scheduler that holds its lock must not stop the server answering."""
    return await asyncio.wait_for(asyncio.to_thread(function), timeout)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over `service` (see the module's docstring). Its lifespan starts the warm-up."""
    options = service.options
    metrics = Metrics(service.pipe.stats, service.ready.is_set)

    @asynccontextmanager
    async def lifespan(app):
        service.start_warm_up()
        yield

    app = FastAPI(title="Würstchen", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.metrics = metrics  # for a host that republishes them (Ray Serve's replicas)
    app.add_middleware(RequestContext, options=options, metrics=metrics)
    app.add_exception_handler(ApiError, lambda request, error: error_response(error))
    app.add_exception_handler(HTTPException, _routing_error)

    @app.post("/v1/images/generations")
    async def images(request: Request):
        start = time.perf_counter()
        body = parse_body(ImagesRequest, await read_body(request, options.max_body_bytes))
        if body.response_format != "b64_json":
            raise ApiError(400, f"response_format={body.response_format!r}: expected 'b64_json' (images come back in "
                                "the response; 'url' would need an object store to upload them to and serve them "
                                "from)", param="response_format", code="invalid_value")
        if body.output_format != "png":
            raise ApiError(400, f"output_format={body.output_format!r}: expected 'png'", param="output_format",
                           code="invalid_value")
        job = check(body, body.n, _seed(body), options, service.pipe.config)
        try:
            output = await _output(request, service, job)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        files = await asyncio.to_thread(png_files, output.images, job, service.runtime)
        metrics.served("/v1/images/generations", time.perf_counter() - start, output, job.images)
        data = [{"b64_json": base64.b64encode(file).decode()} for file in files]
        return JSONResponse({"created": int(time.time()), "data": data},
                            headers={"Server-Timing": server_timing(output)})

    @app.post("/generate")
    async def generate(request: Request):
        start = time.perf_counter()
        body = parse_body(GenerateRequest, await read_body(request, options.max_body_bytes))
        job = check(body, 1, _seed(body), options, service.pipe.config)
        headers = {"X-Seed": str(job.seed)}
        if body.stream:
            future = await submitted(service, job)
            return StreamingResponse(_progress_events(service, job, future), media_type="text/event-stream",
                                     headers=headers | {"Cache-Control": "no-cache"})
        try:
            output = await _output(request, service, job)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        png = (await asyncio.to_thread(png_files, output.images, job, service.runtime))[0]
        metrics.served("/generate", time.perf_counter() - start, output, 1)
        return Response(png, media_type="image/png", headers=headers | {"Server-Timing": server_timing(output)})

    @app.get("/v1/models")
    async def models():
        runtime = service.runtime
        return {"object": "list", "data": [{
            "id": runtime.source.preset or "wuerstchen-v2", "object": "model", "created": 0,
            "owned_by": "wuerstchen-engine", "description": runtime.describe(), "device": str(runtime.device)}]}

    @app.get("/health")
    async def health():
        try:
            problem = await _in_thread(service.problem)
        except asyncio.TimeoutError:
            problem = "the scheduler does not answer: its lock is held"
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.ready.is_set():
            return {"status": "ready", "model": service.runtime.describe()}
        reason = f"the warm-up failed: {service.warm_up_error}" if service.warm_up_error else "warming up"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(await _in_thread(metrics.text), media_type=CONTENT_TYPE_LATEST)

    return app


# --- running --------------------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 takes a free one. Connections wait in its backlog until the
    server starts accepting them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise WuerstchenError(f"--host {host} --port {port}: cannot listen there: {error.strerror or error}") \
            from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _uvicorn(app) -> uvicorn.Server:
    # Our middleware logs every response as JSON lines: no access log of uvicorn's own.
    return uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=30))


class BackgroundServer:
    """Serve an app from a thread of this process: `with BackgroundServer(app) as url: ...` (127.0.0.1 and a
    free port unless given). For tests, notebooks and programs that embed the service."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.socket = bind(host, port)
        self.url = url(self.socket)
        self.server = _uvicorn(app)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                        name="wuerstchen-server")

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self.socket.close()


def options_from_args(args) -> tuple[ServerOptions, SchedulerOptions]:
    """`wuerstchen serve`'s flags as the server's and the scheduler's options."""
    server = ServerOptions(max_images=args.max_images, api_key=args.api_key,
                           **({"warmup": None} if args.no_warmup else {}))
    return server, SchedulerOptions(max_queued=args.max_queued, max_in_flight=args.max_in_flight)


def for_model(options: ServerOptions, runtime) -> ServerOptions:
    """`options` for the model `runtime` serves: for the demo model, requests that give no size and the
    warm-up are `DEMO_SIZE`², as `generate`'s images are."""
    from engine.cli import DEMO_SIZE

    if not runtime.source.demo:
        return options
    size = {"height": DEMO_SIZE, "width": DEMO_SIZE}
    return replace(options, recipe=replace(options.recipe, **size),
                   warmup=options.warmup and replace(options.warmup, **size))


def serve_command(args, runtime) -> int:
    """`wuerstchen serve` in this process: load, listen, warm up, serve until interrupted."""
    from engine.cli import DEMO_NOTICE

    log_json_lines()
    server_options, scheduler_options = options_from_args(args)
    server_options = for_model(server_options, runtime)
    sock = bind(args.host, args.port)  # before loading: a port in use is an error in a second, not a minute
    if runtime.source.demo:
        print(f"wuerstchen: {DEMO_NOTICE}", file=sys.stderr)
    service = Service.load(runtime, scheduler_options, server_options)
    log_event("listening", url=url(sock), model=runtime.describe(), authenticated=bool(args.api_key))
    try:
        _uvicorn(create_app(service)).run(sockets=[sock])
    finally:
        sock.close()
        service.pipe.close()
    return 0
