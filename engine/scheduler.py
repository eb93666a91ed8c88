"""The step scheduler: many requests on one device, batched step by step.

Requests enter a bounded queue from any thread (`submit`). One worker thread does all the device's work, one
tick at a time: it admits queued requests while the in-flight set has room (a count and a memory budget),
drops the cancelled and the late, asks the policy (`engine.policy.plan`) for the next group and batch size,
runs it (`engine.runner.Runner`), and moves each request on (`engine.requests.RequestState.advance`).
A newcomer joins at the next tick: there is no batching window. The worker starts with the first request
and ends when it has been idle for a while.

A request with a step callback (diffusers' `callback_on_step_end`) has it called on this thread after each of
its steps, with its own rows, once the batch's step has run and been timed: the others in flight wait for the
callback, and nothing more. A callback that raises fails its request alone.

Faults stay with their request. Each step writes a per-row finiteness flag, read one tick later (no host
sync inside a step): a request whose rows turn non-finite fails alone. An exception in a batched step is
retried by halving the batch until the request that raises is alone, and only it fails. A sticky device
error (an illegal address, a device-side assert) fails every request in flight with a retriable error and
marks the scheduler unhealthy: it refuses new requests, and the process should be restarted.

Refusals are typed and immediate (`QueueFull`, `DeadlineInfeasible`, `SchedulerUnhealthy`); a request that
misses its deadline while running fails with `DeadlineExceeded`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from dataclasses import dataclass, field

import torch

from engine.errors import WuerstchenError
from engine.policy import CostModel, PolicyOptions, Stage, Tick, batch_size, plan
from engine.requests import WORKER, RequestFuture, RequestState


class Refused(RuntimeError):
    """A request the scheduler will not take now. `reason` is a short word for metrics and logs; `retry_after`
    (seconds) is when trying again may succeed, or None."""

    reason = "refused"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Refused):
    """The queue is at its limit (an HTTP server answers 429 with Retry-After)."""

    reason = "queue_full"


class DeadlineInfeasible(Refused):
    """The measured step times say the request cannot finish before its deadline (HTTP 504)."""

    reason = "deadline"


class SchedulerUnhealthy(Refused):
    """A sticky device error stopped the scheduler; retry on another process (HTTP 503)."""

    reason = "unhealthy"


class DeadlineExceeded(RuntimeError):
    """The request was still running when its deadline passed; its slot was freed (HTTP 504)."""

    reason = "deadline_exceeded"


class RequestFailed(RuntimeError):
    """The request failed for a reason of the device, not of its input: retry it, on another process if the
    scheduler is unhealthy."""

    reason = "failed"


@dataclass(frozen=True)
class SchedulerOptions:
    """`max_queued`: requests waiting for a slot before submit refuses; `max_in_flight`: requests holding
    device memory at once; `memory_budget`: bytes of request state (noise, latents, images) in flight on the
    device, and `queue_memory_budget`: bytes of it waiting in the queue (a request's noise is drawn on the
    host as it is submitted), each "auto" (half of what the device, or the host, has available when the
    scheduler starts) or None for no limit; `policy`: see `engine.policy.PolicyOptions` (batches are padded to
    its buckets only where the backend captures steps as CUDA graphs); `idle_exit_s`: how long the worker waits
    for work before it ends."""

    max_queued: int = 256
    max_in_flight: int = 64
    memory_budget: int | str | None = "auto"
    queue_memory_budget: int | str | None = "auto"
    policy: PolicyOptions = field(default_factory=PolicyOptions)
    idle_exit_s: float = 2.0

    def __post_init__(self):
        for name in ("max_queued", "max_in_flight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WuerstchenError(f"{name}={value!r}: expected a positive integer")
        for name in ("memory_budget", "queue_memory_budget"):
            value = getattr(self, name)
            if value not in (None, "auto") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise WuerstchenError(f"{name}={value!r}: expected a positive number of bytes, 'auto' or None")

    def budgets(self, device: torch.device) -> tuple[int | None, int | None]:
        """The in-flight and queue budgets in bytes, "auto" resolved now: half of what is available."""
        from engine.memory import available_bytes

        def resolved(value, where: torch.device) -> int | None:
            return available_bytes(where) // 2 if value == "auto" else value

        return resolved(self.memory_budget, device), resolved(self.queue_memory_budget, torch.device("cpu"))


# Messages of device errors after which a CUDA context cannot be trusted again.
STICKY_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure", "CUDA error: an illegal",
                 "misaligned address")


LOG = logging.getLogger(__name__)

# Request ids, unique in the process: captured steps shared between pipelines remember whose conditioning they
# hold by them.
_REQUEST_IDS = itertools.count(1)


def is_sticky(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(text in str(error) for text in STICKY_ERRORS)


class Scheduler:
    """See the module's docstring. `runner` computes the stages on its `device` (`engine.runner.Runner`, or a
    fake in tests); `finish(state)` turns a finished request into its result; `clock` is the scheduler's time
    (seconds)."""

    def __init__(self, runner, finish: Callable[[RequestState], object], options: SchedulerOptions | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.runner, self.finish = runner, finish
        self.options = options or SchedulerOptions()
        # Padding buys a captured graph; an eager runner runs each size as well as another.
        self.policy = dataclasses.replace(self.options.policy, pad=self.options.policy.pad and runner.captures)
        self.clock, self.device = clock, runner.device
        self.costs = CostModel()
        self._lock = threading.Condition()
        self._queue: deque[RequestState] = deque()
        self._in_flight: dict[int, RequestState] = {}
        self._worker: threading.Thread | None = None
        self._timings: deque[tuple] = deque()  # (key, batch, start, end) of ticks not yet in the cost model
        self._budget, self._queue_budget = self.options.budgets(self.device)
        self._held_bytes = 0  # what the requests in flight hold (their `nbytes`)
        self._queued_bytes = 0  # what the queued requests hold, on the host
        self._queued_deadlines: list[tuple[float, int, RequestState]] = []  # a heap; entries may be stale
        self._tick = 0
        self._unhealthy: str | None = None
        self._counters = {"ticks": 0, "batched_ticks": 0, "rows": 0, "padding": 0, "completed": 0, "failed": 0,
                          "cancelled": 0, "refused": {}}

    # --- from any thread -----------------------------------------------------------------------------

    @staticmethod
    def new_id() -> int:
        return next(_REQUEST_IDS)

    @property
    def healthy(self) -> bool:
        return self._unhealthy is None

    def submit(self, state: RequestState, start: bool = True) -> RequestFuture:
        """Queue a request made with `new_id()`; refusals raise at once. `start=False` leaves the ticks to the
        caller (`step`), for tests that drive the scheduler tick by tick."""
        with self._lock:
            if self._unhealthy is not None:
                self._refuse(SchedulerUnhealthy(f"the scheduler stopped after a device error ({self._unhealthy}): "
                                                "retry on another process"))
            for budget, where in ((self._budget, "in flight"), (self._queue_budget, "queued")):
                if budget is not None and state.nbytes > budget:
                    self._refuse(Refused(f"the request holds about {state.nbytes / 2**20:.0f} MiB {where}, more than "
                                         f"the scheduler's memory budget of {budget / 2**20:.0f} MiB for it"))
            if len(self._queue) >= self.options.max_queued or self._queue_over(state.nbytes):
                self._queue = self._without_cancelled(self._queue)
            if len(self._queue) >= self.options.max_queued:
                self._refuse(QueueFull(f"the queue holds {len(self._queue)} requests, its limit: retry later",
                                       retry_after=max(1.0, self._backlog_seconds() / 2)))
            if self._queue_over(state.nbytes):
                self._refuse(QueueFull(f"the queue holds {self._queued_bytes / 2**20:.0f} MiB of requests, and this "
                                       f"one would pass its memory budget of {self._queue_budget / 2**20:.0f} MiB: "
                                       "retry later", retry_after=max(1.0, self._backlog_seconds() / 2)))
            state.submitted = state.stage_started = self.clock()
            if state.timeout is not None:
                state.deadline = state.submitted + state.timeout
            if math.isfinite(state.deadline):
                estimate = self._estimate(state) + self._backlog_seconds()
                if state.submitted + estimate > state.deadline:
                    self._refuse(DeadlineInfeasible(
                        f"the request needs about {estimate:.2f} s with the work ahead of it, and its deadline is in "
                        f"{state.deadline - state.submitted:.2f} s"))
            state.future.scheduler = self
            self._queue.append(state)
            self._queued_bytes += state.nbytes
            if math.isfinite(state.deadline):
                heapq.heappush(self._queued_deadlines, (state.deadline, state.request_id, state))
            if start:
                self._ensure_worker()
            self._lock.notify_all()
        return state.future

    def cancel(self, request_id: int) -> bool:
        """Cancel a queued or running request: its future is cancelled now, its slot freed at the next tick."""
        with self._lock:
            for state in (*self._queue, *self._in_flight.values()):
                if state.request_id == request_id:
                    return state.future.cancel()
        return False

    def stats(self) -> dict:
        """Queue length, requests in flight, the ticks the longest-waiting one has waited, batch occupancy and
        padding waste of the batched steps, the measured tick times by group and batch size (ms), and the
        counters."""
        with self._lock:
            counters = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._counters.items()}
            batched_rows = counters["rows"] + counters["padding"]
            waiting = [self._tick - state.ready_tick for state in self._in_flight.values()]
            return {
                "queued": len(self._queue), "in_flight": len(self._in_flight), "healthy": self.healthy,
                "queued_bytes": self._queued_bytes, "in_flight_bytes": self._held_bytes,
                "oldest_wait_ticks": max(waiting, default=0),
                "batch_occupancy": counters["rows"] / max(counters["batched_ticks"], 1),
                "padding_waste": counters["padding"] / batched_rows if batched_rows else 0.0,
                "tick_ms": self.costs.table(), **counters,
            }

    def close(self) -> None:
        """Stop the worker once it has finished what is in flight and queued."""
        worker = self._worker
        if worker is not None:
            worker.join()

    # --- the worker ----------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="wuerstchen-scheduler", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        WORKER.scheduler = self
        try:
            while True:
                with self._lock:
                    if not self._queue and not self._in_flight:
                        self._lock.wait(self.options.idle_exit_s)
                        if not self._queue and not self._in_flight:
                            self._worker = None
                            return
                try:
                    self.step()
                except Exception as error:  # noqa: BLE001 — the worker must outlive what escapes a tick
                    self._escaped(error)
        finally:
            with self._lock:  # an exit by anything else: the next submit starts a new worker
                if self._worker is threading.current_thread():
                    self._worker = None

    def _escaped(self, error: Exception) -> None:
        """An exception outside the guarded work of a tick: a sticky device error met where the device's work
        is read back (a timing event, the finiteness flags) stops the scheduler; anything else is a defect
        here, and fails the requests in flight, which cannot be trusted to be consistent, while the worker
        goes on with the queue."""
        if is_sticky(error):
            self._stop(error)
            return
        LOG.error("a scheduler tick failed", exc_info=error)
        with self._lock:
            doomed = list(self._in_flight.values())
        for state in doomed:
            self._fail(state, RequestFailed(f"the scheduler failed while the request ran "
                                            f"({type(error).__name__}: {error}): retry it"))

    def step(self) -> bool:
        """One tick: admit, drop what is cancelled or late, run the policy's choice, check the last tick's
        finiteness flags, move requests on. False when there was nothing to run."""
        with self._lock:
            self._tick += 1
            now = self.clock()
            self._fail_late_in_queue(now)
            self._admit()
            for state in list(self._in_flight.values()):
                if state.future.cancelled():
                    self._drop(state, "cancelled")
                elif now > state.deadline:
                    self._fail(state, DeadlineExceeded(f"the request missed its deadline by {now - state.deadline:.2f} "
                                                       f"s in its {state.stage.name.lower()} stage"))
            states = list(self._in_flight.values())
        self._record_timings()
        # The flags of the last tick are read after this tick's work is queued, so reading them never leaves
        # the device idle.
        pending = [(state, state.finite) for state in states if state.finite is not None]
        for state, _ in pending:
            state.finite = None
        # Only a deadline makes the remaining work matter to the policy.
        candidates = (state.candidate(self._estimate(state) if math.isfinite(state.deadline) else 0.0)
                      for state in states)
        tick = plan(candidates, self._tick, self.policy)
        chosen = [] if tick is None else [self._in_flight[request_id] for request_id in tick.request_ids]
        if tick is not None:
            for state in chosen:
                state.ticks.append((tick.key, tick.batch))
            timing = self._timer()
            self._run(tick, chosen)
            self._timings.append((tick.key, tick.batch, timing, self._timer()))
            self._account(tick)
            if tick.key.stage.batched:
                self._end_steps(chosen)
        self._check_finite(pending)
        now = self.clock()
        for state in chosen:
            if state.request_id in self._in_flight:
                self._moved_on(state, now)
        return tick is not None

    def _timer(self):
        """A point in time of the device's work: a recorded CUDA event on a GPU, the scheduler's clock on a CPU."""
        if self.device.type != "cuda":
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _record_timings(self) -> None:
        """Feed the cost model the ticks whose device work has finished (on a GPU, without waiting for any)."""
        while self._timings:
            key, batch, start, end = self._timings[0]
            if isinstance(end, float):
                seconds = end - start
            elif end.query():
                seconds = start.elapsed_time(end) / 1e3
            else:
                return
            self._timings.popleft()
            self.costs.record(key, batch, seconds)

    def _queue_over(self, nbytes: int) -> bool:
        """Whether queueing `nbytes` more would pass the queue's budget (one request is always taken)."""
        return self._queue_budget is not None and bool(self._queue) and \
            self._queued_bytes + nbytes > self._queue_budget

    def _without_cancelled(self, queue: deque[RequestState]) -> deque[RequestState]:
        """`queue` less its cancelled requests (under the lock): a client gone never holds a queued slot."""
        kept = deque(state for state in queue if not state.future.cancelled())
        self._counters["cancelled"] += len(queue) - len(kept)
        self._queued_bytes = sum(state.nbytes for state in kept)
        return kept

    def _fail_late_in_queue(self, now: float) -> None:
        """Fail the queued requests past their deadline and free their slots (under the lock); a heap of the
        queued deadlines keeps a tick's look O(log n)."""
        late = []
        while self._queued_deadlines and self._queued_deadlines[0][0] < now:
            _, _, state = heapq.heappop(self._queued_deadlines)
            if not state.future.done() and state.request_id not in self._in_flight:  # still queued
                late.append(state)
        if not late:
            return
        gone = {state.request_id for state in late}
        self._queue = deque(state for state in self._queue if state.request_id not in gone)
        self._queued_bytes = sum(state.nbytes for state in self._queue)
        self._counters["failed"] += len(late)
        for state in late:
            self._settle(state, error=DeadlineExceeded(f"the request missed its deadline by "
                                                       f"{now - state.deadline:.2f} s while queued"))

    def _admit(self) -> None:
        """Queued requests into the in-flight set while it has room; their tensors move to the device now."""
        budget = self._budget
        while self._queue and len(self._in_flight) < self.options.max_in_flight:
            state = self._queue[0]
            if budget is not None and self._in_flight and self._held_bytes + state.nbytes > budget:
                break
            self._queue.popleft()
            self._queued_bytes -= state.nbytes
            if state.future.cancelled():
                self._counters["cancelled"] += 1
                continue
            try:
                self._to_device(state)
            except Exception as error:  # noqa: BLE001 — out of memory, say: the request's own failure
                if is_sticky(error):  # back in the queue, where `_stop` fails it with the rest
                    self._queue.appendleft(state)
                    self._queued_bytes += state.nbytes
                    raise
                self._counters["failed"] += 1
                self._settle(state, error=error)
                continue
            state.ready_tick = self._tick
            self._in_flight[state.request_id] = state
            self._held_bytes += state.nbytes

    def _to_device(self, state: RequestState) -> None:
        for name in ("prior_denoising", "decoder_denoising"):
            denoising = getattr(state, name)
            if denoising is not None:
                setattr(state, name, denoising.to(self.device))
        if state.image_embeddings is not None:
            state.image_embeddings = state.image_embeddings.to(self.device)

    def _run(self, tick: Tick, states: list[RequestState]) -> None:
        """Run a tick's work; on an exception, halve the batch until the request that raises is alone."""
        try:
            if tick.key.stage.batched:
                self.runner.step(tick.key, states, tick.batch)
            else:
                work = {Stage.TEXT: self.runner.text, Stage.HANDOFF: self.runner.handoff,
                        Stage.DECODE: self.runner.decode}[tick.key.stage]
                for state in list(states):
                    try:
                        work(state)
                    except Exception as error:  # noqa: BLE001 — one request's failure is its own
                        if is_sticky(error):
                            raise
                        self._fail(state, error)
        except Exception as error:  # noqa: BLE001 — isolate the request that raises
            if is_sticky(error):
                self._stop(error)
            elif len(states) == 1:
                self._fail(states[0], error)
            else:
                half = len(states) // 2
                for part in (states[:half], states[half:]):
                    rows = sum(state.rows for state in part)
                    self._run(Tick(tick.key, tuple(s.request_id for s in part), rows,
                                   batch_size(rows, tick.key, self.policy)), part)

    def _end_steps(self, states: list[RequestState]) -> None:
        """The step callbacks of the requests that have one and are still in flight, each on its own rows."""
        for state in states:
            if state.request_id not in self._in_flight or state.denoising.callback is None:
                continue
            try:
                self.runner.end_step(state)
            except Exception as error:  # noqa: BLE001 — a callback's failure is its request's own
                if is_sticky(error):
                    self._stop(error)
                    return
                self._fail(state, error)

    def _check_finite(self, pending: list[tuple[RequestState, torch.Tensor]]) -> None:
        """Fail the requests whose rows a step turned non-finite: each alone, the others untouched."""
        for state, flags in pending:
            if state.request_id in self._in_flight and not bool(flags.all()):
                stage = "prior" if state.stage in (Stage.PRIOR, Stage.HANDOFF) else "decoder"
                self._fail(state, WuerstchenError(
                    f"the {stage} produced non-finite values for this request: check the weights (a NaN in a "
                    "weight file?) and the guidance scale"))

    def _moved_on(self, state: RequestState, now: float) -> None:
        denoising = state.denoising
        stage, step = state.stage, state.step
        done = state.advance(self._tick, now)
        if denoising is not None:
            try:
                state.future.report(stage.name.lower(), step + 1, denoising.steps)
            except Exception as error:  # noqa: BLE001 — a progress callback's failure is its request's own
                self._fail(state, error)
                return
        if not done:
            return
        with self._lock:
            self._release(state)
            self._counters["completed"] += 1
        # Its share of the device's time: the measured time of every tick it ran in; the rest of its latency
        # was queueing.
        state.compute_seconds = sum(self.costs.tick_seconds(key, batch) for key, batch in state.ticks)
        try:
            result = self.finish(state)
        except Exception as error:  # noqa: BLE001 — a failure to finish is the request's own
            self._settle(state, error=error)
            return
        self._settle(state, result=result)

    def _account(self, tick: Tick) -> None:
        with self._lock:
            self._counters["ticks"] += 1
            if tick.key.stage.batched:
                self._counters["batched_ticks"] += 1
                self._counters["rows"] += tick.rows
                self._counters["padding"] += tick.padding

    def _estimate(self, state: RequestState) -> float:
        """Seconds of work the request still needs, from the measured tick times at its own batch size."""
        return sum(steps * self.costs.tick_seconds(state.key_for(stage), state.rows)
                   for stage, steps in state.steps_left().items())

    def _backlog_seconds(self) -> float:
        """The work ahead of a new request, shared among the rows a batched tick has run on average."""
        occupancy = self._counters["rows"] / max(self._counters["batched_ticks"], 1)
        ahead = sum(self._estimate(state) for state in (*self._queue, *self._in_flight.values()))
        return ahead / max(occupancy, 1.0)

    def _refuse(self, refusal: Refused) -> None:
        refused = self._counters["refused"]
        refused[refusal.reason] = refused.get(refusal.reason, 0) + 1
        raise refusal

    def _release(self, state: RequestState) -> bool:
        """Take a request out of the in-flight set (under the lock); False when it was not there."""
        if self._in_flight.pop(state.request_id, None) is None:
            return False
        self._held_bytes -= state.nbytes
        return True

    def _drop(self, state: RequestState, counter: str) -> None:
        self._release(state)
        self._counters[counter] += 1

    def _fail(self, state: RequestState, error: BaseException) -> None:
        with self._lock:
            if not self._release(state):
                return
            self._counters["failed"] += 1
        self._settle(state, error=error)

    def _stop(self, error: BaseException) -> None:
        """A sticky device error: everything in flight and queued fails with a retriable error."""
        with self._lock:
            self._unhealthy = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            doomed = [*self._in_flight.values(), *self._queue]
            self._in_flight.clear()
            self._queue.clear()
            self._queued_deadlines.clear()
            self._held_bytes = self._queued_bytes = 0
            self._counters["failed"] += len(doomed)
        for state in doomed:
            self._settle(state, error=RequestFailed(f"the device failed while the request ran ({self._unhealthy}): "
                                                    "retry it on another process"))

    @staticmethod
    def _settle(state: RequestState, result=None, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                state.future.set_exception(error)
            else:
                state.future.set_result(result)
        except InvalidStateError:
            pass  # cancelled by its caller meanwhile: nobody waits for it
