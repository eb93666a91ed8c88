"""Quantized models: the Linears a recipe swaps, their math against the kernels' references, the fused path on a
quantized model, the sensitivity scan meeting its bounds on the tiny model, the weights' memory of the full-size
architecture, and recipe files read as hostile."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from engine import WuerstchenError, preset
from engine.backends.pytorch import load_models
from engine.models import Decoder, Prior, quantized
from engine.models.quantized import QuantizedLinear, candidates, quantize, weight_bytes
from engine.precision import Quantization
from engine.quantization import BOUNDS, QuantRecipe, calibration_steps, relative_error, scan
from engine.runtime import ModelSource
from kernels.quant import fp8_linear_ref, int8_weight_only_linear_ref, quantize_fp8_rows_ref, quantize_weight

CPU = torch.device("cpu")
SCAN_SIZE = 128


@pytest.fixture(scope="module")
def models():
    """The tiny preset's plain models in bf16."""
    return load_models(ModelSource.from_preset("tiny"), CPU, torch.bfloat16)


@pytest.fixture
def references(monkeypatch):
    """Quantized Linears on the kernels' PyTorch references, not in Triton's interpreter: the same quantized
    math (tests/test_quant_kernels.py holds the kernels to it), fast enough on a CPU to scan a model."""
    monkeypatch.setattr(quantized, "interpreted", lambda: False)


def test_candidates_are_the_block_linears_and_nothing_else(models):
    _, m = models
    names = candidates(m.prior)
    assert names[:4] == ["layers.0.res.fc1", "layers.0.res.fc2", "layers.0.attn.qkv", "layers.0.attn.out"]
    assert len(names) == 4 * preset("tiny").prior.depth
    assert not any(part in name for name in candidates(m.decoder) for part in ("mapper", "embedding", "clf"))
    with pytest.raises(WuerstchenError, match=r"^quantize: layers \['cond_mapper.0'\] are not quantizable Linears "
                                              r"of this Prior"):
        quantize(copy.deepcopy(m.prior), Quantization.FP8, ["cond_mapper.0"])


@pytest.mark.parametrize("scheme", list(Quantization))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_quantized_linear_computes_the_quantized_math(scheme, dtype):
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 40).to(dtype)
    x = torch.randn(3, 7, 48, generator=generator).to(dtype)
    residual = torch.randn(3, 7, 40, generator=generator).to(dtype)
    quantized = QuantizedLinear(linear, scheme)
    weight = quantize_weight(linear.weight.float(), scheme.weight_dtype)
    rows, added = x.reshape(-1, 48), residual.reshape(-1, 40)
    if scheme is Quantization.FP8:
        q, scale = quantize_fp8_rows_ref(rows)
        expected = fp8_linear_ref(q, scale, weight.data, weight.scale, linear.bias, added, out_dtype=dtype)
    else:
        expected = int8_weight_only_linear_ref(rows, weight.data, weight.scale, linear.bias, added)
    out = quantized(x, residual=residual)
    assert out.shape == (3, 7, 40) and out.dtype == dtype
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10  # the kernels round once more than the fp64 reference
    torch.testing.assert_close(out.reshape(-1, 40).float(), expected.float(), rtol=2 * ulp, atol=1e-3)
    without_bias = quantized(x, residual=residual, add_bias=False)
    torch.testing.assert_close((without_bias + linear.bias).float(), out.float(), rtol=4 * ulp, atol=2e-2)


def test_casts_reach_the_bias_but_never_the_8_bit_weights():
    quantized = QuantizedLinear(nn.Linear(16, 8).to(torch.bfloat16), Quantization.FP8)
    quantized.to(torch.float16)
    assert quantized.w_q.dtype == torch.float8_e4m3fn and quantized.w_scale.dtype == torch.float32
    assert quantized.bias.dtype == torch.float16 and quantized.weight.dtype == torch.float16
    with pytest.raises(WuerstchenError, match=r"with weights in torch.float32: expected a model in fp16 or bf16"):
        QuantizedLinear(nn.Linear(16, 8), Quantization.INT8)


@pytest.mark.parametrize("scheme", list(Quantization))
def test_the_fused_path_of_a_quantized_model_equals_its_plain_path(models, scheme):
    from engine.models.fused import fuse

    config, m = models
    steps = calibration_steps(config, m.prior_text, m.prior, m.decoder_text, m.decoder, 128)
    for stage, model in (("prior", m.prior), ("decoder", m.decoder)):
        plain = quantize(copy.deepcopy(model), scheme)
        fused = fuse(copy.deepcopy(plain))
        assert any(isinstance(module, QuantizedLinear) for module in fused.modules())
        with torch.no_grad():
            # Against the unquantized plain model, the fused path of the quantized model is as close as its
            # plain path, up to where the fused path rounds bf16 differently (activations a rounding apart may
            # quantize to neighbouring 8-bit values, so the two quantized paths differ by about their error).
            reference = steps[stage](model)
            rounding = relative_error(steps[stage](fuse(copy.deepcopy(model))), reference)
            quantized_error = relative_error(steps[stage](plain), reference)
            assert relative_error(steps[stage](fused), reference) <= 1.25 * quantized_error + 2 * rounding


@pytest.fixture(scope="module")
def recipes(models):
    with pytest.MonkeyPatch.context() as patch:  # as `references`, for the module's scans
        patch.setattr(quantized, "interpreted", lambda: False)
        config, m = models
        return {scheme: scan(config, m.prior_text, m.prior, m.decoder_text, m.decoder, scheme, SCAN_SIZE)
                for scheme in Quantization}


@pytest.mark.parametrize("scheme", list(Quantization))
def test_the_scan_keeps_one_step_within_the_bound(models, recipes, scheme, references):
    config, m = models
    recipe = recipes[scheme]
    steps = calibration_steps(config, m.prior_text, m.prior, m.decoder_text, m.decoder, SCAN_SIZE)
    for stage, model in (("prior", m.prior), ("decoder", m.decoder)):
        record = recipe.scan[stage]
        quantized = recipe.apply(stage, copy.deepcopy(model))
        with torch.no_grad():
            error = relative_error(steps[stage](quantized), steps[stage](model))
        assert error <= BOUNDS[scheme] and error == pytest.approx(record["step_error"], rel=1e-6)
        assert len(recipe.layers[stage]) == record["quantized"] > 0
        assert set(record["kept"]).isdisjoint(recipe.layers[stage])
        assert set(record["kept"]) | set(recipe.layers[stage]) == set(candidates(model))
        sensitivities = record["sensitivities"]  # what is kept is the most sensitive
        if record["kept"]:
            assert min(record["kept"].values()) >= max(sensitivities[name] for name in recipe.layers[stage])


def test_a_recipe_file_round_trips_and_is_read_as_hostile(recipes, tmp_path):
    path = tmp_path / "fp8.json"
    recipes[Quantization.FP8].save(path)
    assert QuantRecipe.load(path) == recipes[Quantization.FP8]
    values = json.loads(path.read_text())
    for change, message in [
        ({"format_version": True}, r"format_version=True is not supported"),
        ({"scheme": "fp4"}, r"scheme='fp4' is not a quantization: expected none, fp8"),
        ({"layers": {"prior": None}}, r"layers=.*expected an object with \['prior', 'decoder'\]"),
        ({"layers": {"prior": "all", "decoder": None}}, r"layers.prior: expected a list of layer names"),
        ({"format": "other"}, r"not a quantization recipe"),
    ]:
        path.write_text(json.dumps({**values, **change}))
        with pytest.raises(WuerstchenError, match=message):
            QuantRecipe.load(path)
    path.write_bytes(b"\xff")
    with pytest.raises(WuerstchenError, match=r"is not valid JSON"):
        QuantRecipe.load(path)


def test_full_size_weights_take_at_most_55_percent_of_bf16():
    config = preset("wuerstchen-v2")
    for model_class, stage_config in ((Prior, config.prior), (Decoder, config.decoder)):
        with torch.device("meta"):
            model = model_class(stage_config).to(torch.bfloat16)
        bf16 = weight_bytes(model)
        assert weight_bytes(quantize(model, Quantization.FP8)) <= 0.55 * bf16


@pytest.mark.parametrize("bound", [True, 0, -0.5, float("nan"), "0.02"])
def test_a_scan_bound_is_a_positive_number(models, bound):
    config, m = models
    with pytest.raises(WuerstchenError, match=rf"^bound={bound!r}: expected a positive number$"):
        scan(config, m.prior_text, m.prior, m.decoder_text, m.decoder, "int8", SCAN_SIZE, bound=bound)


def test_a_recipe_says_whether_a_scan_chose_its_layers(recipes):
    assert recipes[Quantization.INT8].describe().endswith(" Linears, from a scan)")
    listed = QuantRecipe(Quantization.INT8, {"prior": ("layers.0.res.fc1",), "decoder": ()})
    assert listed.describe() == "int8 (prior 1, decoder 0 Linears, as listed)"


# --- quantize= on load -----------------------------------------------------------------------------------------

CALL = dict(height=128, width=128, prior_num_inference_steps=3, num_inference_steps=3, output_type="np")


def _image(pipe, seed: int = 4):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red fox in the snow", generator=torch.Generator().manual_seed(seed), **CALL).images


def test_quantize_on_load_scans_applies_and_keeps_its_recipe(references, tmp_path):
    from engine import WuerstchenPipeline

    pipe = WuerstchenPipeline.from_preset("tiny", device="cpu", quantize="int8")
    recipe = pipe.quantization
    # bf16 on the CPU by default, the scan's recipe named by the runtime, the noise level taken in fp32.
    assert pipe.precision.value == "bf16" and pipe.runtime.quantization is recipe
    assert recipe.scheme is Quantization.INT8 and recipe.scan["prior"]["step_error"] <= BOUNDS[Quantization.INT8]
    assert f"quantized {recipe.describe()}" in pipe.runtime.describe() and pipe.stages.fp32_timesteps
    swapped = {name for name, module in pipe.stages.decoder.named_modules() if isinstance(module, QuantizedLinear)}
    assert swapped == set(recipe.layers["decoder"])

    # Its images stay near the unquantized bf16 pipeline's.
    plain = WuerstchenPipeline.from_preset("tiny", device="cpu", dtype="bf16")
    quantized_image, plain_image = _image(pipe), _image(plain)
    assert 0 < abs(quantized_image - plain_image).mean() < 0.02

    # Saved, the recipe loads the same models without a scan; `to` applies it again.
    recipe.save(tmp_path / "int8.json")
    again = WuerstchenPipeline.from_preset("tiny", device="cpu", quantize=tmp_path / "int8.json")
    assert again.quantization.layers == recipe.layers
    assert (_image(again) == quantized_image).all()
    assert pipe.to(dtype="fp16") is pipe and pipe.quantization.layers == recipe.layers
    assert {m.bias.dtype for m in pipe.stages.prior.modules() if isinstance(m, QuantizedLinear)} == {torch.float16}
    with pytest.raises(WuerstchenError, match=r"^quantize=<recipe int8 \(prior \d+, decoder \d+ Linears, "
                                              r"from a scan\)> quantizes fp16 or bf16 weights, and dtype is fp32"):
        pipe.to(dtype="fp32")
    assert pipe.precision.value == "fp16"


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="fp4"), r"^quantize='fp4' is not supported: expected none, fp8 .*, int8 .*, or a recipe file"),
    (dict(quantize="int8", dtype="fp32"), r"^quantize='int8' quantizes fp16 or bf16 weights, and dtype is fp32"),
    (dict(quantize="missing.json"), r"^quantize='missing.json': file does not exist$"),
    (dict(quantize=7), r"^quantize=7 is not supported"),
])
def test_quantize_refusals_are_one_line(kwargs, message):
    from engine.runtime import resolve

    with pytest.raises(WuerstchenError, match=message):
        resolve(ModelSource.from_preset("tiny"), "torch", "cpu", kwargs.pop("dtype", None), None, **kwargs)


def test_a_bundle_is_quantized_when_exported_not_when_run(tiny_bundle):
    from engine.runtime import resolve

    with pytest.raises(WuerstchenError, match=r"^quantize='fp8' applies to the torch backends: a bundle is quantized "
                                              r"when it is exported \(wuerstchen export --quantize\)$"):
        resolve(ModelSource.from_bundle(tiny_bundle), quantize="fp8")


def test_generate_quantize_says_so_and_records_it(tmp_path, capsys, references):
    from engine.cli import main

    out = tmp_path / "fox.png"
    assert main(["generate", "a fox", "--quantize", "INT8", "--out", str(out), "--seed", "1", "--height", "128",
                 "--width", "128", "--prior-steps", "2", "--decoder-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "; bf16 on cpu, backend torch, quantized int8 (recipe scanned on load)\n" in err
    from PIL import Image

    settings = json.loads(Image.open(out).text["settings"])
    assert "quantized int8 (prior" in settings["model"] and settings["dtype"] == "bf16"
    assert main(["generate", "a fox", "--quantize", "int4", "--out", str(out)]) == 2
    assert "wuerstchen generate: error: --quantize 'int4' is not supported" in capsys.readouterr().err
