"""The scheduler's logic with a fake runner and a simulated clock: groups never mix, batches come in captured
sizes, nothing starves, cancellation frees its slot within a tick, refusals are typed, nothing leaks."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import WuerstchenError
from engine.policy import Candidate, CostModel, GroupKey, PolicyOptions, Stage, Tick, batch_size, plan
from engine.requests import Denoising, RequestFuture, RequestState
from engine.schedule import DenoisingSchedule
from engine.scheduler import (
    DeadlineExceeded,
    DeadlineInfeasible,
    QueueFull,
    Refused,
    RequestFailed,
    Scheduler,
    SchedulerOptions,
    SchedulerUnhealthy,
)

SHAPES = [(3, 3), (3, 6), (6, 3)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Records every tick's work and advances the simulated clock; can be told to raise for a request."""

    device = torch.device("cpu")
    captures = True

    def __init__(self, clock: Clock, step_seconds: float = 0.01):
        self.clock, self.step_seconds = clock, step_seconds
        self.ticks: list[tuple[GroupKey, list[int], int]] = []
        self.raise_for: set[int] = set()
        self.sticky = False

    def _work(self, key, states, batch):
        self.ticks.append((key, [s.request_id for s in states], batch))
        self.clock.now += self.step_seconds
        if self.sticky:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any(s.request_id in self.raise_for for s in states):
            raise ValueError("a planted failure")

    def text(self, state):
        self._work(state.key, [state], state.rows)

    def handoff(self, state):
        self._work(state.key, [state], state.rows)

    def decode(self, state):
        self._work(state.key, [state], state.rows)
        state.output = state.request_id

    def step(self, key, states, batch):
        self._work(key, states, batch)


def _denoising(steps: int, shape: tuple[int, int], guidance: float) -> Denoising:
    schedule = DenoisingSchedule(torch.zeros(steps), torch.zeros(steps, 4))
    return Denoising(schedule, torch.zeros(1), (torch.zeros(1),) * steps, guidance, shape)


def _request(scheduler: Scheduler, rows=1, prior_steps=3, decoder_steps=2, shape=(3, 3), guidance=4.0, timeout=None,
             interactive=True, deterministic=False) -> RequestState:
    request_id = scheduler.new_id()
    return RequestState(
        request_id=request_id, kind="images", rows=rows, future=RequestFuture(request_id), output_type="pt",
        prior_denoising=_denoising(prior_steps, shape, guidance),
        decoder_denoising=_denoising(decoder_steps, (shape[0] * 10, shape[1] * 10), 0.0),
        timeout=timeout, interactive=interactive, deterministic=deterministic,
    )


def _scheduler(options: SchedulerOptions | None = None, step_seconds: float = 0.01):
    clock = Clock()
    runner = FakeRunner(clock, step_seconds)
    return Scheduler(runner, lambda state: state.output, options, clock), runner, clock


def _drain(scheduler: Scheduler, limit: int = 100_000) -> int:
    ticks = 0
    while scheduler.step():
        ticks += 1
        assert ticks < limit
    return ticks


# --- the policy alone -----------------------------------------------------------------------------------


def test_batch_sizes_are_captured_buckets_pinned_sizes_or_their_own():
    options = PolicyOptions(buckets=(1, 2, 4, 8), deterministic_batch=4)
    prior = GroupKey(Stage.PRIOR, (3, 3), True)
    assert [batch_size(rows, prior, options) for rows in (1, 2, 3, 5, 8, 11)] == [1, 2, 4, 8, 8, 11]
    pinned = GroupKey(Stage.PRIOR, (3, 3), True, deterministic=True)
    assert [batch_size(rows, pinned, options) for rows in (1, 3, 4, 6)] == [4, 4, 4, 6]
    assert batch_size(3, prior, PolicyOptions(pad=False)) == 3
    for bad, message in ((dict(buckets=()), "buckets=\\(\\): expected positive batch sizes"),
                         (dict(mode="fastest"), "mode='fastest': expected one of latency, throughput"),
                         (dict(per_tick=0), "per_tick=0: expected a positive integer")):
        with pytest.raises(WuerstchenError, match=message):
            PolicyOptions(**bad)


def test_the_policy_finishes_later_stages_first_unless_someone_waits_too_long():
    prior, decoder = GroupKey(Stage.PRIOR, (3, 3), True), GroupKey(Stage.DECODER, (32, 32), False)
    options = PolicyOptions(max_wait_ticks=5)
    candidates = [Candidate(1, prior, 1, ready_tick=10), Candidate(2, decoder, 1, ready_tick=11)]
    assert plan(candidates, 12, options).key == decoder  # shortest remaining first
    assert plan(candidates, 15, options).key == prior  # aged: waiting since tick 10
    urgent = [Candidate(1, prior, 1, ready_tick=10, deadline=1.0), Candidate(2, decoder, 1, ready_tick=11)]
    assert plan(urgent, 12, options).key == prior  # earliest deadline first
    batch = [Candidate(1, prior, 1, ready_tick=10, interactive=False), Candidate(2, decoder, 1, 11)]
    assert plan(batch, 12, options).key == decoder and plan(batch[:1], 12, options).key == prior


def test_throughput_mode_takes_the_fullest_batch():
    a, b = GroupKey(Stage.PRIOR, (3, 3), True), GroupKey(Stage.DECODER, (32, 32), False)
    candidates = [Candidate(1, a, 1, 0), Candidate(2, a, 1, 0), Candidate(3, a, 1, 0), Candidate(4, b, 1, 0)]
    tick = plan(candidates, 1, PolicyOptions(mode="throughput"))
    assert tick == Tick(a, (1, 2, 3), 3, 4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(SHAPES), st.booleans(), st.booleans(), st.integers(1, 5),
                          st.integers(0, 30), st.floats(0.1, 100) | st.just(math.inf), st.booleans()),
                min_size=1, max_size=40),
       st.sampled_from([(1, 2, 4, 8), (2, 3), (16,)]), st.booleans(), st.sampled_from(["latency", "throughput"]))
def test_a_tick_never_mixes_groups_and_runs_at_a_captured_size(rows, buckets, pad, mode):
    options = PolicyOptions(buckets=buckets, pad=pad, mode=mode, deterministic_batch=4)
    candidates = []
    for i, (stage, shape, guided, deterministic, size, ready, deadline, interactive) in enumerate(rows):
        key = GroupKey(Stage(stage), shape, guided, deterministic) if Stage(stage).batched else GroupKey(Stage(stage))
        candidates.append(Candidate(i, key, size, ready, deadline, 0.0, interactive))
    tick = plan(candidates, 31, options)
    by_id = {c.request_id: c for c in candidates}
    assert tick is not None and len(set(tick.request_ids)) == len(tick.request_ids) > 0
    assert {by_id[i].key for i in tick.request_ids} == {tick.key}
    assert tick.rows == sum(by_id[i].rows for i in tick.request_ids)
    if tick.key.stage.batched:
        capacity = 4 if tick.key.deterministic else max(buckets)
        assert tick.rows <= capacity or len(tick.request_ids) == 1  # only a lone request may exceed a batch
        if tick.key.deterministic:
            assert tick.batch == max(4, tick.rows)
        elif not pad or tick.rows > max(buckets):
            assert tick.batch == tick.rows
        else:
            assert tick.batch == min(b for b in buckets if b >= tick.rows)  # the smallest captured size


# --- the scheduler with a fake runner -------------------------------------------------------------------


def test_requests_at_different_steps_share_batches_and_all_finish():
    scheduler, runner, _ = _scheduler()
    futures = [scheduler.submit(_request(scheduler, prior_steps=steps), start=False) for steps in (3, 5, 4)]
    scheduler.step()  # text of all three (per_tick 4)
    later = scheduler.submit(_request(scheduler), start=False)  # joins at the next tick, no window
    _drain(scheduler)
    assert [f.result() for f in futures + [later]] == [f.request_id for f in futures + [later]]
    prior_batches = [ids for key, ids, _ in runner.ticks if key.stage is Stage.PRIOR]
    assert max(len(ids) for ids in prior_batches) == 4  # the latecomer shares the earlier ones' batches
    steps = {f.request_id: 0 for f in futures + [later]}
    for ids in prior_batches:
        for request_id in ids:
            steps[request_id] += 1
    assert list(steps.values()) == [3, 5, 4, 3]  # each ran exactly its own number of steps
    stats = scheduler.stats()
    assert stats["completed"] == 4 and stats["in_flight"] == 0 and stats["queued"] == 0
    assert stats["batch_occupancy"] > 1 and "prior 3×3, guided" in stats["tick_ms"]


def test_nothing_starves_under_a_stream_of_newcomers():
    """New requests keep arriving, each preferred by the tie-break; still the longest-waiting ready request
    runs within max_wait_ticks plus one tick per group that may be starving with it."""
    options = SchedulerOptions(policy=PolicyOptions(max_wait_ticks=4, per_tick=64))
    scheduler, _, _ = _scheduler(options)
    first = scheduler.submit(_request(scheduler, shape=(6, 3), prior_steps=2), start=False)
    oldest = []
    for i in range(60):
        scheduler.submit(_request(scheduler, shape=SHAPES[i % 2], prior_steps=3), start=False)
        scheduler.step()
        oldest.append(scheduler.stats()["oldest_wait_ticks"])
    while scheduler.step():
        oldest.append(scheduler.stats()["oldest_wait_ticks"])
    assert first.done() and first.result() == first.request_id
    groups = 3 + 2 * len(SHAPES)  # text, handoff, decode, and a prior and a decoder group per shape
    assert max(oldest) <= options.policy.max_wait_ticks + groups


def test_cancellation_frees_the_slot_at_the_next_tick():
    scheduler, runner, _ = _scheduler()
    future = scheduler.submit(_request(scheduler, prior_steps=50), start=False)
    for _ in range(3):
        scheduler.step()
    assert scheduler.stats()["in_flight"] == 1 and future.cancel() and future.cancelled()
    ticks = len(runner.ticks)
    scheduler.step()
    assert scheduler.stats()["in_flight"] == 0 and scheduler.stats()["cancelled"] == 1
    assert len(runner.ticks) == ticks  # nothing of it ran again


def test_a_cancelled_or_late_queued_request_frees_its_queued_slot_at_once():
    scheduler, _, clock = _scheduler(SchedulerOptions(max_queued=1, max_in_flight=1))
    scheduler.submit(_request(scheduler, prior_steps=50), start=False)
    scheduler.step()  # in flight; the next waits in the queue
    queued = scheduler.submit(_request(scheduler), start=False)
    assert scheduler.stats()["queued"] == 1 and queued.cancel()
    late = scheduler.submit(_request(scheduler, timeout=1.0), start=False)  # the cancelled one's slot, at once
    assert scheduler.stats()["queued"] == 1 and not late.done()
    clock.now += 2.0
    scheduler.step()  # still queued behind the long request, and past its deadline
    with pytest.raises(DeadlineExceeded, match=r"the request missed its deadline by 1\.\d\d s while queued"):
        late.result(timeout=0)
    stats = scheduler.stats()
    assert stats["queued"] == 0 and stats["cancelled"] == 1 and stats["failed"] == 1


def test_ten_thousand_random_cancels_leak_nothing():
    scheduler, _, _ = _scheduler(SchedulerOptions(max_queued=20_000, max_in_flight=64))
    rng = random.Random(0)
    futures = []
    for i in range(10_000):
        futures.append(scheduler.submit(_request(scheduler, prior_steps=rng.randint(1, 4), decoder_steps=1,
                                                 shape=rng.choice(SHAPES)), start=False))
        if rng.random() < 0.5:
            rng.choice(futures).cancel()
        if i % 7 == 0:
            scheduler.step()
    for future in futures:
        if rng.random() < 0.3:
            future.cancel()
    _drain(scheduler)
    stats = scheduler.stats()
    assert stats["queued"] == 0 and stats["in_flight"] == 0
    assert all(f.done() for f in futures)
    finished = sum(not f.cancelled() for f in futures)
    assert stats["completed"] == finished and stats["completed"] + stats["cancelled"] <= len(futures)
    assert all(f.result() == f.request_id for f in futures if not f.cancelled())


def test_refusals_are_typed_and_immediate():
    scheduler, _, clock = _scheduler(SchedulerOptions(max_queued=2))
    for _ in range(2):
        scheduler.submit(_request(scheduler), start=False)
    with pytest.raises(QueueFull, match="the queue holds 2 requests, its limit: retry later") as refused:
        scheduler.submit(_request(scheduler), start=False)
    assert refused.value.retry_after >= 1.0 and refused.value.reason == "queue_full"
    _drain(scheduler)  # measures the ticks
    with pytest.raises(DeadlineInfeasible, match=r"the request needs about 0\.\d+ s .* its deadline is in 0\.01 s"):
        scheduler.submit(_request(scheduler, timeout=0.01), start=False)
    assert scheduler.stats()["refused"] == {"queue_full": 1, "deadline": 1}


def test_memory_budgets_bound_what_is_queued_and_what_is_in_flight():
    # A fake request holds 28 bytes: 1 + 3 prior draws and 1 + 2 decoder draws, fp32.
    scheduler, _, _ = _scheduler(SchedulerOptions(memory_budget=60, queue_memory_budget=60))
    first, second = (scheduler.submit(_request(scheduler), start=False) for _ in range(2))
    with pytest.raises(QueueFull, match=r"the queue holds 0 MiB of requests, and this one would pass its memory "
                                        r"budget of 0 MiB: retry later"):
        scheduler.submit(_request(scheduler), start=False)
    with pytest.raises(Refused, match=r"the request holds about 0 MiB in flight, more than the scheduler.s memory"):
        scheduler.submit(_request(scheduler, prior_steps=20), start=False)  # 96 bytes: never fits
    scheduler.step()  # both admitted: 56 bytes in flight
    assert scheduler.stats()["queued_bytes"] == 0 and scheduler.stats()["in_flight_bytes"] == 56
    third = scheduler.submit(_request(scheduler), start=False)
    scheduler.step()
    assert scheduler.stats()["queued"] == 1  # 84 bytes would pass the in-flight budget: it waits
    _drain(scheduler)
    assert [f.result(timeout=0) for f in (first, second, third)] == [f.request_id for f in (first, second, third)]
    assert scheduler.stats()["in_flight_bytes"] == 0 == scheduler.stats()["queued_bytes"]
    for name, value in (("memory_budget", "lots"), ("queue_memory_budget", 0), ("memory_budget", True)):
        with pytest.raises(WuerstchenError, match=rf"^{name}={value!r}: expected a positive number of bytes, 'auto'"):
            SchedulerOptions(**{name: value})


def test_a_request_that_misses_its_deadline_fails_and_frees_its_slot():
    scheduler, _, clock = _scheduler(step_seconds=0.5)
    late = scheduler.submit(_request(scheduler, prior_steps=10, timeout=1.2), start=False)
    other = scheduler.submit(_request(scheduler, prior_steps=10), start=False)
    _drain(scheduler)
    with pytest.raises(DeadlineExceeded, match=r"the request missed its deadline by \d\.\d\d s in its prior stage"):
        late.result()
    assert other.result() == other.request_id


def test_a_raising_request_fails_alone_by_bisection():
    scheduler, runner, _ = _scheduler()
    states = [_request(scheduler) for _ in range(6)]
    runner.raise_for = {states[4].request_id}
    futures = [scheduler.submit(state, start=False) for state in states]
    _drain(scheduler)
    with pytest.raises(ValueError, match="a planted failure"):
        futures[4].result()
    assert [f.result() for i, f in enumerate(futures) if i != 4] == [s.request_id for i, s in enumerate(states)
                                                                     if i != 4]
    assert scheduler.stats()["failed"] == 1


def test_a_sticky_device_error_fails_everything_with_a_retriable_error():
    scheduler, runner, _ = _scheduler()
    futures = [scheduler.submit(_request(scheduler), start=False) for _ in range(3)]
    runner.sticky = True
    scheduler.step()
    for future in futures:
        with pytest.raises(RequestFailed, match=r"the device failed while the request ran \(CUDA error: an illegal "
                                                r"memory access was encountered\): retry it on another process"):
            future.result()
    assert not scheduler.healthy and scheduler.stats()["healthy"] is False
    with pytest.raises(SchedulerUnhealthy, match="the scheduler stopped after a device error"):
        scheduler.submit(_request(scheduler), start=False)


def test_a_raising_progress_callback_fails_its_request_alone():
    scheduler, _, _ = _scheduler()
    bad, good = (scheduler.submit(_request(scheduler), start=False) for _ in range(2))

    def broken(stage, step, steps):
        raise KeyError("a progress callback's bug")

    bad.add_progress_callback(broken)
    _drain(scheduler)
    with pytest.raises(KeyError, match="a progress callback's bug"):
        bad.result(timeout=0)
    assert good.result(timeout=0) == good.request_id and scheduler.stats()["failed"] == 1


@pytest.mark.parametrize("sticky", [False, True])
def test_the_worker_outlives_an_exception_that_escapes_a_tick(sticky, monkeypatch):
    """What escapes a tick's guarded work (here: reading the finiteness flags back) fails what is in flight; a
    sticky device error met there stops the scheduler as one met in a step does. The worker goes on."""
    scheduler, _, _ = _scheduler(SchedulerOptions(idle_exit_s=0.05))
    message = "CUDA error: an illegal memory access was encountered" if sticky else "a defect"
    failures = iter([RuntimeError(message)])

    def check_finite(pending):
        error = next(failures, None)
        if error is not None:
            raise error

    monkeypatch.setattr(scheduler, "_check_finite", check_finite)
    first = scheduler.submit(_request(scheduler))
    with pytest.raises(RequestFailed, match="the device failed" if sticky else
                       r"the scheduler failed while the request ran \(RuntimeError: a defect\): retry it"):
        first.result(timeout=10)
    if sticky:
        assert not scheduler.healthy
        return
    again = scheduler.submit(_request(scheduler))  # served by the same worker
    assert again.result(timeout=10) == again.request_id and scheduler.healthy


@pytest.mark.parametrize("sticky", [False, True])
def test_a_request_that_cannot_move_to_the_device_fails_alone_or_stops_everything(sticky, monkeypatch):
    scheduler, _, _ = _scheduler()
    message = "CUDA error: an illegal memory access was encountered" if sticky else "CUDA out of memory"
    states = [_request(scheduler) for _ in range(3)]
    moved = scheduler._to_device

    def to_device(state):
        if state is states[1]:
            raise RuntimeError(message)
        moved(state)

    monkeypatch.setattr(scheduler, "_to_device", to_device)
    futures = [scheduler.submit(state, start=False) for state in states]
    if sticky:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            scheduler.step()
        scheduler._escaped(RuntimeError(message))  # as the worker does with what escapes a tick
        assert all(isinstance(f.exception(timeout=0), RequestFailed) for f in futures) and not scheduler.healthy
        return
    _drain(scheduler)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        futures[1].result(timeout=0)
    assert [futures[0].result(timeout=0), futures[2].result(timeout=0)] == [states[0].request_id, states[2].request_id]
    assert scheduler.stats()["failed"] == 1 and scheduler.stats()["queued_bytes"] == 0


def test_the_cost_model_uses_the_nearest_measured_batch():
    costs = CostModel(smoothing=0.5)
    key = GroupKey(Stage.PRIOR, (3, 3), True)
    assert costs.tick_seconds(key, 4) == 0.0
    costs.record(key, 2, 0.010)
    costs.record(key, 8, 0.020)
    costs.record(key, 8, 0.030)
    assert costs.tick_seconds(key, 1) == 0.010 and costs.tick_seconds(key, 3) == 0.025
    assert costs.tick_seconds(GroupKey(Stage.PRIOR, (3, 3), True, deterministic=True), 9) == 0.025
    assert costs.table() == {"prior 3×3, guided": {2: 10.0, 8: 25.0}}


def test_the_worker_thread_runs_submissions_and_ends_when_idle():
    scheduler, _, _ = _scheduler(SchedulerOptions(idle_exit_s=0.05))
    futures = [scheduler.submit(_request(scheduler)) for _ in range(5)]
    assert [f.result(timeout=10) for f in futures] == [f.request_id for f in futures]
    scheduler.close()
    assert scheduler._worker is None
    again = scheduler.submit(_request(scheduler))  # a new worker starts
    assert again.result(timeout=10) == again.request_id
