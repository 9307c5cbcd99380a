"""Visualisation (docs/method.md#visualisation, docs/method.md#quirks [hierarchy threshold 0.1]/docs/method.md#quirks [hierarchy figure crashes] fixes), explain() and the explanation pipeline. CPU only, no network."""

from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch

from conftest import tiny_config
from ivpt import visualization as V
from ivpt.image_processing import make_image_processor


def one_hot_maps(labels: torch.Tensor, num_prototypes: int) -> torch.Tensor:
    """(B, h, w) integer labels -> (B, P, h, w) one-hot assignment maps."""
    return torch.nn.functional.one_hot(labels, num_prototypes).permute(0, 3, 1, 2).float()


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def gray_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((80, 70)) * 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_stage_names_follow_the_backbone_depth():
    assert V.stage_names(tiny_config()) == ["Layer_2", "Layer_3", "Layer_4"]  # depth 4, S = 2
    backbone_kwargs = {"embed_dim": 32, "depth": 6, "num_heads": 2, "patch_size": 8}
    deeper = tiny_config(backbone_kwargs=backbone_kwargs, n_pro="6,5,4,3")
    assert V.stage_names(deeper) == ["Layer_3", "Layer_4", "Layer_5", "Layer_6"]


def test_denormalise_inverts_the_processor():
    processor = make_image_processor(64)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    restored = V.denormalise(pixel_values, processor.image_mean, processor.image_std)
    assert restored.shape == (1, 3, 64, 64)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(restored[0], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pixel_values"):
        V.denormalise(torch.zeros(2, 64, 64))


@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (4, (2, 2)), (5, (5, 1)), (6, (3, 2)), (12, (4, 3))])
def test_grid_shape_uses_the_two_largest_factors(n, shape):
    assert V.grid_shape(n) == shape


def test_palette_is_distinct_and_cycles():
    palette = V.categorical_palette(60)
    assert palette.shape == (60, 3) and len({tuple(c) for c in palette.round(4)}) == 60
    np.testing.assert_array_equal(V.categorical_palette(62)[60:], palette[:2])


# ---------------------------------------------------------------------------------------------------------------------
# docs/method.md#part-overlays overlays and crop mosaics
# ---------------------------------------------------------------------------------------------------------------------


def test_part_overlays_one_png_per_stage_with_grid_size(tmp_path, model):
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(6, 3, 64, 64))
    names = V.stage_names(model.config)
    paths = V.save_part_overlays(torch.rand(6, 3, 64, 64), outputs.assignment_maps, tmp_path / "vis" / "0_10_cub",
                                 size=48, names=names)
    assert [p.name for p in paths] == [f"0_10_cub_{name}.png" for name in names]
    assert all(png_size(p) == (2 * 48, 3 * 48) for p in paths)  # 6 images -> 3 rows x 2 cols
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_crop_mosaics_include_the_highest_foreground_label_and_skip_background(tmp_path):
    # 4 images, 4 prototypes (3 = background). Label 2 (the highest foreground one, skipped by the release loop, docs/method.md#quirks [hierarchy figure crashes])
    # is in all 4 images, label 0 in one, label 1 nowhere.
    labels = torch.full((4, 8, 8), 3)
    labels[:, 2:5, 2:6] = 2
    labels[0, 6, 6] = 0  # a single pixel: its crop is widened to >= 3 px
    maps = one_hot_maps(labels, 4)
    V.save_part_overlays(torch.rand(4, 3, 8, 8), [maps], tmp_path / "ov", size=64, names=["Layer_4"],
                         mosaic_dir=tmp_path / "middle", mosaic_name="0_0")
    stage_dir = tmp_path / "middle" / "0"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["0", "2"]
    assert png_size(stage_dir / "2" / "0_0.png") == (128, 128)  # 4 crops -> 2 x 2 tiles of 64
    assert png_size(stage_dir / "0" / "0_0.png") == (64, 64)


def test_prototype_crops_and_mosaic_edge_cases():
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    labels = np.zeros((2, 32, 32), dtype=np.int64)
    labels[0, 31, 0] = 1  # one corner pixel
    crops = V.prototype_crops(images, labels, 1)
    assert len(crops) == 1 and crops[0].shape == (64, 64, 3) and crops[0].dtype == np.uint8
    assert V._widen(31, 32, 32, 3) == (29, 32) and V._widen(0, 1, 32, 3) == (0, 3) and V._widen(4, 10, 32, 3) == (4, 10)
    black = V.tile_mosaic([])
    assert black.shape == (64, 64, 3) and not black.any()
    assert V.tile_mosaic([np.full((64, 64, 3), 255, np.uint8)] * 5).shape == (128, 128, 3)  # floor(sqrt 5)^2 = 4


# ---------------------------------------------------------------------------------------------------------------------
# docs/method.md#hierarchy relation matrices, parents, gallery, multi-row figure
# ---------------------------------------------------------------------------------------------------------------------


def literal_relation(batches, stage):
    """Literal loops: per batch, mean over the images where the row is not exactly uniform, renormalised, averaged."""
    per_batch = []
    for routing in batches:
        weights = routing[stage]
        num_images, num_prototypes, num_parts = weights.shape
        matrix = torch.zeros(num_prototypes, num_parts, dtype=torch.float64)
        uniform = float(torch.tensor(1.0 / num_parts, dtype=weights.dtype))
        for j in range(num_prototypes):
            rows = [weights[b, j].double() for b in range(num_images)
                    if not all(float(v) == uniform for v in weights[b, j])]
            if rows:
                mean = torch.stack(rows).mean(0)
                matrix[j] = mean / mean.sum()
        per_batch.append(matrix)
    return torch.stack(per_batch).mean(0).float()


def test_relation_matrices_exclude_empty_prototypes():
    K = 4
    uniform = [1.0 / K] * K
    batch_1 = (torch.tensor([[[0.7, 0.1, 0.1, 0.1], uniform, uniform],
                             [uniform, [0.1, 0.6, 0.2, 0.1], uniform]]),)  # prototype 2 empty in the whole batch
    batch_2 = (torch.tensor([[[0.9, 0.05, 0.05, 0.0], [0.0, 1.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.7]],
                             [[0.5, 0.5, 0.0, 0.0], uniform, [0.0, 0.0, 0.2, 0.8]]]),)
    relations = V.relation_matrices(iter([batch_1, batch_2]))  # a generator is fine
    assert len(relations) == 1 and relations[0].shape == (3, K)
    torch.testing.assert_close(relations[0], literal_relation([batch_1, batch_2], 0))
    # the uniform rows do not pollute: prototype 1 averages its two real rows, no 0.25 from the empty ones
    torch.testing.assert_close(relations[0][1], torch.tensor([0.05, 0.8, 0.1, 0.05]))
    torch.testing.assert_close(relations[0][:2].sum(-1), torch.ones(2))  # present in every batch -> rows sum to 1
    # absent from batch 1: that batch contributes a zero row, so the average is half of batch 2's row
    torch.testing.assert_close(relations[0][2], 0.5 * torch.tensor([0.05, 0.05, 0.15, 0.75]))
    # single-batch rows sum to exactly 1 where present, 0 where the prototype never appeared
    single = V.relation_matrices([batch_1])[0]
    torch.testing.assert_close(single.sum(-1), torch.tensor([1.0, 1.0, 0.0]))
    # the mask is computed in the tensor's own dtype (bfloat16 model outputs)
    assert V.empty_prototype_mask(batch_1[0].bfloat16()).tolist() == [[False, True, True], [True, False, True]]


def test_relation_matrices_match_literal_loops_on_model_outputs(model):
    model.eval()
    batches = []
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            batches.append(model(torch.randn(3, 3, 64, 64)).routing_weights)
    relations = V.relation_matrices(batches)
    assert [tuple(r.shape) for r in relations] == [(5, 3), (4, 3)]
    for stage, relation in enumerate(relations):
        torch.testing.assert_close(relation, literal_relation(batches, stage))
        assert torch.all(relation.sum(-1) <= 1 + 1e-6)
    with pytest.raises(ValueError, match="routing_batches"):
        V.relation_matrices([])
    with pytest.raises(ValueError, match=r"routing_batches\[1\]"):
        V.relation_matrices([batches[0], batches[1][:1]])


def test_prototype_parents_threshold_is_strict():
    relation = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.3, 0.7], [0.0, 0.0]])
    (parents, strengths), = V.prototype_parents([relation])
    assert parents.tolist() == [0, -1, 1, -1]
    torch.testing.assert_close(strengths, torch.tensor([0.8, 0.5, 0.7, 0.0]))


def test_gallery_layout_and_missing_prototypes(tmp_path):
    config = tiny_config()  # n_pro 6,5,4: S = 2, K = 3
    names = V.stage_names(config)
    # Stage 0: prototypes 0 and 4 appear, 1..3 never do. Stage 1: prototype 2 appears. Final: parts 0 and 2.
    labels_0 = torch.full((2, 8, 8), 5)
    labels_0[0, :4, :4], labels_0[1, 4:, 4:] = 0, 4
    labels_1 = torch.full((2, 8, 8), 4)
    labels_1[:, 2:6, 2:6] = 2
    labels_2 = torch.full((2, 8, 8), 3)
    labels_2[:, :3] = 0
    labels_2[:, 5:] = 2
    maps = [one_hot_maps(labels_0, 6), one_hot_maps(labels_1, 5), one_hot_maps(labels_2, 4)]
    V.save_part_overlays(torch.rand(2, 3, 8, 8), maps, tmp_path / "vis" / "0_0", size=32, names=names,
                         mosaic_dir=tmp_path / "middle", mosaic_name="0_0")
    relations = [
        torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 0.0], [0.1, 0.1, 0.8]]),
        torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.1, 0.7, 0.2], [0.4, 0.3, 0.3]]),
    ]
    parents = V.prototype_parents(relations)
    created = V.build_prototype_gallery(tmp_path / "middle", tmp_path / "final", parents, names, config.num_parts)
    found = sorted(str(p.relative_to(tmp_path / "final")) for p in (tmp_path / "final").glob("*/*/*"))
    expected = sorted([
        "Proto_0/Layer_2/0_0.90",  # prototype 1 (parent 1) never appeared: absent, no crash
        "Proto_2/Layer_2/4_0.80",
        "Proto_1/Layer_3/2_0.70",  # prototype 0 (parent 0) never appeared
        "Proto_0/Layer_4/0_1.00",
        "Proto_2/Layer_4/2_1.00",
    ])
    assert found == expected
    assert sorted(str(p.relative_to(tmp_path / "final")) for p in created) == expected
    assert all((tmp_path / "final" / p / "0_0.png").is_file() for p in expected)
    assert not (tmp_path / "middle").exists()


def test_hierarchy_cells_follow_the_parents():
    labels = [np.array([[0, 1], [2, 3]]), np.array([[0, 1], [2, 2]])]  # stage 0: 3 fg + bg; final: K = 2 + bg
    cells = V.hierarchy_cells(labels, [np.array([1, -1, 0])], num_parts=2)
    assert [c.tolist() for c in cells[0]] == [[[False, False], [True, False]], [[True, False], [False, False]]]
    assert [c.tolist() for c in cells[1]] == [[[True, False], [False, False]], [[False, True], [False, False]]]


def test_hierarchy_figures_one_png_per_image_with_k_columns(tmp_path, model):
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 64))
    parents = V.prototype_parents(V.relation_matrices([outputs.routing_weights]), threshold=0.0)
    names = V.stage_names(model.config)
    paths = V.save_hierarchy_figures(torch.rand(2, 3, 64, 64), outputs.assignment_maps, parents, tmp_path / "new_0_cub",
                                     names, size=64, cell_size=50)
    assert [p.name for p in paths] == ["new_0_cub_0.png", "new_0_cub_1.png"]
    for path in paths:  # K cells wide and S + 1 high, plus the row-name band (left) and the header band (top)
        width, height = png_size(path)
        assert 10 < width - model.config.num_parts * 50 < 40 and 10 < height - 3 * 50 < 40


@pytest.mark.parametrize("cell_size", [64, 128])
def test_hierarchy_figure_text_is_never_clipped_or_over_an_image(cell_size):
    """Long headers, row names and title at small and large cells: every text lies inside the figure, headers and row
    names stay in their bands and cells (no overlap with a neighbour or an image)."""
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, (32, 32)), rng.integers(0, 3, (32, 32))]
    names = ["Layer_10_with_a_long_stage_name", "Layer_12"]
    titles = ["part 0: 19.03 (a long header for a narrow column)", "part 1: -0.04"]
    figure = V.hierarchy_figure(rng.random((32, 32, 3)), labels, [np.array([0, 1, -1])], names, 2,
                                cell_size=cell_size, title="001.Pink_Red_capped_Blue_plain_Forktail " * 3,
                                column_titles=titles, show_input=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    width, height = figure.bbox.width, figure.bbox.height
    image_boxes = [axis.get_window_extent(renderer) for axis in figure.axes]
    texts = [t for t in figure.texts if t.get_text()]
    assert len(texts) == 3 + 2 + 1  # headers (input + 2 parts), row names, title
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text.get_text()
        assert not any(box.overlaps(image) for image in image_boxes), text.get_text()
    headers = [t.get_window_extent(renderer) for t in texts[len(names) : len(names) + 3]]  # row names come first
    assert [t.get_text().replace("\n", " ") for t in texts[len(names) : len(names) + 3]][1:] == [
        "part 0: 19.03 (a long header for a narrow column)", "part 1: -0.04"] or cell_size < 128
    assert all(a.x1 <= b.x0 for a, b in zip(headers, headers[1:]))  # side by side, no overlap
    assert all(t.get_window_extent(renderer).x1 < image_boxes[0].x0 for t in texts[: len(names)])  # left band


# ---------------------------------------------------------------------------------------------------------------------
# docs/method.md#consistency-figures consistency figures
# ---------------------------------------------------------------------------------------------------------------------


def test_consistency_figures_files_and_sizes(tmp_path):
    from ivpt.metrics.consistency import prototype_regions

    torch.manual_seed(0)
    num_images, canvas = 9, 96  # the protocol's canvas is 224; any size works
    maps = torch.softmax(torch.randn(num_images, 4, 8, 8), dim=1)  # 3 foreground prototypes + background
    labels = torch.tensor([0, 0, 0, 20, 5, 0, 0, 0, 0])
    points = torch.randint(0, canvas, (num_images, 15, 2))
    visible = torch.rand(num_images, 15) > 0.3
    regions = prototype_regions(maps, canvas=canvas, half_size=16)
    args = (torch.rand(num_images, 3, canvas, canvas), maps, regions, points, visible, labels)
    part_scores = torch.randn(num_images, 21, 2)  # K = 2 part scores vs 3 evaluated prototypes (release setting)

    paths = V.save_consistency_figures(*args, tmp_path / "default", part_scores=part_scores)  # classes 0, 20
    names = sorted(str(p.relative_to(tmp_path / "default")) for p in paths)
    assert names == sorted(
        [f"results_all/cub_c{c}.png" for c in (0, 20)]
        + [f"results_single_proto/cub_p{j}_c{c}.png" for c in (0, 20) for j in range(3)]
    )
    assert all(png_size(p) == (2 * canvas, 3 * canvas) for p in paths if "results_all" in str(p))
    assert all(png_size(p) == (4 * canvas, 3 * canvas) for p in paths if "single_proto" in str(p))

    # every class, uint8 images, custom selection; class 7 has no image -> skipped
    uint8 = (args[0] * 255).to(torch.uint8)
    paths = V.save_consistency_figures(uint8, *args[1:], tmp_path / "all", classes=[0, 5, 7], images_per_class=3,
                                       image_step=1, prefix="synthetic")
    assert len(paths) == 2 * (1 + 3)
    assert png_size(tmp_path / "all" / "results_all" / "synthetic_c5.png") == (2 * canvas, 2 * canvas)
    with pytest.raises(ValueError, match="regions"):
        V.save_consistency_figures(args[0], maps, torch.zeros(num_images, 2, 4), points, visible, labels, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# explain() and the pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_explain_grayscale_image(tmp_path, model):
    config, processor = model.config, make_image_processor(model.config.image_size)
    image = gray_image()
    model.train()
    explanation = V.explain(model, processor, image)
    assert model.training and all(m.training for m in model.modules())  # previous mode restored

    model.eval()
    with torch.no_grad():
        logits = model(processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]).logits[0]
    assert explanation.label_id == int(logits.argmax())
    assert explanation.label == config.id2label[explanation.label_id]
    assert explanation.probability == pytest.approx(float(torch.softmax(logits, -1).max()), rel=1e-5)
    K, side = config.num_parts, config.image_size
    assert explanation.part_scores.shape == (K,)
    assert explanation.stage_names == tuple(V.stage_names(config))
    assert [m.shape for m in explanation.stage_maps] == [(p, side, side) for p in config.n_pro]
    assert [w.shape for w in explanation.routing_weights] == [(p - 1, K) for p in config.n_pro[:-1]]
    for parents, strengths, weights in zip(
        explanation.routing_parents, explanation.routing_strengths, explanation.routing_weights
    ):
        empty = np.all(weights == np.float32(1.0 / K), axis=-1)
        assert parents.shape == strengths.shape == (len(weights),)
        np.testing.assert_array_equal(parents, np.where(empty, -1, weights.argmax(-1)))
    assert explanation.image.shape == (side, side, 3) and 0 <= explanation.image.min() <= explanation.image.max() <= 1

    path = explanation.save(tmp_path / "out" / "explained.png")
    width, height = png_size(path)
    assert 0 < width - (K + 1) * 128 < 40 and height > 3 * 128 + 20  # input column + K parts; bands
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["explained.png"]
    with pytest.raises(TypeError, match="image"):
        V.explain(model, processor, np.zeros((8, 8, 3)))


def test_pipeline_returns_an_explanation(model):
    from transformers import ImageClassificationPipeline

    processor = make_image_processor(model.config.image_size)
    pipe = V.IvptImageClassificationPipeline(model=model, image_processor=processor)
    stock = ImageClassificationPipeline(model=model, image_processor=processor)
    image = gray_image(1)

    model.eval()
    plain = pipe(image, top_k=3)
    expected = stock(image, top_k=3)  # drop-in without return_explanation
    assert [p["label"] for p in plain] == [p["label"] for p in expected]
    assert [p["score"] for p in plain] == pytest.approx([p["score"] for p in expected], rel=1e-5)
    result = pipe(image, top_k=3, return_explanation=True)
    assert result["predictions"] == plain
    explanation = result["explanation"]
    assert explanation.label == plain[0]["label"]
    assert explanation.probability == pytest.approx(plain[0]["score"], rel=1e-5)
    reference = V.explain(model, processor, image)
    np.testing.assert_allclose(explanation.stage_maps[0], reference.stage_maps[0], atol=1e-6)

    batched = pipe([image, gray_image(2)], batch_size=2, top_k=2, return_explanation=True)
    single = pipe(image, top_k=2)
    assert len(batched) == 2 and [p["label"] for p in batched[0]["predictions"]] == [p["label"] for p in single]
    assert [p["score"] for p in batched[0]["predictions"]] == pytest.approx([p["score"] for p in single], rel=1e-5)
    assert [len(r["explanation"].stage_maps) for r in batched] == [3, 3]


def test_explain_is_reexported():
    import ivpt.explanation

    assert V.explain is ivpt.explanation.explain and V.Explanation is ivpt.explanation.Explanation
    with pytest.raises(AttributeError):
        V.does_not_exist  # noqa: B018
