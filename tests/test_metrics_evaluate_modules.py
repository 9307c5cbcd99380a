"""The local `evaluate` modules load offline and agree with the pure functions."""

import os

import evaluate
import numpy as np
import pytest
import torch

from ivpt.metrics import EVALUATE_MODULES, classification_accuracies, evaluate_module_path, nmi_ari


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("name", EVALUATE_MODULES)
def test_modules_load_from_their_local_folder(name):
    path = evaluate_module_path(name)
    assert os.path.isfile(os.path.join(path, f"{name}.py"))
    module = evaluate.load(path)
    assert module.name == name


def test_accuracy_module_matches_pure_function():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 12, generator=generator)
    labels = torch.randint(0, 12, (64,), generator=generator)
    metric = evaluate.load(evaluate_module_path("ivpt_accuracy"))
    for start in range(0, 64, 16):  # streamed like an evaluation loop
        batch = slice(start, start + 16)
        metric.add_batch(predictions=logits[batch].tolist(), references=labels[batch].tolist())
    result = metric.compute()
    expected = classification_accuracies(logits, labels)
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-9)
    top3 = evaluate.load(evaluate_module_path("ivpt_accuracy")).compute(
        predictions=logits.tolist(), references=labels.tolist(), top_k=[3]
    )
    assert set(top3) == {"top3_micro", "top3_macro"}


def test_nmi_ari_module_matches_pure_function():
    rng = np.random.default_rng(1)
    predicted, ground_truth = rng.integers(0, 11, 300), rng.integers(0, 15, 300)
    result = evaluate.load(evaluate_module_path("ivpt_nmi_ari")).compute(
        predictions=predicted.tolist(), references=ground_truth.tolist()
    )
    assert result == pytest.approx(nmi_ari(predicted, ground_truth))


def test_unknown_module_name():
    with pytest.raises(ValueError, match="`name`"):
        evaluate_module_path("accuracy")
