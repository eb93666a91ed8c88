"""Optimization profiles for the bundle's graphs: which input shapes an engine is tuned for and accepts.

TensorRT picks kernels for a profile's `opt` shape and accepts anything between its `min` and `max`, so
one wide profile is slow away from `opt`. A plan therefore holds a few narrow *buckets* of image sides
(each tuned at its middle), one profile spanning the bundle's whole range as a fallback, and optionally
*static* profiles (min = opt = max) for the sizes served most, which CUDA graphs need. Every shape comes
from the graphs' symbolic dims and `engine.shapes`, the one shape function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import WuerstchenConfig
from engine.errors import WuerstchenError
from engine.shapes import image_shapes, resolve_dims, symbol_values

# Graphs whose batch doubles under classifier-free guidance (images and negative images in one call).
GUIDED_GRAPHS = ("prior_condition", "prior_step", "decoder_condition", "decoder_step")
TEXT_GRAPHS = ("prior_text", "decoder_text")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Bucket:
    """Square-ish image sides from `min` to `max` pixels (both height and width), tuned at `opt`."""

    name: str
    min: int
    opt: int
    max: int
    batch: tuple[int, int, int] | None = None  # (min, opt, max) images; None: the graph's full batch range


@dataclass(frozen=True)
class Profile:
    """One optimization profile of one graph: (min, opt, max) shape of every input, by name."""

    bucket: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    @property
    def static(self) -> bool:
        return all(low == opt == high for low, opt, high in self.shapes.values())

    def accepts(self, shapes: dict[str, Shape]) -> bool:
        return all(
            all(a <= s <= b for a, s, b in zip(self.shapes[name][0], shape, self.shapes[name][2], strict=True))
            for name, shape in shapes.items()
        )


def default_buckets(config: WuerstchenConfig, min_size: int, max_size: int) -> list[Bucket]:
    """Narrow bands around 512, 1024 and 1536 px that meet halfway, clipped to the range, then the whole
    range tuned at the size nearest 1024. Neighbouring bands share their edge size."""
    step = config.sizes.step
    centres = [c for c in (512, 1024, 1536) if min_size <= c <= max_size] or [min_size]
    edges = [min_size] + [(a + b) // 2 // step * step for a, b in zip(centres, centres[1:], strict=False)] + [max_size]
    buckets = [Bucket(f"{c}px", edges[i], c, edges[i + 1]) for i, c in enumerate(centres)]
    middle = min(range(min_size, max_size + 1, step), key=lambda s: abs(s - 1024))
    return [*buckets, Bucket("all", min_size, middle, max_size)]


def static_bucket(size: tuple[int, int], batch: int) -> Bucket:
    """A static profile for one (height, width) and batch: what a CUDA-graph fast path needs."""
    height, width = size
    if height != width:
        raise WuerstchenError(f"static size {height}x{width}: static profiles are square for now")
    return Bucket(f"static-{height}px-b{batch}", height, height, height, (batch, batch, batch))


def batch_range(graph: str, max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of a graph's calls for up to `max_batch` images per call: guided graphs see
    twice the images, text encoders one row per prompt (prompts and negative prompts in separate calls)."""
    if graph in GUIDED_GRAPHS:
        return 1, 2 if graph.startswith("prior") else 1, 2 * max_batch
    return 1, 1, max_batch


def graph_profiles(
    config: WuerstchenConfig, graph: str, inputs: Sequence[dict], buckets: Sequence[Bucket], max_batch: int,
) -> list[Profile]:
    """The profiles of one graph (its manifest `inputs`: name and symbolic shape), one per bucket; buckets
    that give a graph the same shapes (the text encoders see no image size) collapse into the first."""
    default = batch_range(graph, max_batch)
    profiles = []
    for bucket in buckets:
        batches = bucket.batch if bucket.batch is not None else default
        if bucket.batch is not None and graph in GUIDED_GRAPHS and graph.startswith("prior"):
            batches = tuple(2 * b for b in bucket.batch)  # a static prior profile serves its guided batch
        corners = [symbol_values(config, image_shapes(config, side, side, batch))
                   for side, batch in zip((bucket.min, bucket.opt, bucket.max), batches, strict=True)]
        shapes = {spec["name"]: tuple(resolve_dims(spec["shape"], values) for values in corners) for spec in inputs}
        if all(shapes != profile.shapes for profile in profiles):
            profiles.append(Profile(bucket.name, shapes))
    validate_profiles(graph, inputs, profiles)
    return profiles


def validate_profiles(graph: str, inputs: Sequence[dict], profiles: Sequence[Profile]) -> None:
    """TensorRT's rules for `IOptimizationProfile.set_shape`: every input has a (min, opt, max) of its rank,
    0 ≤ min ≤ opt ≤ max, static dims fixed; and ours: all inputs of a graph share one batch range."""
    for profile in profiles:
        batches = set()
        for spec in inputs:
            low, opt, high = profile.shapes[spec["name"]]
            where = f"graph {graph}, profile {profile.bucket}, input {spec['name']}"
            if not len(low) == len(opt) == len(high) == len(spec["shape"]):
                raise WuerstchenError(f"{where}: shapes {low}, {opt}, {high} do not all have rank {len(spec['shape'])}")
            for axis, dim in enumerate(spec["shape"]):
                if not 0 <= low[axis] <= opt[axis] <= high[axis]:
                    raise WuerstchenError(f"{where}: axis {axis} has min {low[axis]}, opt {opt[axis]}, max "
                                          f"{high[axis]}: expected 0 ≤ min ≤ opt ≤ max")
                if isinstance(dim, int) and not low[axis] == opt[axis] == high[axis] == dim:
                    raise WuerstchenError(f"{where}: static axis {axis} must stay {dim}")
            if spec["shape"][:1] == ["batch"]:
                batches.add((low[0], opt[0], high[0]))
        if len(batches) > 1:
            raise WuerstchenError(f"graph {graph}, profile {profile.bucket}: inputs disagree on the batch range "
                                  f"{sorted(batches)}")


def select_profile(profiles: Sequence[Profile], shapes: dict[str, Shape]) -> int:
    """The index of the profile to run `shapes` with: a static profile that matches exactly, else the
    accepting profile whose `opt` is nearest (summed over every dim), narrow buckets before the fallback."""
    accepting = [i for i, profile in enumerate(profiles) if profile.accepts(shapes)]
    if not accepting:
        raise WuerstchenError(f"input shapes {shapes} lie outside every optimization profile of this engine")

    def preference(i: int) -> tuple[bool, int, int]:
        profile = profiles[i]
        distance = sum(abs(s - o) for name, shape in shapes.items()
                       for s, o in zip(shape, profile.shapes[name][1], strict=True))
        span = sum(high - low for name in shapes
                   for low, high in zip(profile.shapes[name][0], profile.shapes[name][2], strict=True))
        return not profile.static, distance, span

    return min(accepting, key=preference)
