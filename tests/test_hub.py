"""Config validation, save/load, remote-code loading in a fresh process, pipeline, converter, backbone weights."""

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForImageClassification

from ivpt import IvptConfig, IvptForImageClassification, IvptModel
from ivpt.convert_official import convert, main as convert_main
from ivpt.image_processing import make_image_processor

from conftest import TINY_BACKBONE_KWARGS, load_in_fresh_process, tiny_config


# ---- configuration -----------------------------------------------------------------------------------------------


def test_config_defaults_are_the_paper_setup():
    config = IvptConfig()
    assert config.backbone == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert config.n_pro == [17, 14, 11, 8, 5] and config.image_size == 518 and config.num_labels == 200
    assert config.num_parts == 4 and config.num_prompted_blocks == 4 and config.grid_size == 37
    assert config.backbone_geometry == {"patch_size": 14, "depth": 12, "hidden_size": 768, "num_prefix_tokens": 5}


def test_n_pro_accepts_string_and_round_trips(tmp_path):
    config = tiny_config(n_pro="7, 5,4")
    assert config.n_pro == [7, 5, 4]
    config.save_pretrained(tmp_path)
    reloaded = IvptConfig.from_pretrained(tmp_path)
    assert reloaded.n_pro == [7, 5, 4] and reloaded.backbone_kwargs == TINY_BACKBONE_KWARGS
    assert reloaded.num_labels == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_pro=[5]), "`n_pro`: expected at least 2 stages"),
        (dict(n_pro="5,1"), "`n_pro`: expected at least 2 stages"),
        (dict(n_pro="5,a"), "`n_pro`: expected comma-separated integers"),
        (dict(n_pro=[6, 6, 6, 6, 6, 5]), "backbone has 4 blocks"),
        (dict(image_size=60), "`image_size`: expected a multiple of the backbone patch size 8"),
        (dict(image_size=24), "patch grid must be at least 4x4"),
        (dict(backbone="resnet18"), "expected a timm VisionTransformer"),
        (dict(backbone="no_such_model"), "`backbone`: expected a timm model name"),
        (dict(backbone_kwargs={**TINY_BACKBONE_KWARGS, "not_an_arg": 1}), "`backbone_kwargs`: timm rejected"),
        (dict(interpretation_stage_index=3), "`interpretation_stage_index`"),
        (dict(routing_tau=0.0), "`routing_tau`"),
        (dict(equivariance_scale_range=[1.4, 0.8]), "`equivariance_scale_range`"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tiny_config(**overrides)


# ---- save / load -------------------------------------------------------------------------------------------------


def save_tiny(tmp_path, model):
    model.save_pretrained(tmp_path)
    make_image_processor(model.config.image_size).save_pretrained(tmp_path)
    return tmp_path


def test_save_load_round_trip(tmp_path, model):
    model.eval()
    save_tiny(tmp_path, model)
    assert {"model.safetensors", "config.json", "configuration_ivpt.py", "modeling_ivpt.py", "losses.py",
            "preprocessor_config.json"} <= set(os.listdir(tmp_path))
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_ivpt.IvptForImageClassification"
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, IvptForImageClassification)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x).logits, reloaded(x).logits, rtol=0, atol=0)
    # the docs/method.md#parameter-groups freezing survives loading (transformers re-creates loaded Parameters with requires_grad=True)
    frozen = lambda m: {n for n, p in m.named_parameters() if not p.requires_grad}  # noqa: E731
    assert frozen(reloaded) == frozen(model) and "ivpt.backbone.blocks.0.attn.qkv.weight" in frozen(reloaded)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), IvptConfig)


def test_base_model_loads_from_classifier_checkpoint(tmp_path, model):
    save_tiny(tmp_path, model)
    base = IvptModel.from_pretrained(tmp_path)
    torch.testing.assert_close(base.stages[0].prototypes, model.ivpt.stages[0].prototypes)


def test_fresh_process_remote_code_and_pipeline(tmp_path, model):
    """`python -I` from another directory, `ivpt` blocked: AutoModel and pipeline work and match this process."""
    model.eval()
    checkpoint = save_tiny(tmp_path / "checkpoint", model)
    pixels = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    loaded = load_in_fresh_process(checkpoint, pixels, tmp_path)
    assert loaded["module"].startswith("transformers_modules")  # the shipped code, not the installed package

    processor = make_image_processor(64)
    image = Image.fromarray(pixels)
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits[0]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), logits, rtol=1e-5, atol=1e-6)
    top = logits.softmax(-1).topk(3)
    assert [p["label"] for p in loaded["pipeline"]] == [model.config.id2label[i] for i in top.indices.tolist()]
    assert [p["score"] for p in loaded["pipeline"]] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert len(loaded["pipeline_gray"]) == 3  # grayscale input is converted to RGB


# ---- converter ---------------------------------------------------------------------------------------------------


def release_snapshot(model: IvptForImageClassification) -> dict:
    """A snapshot in the release's key layout (docs/method.md#release-checkpoints), built from our model's tensors."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("ivpt.backbone."):
            state[name.removeprefix("ivpt.backbone.")] = tensor.clone()
        elif name == "classifier.weight":
            state["fc_class_landmarks.weight"] = tensor.clone()
        elif name.startswith("ivpt.modulation."):
            state[name.removeprefix("ivpt.")] = tensor.clone()
        else:
            _, _, stage, field, *rest = name.split(".")
            release = {"prototypes": "p_token", "position_bias": "p_bias", "prompt_projection": "p_linear",
                       "prompt_norm": "p_norm", "routing_head": "p_classifier"}[field]
            value = tensor.clone()[None] if field in ("prototypes", "position_bias") else tensor.clone()
            state[".".join([release, stage, *rest])] = value
    return {"model_state": state, "optimizer_state": {}, "finished_epoch": 25, "epoch_test_accuracies": [90.0]}


def test_converter_round_trip(tmp_path, model):
    model.eval()
    snapshot = release_snapshot(model)
    assert "p_token.0" in snapshot["model_state"] and snapshot["model_state"]["p_token.0"].shape == (1, 6, 32)
    torch.save(snapshot, tmp_path / "snapshot_best.pt")
    convert_main([
        str(tmp_path / "snapshot_best.pt"), str(tmp_path / "hf"), "--n_pro", "6,5,4", "--image_size", "64",
        "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS),
    ])
    converted = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert converted.config.num_labels == 7  # read from fc_class_landmarks.weight
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(converted(x).logits, model(x).logits, rtol=0, atol=0)
    assert (tmp_path / "hf" / "preprocessor_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # no staging leftovers


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda s: s.update({"p_extra.0": torch.zeros(1)}), KeyError, "unknown key 'p_extra.0'"),
        (lambda s: s.pop("p_bias.1"), KeyError, "missing keys.*ivpt.stages.1.position_bias"),
        (lambda s: s.update({"p_token.0": torch.zeros(1, 9, 32)}), ValueError, "shape of 'p_token.0'"),
        (lambda s: s.update({"p_token.7": torch.zeros(1, 9, 32)}), KeyError, "'p_token.7'"),
    ],
)
def test_converter_errors_name_the_key(tmp_path, model, edit, error, message):
    snapshot = release_snapshot(model)
    edit(snapshot["model_state"])
    torch.save(snapshot, tmp_path / "snap.pt")
    with pytest.raises(error, match=message):
        convert(str(tmp_path / "snap.pt"), str(tmp_path / "out"), n_pro="6,5,4", image_size=64,
                backbone_kwargs=TINY_BACKBONE_KWARGS)
    assert not (tmp_path / "out").exists()


def test_converter_refuses_non_empty_output(tmp_path, model):
    torch.save(release_snapshot(model), tmp_path / "snap.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="out_dir"):
        convert(str(tmp_path / "snap.pt"), str(tmp_path / "out"), n_pro="6,5,4", image_size=64,
                backbone_kwargs=TINY_BACKBONE_KWARGS)
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


# ---- pretrained backbone weights ---------------------------------------------------------------------------------


def test_from_backbone_loads_local_timm_weights(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=64,
                               **TINY_BACKBONE_KWARGS)
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    model = IvptForImageClassification.from_backbone(
        "vit_base_patch14_reg4_dinov2", backbone_weights=str(tmp_path / "backbone.safetensors"),
        backbone_kwargs=TINY_BACKBONE_KWARGS, image_size=64, n_pro="6,5,4", num_labels=7,
    )
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(model.ivpt.backbone.state_dict()[name], tensor, msg=name)
    assert not model.ivpt.backbone.blocks[0].attn.qkv.weight.requires_grad
    assert model.ivpt.backbone.cls_token.requires_grad


def test_from_backbone_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="`backbone_weights`"):
        IvptForImageClassification.from_backbone(
            "vit_base_patch14_reg4_dinov2", backbone_weights=str(tmp_path / "missing.safetensors"),
            backbone_kwargs=TINY_BACKBONE_KWARGS, image_size=64, n_pro="6,5,4",
        )
