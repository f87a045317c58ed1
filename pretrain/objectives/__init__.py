"""Objective registry: `build_objective(recipe)` maps `objective.name` to a class, nothing else branches on it."""

from __future__ import annotations

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
    # Import for the side effect of registration; kept lazy so `import pretrain` stays light.
    import importlib

    for mod in ("mae", "dino", "clip", "supervised"):
        try:
            importlib.import_module(f"pretrain.objectives.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"pretrain.objectives.{mod}":
                raise


def build_objective(recipe: Recipe) -> Objective:
    _load_all()
    name = recipe.objective.name
    if name not in _BUILDERS:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[name](recipe)


def known_objectives() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)
