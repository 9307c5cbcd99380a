"""The IVPT explanation app: classify an image in the browser and see why (Gradio, local and offline).

    python -m ivpt.app [--model demo_output/ivpt] [--examples <CUB_200_2011 folder or image folder>]
                       [--host 127.0.0.1] [--port 7860]

(`ivpt-app` is the same command.) Pick one of the example images or upload one; the app shows

* the prediction (top-5 class probabilities),
* the score every final part gives the predicted class (`part_logits`; the class logit is their mean),
* the part map of every stage (arg-max prototype per pixel, background transparent, the figure of
  `save_part_overlays`),
* the hierarchy of prototypes (`Explanation.plot`: one row per stage, one column per final part, each intermediate
  prototype drawn under the final part it is routed to in this image).

`--model` takes any IVPT checkpoint folder (`save_pretrained` output with its image processor) or a Hub id; the
default is the checkpoint `make demo` writes, and its test images are the default examples. The app only listens on
`--host` (localhost by default), sends no analytics and opens no share link; a Hub id is the only thing it may
download (nothing when `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
import torch

# Gradio reads this at import time: no usage statistics and no version check, whatever the caller's environment.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

DEMO_OUTPUT = Path("demo_output")
DEFAULT_MODEL = DEMO_OUTPUT / "ivpt"
DEFAULT_EXAMPLES = DEMO_OUTPUT / "data" / "ivpt_cub" / "CUB_200_2011"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
OVERLAY_SIZE = 256  # pixels per side of each stage's part map
HIERARCHY_CELL_SIZE = 160  # pixels per cell of the hierarchy figure
TOP_CLASSES = 5
# Class names of any length fit the prediction box (Gradio draws the top class in a large heading).
CSS = "#prediction h2 { font-size: var(--text-xl); overflow-wrap: anywhere; }"


# ------------------------------------------------------------------------------------------------------------------
# Model and examples
# ------------------------------------------------------------------------------------------------------------------


def load_checkpoint(model: str | os.PathLike):
    """`(model, image_processor)` from an IVPT checkpoint folder or a Hub id, the model in eval mode.

    A folder without an image processor gets the IVPT test transform at the config's `image_size`
    ([`make_image_processor`]).

    Raises:
        FileNotFoundError: the default (demo) checkpoint does not exist yet, or `model` names a missing local folder
            or an unreachable Hub model.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from . import make_image_processor

    path = Path(model)
    if path == DEFAULT_MODEL and not path.is_dir():
        raise FileNotFoundError(
            f"No checkpoint at {DEFAULT_MODEL} (the demo's): run `make demo` first or pass --model <checkpoint folder "
            "or Hub id>"
        )
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: not a checkpoint folder (no config.json in it)")
    try:
        classifier = AutoModelForImageClassification.from_pretrained(str(model))
    except OSError as error:
        raise FileNotFoundError(
            f"--model {model}: neither a checkpoint folder nor a Hub model that can be loaded ({error})"
        ) from error
    try:
        processor = AutoImageProcessor.from_pretrained(str(model))
    except OSError:
        processor = make_image_processor(classifier.config.image_size)
    return classifier.eval(), processor


def example_images(source: str | os.PathLike | None, limit: int = 12) -> list[Path]:
    """Up to `limit` example images from `source`.

    A CUB_200_2011 folder (with `images.txt`) gives its test-split images, one per class in class order, then the
    next image of each class, and so on; any other folder gives its image files (recursively, sorted by path). `None`
    gives no examples.

    Raises:
        FileNotFoundError: `source` is not a folder.
    """
    if source is None:
        return []
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"--examples {source}: not a folder")
    if not (source / "images.txt").is_file():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    from .data.cub import read_annotations

    per_class: dict[int, list[Path]] = {}
    for record in read_annotations(source).split(train=False):
        per_class.setdefault(record.label, []).append(source / "images" / record.file_name)
    queues = [per_class[label] for label in sorted(per_class)]
    interleaved = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    return interleaved[:limit]


# ------------------------------------------------------------------------------------------------------------------
# One explanation as app outputs
# ------------------------------------------------------------------------------------------------------------------


def stage_overlays(explanation, size: int = OVERLAY_SIZE) -> list[tuple[Image.Image, str]]:
    """`S + 1` `(part map, stage name)` pairs for this image, each the overlay tile of `save_part_overlays`."""
    from .visualization import _overlay_tile, _resize_images, label_maps

    image = _resize_images(torch.from_numpy(explanation.image).permute(2, 0, 1)[None], size)[0]  # (size, size, 3)
    tiles = []
    for name, maps in zip(explanation.stage_names, explanation.stage_maps):
        labels = label_maps(torch.from_numpy(maps)[None], size)[0].numpy()  # (size, size) arg-max prototype
        tiles.append((_overlay_tile(image, labels, background=maps.shape[0] - 1, alpha=0.5), name))
    return tiles


def figure_image(figure) -> Image.Image:
    """A matplotlib `Figure` rendered to an RGB PIL image at its own size and dpi."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def explanation_outputs(explanation, id2label: dict) -> tuple[dict, list[list], list, Image.Image]:
    """The app's four outputs for an [`Explanation`]: top-class probabilities, part-score rows, stage part maps and
    the hierarchy figure."""
    order = np.argsort(-explanation.probabilities)[:TOP_CLASSES]
    top = {str(id2label.get(int(i), int(i))): float(explanation.probabilities[i]) for i in order}
    rows = [[f"part {k}", round(float(score), 4)] for k, score in enumerate(explanation.part_scores)]
    return top, rows, stage_overlays(explanation), figure_image(explanation.plot(cell_size=HIERARCHY_CELL_SIZE))


# ------------------------------------------------------------------------------------------------------------------
# The Gradio app
# ------------------------------------------------------------------------------------------------------------------


def build_app(model, processor, model_name: str, examples: Sequence[Path] = (), title: str = "IVPT explanation"):
    """The Gradio `Blocks` of the app for a loaded model (not launched); `model_name` is shown as given (`--model`)."""
    import gradio as gr

    from .explanation import explain

    id2label = model.config.id2label or {}
    num_stages = len(model.config.n_pro)

    def run(image, progress=gr.Progress()):
        if image is None:  # the image was cleared
            return None, None, [], None
        progress(0.1, desc="running the model")
        explanation = explain(model, processor, image)
        progress(0.6, desc="drawing the part maps")
        outputs = explanation_outputs(explanation, id2label)
        progress(1.0, desc="done")
        return outputs

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(
            f"## {title}\nModel: `{model_name}` ({model.config.num_labels} classes, prototypes per stage "
            f"{', '.join(str(n - 1) for n in model.config.n_pro)} + background). Pick an example or upload an image."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", image_mode="RGB", sources=["upload", "clipboard"], label="Image",
                                 height=320, elem_id="input-image")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=image, label="Examples",
                                examples_per_page=len(examples), elem_id="examples")
            with gr.Column(scale=1):
                prediction = gr.Label(num_top_classes=TOP_CLASSES, label="Prediction", elem_id="prediction")
                part_scores = gr.Dataframe(headers=["part", "score for the predicted class"],
                                           datatype=["str", "number"], interactive=False, elem_id="part-scores",
                                           label="Part scores (their mean is the class logit)")
        overlays = gr.Gallery(label="Part maps of every stage (number = prototype, background not coloured)",
                              columns=num_stages, rows=1, format="png", object_fit="contain", height=None,
                              elem_id="stage-maps")
        hierarchy = gr.Image(label="Hierarchy of prototypes (rows: stages, columns: final parts)", type="pil",
                             format="png", interactive=False, elem_id="hierarchy")
        image.change(run, inputs=image, outputs=[prediction, part_scores, overlays, hierarchy])
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="IVPT checkpoint folder or Hub id (default: the checkpoint `make demo` writes)")
    parser.add_argument("--examples", default=None,
                        help="CUB_200_2011 folder (its test images) or image folder to offer as examples (default: "
                             f"the demo's test images, {DEFAULT_EXAMPLES}, when they exist)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    args = parser.parse_args(argv)
    if args.examples is None and DEFAULT_EXAMPLES.is_dir():
        args.examples = str(DEFAULT_EXAMPLES)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        raise SystemExit("error: the app needs gradio: pip install 'ivpt[app]'")
    try:
        examples = example_images(args.examples)
        model, processor = load_checkpoint(args.model)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from error
    app = build_app(model, processor, args.model, examples)
    print(f"IVPT explanation app: {args.model} on http://{args.host}:{args.port}", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                       footer_links=[], show_error=True, css=CSS)


if __name__ == "__main__":
    main()
