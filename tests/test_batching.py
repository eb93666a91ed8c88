"""Many requests through one tiny pipeline's scheduler: every image the one its solo call makes, from any
thread, under any load; deterministic requests bit-identical whatever shares their batch; a request that
turns non-finite or raises fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time

import numpy as np
import pytest
import torch

from engine import WuerstchenError
from engine.policy import PolicyOptions
from engine.scheduler import SchedulerOptions

SIZES = [(128, 128), (128, 256), (256, 128)]


def _spec(rng: random.Random) -> dict:
    """A random request: size, schedules, guidance, negative prompt, images and seed."""
    height, width = rng.choice(SIZES)
    prior = rng.choice([dict(prior_num_inference_steps=rng.randint(2, 4)),
                        dict(prior_num_inference_steps=3, prior_timesteps=[1.0, rng.uniform(0.4, 0.9), 0.2, 0.0])])
    return dict(prompt=rng.choice(["a cat", "a red boat on a lake", "two dogs", ""]),
                negative_prompt=rng.choice([None, "blurry"]), height=height, width=width, **prior,
                prior_guidance_scale=rng.choice([1.0, 2.5, 4.0]), num_inference_steps=rng.randint(1, 3),
                decoder_guidance_scale=rng.choice([0.0, 3.0]), num_images_per_prompt=rng.choice([1, 1, 2]),
                output_type="np", seed=rng.randrange(2**32))


def _solo(pipe, spec: dict) -> np.ndarray:
    call = {k: v for k, v in spec.items() if k != "seed"}
    return pipe(**call, generator=torch.Generator().manual_seed(spec["seed"])).images


def test_two_hundred_mixed_requests_from_four_threads_make_their_solo_images(tiny_pipeline):
    rng = random.Random(0)
    specs = [_spec(rng) for _ in range(200)]
    expected = [_solo(tiny_pipeline, spec) for spec in specs]
    futures: dict[int, object] = {}
    lock = threading.Lock()

    def client(indices: list[int], seed: int) -> None:
        pause = random.Random(seed)
        for i in indices:
            time.sleep(pause.uniform(0, 0.004))  # random arrival
            future = tiny_pipeline.submit(**specs[i])
            with lock:
                futures[i] = future

    threads = [threading.Thread(target=client, args=(list(range(k, 200, 4)), k)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = {i: future.result(timeout=300).images for i, future in futures.items()}
    assert sorted(results) == list(range(200))  # none lost
    assert len({future.request_id for future in futures.values()}) == 200  # none duplicated
    worst = max(float(np.abs(results[i] - expected[i]).max()) for i in range(200))
    assert worst <= 1e-4, worst
    stats = tiny_pipeline.stats()
    assert stats["batch_occupancy"] > 1.5 and stats["in_flight"] == 0  # they did share batches


def test_deterministic_requests_are_bit_identical_whatever_shares_their_batch(tiny_pipeline):
    """At the pinned batch size, a row's result depends on nothing but its own request: the same bits alone
    (padded with copies of itself), with some neighbours, and with others."""
    rng = random.Random(1)
    chosen = [_spec(rng) | dict(height=128, width=128, prior_guidance_scale=4.0, decoder_guidance_scale=0.0,
                                num_images_per_prompt=1) for _ in range(3)]

    def run(load: list[dict]) -> list[np.ndarray]:
        futures = [tiny_pipeline.submit(**spec, deterministic=True) for spec in chosen]
        others = [tiny_pipeline.submit(**spec, deterministic=spec is not load[-1]) for spec in load]
        images = [future.result(timeout=120).images for future in futures]
        for other in others:
            other.result(timeout=120)
        return images

    alone = [tiny_pipeline.submit(**spec, deterministic=True).result(timeout=120).images for spec in chosen]
    crowded = run([_spec(rng) | dict(height=128, width=128) for _ in range(6)])
    other_crowd = run([_spec(rng) | dict(height=128, width=128, prompt="something else entirely") for _ in range(4)])
    for one, two, three in zip(alone, crowded, other_crowd, strict=True):
        assert np.array_equal(one, two) and np.array_equal(one, three)


def test_a_request_that_turns_non_finite_fails_alone(tiny_pipeline):
    rng = random.Random(2)
    specs = [_spec(rng) | dict(height=128, width=128, prior_guidance_scale=4.0) for _ in range(4)]
    expected = [_solo(tiny_pipeline, spec) for spec in specs]
    poisoned = dict(specs[0], prior_guidance_scale=1e38)  # finite, yet the guided noise overflows
    futures = [tiny_pipeline.submit(**spec) for spec in specs[:2]] + [tiny_pipeline.submit(**poisoned)] + \
        [tiny_pipeline.submit(**spec) for spec in specs[2:]]
    with pytest.raises(WuerstchenError, match=r"^the prior produced non-finite values for this request: check the "
                                              r"weights \(a NaN in a weight file\?\) and the guidance scale$"):
        futures[2].result(timeout=120)
    for future, image in zip(futures[:2] + futures[3:], expected, strict=True):
        assert np.abs(future.result(timeout=120).images - image).max() <= 1e-4


class _Raising:
    """The prior, raising whenever its batch holds a row at the planted noise level."""

    def __init__(self, prior, level: float):
        self.prior, self.level = prior, level

    def condition(self, *args):
        return self.prior.condition(*args)

    def __call__(self, x, r, conditioning):
        if torch.isclose(r, torch.tensor(self.level)).any():
            raise RuntimeError("a planted failure in the prior")
        return self.prior(x, r, conditioning)


def test_a_request_that_raises_in_a_batch_fails_alone(tiny_pipeline):
    pipe = tiny_pipeline.with_stages(dataclasses.replace(tiny_pipeline.stages,
                                                         prior=_Raising(tiny_pipeline.stages.prior, 0.777)))
    pipe.set_scheduler_options(SchedulerOptions(policy=PolicyOptions(max_wait_ticks=64)))
    rng = random.Random(3)
    specs = [_spec(rng) | dict(height=128, width=128, prior_guidance_scale=4.0, prior_num_inference_steps=3,
                               prior_timesteps=None) for _ in range(5)]
    expected = [_solo(tiny_pipeline, spec) for spec in specs]
    culprit = dict(specs[0], prior_timesteps=[1.0, 0.777, 0.3, 0.0])
    futures = [pipe.submit(**spec) for spec in specs[:3]] + [pipe.submit(**culprit)] + \
        [pipe.submit(**spec) for spec in specs[3:]]
    with pytest.raises(RuntimeError, match="a planted failure in the prior"):
        futures[3].result(timeout=120)
    for future, image in zip(futures[:3] + futures[4:], expected, strict=True):
        assert np.abs(future.result(timeout=120).images - image).max() <= 1e-4
    assert pipe.stats()["failed"] == 1
    pipe.close()


def test_submit_returns_what_the_call_returns_and_cancels(tiny_pipeline):
    spec = _spec(random.Random(4)) | dict(height=128, width=128)
    future = tiny_pipeline.submit(**spec)
    assert np.array_equal(future.result(timeout=60).images, _solo(tiny_pipeline, spec))
    assert future.progress[0] == "decoder" and future.progress[1] == future.progress[2]
    seen = []  # a progress callback added after the work still sees every step of it, in order
    future.add_progress_callback(lambda stage, step, steps: seen.append((stage, step, steps)))
    prior_steps, decoder_steps = spec["prior_num_inference_steps"], spec["num_inference_steps"]
    assert seen == [("prior", step, prior_steps) for step in range(1, prior_steps + 1)] + \
        [("decoder", step, decoder_steps) for step in range(1, decoder_steps + 1)]

    async def awaited():
        return await tiny_pipeline.asubmit(**spec)

    assert np.array_equal(asyncio.run(awaited()).images, future.result().images)
    long = tiny_pipeline.submit(**dict(spec, prior_num_inference_steps=200))
    assert long.cancel() and long.cancelled()
    with pytest.raises(WuerstchenError, match=r"^seed=-1: expected an integer from 0 to 2\*\*64 - 1$"):
        tiny_pipeline.submit(**dict(spec, seed=-1))
    with pytest.raises(WuerstchenError, match=r"^priority='urgent': expected one of interactive, batch$"):
        tiny_pipeline.submit(**spec, priority="urgent")
    with pytest.raises(WuerstchenError, match=r"^deadline=0: expected a positive number of seconds, or None$"):
        tiny_pipeline.submit(**spec, deadline=0)
