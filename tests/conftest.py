"""Shared fixtures. Tests never touch the network: the Hub and datasets are forced offline before any import."""

import json
import os
import tempfile
import textwrap
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402



def pytest_configure(config):
    """Points `IVPT_BAD_INPUT_SUMMARY` at a temporary file unless it is set; the environment is set before the
    pytest-xdist workers start, so the worker that runs tests/test_bad_input.py writes its matrix there."""
    if not os.environ.get("IVPT_BAD_INPUT_SUMMARY") and not hasattr(config, "workerinput"):
        handle, path = tempfile.mkstemp(prefix="ivpt_bad_input_", suffix=".json")
        os.close(handle)
        os.environ["IVPT_BAD_INPUT_SUMMARY"] = config._ivpt_summary_file = path


def pytest_terminal_summary(terminalreporter, config):
    """Prints the bad-input matrix (tests/test_bad_input.py) at the end of the run, in the main process."""
    path = Path(os.environ.get("IVPT_BAD_INPUT_SUMMARY", ""))
    if path.is_file() and path.stat().st_size:
        terminalreporter.write_line("")
        for line in json.loads(path.read_text())["lines"]:
            terminalreporter.write_line(line)
    if getattr(config, "_ivpt_summary_file", None):
        path.unlink(missing_ok=True)


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


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["ivpt"] = None  # the project must not be importable: everything comes from the checkpoint folder
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
    path = sys.argv[1]
    model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    rgb = Image.fromarray(np.load(sys.argv[2]))
    gray = rgb.convert("L")
    with torch.no_grad():
        logits = model(**processor(rgb, return_tensors="pt")).logits[0].tolist()
    classifier = pipeline("image-classification", model=path, trust_remote_code=True)
    print(json.dumps({
        "module": type(model).__module__,
        "logits": logits,
        "pipeline": classifier(rgb, top_k=3),
        "pipeline_gray": classifier(gray, top_k=3),
    }))
    """
)


def load_in_fresh_process(checkpoint, pixels, tmp_path) -> dict:
    """Loads `checkpoint` with AutoModel / AutoImageProcessor / pipeline (`trust_remote_code`) in a `python -I` process
    started in another directory with `ivpt` blocked, on the (H, W, 3) uint8 image `pixels`; returns the model's
    module, its logits and the pipeline's top-3 for the image and its grayscale copy."""
    import json
    import subprocess
    import sys

    import numpy as np

    np.save(tmp_path / "image.npy", pixels)
    script = tmp_path / "load.py"
    script.write_text(_REMOTE_SCRIPT)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(checkpoint), str(tmp_path / "image.npy")], cwd=workdir, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
