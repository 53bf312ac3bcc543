"""Capsule nets that learn: checks that fail on a net that barely trains (as before the capsbench recipe).

- the default em_capsnet_small overfits 256 Fashion-MNIST images within a bounded number of steps (measured:
  5.1% training error after 80 steps, 10.5% after 40), and the paper recipe (80 steps: 53%) does not, so the
  check tells the two apart;
- at initialisation every parameter gets a finite, non-zero gradient of a usable size, and the class scores
  neither saturate nor collapse;
- the paper's settings stay one spelling away (``recipe="paper"``) and unknown recipes are refused.
"""

from __future__ import annotations

import pytest
import torch

import models
from harness.data import get_dataset, iterate, mnist
from harness.losses import get_loss

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
    """Adam (lr 3e-3) with the model's own loss on fixed batches of (x, y) for ``steps`` steps -> error on
    all of x (eval mode)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = get_loss(model.default_loss)
    model.train()
    for step in range(steps):
        i = (step * batch) % len(x)
        loss = loss_fn(model(x[i : i + batch]), y[i : i + batch], margin)
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


# the default (cross-entropy, class scale 3) and the paper's spread loss on the same net
OWN_AND_SPREAD_LOSS = [{}, dict(default_loss="spread", class_lambda_scale=1.0)]


@pytest.mark.parametrize("kwargs", OWN_AND_SPREAD_LOSS, ids=["ce", "spread"])
def test_gradients_reach_every_parameter_at_init(kwargs):
    model = fashion_net(**kwargs)
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    get_loss(model.default_loss)(model(x), y, 0.2).backward()
    for name, p in model.named_parameters():
        g = p.grad
        assert g is not None and torch.isfinite(g).all(), name
        assert g.abs().max() > 0, f"{name} gets no gradient"
        # Adam rescales per parameter, but a gradient 1e6 times below its weights' scale would still stall
        scale = max(p.detach().abs().mean().item(), 1e-2)
        assert g.abs().mean() / scale > 1e-6, f"{name}: gradient {g.abs().mean():.2e} vs weights {scale:.2e}"


@pytest.mark.parametrize("kwargs", OWN_AND_SPREAD_LOSS, ids=["ce", "spread"])
def test_class_scores_neither_saturate_nor_collapse_at_init(kwargs):
    """What the model's own loss sees: cross-entropy the logits' softmax, the spread loss a = sigmoid."""
    model = fashion_net(**kwargs)
    with torch.no_grad():
        logits = model(torch.rand(32, 1, 28, 28))
    if model.default_loss == "cross_entropy":
        assert logits.softmax(1).max(1).values.mean() < 0.9, "the softmax is near one-hot at init"
        spread = (logits.max(1).values - logits.min(1).values).mean()
    else:
        a = torch.sigmoid(logits)
        assert ((a > 0.02) & (a < 0.98)).float().mean() > 0.9, "class activations saturate at init"
        spread = (a.max(1).values - a.min(1).values).mean()
    assert spread > 1e-3, "every class has the same score: nothing for the loss to pull apart"


def test_recipes():
    default, paper = fashion_net(), fashion_net(recipe="paper")
    assert len(default.inverse_temperatures) == 2 and len(paper.inverse_temperatures) == 3
    assert default.default_loss == "cross_entropy" and paper.default_loss == "spread"
    scale = default.class_caps.inverse_temperatures[-1] / default.inverse_temperatures[-1]
    assert scale == pytest.approx(3.0)
    assert paper.class_caps.inverse_temperatures == tuple(paper.inverse_temperatures)
    # identity + N(0, 0.1²): a quarter of the entries are ~1; the paper's N(0, 0.5²) averages ~0
    assert abs(default.class_caps.weight.mean().item() - 0.25) < 0.02
    assert abs(paper.class_caps.weight.mean().item()) < 0.05
    explicit = fashion_net(recipe="paper", routing_iters=2)  # explicit arguments win over the recipe
    assert len(explicit.inverse_temperatures) == 2
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        fashion_net(recipe="fast")
    rebuilt = models.create_model(paper.model_name, **paper.model_kwargs)
    rebuilt.load_state_dict(paper.state_dict())


def test_a_checkpointed_model_keeps_its_recipe_when_the_defaults_change(monkeypatch):
    """model_kwargs records every setting the recipe resolved, so an old checkpoint rebuilds as it trained."""
    model = fashion_net()
    assert model.model_kwargs["class_lambda_scale"] == 3.0 and model.model_kwargs["routing_iters"] == 2
    changed = dict(routing_iters=3, default_loss="spread")
    monkeypatch.setitem(models.matrix_capsnet.RECIPES, "capsbench", changed)
    rebuilt = models.create_model(model.model_name, **model.model_kwargs)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.class_caps.inverse_temperatures == model.class_caps.inverse_temperatures
    assert rebuilt.default_loss == "cross_entropy" and len(rebuilt.inverse_temperatures) == 2
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_identity_init_starts_votes_as_copies():
    model = fashion_net(weight_init="identity", weight_std=0.0)
    eye = torch.eye(4).expand_as(model.class_caps.weight)
    assert torch.equal(model.class_caps.weight.detach(), eye)
