"""EM routing between capsule layers (Hinton, Sabour & Frosst, ICLR 2018, Procedure 1), as written.

This is the plain statement of docs/em_routing.md — one tensor op per line of the paper — used by the
``routing="reference"`` path and as the readable definition of the math. ``models/em_fast.py`` computes
the same numbers with less memory traffic; tests hold the two together and against a float64 loop.

Children i (activation a_i) vote V_ij (16-vectors) for parents j. For t = 1..T:

    M-step  R'_ij = R_ij a_i
            mu_j  = sum_i R'_ij V_ij / sum_i R'_ij
            var_j = sum_i R'_ij (V_ij - mu_j)^2 / sum_i R'_ij + var_floor
            cost_j = sum_h (beta_u + log sigma_j^h) sum_i R'_ij         (then cost_norm)
            a_j   = sigmoid(lambda_t (beta_a - cost_j))
    E-step  log p_ij = sum_h -(V_ij^h - mu_j^h)^2 / (2 var_j^h) - log sigma_j^h - log(2 pi) / 2
            R_ij = softmax over the parents of child i of (log a_j + log p_ij)      (t < T)

The softmax's scope is a parameter (``normalize``): per routing group (the default, over the last axis)
or, for convolutional capsules with global competition, over every parent at every position a child
votes for (``models.global_softmax``). Routing runs in float32 (float64 stays float64) even
under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import StrEnum

import torch
import torch.nn.functional as F

from models.choices import parse_choice

DEFAULT_VAR_FLOOR = 1e-4  # added to every parent variance: a parent with one child stays finite
_LOG_2PI = math.log(2 * math.pi)


class CostNorm(StrEnum):
    """How the M-step cost is normalised before the activation sigmoid."""

    NONE = "none"  # the paper: a_j = sigmoid(lambda (beta_a - cost_j))
    ZSCORE = "zscore"  # the seed article: cost z-scored across the parents of a routing group
    SCALED = "scaled"  # Gritzman 2019 (IBM code): cost * 100 * parents / children per parent


class LambdaSchedule(StrEnum):
    """Inverse temperature lambda_t for t = 1..T."""

    OFFICIAL = "official"  # final (1 - 0.95^t), the official code (final = 0.01)
    LINEAR = "linear"  # 1, 2, 3, ... (the seed article); final_lambda is not used
    CONSTANT = "constant"  # final, final, ...


def inverse_temperatures(schedule: str, iters: int, final_lambda: float = 0.01) -> list[float]:
    """The lambda_t of each of ``iters`` routing iterations for a named schedule."""
    schedule = parse_choice(LambdaSchedule, schedule, "lambda_schedule")
    if iters < 1:
        raise ValueError(f"routing_iters must be >= 1, got {iters}")
    t = range(1, iters + 1)
    if schedule is LambdaSchedule.OFFICIAL:
        return [final_lambda * (1 - 0.95**k) for k in t]
    if schedule is LambdaSchedule.LINEAR:
        return [float(k) for k in t]
    return [float(final_lambda)] * iters


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) routes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_softmax(logits: torch.Tensor) -> torch.Tensor:
    """R over the parents of each child within one routing group: logits (..., I, J) -> R (..., I, J)."""
    return torch.softmax(logits, dim=-1)


def normalize_cost(cost: torch.Tensor, cost_norm: CostNorm, children: int, parents: int) -> torch.Tensor:
    """cost (..., J) after the chosen normalisation (J = parents of the routing group)."""
    if cost_norm is CostNorm.ZSCORE:
        mean = cost.mean(dim=-1, keepdim=True)
        std = (cost - mean).square().mean(dim=-1, keepdim=True).sqrt()
        return (cost - mean) / (std + 1e-6)
    if cost_norm is CostNorm.SCALED:
        return cost * (100.0 * parents / children)
    return cost


def safe_divisor(x: torch.Tensor) -> torch.Tensor:
    """sum_i R'_ij as a divisor: a parent no child reaches (all a_i underflowed) gets 0/tiny = 0."""
    return x.clamp_min(torch.finfo(x.dtype).tiny)


def em_routing(
    votes: torch.Tensor,
    activations: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    inverse_temperatures: Sequence[float],
    *,
    cost_norm: str = "none",
    var_floor: float = DEFAULT_VAR_FLOOR,
    normalize: Callable[[torch.Tensor], torch.Tensor] = group_softmax,
    return_assignments: bool = False,
    return_logits: bool = False,
):
    """EM routing as written in docs/em_routing.md.

    votes (..., I, J, 16), activations (..., I), beta_u and beta_a (J,) (or broadcastable to (..., J)),
    one inverse temperature per iteration. ``normalize`` maps E-step logits (..., I, J) to assignments R
    (default: softmax over J). Returns poses (..., J, 16) and activations (..., J), plus the assignments
    R (..., I, J) of the last M-step when ``return_assignments``. With ``return_logits`` the activations
    come back before the sigmoid, lambda_T (beta_a - cost_j), which never saturates.
    """
    cost_norm = parse_choice(CostNorm, cost_norm, "cost_norm")
    if votes.dim() < 3 or activations.shape != votes.shape[:-2]:
        raise ValueError(
            f"votes must be (..., I, J, D) and activations (..., I); got {tuple(votes.shape)} and "
            f"{tuple(activations.shape)}"
        )
    if len(inverse_temperatures) < 1:
        raise ValueError("inverse_temperatures needs one value per routing iteration (at least one)")
    n_children, n_parents = votes.shape[-3], votes.shape[-2]
    dtype = routing_dtype(votes.dtype)
    with torch.autocast(device_type=votes.device.type, enabled=False):
        V = votes.to(dtype)  # (..., I, J, 16)
        a_in = activations.to(dtype)  # (..., I)
        beta_u = beta_u.to(dtype)
        beta_a = beta_a.to(dtype)
        R = normalize(V.new_zeros(V.shape[:-1]))  # uniform over the parents each child votes for
        last = len(inverse_temperatures) - 1
        for t, lam in enumerate(inverse_temperatures):
            # 1. M-step: weighted mean and variance of each parent's votes
            Rp = R * a_in[..., None]  # R'_ij (..., I, J)
            Rsum = Rp.sum(dim=-2)  # (..., J)
            mu = (Rp[..., None] * V).sum(dim=-3) / safe_divisor(Rsum)[..., None]  # (..., J, 16)
            var = (Rp[..., None] * (V - mu[..., None, :, :]).square()).sum(dim=-3)
            var = var / safe_divisor(Rsum)[..., None] + var_floor  # (..., J, 16)
            log_sigma = 0.5 * torch.log(var)
            # 2. cost and activation of each parent
            cost = ((beta_u[..., None] + log_sigma) * Rsum[..., None]).sum(dim=-1)  # (..., J)
            cost = normalize_cost(cost, cost_norm, n_children, n_parents)
            logit_a = lam * (beta_a - cost)  # (..., J)
            if t == last:
                break
            # 3. E-step in log space: R_ij ∝ a_j p_ij over the parents of child i
            log_p = -(V - mu[..., None, :, :]).square() / (2 * var[..., None, :, :])
            log_p = (log_p - log_sigma[..., None, :, :] - 0.5 * _LOG_2PI).sum(dim=-1)  # (..., I, J)
            R = normalize(F.logsigmoid(logit_a)[..., None, :] + log_p)
        out = (mu, logit_a if return_logits else torch.sigmoid(logit_a))
    return (*out, R) if return_assignments else out
