"""`wuerstchen generate`: the demo model, PNG metadata, reproducibility and one-line errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.cli import main

FAST = ["--height", "128", "--width", "256", "--prior-steps", "2", "--decoder-steps", "2"]


def test_demo_writes_a_png_with_its_settings(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "--out", str(out), "--seed", "5", "--negative-prompt", "dog", *FAST]) == 0
    captured = capsys.readouterr()
    assert "tiny demo model, whose weights are random" in captured.err and "not a picture of anything" in captured.err
    assert "--prior wuerstchen-prior --decoder wuerstchen" in captured.err
    # The command line's defaults are not the Python API's: what runs is said before it runs.
    assert "wuerstchen: 128×256, 2 prior steps (2 evaluations, guidance 4), 2 decoder steps (guidance 0); fp32 on " \
           "cpu, backend torch\n" in captured.err
    assert f"wrote {out} (256×128, seed 5)" in captured.out
    assert "prior" in captured.out.splitlines()[-1] and "decoder" in captured.out.splitlines()[-1]

    image = Image.open(out)
    assert image.size == (256, 128) and image.mode == "RGB"
    assert image.text["prompt"] == "a cat" and image.text["negative_prompt"] == "dog" and image.text["seed"] == "5"
    settings = json.loads(image.text["settings"])
    assert settings["height"] == 128 and settings["width"] == 256 and settings["prior_num_inference_steps"] == 2
    assert settings["dtype"] == "fp32" and settings["model"] == "tiny demo (random weights, seed 0) on torch, cpu, fp32"


def test_decoding_saved_embeddings_says_what_it_decodes(tmp_path, capsys):
    embeddings = tmp_path / "fox.safetensors"
    assert main(["generate", "a fox", "--seed", "3", "--save-embeddings", str(embeddings), *FAST]) == 0
    assert main(["generate", "a fox", "--embeddings", str(embeddings), "--num-images", "2", "--seed", "3",
                 "--decoder-steps", "2", "--out", str(tmp_path / "fox.png")]) == 0
    assert f"wuerstchen: decoding {embeddings} into 2 images of 128×256, 2 decoder steps (guidance 0); fp32 on cpu, " \
           "backend torch\n" in capsys.readouterr().err


def test_many_images_from_saved_embeddings_stream_in_chunks_and_a_huge_chunk_is_refused(tmp_path, capsys):
    embeddings = tmp_path / "fox.safetensors"
    assert main(["generate", "a fox", "--seed", "3", "--save-embeddings", str(embeddings), *FAST]) == 0
    decode = ["generate", "a fox", "--embeddings", str(embeddings), "--decoder-steps", "2"]
    out = str(tmp_path / "f.png")
    assert main([*decode, "--num-images", "3", "--batch-size", "2", "--seed", "3", "--out", out]) == 0
    assert main([*decode, "--seed", "5", "--out", str(tmp_path / "alone.png")]) == 0
    third, alone = (Image.open(tmp_path / name) for name in ("f-2.png", "alone.png"))
    assert third.tobytes() == alone.tobytes() and third.text["seed"] == "5"  # image i: seed 3 + i
    capsys.readouterr()
    assert main([*decode, "--num-images", "10000000", "--batch-size", "10000000", "--seed", "0",
                 "--out", str(tmp_path / "many.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: the request needs about " in err and "GiB free" in err


def test_same_seed_same_bytes_other_seed_other_image(tmp_path):
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, seed in zip(paths, ("11", "11", "12"), strict=True):
        assert main(["generate", "a boat", "--out", str(path), "--seed", seed, *FAST]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert Image.open(paths[0]).tobytes() != Image.open(paths[2]).tobytes()


def test_several_images_get_numbered_files_each_with_its_own_seed(tmp_path):
    """Image i has seed + i, whatever the chunks it runs in, and is made again alone with that seed."""
    argv = ["generate", "a tree", "--num-images", "5", "--batch-size", "2", "--seed", "9", *FAST]
    assert main([*argv, "--out", str(tmp_path / "tree.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"tree-{i}.png" for i in range(5)]
    images = [Image.open(tmp_path / f"tree-{i}.png") for i in range(5)]
    assert [image.text["seed"] for image in images] == ["9", "10", "11", "12", "13"]
    assert [image.text["image_index"] for image in images] == ["0", "1", "2", "3", "4"]
    assert images[0].tobytes() != images[1].tobytes()
    assert main(["generate", "a tree", "--seed", "12", *FAST, "--out", str(tmp_path / "alone.png")]) == 0
    assert main([*argv[:-len(FAST)], "--batch-size", "5", *FAST, "--out", str(tmp_path / "one.png")]) == 0
    # The same noise; batches of other sizes round their GEMMs differently, which 8 bits hide but for a step.
    pixels = [np.asarray(image, dtype=int) for image in images]
    assert np.abs(np.asarray(Image.open(tmp_path / "alone.png"), dtype=int) - pixels[3]).max() <= 1
    assert all(np.abs(np.asarray(Image.open(tmp_path / f"one-{i}.png"), dtype=int) - pixels[i]).max() <= 1
               for i in range(5))


@pytest.mark.parametrize("args, message", [
    (["--height", "1000"], "--height 1000 is off the model's size grid: expected a multiple of 128 from 128 to 4096"),
    (["--prior-steps", "0"], "--prior-steps 0: expected a positive integer"),
    (["--decoder-steps", "-1"], "--decoder-steps -1: expected a positive integer"),
    (["--num-images", "0"], "--num-images 0: expected a positive integer"),
    (["--dtype", "fp8"], "--dtype 'fp8' is not supported: expected auto, fp32, fp16 or bf16"),
    (["--device", "tpu"], "--device 'tpu' is not a device: expected auto, cpu, cuda or cuda:N"),
    (["--prior", "/no/such/prior"], "--prior '/no/such/prior' needs the decoder folder too: pass both folders, or "
                                    "neither"),
    (["--prior", "/no/such/prior", "--decoder", "/no/such/decoder"], "--prior '/no/such/prior': folder does not exist"),
    (["--height", "abc"], "argument --height: invalid int value: 'abc'"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, args, message):
    assert _status(["generate", "x", "--out", str(tmp_path / "x.png"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wuerstchen generate: error: ") and message in err
    assert not (tmp_path / "x.png").exists()


def _status(argv: list[str]) -> int:
    """The exit status of the command line, whether `main` returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("out, message", [
    ("image.jpg", "expected a file name ending in .png"),
    ("missing/image.png", "folder '{tmp}/missing' does not exist"),
    ("folder.png", "'{tmp}/folder.png' exists and cannot be overwritten"),
])
def test_unusable_output_path_is_one_line(tmp_path, capsys, out, message):
    (tmp_path / "folder.png").mkdir()
    assert main(["generate", "x", "--out", str(tmp_path / out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.splitlines()[-1].startswith("wuerstchen generate: error: --out=")
    assert message.format(tmp=tmp_path) in err.splitlines()[-1]


def test_a_failed_write_keeps_the_old_image_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "--out", str(out), "--seed", "1", *FAST]) == 0
    before = out.read_bytes()

    def disk_full(image, file, *args, **kwargs):
        file.write(b"\x89PNG, cut short")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    capsys.readouterr()
    assert main(["generate", "a cat", "--out", str(out), "--seed", "2", *FAST]) == 2
    assert f"cannot write '{out}': No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["cat.png"]


def test_console_script_and_help():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--help"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0 and "--prior-guidance" in result.stdout
    result = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "x", "--out", "x.png", "--width", "7"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr == "wuerstchen generate: error: --width 7 is off the model's size grid: expected a " \
                            "multiple of 128 from 128 to 4096\n"


def test_export_the_demo_verify_it_and_generate_from_it(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["export", "--out", str(bundle), "--min-size", "128", "--max-size", "256", "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"wrote bundle {bundle}" in out and "worst relative error" in out and "FAILED" not in out
    assert all(f"exported {name}" in out for name in ("prior_text", "decoder_step", "vqgan_decode"))

    from_bundle, from_torch = tmp_path / "bundle.png", tmp_path / "torch.png"
    args = ["a red boat", "--seed", "4", "--height", "256", "--width", "128", "--prior-steps", "3",
            "--decoder-steps", "2"]
    assert main(["generate", *args, "--bundle", str(bundle), "--out", str(from_bundle)]) == 0
    assert main(["generate", *args, "--out", str(from_torch)]) == 0
    pixels = [np.asarray(Image.open(p), dtype=int) for p in (from_bundle, from_torch)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # the same image, up to rounding to 8 bits
    assert "onnxruntime" in Image.open(from_bundle).text["settings"]

    assert main(["generate", "x", "--bundle", str(bundle), "--out", str(tmp_path / "x.png"), "--height", "512"]) == 2
    assert "--height 512 is outside the sizes served here: expected a multiple of 128 from 128 to 256" in \
        capsys.readouterr().err


def test_export_takes_one_model_source(tmp_path, capsys):
    assert _status(["export", "--out", str(tmp_path / "b"), "--preset", "tiny", "--prior", "p", "--decoder", "d"]) == 2
    assert capsys.readouterr().err == "wuerstchen export: error: --preset 'tiny' given with prior/decoder folders: " \
                                      "pass one model source\n"


@pytest.mark.parametrize("args, message", [
    (["--bundle", "b", "--prior", "p", "--decoder", "d"], "--prior 'p' given with bundle: pass one model source"),
    (["--backend", "onnxruntime"], "--backend 'onnxruntime' runs a bundle: make one with `wuerstchen export`"),
    (["--bundle", "b", "--backend", "torch"], "--backend 'torch' cannot run a bundle: expected onnxruntime or "
                                              "tensorrt"),
    (["--backend", "tensorrt-llm"], "--backend 'tensorrt-llm' is unknown: expected one of torch, torch-fast, "
                                    "torch-compile, onnxruntime, tensorrt"),
    (["--bundle", "/no/such/bundle"], "--bundle '/no/such/bundle': folder does not exist"),
])
def test_model_source_errors_are_one_line(tmp_path, capsys, args, message):
    assert _status(["generate", "x", "--out", str(tmp_path / "x.png"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("flags, message", [
    (["--out", "{used}"], "--out='{used}' exists and is not an empty folder"),
    (["--out", "{new}", "--max-size", "200"], "max_size=200 is off the model's size grid"),
])
def test_export_refuses_its_target_before_loading_anything(tmp_path, capsys, monkeypatch, flags, message):
    from engine.pipeline import WuerstchenPipeline

    used = tmp_path / "used"
    used.mkdir()
    (used / "old.onnx").write_bytes(b"")
    names = {"used": str(used), "new": str(tmp_path / "new")}
    monkeypatch.setattr(WuerstchenPipeline, "load", lambda runtime: pytest.fail("loaded before checking"))
    assert main(["export", *(flag.format(**names) for flag in flags)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**names) in err
