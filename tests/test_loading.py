"""Loading diffusers' folder layouts in every file format, and the one-line error for each bad folder."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from engine import WuerstchenError, WuerstchenPipeline
from engine.config import DecoderConfig, PriorConfig, VQGANConfig
from engine.models import Decoder, Prior, VQGANDecoder
from engine.weights import load_stage

CPU = torch.device("cpu")


@pytest.fixture
def folders(tiny_folders, tmp_path):
    """A private copy of the tiny folders that a test may damage."""
    prior, decoder = (shutil.copytree(src, tmp_path / src.name) for src in tiny_folders)
    return prior, decoder


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_loaded_models_live_on_the_device_with_every_weight_from_the_file(tiny_pipeline):
    for model in (tiny_pipeline.stages.prior, tiny_pipeline.stages.decoder, tiny_pipeline.stages.vqgan):
        assert all(p.device == CPU and p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
        assert not model.training


@pytest.mark.parametrize("save", [
    dict(max_shard_size="20KB"),  # sharded safetensors with an index
    dict(safe_serialization=False),  # .bin, read with weights_only=True
    dict(variant="fp16"),  # diffusion_pytorch_model.fp16.safetensors, and nothing else
])
def test_every_checkpoint_format_loads_the_same_weights(reference_modules, tiny_pipeline, tmp_path, save):
    folder = tmp_path / "decoder"
    reference_modules["decoder"].save_pretrained(folder, **save)
    loaded = load_stage("decoder", Decoder, tiny_pipeline.config.decoder, folder, CPU, torch.float32)
    if save.get("variant"):
        assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    if save.get("max_shard_size"):
        assert len(list(folder.glob("*.safetensors"))) > 1
    assert _same_weights(loaded, tiny_pipeline.stages.decoder)


def test_fp16_variant_is_chosen_on_request(reference_modules, tiny_pipeline, tmp_path):
    folder = tmp_path / "vqgan"
    reference_modules["vqgan"].save_pretrained(folder)
    copy.deepcopy(reference_modules["vqgan"]).half().save_pretrained(folder, variant="fp16")
    config = tiny_pipeline.config.vqgan
    plain = load_stage("vqgan", VQGANDecoder, config, folder, CPU, torch.float32)
    half = load_stage("vqgan", VQGANDecoder, config, folder, CPU, torch.float32, variant="fp16")
    assert _same_weights(plain, tiny_pipeline.stages.vqgan)
    assert not _same_weights(half, plain)
    plain_state = plain.state_dict()
    assert all(torch.equal(tensor, plain_state[key].half().float()) for key, tensor in half.state_dict().items())


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_folder_is_named(folders, tmp_path):
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(tmp_path / "nowhere", folders[1])
    assert _message(excinfo) == f"prior='{tmp_path / 'nowhere'}': folder does not exist"


def test_swapped_folders_say_which_layout_was_expected(folders):
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(prior=folders[1], decoder=folders[0])
    expected = f"{folders[1] / 'prior'} does not exist; expected the layout of warp-ai/wuerstchen-prior"
    assert expected in _message(excinfo)


def test_missing_weight_file_is_named(folders):
    (folders[1] / "vqgan" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    assert _message(excinfo).startswith(f"no weights in {folders[1] / 'vqgan'}: expected diffusion_pytorch_model")


def test_missing_shard_is_named(reference_modules, tiny_pipeline, tmp_path):
    folder = tmp_path / "decoder"
    reference_modules["decoder"].save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WuerstchenError) as excinfo:
        load_stage("decoder", Decoder, tiny_pipeline.config.decoder, folder, CPU, torch.float32)
    assert _message(excinfo).startswith(f"shard {shard} listed in")


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors_file_is_named(folders, keep):
    path = folders[0] / "prior" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    assert _message(excinfo).startswith(f"weight file {path} is truncated or corrupt: ")


def test_corrupt_bin_file_is_named(reference_modules, tiny_pipeline, tmp_path):
    folder = tmp_path / "prior"
    reference_modules["prior"].save_pretrained(folder, safe_serialization=False)
    path = folder / "diffusion_pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WuerstchenError) as excinfo:
        load_stage("prior", Prior, tiny_pipeline.config.prior, folder, CPU, torch.float32)
    assert _message(excinfo).startswith(f"weight file {path} is truncated or corrupt: ")


def test_truncated_text_encoder_is_named(folders):
    path = folders[1] / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    assert _message(excinfo).startswith(f"text encoder in {folders[1] / 'text_encoder'} could not be loaded")


def test_a_text_encoder_tensor_of_the_wrong_shape_is_named_in_one_line(folders, capsys, caplog):
    from safetensors.torch import load_file, save_file

    path = folders[1] / "text_encoder" / "model.safetensors"
    weights = load_file(path)
    name = next(key for key in weights if key.endswith("position_embedding.weight"))
    weights[name] = weights[name][:-1].clone()
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    rows, width = weights[name].shape
    assert _message(excinfo) == (f"weights in {path.parent} do not match its config.json: missing keys [], mismatched "
                                 f"['{name} ({rows}, {width}) (expected ({rows + 1}, {width}))']")
    assert "LOAD REPORT" not in capsys.readouterr().err + caplog.text  # transformers' table is held back


def _edit_config(path, **changes):
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def test_config_with_more_layers_than_the_weights_lists_missing_keys(folders):
    _edit_config(folders[0] / "prior" / "config.json", depth=3)
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    message = _message(excinfo)
    assert message.startswith(f"weights in {folders[0] / 'prior'} do not match {folders[0] / 'prior' / 'config.json'}")
    assert "missing keys [layers.2.attn.kv_mapper.bias, layers.2.attn.kv_mapper.weight" in message
    assert "unexpected keys []" in message


def test_config_with_fewer_blocks_than_the_weights_lists_unexpected_keys(folders):
    _edit_config(folders[1] / "decoder" / "config.json", blocks=[1, 1, 1, 0])
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    assert "unexpected keys [down_blocks.3.1.depthwise.bias, down_blocks.3.1.depthwise.weight" in _message(excinfo)


def test_config_with_other_widths_lists_the_mismatching_shapes(folders):
    _edit_config(folders[1] / "vqgan" / "config.json", embed_dim=32)
    with pytest.raises(WuerstchenError) as excinfo:
        WuerstchenPipeline.from_pretrained(*folders)
    assert "up_blocks.0.0.weight is (16, 4, 1, 1) in the file, (32, 4, 1, 1) by the config" in _message(excinfo)


def test_config_with_unknown_or_missing_keys_is_refused(folders):
    _edit_config(folders[0] / "prior" / "config.json", heads=3)
    with pytest.raises(WuerstchenError, match=r"unknown keys \['heads'\]"):
        WuerstchenPipeline.from_pretrained(*folders)
    config = json.loads((folders[1] / "vqgan" / "config.json").read_text())
    del config["levels"]
    (folders[1] / "vqgan" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WuerstchenError, match=r"missing keys \['levels'\]"):
        VQGANConfig.from_json(folders[1] / "vqgan" / "config.json")


def test_stage_widths_are_checked_against_the_text_encoders(folders):
    _edit_config(folders[0] / "prior" / "config.json", c_cond=48)
    with pytest.raises(WuerstchenError, match=r"prior c_cond=48 must equal the prior text encoder's width 32"):
        WuerstchenPipeline.from_pretrained(*folders)


def test_config_validation_names_the_field():
    with pytest.raises(WuerstchenError, match=r"prior c=30 must be divisible by nhead=4"):
        PriorConfig(c=30, nhead=4)
    with pytest.raises(WuerstchenError, match=r"decoder blocks=\(1, 1\): expected 4 entries, one per level"):
        DecoderConfig(blocks=(1, 1))
    with pytest.raises(WuerstchenError, match=r"decoder level_config\[1\]='TC': expected letters C, T, A"):
        DecoderConfig(level_config=("CT", "TC", "CTA", "CTA"))


def test_vqgan_encoder_weights_are_skipped_not_unexpected(tiny_folders):
    from safetensors import safe_open

    with safe_open(str(tiny_folders[1] / "vqgan" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vquantizer.") for k in keys) and any(k.startswith("down_blocks.") for k in keys)
