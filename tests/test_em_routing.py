"""EM routing (models/em_routing.py, fast path models/em_fast.py) against a float64 loop of Procedure 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from em_loop import loop_em_dense

from models import em_fast
from models.em_routing import em_routing, inverse_temperatures

pytestmark = pytest.mark.usefixtures("fast_engine")  # every test on both engines of the fast path

LAMBDAS = {
    "official": inverse_temperatures("official", 3, 0.01),
    "linear": inverse_temperatures("linear", 3),
    "constant2": inverse_temperatures("constant", 2, 0.5),
    "one_iter": [1.0],
}


def fast_em(votes, acts, beta_u, beta_a, lambdas, *, cost_norm="none", var_floor=1e-4):
    """The fast path (FastEMRouting: fused statistics, recomputing backward) on em_routing's layout."""
    return em_fast.route_votes(
        votes, acts, beta_u, beta_a, inverse_temperatures=lambdas, cost_norm=cost_norm, var_floor=var_floor
    )


PATHS = {"reference": em_routing, "fast": fast_em}


def random_case(rng: np.random.Generator, I: int, J: int, spread: float = 1.0):
    votes = rng.normal(size=(I, J, 16)) * spread + rng.normal(size=(1, J, 16))
    acts = rng.uniform(0.05, 1.0, size=I)
    return votes, acts, rng.normal(size=J) * 0.5, rng.normal(size=J) * 0.5


def run_path(path, votes, acts, bu, ba, lambdas, dtype, **kw):
    t = lambda x: torch.as_tensor(x, dtype=dtype)  # noqa: E731
    mu, a = PATHS[path](t(votes)[None], t(acts)[None], t(bu), t(ba), lambdas, **kw)
    return mu[0].double().numpy(), a[0].double().numpy()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("cost_norm", ["none", "zscore", "scaled"])
@pytest.mark.parametrize("I,J", [(9, 4), (1, 3), (24, 2)])
def test_float64_matches_loop(path, lam, cost_norm, I, J):
    rng = np.random.default_rng(I * 100 + J)
    votes, acts, bu, ba = random_case(rng, I, J)
    scale = 100.0 * J / I
    want_mu, want_a, _ = loop_em_dense(votes, acts, bu, ba, LAMBDAS[lam], cost_norm=cost_norm, scale=scale)
    mu, a = run_path(path, votes, acts, bu, ba, LAMBDAS[lam], torch.float64, cost_norm=cost_norm)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a, want_a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("cost_norm", ["none", "zscore", "scaled"])
def test_fast_gradients_match_reference_float64(lam, cost_norm):
    """The fast path's hand-written backward against autograd through em_routing, every input."""
    rng = np.random.default_rng(7)
    votes, acts, bu, ba = (torch.as_tensor(x)[None] for x in random_case(rng, 9, 4))
    bu, ba = bu[0], ba[0]
    g = torch.Generator().manual_seed(3)
    d_mu = torch.randn(1, 4, 16, generator=g, dtype=torch.float64)
    d_a = torch.randn(1, 4, generator=g, dtype=torch.float64)
    grads = []
    for path in PATHS.values():
        inputs = [x.clone().requires_grad_() for x in (votes, acts, bu, ba)]
        mu, a = path(*inputs, LAMBDAS[lam], cost_norm=cost_norm)
        grads.append(torch.autograd.grad((mu * d_mu).sum() + (a * d_a).sum(), inputs))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("path", PATHS)
def test_float32_matches_loop_statistically(path):
    """Near-ties make the sharp E-step ill-conditioned in float32: judge the error over many cases."""
    rng = np.random.default_rng(0)
    errors = []
    for case in range(60):
        I, J = int(rng.integers(2, 30)), int(rng.integers(2, 8))
        lam = list(LAMBDAS.values())[case % len(LAMBDAS)]
        votes, acts, bu, ba = random_case(rng, I, J, spread=float(rng.uniform(0.3, 3)))
        want_mu, want_a, _ = loop_em_dense(votes, acts, bu, ba, lam)
        mu, a = run_path(path, votes, acts, bu, ba, lam, torch.float32)
        err_mu = np.abs(mu - want_mu).max() / np.abs(want_mu).max()
        err_a = np.abs(a - want_a).max() / max(np.abs(want_a).max(), 1e-6)
        errors.append(max(err_mu, err_a))
    errors = np.array(errors)
    assert np.median(errors) < 1e-5, errors
    assert (errors < 1e-4).mean() >= 0.9, np.sort(errors)[-10:]


def test_assignments_sum_to_one_and_identical_votes_give_that_vote():
    torch.manual_seed(0)
    votes = torch.randn(3, 7, 4, 16, dtype=torch.float64)
    _, _, R = em_routing(
        votes, torch.rand(3, 7), torch.zeros(4), torch.zeros(4), [1.0, 2.0, 3.0], return_assignments=True
    )
    torch.testing.assert_close(R.sum(-1), torch.ones(3, 7, dtype=torch.float64))
    same = torch.randn(16, dtype=torch.float64).expand(5, 2, 16)
    for path in PATHS.values():
        mu, a = path(
            same[None], torch.rand(1, 5, dtype=torch.float64), torch.zeros(2), torch.zeros(2), [1.0, 1.0]
        )
        torch.testing.assert_close(mu[0], same[0], rtol=1e-12, atol=1e-12)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("path", PATHS)
def test_two_clusters_end_in_different_parents(path):
    """Children 0-5 agree on parent 0 (tight votes near +2), children 6-11 agree on parent 1 (near -2);
    their votes for the other parent are scattered. EM gives each group to the parent it agrees on."""
    g = torch.Generator().manual_seed(1)
    group = torch.arange(12) // 6  # (I,)
    votes = 3 * torch.randn(12, 2, 16, generator=g, dtype=torch.float64)  # scattered by default
    votes[group == 0, 0] = 2 + 0.1 * torch.randn(6, 16, generator=g, dtype=torch.float64)
    votes[group == 1, 1] = -2 + 0.1 * torch.randn(6, 16, generator=g, dtype=torch.float64)
    ones, zeros = torch.ones(1, 12, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    _, _, R = em_routing(votes[None], ones, zeros, zeros, [1.0] * 3, return_assignments=True)
    assert (R[0].argmax(-1) == group).all()
    mu, _ = PATHS[path](votes[None], ones, zeros, zeros, [1.0] * 3)
    torch.testing.assert_close(
        mu[0].mean(-1), torch.tensor([2.0, -2.0], dtype=torch.float64), atol=0.1, rtol=0
    )


@pytest.mark.parametrize("path", PATHS)
def test_single_child_parent_is_finite_with_gradients(path):
    votes = torch.randn(2, 1, 3, 16, requires_grad=True)
    bu, ba = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    mu, a = PATHS[path](votes, torch.rand(2, 1), bu, ba, [1.0, 2.0, 3.0])
    (mu.sum() + a.sum()).backward()
    for x in (mu, a, votes.grad, bu.grad, ba.grad):
        assert torch.isfinite(x).all()
    torch.testing.assert_close(mu, votes.detach()[:, 0])  # one child: the mean is its vote


@pytest.mark.parametrize("path", PATHS)
def test_float32_under_bf16_autocast(path):
    """bf16 votes under autocast route in float32: the same numbers as float32 votes without autocast."""
    votes, acts = torch.randn(2, 6, 3, 16).bfloat16(), torch.rand(2, 6).bfloat16()
    beta = torch.zeros(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, a = PATHS[path](votes, acts, beta, beta, [1.0, 2.0])
    assert mu.dtype == torch.float32 and a.dtype == torch.float32
    want_mu, want_a = PATHS[path](votes.float(), acts.float(), beta, beta, [1.0, 2.0])
    torch.testing.assert_close(mu, want_mu)
    torch.testing.assert_close(a, want_a)


def test_bad_options_fail_with_the_choices():
    votes = torch.randn(1, 3, 2, 16)
    with pytest.raises(ValueError, match="cost_norm 'z'.*'zscore'"):
        em_routing(votes, torch.rand(1, 3), torch.zeros(2), torch.zeros(2), [1.0], cost_norm="z")
    with pytest.raises(ValueError, match="activations"):
        em_routing(votes, torch.rand(1, 4), torch.zeros(2), torch.zeros(2), [1.0])
    with pytest.raises(ValueError, match="lambda_schedule 'cosine'"):
        inverse_temperatures("cosine", 3)


def test_schedules():
    assert inverse_temperatures("official", 3, 0.01) == pytest.approx(
        [0.01 * (1 - 0.95**t) for t in (1, 2, 3)]
    )
    assert inverse_temperatures("linear", 3) == [1.0, 2.0, 3.0]
    assert inverse_temperatures("constant", 2, 0.5) == [0.5, 0.5]
    assert math.isclose(sum(LAMBDAS["official"]), 0.01 * (0.05 + 0.0975 + 0.142625))
