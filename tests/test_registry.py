"""The model registry: names, patterns, rebuild records, clear errors."""

import pytest
import torch.nn as nn

import models
from models import UnknownModelError, create_model, list_models, register_model


def test_lists_the_paper_variants():
    assert {"em_capsnet", "em_capsnet_small", "cnn_baseline", "cnn_small"} <= set(list_models())
    assert list_models("cnn_*") == ["cnn_baseline", "cnn_small"]


def test_unknown_name_lists_close_names():
    with pytest.raises(UnknownModelError, match="did you mean cnn_small"):
        create_model("cnn_smal")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        def cnn_small(**kwargs):  # noqa: F811
            return nn.Identity()


def test_create_model_records_how_to_rebuild():
    model = create_model("cnn_small", num_classes=3, dropout=0.1)
    assert model.model_name == "cnn_small" and model.model_kwargs == {"num_classes": 3, "dropout": 0.1}
    assert model.family == "cnn" and model.default_loss == "cross_entropy"
    assert models.is_model("cnn_small") and not models.is_model("resnet50")
