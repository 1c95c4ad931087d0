"""Stable Diffusion XL model family (variants sdxl-base, sdxl-refiner, sdxl-inpaint)."""

from __future__ import annotations

from typing import Any

from sdcore.hookspecs import hookimpl


@hookimpl
def register_model_families(register: Any) -> None:
    from .family import SDXLFamily

    register(SDXLFamily())
