"""Stable Diffusion 1.x and 2.x model family (variants sd15, sd15-inpaint, sd2, sd2-v, sd2-inpaint)."""

from __future__ import annotations

from typing import Any

from sdcore.hookspecs import hookimpl


@hookimpl
def register_model_families(register: Any) -> None:
    from .family import SD1Family

    register(SD1Family())
