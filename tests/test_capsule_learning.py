"""Capsule nets that learn: checks that fail on a net that barely trains (as before the capsbench recipe).

- the default em_capsnet_small overfits 256 Fashion-MNIST images within a bounded number of steps (measured:
  10.5% training error after 80 steps), and the paper recipe (same steps: 57%) does not, so the check tells
  the two apart;
- at initialisation every parameter gets a finite, non-zero gradient of a usable size, and the class logits
  neither saturate nor collapse;
- the paper's settings stay one spelling away (``recipe="paper"``) and unknown recipes are refused.
"""

from __future__ import annotations

import pytest
import torch

import models
from harness.data import get_dataset, iterate, mnist
from harness.losses import spread_loss

needs_fashion = pytest.mark.skipif(
    not mnist.DEBIAN_FASHION.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fashion_256(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """256 fixed Fashion-MNIST training images (float [0,1], 1×28×28) and labels."""
    root = tmp_path_factory.mktemp("fashion")
    ds = get_dataset("fashion_mnist", "train", root=root, download=False, progress=False)
    x, y, _ = next(iterate(ds.select(list(range(256))), 256, shuffle=False, train=False, seed=0))
    return x, y


def fashion_net(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create_model("em_capsnet_small", num_classes=10, input_size=28, **kwargs)


def train_error_after(model, x, y, steps: int, batch: int = 32, margin: float = 0.5) -> float:
    """Adam (lr 3e-3) on fixed batches of (x, y) for ``steps`` steps -> error on all of x (eval mode)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        i = (step * batch) % len(x)
        loss = spread_loss(model(x[i : i + batch]), y[i : i + batch], margin)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


@needs_fashion
def test_default_capsnet_overfits_256_images(fashion_256):
    x, y = fashion_256
    error = train_error_after(fashion_net(), x, y, steps=80)
    assert error < 0.15, f"em_capsnet_small kept {error:.1%} training error on 256 images after 80 steps"


@needs_fashion
def test_paper_recipe_does_not_overfit_as_fast(fashion_256):
    """The same budget leaves the paper recipe far behind: the overfit check above can fail."""
    x, y = fashion_256
    error = train_error_after(fashion_net(recipe="paper"), x, y, steps=80)
    assert error > 0.25


def test_gradients_reach_every_parameter_at_init():
    model = fashion_net()
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    spread_loss(model(x), y, 0.2).backward()
    for name, p in model.named_parameters():
        g = p.grad
        assert g is not None and torch.isfinite(g).all(), name
        assert g.abs().max() > 0, f"{name} gets no gradient"
        # Adam rescales per parameter, but a gradient 1e6 times below its weights' scale would still stall
        scale = max(p.detach().abs().mean().item(), 1e-2)
        assert g.abs().mean() / scale > 1e-6, f"{name}: gradient {g.abs().mean():.2e} vs weights {scale:.2e}"


def test_class_logits_neither_saturate_nor_collapse_at_init():
    model = fashion_net()
    with torch.no_grad():
        a = torch.sigmoid(model(torch.rand(32, 1, 28, 28)))
    assert ((a > 0.02) & (a < 0.98)).float().mean() > 0.9, "class activations saturate at init"
    spread = (a.max(1).values - a.min(1).values).mean()
    assert spread > 1e-3, "every class has the same activation: nothing for the loss to pull apart"


def test_recipes():
    default, paper = fashion_net(), fashion_net(recipe="paper")
    assert len(default.inverse_temperatures) == 2 and len(paper.inverse_temperatures) == 3
    # identity + N(0, 0.1²): a quarter of the entries are ~1; the paper's N(0, 0.5²) averages ~0
    assert abs(default.class_caps.weight.mean().item() - 0.25) < 0.02
    assert abs(paper.class_caps.weight.mean().item()) < 0.05
    explicit = fashion_net(recipe="paper", routing_iters=2)  # explicit arguments win over the recipe
    assert len(explicit.inverse_temperatures) == 2
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        fashion_net(recipe="fast")
    rebuilt = models.create_model(paper.model_name, **paper.model_kwargs)
    rebuilt.load_state_dict(paper.state_dict())


def test_identity_init_starts_votes_as_copies():
    model = fashion_net(weight_init="identity", weight_std=0.0)
    eye = torch.eye(4).expand_as(model.class_caps.weight)
    assert torch.equal(model.class_caps.weight.detach(), eye)
