"""Hub repo ids, resolved offline against a cache laid out as huggingface_hub lays it out: the two published
repos by id, and diffusers' combined repo, whose model card names its prior."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from engine import WuerstchenError, WuerstchenPipeline
from engine.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CARD = "---\nlicense: mit\nprior:\n- warp-ai/wuerstchen-prior\ntags:\n- text-to-image\n---\n# Würstchen\n"


def _cache_repo(cache, repo_id: str, folder, card: str | None = None) -> None:
    """`folder` as the main revision of `repo_id` in a huggingface_hub cache: refs/main names a commit whose
    snapshot holds the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    if card is not None:
        (repo / "snapshots" / COMMIT / "README.md").write_text(card)


@pytest.fixture
def hub_cache(tiny_folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _cache_repo(cache, "warp-ai/wuerstchen-prior", tiny_folders[0])
    _cache_repo(cache, "warp-ai/wuerstchen", tiny_folders[1], CARD)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no folder named warp-ai/ here: the names are repo ids
    return cache


KWARGS = dict(prompt="a red boat", height=128, width=256, prior_num_inference_steps=2, num_inference_steps=2,
              output_type="np")


def _images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**KWARGS, generator=torch.Generator().manual_seed(1)).images


def test_repo_ids_and_the_combined_repo_load_the_cached_weights(hub_cache, tiny_pipeline):
    expected = _images(tiny_pipeline)
    by_ids = WuerstchenPipeline.from_pretrained("warp-ai/wuerstchen-prior", "warp-ai/wuerstchen", device="cpu",
                                                dtype="fp32")
    combined = WuerstchenPipeline.from_pretrained("warp-ai/wuerstchen", device="cpu", dtype="fp32")
    assert np.array_equal(_images(by_ids), expected) and np.array_equal(_images(combined), expected)
    assert combined.runtime.source.names == ("warp-ai/wuerstchen-prior", "warp-ai/wuerstchen")
    assert combined.runtime.describe().startswith("warp-ai/wuerstchen-prior + warp-ai/wuerstchen on torch")


def test_the_command_line_takes_repo_ids(hub_cache, tmp_path):
    out = tmp_path / "boat.png"
    assert main(["generate", "a red boat", "--decoder", "warp-ai/wuerstchen", "--height", "128", "--width", "128",
                 "--prior-steps", "2", "--decoder-steps", "2", "--seed", "1", "--out", str(out)]) == 0
    assert out.is_file()


def test_a_repo_missing_from_the_cache_offline_is_one_line(hub_cache, capsys):
    with pytest.raises(WuerstchenError, match=r"^prior='warp-ai/other-prior' is not in the Hugging Face cache "
                                              r"\(.*hub\) and HF_HUB_OFFLINE is set: download it where the Hub"):
        WuerstchenPipeline.from_pretrained("warp-ai/other-prior", "warp-ai/wuerstchen")
    assert main(["generate", "x", "--out", "x.png", "--decoder", "warp-ai/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--decoder 'warp-ai/nothing' is not in the Hugging Face cache" in err


def test_a_decoder_alone_must_name_its_prior(hub_cache, tiny_folders):
    with pytest.raises(WuerstchenError, match=r"^decoder='.*' names no prior: pass the prior folder too"):
        WuerstchenPipeline.from_pretrained(tiny_folders[1])  # a local folder without a model card


@pytest.mark.parametrize("named", ["/etc", "../prior", "warp-ai/../../etc", "{ 'a': 1 }"])
def test_a_model_card_names_a_repo_never_a_local_path(hub_cache, tiny_folders, tmp_path, named):
    combined = tmp_path / "combined"
    shutil.copytree(tiny_folders[1], combined)
    (combined / "README.md").write_text(f"---\nprior:\n- {named}\n---\n")
    with pytest.raises(WuerstchenError, match=rf"^{re.escape(str(combined / 'README.md'))}: prior=.* in its front "
                                              r"matter: expected a Hub repo id such as warp-ai/wuerstchen-prior$"):
        WuerstchenPipeline.from_pretrained(combined)


def test_a_model_card_s_repo_id_is_looked_up_on_the_hub_even_where_a_folder_has_its_name(
        hub_cache, tiny_folders, tmp_path, monkeypatch):
    combined = tmp_path / "combined"
    shutil.copytree(tiny_folders[1], combined)
    (combined / "README.md").write_text(CARD)
    (tmp_path / "warp-ai" / "wuerstchen-prior").mkdir(parents=True)  # an empty folder of the card's name, here
    monkeypatch.chdir(tmp_path)
    pipe = WuerstchenPipeline.from_pretrained(combined, device="cpu", dtype="fp32")
    assert pipe.runtime.source.prior.name == COMMIT  # the cached snapshot
