"""Registry sweep (timm style): every registered model on tiny inputs — shapes, finite outputs and gradients,
parameter counts next to the paper's, the contract attributes — plus capsule-specific checks."""

from __future__ import annotations

import pytest
import torch

import models

# the paper's parameter counts (em_capsnet ≈310K, small 68K, CNN baseline 4.2M); cnn_small is sized to
# within 10% of em_capsnet
PAPER_PARAMS = {"em_capsnet": (310e3, 0.05), "em_capsnet_small": (68e3, 0.05), "cnn_baseline": (4.2e6, 0.05)}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize("in_channels,size", [(1, 32), (2, 28)])
def test_forward_backward_finite(name, in_channels, size):
    torch.manual_seed(0)
    model = models.create_model(name, in_channels=in_channels, num_classes=5, input_size=size)
    assert model.family in ("capsule", "cnn") and model.default_loss in ("spread", "cross_entropy")
    assert model.num_classes == 5 and 0 < model.default_lr < 0.1  # the runner's optim.lr when that is 0
    x = torch.rand(2, in_channels, size, size)
    x[1] = 0.5  # a blank image: per-image standardisation must not divide by zero
    logits = model(x)
    assert logits.shape == (2, 5) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", models.list_models())
def test_parameter_counts_near_the_paper(name):
    model = models.create_model(name)
    count = n_params(model)
    if name == "cnn_small":
        target, tol = n_params(models.create_model("em_capsnet")), 0.10
    elif name in PAPER_PARAMS:
        target, tol = PAPER_PARAMS[name]
    else:
        pytest.skip(f"{name}: no published parameter count")
    assert abs(count - target) <= tol * target, f"{name}: {count:,} parameters, paper {target:,.0f}"


@pytest.mark.parametrize("name", models.list_models("em_*"))
def test_capsule_contract(name):
    torch.manual_seed(0)
    kwargs = dict(num_classes=4, input_size=28, routing_iters=2, cost_norm="zscore")
    model = models.create_model(name, **kwargs)
    assert model.family == "capsule" and model.default_loss == "cross_entropy"  # the capsbench recipe's
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        poses, acts = model.forward_capsules(x)
        assert poses.shape == (2, 4, 16) and acts.shape == (2, 4)
        assert ((acts > 0) & (acts < 1)).all()
        torch.testing.assert_close(torch.sigmoid(model(x)), acts)  # logits are taken before the sigmoid
        torch.manual_seed(0)
        again = models.create_model(name, **kwargs)
        assert torch.equal(again(x), model(x))  # same seed, same result


def test_capsule_logits_keep_a_gradient_when_activations_saturate():
    """lambda = 1, 2, 3 without cost normalisation saturates a_j; the logits must still carry gradient."""
    torch.manual_seed(0)
    model = models.create_model("em_capsnet_small", lambda_schedule="linear", cost_norm="none")
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    logits = model(x)
    _, acts = model.forward_capsules(x)
    assert ((acts == 0) | (acts == 1)).any()  # saturated in float32
    assert logits.abs().max() > 20 and torch.isfinite(logits).all()
    logits[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0


def test_capsnet_options_are_checked():
    with pytest.raises(ValueError, match="unknown lambda_schedule"):
        models.create_model("em_capsnet_small", lambda_schedule="cosine")
    with pytest.raises(ValueError, match="unknown routing 'slow'"):
        models.create_model("em_capsnet_small", routing="slow")
    with pytest.raises(ValueError, match="input_size 16 is too small"):
        models.create_model("em_capsnet_small", input_size=16)
    with pytest.raises(ValueError, match="class_lambda_scale must be > 0"):
        models.create_model("em_capsnet_small", class_lambda_scale=0)
    with pytest.raises(ValueError, match="unknown default_loss 'hinge'"):
        models.create_model("em_capsnet_small", default_loss="hinge")
    model = models.create_model("em_capsnet_small")
    with pytest.raises(ValueError, match=r"expected input N×1×32×32, got \(1, 1, 28, 28\)"):
        model(torch.rand(1, 1, 28, 28))


def test_class_lambda_scale_scales_only_the_class_layer():
    base = models.create_model("em_capsnet_small", class_lambda_scale=1)
    scaled = models.create_model("em_capsnet_small", class_lambda_scale=10)
    assert scaled.conv_caps1.inverse_temperatures == base.conv_caps1.inverse_temperatures
    assert scaled.conv_caps2.inverse_temperatures == base.conv_caps2.inverse_temperatures
    want = [10 * lam for lam in base.class_caps.inverse_temperatures]
    assert scaled.class_caps.inverse_temperatures == pytest.approx(want)
