"""The rest of diffusers' call arguments, each against diffusers on the same weights (fp32, CPU): initial
`latents`, `prompt_embeds` and `negative_prompt_embeds`, the step callbacks (what they see, what they replace,
stopping by raising, failing their request alone), `return_dict=False`, and `to(device, dtype)`."""

from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch

from benchmarks.reference import diffusers_pipeline
from engine import WuerstchenError, WuerstchenPipeline
from engine.backends import Backend
from engine.denoise import StepGraphs
from engine.text import byte_level_tokenizer

# Guided on both stages, non-square, two images per prompt: every tensor a callback may ask for is there.
CALL = dict(height=128, width=256, prior_num_inference_steps=3, num_inference_steps=2, decoder_guidance_scale=2.5,
            num_images_per_prompt=2, output_type="np")
PRIOR_LATENTS = (2, 16, 3, 6)  # CALL's prior latents
IMAGE_TOLERANCE = 5e-5  # on [0, 1] images: float32 rounding, guided on both stages (measured up to 2e-5)


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding relative to the tensor's scale (the prior's latents are magnified by guidance)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(expected.abs().max().item(), 1.0))


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def text_embeddings(tiny_pipeline):
    """Prior text states of two prompts and two negative prompts, perturbed so no prompt makes them."""
    generator = _seed(21)
    encode = tiny_pipeline.stages.prior_text
    prompts = encode(["a cat", "a red boat"])
    negatives = encode(["blurry", "dark"])
    return (prompts + 0.3 * torch.randn(prompts.shape, generator=generator),
            negatives + 0.3 * torch.randn(negatives.shape, generator=generator))


# --- latents ---------------------------------------------------------------------------------------------


def test_latents_start_the_prior_as_in_diffusers(tiny_pipeline, reference_pipeline):
    latents = torch.randn(PRIOR_LATENTS, generator=_seed(1))
    kwargs = dict(prompt="a cat", negative_prompt="dog", **CALL, latents=latents)
    expected = reference_pipeline(**kwargs, generator=_seed(7)).images
    actual = tiny_pipeline(**kwargs, generator=_seed(7)).images
    assert expected.std() > 0.02 and _max_diff(actual, expected) <= IMAGE_TOLERANCE
    # Given latents take the first draw's place and the later draws move up: the generator's own first draw,
    # given, makes the image of the call that draws it.
    generator = _seed(7)
    first = torch.randn(PRIOR_LATENTS, generator=generator)
    drawn = tiny_pipeline(**{**kwargs, "latents": first}, generator=generator).images
    assert np.array_equal(drawn, tiny_pipeline(**{**kwargs, "latents": None}, generator=_seed(7)).images)
    assert _max_diff(drawn, actual) > 1e-2  # the latents matter


def test_latents_of_each_stage_alone_as_in_diffusers(tiny_pipeline, prior_pipeline, decoder_pipeline):
    prior_kwargs = dict(prompt="a cat", height=128, width=256, num_inference_steps=3, guidance_scale=4.0,
                        num_images_per_prompt=2, latents=torch.randn(PRIOR_LATENTS, generator=_seed(2)))
    expected = prior_pipeline(**prior_kwargs, generator=_seed(3)).image_embeddings
    embeddings = tiny_pipeline.run_prior(**prior_kwargs, generator=_seed(3)).image_embeddings
    _close(embeddings, expected)

    decoder_kwargs = dict(prompt="a cat", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                          latents=torch.randn(2, 4, 32, 64, generator=_seed(4)))
    expected = decoder_pipeline(expected, **decoder_kwargs, generator=_seed(5)).images
    actual = tiny_pipeline.run_decoder(embeddings, **decoder_kwargs, generator=_seed(5)).images
    assert actual.shape == (2, 128, 256, 3) and _max_diff(actual, expected) <= IMAGE_TOLERANCE


# --- prompt_embeds ---------------------------------------------------------------------------------------


def test_prompt_embeds_replace_the_prior_text_as_in_diffusers(tiny_pipeline, reference_pipeline, text_embeddings,
                                                              monkeypatch):
    prompts, negatives = text_embeddings
    encoded = []
    encoder = tiny_pipeline.stages.prior_text
    transformer = encoder.transformer
    monkeypatch.setattr(encoder, "transformer", lambda *inputs: encoded.append(1) or transformer(*inputs))
    for decoder_prompt in (None, "a cat"):  # the decoder reads `prompt` (or ""), whatever the prior takes
        kwargs = dict(prompt=decoder_prompt, prompt_embeds=prompts, negative_prompt_embeds=negatives,
                      **{**CALL, "num_images_per_prompt": 1})
        expected = reference_pipeline(**kwargs, generator=_seed(8)).images
        actual = tiny_pipeline(**kwargs, generator=_seed(8)).images
        assert actual.shape == (2, 128, 256, 3) and _max_diff(actual, expected) <= IMAGE_TOLERANCE
    assert not encoded  # the prior's text encoder never ran
    # Without negative_prompt_embeds the empty negative prompt is encoded, as in diffusers (which refuses a
    # negative_prompt beside prompt_embeds with a TypeError, where the engine encodes it).
    kwargs = dict(prompt_embeds=prompts[:1], **CALL)
    expected = reference_pipeline(**kwargs, generator=_seed(9)).images
    assert _max_diff(tiny_pipeline(**kwargs, generator=_seed(9)).images, expected) <= IMAGE_TOLERANCE


def test_prompt_embeds_of_the_prior_alone_as_in_diffusers(tiny_pipeline, prior_pipeline, text_embeddings):
    prompts, negatives = text_embeddings
    kwargs = dict(prompt_embeds=prompts, negative_prompt_embeds=negatives, height=128, width=128,
                  num_inference_steps=3, num_images_per_prompt=2)
    expected = prior_pipeline(**kwargs, generator=_seed(10)).image_embeddings
    actual = tiny_pipeline.run_prior(**kwargs, generator=_seed(10)).image_embeddings
    assert actual.shape == (4, 16, 3, 3)
    _close(actual, expected)
    # The same states from the prompts themselves give the prompts' embeddings.
    from_text = tiny_pipeline.run_prior(["a cat", "a red boat"], height=128, width=128, num_inference_steps=3,
                                        generator=_seed(10)).image_embeddings
    states = tiny_pipeline.stages.prior_text(["a cat", "a red boat"])
    from_states = tiny_pipeline.run_prior(prompt_embeds=states, height=128, width=128, num_inference_steps=3,
                                          generator=_seed(10)).image_embeddings
    assert torch.equal(from_states, from_text)


BAD_TEXT = torch.zeros(2, 77, 32)


@pytest.mark.parametrize("call, kwargs, message", [
    ("__call__", dict(prompt=None), r"prompt=None: expected a string or a non-empty list of strings, or prompt_embeds"),
    ("__call__", dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 24)),
     r"prompt_embeds has shape \(2, 77, 24\): expected \(prompts, 77, 32\), the prior text encoder's last hidden"),
    ("__call__", dict(prompt=None, prompt_embeds=torch.zeros(2, 32)), r"prompt_embeds has shape \(2, 32\)"),
    ("__call__", dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 32, dtype=torch.int64)),
     r"prompt_embeds of dtype torch.int64: expected a float tensor \(prompts, 77, 32\)"),
    ("__call__", dict(prompt=None, prompt_embeds=[[0.0]]), r"prompt_embeds of type list: expected a float tensor"),
    ("__call__", dict(prompt=None, prompt_embeds=BAD_TEXT, negative_prompt_embeds=torch.zeros(1, 77, 32)),
     r"negative_prompt_embeds has shape \(1, 77, 32\): expected \(2, 77, 32\), .* one row per prompt"),
    ("__call__", dict(prompt=["a", "b", "c"], prompt_embeds=BAD_TEXT),
     r"prompt has 3 entries for 2 rows of prompt_embeds: expected one per row, or a single string"),
    ("__call__", dict(prompt=None, prompt_embeds=BAD_TEXT, negative_prompt=["a", "b", "c"]),
     r"negative_prompt has 3 entries for 2 prompts"),
    ("run_prior", dict(prompt="a cat", prompt_embeds=BAD_TEXT), r"prompt='a cat' given with prompt_embeds: pass one"),
    ("run_prior", dict(negative_prompt="dog", negative_prompt_embeds=torch.zeros(1, 77, 32)),
     r"negative_prompt='dog' given with negative_prompt_embeds: pass one"),
    ("__call__", dict(latents=torch.zeros(1, 16, 3, 6)),
     r"latents of shape \(1, 16, 3, 6\): expected a float tensor of shape \(2, 16, 3, 6\), for this call's size"),
    ("__call__", dict(latents=np.zeros((2, 16, 3, 6))), r"latents of type ndarray: expected a float tensor of shape"),
    ("run_decoder", dict(latents=torch.zeros(2, 4, 32, 32)),
     r"latents of shape \(2, 4, 32, 32\): expected a float tensor of shape \(2, 4, 32, 64\)"),
    ("__call__", dict(callback_on_step_end_tensor_inputs=["latents", "noise_pred"]),
     r"callback_on_step_end_tensor_inputs=\['latents', 'noise_pred'\] names 'noise_pred': expected names from "
     r"latents, text_encoder_hidden_states, negative_prompt_embeds, image_embeddings$"),
    ("__call__", dict(prior_callback_on_step_end_tensor_inputs=["image_embeddings"]),
     r"prior_callback_on_step_end_tensor_inputs=\['image_embeddings'\] names 'image_embeddings': expected names "
     r"from latents, text_encoder_hidden_states, negative_prompt_embeds$"),
    ("__call__", dict(callback_on_step_end_tensor_inputs="latents"),
     r"callback_on_step_end_tensor_inputs='latents': expected a list of names from latents"),
    ("run_prior", dict(callback_on_step_end=42), r"callback_on_step_end=42: expected a function \(pipeline, step, "),
    ("__call__", dict(return_dict="no"), r"return_dict='no': expected True or False$"),
])
def test_bad_arguments_are_one_line_and_draw_nothing(tiny_pipeline, call, kwargs, message):
    generator = _seed(0)
    base = {"__call__": dict(prompt="a cat", **CALL),
            "run_prior": dict(prompt=None if "prompt_embeds" in kwargs else "a cat", height=128, width=128),
            "run_decoder": dict(image_embeddings=torch.zeros(1, 16, 3, 6), num_images_per_prompt=2)}[call]
    with pytest.raises(WuerstchenError, match=rf"^{message}") as excinfo:
        getattr(tiny_pipeline, call)(**{**base, **kwargs}, generator=generator)
    assert "\n" not in str(excinfo.value)
    assert torch.equal(generator.get_state(), _seed(0).get_state())  # checked before anything is drawn


# --- step callbacks --------------------------------------------------------------------------------------


class Recorder:
    """A step callback that logs what it sees, calls `change(stage, step, tensors)` for what it returns, and can
    raise at a given step."""

    def __init__(self, stage: str, log: list, change=None, raise_at: int | None = None):
        self.stage, self.log, self.change, self.raise_at = stage, log, change, raise_at

    def __call__(self, pipeline, step, timestep, callback_kwargs):
        self.log.append((self.stage, step, float(timestep), timestep.dtype, pipeline,
                         {k: v if v is None else v.clone() for k, v in callback_kwargs.items()}))
        if step == self.raise_at:
            raise StopRun(f"stopped at {self.stage} step {step}")
        return self.change(self.stage, step, callback_kwargs) if self.change else {}


class StopRun(Exception):
    pass


def _callbacks(log: list, change=None, prior_raise_at=None) -> dict:
    return dict(
        prior_callback_on_step_end=Recorder("prior", log, change, prior_raise_at),
        prior_callback_on_step_end_tensor_inputs=["latents", "text_encoder_hidden_states", "negative_prompt_embeds"],
        callback_on_step_end=Recorder("decoder", log, change),
        callback_on_step_end_tensor_inputs=["latents", "text_encoder_hidden_states", "negative_prompt_embeds",
                                            "image_embeddings"],
    )


def _assert_same_calls(actual: list, expected: list, pipelines: tuple) -> None:
    """The same (stage, step, timestep) sequence, each with the same tensors."""
    assert [entry[:4] for entry in actual] == [entry[:4] for entry in expected]
    for ours, theirs in zip(actual, expected, strict=True):
        assert ours[4] is pipelines[0] and theirs[4] in pipelines[1:]
        assert ours[5].keys() == theirs[5].keys()
        for name, tensor in theirs[5].items():
            if tensor is None:
                assert ours[5][name] is None, name
            else:
                _close(ours[5][name], tensor)


def test_callbacks_see_what_diffusers_callbacks_see(tiny_pipeline, reference_pipeline):
    kwargs = dict(prompt="a cat", negative_prompt="dog", **CALL)
    expected_log, actual_log = [], []
    expected = reference_pipeline(**kwargs, **_callbacks(expected_log), generator=_seed(11)).images
    actual = tiny_pipeline(**kwargs, **_callbacks(actual_log), generator=_seed(11)).images
    assert [entry[:4] for entry in actual_log] == [
        ("prior", 0, 1.0, torch.float32), ("prior", 1, pytest.approx(2 / 3), torch.float32),
        ("prior", 2, pytest.approx(1 / 3), torch.float32), ("decoder", 0, 1.0, torch.float32),
        ("decoder", 1, 0.5, torch.float32)]
    _assert_same_calls(actual_log, expected_log,
                       (tiny_pipeline, reference_pipeline.prior_pipe, reference_pipeline.decoder_pipe))
    assert actual_log[0][5]["text_encoder_hidden_states"].shape == (4, 77, 32)  # two images, then their negatives
    assert actual_log[-1][5]["image_embeddings"].shape == PRIOR_LATENTS
    assert _max_diff(actual, expected) <= IMAGE_TOLERANCE
    # A callback that returns nothing new changes nothing.
    assert np.array_equal(actual, tiny_pipeline(**kwargs, generator=_seed(11)).images)


def _steer(stage: str, step: int, tensors: dict) -> dict:
    """Scale the prior's latents after its second step and the decoder's text states after its first."""
    if stage == "prior" and step == 1:
        return {"latents": tensors["latents"] * 0.5}
    if stage == "decoder" and step == 0:
        return {"text_encoder_hidden_states": tensors["text_encoder_hidden_states"] * 1.5,
                "image_embeddings": torch.zeros_like(tensors["image_embeddings"])}  # read only, as in diffusers
    if stage == "prior" and step == 0:
        return {"text_encoder_hidden_states": tensors["text_encoder_hidden_states"].flip(0)}
    return {}


def test_callbacks_replace_latents_and_text_states_as_in_diffusers(tiny_pipeline, reference_pipeline):
    kwargs = dict(prompt="a cat", negative_prompt="dog", **CALL)
    expected_log, actual_log = [], []
    expected = reference_pipeline(**kwargs, **_callbacks(expected_log, _steer), generator=_seed(12)).images
    actual = tiny_pipeline(**kwargs, **_callbacks(actual_log, _steer), generator=_seed(12)).images
    _assert_same_calls(actual_log, expected_log,
                       (tiny_pipeline, reference_pipeline.prior_pipe, reference_pipeline.decoder_pipe))
    assert _max_diff(actual, expected) <= IMAGE_TOLERANCE
    assert _max_diff(actual, tiny_pipeline(**kwargs, generator=_seed(12)).images) > 1e-2  # the changes took


def test_captured_steps_give_callbacks_what_eager_steps_do(tiny_pipeline):
    """With a step cache (on a GPU, CUDA graphs; here the same static buffers run eagerly) the callback sees a
    copy of the step's output, and the text states it replaces are copied into the captured step."""
    captured = tiny_pipeline.with_stages(dataclasses.replace(tiny_pipeline.stages, graphs=StepGraphs()))
    captured.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", negative_prompt="dog", **CALL)
    expected_log, actual_log = [], []
    expected = tiny_pipeline(**kwargs, **_callbacks(expected_log, _steer), generator=_seed(13)).images
    actual = captured(**kwargs, **_callbacks(actual_log, _steer), generator=_seed(13)).images
    assert captured.stages.graphs.keys()  # the steps ran through the cache
    _assert_same_calls(actual_log, expected_log, (captured, tiny_pipeline))
    assert _max_diff(actual, expected) <= 1e-6
    captured.close()


def test_a_callback_stops_the_run_by_raising_as_in_diffusers(tiny_pipeline, reference_pipeline):
    kwargs = dict(prompt="a cat", **CALL)
    expected_log, actual_log = [], []
    with pytest.raises(StopRun, match="stopped at prior step 1"):
        reference_pipeline(**kwargs, **_callbacks(expected_log, prior_raise_at=1), generator=_seed(14))
    with pytest.raises(StopRun, match="stopped at prior step 1"):
        tiny_pipeline(**kwargs, **_callbacks(actual_log, prior_raise_at=1), generator=_seed(14))
    _assert_same_calls(actual_log, expected_log, (tiny_pipeline, reference_pipeline.prior_pipe))
    assert len(actual_log) == 2
    # The next call runs as ever.
    again = tiny_pipeline(**kwargs, generator=_seed(14)).images
    assert _max_diff(again, reference_pipeline(**kwargs, generator=_seed(14)).images) <= IMAGE_TOLERANCE


def test_a_raising_callback_fails_its_request_alone(tiny_pipeline):
    # Long enough to be still in flight when the other request's callbacks run, on a slow machine too.
    other = dict(prompt="a red boat", height=128, width=256, prior_num_inference_steps=30, num_inference_steps=2,
                 output_type="np")
    alone = tiny_pipeline(**other, generator=_seed(5)).images
    in_flight = []

    def failing(pipeline, step, timestep, callback_kwargs):
        in_flight.append(pipeline.stats()["in_flight"])
        if step == 1:
            raise StopRun("a planted failure in a callback")
        return callback_kwargs

    survivor = tiny_pipeline.submit(**other, seed=5)
    doomed = tiny_pipeline.submit(**{**other, "prompt": "a cat", "prior_num_inference_steps": 3}, seed=3,
                                  prior_callback_on_step_end=failing)
    with pytest.raises(StopRun, match="a planted failure in a callback"):
        doomed.result(timeout=120)
    assert max(in_flight) == 2  # the other request was in flight beside it
    assert _max_diff(survivor.result(timeout=120).images, alone) <= IMAGE_TOLERANCE
    # A callback's bad return fails its request with one line, and the next request runs.
    for returned, message in ((None, r"^prior_callback_on_step_end returned NoneType: expected a dict of the tensors "
                                     r"it replaces"),
                              ({"latents": torch.zeros(1, 16, 3, 3)}, r"^prior_callback_on_step_end returned latents "
                               r"of shape \(1, 16, 3, 3\): expected a float tensor of shape \(1, 16, 3, 6\)")):
        with pytest.raises(WuerstchenError, match=message):
            tiny_pipeline(**other, prior_callback_on_step_end=lambda *args, value=returned: value)
    assert np.array_equal(tiny_pipeline(**other, generator=_seed(5)).images, alone)


def test_a_callback_that_waits_for_its_own_pipeline_fails_rather_than_hangs(tiny_pipeline):
    call = dict(prompt="a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=1,
                output_type="np")
    submitted = []

    def calls_the_pipeline(pipeline, step, timestep, callback_kwargs):
        if step == 0:
            submitted.append(pipeline.submit(**call, seed=2))  # no wait: allowed
            pipeline(**call)  # waits on the thread that would run it
        return callback_kwargs

    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(_outcome(
        lambda: tiny_pipeline(**call, prior_callback_on_step_end=calls_the_pipeline))))
    caller.start()
    caller.join(120)
    assert not caller.is_alive(), "the pipeline call hung"
    assert isinstance(outcome[0], WuerstchenError) and str(outcome[0]).startswith(
        "a callback waited for a request of its own pipeline")
    assert np.array_equal(submitted[0].result(timeout=120).images, tiny_pipeline(**call, generator=_seed(2)).images)
    assert tiny_pipeline.stats()["in_flight"] == 0 and tiny_pipeline.stats()["queued"] == 0


def _outcome(function):
    try:
        return function()
    except Exception as error:  # noqa: BLE001 — the test asserts what it was
        return error


# --- return_dict -----------------------------------------------------------------------------------------


def test_return_dict_false_returns_what_diffusers_returns(tiny_pipeline, reference_pipeline, prior_pipeline,
                                                          decoder_pipeline):
    kwargs = dict(prompt="a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2)
    images = {}
    for output_type in ("np", "pil"):
        expected = reference_pipeline(**kwargs, output_type=output_type, return_dict=False, generator=_seed(15))
        actual = tiny_pipeline(**kwargs, output_type=output_type, return_dict=False, generator=_seed(15))
        assert type(actual) is type(expected)  # diffusers' decoder returns the images, in no tuple
        images[output_type] = tiny_pipeline(**kwargs, output_type=output_type, generator=_seed(15)).images
        assert np.array_equal(np.stack([np.asarray(image) for image in actual]),
                              np.stack([np.asarray(image) for image in images[output_type]]))
    submitted = tiny_pipeline.submit(**kwargs, output_type="np", return_dict=False, seed=15).result(timeout=60)
    assert np.array_equal(submitted, images["np"])

    prior = dict(prompt="a cat", height=128, width=128, num_inference_steps=2)
    expected = prior_pipeline(**prior, return_dict=False, generator=_seed(16))
    actual = tiny_pipeline.run_prior(**prior, return_dict=False, generator=_seed(16))
    assert isinstance(actual, tuple) and isinstance(expected, tuple) and len(actual) == len(expected) == 1
    _close(actual[0], expected[0])
    decoder = dict(prompt="a cat", num_inference_steps=2, output_type="pt", return_dict=False)
    images = tiny_pipeline.run_decoder(actual[0], **decoder, generator=_seed(17))
    assert type(images) is type(decoder_pipeline(expected[0], **decoder, generator=_seed(17))) is torch.Tensor


# --- to(device, dtype) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movable(tiny_folders):
    """A pipeline of its own: `to` changes it."""
    pipe = WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.close()


def test_to_casts_every_stage_as_diffusers_does(movable, tiny_folders, reference_modules):
    kwargs = dict(prompt="a cat", negative_prompt="dog", **CALL)
    fp32 = movable(**kwargs, generator=_seed(18)).images
    try:
        assert movable.to("cpu", torch.bfloat16) is movable
        assert (movable.dtype, movable.device) == (torch.bfloat16, torch.device("cpu"))
        bf16 = movable(**kwargs, generator=_seed(18)).images
    finally:
        movable.to(dtype=torch.float32)
    assert {p.dtype for p in movable.stages.prior.parameters()} == {torch.float32}
    assert np.array_equal(movable(**kwargs, generator=_seed(18)).images, fp32)  # and back
    assert movable.to(torch.device("cpu")) is movable and movable.dtype == torch.float32  # nothing to do
    # What a pipeline loaded in bf16 makes, bit for bit.
    loaded = WuerstchenPipeline.from_pretrained(*tiny_folders, device="cpu", dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(bf16, loaded(**kwargs, generator=_seed(18)).images)
    # diffusers cast to bf16 rounds the noise level r·10000 to multiples of 32–64 and moves a random model's
    # image far (whole pixels saturate the other way); ours takes r in fp32 and stays near the fp32 image.
    theirs = diffusers_pipeline(copy.deepcopy(reference_modules), byte_level_tokenizer()).to(torch.bfloat16)(
        **kwargs, generator=_seed(18)).images
    ours_moved, theirs_moved = np.abs(bf16 - fp32).mean(), np.abs(theirs - fp32).mean()
    assert theirs_moved > 0.01 and ours_moved < theirs_moved / 4, (ours_moved, theirs_moved)


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.float64,), {}, r"dtype=torch.float64 is not supported: expected auto, fp32, fp16 or bf16 "),
    (("gpu",), {}, r"device='gpu' is not a device: expected auto, cpu, cuda or cuda:N$"),
    ((torch.float16, "cpu"), {}, r"to\(torch.float16, 'cpu'\): expected the device first, then the dtype$"),
    (("cpu", torch.float32, None), {}, r"to\(\) got 3 positional arguments: expected a device, a dtype, or both$"),
    (("cpu",), dict(device="cpu"), r"to\(\) got device twice, 'cpu' and device='cpu': pass one$"),
])
def test_bad_to_arguments_are_one_line_and_change_nothing(movable, args, kwargs, message):
    stages, runtime = movable.stages, movable.runtime
    with pytest.raises(WuerstchenError, match=rf"^{message}"):
        movable.to(*args, **kwargs)
    assert movable.stages is stages and movable.runtime is runtime


def test_to_refuses_while_requests_are_in_flight(movable):
    release, waiting = threading.Event(), threading.Event()

    def hold(pipeline, step, timestep, callback_kwargs):
        waiting.set()
        assert release.wait(60)
        return {}

    kwargs = dict(prompt="a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=1,
                  output_type="np")
    future = movable.submit(**kwargs, seed=1, prior_callback_on_step_end=hold)
    assert waiting.wait(60)
    runtime = movable.runtime
    with pytest.raises(WuerstchenError, match=r"^to\(\) while 1 requests are queued or in flight: wait for their "
                                              r"results first$"):
        movable.to(torch.bfloat16 if movable.dtype != torch.bfloat16 else torch.float32)
    release.set()
    images = future.result(timeout=60).images
    assert movable.runtime is runtime
    assert np.array_equal(images, movable(**kwargs, generator=_seed(1)).images)


def test_a_bundle_backend_cannot_move(movable):
    bundle = WuerstchenPipeline(movable.config, movable.stages,
                                dataclasses.replace(movable.runtime, backend=Backend.ONNXRUNTIME))
    with pytest.raises(WuerstchenError, match=r"^to\(\): the onnxruntime backend runs a bundle's graphs as they were "
                                              r"loaded and cannot move or cast them: load the bundle again"):
        bundle.to("cpu", torch.float16)
