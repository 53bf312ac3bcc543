"""The fast path of EM routing (``routing="fast"``): docs/em_routing.md at a fraction of the work.

Same numbers as ``models.em_routing.em_routing`` (tests hold them together in float64 and float32, values
and gradients, both competition modes). Two engines compute it:

- on the CPU, the fused kernel of ``models.em_cpu`` (a C++ extension built on first use): votes,
  iterations and backward of one receptive field (patch) or image (global) at a time, in cache;
- on CUDA, or where the kernel cannot be built, the PyTorch ops of this module (``FastEMRouting``).

What makes the PyTorch-ops engine fast and lean:

1. Votes in one batched matmul, in a routing-friendly layout. With vec(P W) = vec(P) (I ⊗ W) row-major,
   all votes of child slot i are one (G, 16) @ (16, J·16) product (``kron_weights``; no tiled weights),
   centred in the same call (``baddbmm`` with each parent's plain mean vote, itself one GEMM), and then
   laid out as (G, J, I, ·) — routing groups G (image × position), parents J, children I — so every
   parent's children are one contiguous block.
2. One pass over the votes per M-step and per E-step (``models.em_fast_routing``). Centred votes sit
   next to their squares, VV = [v, v²] (G, J, I, 32); M-step sums and E-step logits are batched
   matrix-vector products with VV, and var = E[v²] - mu² is numerically safe because v is centred
   (centring moves the means by a constant and changes neither variances nor assignments). Everything
   else works on (G, J, I) or (G, J) tensors, 16–32x smaller than the votes.
3. Recomputation instead of storage (``FastEMRouting``, a custom autograd function). The forward keeps
   the layer's inputs and the small outputs of the products above, never the votes; the backward
   rebuilds VV, replays the routing on the small tensors (the recorded products stand in for VV) and
   walks it back by hand (``route_backward``, no autograd graph), which returns VV's gradient as T outer
   products applied in one batched matmul; the vote product's gradient then gives the child poses' and
   weights' gradients. Per chunk: 5 passes over VV forward, 1 build + 5 + 1 backward.
4. Chunks of images with reused buffers. Routing groups of different images never interact (global
   competition couples positions only within an image), so forward and backward run over chunks of
   about ``CHUNK_BYTES`` of votes, writing into per-thread buffers kept across calls (``Workspace``).

What stands between this engine and the memory-traffic bound: each pass streams VV through memory, the
batched matrix-vector products pay a few microseconds per (group, parent) block, and the (I×32)·(32×1)
orientation runs at half the speed of (1×I)·(I×32). The CPU kernel removes all three by keeping one
unit's votes in cache for every iteration. ``torch.compile`` of the model works but does not help here
(the routing is a custom autograd function; inductor compiles the rest).
"""

from __future__ import annotations

import math
import threading

import torch

from models import em_cpu
from models.em_fast_routing import PatchSoftmax, route, route_backward
from models.em_routing import routing_dtype
from models.global_softmax import GlobalSoftmax

CHUNK_BYTES = 16 * 2**20  # bytes of v and v² per chunk of images (forward and backward go chunk by chunk)


def kron_weights(W: torch.Tensor) -> torch.Tensor:
    """W (I, J, 4, 4) -> M (I, 16, J·16) with vec(P_i W_ij) = vec(P_i) M_i[:, j-block] (row-major vec).

    Writing the 4x4 products as one (G, 16) @ (16, J·16) matmul per child slot makes every vote a
    contiguous 16-vector in the output, which is what the routing layout needs."""
    I, J = W.shape[:2]
    M = W.new_zeros(I, 4, 4, J, 4, 4)  # (i, a, y, j, b, z): I_4[a, b] W_ij[y, z]
    M.diagonal(dim1=1, dim2=4).copy_(W.permute(0, 2, 1, 3)[..., None])  # the a == b blocks
    return M.view(I, 16, J * 16)


def kron_weights_grad(dM: torch.Tensor, J: int) -> torch.Tensor:
    """The gradient of ``kron_weights``: dM (I, 16, J·16) -> dW (I, J, 4, 4) (sum of the diagonal blocks)."""
    I = dM.shape[0]
    return dM.view(I, 4, 4, J, 4, 4).diagonal(dim1=1, dim2=4).sum(-1).permute(0, 2, 1, 3)


class Workspace(threading.local):
    """Reusable buffers for the vote-sized tensors, one set per thread (``WORKSPACE``), kept across
    chunks and calls: every chunk writes into memory that is already mapped (fresh large allocations cost
    a page fault per 4 KiB, and the allocator returns them to the system when they are freed). Nothing a
    layer returns or saves aliases them."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        stale = buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device
        # a buffer made under torch.inference_mode (evaluation) may not be written outside it (training)
        if stale or (buf.is_inference() and not torch.is_inference_mode_enabled()):
            buf = self.buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


WORKSPACE = Workspace()


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
    beta_u, beta_a (J,). ``config``: (normalize_for(n_images) -> normalizer, groups per image, inverse
    temperatures, cost_norm, var_floor). Returns poses (G, J, 16) and activation logits (G, J).
    """

    @staticmethod
    def forward(ctx, pf, W, offsets, acts, beta_u, beta_a, config):
        normalize_for, per_image, lambdas, cost_norm, var_floor = config
        dtype = routing_dtype(pf.dtype)
        M = kron_weights(W)
        bu, ba = beta_u.to(dtype), beta_a.to(dtype)
        mus, logits, records, ws = [], [], [], WORKSPACE
        for n, rows in _chunks(pf.shape[0], M.shape[-1] // 16, pf.shape[1], per_image, dtype):
            VV, centre = build_votes(pf[:, rows], M, offsets, dtype, ws)
            a = acts[rows].to(dtype)
            mu, logit_a, outputs, _ = route(VV, a, bu, ba, lambdas, cost_norm, var_floor, normalize_for(n))
            mus.append(mu + centre)
            logits.append(logit_a)
            records.append(outputs)  # small: (G, J, 32) per M-step, (G, J, I) per E-step
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
        bu, ba = beta_u.detach().to(dtype), beta_a.detach().to(dtype)
        dpf, dM = torch.zeros_like(pf), torch.zeros_like(M)
        d_acts, d_bu, d_ba = torch.zeros_like(acts), torch.zeros_like(bu), torch.zeros_like(ba)
        ws = WORKSPACE
        for chunk, (n, rows) in enumerate(_chunks(I, J, pf.shape[1], per_image, dtype)):
            VV, _ = build_votes(pf[:, rows], M, offsets, dtype, ws)
            G = VV.shape[0]
            # 1. replay the routing on the small tensors (the recorded products stand in for VV), then
            #    walk it back: gradients of acts and betas, and VV's gradient as factors L^T Rt
            a, normalize = acts[rows].detach().to(dtype), normalize_for(n)
            records = ctx.records[chunk]
            *_, steps = route(
                VV, a, bu, ba, lambdas, cost_norm, var_floor, normalize, records, keep_steps=True
            )
            da, dbu, dba, L, Rt = route_backward(
                VV, a, bu, lambdas, cost_norm, normalize, steps, d_mu[rows].to(dtype), d_logit[rows].to(dtype)
            )
            d_acts[rows] = da.to(acts.dtype)
            d_bu += dbu
            d_ba += dba
            # 2. dVV (G·J, I, 32) = L^T Rt in one product, then through v² (d(v²)/dv = 2v)
            dVV = torch.bmm(L.transpose(1, 2), Rt, out=ws.get("dVV", (G * J, I, 32), VV))
            dv = dVV[..., :16].addcmul_(VV.view_as(dVV)[..., :16], dVV[..., 16:], value=2.0)
            # 3. through the vote product, slot-major: votes (I, G, J·16) = pf M (the centres are
            #    constants here: exact, as the outputs do not depend on them)
            d_votes = ws.get("votes", (I, G, J, 16), VV).copy_(dv.view(G, J, I, 16).permute(2, 0, 1, 3))
            d_votes = d_votes.view(I, G, J * 16).to(pf.dtype)
            dpf[:, rows] = torch.bmm(d_votes, M.transpose(1, 2).to(pf.dtype))
            dM += torch.bmm(pf[:, rows].transpose(1, 2), d_votes)
        d_bu, d_ba = d_bu.to(beta_u.dtype), d_ba.to(beta_a.dtype)
        return dpf, kron_weights_grad(dM, J).to(W.dtype), None, d_acts, d_bu, d_ba, None


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
    N, H, W, B, _ = poses.shape
    K, s = kernel, stride
    I = K * K * B
    # child slots of every receptive field, as a view: (N, Ho, Wo, B, 16, K, K)
    patches = poses.unfold(1, K, s).unfold(2, K, s)
    Ho, Wo = patches.shape[1:3]
    L = Ho * Wo
    pf = patches.permute(5, 6, 3, 0, 1, 2, 4).reshape(I, N * L, 16)  # slot i = (kh·K + kw)·B + b
    a = acts.unfold(1, K, s).unfold(2, K, s).permute(0, 1, 2, 4, 5, 3).reshape(N * L, I)  # (G, I)
    if competition == "patch":
        global_grid = None

        def normalize_for(n):
            return PatchSoftmax()
    else:
        glob = GlobalSoftmax((H, W), K, s)
        global_grid = ((H, W), K, s, B)

        def normalize_for(n):
            return _GlobalInRoutingLayout(glob, n, L)

    return _apply(pf, weight, None, a, beta_u, beta_a, normalize_for, L, global_grid, **options)


class _GlobalInRoutingLayout:
    """GlobalSoftmax on the routing layout (n·L, C, I) <-> its own (n, L, I, C), forward and backward."""

    def __init__(self, glob, n: int, L: int):
        self.glob, self.n, self.L = glob, n, L

    def _to(self, x):
        return x.view(self.n, self.L, x.shape[1], x.shape[2]).transpose(-1, -2)

    def _back(self, x):
        return x.transpose(-1, -2).reshape(self.n * self.L, x.shape[3], x.shape[2])

    def __call__(self, logits):
        return self._back(self.glob(self._to(logits)))

    def backward(self, R, dR):
        return self._back(self.glob.backward(self._to(R), self._to(dR)))


def class_caps(poses, acts, weight, offsets, beta_u, beta_a, **options):
    """ClassCaps on the fast path: poses (N, I, 4, 4) with I = S·S·D (child i = position·D + d), acts (N, I),
    weight (D, classes, 4, 4) shared over positions, offsets (I, 16) added to every vote.
    Returns poses (N, classes, 16) and activations (N, classes) (their logits with return_logits=True)."""
    N, I = acts.shape
    D = weight.shape[0]
    pf = poses.reshape(N, I, 16).transpose(0, 1).contiguous()  # (I, N, 16)
    W = weight.repeat(I // D, 1, 1, 1)  # (I, classes, 4, 4): tiny
    return _apply(pf, W, offsets, acts, beta_u, beta_a, lambda n: PatchSoftmax(), 1, None, **options)


def _apply(
    pf,
    W,
    offsets,
    acts,
    beta_u,
    beta_a,
    normalize_for,
    per_image,
    global_grid,
    *,
    inverse_temperatures,
    cost_norm,
    var_floor,
    return_logits=False,
):
    """Route on the CPU kernel (``models.em_cpu``) where it is available, else with FastEMRouting.
    ``normalize_for``/``per_image`` describe the competition to FastEMRouting, ``global_grid`` (None:
    patch) to the kernel."""
    lambdas = tuple(inverse_temperatures)
    with torch.autocast(device_type=pf.device.type, enabled=False):
        routed = None
        if pf.device.type == "cpu":
            routed = em_cpu.try_route(
                pf, W, offsets, acts, beta_u, beta_a, global_grid, lambdas, cost_norm, var_floor
            )
        if routed is None:
            config = (normalize_for, per_image, lambdas, cost_norm, var_floor)
            routed = FastEMRouting.apply(pf, W, offsets, acts, beta_u, beta_a, config)
        mu, logit_a = routed
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
            lambda n: PatchSoftmax(), 1, None,
            inverse_temperatures=inverse_temperatures, cost_norm=cost_norm, var_floor=var_floor,
        )
        for g in range(G)
    ]  # fmt: skip
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
