"""The core's own hook implementations: the default behaviour that plugins extend or replace.

These are registered by `make_plugin_manager` before any entry-point plugin, under the name
"sdcore.defaults". They are the core, not a plugin: they hold no model-family or feature code.
"""

from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl


@hookimpl
def register_samplers(register: Any) -> None:
    from .samplers import BUILTIN_SAMPLERS

    for sampler in BUILTIN_SAMPLERS:
        register(sampler)


@hookimpl(trylast=True)
def encode_prompts(context: Any) -> Any:
    from .generation import plain_conditioning

    return plain_conditioning(context)


@hookimpl(trylast=True)
def run_generation(context: Any) -> Any:
    from .generation import generate_batch

    return generate_batch(context)
