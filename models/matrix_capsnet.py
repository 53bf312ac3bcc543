"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018).

The paper's smallNORB network: ReLU Conv1 (5x5, stride 2, A channels) -> PrimaryCaps (1x1, B types)
-> ConvCaps1 (3x3, stride 2, C types) -> ConvCaps2 (3x3, stride 1, D types) -> ClassCaps (weights shared
over positions, coordinate addition). On 32x32 input the grids are 14 -> 14 -> 6 -> 4; on 28x28,
12 -> 12 -> 5 -> 3. Parameter counts: em_capsnet (A=B=C=D=32) 316K (paper: ~310K),
em_capsnet_small (A=64, B=8, C=D=16) 68K (paper: 68K).

``forward`` returns the logits of the class activations, lambda_T (beta_a - cost_j), taken before the
sigmoid rather than recovered from a_j, so they never saturate and attacks always see a gradient;
``forward_capsules`` returns the class poses and activations a_j = sigmoid(logits).
"""

from __future__ import annotations

import inspect
from enum import StrEnum

import torch
import torch.nn as nn

from models._registry import register_model
from models.capsules import ClassCaps, Competition, ConvCaps, PrimaryCaps, Routing
from models.choices import parse_choice
from models.em_routing import DEFAULT_VAR_FLOOR, CostNorm, inverse_temperatures
from models.global_softmax import conv_out_size
from models.normalization import PerImageStandardize


class Loss(StrEnum):  # the runner's loss names (harness.losses), as a model may declare its default
    SPREAD = "spread"
    CROSS_ENTROPY = "cross_entropy"


class Conv1Norm(StrEnum):
    NONE = "none"  # the paper: ReLU(Conv1(x))
    BATCH = "batch"  # ReLU(BatchNorm(Conv1(x))), Conv1 without bias


class MatrixCapsNet(nn.Module):
    family = "capsule"
    default_lr = 3e-3  # the runner's optim.lr when left at 0 (docs/capsule_recipe.md)
    default_schedule = "cosine"  # the runner's optim.schedule when left at "auto" (same doc)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        input_size: int = 32,
        A: int = 32,
        B: int = 32,
        C: int = 32,
        D: int = 32,
        routing_iters: int = 3,
        competition: str = "global",  # global (the paper's intent) | patch (each receptive field alone)
        coord_add: bool = True,
        lambda_schedule: str = "official",  # official: final (1 - 0.95^t) | linear: 1, 2, 3 | constant
        final_lambda: float = 0.01,
        class_lambda_scale: float = 1.0,  # the class layer's λ_t = this × every other layer's λ_t
        cost_norm: str = "none",  # none (paper) | zscore (seed article) | scaled (Gritzman 2019)
        routing: str = "fast",  # fast (models.em_fast) | reference (unfold + einsum, docs/em_routing.md)
        var_floor: float = DEFAULT_VAR_FLOOR,
        conv1_norm: str = "none",  # none (paper) | batch: BatchNorm between Conv1 and its ReLU
        weight_init: str = "normal",  # normal | identity (I + noise) for the transformation matrices
        weight_std: float = 0.5,
        beta_a_init: tuple[float, float] = (0.0, 0.0),  # mean, std of each parent type's beta_a
        beta_a_units: str = "cost",  # cost (paper) | logit: the parameter is λ_T beta_a (same math)
        default_loss: str = "spread",  # the runner's loss when loss.name is "auto": spread | cross_entropy
    ):
        super().__init__()
        self.default_loss = parse_choice(Loss, default_loss, "default_loss").value
        for name, value in dict(in_channels=in_channels, num_classes=num_classes, A=A, B=B, C=C, D=D).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        competition = parse_choice(Competition, competition, "competition").value
        cost_norm = parse_choice(CostNorm, cost_norm, "cost_norm").value
        routing = parse_choice(Routing, routing, "routing").value
        lambdas = inverse_temperatures(lambda_schedule, routing_iters, final_lambda)
        if not class_lambda_scale > 0:
            raise ValueError(f"class_lambda_scale must be > 0, got {class_lambda_scale!r}")
        class_lambdas = [class_lambda_scale * lam for lam in lambdas]

        # grid sides and the receptive-field centres of ConvCaps2's positions (for coordinate addition)
        side1 = conv_out_size(input_size, 5, 2)
        side2 = conv_out_size(side1, 3, 2)
        side3 = conv_out_size(side2, 3, 1)
        if side3 < 1:
            raise ValueError(f"input_size {input_size} is too small for this network: use 28 or 32 (>= 19)")
        # pixel index of a ConvCaps2 centre: conv1 adds 2 (stride 2), ConvCaps1 2·1, ConvCaps2 4·1
        centres = [(8 + 4 * r + 0.5) / input_size for r in range(side3)]

        self.num_classes, self.input_size, self.in_channels = num_classes, input_size, in_channels
        self.inverse_temperatures = lambdas
        self.normalize = PerImageStandardize()
        batch_norm = parse_choice(Conv1Norm, conv1_norm, "conv1_norm") is Conv1Norm.BATCH
        self.conv1 = nn.Conv2d(in_channels, A, 5, stride=2, bias=not batch_norm)  # BatchNorm has a bias
        self.conv1_norm = nn.BatchNorm2d(A) if batch_norm else nn.Identity()
        self.primary_caps = PrimaryCaps(A, B)
        routing_args = dict(
            cost_norm=cost_norm,
            var_floor=var_floor,
            routing=routing,
            weight_init=weight_init,
            weight_std=weight_std,
            beta_a_init=tuple(beta_a_init),
            beta_a_units=beta_a_units,
        )
        self.conv_caps1 = ConvCaps(B, C, 3, 2, lambdas, competition=competition, **routing_args)
        self.conv_caps2 = ConvCaps(C, D, 3, 1, lambdas, competition=competition, **routing_args)
        self.class_caps = ClassCaps(
            D, num_classes, class_lambdas, centres, coord_add=coord_add, **routing_args
        )

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"expected input N×{want[0]}×{want[1]}×{want[2]}, got {tuple(x.shape)}; build the model "
                f"with in_channels/input_size matching the data"
            )

    def _class_capsules(self, x: torch.Tensor, return_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        features = torch.relu(self.conv1_norm(self.conv1(self.normalize(x))))  # (N, A, S1, S1)
        poses, acts = self.primary_caps(features)  # (N, S1, S1, B, 16), (N, S1, S1, B)
        poses, acts = self.conv_caps1(poses, acts)  # (N, S2, S2, C, ...)
        poses, acts = self.conv_caps2(poses, acts)  # (N, S3, S3, D, ...)
        return self.class_caps(poses, acts, return_logits=return_logits)

    def forward_capsules(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [0,1] pixels N×C×S×S -> class poses (N, classes, 16), class activations (N, classes)."""
        return self._class_capsules(x, return_logits=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits N×classes: the class activations before their sigmoid."""
        return self._class_capsules(x, return_logits=True)[1]


# Training recipes: constructor settings that differ from MatrixCapsNet's own (the paper's) defaults.
# "capsbench" is what learns best in the learning benchmark (docs/capsule_recipe.md has the evidence);
# "paper": the paper's settings (3 iterations, its λ schedule, spread loss) and N(0, 0.5²) transforms.
RECIPES = {
    "capsbench": dict(
        routing_iters=2,
        weight_init="identity",
        weight_std=0.1,
        class_lambda_scale=3.0,
        default_loss="cross_entropy",
    ),
    "paper": {},
}


def _create_capsnet(recipe: str = "capsbench", **kwargs) -> MatrixCapsNet:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: use one of {', '.join(map(repr, RECIPES))}")
    settings = {**RECIPES[recipe], **kwargs}
    model = MatrixCapsNet(**settings)
    # every constructor argument as built (defaults included), for create_model's model_kwargs
    bound = inspect.signature(MatrixCapsNet).bind(**settings)
    bound.apply_defaults()
    model.resolved_kwargs = dict(bound.arguments)
    return model


@register_model
def em_capsnet(**kwargs) -> MatrixCapsNet:
    """The paper's smallNORB capsule network, A=B=C=D=32 (≈310K parameters); ``recipe="paper"`` for the
    paper's training settings."""
    return _create_capsnet(**dict(dict(A=32, B=32, C=32, D=32), **kwargs))


@register_model
def em_capsnet_small(**kwargs) -> MatrixCapsNet:
    """The paper's small capsule network, A=64, B=8, C=D=16 (≈68K parameters); ``recipe="paper"`` for the
    paper's training settings."""
    return _create_capsnet(**dict(dict(A=64, B=8, C=16, D=16), **kwargs))
