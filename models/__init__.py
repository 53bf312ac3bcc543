"""Models by name (timm / torchvision style).

    @register_model
    def em_capsnet_small(**kwargs): ...

    model = create_model("em_capsnet_small", num_classes=5)
    list_models("em_*")

Every registered model takes [0, 1] pixels N×C×H×W, normalises inside, and returns class logits
N×classes. Each model carries ``model_name`` and ``model_kwargs`` (set by ``create_model``) so that
it can be rebuilt from a record, ``family`` ("capsule" or "cnn"), ``default_loss`` ("spread" or
"cross_entropy"; a capsule net's comes from its recipe) and ``default_lr`` (Adam's learning rate that the
family learns best with).
"""

from models import cnn, matrix_capsnet  # noqa: F401  (importing a family registers its models)
from models._registry import (
    UnknownModelError,
    check_model_name,
    create_model,
    is_model,
    list_models,
    register_model,
)

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "is_model",
    "check_model_name",
    "UnknownModelError",
]
