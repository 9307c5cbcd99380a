"""Explain one IVPT prediction: class, per-part scores, every stage's part map and the prototype -> part routing.

Two routes:

* [`explain`]`(model, processor, image)` returns an [`Explanation`] (plot it with `.plot()`, write it with `.save()`);
* [`IvptImageClassificationPipeline`], a subclass of transformers' `ImageClassificationPipeline`:
  `pipe(image, return_explanation=True)` returns `{"predictions": <the usual top-k list>, "explanation": Explanation}`;
  without `return_explanation` it behaves exactly like the stock pipeline (a drop-in replacement).

```python
>>> from ivpt.visualization import IvptImageClassificationPipeline, explain
>>> explanation = explain(model, processor, Image.open("bird.jpg"))
>>> explanation.label, explanation.probability, explanation.part_scores
>>> explanation.save("bird_explained.png")
>>> pipe = IvptImageClassificationPipeline(model=model, image_processor=processor)
>>> # or: pipeline("image-classification", model=path, trust_remote_code=True,
>>> #              pipeline_class=IvptImageClassificationPipeline)
>>> result = pipe(Image.open("bird.jpg"), return_explanation=True, top_k=3)
>>> result["predictions"], result["explanation"].plot()
```
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
import os
from pathlib import Path

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F
from transformers import ImageClassificationPipeline

from .visualization import _atomic_save, denormalise, empty_prototype_mask, hierarchy_figure, stage_names

__all__ = ["Explanation", "explain", "IvptImageClassificationPipeline"]


@dataclass
class Explanation:
    """
    The explanation of one image's prediction (docs/method.md#outputs, docs/method.md#hierarchy). `S` is the number of prompted stages, `K` the
    number of final parts, `H × W` the processed image size.

    Attributes:
        label_id (`int`): predicted class index (argmax of the logits).
        label (`str`): its name from `config.id2label`.
        probability (`float`): its softmax probability.
        probabilities (`np.ndarray` of shape `(num_labels,)`): softmax of the logits.
        part_scores (`np.ndarray` of shape `(K,)`): `part_logits` of the predicted class, one score per final part.
        stage_names (`tuple[str, ...]`): the `S + 1` stage names (`Layer_<n>`, see [`stage_names`]).
        stage_maps (`tuple[np.ndarray, ...]`): `S + 1` assignment maps of shape `(n_pro[s], H, W)`, bilinearly
            upsampled (`align_corners=True`) to the processed image size; background is the last channel.
        routing_weights (`tuple[np.ndarray, ...]`): `S` matrices of shape `(n_pro[s] - 1, K)`: each intermediate
            foreground prototype's soft assignment to the final parts in this image.
        routing_parents (`tuple[np.ndarray, ...]`): `S` int64 arrays `(n_pro[s] - 1,)`: `argmax_k` of the routing, -1
            for prototypes that no pixel picked in this image (their routing is the uniform `1/K`).
        routing_strengths (`tuple[np.ndarray, ...]`): `S` float32 arrays `(n_pro[s] - 1,)`: `max_k` of the routing,
            0 for empty prototypes.
        image (`np.ndarray` of shape `(H, W, 3)`): the processed image, float32 in [0, 1].
    """

    label_id: int
    label: str
    probability: float
    probabilities: np.ndarray = field(repr=False)
    part_scores: np.ndarray
    stage_names: tuple[str, ...]
    stage_maps: tuple[np.ndarray, ...] = field(repr=False)
    routing_weights: tuple[np.ndarray, ...] = field(repr=False)
    routing_parents: tuple[np.ndarray, ...]
    routing_strengths: tuple[np.ndarray, ...]
    image: np.ndarray = field(repr=False)

    @property
    def num_parts(self) -> int:
        """K, the number of final parts."""
        return len(self.part_scores)

    def label_maps(self) -> list[np.ndarray]:
        """Per stage, the arg-max prototype of every pixel, `(H, W)` int64."""
        return [stage_map.argmax(axis=0) for stage_map in self.stage_maps]

    def plot(self, min_strength: float = 0.5, cell_size: int = 128):
        """The multi-row figure of docs/method.md#hierarchy for this image, with the input image and the prediction.

        Row `s < S`, column `k`: the pixels whose arg-max prototype is routed to part `k` in this image with a strength
        above `min_strength` (the docs/method.md#hierarchy rule applied to this image's routing); last row, column `k`: final part `k`.
        Column titles give the part scores of the predicted class.

        Args:
            min_strength (`float`, defaults to 0.5): routing strength a prototype needs to be drawn under its parent.
            cell_size (`int`, defaults to 128): pixels per cell.

        Returns:
            `matplotlib.figure.Figure`.
        """
        parents = [
            np.where(strengths > min_strength, parents, -1)
            for parents, strengths in zip(self.routing_parents, self.routing_strengths)
        ]
        return hierarchy_figure(
            self.image,
            self.label_maps(),
            parents,
            self.stage_names,
            self.num_parts,
            cell_size=cell_size,
            title=f"{self.label} (id {self.label_id}, p = {self.probability:.3f})",
            column_titles=[f"part {k}: {score:.2f}" for k, score in enumerate(self.part_scores)],
            show_input=True,
        )

    def save(self, path: str | os.PathLike, **plot_kwargs) -> Path:
        """Write `.plot(**plot_kwargs)` as a PNG, atomically (temporary file in the same folder, then rename)."""
        return _atomic_save(self.plot(**plot_kwargs), path)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode and restore each one's previous mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _normalisation(processor) -> tuple[Sequence[float], Sequence[float]]:
    """`(mean, std)` the processor normalised with (identity if it does not normalise)."""
    if not getattr(processor, "do_normalize", False):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = processor.image_mean, processor.image_std
    mean = [float(mean)] * 3 if np.isscalar(mean) else [float(v) for v in mean]
    std = [float(std)] * 3 if np.isscalar(std) else [float(v) for v in std]
    return mean, std


def explanation_from_outputs(
    config,
    pixel_values: torch.Tensor,
    logits: torch.Tensor,
    part_logits: torch.Tensor,
    assignment_maps: Sequence[torch.Tensor],
    routing_weights: Sequence[torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
) -> Explanation:
    """Build the [`Explanation`] of the first image of a batch from model outputs (any device).

    Args:
        config ([`IvptConfig`]): the model configuration (labels, stage names).
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, H, W)`): the normalised model input.
        logits (`(batch_size, num_labels)`), part_logits (`(batch_size, num_labels, K)`),
        assignment_maps (`S + 1` × `(batch_size, n_pro[s], h, w)`), routing_weights (`S` × `(batch_size, n_pro[s] - 1,
            K)`): the model outputs of the same name.
        mean, std (`Sequence[float]`): the processor's normalisation.
    """
    probabilities = torch.softmax(logits[0].detach().float().cpu(), dim=-1)
    label_id = int(probabilities.argmax())
    height, width = pixel_values.shape[-2:]
    stage_maps = tuple(
        F.interpolate(maps[:1].detach().float().cpu(), size=(height, width), mode="bilinear", align_corners=True)[0]
        .numpy()
        for maps in assignment_maps
    )
    weights, parents, strengths = [], [], []
    for routing in routing_weights:
        empty = empty_prototype_mask(routing[:1].detach())[0].cpu()
        routing = routing[0].detach().float().cpu()
        strength, parent = routing.max(dim=-1)
        weights.append(routing.numpy())
        parents.append(torch.where(empty, -1, parent).numpy())
        strengths.append(torch.where(empty, 0.0, strength).numpy())
    id2label = config.id2label or {}
    return Explanation(
        label_id=label_id,
        label=str(id2label.get(label_id, label_id)),
        probability=float(probabilities[label_id]),
        probabilities=probabilities.numpy(),
        part_scores=part_logits[0, label_id].detach().float().cpu().numpy(),
        stage_names=tuple(stage_names(config)),
        stage_maps=stage_maps,
        routing_weights=tuple(weights),
        routing_parents=tuple(parents),
        routing_strengths=tuple(strengths),
        image=denormalise(pixel_values[:1], mean, std)[0].permute(1, 2, 0).numpy(),
    )


def explain(model, processor, image: Image.Image) -> Explanation:
    """Classify one image and explain the prediction with its part maps and prototype routing.

    The image (any PIL mode) is converted to RGB and processed by `processor`; the model runs in eval mode under
    `torch.no_grad()` on its own device and dtype, and every submodule's previous training mode is restored.

    Args:
        model ([`IvptForImageClassification`]): the classifier.
        processor (`BaseImageProcessor`): its image processor (e.g. `make_image_processor(config.image_size)`).
        image (`PIL.Image.Image`): the image to explain.

    Returns:
        [`Explanation`].
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected `image` to be a PIL.Image.Image, got {type(image).__name__}")
    pixel_values = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    with _eval_mode(model), torch.no_grad():
        outputs = model(pixel_values)
    mean, std = _normalisation(processor)
    return explanation_from_outputs(
        model.config, pixel_values, outputs.logits, outputs.part_logits, outputs.assignment_maps,
        outputs.routing_weights, mean, std,
    )


class IvptImageClassificationPipeline(ImageClassificationPipeline):
    """`ImageClassificationPipeline` for IVPT models that can also return an [`Explanation`] per image.

    Extra call argument:
        return_explanation (`bool`, *optional*, defaults to `False`): return
            `{"predictions": [{"label", "score"}, ...], "explanation": Explanation}` per image instead of the top-k
            list.

    The model always runs in eval mode (each submodule's mode restored afterwards), so the routing is deterministic
    unless `config.sample_routing_noise_in_eval` is set. Works with `batch_size > 1`: the model outputs are passed
    between the pipeline stages as a flat dict of tensors, which the pipeline un-batches per image.
    """

    def _sanitize_parameters(self, return_explanation: bool | None = None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if return_explanation is not None:
            forward_params["return_explanation"] = bool(return_explanation)
            postprocess_params["return_explanation"] = bool(return_explanation)
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, return_explanation: bool = False):
        with _eval_mode(self.model):
            outputs = self.model(**model_inputs)
        flat = {"logits": outputs.logits}
        if return_explanation:
            flat["pixel_values"] = model_inputs["pixel_values"]
            flat["part_logits"] = outputs.part_logits
            flat.update({f"assignment_maps_{s}": maps for s, maps in enumerate(outputs.assignment_maps)})
            flat.update({f"routing_weights_{s}": weights for s, weights in enumerate(outputs.routing_weights)})
        return flat

    def postprocess(self, model_outputs, function_to_apply=None, top_k=5, return_explanation: bool = False):
        predictions = super().postprocess(model_outputs, function_to_apply=function_to_apply, top_k=top_k)
        if not return_explanation:
            return predictions
        num_stages = len(self.model.config.n_pro)
        mean, std = _normalisation(self.image_processor)
        explanation = explanation_from_outputs(
            self.model.config,
            model_outputs["pixel_values"],
            model_outputs["logits"],
            model_outputs["part_logits"],
            [model_outputs[f"assignment_maps_{s}"] for s in range(num_stages)],
            [model_outputs[f"routing_weights_{s}"] for s in range(num_stages - 1)],
            mean,
            std,
        )
        return {"predictions": predictions, "explanation": explanation}
