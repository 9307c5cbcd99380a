"""ivpt: Hugging Face-native Interpretable Visual Prompt Tuning (IVPT)."""

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

__all__ = [
    "CheckpointError",
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
