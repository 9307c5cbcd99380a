"""Convert a snapshot of the official IVPT release into a Hugging Face checkpoint folder.

    python -m ivpt.convert_official snapshot_best.pt OUT_DIR --n_pro 17,14,11,8,5 --image_size 518

The snapshot is a dict whose `model_state` holds the release's key names (docs/method.md#release-checkpoints); it is read with
`torch.load(weights_only=True)`. Unknown keys, missing keys and shape mismatches are errors that name the key.
"""

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .configuration_ivpt import IvptConfig
from .image_processing import make_image_processor
from .modeling_ivpt import IvptForImageClassification

# (release key pattern, our key template, whether the release stores a leading singleton batch axis)
KEY_RULES = (
    (r"p_token\.(\d+)", r"ivpt.stages.\1.prototypes", True),
    (r"p_bias\.(\d+)", r"ivpt.stages.\1.position_bias", True),
    (r"p_linear\.(\d+)\.(weight|bias)", r"ivpt.stages.\1.prompt_projection.\2", False),
    (r"p_norm\.(\d+)\.(weight|bias)", r"ivpt.stages.\1.prompt_norm.\2", False),
    (r"p_classifier\.(\d+)\.(weight|bias)", r"ivpt.stages.\1.routing_head.\2", False),
    (r"modulation\.(weight|bias)", r"ivpt.modulation.\1", False),
    (r"fc_class_landmarks\.weight", r"classifier.weight", False),
    (r"(cls_token|reg_token|pos_embed|patch_embed\..+|blocks\..+|norm\.(?:weight|bias))", r"ivpt.backbone.\1", False),
)


def rename_key(key: str) -> tuple[str, bool]:
    """Our parameter name for a release key, and whether its leading singleton axis must be dropped."""
    for pattern, template, squeeze in KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", template, key), squeeze
    raise KeyError(f"model_state: unknown key {key!r} (not part of the IVPT release layout, docs/method.md#release-checkpoints)")


def convert_state_dict(model_state: dict, expected: dict) -> dict:
    """Maps a release `model_state` onto `expected` (our state dict), checking names and shapes."""
    converted = {}
    for key, tensor in model_state.items():
        new_key, squeeze = rename_key(key)
        tensor = tensor[0] if squeeze else tensor
        if new_key not in expected:
            raise KeyError(f"model_state: key {key!r} -> {new_key!r} does not exist in this configuration")
        if tensor.shape != expected[new_key].shape:
            raise ValueError(
                f"model_state: shape of {key!r} is {tuple(tensor.shape)}, expected {tuple(expected[new_key].shape)} "
                f"for {new_key!r} (check --n_pro, --image_size, --num_labels, --backbone)"
            )
        converted[new_key] = tensor
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise KeyError(f"model_state: missing keys for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return converted


def convert(snapshot_path: str, out_dir: str, **config_kwargs) -> Path:
    """Writes `out_dir` (safetensors, config, code files, image processor) from a release snapshot."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"out_dir: {out_dir} exists and is not empty; choose a new folder")
    snapshot = torch.load(snapshot_path, map_location="cpu", weights_only=True)
    if not isinstance(snapshot, dict) or "model_state" not in snapshot:
        raise KeyError(f"{snapshot_path}: expected a release snapshot dict with a 'model_state' entry")
    model_state = snapshot["model_state"]
    if "num_labels" not in config_kwargs and "fc_class_landmarks.weight" in model_state:
        config_kwargs["num_labels"] = model_state["fc_class_landmarks.weight"].shape[0]
    config = IvptConfig(**config_kwargs)
    with torch.device("meta"):
        expected = IvptForImageClassification(config).state_dict()
    converted = convert_state_dict(model_state, expected)
    model = IvptForImageClassification(config)
    model.load_state_dict(converted, strict=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        make_image_processor(config.image_size).save_pretrained(staging)
        os.replace(staging, out_dir)  # atomic; fails if out_dir appeared meanwhile and is not empty
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", help="release snapshot (.pt) with a 'model_state' entry")
    parser.add_argument("out_dir", help="output folder for the Hugging Face checkpoint")
    parser.add_argument("--n_pro", default="17,14,11,8,5")
    parser.add_argument("--image_size", type=int, default=518)
    parser.add_argument("--backbone", default=IvptConfig.backbone)
    parser.add_argument("--backbone_kwargs", type=json.loads, default={}, help="JSON for timm.create_model")
    parser.add_argument("--num_labels", type=int, help="default: read from fc_class_landmarks.weight")
    args = parser.parse_args(argv)
    kwargs = dict(
        n_pro=args.n_pro, image_size=args.image_size, backbone=args.backbone, backbone_kwargs=args.backbone_kwargs
    )
    if args.num_labels is not None:
        kwargs["num_labels"] = args.num_labels
    print(f"wrote {convert(args.snapshot, args.out_dir, **kwargs)}")


if __name__ == "__main__":
    main()
