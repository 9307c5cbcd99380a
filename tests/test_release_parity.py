"""A release snapshot converted with `ivpt.convert_official` gives the release's loss terms and gradients.

We cannot run the release's code here, so the "release" side is an independent, literal re-computation of the method
as documented in docs/method.md, written directly on the release's tensors by their release names (key layout of a
release snapshot): functional ViT blocks, the expanded distance form on channel-first maps, the 5-D broadcast
pooling, stage maps recomputed after the block loop, the two-affine inverse warp, every loss term spelled out. The
converted model must give the same eight loss terms, total and gradient of every trainable tensor, with the same
fixed `EquivarianceWarp` and routing noise off.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import ivpt.modeling_ivpt
from ivpt import IvptForImageClassification
from ivpt.convert_official import convert
from ivpt.losses import LOSS_TERMS, EquivarianceWarp

from conftest import TINY_BACKBONE_KWARGS, tiny_config

# the release's trainable tensors (its three trained optimizer groups); everything else is frozen
RELEASE_TRAINABLE = ("cls_token", "reg_token", "pos_embed", "p_token.", "p_bias.", "p_linear.", "p_classifier.",
                     "modulation.", "fc_class_landmarks.")


def release_snapshot_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random `model_state` in the release's key layout (backbone included), with non-trivial values everywhere
    (LayerScale and LayerNorm affines away from their initial values, so a wrong mapping would show)."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape, std=1.0: torch.randn(*shape, generator=generator) * std  # noqa: E731
    backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0, img_size=config.image_size,
                                 **config.backbone_kwargs)
    state = {key: value + normal(*value.shape, std=0.1) for key, value in backbone.state_dict().items()}
    hidden, parts, grid = backbone.embed_dim, config.num_parts, config.grid_size
    for s, count in enumerate(config.n_pro):
        state[f"p_token.{s}"] = normal(1, count, hidden)
        state[f"p_bias.{s}"] = normal(1, count, grid, grid, std=0.5)
        if s < len(config.n_pro) - 1:
            state[f"p_linear.{s}.weight"] = normal(hidden, hidden, std=0.2)
            state[f"p_linear.{s}.bias"] = normal(hidden, std=0.1)
            state[f"p_norm.{s}.weight"] = 1 + normal(parts, hidden, std=0.1)
            state[f"p_norm.{s}.bias"] = normal(parts, hidden, std=0.1)
            state[f"p_classifier.{s}.weight"] = normal(parts, hidden, std=0.3)
            state[f"p_classifier.{s}.bias"] = normal(parts, std=0.1)
    state["modulation.weight"] = 1 + normal(hidden, parts + 1, std=0.1)
    state["modulation.bias"] = normal(hidden, parts + 1, std=0.1)
    state["fc_class_landmarks.weight"] = normal(config.num_labels, hidden, std=0.3)
    return state


class LiteralRelease:
    """The method written out on release-named tensors (`state`), float32, routing without noise."""

    def __init__(self, state, config):
        self.state, self.config = state, config
        self.hidden = state["cls_token"].shape[-1]
        self.registers = state["reg_token"].shape[1]
        self.heads = TINY_BACKBONE_KWARGS["num_heads"]
        self.patch = TINY_BACKBONE_KWARGS["patch_size"]
        self.depth = TINY_BACKBONE_KWARGS["depth"]
        self.stages = len(config.n_pro) - 1  # S
        self.parts = config.n_pro[-1] - 1  # K
        self.grid = config.grid_size

    def final_norm(self, tokens):
        return F.layer_norm(tokens, (self.hidden,), self.state["norm.weight"], self.state["norm.bias"], eps=1e-6)

    def block(self, tokens, index):
        w = lambda name: self.state[f"blocks.{index}.{name}"]  # noqa: E731
        batch, length, hidden = tokens.shape
        x = F.layer_norm(tokens, (hidden,), w("norm1.weight"), w("norm1.bias"), eps=1e-6)
        # the release evaluates the qkv projection three times on the same input: once is the same numbers
        qkv = F.linear(x, w("attn.qkv.weight"), w("attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) / (hidden // self.heads) ** 0.5).softmax(-1) @ v
        attention = F.linear(attention.transpose(1, 2).reshape(batch, length, hidden), w("attn.proj.weight"),
                             w("attn.proj.bias"))
        tokens = tokens + w("ls1.gamma") * attention
        x = F.layer_norm(tokens, (hidden,), w("norm2.weight"), w("norm2.bias"), eps=1e-6)
        x = F.linear(F.gelu(F.linear(x, w("mlp.fc1.weight"), w("mlp.fc1.bias"))), w("mlp.fc2.weight"),
                     w("mlp.fc2.bias"))
        return tokens + w("ls2.gamma") * x

    def patch_grid(self, tokens):
        """(B, T, D) tokens -> (B, D, H, W) patch features after the final LayerNorm."""
        patches = self.final_norm(tokens)[:, 1 + self.registers :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], self.hidden, self.grid, self.grid)

    def stage_map(self, features, s):
        """Softmax over prototypes of −(‖z‖² − 2⟨z, q⟩ + ‖q‖²) + bias; features (B, D, H, W) -> (B, P, H, W)."""
        prototypes = self.state[f"p_token.{s}"][0]
        squared_features = (features**2).sum(1, keepdim=True)
        dots = torch.einsum("bdhw,pd->bphw", features, prototypes)
        squared_prototypes = (prototypes**2).sum(1)[None, :, None, None]
        logits = -(squared_features - 2 * dots + squared_prototypes) + self.state[f"p_bias.{s}"]
        return logits.softmax(1)

    @staticmethod
    def compute_feat(maps, features):
        """Hard-assignment pooling through the (B, D, P, H, W) broadcast product, as the release writes it."""
        winners = torch.zeros_like(maps).scatter(1, maps.argmax(1, keepdim=True), 1.0)
        weights = maps * winners
        counts = weights.sum((2, 3))  # (B, P)
        pooled = (weights[:, None] * features[:, :, None]).sum((3, 4)).transpose(1, 2)  # (B, P, D)
        return pooled / torch.where(counts == 0, torch.ones_like(counts), counts)[..., None], counts

    def forward(self, images):
        st, K = self.state, self.parts
        batch = images.shape[0]
        patches = F.conv2d(images, st["patch_embed.proj.weight"], st["patch_embed.proj.bias"], stride=self.patch)
        patches = patches.flatten(2).transpose(1, 2) + st["pos_embed"]
        tokens = torch.cat([st["cls_token"].expand(batch, -1, -1), st["reg_token"].expand(batch, -1, -1), patches], 1)
        num_tokens = tokens.shape[1]
        for index in range(self.depth - self.stages):
            tokens = self.block(tokens, index)
        stage_inputs, projected = [], []
        for s in range(self.stages):
            tokens = tokens[:, :num_tokens]
            stage_inputs.append(tokens)
            features = self.patch_grid(tokens.detach())
            maps = self.stage_map(features, s)
            foreground = maps.shape[1] - 1
            region, counts = self.compute_feat(maps.detach(), features)
            routing = F.linear(region[:, :foreground], st[f"p_classifier.{s}.weight"], st[f"p_classifier.{s}.bias"])
            routing = routing.softmax(-1)
            routing = torch.where(counts[:, :foreground, None] == 0, torch.full_like(routing, 1 / K), routing)
            fixed = routing.detach()
            raw = (fixed[..., None] * region[:, :foreground, None, :]).sum(1) / fixed.sum(1)[..., None]  # (B, K, D)
            normed = F.layer_norm(raw, (K, self.hidden), st[f"p_norm.{s}.weight"], st[f"p_norm.{s}.bias"], eps=1e-5)
            prompts = F.linear(normed, st[f"p_linear.{s}.weight"], st[f"p_linear.{s}.bias"])
            flat = maps.flatten(2)
            routed = (routing[..., None] * flat[:, :foreground, None, :]).sum(1)  # (B, K, N)
            projected.append(torch.cat([routed, flat[:, -1:]], 1))
            tokens = self.block(torch.cat([tokens, prompts], 1), self.depth - self.stages + s)
        tokens = tokens[:, :num_tokens]
        stage_inputs.append(tokens)
        maps = []
        for s, stage_tokens in enumerate(stage_inputs):  # recomputed after the loop, "eps" version
            raw_map = self.stage_map(self.patch_grid(stage_tokens.detach()), s) + 1e-6
            maps.append(raw_map / raw_map.sum(1, keepdim=True))
        projected.append(maps[-1].flatten(2))
        part_features, _ = self.compute_feat(maps[-1], self.patch_grid(tokens))
        modulated = F.layer_norm(part_features.transpose(1, 2), (self.hidden, K + 1), st["modulation.weight"],
                                 st["modulation.bias"], eps=1e-5)  # (B, D, K+1)
        scores = torch.einsum("cd,bdk->bck", st["fc_class_landmarks.weight"], modulated[:, :, :K])
        return scores.mean(-1), modulated, maps, projected

    def loss_terms(self, images, labels, warp: EquivarianceWarp):
        logits, modulated, maps, projected = self.forward(images)
        warped = TF.affine(images, angle=warp.angle, translate=list(warp.translation), scale=warp.scale,
                           shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
        _, _, warped_maps, _ = self.forward(warped)
        restored = []
        for m in warped_maps:
            shift = [-t * m.shape[-1] / self.config.image_size for t in warp.translation]
            m = TF.affine(m, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
            restored.append(TF.affine(m, angle=-warp.angle, translate=[0.0, 0.0], scale=1 / warp.scale,
                                      shear=[0.0, 0.0]))
        mean = lambda values: torch.stack(values).mean()  # noqa: E731
        target = projected[-1].detach() + 1e-10

        def presence(m):
            return 1 - F.avg_pool2d(m[:, :-1], 3, 1).amax(dim=(2, 3)).amax(0).mean()

        def enforced_presence(m):
            pooled = F.avg_pool2d(m[:, -1:], 3, 1)[:, 0]
            side = pooled.shape[-1]
            g = torch.arange(side, dtype=torch.float32) / (side - 1) * 2 - 1
            radius = g[:, None] ** 2 + g[None, :] ** 2
            strongest = (pooled * radius / radius.max()).amax(dim=(1, 2))
            return (-strongest.log().clamp(min=-100)).mean()

        def entropy(m):
            p = m.clamp(1e-6, 1)
            p = p / p.sum(1, keepdim=True)
            return -(p * p.log()).sum(1).mean()

        def total_variation(m):
            b, _, h, w = m.shape
            return ((m[:, :, 1:] - m[:, :, :-1]).abs().sum() + (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().sum()) / (
                b * h * w)

        unit = modulated / modulated.norm(dim=1, keepdim=True).clamp(min=1e-12)
        gram = unit.transpose(1, 2) @ unit
        return {
            "classification": F.cross_entropy(logits, labels),
            "consistency": mean([(target * (target / (p + 1e-10)).log()).sum(1).mean() for p in projected[:-1]]),
            "presence": mean([presence(m) for m in maps]),
            "orthogonality": ((gram - torch.eye(gram.shape[-1])) ** 2).mean(),
            "equivariance": mean([
                1 - F.cosine_similarity(m[:, :-1].flatten(2), r[:, :-1].flatten(2), dim=-1, eps=1e-8).mean()
                for m, r in zip(maps, restored)
            ]),
            "total_variation": mean([total_variation(m) for m in maps]),
            "enforced_presence": mean([enforced_presence(m) for m in maps]),
            "entropy": mean([entropy(m) for m in maps]),
        }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A release snapshot file, converted by `python -m ivpt.convert_official`'s function, loaded back."""
    config = tiny_config()
    state = release_snapshot_state(config)
    folder = tmp_path_factory.mktemp("parity")
    torch.save({"model_state": state, "optimizer_state": {}, "finished_epoch": 25, "epoch_test_accuracies": []},
               folder / "snapshot_best.pt")
    out = convert(str(folder / "snapshot_best.pt"), str(folder / "converted"), n_pro=config.n_pro,
                  image_size=config.image_size, backbone=config.backbone, backbone_kwargs=config.backbone_kwargs)
    return state, IvptForImageClassification.from_pretrained(out), config


def _our_name(release_key: str) -> str:
    from ivpt.convert_official import rename_key

    return rename_key(release_key)[0]


@pytest.mark.parametrize("warp", [EquivarianceWarp(31.7, (5, -3), 1.17), EquivarianceWarp(-64.0, (-7, 2), 0.86)])
def test_converted_snapshot_gives_release_loss_terms_and_gradients(converted, warp, monkeypatch):
    state, model, config = converted
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, config.image_size, config.image_size, generator=generator)
    labels = torch.tensor([0, 4, 6])

    release_state = {key: value.clone().requires_grad_(key.startswith(RELEASE_TRAINABLE)) for key, value in state.items()}
    release = LiteralRelease(release_state, config)
    expected_terms = release.loss_terms(images, labels, warp)
    expected_total = sum(expected_terms.values())  # every weight of the recipe is 1
    expected_total.backward()

    monkeypatch.setattr(ivpt.modeling_ivpt, "sample_equivariance_warp", lambda *args, **kwargs: warp)
    model.train().zero_grad()
    outputs = model(images, labels=labels, sample_routing_noise=False)
    outputs.loss.backward()

    assert set(outputs.loss_terms) == set(LOSS_TERMS)
    for name in LOSS_TERMS:
        torch.testing.assert_close(outputs.loss_terms[name], expected_terms[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(outputs.loss, expected_total, rtol=1e-5, atol=1e-6)

    ours = dict(model.named_parameters())
    trainable_ours = {name for name, parameter in ours.items() if parameter.requires_grad}
    trainable_release = {_our_name(key) for key, value in release_state.items() if value.requires_grad}
    assert trainable_ours == trainable_release  # the same tensors train (p_norm and the final norm stay frozen)
    for key, value in release_state.items():
        if not value.requires_grad:
            continue
        gradient = ours[_our_name(key)].grad
        expected = value.grad[0] if key.startswith(("p_token.", "p_bias.")) else value.grad
        assert expected.abs().max() > 0, key  # every trainable tensor is reached by some term
        torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
