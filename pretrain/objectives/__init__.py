"""Objective registry: `build_objective(recipe)` maps `objective.name` to a class, nothing else branches on it."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.objectives.base import Objective
    from pretrain.recipe import Recipe

_BUILDERS: dict[str, Callable[[Recipe], Objective]] = {}


def register(name: str):
    def deco(builder):
        _BUILDERS[name] = builder
        return builder

    return deco


def _load_all() -> None:
    """Import every module of this package for the side effect of registration: a new objective is a new file
    (its builder under @register, its config a section of the recipe's ObjectiveConfig). Lazy, so that
    `import pretrain` stays light."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def build_objective(recipe: Recipe) -> Objective:
    _load_all()
    name = recipe.objective.name
    if name not in _BUILDERS:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[name](recipe)


def known_objectives() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)
