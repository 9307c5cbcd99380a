"""Speed features give the same outputs as the plain model: torch.compile (inference and training step; no graph break
in the block loop), bf16 autocast on CPU, gradient checkpointing, batched inference. Timings: bench/bench_speed.py."""

import torch

from conftest import tiny_config
from ivpt import IvptForImageClassification


def make_model(**overrides):
    torch.manual_seed(0)
    return IvptForImageClassification(tiny_config(**overrides))


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
            if p.grad is not None}


def training_step(model, images, labels, seed=0):
    """One forward + backward of the full objective (warp drawn from the seeded global generator); loss and grads."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(images, labels=labels, sample_routing_noise=False).loss
    loss.backward()
    return loss.detach(), trainable_grads(model)


def test_block_loop_compiles_as_one_graph():
    """fullgraph=True fails on any graph break: the block loop (with and without autograd) and the whole inference
    forward trace as one graph each."""
    torch._dynamo.reset()
    model = make_model()
    images = torch.randn(2, 3, 64, 64)
    encode = torch.compile(model.ivpt._encode, fullgraph=True, backend="eager")
    model.train()
    features, *_ = encode(images, [None, None])
    eager_features, *_ = model.ivpt._encode(images, [None, None])
    torch.testing.assert_close(features, eager_features)
    model.eval()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")(images)
        eager = model(images)
    torch.testing.assert_close(compiled.logits, eager.logits)
    torch.testing.assert_close(compiled.interpretation_maps, eager.interpretation_maps)


def test_compiled_inference_and_training_step_match_eager():
    """torch.compile through AOTAutograd (the graph capture and autograd of the default inductor path, without its
    code generation: that is timed and compared on real sizes in bench/bench_speed.py)."""
    torch._dynamo.reset()
    model = make_model()
    images, labels = torch.randn(3, 3, 64, 64), torch.tensor([0, 3, 6])
    compiled = torch.compile(model, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images).logits, model(images).logits)
    eager_loss, eager_grads = training_step(model, images, labels)
    compiled_loss, compiled_grads = training_step(compiled, images, labels)
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 5
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = make_model()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    plain_loss, plain_grads = training_step(model, images, labels)
    model.activation_checkpointing_enable()
    assert model.ivpt.gradient_checkpointing
    calls = []
    checkpoint = model.ivpt._gradient_checkpointing_func
    model.ivpt._gradient_checkpointing_func = lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs)
    checkpointed_loss, checkpointed_grads = training_step(model, images, labels)
    assert len(calls) == len(model.ivpt.backbone.blocks)  # every block of the clean pass ran under checkpointing
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    for name in plain_grads:
        torch.testing.assert_close(checkpointed_grads[name], plain_grads[name], msg=name)


def test_bf16_autocast_keeps_maps_in_float32_and_logits_close():
    model = make_model().eval()
    images = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert all(maps.dtype == torch.float32 for maps in low.assignment_maps)  # distances/softmax/pooling stay fp32
    assert low.logits.dtype == low.part_logits.dtype == torch.float32  # the classifier too: near ties keep their order
    scale = reference.logits.abs().max()
    assert (low.logits.float() - reference.logits).abs().max() < 0.05 * scale
    torch.testing.assert_close(low.interpretation_maps, reference.interpretation_maps, atol=0.05, rtol=0)


def test_batched_inference_equals_one_image_at_a_time():
    model = make_model().eval()
    images = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        batched = model(images)
        single = [model(image[None]) for image in images]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.interpretation_maps, torch.cat([s.interpretation_maps for s in single]),
                               rtol=1e-4, atol=1e-5)
