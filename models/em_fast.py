"""The fast path of EM routing (``routing="fast"``): DESIGN §4 with a fraction of the memory traffic.

Same numbers as ``models.em_routing.em_routing`` (tests hold them together in float64 and float32, values
and gradients, both competition modes). What makes it fast and lean:

1. Votes in one batched matmul, in a routing-friendly layout. With vec(P W) = vec(P) (I ⊗ W) row-major,
   all votes of child slot i are one (G, 16) @ (16, J·16) product (``kron_weights``; no tiled weights),
   centred in the same call (``baddbmm`` with each parent's plain mean vote, itself one GEMM), and then
   laid out as (G, J, I, ·) — routing groups G (image × position), parents J, children I — so every
   parent's children are one contiguous block.
2. One pass over the votes per M-step and per E-step. Centred votes sit next to their squares,
   VV = [v, v²] (G, J, I, 32). Then
       M-step  [sum_i R'_ij v_ij, sum_i R'_ij v²_ij]   = R'_j · VV_j        (batched matrix-vector)
       E-step  sum_h -(v-mu)²/(2 var) = VV_ij · [mu/var, -1/(2 var)] + const_j
   and var = E[v²] - mu² is numerically safe because v is centred (centring moves the means by a
   constant and changes neither variances nor assignments). Everything else works on (G, J, I) or
   (G, J) tensors, 16–32x smaller than the votes.
3. Recomputation instead of storage (``FastEMRouting``, a custom autograd function). The forward keeps
   the layer's inputs (child poses, weights, activations, betas) and the small outputs of the
   contractions above, never the votes; the backward rebuilds VV, replays the routing on the small
   tensors with autograd (the recorded contraction outputs stand in for the products, ``Contractions``),
   and since VV enters the routing only through those contractions, its gradient is one batched matmul:
   dVV_i = sum_t R'_t,i dS_t + dlogp_t,i w_t. The vote product's gradient then gives the child poses'
   and weights' gradients. Per chunk: 5 passes over VV forward, 1 build + 5 + 1 backward.
4. Chunks of images with reused buffers. Routing groups of different images never interact (global
   competition couples positions only within an image), so forward and backward run over chunks of
   about ``CHUNK_BYTES`` of votes, writing into the same buffers (``Workspace``): the peak memory is one
   chunk's votes and their gradient, and no chunk after the first pays page faults for fresh memory.

What stands between this and the memory-traffic bound: torch's batched matrix-vector products pay a
few microseconds per (group, parent) block and the (I×32)·(32×1) orientation runs at half the speed of
(1×I)·(I×32); the E-step and the next M-step are separate passes over VV. A fused kernel that keeps one
position's votes in cache for all iterations would remove both. ``torch.compile`` of the model works
but does not help here (the routing is a custom autograd function; inductor compiles the rest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from models.em_routing import CostNorm, normalize_cost, routing_dtype, safe_divisor

_LOG_2PI = math.log(2 * math.pi)
CHUNK_BYTES = 8 * 2**20  # bytes of v and v² per chunk of images (forward and backward go chunk by chunk)

Normalize = Callable[[torch.Tensor], torch.Tensor]  # E-step logits (G, J, I) -> R (G, J, I)


def softmax_over_parents(logits: torch.Tensor) -> torch.Tensor:
    """Patch competition in the (G, J, I) layout: softmax over the J parents of each child."""
    return torch.softmax(logits, dim=-2)


class Contractions:
    """The only places VV enters the routing: S = R' VV (M-step, kind "M") and log p = VV w (E-step, "E").

    Forward (``saved=None``): computes each product and records its output. Backward replay
    (``saved`` = the forward's outputs): returns the recorded output through ``_Replay``, whose backward
    gives the coefficient's gradient (one pass over VV) and keeps the output's gradient in ``taps`` so
    that VV's gradient can be assembled in one product. The forward's products are never recomputed.
    """

    def __init__(self, saved: list[torch.Tensor] | None = None):
        self.saved, self.outputs, self.taps = saved, [], []

    def __call__(self, kind: str, coeff: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        if self.saved is None:
            out = torch.bmm(coeff, flat) if kind == "M" else torch.bmm(flat, coeff)
            self.outputs.append(out)
            return out
        tap = [kind, coeff, None]  # the output's gradient lands in tap[2]
        saved = self.saved[len(self.taps)]
        self.taps.append(tap)
        return _Replay.apply(coeff, saved, flat, tap)


class _Replay(torch.autograd.Function):
    """out = the recorded product; backward: d coeff by a contraction with VV, d out kept in ``tap``."""

    @staticmethod
    def forward(ctx, coeff, saved, flat, tap):
        ctx.flat, ctx.tap = flat, tap
        return saved.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.tap[2] = g
        # both as products with VV untransposed (faster here than VV^T): (GJ, I, 32) and (GJ, 1, I)
        if ctx.tap[0] == "M":  # S = R' VV: dR' = (VV dS^T)^T, (GJ, I, 1) -> (GJ, 1, I)
            return torch.bmm(ctx.flat, g.transpose(1, 2)).transpose(1, 2), None, None, None
        return torch.bmm(g.transpose(1, 2), ctx.flat).transpose(1, 2), None, None, None  # dw = (dlogp^T VV)^T


def route(
    VV: torch.Tensor,
    acts: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    inverse_temperatures: Sequence[float],
    cost_norm: str,
    var_floor: float,
    normalize: Normalize = softmax_over_parents,
    contract: Contractions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EM routing on VV = [v, v²] (G, J, I, 32): centred votes next to their squares.

    acts (G, I); ``normalize`` maps E-step logits (G, J, I) to assignments R summing to 1 over each
    child's parents. Returns the centred means (G, J, 16) and the parents' activation logits (G, J).

    ``contract`` computes (and records) the contractions with VV, or replays recorded ones in the
    backward pass (see ``Contractions``).
    """
    G, J, I, _ = VV.shape
    cost_norm = CostNorm(cost_norm)
    flat = VV.view(G * J, I, 32)
    contract = Contractions() if contract is None else contract

    a_in = acts[:, None, :]  # (G, 1, I)
    R = normalize(VV.new_zeros(G, J, I))
    last = len(inverse_temperatures) - 1
    for t, lam in enumerate(inverse_temperatures):
        # 1. M-step: [sum_i R'v, sum_i R'v²] in one pass over VV
        Rp = (R * a_in).view(G * J, 1, I)  # R'_ij
        Rsum = Rp.sum(dim=-1).view(G, J)
        S = contract("M", Rp, flat)  # (G·J, 1, 32)
        moments = S.view(G, J, 32) / safe_divisor(Rsum)[..., None]
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
        log_p = contract("E", w, flat)  # (G·J, I, 1)
        R = normalize(F.logsigmoid(logit_a)[..., None] + log_p.view(G, J, I) + const[..., None])
    return mu, logit_a


def kron_weights(W: torch.Tensor) -> torch.Tensor:
    """W (I, J, 4, 4) -> M (I, 16, J·16) with vec(P_i W_ij) = vec(P_i) M_i[:, j-block] (row-major vec).

    Writing the 4x4 products as one (G, 16) @ (16, J·16) matmul per child slot makes every vote a
    contiguous 16-vector in the output, which is what the routing layout needs."""
    I, J = W.shape[:2]
    eye = torch.eye(4, dtype=W.dtype, device=W.device)
    return torch.einsum("ab,ijyz->iayjbz", eye, W).reshape(I, 16, J * 16)


def kron_weights_grad(dM: torch.Tensor, J: int) -> torch.Tensor:
    """The gradient of ``kron_weights``: dM (I, 16, J·16) -> dW (I, J, 4, 4) (sum of the diagonal blocks)."""
    I = dM.shape[0]
    return dM.view(I, 4, 4, J, 4, 4).diagonal(dim1=1, dim2=4).sum(-1).permute(0, 2, 1, 3)


class Workspace:
    """Reusable buffers for the vote-sized tensors of one layer call: every chunk after the first writes
    into memory that is already mapped (fresh large allocations cost a page fault per 4 KiB)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


def build_votes(pf, M, offsets, dtype, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred votes of one chunk and their squares, in the routing layout (no autograd).

    pf (I, G, 16) child poses per slot, M (I, 16, J·16) from ``kron_weights``, offsets (I, 16) or None
    added to every vote. Returns VV (G, J, I, 32) = [v, v²] (a ``ws`` buffer) and the centres (G, J, 16).
    """
    I, G, _ = pf.shape
    J = M.shape[-1] // 16
    pf, M = pf.to(dtype), M.to(dtype)
    # 1. each parent's plain mean vote, one GEMM: (G, I·16) @ (I·16, J·16) / I
    centre = (pf.transpose(0, 1).reshape(G, I * 16) @ M.reshape(I * 16, J * 16)).div_(I)
    if offsets is not None:
        centre += offsets.to(dtype).mean(dim=0).repeat(J)
    # 2. centred votes, slot-major (I, G, J·16), then the routing layout (G, J, I, 16)
    votes = torch.baddbmm(-centre, pf, M, out=ws.get("votes", (I, G, J * 16), pf)).view(I, G, J, 16)
    if offsets is not None:
        votes.add_(offsets.to(dtype)[:, None, None, :])
    VV = ws.get("VV", (G, J, I, 32), pf)
    VV[..., :16].copy_(votes.permute(1, 2, 0, 3))
    torch.square(VV[..., :16], out=VV[..., 16:])
    return VV, centre.view(G, J, 16)


class FastEMRouting(torch.autograd.Function):
    """Votes + EM routing with recomputation: saves the inputs, not the votes.

    pf (I, G, 16) child poses per slot, W (I, J, 4, 4), offsets (I, 16) or None (no gradient), acts (G, I),
    beta_u, beta_a (J,). ``config``: (normalize_for(n_images) -> Normalize, groups per image, inverse
    temperatures, cost_norm, var_floor). Returns poses (G, J, 16) and activation logits (G, J).
    """

    @staticmethod
    def forward(ctx, pf, W, offsets, acts, beta_u, beta_a, config):
        normalize_for, per_image, lambdas, cost_norm, var_floor = config
        dtype = routing_dtype(pf.dtype)
        M = kron_weights(W)
        mus, logits, records, ws = [], [], [], Workspace()
        for n, rows in _chunks(pf.shape[0], M.shape[-1] // 16, pf.shape[1], per_image, dtype):
            VV, centre = build_votes(pf[:, rows], M, offsets, dtype, ws)
            contract = Contractions()
            mu, logit_a = route(
                VV, acts[rows].to(dtype), beta_u.to(dtype), beta_a.to(dtype),
                lambdas, cost_norm, var_floor, normalize_for(n), contract,
            )  # fmt: skip
            mus.append(mu + centre)
            logits.append(logit_a)
            records.append(contract.outputs)  # small: (GJ, 1, 32) per M-step, (GJ, I, 1) per E-step
        ctx.save_for_backward(pf, W, offsets, acts, beta_u, beta_a)
        ctx.config, ctx.records = config, records
        return torch.cat(mus), torch.cat(logits)

    @staticmethod
    def backward(ctx, d_mu, d_logit):
        pf, W, offsets, acts, beta_u, beta_a = ctx.saved_tensors
        normalize_for, per_image, lambdas, cost_norm, var_floor = ctx.config
        dtype = routing_dtype(pf.dtype)
        I, J = W.shape[:2]
        M = kron_weights(W).to(dtype)
        dpf, dM = torch.zeros_like(pf), torch.zeros_like(M)
        d_acts, d_bu, d_ba = torch.zeros_like(acts), torch.zeros_like(beta_u), torch.zeros_like(beta_a)
        bu, ba = beta_u.detach().to(dtype).requires_grad_(), beta_a.detach().to(dtype).requires_grad_()
        ws = Workspace()
        for chunk, (n, rows) in enumerate(_chunks(I, J, pf.shape[1], per_image, dtype)):
            VV, _ = build_votes(pf[:, rows], M, offsets, dtype, ws)
            G = VV.shape[0]
            # 1. replay the routing on the small tensors with the recorded contraction outputs
            a = acts[rows].detach().to(dtype).requires_grad_()
            contract = Contractions(saved=ctx.records[chunk])
            with torch.enable_grad():
                mu, logit_a = route(VV, a, bu, ba, lambdas, cost_norm, var_floor, normalize_for(n), contract)
                grads = torch.autograd.grad(
                    (mu, logit_a),
                    [a, bu, ba],
                    (d_mu[rows].to(dtype), d_logit[rows].to(dtype)),
                    allow_unused=True,
                )
            d_acts[rows] = _or_zero(grads[0], a).to(acts.dtype)
            d_bu += _or_zero(grads[1], bu).to(d_bu.dtype)
            d_ba += _or_zero(grads[2], ba).to(d_ba.dtype)
            # 2. dVV (G·J, I, 32) as one product: M-steps give R' ⊗ dS, E-steps dlogp ⊗ w
            left, right = [], []
            for kind, coeff, g in contract.taps:
                if g is None:
                    continue
                if kind == "M":  # S = R' VV: coeff R' (GJ, 1, I), g (GJ, 1, 32)
                    left.append(coeff.detach().transpose(1, 2))
                    right.append(g)
                else:  # log p = VV w: coeff w (GJ, 32, 1), g (GJ, I, 1)
                    left.append(g)
                    right.append(coeff.detach().transpose(1, 2))
            if not left:  # no gradient reaches the votes
                continue
            left, right = torch.cat(left, dim=2), torch.cat(right, dim=1)  # (GJ, I, T), (GJ, T, 32)
            dVV = torch.bmm(left, right, out=ws.get("dVV", (G * J, I, 32), VV))
            dv = dVV[..., :16].addcmul_(VV.view_as(dVV)[..., :16], dVV[..., 16:], value=2.0)  # d(v²)/dv = 2v
            # 3. through the vote product, slot-major: votes (I, G, J·16) = pf M (the centres are
            #    constants here: exact, as the outputs do not depend on them)
            d_votes = ws.get("votes", (I, G, J, 16), VV).copy_(dv.view(G, J, I, 16).permute(2, 0, 1, 3))
            d_votes = d_votes.view(I, G, J * 16).to(pf.dtype)
            dpf[:, rows] = torch.bmm(d_votes, M.transpose(1, 2).to(pf.dtype))
            dM += torch.bmm(pf[:, rows].transpose(1, 2), d_votes)
        return dpf, kron_weights_grad(dM, J).to(W.dtype), None, d_acts, d_bu, d_ba, None


def _or_zero(g, like):
    return torch.zeros_like(like) if g is None else g


def _chunks(I: int, J: int, groups: int, per_image: int, dtype):
    """(images in the chunk, slice of routing groups) for chunks whose votes take about CHUNK_BYTES."""
    n_images = groups // per_image
    vote_bytes = per_image * J * I * 32 * torch.finfo(dtype).bits // 8  # v and v² of one image
    step = max(1, CHUNK_BYTES // max(vote_bytes, 1))
    for n0 in range(0, n_images, step):
        n1 = min(n0 + step, n_images)
        yield n1 - n0, slice(n0 * per_image, n1 * per_image)


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
    pf = patches.permute(5, 6, 3, 0, 1, 2, 4).reshape(I, N * L, 16)  # slot i = (kh·K + kw)·B + b
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

    return _apply(pf, weight, None, a, beta_u, beta_a, normalize_for, L, **options)


def class_caps(poses, acts, weight, offsets, beta_u, beta_a, **options):
    """ClassCaps on the fast path: poses (N, I, 4, 4) with I = S·S·D (child i = position·D + d), acts (N, I),
    weight (D, classes, 4, 4) shared over positions, offsets (I, 16) added to every vote.
    Returns poses (N, classes, 16) and activations (N, classes) (their logits with return_logits=True)."""
    N, I = acts.shape
    D = weight.shape[0]
    pf = poses.reshape(N, I, 16).transpose(0, 1).contiguous()  # (I, N, 16)
    W = weight.repeat(I // D, 1, 1, 1)  # (I, classes, 4, 4): tiny
    return _apply(pf, W, offsets, acts, beta_u, beta_a, lambda n: softmax_over_parents, 1, **options)


def _apply(
    pf,
    W,
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
    return_logits=False,
):
    with torch.autocast(device_type=pf.device.type, enabled=False):
        config = (normalize_for, per_image, tuple(inverse_temperatures), cost_norm, var_floor)
        mu, logit_a = FastEMRouting.apply(pf, W, offsets, acts, beta_u, beta_a, config)
        return mu, (logit_a if return_logits else torch.sigmoid(logit_a))


def route_votes(votes, acts, beta_u, beta_a, *, inverse_temperatures, cost_norm="none", var_floor=1e-4):
    """The fast path for ready-made votes (G, I, J, 16) in em_routing's layout (tests, one-off use).

    Each group routes on its own with identity child poses and its votes as the transformations, so the
    same FastEMRouting code (forward and recomputing backward) runs."""
    G, I, J, _ = votes.shape
    pf = torch.eye(4, dtype=votes.dtype, device=votes.device).reshape(1, 1, 16).expand(I, 1, 16)
    out = [
        _apply(
            pf, votes[g].unflatten(-1, (4, 4)), None, acts[g : g + 1], beta_u, beta_a,
            lambda n: softmax_over_parents, 1,
            inverse_temperatures=inverse_temperatures, cost_norm=cost_norm, var_floor=var_floor,
        )
        for g in range(G)
    ]  # fmt: skip
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
