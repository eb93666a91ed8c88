"""Which ready requests run next, and at which batch size: the scheduler's policy, kept pure (no tensors, no
clock of its own) so that it is tested with a simulated clock and a fake runner.

A request moves through five stages: its text encoded, the prior's steps, the handoff to the decoder (the
image embeddings ×42 − 1, their pyramid and the decoder's conditioning), the decoder's steps, the VQGAN
decode. The requests that can run as one batch form a group (`GroupKey`): the same stage, latent shape,
guidance on or off, and determinism. The denoising steps are batched: requests at different step indices,
with different schedules, guidance scales and seeds, share a batch, each row with its own noise level,
sampler coefficients and guidance weight. The other stages run each request on its own, a few per tick.

Each tick `plan` picks one group:
- a request ready for `max_wait_ticks` ticks is served first (aging: nothing starves);
- otherwise interactive requests before batch-priority ones, and among groups, in `latency` mode the most
  urgent (earliest deadline less remaining work, EDF), ties to newcomers' text first (a cheap stage that lets
  them join the next denoising batch), then to the later stage (finish decoders and decodes before starting
  priors: shortest remaining first), then the oldest; in `throughput` mode the fullest batch.
Within the group, the most urgent requests that fit the largest batch size, padded up to the smallest
captured batch size (`buckets`, one CUDA graph each); a request larger than every bucket runs alone at its
own size. Deterministic requests always run at one pinned batch size, so that their rows never see another
batch shape: the same bits whatever the load.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from engine.errors import WuerstchenError


class Stage(IntEnum):
    """A request's stages, in the order it passes them (a later stage is closer to done)."""

    TEXT = 0
    PRIOR = 1
    HANDOFF = 2
    DECODER = 3
    DECODE = 4

    @property
    def batched(self) -> bool:
        return self in (Stage.PRIOR, Stage.DECODER)

    @property
    def rank(self) -> int:
        """Tie-break order, highest first: newcomers' text, then the later stages (shortest remaining)."""
        return len(Stage) if self is Stage.TEXT else int(self)


@dataclass(frozen=True)
class GroupKey:
    """What requests must share to run as one batch: the stage, and for the denoising steps the latent's
    (height, width), whether guidance doubles the batch, and whether the request is deterministic."""

    stage: Stage
    shape: tuple[int, int] = (0, 0)
    guided: bool = False
    deterministic: bool = False

    def describe(self) -> str:
        if not self.stage.batched:
            return self.stage.name.lower()
        extra = ", guided" if self.guided else ""
        return f"{self.stage.name.lower()} {self.shape[0]}×{self.shape[1]}{extra}"


@dataclass(frozen=True)
class Candidate:
    """A request ready for its next piece of work, as the policy sees it."""

    request_id: int
    key: GroupKey
    rows: int  # images (latent rows) it adds to a batch
    ready_tick: int  # the tick since which it has been waiting for this work
    deadline: float = math.inf  # absolute, on the scheduler's clock
    remaining_s: float = 0.0  # estimated service time still to run
    interactive: bool = True

    @property
    def urgency(self) -> float:
        """Latest start that still meets the deadline (least slack first); inf without a deadline."""
        return self.deadline - self.remaining_s


@dataclass(frozen=True)
class Tick:
    """One group's work for one tick: the requests, in batch order, and the batch size it runs at."""

    key: GroupKey
    request_ids: tuple[int, ...]
    rows: int
    batch: int

    @property
    def padding(self) -> int:
        return self.batch - self.rows


MODES = ("latency", "throughput")


@dataclass(frozen=True)
class PolicyOptions:
    """`buckets`: the batch sizes a batch may run at, one CUDA graph each where the runner captures steps; the
    largest is the most rows a batch takes. `pad`: pad a batch up to the next bucket (where steps are captured;
    an eager runner runs every size as well as another). `deterministic_batch`: the one size deterministic
    requests always run at. `max_wait_ticks`: a request waiting this long is served next. `per_tick`:
    requests of an unbatched stage run in one tick. `mode`: "latency" or "throughput"."""

    buckets: tuple[int, ...] = (1, 2, 4, 8)
    pad: bool = True
    deterministic_batch: int = 4
    max_wait_ticks: int = 16
    per_tick: int = 4
    mode: str = "latency"

    def __post_init__(self):
        if not self.buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.buckets):
            raise WuerstchenError(f"buckets={self.buckets!r}: expected positive batch sizes")
        object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))
        for name in ("deterministic_batch", "max_wait_ticks", "per_tick"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WuerstchenError(f"{name}={value!r}: expected a positive integer")
        if self.mode not in MODES:
            raise WuerstchenError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]


def plan(candidates: Iterable[Candidate], tick: int, options: PolicyOptions) -> Tick | None:
    """The work of the next tick, or None when nothing is ready."""
    groups: dict[GroupKey, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        groups[candidate.key].append(candidate)
    if not groups:
        return None
    key = _choose_group(groups, tick, options)
    return _fill(key, groups[key], options)


def _choose_group(groups: dict[GroupKey, list[Candidate]], tick: int, options: PolicyOptions) -> GroupKey:
    def oldest(key: GroupKey) -> int:
        return min(c.ready_tick for c in groups[key])

    starving = [key for key in groups if tick - oldest(key) >= options.max_wait_ticks]
    if starving:
        return min(starving, key=lambda key: (oldest(key), -key.stage.rank))
    interactive = [key for key, members in groups.items() if any(c.interactive for c in members)]
    keys = interactive or list(groups)
    if options.mode == "throughput":
        return min(keys, key=lambda key: (-_fill(key, groups[key], options).rows, -key.stage.rank, oldest(key)))
    return min(keys, key=lambda key: (min(c.urgency for c in groups[key]), -key.stage.rank, oldest(key)))


def _fill(key: GroupKey, members: Sequence[Candidate], options: PolicyOptions) -> Tick:
    """The most urgent members that fit one batch, and the batch size they run at."""
    ordered = sorted(members, key=lambda c: (c.urgency, c.ready_tick, c.request_id))
    if not key.stage.batched:
        chosen = ordered[:options.per_tick]
        rows = sum(c.rows for c in chosen)
        return Tick(key, tuple(c.request_id for c in chosen), rows, rows)
    capacity = options.deterministic_batch if key.deterministic else options.max_batch
    chosen, rows = [], 0
    for candidate in ordered:
        if chosen and rows + candidate.rows > capacity:
            continue
        chosen.append(candidate)
        rows += candidate.rows
    ids = tuple(c.request_id for c in chosen)
    return Tick(key, ids, rows, batch_size(rows, key, options))


def batch_size(rows: int, key: GroupKey, options: PolicyOptions) -> int:
    """The size `rows` run at: the pinned size for deterministic requests, else the smallest bucket that holds
    them; their own size where no bucket is large enough or batches are not padded."""
    if key.deterministic:
        return max(rows, options.deterministic_batch)
    if not options.pad:
        return rows
    return next((bucket for bucket in options.buckets if bucket >= rows), rows)


class CostModel:
    """Measured seconds per tick of each group key (without determinism) and batch size, as an exponential
    average; it estimates a request's remaining service time, for deadlines and admission."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self._seconds: dict[GroupKey, dict[int, float]] = defaultdict(dict)
        self._lock = threading.Lock()  # the worker records while submitting threads and stats() read

    @staticmethod
    def _plain(key: GroupKey) -> GroupKey:
        return GroupKey(key.stage, key.shape, key.guided) if key.deterministic else key

    def record(self, key: GroupKey, batch: int, seconds: float) -> None:
        with self._lock:
            by_batch = self._seconds[self._plain(key)]
            previous = by_batch.get(batch)
            by_batch[batch] = seconds if previous is None else previous + self.smoothing * (seconds - previous)

    def tick_seconds(self, key: GroupKey, batch: int) -> float:
        """The measured time of a tick of `key` at the nearest measured batch size not below `batch` (else the
        largest below it); 0 where nothing was measured yet, so that nothing is refused on a guess."""
        with self._lock:
            by_batch = self._seconds.get(self._plain(key))
            if not by_batch:
                return 0.0
            if batch in by_batch:
                return by_batch[batch]
            above = [b for b in by_batch if b >= batch]
            return by_batch[min(above) if above else max(by_batch)]

    def table(self) -> dict[str, dict[int, float]]:
        """Milliseconds by group and batch size, for `stats()`."""
        with self._lock:
            return {key.describe(): {batch: seconds * 1e3 for batch, seconds in sorted(by_batch.items())}
                    for key, by_batch in sorted(self._seconds.items(), key=lambda item: (item[0].stage, item[0].shape))
                    if by_batch}
