"""Shared fixtures. Tests never touch the network: the Hub and datasets are forced offline before any import."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_BACKBONE_KWARGS = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8}


def tiny_config(**overrides):
    """A 4-block, 32-wide ViT at 64 px (8x8 patch grid) with three stages; fast enough for CPU unit tests."""
    from ivpt import IvptConfig

    kwargs = dict(backbone_kwargs=TINY_BACKBONE_KWARGS, image_size=64, n_pro="6,5,4", num_labels=7)
    kwargs.update(overrides)
    return IvptConfig(**kwargs)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model(config):
    from ivpt import IvptForImageClassification

    torch.manual_seed(0)
    return IvptForImageClassification(config)
