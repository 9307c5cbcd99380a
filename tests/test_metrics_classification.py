"""Tests of the docs/method.md#classification-accuracy classification accuracies (ivpt.metrics.classification)."""

import pytest
import torch

from ivpt.metrics import classification_accuracies, top_k_accuracy, top_k_correct


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def literal_top_k_accuracy(logits, labels, k, average):
    """Spec docs/method.md#classification-accuracy written as loops: a label is correct if fewer than k classes score higher."""
    correct = []
    for row, label in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        correct.append(label in order[:k])
    if average == "micro":
        return 100.0 * sum(correct) / len(correct)
    recalls = []
    for c in range(logits.shape[1]):
        members = [ok for ok, label in zip(correct, labels.tolist()) if label == c]
        predicted = any(c in sorted(range(len(row)), key=lambda j: -row[j])[:k] for row in logits.tolist())
        if members or predicted:  # torchmetrics 1.2.1: a class counts when tp + fp + fn > 0
            recalls.append(sum(members) / len(members) if members else 0.0)
    return 100.0 * sum(recalls) / len(recalls)


def test_hand_computed_case():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: top-1
            [0.5, 0.3, 0.15, 0.05],  # label 1: rank 2
            [0.1, 0.2, 0.3, 0.4],  # label 0: rank 4
            [0.1, 0.2, 0.6, 0.1],  # label 2: top-1
        ]
    )
    labels = torch.tensor([0, 1, 0, 2])
    assert top_k_correct(logits, labels, 1).tolist() == [True, False, False, True]
    assert top_k_correct(logits, labels, 2).tolist() == [True, True, False, True]
    results = classification_accuracies(logits, labels, top_k=(1, 2))
    assert results["top1_micro"] == pytest.approx(50.0)
    # per-class top-1 recall: class 0 -> 1/2, class 1 -> 0, class 2 -> 1; class 3 is absent from the labels but
    # predicted for image 2 (a false positive), so it counts with recall 0, as in torchmetrics 1.2.1
    assert results["top1_macro"] == pytest.approx(100.0 * (0.5 + 0.0 + 1.0 + 0.0) / 4)
    assert results["top2_micro"] == pytest.approx(75.0)
    assert results["top2_macro"] == pytest.approx(100.0 * (0.5 + 1.0 + 1.0 + 0.0) / 4)


def test_macro_leaves_out_classes_neither_present_nor_predicted():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, -1.0]])  # class 3 is never in a top-2
    labels = torch.tensor([0, 1])
    assert top_k_accuracy(logits, labels, k=1, average="macro") == pytest.approx(100.0)
    assert top_k_accuracy(logits, labels, k=2, average="macro") == pytest.approx(100.0 * 2 / 3)  # class 2 predicted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("average", ["micro", "macro"])
def test_against_literal_loop(device, k, average):
    generator = torch.Generator().manual_seed(k)
    logits = torch.randn(300, 23, generator=generator)
    labels = torch.randint(0, 20, (300,), generator=generator)  # classes 20..22 never occur
    expected = literal_top_k_accuracy(logits, labels, k, average)
    result = top_k_accuracy(logits.to(device), labels.to(device), k=k, average=average)
    assert result == pytest.approx(expected, abs=1e-9)


def test_default_keys_and_perfect_scores():
    labels = torch.arange(10).repeat(3)
    logits = torch.nn.functional.one_hot(labels, 10).float()
    assert classification_accuracies(logits, labels) == {
        "top1_micro": 100.0,
        "top1_macro": 100.0,
        "top5_micro": 100.0,
        "top5_macro": 100.0,
    }


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`logits`"):
        top_k_accuracy(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="`labels`"):
        top_k_accuracy(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="`k`"):
        top_k_accuracy(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), k=4)
    with pytest.raises(ValueError, match="`average`"):
        top_k_accuracy(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), average="weighted")
