"""Matrix capsule layers: PrimaryCaps, ConvCaps, ClassCaps (Hinton, Sabour & Frosst, ICLR 2018, §3–4).

Capsule grids are channels-last: poses (N, H, W, types, 16) — a 4x4 pose matrix flattened row-major —
and activations (N, H, W, types). A child i votes V_ij = P_i W_ij for parent j; EM routing
(``models.em_routing``) turns the votes into parent poses and activations.

Routing paths (same math, held together by tests):
- ``routing="reference"``: unfold + einsum + ``em_routing`` as written — plain and memory-hungry.
- ``routing="fast"``: ``models.em_fast`` — one pass over the votes per M- and E-step, votes
  recomputed in backward, chunks of images (the default).

Competition in convolutional layers:
- ``"patch"``: each receptive field routes on its own (softmax over the C parent types at that position).
- ``"global"``: a child's assignments sum to 1 over every parent (type and position) whose receptive
  field contains it, as the paper intends (Gritzman 2019) — ``models.global_softmax``.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import em_fast
from models.choices import parse_choice
from models.em_routing import DEFAULT_VAR_FLOOR, CostNorm, em_routing, group_softmax, routing_dtype
from models.global_softmax import GlobalSoftmax, conv_out_size


class Competition(StrEnum):
    GLOBAL = "global"  # a child's R sums to 1 over every parent at every position it votes for
    PATCH = "patch"  # each receptive field routes alone


class Routing(StrEnum):
    FAST = "fast"  # models.em_fast
    REFERENCE = "reference"  # unfold + einsum + em_routing as written


class PrimaryCaps(nn.Module):
    """1x1 convolutions from A feature channels to B capsule types: 4x4 pose + sigmoid activation."""

    def __init__(self, in_channels: int, types: int):
        super().__init__()
        self.types = types
        self.pose = nn.Conv2d(in_channels, types * 16, 1)
        self.activation = nn.Conv2d(in_channels, types, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, _, H, W = x.shape
        poses = self.pose(x).view(N, self.types, 16, H, W).permute(0, 3, 4, 1, 2)  # (N, H, W, B, 16)
        acts = torch.sigmoid(self.activation(x)).permute(0, 2, 3, 1)  # (N, H, W, B)
        return poses, acts


class WeightInit(StrEnum):
    NORMAL = "normal"  # every entry N(0, std^2)
    IDENTITY = "identity"  # I + N(0, std^2): every vote starts as a copy of its child's pose


def init_transforms(shape: tuple[int, ...], init: str, std: float) -> torch.Tensor:
    """Transformation matrices (..., 4, 4) drawn as ``init`` says."""
    init = parse_choice(WeightInit, init, "weight_init")
    w = torch.randn(*shape) * std
    if init is WeightInit.IDENTITY:
        w += torch.eye(4)
    return w


class BetaUnits(StrEnum):
    COST = "cost"  # beta_a as in the paper: logit = λ (beta_a - cost)
    LOGIT = "logit"  # the parameter is λ_T beta_a: the same math, a step size the optimiser can use


class _RoutingLayer(nn.Module):
    """Shared parameters and options of the layers that route: transformation matrices and betas."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        parents: int,
        inverse_temperatures: Sequence[float],
        *,
        cost_norm: str = "none",
        var_floor: float = DEFAULT_VAR_FLOOR,
        routing: str = "fast",
        weight_init: str = "normal",
        weight_std: float = 0.5,
        beta_a_init: Sequence[float] = (0.0, 0.0),
        beta_a_units: str = "cost",
    ):
        super().__init__()
        self.beta_a_units = parse_choice(BetaUnits, beta_a_units, "beta_a_units").value
        self.weight = nn.Parameter(init_transforms(weight_shape, weight_init, weight_std))
        self.beta_u = nn.Parameter(torch.zeros(parents))
        mean, std = beta_a_init
        beta_a = torch.full((parents,), float(mean))
        self.beta_a = nn.Parameter(beta_a + std * torch.randn(parents) if std else beta_a)
        self.inverse_temperatures = tuple(float(x) for x in inverse_temperatures)
        self.cost_norm = parse_choice(CostNorm, cost_norm, "cost_norm").value
        self.var_floor = float(var_floor)
        self.routing = parse_choice(Routing, routing, "routing").value

    def routing_beta_a(self) -> torch.Tensor:
        """beta_a as the routing uses it (cost units): the parameter itself, or parameter / λ_T when it is
        kept in logit units, so that a step of the optimiser moves the last logits by the same amount."""
        if self.beta_a_units == BetaUnits.LOGIT.value:
            return self.beta_a / self.inverse_temperatures[-1]
        return self.beta_a

    def _route(self, votes, acts, normalize=group_softmax, return_logits=False):
        return em_routing(
            votes,
            acts,
            self.beta_u,
            self.routing_beta_a(),
            self.inverse_temperatures,
            cost_norm=self.cost_norm,
            var_floor=self.var_floor,
            normalize=normalize,
            return_logits=return_logits,
        )

    def _fast_options(self) -> dict:
        return dict(
            inverse_temperatures=self.inverse_temperatures, cost_norm=self.cost_norm, var_floor=self.var_floor
        )


class ConvCaps(_RoutingLayer):
    """Convolutional capsules: K x K receptive fields of B child types, stride s, C parent types.

    weight (K·K·B, C, 4, 4): one 4x4 transformation per child slot (k, b) and parent type, shared over
    positions. poses (N, H, W, B, 16), acts (N, H, W, B) -> (N, Ho, Wo, C, 16), (N, Ho, Wo, C).
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel: int,
        stride: int,
        inverse_temperatures: Sequence[float],
        *,
        competition: str = "global",
        **routing_options,  # cost_norm, var_floor, routing, weight_init, ... (see _RoutingLayer)
    ):
        super().__init__(
            (kernel * kernel * in_types, out_types, 4, 4), out_types, inverse_temperatures, **routing_options
        )
        self.in_types, self.out_types, self.kernel, self.stride = in_types, out_types, kernel, stride
        self.competition = parse_choice(Competition, competition, "competition").value

    def extra_repr(self) -> str:
        return (
            f"B={self.in_types}, C={self.out_types}, K={self.kernel}, stride={self.stride}, "
            f"competition={self.competition}, routing={self.routing}"
        )

    def forward(self, poses: torch.Tensor, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, H, W, B, _ = poses.shape
        K, s, C = self.kernel, self.stride, self.out_types
        Ho, Wo = conv_out_size(H, K, s), conv_out_size(W, K, s)
        if B != self.in_types or Ho < 1 or Wo < 1:
            raise ValueError(
                f"ConvCaps(B={self.in_types}, K={K}) got a {H}x{W} grid of {B} types; it needs "
                f"{self.in_types} types on a grid of at least {K}x{K}"
            )
        if self.routing == Routing.FAST.value:
            mu, a = em_fast.conv_caps(
                poses,
                acts,
                self.weight,
                self.beta_u,
                self.routing_beta_a(),
                K,
                s,
                self.competition,
                **self._fast_options(),
            )
        else:
            mu, a = self._reference(poses, acts)
        return mu.view(N, Ho, Wo, C, 16), a.view(N, Ho, Wo, C)

    def _reference(self, poses, acts):
        N, H, W, B, _ = poses.shape
        K, s, KK = self.kernel, self.stride, self.kernel**2
        # 1. gather each receptive field's children: slot i = k·B + b
        p = F.unfold(poses.permute(0, 3, 4, 1, 2).reshape(N, B * 16, H, W), K, stride=s)  # (N, B·16·KK, L)
        L = p.shape[-1]
        p = p.view(N, B, 16, KK, L).permute(0, 4, 3, 1, 2).reshape(N, L, KK * B, 4, 4)
        a = F.unfold(acts.permute(0, 3, 1, 2), K, stride=s)  # (N, B·KK, L)
        a = a.view(N, B, KK, L).permute(0, 3, 2, 1).reshape(N, L, KK * B)
        # 2. votes V_ij = P_i W_ij: (N, L, I, C, 16)
        votes = torch.einsum("nlixy,icyz->nlicxz", p, self.weight).flatten(-2)
        # 3. route: per receptive field, or globally over every parent each child votes for
        normalize = group_softmax if self.competition == "patch" else GlobalSoftmax((H, W), K, s)
        return self._route(votes, a, normalize)  # (N, L, C, 16), (N, L, C)


class ClassCaps(_RoutingLayer):
    """Class capsules: every child capsule votes for every class, transformation shared over positions.

    weight (D, classes, 4, 4). With coordinate addition, the scaled centre (row, column) of each child's
    receptive field in the input image is added to the first two components of its votes.
    poses (N, S, S, D, 16), acts (N, S, S, D) -> (N, classes, 16), (N, classes).
    """

    def __init__(
        self,
        in_types: int,
        num_classes: int,
        inverse_temperatures: Sequence[float],
        centres: Sequence[float],
        *,
        coord_add: bool = True,
        **routing_options,  # cost_norm, var_floor, routing, weight_init, ... (see _RoutingLayer)
    ):
        super().__init__((in_types, num_classes, 4, 4), num_classes, inverse_temperatures, **routing_options)
        self.in_types, self.num_classes, self.coord_add = in_types, num_classes, bool(coord_add)
        self.register_buffer("centres", torch.as_tensor(centres, dtype=torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"D={self.in_types}, classes={self.num_classes}, coord_add={self.coord_add}, "
            f"routing={self.routing}"
        )

    def coordinate_offsets(self, dtype: torch.dtype) -> torch.Tensor:
        """(S·S·D, 16) added to every child's votes: row centre at component 0, column centre at 1."""
        S, D = len(self.centres), self.in_types
        off = torch.zeros(S, S, D, 16, dtype=dtype, device=self.centres.device)
        if self.coord_add:
            off[..., 0] = self.centres.to(dtype).view(S, 1, 1)
            off[..., 1] = self.centres.to(dtype).view(1, S, 1)
        return off.view(S * S * D, 16)

    def forward(
        self, poses: torch.Tensor, acts: torch.Tensor, *, return_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class poses and activations, or their logits lambda_T (beta_a - cost), which never saturate."""
        N, H, W, D, _ = poses.shape
        S = len(self.centres)
        if (H, W, D) != (S, S, self.in_types):
            raise ValueError(
                f"ClassCaps expects a {S}x{S} grid of {self.in_types} types, got {H}x{W} of {D}; "
                "build the network with the input_size it is fed"
            )
        p = poses.reshape(N, H * W * D, 4, 4)
        a = acts.reshape(N, H * W * D)
        off = self.coordinate_offsets(routing_dtype(p.dtype))  # float32 even when p is bf16
        if self.routing == Routing.FAST.value:
            return em_fast.class_caps(
                p,
                a,
                self.weight,
                off,
                self.beta_u,
                self.routing_beta_a(),
                **self._fast_options(),
                return_logits=return_logits,
            )
        weight = self.weight.repeat(H * W, 1, 1, 1)  # (S·S·D, classes, 4, 4), child i = position·D + d
        votes = (
            torch.einsum("nixy,icyz->nicxz", p, weight).flatten(-2) + off[:, None, :]
        )  # (N, I, classes, 16)
        return self._route(votes, a, return_logits=return_logits)
