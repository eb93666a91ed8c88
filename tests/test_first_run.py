"""What a first-time user meets: the demo's picture and speed, `--version`, a command line that answers without
importing torch, every precision spelling, the CPU precision warning, PNG metadata from Python, and CLIP's real
tokenizer vocabulary read from a folder laid out as the published repos lay it out."""

from __future__ import annotations

import errno
import gzip
import importlib.util
import json
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine import WuerstchenError
from engine.cli import main
from engine.precision import _SPELLINGS, Precision
from engine.runtime import ModelSource, SlowPrecisionWarning, resolve

SMALL = ["--height", "128", "--width", "128", "--prior-steps", "2", "--decoder-steps", "2"]


def _status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def _low_pass(path: Path) -> np.ndarray:
    """The image in [0, 1], averaged over 8×8 blocks: its shapes and colours without the pixel grain."""
    pixels = np.asarray(Image.open(path), dtype=np.float64) / 255
    height, width, channels = pixels.shape
    return pixels.reshape(height // 8, 8, width // 8, 8, channels).mean(axis=(1, 3))


# --- the demo ------------------------------------------------------------------------------------------------

def test_demo_is_small_says_what_it_runs_and_its_picture_follows_the_prompt_and_the_seed(tmp_path, capsys):
    runs = {"fox-0": ("a red fox", 0), "fox-1": ("a red fox", 1), "lighthouse-0": ("a lighthouse at dusk", 0)}
    for name, (prompt, seed) in runs.items():
        assert main(["generate", prompt, "--seed", str(seed), "--out", str(tmp_path / f"{name}.png")]) == 0
    err = capsys.readouterr().err
    assert "tiny demo model, whose weights are random" in err and "at 256×256 unless asked for another size" in err
    assert err.count("wuerstchen: 256×256, the published prior schedule (29 evaluations, guidance 4), 12 decoder "
                     "steps (guidance 0); fp32 on cpu, backend torch\n") == 3

    pictures = {name: _low_pass(tmp_path / f"{name}.png") for name in runs}
    for picture in pictures.values():
        assert picture.shape == (32, 32, 3)
        assert np.all((picture.mean(axis=(0, 1)) > 0.25) & (picture.mean(axis=(0, 1)) < 0.75))  # no colour is lost
        assert picture.std() > 0.08  # shapes, not a flat square
    assert np.abs(pictures["fox-0"] - pictures["fox-1"]).mean() > 0.05  # another seed, another picture
    assert np.abs(pictures["fox-0"] - pictures["lighthouse-0"]).mean() > 0.05  # and another prompt


def test_random_weights_are_deterministic_and_the_vqgan_is_calibrated():
    from engine import preset
    from engine.models import VQGANDecoder
    from engine.weights import IMAGE_MEAN, IMAGE_STD, random_stage

    config = preset("tiny").vqgan
    first, second = (random_stage(VQGANDecoder, config, 4, torch.device("cpu"), torch.float32) for _ in range(2))
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    # Smooth unit-spread latents, drawn apart from the calibration's own: each colour near 0.5 ± 0.2.
    coarse = torch.randn(8, config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(99))
    latents = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bicubic")
    with torch.no_grad():
        images = first.out_block(first.up_blocks(config.scale_factor * latents / latents.std()))
    assert torch.allclose(images.mean(dim=(0, 2, 3)), torch.full((3,), IMAGE_MEAN), atol=0.1)
    assert torch.allclose(images.std(dim=(0, 2, 3)), torch.full((3,), IMAGE_STD), atol=0.1)


# --- the command line ----------------------------------------------------------------------------------------

def test_readme_installs_torchs_cpu_build_and_ci_runs_its_test_line():
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python3 -m venv .venv ")]
    cpu_torch = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
    assert len(commands) == 2 and all(cpu_torch in command for command in commands)
    assert commands[0].endswith('wuerstchen generate "a red fox" --out fox.png --seed 0')
    ci_line = re.search(r"grep -m1 -F '([^']+)' README.md", (root / ".ci" / "run").read_text())
    assert ci_line is not None and ci_line.group(1) in commands[1]



def test_version_names_the_engine_and_torch(capsys):
    assert _status(["--version"]) == 0
    assert capsys.readouterr().out == f"wuerstchen {engine.__version__} (torch {torch.__version__})\n"


def test_the_command_line_and_the_package_import_without_torch():
    """`--help` is only as fast as the modules it imports: these stay clear of torch, and engine's names are
    imported when first used."""
    code = ("import sys, engine, engine.errors, engine.cli, engine.precision, engine.png, export.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'engine.pipeline') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
    assert engine.WuerstchenPipeline.__module__ == "engine.pipeline" and "Recipe" in dir(engine)
    with pytest.raises(AttributeError, match="module 'engine' has no attribute 'Pipeline'"):
        engine.Pipeline  # noqa: B018


def test_a_scheduler_failure_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    """The command line catches the scheduler's refusals without importing the scheduler itself."""
    from engine.scheduler import QueueFull

    def full(args, backend=None):
        raise QueueFull("the queue holds 4 requests, its limit", retry_after=1.0)

    monkeypatch.setattr("engine.cli.resolve_flags", full)
    assert main(["generate", "x", "--out", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == "wuerstchen generate: failed: the queue holds 4 requests, its limit\n"


@pytest.mark.parametrize("spelling", sorted(_SPELLINGS))
def test_every_precision_spelling_is_taken_in_any_case(spelling):
    expected = _SPELLINGS[spelling]
    for written in (spelling, spelling.upper(), spelling.title()):
        assert Precision.parse(written) is expected
    assert Precision.parse(expected.torch_dtype) is expected


def test_dtype_help_lists_exactly_what_is_taken(capsys):
    assert _status(["export", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--dtype DTYPE auto (fp16 on a GPU, fp32 on the CPU), {Precision.describe()} (default fp32)" in help_text
    listed = set(re.findall(r"[a-z0-9]+", Precision.describe().replace("in any case", ""))) - {"or"}
    assert listed == set(_SPELLINGS)


def test_fp16_on_the_cpu_warns_once_in_one_line(tmp_path, capsys):
    tiny = ModelSource.from_preset("tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for dtype in ("fp16", "FP16", "half", "fp32", "auto"):
            resolve(tiny, device="cpu", dtype=dtype)
    assert [str(w.message) for w in caught if w.category is SlowPrecisionWarning] == [
        "dtype='fp16' on the CPU is slower than fp32 on most CPUs (PyTorch's CPU kernels are fastest in fp32): pass "
        "fp32 unless you need the lower precision's numbers"]

    assert main(["generate", "x", "--dtype", "BFloat16", "--out", str(tmp_path / "x.png"), *SMALL]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert warned == ["wuerstchen: warning: dtype='bf16' on the CPU is slower than fp32 on most CPUs (PyTorch's CPU "
                      "kernels are fastest in fp32): pass fp32 unless you need the lower precision's numbers"]


# --- PNG metadata from Python --------------------------------------------------------------------------------

def test_write_png_stores_text_and_writes_whole_files(tmp_path, monkeypatch):
    from engine.png import write_png

    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    path = tmp_path / "fox.png"
    text = {"prompt": "ein Fuchs im Schnee ❄", "seed": 7, "settings": {"height": 4, "steps": [1, 2]}}
    write_png(path, image, text)
    first = path.read_bytes()
    stored = Image.open(path)
    assert stored.text == {"prompt": "ein Fuchs im Schnee ❄", "seed": "7", "settings": '{"height": 4, "steps": [1, 2]}'}
    assert np.array_equal(np.asarray(stored), np.asarray(image))
    write_png(path, image, text)
    assert path.read_bytes() == first  # nothing time-dependent

    def disk_full(self, file, *args, **kwargs):
        file.write(b"\x89PNG, cut short")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        write_png(path, image, {"seed": 8})
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["fox.png"]


@pytest.mark.parametrize("text, message", [
    ({"": "x"}, r"^text key '': expected 1 to 79 printable ASCII characters \(a PNG keyword\)$"),
    ({"k" * 80: "x"}, r"^text key 'k{80}': expected 1 to 79 printable ASCII characters"),
    ({"Schlüssel": "x"}, r"^text key 'Schlüssel': expected 1 to 79 printable ASCII characters"),
    ({"seed": object}, r"^text\['seed'\]=<class 'object'>: expected a string or a JSON value$"),
])
def test_write_png_refuses_what_a_png_cannot_hold(tmp_path, text, message):
    from engine.png import write_png

    with pytest.raises(WuerstchenError, match=message):
        write_png(tmp_path / "x.png", Image.new("RGB", (2, 2)), text)
    assert not list(tmp_path.iterdir())


# --- CLIP's real vocabulary ----------------------------------------------------------------------------------

CLIP_WHEEL = "open-clip-torch==3.3.0"  # ships CLIP's BPE file; read from the wheel, never installed
BPE_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file


@pytest.fixture(scope="session")
def clip_bpe(pytestconfig) -> str:
    """CLIP's BPE file: from an installed open-clip-torch, else from its wheel, fetched once without its
    dependencies (which would replace torch) into pytest's cache. Skips where neither can be had."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(spec.submodule_search_locations[0]) / Path(BPE_IN_WHEEL).name
        if packaged.is_file():
            return gzip.decompress(packaged.read_bytes()).decode("utf-8")
    cache = pytestconfig.cache.mkdir("clip-bpe")
    extracted = cache / "bpe_simple_vocab_16e6.txt"
    if not extracted.is_file():
        fetch = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--retries",
                 "0", "--timeout", "20", "--dest", str(cache), CLIP_WHEEL]
        result = subprocess.run(fetch, capture_output=True, text=True, timeout=300)
        wheels = sorted(cache.glob("open_clip_torch-*.whl"))
        if result.returncode or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"CLIP's BPE vocabulary is not here: install open-clip-torch, or let `pip download "
                        f"{CLIP_WHEEL} --no-deps` reach PyPI ({reason})")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = gzip.decompress(wheel.read(BPE_IN_WHEEL))
        partial = extracted.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(extracted)
    return extracted.read_text(encoding="utf-8")


def _published_tokenizer_folder(bpe: str, folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tokenizer folder as warp-ai/wuerstchen's and warp-ai/wuerstchen-prior's: vocab.json (49,408 entries),
    merges.txt, special_tokens_map.json and tokenizer_config.json. Returns the vocabulary and the merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = [tuple(line.split(" ")) for line in bpe.split("\n")[1:MERGES + 1]]
    symbols = list(bytes_to_unicode().values())  # the 256 byte symbols, in CLIP's order
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(merge) for merge in merges),
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}))
    return vocab, merges


PROMPTS = [
    "a photo of a cat", "A PHOTO OF A CAT", "an astronaut riding a horse, oil painting", "", " ", "a",
    "a red fox in the snow, highly detailed, 4k, trending on artstation",
    "portrait of an old man with a beard, in the style of van gogh", "cinematic lighting; golden hour!!!",
    "don't stop believin'", "DON'T STOP", "it's 3:45pm on 2024-01-31", "1234567890 3.14159 1e-5 #hashtag @user",
    "(masterpiece:1.2), [[best quality]], {cute}", "a—b–c-d_e", "“quoted” ‘single’ «guillemets» „low“",
    "hello...world?!", "snake_case and camelCase and kebab-case", "C++ / C# / F# / Node.js", "100% & 50$ < 3 > 2",
    "&amp; &lt;b&gt; <b>bold</b> <|startoftext|> <|endoftext|>", "emoji 😀🦊🌅 and 👩🏽‍🚀 and 🇩🇪",
    "café naïve déjà vu façade", "cafe\u0301 nai\u0308ve", "Ångström Øre Æsir Œuvre", "straße STRASSE",
    "日本語のテキスト", "中文提示词：一只狐狸", "한국어 프롬프트", "русский текст про лису", "ελληνικά γράμματα",
    "العربية نص", "עברית", "हिन्दी पाठ", "ภาษาไทย", "Tiếng Việt có dấu", "mixed 日本 and English and 😀",
    "tabs\tand\nnewlines\r\nand  double  spaces", "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth\u200cjoiners\u200d", "ﬁ ligature ﬂ and fullwidth ＡＢＣ１２３", "ⅰⅱⅲ ① ² ½ ™ ©",
    "math ∑ ∫ √ ∞ ≠ ≤", "arrows → ← ↑ ↓ ⇒", "box ─│┌┐ and blocks ░▒▓█", "\x00 control \x07 chars \x1b[0m",
    "a" * 100, "ab " * 60, "word " * 80, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "https://example.com/path?query=1&x=y#frag", "user@example.com", "repeated!!!!!!!!!!!!!!!!!!!!",
    "a photo of a cat " * 12, "The Quick Brown Fox Jumps Over The Lazy Dog", "lowercase then UPPERCASE then MiXeD",
]


def test_the_engine_reads_clips_real_vocabulary_as_transformers_does(clip_bpe, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from engine.text import PromptTruncatedWarning, load_text_encoder

    vocab, merges = _published_tokenizer_folder(clip_bpe, tmp_path / "tokenizer")
    assert len(vocab) == 49408 and len(merges) == MERGES
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77)
    torch.manual_seed(0)
    CLIPTextModel(text_config).save_pretrained(tmp_path / "text_encoder")

    encoder = load_text_encoder(tmp_path, torch.device("cpu"), torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = encoder.tokenize(PROMPTS)
        states = encoder(PROMPTS[:4])
    reference = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert len(PROMPTS) >= 50 and ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, expected.input_ids) and torch.equal(mask, expected.attention_mask)

    # CLIP's own ids for a few words, and its special tokens: the vocabulary is the real one.
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # <start> a photo of a cat <end>
    assert ids[1, :7].tolist() == ids[0, :7].tolist()  # lowercased
    assert ids[3, :3].tolist() == [49406, 49407, 49407]  # the empty prompt, padded with <end>
    truncated = [i for i, prompt in enumerate(PROMPTS) if len(reference(prompt).input_ids) > 77]
    assert truncated and all(ids[i, -1] == 49407 and mask[i].all() for i in truncated)
    assert sum(issubclass(w.category, PromptTruncatedWarning) for w in caught) == len(truncated)
    assert states.shape == (4, 77, 8) and torch.isfinite(states).all()
