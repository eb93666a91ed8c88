"""The TensorRT path without TensorRT: profiles, the cache key and the cache, plan headers, the runtime's call
order against a stand-in module, and the errors when TensorRT is missing.

Nothing here runs TensorRT. The stand-in records our calls and answers them plausibly; it checks that this
engine calls TensorRT's API in the order TensorRT documents, not what TensorRT does. The checks against
real TensorRT live in benchmarks/tensorrt_check.py, for a machine with a GPU and TensorRT.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import sys
import types

import pytest
import torch

from engine import WuerstchenError, WuerstchenPipeline
from engine.backends.tensorrt import ALIGNMENT, TensorRTGraph, aligned_empty
from engine.bundle import open_bundle
from engine.cli import main
from engine.engine_cache import (
    BuildSettings,
    EngineCache,
    cache_key,
    graph_digest,
    plan_engines,
    read_plan_header,
    tensorrt_module,
)
from engine.precision import Precision
from engine.profiles import (
    Bucket,
    Profile,
    default_buckets,
    graph_profiles,
    select_profile,
    static_bucket,
    validate_profiles,
)
from engine.shapes import image_shapes, resolve_dims, symbol_values
from export.tensorrt import prepare_graph

ENV = {"tensorrt": "10.12.0.36", "onnx_parser": "10.12.0", "cuda_major": 12,
       "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}


def _inputs(bundle, graph):
    return bundle.graph(graph)["inputs"]


def _request_shapes(bundle, graph, height, width, batch):
    values = symbol_values(bundle.config, image_shapes(bundle.config, height, width, batch))
    return {t["name"]: resolve_dims(t["shape"], values) for t in _inputs(bundle, graph)}


# --- profiles -------------------------------------------------------------------------------------------


def test_buckets_cover_the_range_and_meet_at_their_edges(tiny_bundle):
    config = open_bundle(tiny_bundle).config
    assert default_buckets(config, 256, 1536) == [
        Bucket("512px", 256, 512, 768), Bucket("1024px", 768, 1024, 1280), Bucket("1536px", 1280, 1536, 1536),
        Bucket("all", 256, 1024, 1536)]
    assert default_buckets(config, 128, 512) == [Bucket("512px", 128, 512, 512), Bucket("all", 128, 512, 512)]


def test_profiles_follow_the_shape_function(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    buckets = [Bucket("b", 128, 256, 384), static_bucket((256, 256), 2)]
    step = graph_profiles(bundle.config, "prior_step", _inputs(bundle, "prior_step"), buckets, max_batch=4)
    assert step[0].shapes["x"] == ((1, 16, 3, 3), (2, 16, 6, 6), (8, 16, 9, 9))  # guidance doubles the batch
    assert step[1].static and step[1].shapes["x"][0] == (4, 16, 6, 6)
    decoder = graph_profiles(bundle.config, "decoder_step", _inputs(bundle, "decoder_step"), buckets, 4)
    assert decoder[0].shapes["x"] == ((1, 4, 32, 32), (1, 4, 64, 64), (8, 4, 96, 96))
    assert decoder[0].shapes["effnet.0"] == ((1, 32, 8, 8), (1, 32, 16, 16), (8, 32, 24, 24))
    text = graph_profiles(bundle.config, "prior_text", _inputs(bundle, "prior_text"), buckets, 4)
    assert [p.bucket for p in text] == ["b", "static-256px-b2"]  # sizes do not matter, batch does
    vqgan = graph_profiles(bundle.config, "vqgan_decode", _inputs(bundle, "vqgan_decode"), buckets[:1], 4)
    assert vqgan[0].shapes["latents"][2] == (4, 4, 96, 96)  # no guidance batch for the VQGAN


@pytest.mark.parametrize("change, message", [
    (lambda s: {**s, "x": (s["x"][1], s["x"][0], s["x"][2])}, "expected 0 ≤ min ≤ opt ≤ max"),
    (lambda s: {**s, "x": ((1, 16, 3), s["x"][1], s["x"][2])}, "do not all have rank 4"),
    (lambda s: {**s, "x": ((1, 8, 3, 3), s["x"][1], s["x"][2])}, "static axis 1 must stay 16"),
    (lambda s: {**s, "r": ((1,), (2,), (6,))}, "inputs disagree on the batch range"),
])
def test_profile_validation_names_the_broken_rule(tiny_bundle, change, message):
    bundle = open_bundle(tiny_bundle)
    profile = graph_profiles(bundle.config, "prior_step", _inputs(bundle, "prior_step"),
                             [Bucket("b", 128, 256, 384)], 4)[0]
    broken = Profile("b", change(profile.shapes))
    with pytest.raises(WuerstchenError, match=message):
        validate_profiles("prior_step", _inputs(bundle, "prior_step"), [broken])


def test_profile_selection_prefers_static_then_the_nearest_bucket(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    buckets = [Bucket("256px", 128, 256, 384), Bucket("512px", 384, 512, 512), Bucket("all", 128, 384, 512),
               static_bucket((256, 256), 1)]
    profiles = graph_profiles(bundle.config, "decoder_step", _inputs(bundle, "decoder_step"), buckets, 4)
    names = [p.bucket for p in profiles]

    def chosen(height, width, batch):
        return names[select_profile(profiles, _request_shapes(bundle, "decoder_step", height, width, batch))]

    assert chosen(256, 256, 1) == "static-256px-b1"
    assert chosen(256, 256, 2) == "256px"  # the static profile is for batch 1 only
    assert chosen(512, 384, 1) == "512px"
    assert chosen(512, 128, 1) == "all"  # no narrow bucket spans 128 to 512
    with pytest.raises(WuerstchenError, match="lie outside every optimization profile"):
        chosen(256, 256, 9)


# --- cache key, digest, plan header, cache ---------------------------------------------------------------


def _key(tiny_bundle, settings=None, env=ENV, recipe="bf16+fp32-islands-v1", digest="d" * 64, bucket=None):
    settings = settings or BuildSettings()
    bucket = bucket or Bucket("b", 128, 256, 384)
    bundle = open_bundle(tiny_bundle)
    profiles = graph_profiles(bundle.config, "prior_step", _inputs(bundle, "prior_step"), [bucket], 4)
    return cache_key("prior_step", digest, recipe, profiles, settings, env)


def test_cache_key_is_deterministic_canonical_and_keeps_flag_names(tiny_bundle):
    key, fields = _key(tiny_bundle, BuildSettings(flags=("TF32", "STRIP_PLAN")))
    assert key == _key(tiny_bundle, BuildSettings(flags=("TF32", "STRIP_PLAN")))[0]
    assert fields["builder"]["flags"] == ("TF32", "STRIP_PLAN")
    assert "TF32" in json.dumps(fields) and len(key) == 64
    with pytest.raises(WuerstchenError, match="expected BuilderFlag names such as 'TF32', never numbers"):
        BuildSettings(flags=(7,))
    # The timing cache is where a build looks for timings, not what the plan is: it does not change the key.
    assert _key(tiny_bundle, BuildSettings(timing_cache="/tmp/cache"))[0] == _key(tiny_bundle)[0]


@pytest.mark.parametrize("change", [
    dict(settings=BuildSettings(precision="fp16")), dict(settings=BuildSettings(max_batch=2)),
    dict(settings=BuildSettings(optimization_level=4)), dict(settings=BuildSettings(workspace_bytes=1 << 30)),
    dict(settings=BuildSettings(tactic_dram_bytes=1 << 30)), dict(settings=BuildSettings(flags=("TF32",))),
    dict(settings=BuildSettings(hardware_compatibility="AMPERE_PLUS")),
    dict(env={**ENV, "tensorrt": "11.1.0.106"}), dict(env={**ENV, "onnx_parser": "11.1.0"}),
    dict(env={**ENV, "cuda_major": 13}), dict(env={**ENV, "gpu": {**ENV["gpu"], "name": "NVIDIA H200"}}),
    dict(env={**ENV, "gpu": {**ENV["gpu"], "compute_capability": "8.9"}}),
    dict(recipe="fp16+fp32-islands-v1"), dict(digest="e" * 64), dict(bucket=Bucket("b", 128, 384, 384)),
], ids=lambda change: next(iter(change)) + ":" + str(next(iter(change.values())))[:40])
def test_every_field_changes_the_key(tiny_bundle, change):
    assert _key(tiny_bundle, **change)[0] != _key(tiny_bundle)[0]


def _with_external_data(bundle, tiny_bundle, folder, listed: list[str]):
    """The bundle's vqgan_decode graph saved with its weights in `weights.bin`, in a copy of the bundle whose
    manifest entry lists `listed` as the graph's external data."""
    import onnx

    model = onnx.load(str(tiny_bundle / "vqgan_decode.onnx"))
    folder.mkdir()
    onnx.save(model, str(folder / "vqgan_decode.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    graphs = {**bundle.manifest["graphs"], "vqgan_decode": {**bundle.graph("vqgan_decode"), "external_data": listed}}
    manifest = {**bundle.manifest, "graphs": graphs, "files": {"vqgan_decode.onnx": "a" * 64, "weights.bin": "b" * 64}}
    return dataclasses.replace(bundle, root=folder, manifest=manifest)


def test_graph_digest_covers_external_data(tiny_bundle, tmp_path):
    bundle = open_bundle(tiny_bundle)
    external = _with_external_data(bundle, tiny_bundle, tmp_path / "bundle", ["weights.bin"])
    digest = graph_digest(external, "vqgan_decode")
    altered = dataclasses.replace(external, manifest={**external.manifest, "files": {
        **external.manifest["files"], "weights.bin": "c" * 64}})
    assert graph_digest(altered, "vqgan_decode") != digest  # the weights are part of the graph's identity
    unhashed = dataclasses.replace(external, manifest={**external.manifest, "files": {"vqgan_decode.onnx": "a" * 64}})
    with pytest.raises(WuerstchenError, match="file 'weights.bin' is not listed in the manifest's files"):
        graph_digest(unhashed, "vqgan_decode")


def test_a_graph_reading_unlisted_external_data_is_not_built(tiny_bundle, tmp_path):
    """The runtime keys plans by the files a graph's manifest entry lists; the builder checks with ONNX that the
    graph reads no other."""
    bundle = open_bundle(tiny_bundle)
    unlisted = _with_external_data(bundle, tiny_bundle, tmp_path / "bundle", [])
    plan = plan_engines(unlisted, BuildSettings(precision="fp32"), EngineCache(tmp_path / "cache"), env=ENV,
                        graphs=("vqgan_decode",))[0]
    with pytest.raises(WuerstchenError, match=r"graph vqgan_decode: reads external data \[.*weights.bin'\] that its "
                                              r"manifest entry does not list"):
        prepare_graph(plan, Precision.FP32)


def _plan_bytes(version=(10, 12, 0, 36), tag=0x74727466, serialization=0, size=64):
    header = struct.pack("<II", tag, serialization) + bytes(16) + bytes(version)
    return header + bytes(size - len(header))


def test_plan_header_is_read_from_its_first_28_bytes():
    header = read_plan_header(_plan_bytes())
    assert header.serialization == 0 and header.version == (10, 12, 0, 36)
    assert read_plan_header(_plan_bytes(serialization=3)).version is None
    with pytest.raises(WuerstchenError, match=r"^x.plan is not a TensorRT plan: it starts with b'GIF8'"):
        read_plan_header(b"GIF89a" + bytes(40), "x.plan")
    with pytest.raises(WuerstchenError, match=r"12 bytes, shorter than a plan header"):
        read_plan_header(bytes(12), "x.plan")


def test_engine_cache_uses_a_plan_only_when_everything_matches(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.stale_reason("prior_step", "k" * 64, "10.12.0.36") == "not built yet"
    plan_path = cache.store("prior_step", "k" * 64, _plan_bytes(), {"graph": "prior_step"})
    assert json.loads(plan_path.with_suffix(".json").read_text())["key"] == "k" * 64
    assert cache.stale_reason("prior_step", "k" * 64, "10.12.0.36") is None
    assert "built by TensorRT 10.12.0.36, this is 11.1.0.106" in cache.stale_reason("prior_step", "k" * 64,
                                                                                    "11.1.0.106")
    assert cache.read_plan("prior_step", "k" * 64) == _plan_bytes()
    plan_path.write_bytes(b"truncated")
    assert cache.stale_reason("prior_step", "k" * 64, "10.12.0.36") == (
        f"plan {plan_path} holds 9 bytes, its record says {len(_plan_bytes())}")
    plan_path.write_bytes(b"GIF89a" + bytes(len(_plan_bytes()) - 6))  # the right size, not a plan
    assert cache.stale_reason("prior_step", "k" * 64, "10.12.0.36").startswith(f"{plan_path} is not a TensorRT plan")
    altered = bytearray(_plan_bytes())
    altered[-1] ^= 1  # a valid header, a damaged body: only the hash tells
    plan_path.write_bytes(bytes(altered))
    assert cache.stale_reason("prior_step", "k" * 64, "10.12.0.36") is None
    with pytest.raises(WuerstchenError, match=rf"^engine {re.escape(str(plan_path))} was altered: its SHA-256"):
        cache.read_plan("prior_step", "k" * 64)
    for record in ("{not json", "[1, 2]", json.dumps({"key": "k" * 64})):
        plan_path.with_suffix(".json").write_text(record)
        assert "is corrupt" in cache.stale_reason("prior_step", "k" * 64, "10.12.0.36")


def test_plans_cover_every_graph_and_convert_precision_only_when_building(tiny_bundle, tmp_path):
    bundle = open_bundle(tiny_bundle)
    cache = EngineCache(tmp_path)
    plans = plan_engines(bundle, BuildSettings(precision="bf16"), cache, env=ENV)
    assert [p.graph for p in plans] == list(bundle.manifest["graphs"])
    assert all(p.onnx.parent == tmp_path / "graphs" and not p.onnx.exists() for p in plans)
    same = plan_engines(bundle, BuildSettings(precision="fp32"), cache, env=ENV)
    assert all(p.onnx == p.source for p in same) and same[0].fields["precision_recipe"] == "as-exported-float32"
    assert len({p.key for p in plans + same}) == 14


def test_preparing_a_plan_converts_and_checks_its_graph(tiny_bundle, tmp_path):
    import onnx

    plan = plan_engines(open_bundle(tiny_bundle), BuildSettings(precision="bf16"), EngineCache(tmp_path), env=ENV,
                        graphs=("decoder_step",))[0]
    prepare_graph(plan, Precision.BF16)  # converts, then checks operator support and strong typing
    model = onnx.load(str(plan.onnx), load_external_data=False)
    assert any(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in model.graph.value_info)
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [onnx.TensorProto.FLOAT]


def test_runtime_finds_engines_an_earlier_build_made_with_other_profiles(tiny_bundle, tmp_path):
    bundle, cache = open_bundle(tiny_bundle), EngineCache(tmp_path)
    default = plan_engines(bundle, BuildSettings(), cache, env=ENV)[2]
    built = plan_engines(bundle, BuildSettings(max_batch=2), cache,
                         [Bucket("b", 128, 256, 384), static_bucket((256, 256), 1)], env=ENV)[2]
    cache.store(built.graph, built.key, _plan_bytes(), built.fields)
    elsewhere = plan_engines(bundle, BuildSettings(), cache, env={**ENV, "gpu": None}, graphs=("prior_step",))[0]
    cache.store(elsewhere.graph, elsewhere.key, _plan_bytes(), elsewhere.fields)  # another GPU's plan
    broken = plan_engines(bundle, BuildSettings(max_batch=3), cache, env=ENV)[2]
    cache.store(broken.graph, broken.key, _plan_bytes(), {**broken.fields, "profiles": "every size"})
    found = cache.compatible(default)  # neither another GPU's plan nor a record whose profiles do not parse
    assert [plan.key for plan in found] == [built.key]
    assert found[0].profiles == built.profiles and found[0].profiles[1].static


# --- the runtime against a stand-in for tensorrt -----------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.calls = []


def _fake_tensorrt(recorder: _Recorder, manifest_entry: dict, memory: int):
    """A stand-in for the `tensorrt` module with the names the runtime uses. It records every context call
    and writes zeros as outputs: it checks our call sequence, not TensorRT."""
    module = types.SimpleNamespace()
    module.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    inputs = {t["name"]: t for t in manifest_entry["inputs"]}
    outputs = {t["name"]: t for t in manifest_entry["outputs"]}
    dtype_names = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64"}

    class Context:
        def __init__(self, strategy):
            self.shapes, self.addresses = {}, {}
            recorder.calls.append(("create_execution_context", strategy))

        def set_device_memory(self, pointer, size):
            recorder.calls.append(("set_device_memory", pointer % ALIGNMENT, size))

        def set_optimization_profile_async(self, index, stream):
            recorder.calls.append(("set_optimization_profile_async", index, stream))

        def set_input_shape(self, name, shape):
            recorder.calls.append(("set_input_shape", name))
            self.shapes[name] = tuple(shape)
            return True

        def infer_shapes(self):
            return []

        def get_tensor_shape(self, name):
            symbols = {}
            for input_name, shape in self.shapes.items():
                for dim, size in zip(inputs[input_name]["shape"], shape, strict=True):
                    if isinstance(dim, str) and "*" not in dim:
                        symbols[dim] = size
                    elif isinstance(dim, str):
                        factor, _, symbol = dim.partition("*")
                        symbols[symbol] = size // int(factor)
            return resolve_dims(outputs[name]["shape"], symbols)

        def set_tensor_address(self, name, pointer):
            recorder.calls.append(("set_tensor_address", name, pointer % ALIGNMENT))
            self.addresses[name] = pointer
            return True

        def execute_async_v3(self, stream):
            unbound = (set(inputs) | set(outputs)) - set(self.addresses)
            recorder.calls.append(("execute_async_v3", stream, tuple(sorted(unbound))))
            return True

    class Engine:
        device_memory_size_v2 = memory

        def get_tensor_dtype(self, name):
            spec = inputs.get(name) or outputs[name]
            return types.SimpleNamespace(name=dtype_names[spec["dtype"]])

        def create_execution_context(self, strategy):
            return Context(strategy)

    return module, Engine()


class _HostStreams:
    """CUDA streams and graphs, as recorded calls on the CPU."""

    handle = 7  # a non-default stream

    def __init__(self, recorder):
        self.recorder = recorder

    def enqueue(self):
        import contextlib

        return contextlib.nullcontext()

    def capture(self, launch):
        self.recorder.calls.append(("capture_begin",))
        captured = launch()
        self.recorder.calls.append(("capture_end",))
        return "graph" if captured else None

    def replay(self, graph):
        self.recorder.calls.append(("replay", graph))


def _graph(tiny_bundle, name, cuda_graphs):
    bundle = open_bundle(tiny_bundle)
    entry = bundle.graph(name)
    profiles = graph_profiles(bundle.config, name, entry["inputs"], default_buckets(bundle.config, 128, 512), 4)
    recorder = _Recorder()
    trt, engine = _fake_tensorrt(recorder, entry, memory=4096)
    scratch = aligned_empty((4096,), torch.uint8, torch.device("cpu"))
    graph = TensorRTGraph(trt, engine, profiles, [t["name"] for t in entry["inputs"]],
                          [t["name"] for t in entry["outputs"]], scratch, _HostStreams(recorder), cuda_graphs)
    return bundle, graph, recorder


def _feeds(bundle, name, height, width, batch) -> list[torch.Tensor]:
    shapes = _request_shapes(bundle, name, height, width, batch)
    return [torch.zeros(shapes[t["name"]]) for t in bundle.graph(name)["inputs"]]


def test_runtime_sets_profile_then_shapes_then_every_aligned_address_before_enqueue(tiny_bundle):
    bundle, graph, recorder = _graph(tiny_bundle, "decoder_step", cuda_graphs=False)
    tensors = _feeds(bundle, "decoder_step", 256, 384, 2)
    outputs = graph(*tensors)
    assert outputs[0].shape == tensors[0].shape
    names = [call[0] for call in recorder.calls]
    assert names[:3] == ["create_execution_context", "set_device_memory", "set_optimization_profile_async"]
    assert recorder.calls[0][1] == "USER_MANAGED" and recorder.calls[1] == ("set_device_memory", 0, 4096)
    assert recorder.calls[2][2] == 7  # our stream, not the default one
    first_shape, first_address = names.index("set_input_shape"), names.index("set_tensor_address")
    assert first_shape > names.index("set_optimization_profile_async") and first_address > first_shape
    addresses = [call for call in recorder.calls if call[0] == "set_tensor_address"]
    assert len(addresses) == len(tensors) + 1 and all(call[2] == 0 for call in addresses)  # all 256-aligned
    enqueue = recorder.calls[names.index("execute_async_v3")]
    assert enqueue[1] == 7 and enqueue[2] == ()  # every input and output bound before it

    recorder.calls.clear()
    graph(*tensors)  # same shapes: the same context, nothing rebound
    assert [call[0] for call in recorder.calls] == ["execute_async_v3"]
    graph(*_feeds(bundle, "decoder_step", 128, 128, 1))  # new shapes: a new context on its profile
    assert [call[0] for call in recorder.calls][1:3] == ["create_execution_context", "set_device_memory"]


def test_runtime_captures_after_one_plain_enqueue_and_never_rebinds_after(tiny_bundle):
    bundle, graph, recorder = _graph(tiny_bundle, "prior_step", cuda_graphs=True)
    tensors = _feeds(bundle, "prior_step", 256, 256, 2)
    for _ in range(3):
        graph(*tensors)
    names = [call[0] for call in recorder.calls]
    capture = names.index("capture_begin")
    assert names[:capture].count("execute_async_v3") == 1  # exactly one warm-up enqueue before the capture
    assert names[capture:capture + 3] == ["capture_begin", "execute_async_v3", "capture_end"]
    after = names[capture + 3:]
    assert after == ["replay", "replay"]  # no shape, profile or address call once captured


def test_aligned_buffers():
    for shape, dtype in (((3, 5), torch.float32), ((7,), torch.float16), ((2, 77, 64), torch.bfloat16)):
        tensor = aligned_empty(shape, dtype, torch.device("cpu"))
        assert tensor.shape == shape and tensor.dtype == dtype and tensor.data_ptr() % ALIGNMENT == 0


# --- without TensorRT ---------------------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError


def test_without_tensorrt_every_entry_point_says_what_to_install(no_tensorrt, tiny_bundle, capsys):
    message = r"TensorRT is not installed: it needs an NVIDIA GPU and `pip install tensorrt` from NVIDIA's index"
    with pytest.raises(WuerstchenError, match=message):
        tensorrt_module()
    with pytest.raises(WuerstchenError, match=message):
        WuerstchenPipeline.from_bundle(tiny_bundle, backend="tensorrt")
    assert main(["build", str(tiny_bundle), "--cache", "/tmp/unused"]) == 2
    assert capsys.readouterr().err.startswith("wuerstchen build: error: TensorRT is not installed")


def test_build_check_prints_every_engine_profile_and_key(no_tensorrt, tiny_bundle, tmp_path, capsys):
    assert main(["build", str(tiny_bundle), "--check", "--cache", str(tmp_path), "--static", "256"]) == 0
    out = capsys.readouterr().out
    for name in open_bundle(tiny_bundle).manifest["graphs"]:
        assert re.search(rf"^{name}  key [0-9a-f]{{64}}  \(bf16\+fp32-islands-v1", out, re.MULTILINE)
    assert "profile static-256px-b1" in out and "profile 512px" in out
    assert "x                      min (1, 16, 3, 3)  opt (2, 16, 12, 12)  max (8, 16, 12, 12)" in out
    assert "these keys lack their version and GPU fields" in out
    assert not any(tmp_path.iterdir())  # --check builds and converts nothing

