"""Requests ↔ A1111 infotext: what each image records, and how a recorded image is made again."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import InvalidRequest
from .infotext import Infotext, format_infotext, parse_infotext
from .requests import GenerationRequest, MaskedContent, Mode

if TYPE_CHECKING:
    from .engine import Engine
    from .generation import GenerationContext

SDCORE_VERSION = f"sdcore {__version__}"


def infotext_params(context: GenerationContext, index: int) -> dict[str, Any]:
    """The A1111 key → value pairs of image `index` of a batch, before plugins add theirs."""
    request, model = context.request, context.model
    mode = request.resolved_mode
    params: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": request.schedule_type,
        "CFG scale": _number(request.cfg_scale),
        "Seed": context.seeds[index],
        "Size": f"{context.width}x{context.height}",
        "Model hash": model.hash,
        "Model": model.name,
        "VAE hash": model.vae_hash,
        "VAE": model.vae_name,
    }
    if request.subseed_strength > 0:
        params["Variation seed"] = context.subseeds[index]
        params["Variation seed strength"] = _number(request.subseed_strength)
    if mode is not Mode.txt2img:
        params["Denoising strength"] = _number(request.denoising_strength)
    if request.clip_skip > 1:
        params["Clip skip"] = request.clip_skip
    # sdcore draws noise on the CPU, like A1111's "RNG: CPU" setting; recording it lets A1111 match the seed.
    params["RNG"] = "CPU"
    if mode is Mode.inpaint:
        params["Mask blur"] = request.mask_blur
        if request.inpaint_full_res:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = request.inpaint_full_res_padding
        content = MaskedContent(request.masked_content)
        if content is not MaskedContent.original:
            params["Masked content"] = content.value
    for value in request.options.values():
        to_infotext = getattr(value, "infotext", None)
        if callable(to_infotext):
            params.update(to_infotext())
    params.update(context.infotext_params)
    return params


def build_infotext(context: GenerationContext, index: int) -> str:
    params = infotext_params(context, index)
    context.engine.pm.hook.prepare_infotext(params=params, context=context)
    params["Version"] = SDCORE_VERSION
    return format_infotext(context.request.prompt, context.request.negative_prompt, params)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def request_from_infotext(
    text: str | Infotext, *, engine: Engine | None = None, **overrides: Any
) -> GenerationRequest:
    """A request that makes the image described by `text` again (txt2img fields; images are not stored).

    Fields sdcore does not know are ignored; plugins that registered options with a `from_infotext`
    classmethod get their fields back. `overrides` (e.g. `model=...`) win over the recorded values.
    """
    info = parse_infotext(text) if isinstance(text, str) else text
    params = info.params
    if "Steps" not in params and "Seed" not in params:
        raise InvalidRequest("This text has no generation parameters (no 'Steps:' or 'Seed:' line).")
    data: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}

    def take(key: str, field: str, convert: Any) -> None:
        if key in params:
            try:
                data[field] = convert(params[key])
            except ValueError:
                raise InvalidRequest(f"Infotext field {key!r} has an unusable value {params[key]!r}.") from None

    take("Steps", "steps", int)
    take("Sampler", "sampler", str)
    take("Schedule type", "schedule_type", str)
    take("CFG scale", "cfg_scale", float)
    take("Seed", "seed", int)
    take("Clip skip", "clip_skip", int)
    take("Variation seed", "subseed", int)
    take("Variation seed strength", "subseed_strength", float)
    take("Denoising strength", "denoising_strength", float)
    take("Mask blur", "mask_blur", int)
    if "Size" in params:
        try:
            width, height = (int(v) for v in params["Size"].lower().split("x"))
        except ValueError:
            raise InvalidRequest(f"Infotext Size {params['Size']!r} is not WIDTHxHEIGHT.") from None
        data["width"], data["height"] = width, height
    if "Model" in params:
        data["model"] = params["Model"]
    if engine is not None:
        options = {}
        for name, model in engine.request_options.items():
            from_infotext = getattr(model, "from_infotext", None)
            if callable(from_infotext):
                value = from_infotext(params)
                if value is not None:
                    options[name] = value
        if options:
            data["options"] = options
    data.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationRequest.parse(data)
