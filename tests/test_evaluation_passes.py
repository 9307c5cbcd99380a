"""Evaluation runs one backbone pass per distinct model input and per test image, and sharing changes no number.

A forward hook on the backbone's patch embedding counts the passes (one call per pass and batch; the batch size is
larger than the split, so a call's batch size tells the split: 3 test and 6 train images).
"""

import pytest
import torch

from ivpt import IvptForImageClassification
from ivpt.data import generate_cub
from ivpt.evaluation import EvaluationSettings, evaluate_interpretability, parse_metrics
from ivpt.evaluation.passes import SharedForward

from conftest import tiny_config

TEST_IMAGES, TRAIN_IMAGES = 3, 6

# (settings, keep_examples) -> backbone passes per test image: the number of distinct model inputs
# (the published protocol: accuracy, consistency, stability-noisy, parts on unnormalised images; with normalised parts
# input the parts metrics read the accuracy pass; the figures' part logits come from the consistency pass)
VARIANTS = {
    "published": (dict(), False, 4),
    "normalise_parts_input": (dict(normalise_parts_input=True), False, 3),
    "normalise_parts_input + keep_examples": (dict(normalise_parts_input=True), True, 3),
}


@pytest.fixture(scope="module")
def cub_dir(tmp_path_factory):
    return generate_cub(tmp_path_factory.mktemp("cub"), classes=3, images_per_class=3, size=96, seed=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return IvptForImageClassification(tiny_config(num_labels=3)).eval()


def _evaluate(model, cub_dir, cache, metrics, settings_kwargs, keep_examples=False):
    settings = EvaluationSettings(batch_size=64, **settings_kwargs)
    return evaluate_interpretability(model, str(cub_dir), metrics, settings, device="cpu", cache_dir=str(cache),
                                     keep_examples=keep_examples)


def _count_passes(model, run) -> tuple[int, int, dict]:
    """(backbone passes per test image, per train image, the result of `run()`)."""
    sizes = []
    handle = model.ivpt.backbone.patch_embed.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    try:
        result = run()
    finally:
        handle.remove()
    assert set(sizes) <= {TEST_IMAGES, TRAIN_IMAGES}
    return sizes.count(TEST_IMAGES), sizes.count(TRAIN_IMAGES), result


def _unshared(monkeypatch):
    """Every request for model outputs runs its own forward (the evaluation before passes were shared)."""
    monkeypatch.setattr(SharedForward, "__call__", lambda self, pixels, noise=False: self.context.forward(pixels, noise))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_metrics_all_runs_one_backbone_pass_per_distinct_model_input(variant, model, cub_dir, tmp_path, monkeypatch):
    settings_kwargs, keep_examples, minimum = VARIANTS[variant]
    run = lambda: _evaluate(model, cub_dir, tmp_path, "all", settings_kwargs, keep_examples)  # noqa: E731
    test_passes, train_passes, shared = _count_passes(model, run)
    assert (test_passes, train_passes) == (minimum, 1)  # train: the KPR fit
    assert shared["processes"] == {"classification": [3], "box_crop": [3], "parts": [3]}

    with monkeypatch.context() as patch:
        _unshared(patch)
        unshared_passes, _, unshared = _count_passes(model, run)
    assert unshared_passes == {"published": 4, "normalise_parts_input": 4,
                               "normalise_parts_input + keep_examples": 5}[variant]  # before sharing
    assert shared["metrics"] == unshared["metrics"]  # bit-identical numbers
    assert list(shared["metrics"]) == list(unshared["metrics"])  # and the same order in metrics.json
    if keep_examples:
        assert len(shared["examples"]) == TEST_IMAGES
        for a, b in zip(shared["examples"], unshared["examples"]):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_shared_numbers_equal_each_metric_evaluated_alone(model, cub_dir, tmp_path):
    together = _evaluate(model, cub_dir, tmp_path, "all", dict(normalise_parts_input=True))["metrics"]
    alone = {}
    for name in parse_metrics("all"):
        alone |= _evaluate(model, cub_dir, tmp_path, [name], dict(normalise_parts_input=True))["metrics"]
    assert together == alone


def test_routing_noise_in_the_accuracy_pass_is_never_shared(model, cub_dir, tmp_path):
    """With routing noise the accuracy forward is a random draw: its own pass, not the parts metrics' pass."""
    settings = dict(normalise_parts_input=True, sample_routing_noise=True)
    test_passes, _, _ = _count_passes(model, lambda: _evaluate(model, cub_dir, tmp_path, "all", settings))
    assert test_passes == 4
