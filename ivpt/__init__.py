"""ivpt: Hugging Face-native Interpretable Visual Prompt Tuning (IVPT)."""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_ivpt import IvptConfig
from .explanation import Explanation, IvptImageClassificationPipeline, explain
from .image_processing import make_image_processor
from .modeling_ivpt import (
    CheckpointError,
    IvptForImageClassification,
    IvptImageClassifierOutput,
    IvptModel,
    IvptModelOutput,
    IvptPreTrainedModel,
)

AutoConfig.register(IvptConfig.model_type, IvptConfig, exist_ok=True)
AutoModel.register(IvptConfig, IvptModel, exist_ok=True)
AutoModelForImageClassification.register(IvptConfig, IvptForImageClassification, exist_ok=True)
# `save_pretrained` writes the code files and an `auto_map`, so checkpoints load with trust_remote_code=True.
IvptConfig.register_for_auto_class()
IvptModel.register_for_auto_class("AutoModel")
IvptForImageClassification.register_for_auto_class("AutoModelForImageClassification")

_TRAINING_EXPORTS = ("IvptTrainer", "IvptTrainingArguments")


def __getattr__(name):
    """`ivpt.IvptTrainer` / `ivpt.IvptTrainingArguments`, imported on first use (they pull in `transformers.Trainer`)."""
    if name in _TRAINING_EXPORTS:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'ivpt' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "__version__",
    "IvptTrainer",
    "IvptTrainingArguments",
    "Explanation",
    "IvptImageClassificationPipeline",
    "explain",
    "make_image_processor",
    "IvptConfig",
    "IvptModel",
    "IvptForImageClassification",
    "IvptPreTrainedModel",
    "IvptModelOutput",
    "IvptImageClassifierOutput",
]
