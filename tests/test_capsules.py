"""Capsule layers (models/capsules.py): global and patch competition vs a float64 loop; fast == reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from em_loop import loop_em

import models
from models.capsules import ClassCaps, ConvCaps
from models.global_softmax import GlobalSoftmax

pytestmark = pytest.mark.usefixtures("fast_engine")  # every test on both engines of the fast path

LAMBDAS = [0.5, 1.0, 1.5]


def random_grid(N, H, W, B, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    poses = torch.randn(N, H, W, B, 16, generator=g, dtype=dtype)
    acts = torch.rand(N, H, W, B, generator=g, dtype=dtype) * 0.9 + 0.05
    return poses, acts


def make_conv_caps(B, C, K, s, competition, routing, cost_norm="none", seed=0):
    torch.manual_seed(seed)
    layer = ConvCaps(
        B, C, K, s, LAMBDAS, competition=competition, routing=routing, cost_norm=cost_norm
    ).double()
    with torch.no_grad():
        layer.beta_u.normal_(0, 0.5)
        layer.beta_a.normal_(0, 0.5)
    return layer


def loop_conv_caps(layer: ConvCaps, poses, acts, cost_norm="none"):
    """ConvCaps written as loops: edges child -> parent, one loop_em per image.

    global: a child is its grid cell (h, w, b) and competes over every parent it votes for;
    patch: a child is a (parent position, slot) pair, so each receptive field routes alone."""
    N, H, W, B, _ = poses.shape
    K, s, C = layer.kernel, layer.stride, layer.out_types
    Ho, Wo = (H - K) // s + 1, (W - K) // s + 1
    weight = layer.weight.detach().numpy()  # (K·K·B, C, 4, 4)
    bu = {(ho, wo, c): layer.beta_u[c].item() for ho in range(Ho) for wo in range(Wo) for c in range(C)}
    ba = {(ho, wo, c): layer.beta_a[c].item() for ho in range(Ho) for wo in range(Wo) for c in range(C)}
    mus, outs = np.zeros((N, Ho, Wo, C, 16)), np.zeros((N, Ho, Wo, C))
    for n in range(N):
        votes, a = {}, {}
        for ho in range(Ho):
            for wo in range(Wo):
                for kh in range(K):
                    for kw in range(K):
                        for b in range(B):
                            h, w = ho * s + kh, wo * s + kw
                            child = (h, w, b) if layer.competition == "global" else (ho, wo, kh, kw, b)
                            a[child] = acts[n, h, w, b].item()
                            pose = poses[n, h, w, b].numpy().reshape(4, 4)
                            for c in range(C):
                                votes[child, (ho, wo, c)] = (pose @ weight[(kh * K + kw) * B + b, c]).ravel()
        mu, act, _ = loop_em(votes, a, bu, ba, LAMBDAS, cost_norm=cost_norm, scale=100.0 * C / (K * K * B))
        parents = sorted(bu)
        for p, m, x in zip(parents, mu, act):
            mus[(n, *p)], outs[(n, *p)] = m, x
    return mus, outs


@pytest.mark.parametrize("routing", ["reference", "fast"])
@pytest.mark.parametrize("competition", ["global", "patch"])
@pytest.mark.parametrize("stride,cost_norm", [(1, "none"), (2, "none"), (1, "scaled")])
def test_conv_caps_matches_float64_loop(routing, competition, stride, cost_norm):
    """5x5 positions, K=3, B=2, C=3: every child's R normalised over all parents it votes for (global)."""
    layer = make_conv_caps(2, 3, 3, stride, competition, routing, cost_norm)
    poses, acts = random_grid(2, 5, 5, 2)
    mu, a = layer(poses, acts)
    want_mu, want_a = loop_conv_caps(layer, poses, acts, cost_norm)
    np.testing.assert_allclose(mu.detach().numpy(), want_mu, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.detach().numpy(), want_a, rtol=1e-9, atol=1e-12)


def test_global_differs_from_patch_when_receptive_fields_overlap():
    poses, acts = random_grid(1, 5, 5, 2)
    mu_g, _ = make_conv_caps(2, 3, 3, 1, "global", "reference")(poses, acts)
    mu_p, _ = make_conv_caps(2, 3, 3, 1, "patch", "reference")(poses, acts)
    assert (mu_g - mu_p).abs().max() > 1e-3


@pytest.mark.parametrize("routing", ["reference", "fast"])
def test_global_equals_patch_for_1x1_kernel(routing):
    poses, acts = random_grid(2, 4, 4, 3)
    mu_g, a_g = make_conv_caps(3, 4, 1, 1, "global", routing)(poses, acts)
    mu_p, a_p = make_conv_caps(3, 4, 1, 1, "patch", routing)(poses, acts)
    torch.testing.assert_close(mu_g, mu_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a_g, a_p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_global_softmax_sums_to_one_per_child(stride):
    """Assignments of each covered child, summed over every parent position and type, are 1."""
    H, K, B, C = 7, 3, 2, 4
    soft = GlobalSoftmax((H, H), K, stride)
    Ho = soft.out_hw[0]
    logits = 30 * torch.randn(3, Ho * Ho, K * K * B, C, dtype=torch.float64)  # wide range: needs the shift
    R = soft(logits)
    per_slot = R.sum(-1).view(3, Ho * Ho, K * K, B).permute(0, 3, 2, 1).reshape(3, B * K * K, Ho * Ho)
    per_child = F.fold(per_slot, (H, H), K, stride=stride)  # (N, B, H, H)
    covered = F.fold(torch.ones_like(per_slot), (H, H), K, stride=stride) > 0
    torch.testing.assert_close(per_child[covered], torch.ones_like(per_child[covered]))
    assert torch.isfinite(R).all()


def grads_of(layer, poses, acts):
    poses, acts = poses.clone().requires_grad_(), acts.clone().requires_grad_()
    mu, a = layer(poses, acts)
    g = torch.Generator().manual_seed(5)
    loss = (mu * torch.randn(mu.shape, generator=g, dtype=mu.dtype)).sum() + (
        a * torch.randn(a.shape, generator=g, dtype=a.dtype)
    ).sum()
    params = [layer.weight, layer.beta_u, layer.beta_a]
    grads = torch.autograd.grad(loss, [poses, acts, *params])
    return (mu, a, *grads)


@pytest.mark.parametrize("competition", ["global", "patch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_matches_reference_values_and_gradients(competition, dtype):
    poses, acts = random_grid(2, 7, 7, 3, dtype=dtype, seed=3)
    ref = make_conv_caps(3, 4, 3, 2, competition, "reference").to(dtype)
    fast = make_conv_caps(3, 4, 3, 2, competition, "fast").to(dtype)
    fast.load_state_dict(ref.state_dict())
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)
    for r, f in zip(grads_of(ref, poses, acts), grads_of(fast, poses, acts)):
        torch.testing.assert_close(f, r, **tol)


@pytest.mark.parametrize("competition", ["global", "patch"])
def test_network_fast_matches_reference(competition):
    """em_capsnet_small end to end in float64: logits and every parameter's gradient."""
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = []
    for routing in ("reference", "fast"):
        torch.manual_seed(0)
        model = models.create_model(
            "em_capsnet_small", input_size=28, competition=competition, routing=routing
        )
        model = model.double()
        logits = model(x)
        logits.square().sum().backward()
        outs.append([logits.detach()] + [p.grad for p in model.parameters()])
    for r, f in zip(*outs):
        torch.testing.assert_close(f, r, rtol=1e-8, atol=1e-10)


def test_class_caps_coordinate_addition():
    """With zero transformations every vote is the child's offset: the receptive-field centre, scaled."""
    centres = [(8 + 4 * r + 0.5) / 32 for r in range(4)]
    for coord_add in (True, False):
        layer = ClassCaps(2, 3, [1.0], centres, coord_add=coord_add, routing="reference").double()
        off = layer.coordinate_offsets(torch.float64).view(4, 4, 2, 16)
        if coord_add:
            assert off[1, 3, 0, 0] == pytest.approx(12.5 / 32) and off[1, 3, 0, 1] == pytest.approx(20.5 / 32)
            assert (off[..., 2:] == 0).all()
        else:
            assert (off == 0).all()
    layer = ClassCaps(2, 3, [1.0, 1.0], centres, routing="reference").double()
    with torch.no_grad():
        layer.weight.zero_()
    mu, _ = layer(
        torch.randn(1, 4, 4, 2, 16, dtype=torch.float64), torch.ones(1, 4, 4, 2, dtype=torch.float64)
    )
    mean_centre = sum(centres) / 4  # uniform activations and a symmetric grid: the mean centre
    torch.testing.assert_close(mu[0, :, :2], torch.full((3, 2), mean_centre, dtype=torch.float64))


def test_bad_layer_input_names_the_problem():
    layer = make_conv_caps(2, 3, 3, 1, "global", "fast")
    with pytest.raises(ValueError, match="needs 2 types"):
        layer(*random_grid(1, 5, 5, 3))
    with pytest.raises(ValueError, match="unknown competition 'local'"):
        ConvCaps(2, 3, 3, 1, LAMBDAS, competition="local")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("competition", ["global", "patch"])
def test_cuda_fast_matches_cpu_reference_under_bf16(competition):
    """On CUDA, bf16 autocast (convolutions and votes in bf16, routing in float32) stays near fp32 CPU."""
    torch.manual_seed(0)
    cpu = models.create_model("em_capsnet_small", competition=competition, routing="reference")
    gpu = models.create_model("em_capsnet_small", competition=competition).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.rand(4, 1, 32, 32)
    want = cpu(x)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), want, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(x.cuda())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.argmax(-1).cpu() == want.argmax(-1)).float().mean() >= 0.75


def test_training_after_evaluation_in_inference_mode():
    """Evaluation runs under torch.inference_mode and leaves the fast path's buffers behind; the next
    training step must not write into them (it did on the torch-ops engine, the one CUDA runs)."""
    torch.manual_seed(0)
    model = models.create_model("em_capsnet_small", num_classes=10, input_size=28)
    x = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        evaluated = model(x)
    trained = model(x)
    trained.sum().backward()
    assert torch.allclose(trained.detach(), evaluated)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
