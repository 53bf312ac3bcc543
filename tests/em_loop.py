"""A plain float64 loop implementation of EM routing (the paper's Procedure 1, docs/em_routing.md), for tests.

Written for clarity, not speed: children, parents and edges are Python lists and dicts; each child votes
for the parents it is connected to, and its assignments are normalised over exactly those parents.
Shared by tests/test_em_routing.py and tests/test_capsules.py.
"""

from __future__ import annotations

import math

import numpy as np

VAR_FLOOR = 1e-4
TINY = np.finfo(np.float64).tiny


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def loop_em(votes, a, beta_u, beta_a, lambdas, *, cost_norm="none", var_floor=VAR_FLOOR, scale=1.0):
    """votes: dict (i, j) -> 16-vector for every child i that votes for parent j; a: child activations.

    beta_u, beta_a: per-parent sequences. cost_norm: "none" | "zscore" (over all parents) | "scaled"
    (cost times ``scale``). Returns (mu list of 16-vectors, activation list, R dict of the last M-step).
    """
    children = sorted({i for i, _ in votes})
    parents = sorted({j for _, j in votes})
    parents_of = {i: [j for j in parents if (i, j) in votes] for i in children}
    children_of = {j: [i for i in children if (i, j) in votes] for j in parents}
    R = {(i, j): 1.0 / len(parents_of[i]) for (i, j) in votes}
    for t, lam in enumerate(lambdas):
        # M-step, parent by parent
        mu, var, cost = {}, {}, {}
        for j in parents:
            rp = {i: R[i, j] * a[i] for i in children_of[j]}
            total = sum(rp.values())
            mean = sum(rp[i] * votes[i, j] for i in children_of[j]) / max(total, TINY)
            spread = sum(rp[i] * (votes[i, j] - mean) ** 2 for i in children_of[j]) / max(total, TINY)
            mu[j], var[j] = mean, spread + var_floor
            cost[j] = sum((beta_u[j] + 0.5 * math.log(v)) * total for v in var[j])
        if cost_norm == "zscore":
            c = np.array([cost[j] for j in parents])
            std = math.sqrt(((c - c.mean()) ** 2).mean())
            cost = {j: (cost[j] - c.mean()) / (std + 1e-6) for j in parents}
        elif cost_norm == "scaled":
            cost = {j: cost[j] * scale for j in parents}
        logit_a = {j: lam * (beta_a[j] - cost[j]) for j in parents}
        if t == len(lambdas) - 1:
            break
        # E-step, child by child, in log space
        for i in children:
            logits = {}
            for j in parents_of[i]:
                log_p = 0.0
                for h in range(len(mu[j])):
                    d = votes[i, j][h] - mu[j][h]
                    log_p += (
                        -d * d / (2 * var[j][h]) - 0.5 * math.log(var[j][h]) - 0.5 * math.log(2 * math.pi)
                    )
                logits[j] = log_sigmoid(logit_a[j]) + log_p
            top = max(logits.values())
            z = sum(math.exp(v - top) for v in logits.values())
            for j in parents_of[i]:
                R[i, j] = math.exp(logits[j] - top) / z
    return [mu[j] for j in parents], [sigmoid(logit_a[j]) for j in parents], R


def loop_em_dense(votes: np.ndarray, a: np.ndarray, beta_u, beta_a, lambdas, **kw):
    """votes (I, J, 16), a (I,): every child votes for every parent. Returns mu (J, 16), act (J,)."""
    I, J, _ = votes.shape
    edges = {(i, j): votes[i, j].astype(np.float64) for i in range(I) for j in range(J)}
    mu, act, R = loop_em(edges, a.astype(np.float64), beta_u, beta_a, lambdas, **kw)
    return np.stack(mu), np.array(act), R
