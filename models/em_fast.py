"""The fast path of EM routing (``routing="fast"``): DESIGN §4 with a fraction of the memory traffic.

Same numbers as ``models.em_routing.em_routing`` (tests hold them together in float64 and float32, values
and gradients). What makes it fast:

1. Routing-friendly layout. Votes live as (G, J, I, ·) — routing groups G (image × position), parents J,
   children I — so every parent's children are one contiguous block.
2. One pass over the votes per M-step and per E-step. The votes are centred per parent (by their plain
   mean, which moves the means by a constant and changes neither variances nor assignments) and stored
   next to their squares, VV = [v, v²] (G, J, I, 32). Then
       M-step  [sum_i R'_ij v_ij, sum_i R'_ij v²_ij]   = R'_j · VV_j        (batched matrix-vector)
       E-step  sum_h -(v-mu)²/(2 var) = VV_ij · [mu/var, -1/(2 var)] + const_j
   and var = E[v²] - mu² is safe because v is centred. Everything else works on (G, J, I) or (G, J)
   tensors, 16–32x smaller than the votes.
3. Recomputation instead of storage (``FastEMRouting``, a custom autograd function). The forward keeps
   only the layer's inputs (child poses, weights, activations, betas); the backward rebuilds VV, replays
   the routing on the small tensors with autograd, and since VV enters the routing only through the
   contractions above, its gradient is one batched matmul: dVV_i = sum_t R'_t,i dS_t + dlogp_t,i w_t.
   The vote product's gradient then gives the child poses' and weights' gradients.
4. Chunks of images. Routing groups of different images never interact (global competition couples
   positions only within an image), so forward and backward run over chunks of images whose VV fits in
   cache, and the peak memory is one chunk's VV and its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from models.em_routing import CostNorm, normalize_cost, routing_dtype, safe_divisor

_LOG_2PI = math.log(2 * math.pi)
CHUNK_BYTES = 48 * 2**20  # VV bytes per chunk of images (forward and backward work chunk by chunk)

Normalize = Callable[[torch.Tensor], torch.Tensor]  # E-step logits (G, J, I) -> R (G, J, I)


def softmax_over_parents(logits: torch.Tensor) -> torch.Tensor:
    """Patch competition in the (G, J, I) layout: softmax over the J parents of each child."""
    return torch.softmax(logits, dim=-2)


def route(
    VV: torch.Tensor,
    acts: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    inverse_temperatures: Sequence[float],
    cost_norm: str,
    var_floor: float,
    normalize: Normalize = softmax_over_parents,
    taps: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EM routing on centred votes and their squares.

    VV (G, J, I, 32) = [v, v²] with v centred per parent; acts (G, I); ``normalize`` maps E-step logits
    (G, J, I) to assignments R summing to 1 over each child's parents. Returns the centred means
    (G, J, 16) and the parents' activation logits (G, J).

    With ``taps`` (a list), VV is treated as a constant and every contraction with it gets a zero
    leaf added to its output; ``taps`` receives (coefficients, leaf) pairs so that the caller can
    assemble VV's gradient from the leaves' gradients (see ``FastEMRouting.backward``).
    """
    G, J, I, _ = VV.shape
    cost_norm = CostNorm(cost_norm)
    flat = VV.view(G * J, I, 32)

    def contract(a, b, coeff, shape):
        out = torch.bmm(a, b)
        if taps is not None:
            leaf = torch.zeros(shape, dtype=out.dtype, device=out.device, requires_grad=True)
            taps.append((coeff, leaf))
            out = out + leaf
        return out

    a_in = acts[:, None, :]  # (G, 1, I)
    R = normalize(VV.new_zeros(G, J, I))
    last = len(inverse_temperatures) - 1
    for t, lam in enumerate(inverse_temperatures):
        # 1. M-step: [sum R'v, sum R'v²] in one pass over VV
        Rp = (R * a_in).view(G * J, 1, I)  # R'_ij
        Rsum = Rp.sum(dim=-1).view(G, J)
        S = contract(Rp, flat, ("M", Rp), (G * J, 1, 32)).view(G, J, 32)
        moments = S / safe_divisor(Rsum)[..., None]
        mu = moments[..., :16]  # (G, J, 16)
        var = (moments[..., 16:] - mu.square()).clamp_min(0) + var_floor
        log_sigma = 0.5 * torch.log(var)
        cost = ((beta_u[:, None] + log_sigma) * Rsum[..., None]).sum(dim=-1)  # (G, J)
        logit_a = lam * (beta_a - normalize_cost(cost, cost_norm, I, J))
        if t == last:
            break
        # 2. E-step: log p_ij = [v, v²]·[mu/var, -1/(2 var)] + const_j in one pass over VV
        w = torch.cat([mu / var, -0.5 / var], dim=-1).view(G * J, 32, 1)
        const = (-0.5 * mu.square() / var - log_sigma).sum(dim=-1) - 8 * _LOG_2PI  # (G, J)
        log_p = contract(flat, w, ("E", w), (G * J, I, 1)).view(G, J, I) + const[..., None]
        R = normalize(F.logsigmoid(logit_a)[..., None] + log_p)
    return mu, logit_a


def build_vv(p, w, offsets, groups: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Votes of one chunk, centred, with their squares, straight into the routing layout (no autograd).

    p (I, G·4, 4) child poses per slot, w (I, 4, J·4) transformations, offsets (I, 16) or None added to
    every vote. Returns VV (G, J, I, 32) and the centres (G, J, 16) in ``dtype``.
    """
    I, J = p.shape[0], w.shape[-1] // 4
    votes = torch.bmm(p, w).view(I, groups, 4, J, 4).permute(1, 3, 0, 2, 4)  # (G, J, I, 4, 4) view
    if offsets is not None:
        votes = votes + offsets.view(1, 1, I, 4, 4)
    centre = votes.to(dtype).mean(dim=2)  # (G, J, 4, 4)
    VV = torch.empty(groups, J, I, 32, dtype=dtype, device=p.device)
    torch.sub(votes, centre[:, :, None], out=VV[..., :16].unflatten(-1, (4, 4)))
    torch.square(VV[..., :16], out=VV[..., 16:])
    return VV, centre.flatten(-2)


class FastEMRouting(torch.autograd.Function):
    """Votes + EM routing with recomputation: saves the inputs, not the votes.

    p (I, G·4, 4), w (I, 4, J·4), offsets (I, 16) or None (no gradient), acts (G, I), beta_u, beta_a (J,).
    ``config``: (normalize_for(n_images) -> Normalize, groups per image, inverse temperatures,
    cost_norm, var_floor). Returns poses (G, J, 16) and activation logits (G, J), float32 (or float64).
    """

    @staticmethod
    def forward(ctx, p, w, offsets, acts, beta_u, beta_a, config):
        normalize_for, per_image, lambdas, cost_norm, var_floor = config
        dtype = routing_dtype(p.dtype)
        mus, logits = [], []
        for n0, n1, sl in _chunks(p, w, per_image, dtype):
            VV, centre = build_vv(p[:, sl], w, offsets, (n1 - n0) * per_image, dtype)
            mu, logit_a = route(
                VV, acts[sl.start // 4 : sl.stop // 4].to(dtype), beta_u.to(dtype), beta_a.to(dtype),
                lambdas, cost_norm, var_floor, normalize_for(n1 - n0),
            )  # fmt: skip
            del VV
            mus.append(mu + centre)
            logits.append(logit_a)
        ctx.save_for_backward(p, w, offsets, acts, beta_u, beta_a)
        ctx.config = config
        return torch.cat(mus), torch.cat(logits)

    @staticmethod
    def backward(ctx, d_mu, d_logit):
        p, w, offsets, acts, beta_u, beta_a = ctx.saved_tensors
        normalize_for, per_image, lambdas, cost_norm, var_floor = ctx.config
        dtype = routing_dtype(p.dtype)
        I, J = p.shape[0], w.shape[-1] // 4
        dp, dw = torch.zeros_like(p), torch.zeros_like(w)
        d_acts, d_bu, d_ba = torch.zeros_like(acts), torch.zeros_like(beta_u), torch.zeros_like(beta_a)
        bu, ba = beta_u.detach().to(dtype).requires_grad_(), beta_a.detach().to(dtype).requires_grad_()
        for n0, n1, sl in _chunks(p, w, per_image, dtype):
            G, rows = (n1 - n0) * per_image, slice(sl.start // 4, sl.stop // 4)
            VV, _ = build_vv(p[:, sl], w, offsets, G, dtype)
            # 1. replay the routing on the small tensors, VV constant, with a zero leaf on each contraction
            a = acts[rows].detach().to(dtype).requires_grad_()
            taps = []
            with torch.enable_grad():
                mu, logit_a = route(
                    VV, a, bu, ba, lambdas, cost_norm, var_floor, normalize_for(n1 - n0), taps
                )
                leaves = [leaf for _, leaf in taps]
                grads = torch.autograd.grad(
                    (mu, logit_a), [a, bu, ba, *leaves], (d_mu[rows].to(dtype), d_logit[rows].to(dtype)),
                    allow_unused=True,
                )  # fmt: skip
            d_acts[rows] = _or_zero(grads[0], a).to(acts.dtype)
            d_bu += _or_zero(grads[1], bu).to(d_bu.dtype)
            d_ba += _or_zero(grads[2], ba).to(d_ba.dtype)
            # 2. dVV (G·J, I, 32) in one batched matmul: M-steps give R' ⊗ dS, E-steps dlogp ⊗ w
            left, right = [], []
            for ((kind, coeff), leaf), g in zip(taps, grads[3:]):
                g = _or_zero(g, leaf)
                if kind == "M":  # S = R' VV: coeff R' (GJ, 1, I), g (GJ, 1, 32)
                    left.append(coeff.detach().transpose(1, 2))
                    right.append(g)
                else:  # log p = VV w: coeff w (GJ, 32, 1), g (GJ, I, 1)
                    left.append(g)
                    right.append(coeff.detach().transpose(1, 2))
            dVV = torch.bmm(torch.cat(left, dim=2), torch.cat(right, dim=1)).view(G, J, I, 32)
            # 3. d(v, v²) -> dv = dVV[:16] + 2 v dVV[16:]; the centres are constants (exact: see above)
            dv = dVV[..., :16].addcmul_(VV[..., :16], dVV[..., 16:], value=2.0)  # (G, J, I, 16)
            del VV
            # 4. through the vote product: votes (I, G·4, J·4) = p w
            d_votes = dv.unflatten(-1, (4, 4)).permute(2, 0, 3, 1, 4).reshape(I, G * 4, J * 4).to(p.dtype)
            del dVV, dv
            dp[:, sl] = torch.bmm(d_votes, w.transpose(1, 2))
            dw += torch.bmm(p[:, sl].transpose(1, 2), d_votes)
        return dp, dw, None, d_acts, d_bu, d_ba, None


def _or_zero(g, like):
    return torch.zeros_like(like) if g is None else g


def _chunks(p, w, per_image: int, dtype):
    """(first image, end image, row slice of p) for chunks of images whose VV is about CHUNK_BYTES."""
    I, J = p.shape[0], w.shape[-1] // 4
    n_images = p.shape[1] // (4 * per_image)
    vv_bytes = per_image * J * I * 32 * torch.finfo(dtype).bits // 8
    step = max(1, CHUNK_BYTES // max(vv_bytes, 1))
    for n0 in range(0, n_images, step):
        n1 = min(n0 + step, n_images)
        yield n0, n1, slice(n0 * per_image * 4, n1 * per_image * 4)


def conv_caps(poses, acts, weight, beta_u, beta_a, kernel, stride, competition, **options):
    """ConvCaps on the fast path: poses (N, H, W, B, 16), acts (N, H, W, B), weight (K·K·B, C, 4, 4).

    Returns poses (N·L, C, 16) and activations (N·L, C), L = Ho·Wo, routing groups in (n, ho, wo) order.
    """
    from models.capsules import GlobalSoftmax  # capsules imports this module

    N, H, W, B, _ = poses.shape
    K, s, C = kernel, stride, weight.shape[1]
    I = K * K * B
    # child slots of every receptive field, as a view: (N, Ho, Wo, B, 16, K, K)
    patches = poses.unfold(1, K, s).unfold(2, K, s)
    Ho, Wo = patches.shape[1:3]
    L = Ho * Wo
    p = patches.permute(5, 6, 3, 0, 1, 2, 4).reshape(I, N * L * 4, 4)  # slot i = (kh·K + kw)·B + b
    w = weight.permute(0, 2, 1, 3).reshape(I, 4, C * 4)
    a = acts.unfold(1, K, s).unfold(2, K, s).permute(0, 1, 2, 4, 5, 3).reshape(N * L, I)  # (G, I)
    if competition == "patch":

        def normalize_for(n):
            return softmax_over_parents
    else:
        glob = GlobalSoftmax((H, W), K, s)

        def normalize_for(n):
            def normalize(logits):  # (n·L, C, I) <-> GlobalSoftmax's (n, L, I, C)
                return glob(logits.view(n, L, C, I).transpose(-1, -2)).transpose(-1, -2).reshape(n * L, C, I)

            return normalize

    return _apply(p, w, None, a, beta_u, beta_a, normalize_for, L, **options)


def class_caps(poses, acts, weight, offsets, beta_u, beta_a, **options):
    """ClassCaps on the fast path: poses (N, I, 4, 4) with I = S·S·D (child i = position·D + d), acts (N, I),
    weight (D, classes, 4, 4) shared over positions, offsets (I, 16) added to every vote.
    Returns poses (N, classes, 16) and activations (N, classes)."""
    N, I = acts.shape
    D, J = weight.shape[:2]
    p = poses.permute(1, 0, 2, 3).reshape(I, N * 4, 4)
    w = weight.permute(0, 2, 1, 3).reshape(D, 4, J * 4).repeat(I // D, 1, 1)  # (I, 4, J·4): tiny
    return _apply(p, w, offsets, acts, beta_u, beta_a, lambda n: softmax_over_parents, 1, **options)


def _apply(
    p,
    w,
    offsets,
    acts,
    beta_u,
    beta_a,
    normalize_for,
    per_image,
    *,
    inverse_temperatures,
    cost_norm,
    var_floor,
):
    with torch.autocast(device_type=p.device.type, enabled=False):
        config = (normalize_for, per_image, tuple(inverse_temperatures), cost_norm, var_floor)
        mu, logit_a = FastEMRouting.apply(p, w, offsets, acts, beta_u, beta_a, config)
        return mu, torch.sigmoid(logit_a)


def route_votes(votes, acts, beta_u, beta_a, *, inverse_temperatures, cost_norm="none", var_floor=1e-4):
    """The fast path for ready-made votes (G, I, J, 16) in em_routing's layout (tests, one-off use):
    votes enter as identity "poses" with their 4x4 blocks as weights would, so the same code runs."""
    G, I, J, _ = votes.shape
    eye = torch.eye(4, dtype=votes.dtype, device=votes.device)
    p = eye.expand(I, G, 4, 4).reshape(I, G * 4, 4)  # identity child poses
    # votes must then be the weights, which are shared over groups: route each group on its own
    out = [
        _apply(
            p[:, 4 * g : 4 * g + 4], votes[g].unflatten(-1, (4, 4)).permute(0, 2, 1, 3).reshape(I, 4, J * 4),
            None, acts[g : g + 1], beta_u, beta_a, lambda n: softmax_over_parents, 1,
            inverse_temperatures=inverse_temperatures, cost_norm=cost_norm, var_floor=var_floor,
        )
        for g in range(G)
    ]  # fmt: skip
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
