"""The quantization quality report (`benchmarks.quant_quality`, `wuerstchen bench --quality`): SSIM against
torchmetrics', and the report on the tiny model, where each quantized model keeps one step of each
stage within its bound and its images near the unquantized pipeline's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from benchmarks.quant_quality import psnr, ssim
from engine.models import quantized
from engine.precision import Quantization
from engine.quantization import BOUNDS, QuantRecipe


@pytest.fixture
def references(monkeypatch):
    """Quantized Linears on the kernels' PyTorch references (as in tests/test_quantization.py)."""
    monkeypatch.setattr(quantized, "interpreted", lambda: False)


def _images(seed: int, shape=(40, 56, 3)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image and a noisy, shifted copy of it, in [0, 1]."""
    generator = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 3, shape[0]), np.linspace(0, 5, shape[1]), indexing="ij")
    image = np.stack([np.sin(rows + c) * np.cos(cols - c) for c in range(shape[2])], axis=-1) * 0.4 + 0.5
    noisy = np.clip(image + generator.normal(0, 0.08, shape) + 0.03, 0, 1)
    return image.astype(np.float32), noisy.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_is_the_gaussian_ssim_over_the_windows_inside_the_image(seed):
    from torchmetrics.functional.image import structural_similarity_index_measure

    image, noisy = _images(seed)
    as_batch = [torch.from_numpy(a).double().permute(2, 0, 1)[None] for a in (noisy, image)]
    _, index_map = structural_similarity_index_measure(*as_batch, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                       data_range=1.0, k1=0.01, k2=0.03, return_full_image=True)
    # torchmetrics pads the borders by reflection; the windows that lie inside the image are Wang et al.'s
    assert ssim(noisy, image) == pytest.approx(index_map[..., 5:-5, 5:-5].mean().item(), abs=1e-9)
    assert 0 < ssim(noisy, image) < 0.99 and ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_error():
    image = np.full((8, 8, 3), 0.5)
    assert psnr(image + 0.1, image) == pytest.approx(20.0) and psnr(image, image) == np.inf


def test_bench_quality_reports_each_scheme_within_its_bounds(tmp_path, capsys, references):
    from engine.cli import main

    # A scheme scanned on load, and a hand-written recipe (two of the prior's Linears in int8) run as listed.
    listed = QuantRecipe(Quantization.INT8, {"prior": ("layers.1.res.fc1", "layers.1.res.fc2"), "decoder": ()})
    listed.save(tmp_path / "listed.json")
    out = tmp_path / "quality.json"
    assert main(["bench", "--preset", "tiny", "--quantize", "fp8", str(tmp_path / "listed.json"), "--quality",
                 "--sizes", "128", "--prompts", "1", "--seeds", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows)[:2] == ["bf16", "bf16, r rounded"] and report["height"] == report["width"] == 128
    assert len(report["prompts"]) * len(report["seeds"]) == 2 and report["provenance"]["versions"]["torch"]
    fp8 = next(row for name, row in rows.items() if name.startswith("fp8 ("))
    hand = rows["int8 (prior 2, decoder 0 Linears, as listed)"]
    assert fp8["recipe"]["scheme"] == "fp8" and hand["recipe"]["layers"]["prior"] == list(listed.layers["prior"])
    assert all(0 < error <= BOUNDS[Quantization.FP8] for error in fp8["step_error"].values())
    # the hand recipe quantizes nothing in the decoder, so its decoder step is the unquantized one
    assert hand["step_error"]["decoder"] == 0 and 0 < hand["step_error"]["prior"] <= BOUNDS[Quantization.INT8]
    for row in (fp8, hand):
        quality = row["quality"]["bf16"]
        assert 25 < quality["psnr_db_worst"] <= quality["psnr_db_mean"] < np.inf
        assert 0.9 < quality["ssim_worst"] <= quality["ssim_mean"] < 1
        assert row["weight_bytes"] < rows["bf16"]["weight_bytes"] and row["peak_bytes"] is None
    printed = capsys.readouterr().out
    assert "SSIM vs bf16" in printed and "random weights: the numbers measure the arithmetic" in printed


@pytest.mark.parametrize("flags, message", [
    (["--quality"], r"--quantize none: --quality measures quantized models against the unquantized one"),
    (["--quantize", "int8", "--quality", "--load"], r"--load and --quality are two measurements"),
    (["--quantize", "int8", "--quality", "--csv", "x.csv"], r"--csv does not apply with --quality"),
    (["--quantize", "int8", "--quality", "--sizes", "128", "256"], r"--sizes 128 256: --quality measures at one"),
    (["--quantize", "int8", "--quality", "--prompts", "0"], r"--prompts 0: expected 1 to 8"),
    (["--quantize", "int8", "--quality", "--baseline", "diffusers"], r"--baseline diffusers: --quality runs on "),
])
def test_bench_quality_refusals_are_one_line(flags, message, tmp_path, monkeypatch, capsys):
    from engine.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--preset", "tiny", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wuerstchen bench: error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "none"], "--schemes none: expected fp8, int8 or recipe files, not none"),
    (["--schemes", "fp4"], "--schemes: quantize='fp4' is not supported"),
    (["--prompts", "9"], "--prompts 9: expected 1 to 8"),
    (["--size", "200"], "200"),
])
def test_the_module_s_own_command_line_refuses_in_one_line(argv, message, capsys):
    from benchmarks.quant_quality import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("quant_quality: error: ") and message in err, err
