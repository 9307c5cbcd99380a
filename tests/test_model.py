"""Core model: output shapes, freezing, gradient reach (docs/method.md#stop-gradients), determinism, docs/method.md#equivalent-forms fast forms vs the literal formulas."""

import pytest
import torch
import torch.nn.functional as F

from ivpt import IvptConfig, IvptForImageClassification
from ivpt.modeling_ivpt import hard_pool, project_maps, prototype_logits, renormalise_with_eps

from conftest import tiny_config

BATCH = 3


def images(batch=BATCH, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_shapes(model, config):
    """The table of docs/method.md#outputs scaled down: D=32, 8x8 grid, n_pro 6,5,4 -> K=3 parts, S=2 prompted blocks, 7 classes."""
    model.train()
    out = model(images(), labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (BATCH, 7)
    assert out.part_logits.shape == (BATCH, 7, 3)
    torch.testing.assert_close(out.logits, out.part_logits.mean(-1))
    assert out.part_features.shape == (BATCH, 32, 4)
    assert [tuple(m.shape) for m in out.assignment_maps] == [(BATCH, 6, 8, 8), (BATCH, 5, 8, 8), (BATCH, 4, 8, 8)]
    assert [tuple(m.shape) for m in out.projected_maps] == [(BATCH, 4, 64)] * 3
    assert [tuple(r.shape) for r in out.routing_weights] == [(BATCH, 5, 3), (BATCH, 4, 3)]
    assert out.interpretation_maps is out.assignment_maps[-3]
    for maps in out.assignment_maps + out.projected_maps:
        torch.testing.assert_close(maps.sum(1), torch.ones_like(maps.sum(1)))
    for routing in out.routing_weights:
        torch.testing.assert_close(routing.sum(-1), torch.ones_like(routing.sum(-1)))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.loss_terms) == {
        "classification", "consistency", "presence", "orthogonality", "equivariance", "total_variation",
        "enforced_presence", "entropy",
    }
    assert all(torch.isfinite(value) for value in out.loss_terms.values())


def test_loss_is_weighted_sum_of_terms(config):
    weights = dict(
        classification_loss_weight=0.5, consistency_loss_weight=2.0, presence_loss_weight=0.0,
        orthogonality_loss_weight=3.0, equivariance_loss_weight=0.25, total_variation_loss_weight=1.5,
        enforced_presence_loss_weight=0.75, entropy_loss_weight=0.1,
    )
    model = IvptForImageClassification(tiny_config(**weights)).train()
    torch.manual_seed(1)
    out = model(images(), labels=torch.tensor([0, 1, 2]))
    expected = sum(weights[f"{name}_loss_weight"] * value for name, value in out.loss_terms.items())
    torch.testing.assert_close(out.loss, expected)


def test_eval_loss_is_cross_entropy(model):
    model.eval()
    labels = torch.tensor([3, 1, 6])
    out = model(images(), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert set(out.loss_terms) == {"classification"}


def test_trainable_parameters_follow_spec_4_1():
    """Full-size model (meta device): the trainable count of docs/method.md#learnable-tensors and the frozen set of docs/method.md#parameter-groups (incl. docs/method.md#quirks [prompt norm frozen])."""
    with torch.device("meta"):
        model = IvptForImageClassification(IvptConfig())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3_708_719
    assert {"ivpt.backbone.cls_token", "ivpt.backbone.reg_token", "ivpt.backbone.pos_embed"} <= trainable
    assert not any("prompt_norm" in name or ".blocks." in name or "backbone.norm" in name for name in trainable)


def test_unfrozen_options(config):
    model = IvptForImageClassification(tiny_config(freeze_backbone=False, freeze_prompt_norm_affine=False))
    assert all(p.requires_grad for p in model.parameters())


def trainable_with_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {
        name for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    }


def test_gradient_reach_table(config):
    """docs/method.md#stop-gradients: which trainable tensors get non-zero gradient from each loss term (tiny model, S=2 prompted stages)."""
    torch.manual_seed(0)
    model = IvptForImageClassification(config).train()
    out = model(images(batch=4), labels=torch.tensor([0, 1, 2, 3]))
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    stage = lambda s, *parts: {f"ivpt.stages.{s}.{p}" for p in parts}  # noqa: E731
    prototypes = set().union(*(stage(s, "prototypes", "position_bias") for s in range(3)))
    backbone_inputs = {f"ivpt.backbone.{n}" for n in ("cls_token", "reg_token", "pos_embed")}
    prompt_projections = set().union(*(stage(s, "prompt_projection.weight", "prompt_projection.bias") for s in (0, 1)))
    classification = (
        {"classifier.weight", "ivpt.modulation.weight", "ivpt.modulation.bias"}
        | prompt_projections | stage(2, "prototypes", "position_bias") | backbone_inputs
    )
    assert trainable_with_grad(model, out.loss_terms["classification"]) == classification
    assert trainable_with_grad(model, out.loss_terms["orthogonality"]) == classification - {"classifier.weight"}
    routing_heads = set().union(*(stage(s, "routing_head.weight", "routing_head.bias") for s in (0, 1)))
    assert trainable_with_grad(model, out.loss_terms["consistency"]) == routing_heads | (
        prototypes - stage(2, "prototypes", "position_bias")
    )
    for term in ("presence", "equivariance", "total_variation", "enforced_presence", "entropy"):
        assert trainable_with_grad(model, out.loss_terms[term]) == prototypes, term
    # p_classifier (routing heads) is trained by the consistency loss only, p_linear by classification/orthogonality.
    assert names == classification | routing_heads | prototypes


def test_consistency_of_stage_s_reaches_stage_s_only(model):
    from ivpt.losses import consistency_loss

    model.train()
    out = model(images())
    loss = consistency_loss(out.projected_maps[1], out.projected_maps[-1].detach())
    reached = trainable_with_grad(model, loss)
    assert reached == {f"ivpt.stages.1.{n}" for n in ("prototypes", "position_bias", "routing_head.weight",
                                                       "routing_head.bias")}


def test_eval_is_deterministic_without_noise(model):
    model.eval()
    first, second = model(images()), model(images())
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)
    for a, b in zip(first.assignment_maps, second.assignment_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_routing_noise_in_eval_when_enabled():
    """docs/method.md#routing-noise-at-evaluation: with noise in eval, logits and maps of stages >= 1 are random; stage 0 (before any prompt) is not."""
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(sample_routing_noise_in_eval=True)).eval()
    first, second = model(images()), model(images())
    # (LayerScale starts at 1e-5 in a random timm ViT, so prompts move the tokens only slightly: compare exactly)
    assert not torch.equal(first.logits, second.logits)
    assert not torch.equal(first.assignment_maps[1], second.assignment_maps[1])
    torch.testing.assert_close(first.assignment_maps[0], second.assignment_maps[0], rtol=0, atol=0)
    # an explicit argument overrides the config
    torch.testing.assert_close(
        model(images(), sample_routing_noise=False).logits, model(images(), sample_routing_noise=False).logits
    )


def test_training_noise_follows_gumbel_flag():
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(gumbel_routing=False)).train()
    torch.testing.assert_close(model(images()).logits, model(images()).logits, rtol=0, atol=0)
    model = IvptForImageClassification(tiny_config(gumbel_routing=True)).train()
    assert not torch.equal(model(images()).logits, model(images()).logits)


def test_hard_routing_is_one_hot_forward():
    model = IvptForImageClassification(tiny_config(routing_hard=True, gumbel_routing=False)).eval()
    for routing in model(images()).routing_weights:
        top2 = routing.topk(2, dim=-1).values  # straight-through: one-hot up to float rounding
        is_one_hot = torch.isclose(top2[..., 0], torch.ones(())) & (top2[..., 1].abs() < 1e-6)
        is_uniform = torch.isclose(routing, torch.full_like(routing, 1 / 3)).all(-1)
        assert (is_one_hot | is_uniform).all(), (routing, top2)


def test_routing_tau_changes_sharpness():
    torch.manual_seed(0)
    sharp = IvptForImageClassification(tiny_config(routing_tau=0.1, gumbel_routing=False)).eval()
    soft = IvptForImageClassification(tiny_config(routing_tau=10.0, gumbel_routing=False))
    soft.load_state_dict(sharp.state_dict())
    soft.eval()
    entropy = lambda r: -(r * r.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert entropy(sharp(images()).routing_weights[0]) < entropy(soft.eval()(images()).routing_weights[0])


def test_interpretation_stage_index_selects_map():
    model = IvptForImageClassification(tiny_config(interpretation_stage_index=-1)).eval()
    out = model(images())
    assert out.interpretation_maps is out.assignment_maps[-1]


def test_map_eps_and_prototype_init_std():
    model = IvptForImageClassification(tiny_config(prototype_init_std=0.5, map_eps=0.1)).eval()
    assert 0.4 < model.ivpt.stages[0].prototypes.std().item() < 0.6
    maps = model(images()).assignment_maps[0]
    assert maps.min() >= 0.1 / (1 + 6 * 0.1) - 1e-6  # every probability lifted by eps before re-normalising


def test_gradient_checkpointing_same_gradients(config):
    torch.manual_seed(0)
    plain = IvptForImageClassification(config).train()
    checkpointed = IvptForImageClassification(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.ivpt.gradient_checkpointing
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        model(images(), labels=torch.tensor([0, 1, 2])).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_equivariance_pass_without_backbone_graph_has_same_gradients(model):
    """docs/method.md#equivalent-forms: maps recomputed from no-grad tokens give the prototypes the same gradients as a full-graph pass."""
    model.train()
    x = images()
    torch.manual_seed(3)
    cheap = model.ivpt.assignment_maps_only(x)
    torch.manual_seed(3)
    full = model.ivpt(x).assignment_maps
    params = [p for s in model.ivpt.stages for p in (s.prototypes, s.position_bias)]
    weights = [torch.randn_like(m) for m in full]
    grad_cheap = torch.autograd.grad(sum((w * m).sum() for w, m in zip(weights, cheap)), params)
    grad_full = torch.autograd.grad(sum((w * m).sum() for w, m in zip(weights, full)), params)
    for a, b in zip(cheap, full):
        torch.testing.assert_close(a, b)
    for a, b in zip(grad_cheap, grad_full):
        torch.testing.assert_close(a, b)


def test_final_patch_features_shared_by_last_stage_and_pooling(model, config):
    """The final LayerNorm'd patch features are computed once (read detached by the last stage, with gradients by the
    part pooling): outputs and gradients equal the form with two LayerNorms, and autograd saves one copy of them."""
    model.train()
    ivpt = model.ivpt
    captured = []
    hook = ivpt.backbone.blocks[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    x = images()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ivpt(x, sample_routing_noise=False)
    hook.remove()
    prefix, grid = ivpt.backbone.num_prefix_tokens, config.grid_size
    tokens = captured[0][:, : prefix + grid * grid]  # the last block's output without its prompt tokens
    two_norms_features = ivpt.backbone.norm(tokens)[:, prefix:]  # the second LayerNorm of the two-norm form
    last_maps = renormalise_with_eps(ivpt.stages[-1](two_norms_features.detach()), config.map_eps)
    two_norms = ivpt.modulation(hard_pool(last_maps, two_norms_features)[0].transpose(1, 2))
    torch.testing.assert_close(out.projected_maps[-1], last_maps, rtol=0, atol=0)
    torch.testing.assert_close(out.part_features, two_norms, rtol=0, atol=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weight = torch.randn_like(two_norms)
    shared = torch.autograd.grad((weight * out.part_features).sum(), trainable, allow_unused=True, retain_graph=True)
    separate = torch.autograd.grad((weight * two_norms).sum(), trainable, allow_unused=True)
    assert sum(g is not None for g in shared) >= 3  # pos/cls/reg embeddings, last prototypes, modulation
    for a, b in zip(shared, separate):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    features_shape = (BATCH, grid * grid, config.backbone_geometry["hidden_size"])
    final_copies = {t.untyped_storage().data_ptr() for t in saved if t.numel() == two_norms_features.numel()
                    and torch.equal(t.reshape(features_shape), two_norms_features.detach())}
    assert len(final_copies) == 1


def _prompted_block_inputs(model, x, **forward_kwargs):
    """Runs `model(x, **forward_kwargs)`; returns it, each prompted block's input and output storage."""
    blocks = model.ivpt.backbone.blocks[-model.config.num_prompted_blocks:]
    inputs, outputs = [], []
    handles = [h for block in blocks for h in (
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0].untyped_storage().data_ptr())),
        block.register_forward_hook(lambda module, args, out: outputs.append(out.untyped_storage().data_ptr())))]
    try:
        return model(x, **forward_kwargs), inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("training", [False, True])
def test_prompts_written_in_place_equal_concatenated_prompts(config, monkeypatch, training):
    """From the second prompted block on, the prompts are written over the previous block's prompt outputs instead
    of concatenated to a new tensor: that block's input is the previous one's output, and the outputs, the loss and
    every gradient equal those of the concatenating form bit for bit."""
    from ivpt.modeling_ivpt import IvptModel

    torch.manual_seed(0)
    model = IvptForImageClassification(config).train(training)
    labels = torch.tensor([0, 1, 2])
    runs = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(IvptModel, "_norm_saves_its_input", lambda self: True)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out, inputs, outputs = _prompted_block_inputs(model, images(), labels=labels)
        assert (inputs[-1] == outputs[-2]) is in_place  # last pass: block 2's input is block 1's output
        out.loss.backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (cat, cat_grads) = runs
    for name in ("loss", "logits", "part_features"):
        torch.testing.assert_close(fast[name], cat[name], rtol=0, atol=0, msg=name)
    for a, b in zip(fast.assignment_maps + fast.projected_maps, cat.assignment_maps + cat.projected_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fast_grads.keys() == cat_grads.keys() and len(fast_grads) > 10
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], cat_grads[name], rtol=0, atol=0, msg=name)


def test_trainable_final_norm_concatenates_prompts_and_trains():
    """With `freeze_backbone=False` the final LayerNorm saves the tokens it normalises for its backward, so they
    must not change afterwards: the prompts are concatenated, and the training step's backward runs (in eval mode
    the norm saves nothing and the prompts are written in place)."""
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(freeze_backbone=False)).train()
    out, inputs, outputs = _prompted_block_inputs(model, images(), labels=torch.tensor([0, 1, 2]))
    assert inputs[-1] != outputs[-2]  # in the last pass (the warped pass, without autograd, runs first)
    out.loss.backward()
    assert model.ivpt.backbone.norm.weight.grad.abs().sum() > 0
    with torch.no_grad():
        _, inputs, outputs = _prompted_block_inputs(model.eval(), images())
    assert inputs[-1] == outputs[-2]


def test_warped_pass_first_equals_the_objective_run_in_pass_order(model, config):
    """The training step runs the equivariance (warped) pass before the first pass, for memory; with the random
    draws kept in pass order (first pass's routing noise, warp, warped pass's noise) loss and gradients equal the
    step that runs the first pass first and un-warps each stage with torchvision's affine calls (`unwarp_maps`).
    Gumbel routing noise on (training mode)."""
    from ivpt.losses import ivpt_objective, sample_equivariance_warp, unwarp_maps, warp_images

    model.train()
    x, labels = images(), torch.tensor([0, 1, 2])
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(11)
    step = model(x, labels=labels)
    reordered = torch.autograd.grad(step.loss, trainable, allow_unused=True)
    torch.manual_seed(11)
    outputs = model.ivpt(x, return_dict=True)  # first pass first
    warp = sample_equivariance_warp(config.image_size, config.equivariance_max_rotation,
                                    config.equivariance_max_translation, config.equivariance_scale_range)
    warped = model.ivpt.assignment_maps_only(warp_images(x, warp))
    logits = model.classifier(outputs.part_features[:, :, :-1].transpose(1, 2)).transpose(1, 2).mean(-1)
    restored = [unwarp_maps(maps, warp, config.image_size) for maps in warped]  # the literal per-stage un-warp
    loss, terms = ivpt_objective(logits, labels, outputs.part_features, outputs.assignment_maps,
                                 outputs.projected_maps, restored, model.loss_weights())
    in_order = torch.autograd.grad(loss, trainable, allow_unused=True)
    torch.testing.assert_close(step.loss, loss, rtol=0, atol=0)
    for name in terms:
        torch.testing.assert_close(step.loss_terms[name], terms[name], rtol=0, atol=0)
    assert sum(g is not None for g in in_order) > 5
    for a, b in zip(reordered, in_order):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_bf16_autocast_keeps_maps_in_fp32(model):
    """docs/method.md#equivalent-forms: under bf16 autocast the distances and softmax stay fp32; maps agree with fp32 within 0.05."""
    model.eval()
    x = images()
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x)
    for a, b in zip(reference.assignment_maps, mixed.assignment_maps):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() < 0.05
    assert mixed.part_features.dtype == torch.float32


# ---- docs/method.md#equivalent-forms fast forms against the literal formulas of docs/method.md#prototype-assignment-maps to docs/method.md#projected-maps, float64, values and gradients ----------------------


def literal_logits(features_grid, prototypes, bias):
    """docs/method.md#prototype-assignment-maps with explicitly expanded norms: features (B, D, H, W), prototypes (P, D), bias (P, H, W)."""
    z_sq = (features_grid**2).sum(1, keepdim=True).expand(-1, prototypes.shape[0], -1, -1)
    q_sq = (prototypes**2).sum(1)[None, :, None, None]
    dots = torch.einsum("bdhw,pd->bphw", features_grid, prototypes)
    return -(z_sq - 2 * dots + q_sq) + bias


def literal_hard_pool(maps, features_grid):
    """docs/method.md#hard-assignment-pooling with the (B, D, P, H, W) broadcast of the release."""
    winners = F.one_hot(maps.argmax(1), maps.shape[1]).permute(0, 3, 1, 2).to(maps.dtype)
    weights = maps * winners  # (B, P, H, W)
    product = weights[:, None] * features_grid[:, :, None]  # (B, D, P, H, W)
    counts = weights.sum((2, 3))
    feats = product.sum((3, 4)).transpose(1, 2)  # (B, P, D)
    safe = torch.where(counts == 0, torch.ones_like(counts), counts)
    return feats / safe[..., None], counts


def test_prototype_logits_match_literal_up_to_a_per_patch_constant():
    """The fast logits leave out −‖z‖², the same for every prototype of a patch: they differ from the literal negative
    squared distances by exactly that, and their softmax over prototypes (the maps) and its gradients are equal."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    q = torch.randn(7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    fast = prototype_logits(z.flatten(2).transpose(1, 2), q, bias.flatten(1)).unflatten(-1, (5, 6))
    slow = literal_logits(z, q, bias)
    torch.testing.assert_close(fast - slow, z.pow(2).sum(1, keepdim=True).expand_as(fast), rtol=1e-12, atol=1e-12)
    fast_maps, slow_maps = fast.softmax(1), slow.softmax(1)
    torch.testing.assert_close(fast_maps, slow_maps, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast_maps * weights).sum(), (z, q, bias))
    grads_slow = torch.autograd.grad((slow_maps * weights).sum(), (z, q, bias))
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_maps_are_closer_to_float64_without_the_feature_norm():
    """LayerNorm'd tokens have ‖z‖² ≈ D: in float32 the literal form loses the prototypes' differences to that
    cancellation, the fast form does not."""
    g = torch.Generator().manual_seed(2)
    z = torch.nn.functional.layer_norm(torch.randn(2, 64, 768, dtype=torch.float64, generator=g), (768,))
    q = 0.05 * torch.randn(9, 768, dtype=torch.float64, generator=g)
    bias = torch.zeros(9, 64, dtype=torch.float64)
    exact = prototype_logits(z, q, bias).softmax(1)
    fast = prototype_logits(z.float(), q.float(), bias.float()).softmax(1)
    literal = (prototype_logits(z.float(), q.float(), bias.float()) - z.float().pow(2).sum(-1)[:, None]).softmax(1)
    fast_error, literal_error = (fast - exact).abs().max(), (literal - exact).abs().max()
    assert fast_error < 1e-6 < literal_error and fast_error < literal_error / 10


def test_hard_pool_matches_literal_with_empty_prototypes():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 4, 5, dtype=torch.float64, generator=g)
    logits[:, 4] -= 100  # prototype 4 never wins: empty, zero feature
    logits[0, 2] -= 100  # prototype 2 empty in the first image only
    maps = logits.softmax(1).requires_grad_(True)
    z = torch.randn(3, 8, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    fast, fast_counts = hard_pool(maps.flatten(2), z.flatten(2).transpose(1, 2))
    slow, slow_counts = literal_hard_pool(maps, z)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_counts, slow_counts, rtol=1e-12, atol=1e-12)
    assert (fast[:, 4] == 0).all() and (fast_counts[:, 4] == 0).all() and (fast[0, 2] == 0).all()
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (maps, z))
    grads_slow = torch.autograd.grad((slow * weights).sum(), (maps, z))
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_routing_prompts_and_projection_match_literal_loops():
    """docs/method.md#routing-to-the-final-parts to docs/method.md#projected-maps against per-part loops: routing rows, empty rows uniform, prompt means, projected maps."""
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(gumbel_routing=False)).double()
    stage = model.ivpt.stages[0]
    g = torch.Generator().manual_seed(2)
    region = torch.randn(2, 5, 32, dtype=torch.float64, generator=g, requires_grad=True)
    counts = torch.rand(2, 5, dtype=torch.float64, generator=g)
    counts[1, 3] = 0
    maps = torch.randn(2, 6, 64, dtype=torch.float64, generator=g).softmax(1).requires_grad_(True)

    routing = stage.route(region, counts, exponential_noise=None)
    expected = torch.softmax(stage.routing_head(region), -1)
    expected[1, 3] = 1 / 3
    torch.testing.assert_close(routing, expected)

    prompts = stage.prompts(region, routing.detach())
    raw = torch.stack([
        torch.stack([sum(routing[b, j, k] * region[b, j] for j in range(5)) / routing[b, :, k].sum()
                     for k in range(3)])
        for b in range(2)
    ])
    torch.testing.assert_close(prompts, stage.prompt_projection(F.layer_norm(raw, (3, 32), eps=1e-5)))

    projected = project_maps(maps, routing)
    literal = torch.stack([
        torch.stack([sum(routing[b, j, k] * maps[b, j] for j in range(5)) for k in range(3)] + [maps[b, 5]])
        for b in range(2)
    ])
    torch.testing.assert_close(projected, literal)
    weights = torch.randn_like(projected)
    for a, b in zip(torch.autograd.grad((projected * weights).sum(), (maps, region), retain_graph=True),
                    torch.autograd.grad((literal * weights).sum(), (maps, region))):
        torch.testing.assert_close(a, b)


def test_eps_maps_equal_recomputed_renormalisation():
    maps = torch.randn(2, 5, 16, dtype=torch.float64).softmax(1)
    eps = renormalise_with_eps(maps, 1e-6)
    torch.testing.assert_close(eps, (maps + 1e-6) / (1 + 5e-6), rtol=1e-12, atol=1e-15)
