"""Finding the model families that plugins register."""

from __future__ import annotations

import pluggy

from .models import ModelFamily
from .registry import Registry, collect


def collect_families(pm: pluggy.PluginManager) -> Registry[ModelFamily]:
    """Every family registered through `register_model_families`, in registration order."""
    families: Registry[ModelFamily] = Registry("Model family")
    collect(pm.hook.register_model_families, pm, families, lambda family: family.name)
    return families
