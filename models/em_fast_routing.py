"""EM routing on VV = [v, v²] with a hand-written backward: the routing core of ``models.em_fast``.

Layout: VV (G, J, I, 32) — routing groups G, parents J, children I, centred votes next to their squares.
VV enters the routing only through two batched matrix-vector products per iteration,
    M-step  S_j = [sum_i R'_ij v_ij, sum_i R'_ij v²_ij] = R'_j · VV_j          (G, J, 32)
    E-step  log p_ij = VV_ij · [mu/var, -1/(2 var)] + const_j                   (G, J, I)
and everything else works on (G, J, I) or (G, J) tensors, 16–32x smaller than VV.

``route`` runs the forward; given the products' outputs recorded by an earlier call (``records``), it
replays the routing without touching VV. ``route_backward`` then walks the iterations in reverse by the
chain rule written out below (no autograd graph: one pass over VV per product, as in the forward) and
returns VV's gradient in factored form: dVV_gj = L_gj^T Rt_gj, a sum of T outer products (M-steps:
R' ⊗ dS, E-steps: d log p ⊗ w), for the caller to apply in one batched matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.em_routing import CostNorm, normalize_cost, safe_divisor

_LOG_2PI = math.log(2 * math.pi)


class PatchSoftmax:
    """Patch competition in the (G, J, I) layout: softmax over the J parents of each child."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-2)

    @staticmethod
    def backward(R: torch.Tensor, dR: torch.Tensor) -> torch.Tensor:
        """d logits of R = softmax(logits) over dim -2."""
        RdR = R * dR
        return RdR.sub_(R * RdR.sum(dim=-2, keepdim=True))


@dataclass
class Step:
    """One iteration's small tensors, kept for the backward."""

    R: torch.Tensor  # (G, J, I) assignments entering the M-step
    Rp: torch.Tensor  # (G, J, I) R'_ij = R_ij a_i
    Rsum: torch.Tensor  # (G, J)
    m: torch.Tensor  # (G, J, 32) [E v, E v²]
    q: torch.Tensor  # (G, J, 16) E v² - mu², before the clamp
    var: torch.Tensor  # (G, J, 16)
    log_sigma: torch.Tensor  # (G, J, 16)
    cost: torch.Tensor  # (G, J) before normalize_cost
    logit: torch.Tensor  # (G, J) lambda (beta_a - cost)
    w: torch.Tensor | None = None  # (G, J, 32) E-step coefficients [mu/var, -1/(2 var)] (not the last)


def route(
    VV,
    acts,
    beta_u,
    beta_a,
    lambdas: Sequence[float],
    cost_norm: str,
    var_floor: float,
    normalize,
    records: list[torch.Tensor] | None = None,
    keep_steps: bool = False,
):
    """EM routing on VV (G, J, I, 32); acts (G, I); beta_u, beta_a (J,); ``normalize`` maps E-step logits
    (G, J, I) to assignments summing to 1 over each child's parents (with a ``backward(R, dR)``).

    Returns the centred means (G, J, 16), the parents' activation logits (G, J), the products' outputs
    (the ``records`` given, or the ones computed here) and, with ``keep_steps``, each iteration's Step.
    """
    G, J, I, _ = VV.shape
    cost_norm = CostNorm(cost_norm)
    flat = VV.view(G * J, I, 32)
    computed = records is None
    records = [] if computed else records
    steps = []
    a_in = acts[:, None, :]  # (G, 1, I)
    R = normalize(VV.new_zeros(G, J, I))
    last = len(lambdas) - 1
    for t, lam in enumerate(lambdas):
        # 1. M-step: [sum_i R'v, sum_i R'v²] in one pass over VV
        Rp = R * a_in
        Rsum = Rp.sum(dim=-1)
        if computed:
            records.append(torch.bmm(Rp.view(G * J, 1, I), flat).view(G, J, 32))
        S = records[2 * t]
        m = S / safe_divisor(Rsum)[..., None]
        mu = m[..., :16]
        q = m[..., 16:] - mu.square()
        var = q.clamp_min(0) + var_floor
        log_sigma = 0.5 * torch.log(var)
        cost = (beta_u[:, None] + log_sigma).sum(dim=-1) * Rsum  # sum_h (beta_u + log sigma_h) R'sum
        logit = lam * (beta_a - normalize_cost(cost, cost_norm, I, J))
        step = Step(R, Rp, Rsum, m, q, var, log_sigma, cost, logit)
        if keep_steps:
            steps.append(step)
        if t == last:
            break
        # 2. E-step: log p_ij = [v, v²]·[mu/var, -1/(2 var)] + const_j in one pass over VV
        inv_var = 1 / var
        step.w = torch.cat([mu * inv_var, -0.5 * inv_var], dim=-1)  # (G, J, 32)
        const = (-0.5 * mu.square() * inv_var - log_sigma).sum(dim=-1) - 8 * _LOG_2PI  # (G, J)
        if computed:
            records.append(torch.bmm(flat, step.w.view(G * J, 32, 1)).view(G, J, I))
        log_p = records[2 * t + 1]
        R = normalize(log_p + (F.logsigmoid(logit) + const)[..., None])
    return mu, logit, records, steps


def route_backward(VV, acts, beta_u, lambdas, cost_norm, normalize, steps: list[Step], d_mu, d_logit):
    """Gradients of ``route``'s outputs (mu, logit) with respect to acts, beta_u, beta_a and VV.

    ``steps`` from ``route(..., keep_steps=True)``. Returns d_acts (G, I), d_beta_u (J,), d_beta_a (J,)
    and VV's gradient as factors L (G·J, T, I), Rt (G·J, T, 32): dVV = L^T Rt.
    """
    G, J, I, _ = VV.shape
    cost_norm = CostNorm(cost_norm)
    flat = VV.view(G * J, I, 32)
    T = 2 * len(steps) - 1
    L, Rt = VV.new_empty(G, J, T, I), VV.new_empty(G, J, T, 32)
    d_acts, d_bu, d_ba = VV.new_zeros(G, I), VV.new_zeros(J), VV.new_zeros(J)
    tiny = torch.finfo(VV.dtype).tiny
    g_mu, g_logit = d_mu, d_logit  # gradients reaching step t's mu (G, J, 16) and logit (G, J)
    g_var = g_ls = 0.0  # ... and its var and log sigma (G, J, 16), from the E-step after it
    for t in range(len(steps) - 1, -1, -1):
        s, lam = steps[t], lambdas[t]
        # logit = lam (beta_a - norm(cost)), cost = Rsum sum_h (beta_u + log sigma_h)
        d_ba += lam * g_logit.sum(dim=0)
        g_cost = _normalize_cost_backward(-lam * g_logit, s.cost, cost_norm, I, J)
        g_Rsum = g_cost * (beta_u[:, None] + s.log_sigma).sum(dim=-1)
        g_cost_Rsum = g_cost * s.Rsum
        d_bu += 16 * g_cost_Rsum.sum(dim=0)
        g_var = g_var + (g_ls + g_cost_Rsum[..., None]) * 0.5 / s.var  # log sigma = log(var) / 2
        g_q = g_var * (s.q >= 0)  # var = clamp_min(q, 0) + floor
        # q = E v² - mu², m = S / Rsum
        g_m = torch.cat([g_mu - 2 * s.m[..., :16] * g_q, g_q], dim=-1)  # (G, J, 32)
        divisor = safe_divisor(s.Rsum)
        g_S = g_m / divisor[..., None]
        g_Rsum = g_Rsum - (g_S * s.m).sum(dim=-1) * (s.Rsum >= tiny)
        # S = R' VV: one pass over VV for dR'; VV's share R' ⊗ dS
        g_Rp = torch.bmm(flat, g_S.view(G * J, 32, 1)).view(G, J, I).add_(g_Rsum[..., None])
        L[:, :, 2 * t], Rt[:, :, 2 * t] = s.Rp, g_S
        # R' = R a
        d_acts += (g_Rp * s.R).sum(dim=1)
        if t == 0:  # the first R is uniform: a constant
            break
        # R = normalize(log p + logsigmoid(logit_prev) + const_prev)
        prev = steps[t - 1]
        g_x = normalize.backward(s.R, g_Rp.mul_(acts[:, None, :]))
        g_const = g_x.sum(dim=-1)  # (G, J)
        g_logit = g_const * torch.sigmoid(-prev.logit)
        # log p = VV w: one pass over VV for dw; VV's share d log p ⊗ w
        g_w = torch.bmm(g_x.view(G * J, 1, I), flat).view(G, J, 32)
        L[:, :, 2 * t - 1], Rt[:, :, 2 * t - 1] = g_x, prev.w
        # w = [mu/var, -1/(2 var)], const = sum_h (-mu²/(2 var) - log sigma) - 8 log 2π
        mu_v = prev.w[..., :16]  # mu / var
        inv_var = -2 * prev.w[..., 16:]
        g_mu = g_w[..., :16] * inv_var - g_const[..., None] * mu_v
        g_var = (0.5 * g_w[..., 16:] * inv_var - g_w[..., :16] * mu_v) * inv_var
        g_var += 0.5 * g_const[..., None] * mu_v.square()  # (G, J, 16)
        g_ls = -g_const[..., None]
    return d_acts, d_bu, d_ba, L.view(G * J, T, I), Rt.view(G * J, T, 32)


def _normalize_cost_backward(g, cost, cost_norm: CostNorm, children: int, parents: int):
    """d cost from d normalize_cost(cost)."""
    if cost_norm is CostNorm.NONE:
        return g
    if cost_norm is CostNorm.SCALED:
        return g * (100.0 * parents / children)
    with torch.enable_grad():  # z-score: tiny (G, J) tensors, autograd is exact and cheap here
        c = cost.detach().requires_grad_()
        return torch.autograd.grad(normalize_cost(c, cost_norm, children, parents), c, g)[0]
