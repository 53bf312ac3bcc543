"""The model registry: constructors registered by name, built by ``create_model`` (as in timm)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

import torch.nn as nn

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name; a duplicate name is an error."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is already registered; pick another constructor name")
    _model_entrypoints[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _model_entrypoints if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def check_model_name(name: str) -> None:
    """Raise UnknownModelError naming the closest registered models."""
    if is_model(name):
        return
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(list_models())}"
    raise UnknownModelError(f"unknown model {name!r}: {hint} (see models.list_models())")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``kwargs`` override the variant's defaults."""
    check_model_name(name)
    model = _model_entrypoints[name](**kwargs)
    model.model_name = name
    # a variant that resolves a recipe records every setting it built with, so a checkpoint rebuilds the
    # same model even after the recipe's defaults change
    model.model_kwargs = {**getattr(model, "resolved_kwargs", {}), **kwargs}
    return model
