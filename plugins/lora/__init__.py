"""LoRA / LyCORIS plugin: `<lora:name:weight>` tags and the `lora` request option, merged exactly, restored bit for bit.

- Formats: kohya/A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`/`lora_te2_*`, diffusers or LDM layer names),
  diffusers/PEFT (`unet.*.lora_A/lora_B`), LyCORIS LoCon, LoHa, LoKr and full diff, for SD 1.x/2.x and SDXL.
- Each layer gets `W + weight × alpha/rank × ΔW` with its own alpha; weights are restored after each batch.
- CLI: `sdcore loras [--json]`, `sdcore merge --model M --lora FILE:WEIGHT ... --out FILE.safetensors`.

Heavy imports (torch, safetensors) happen inside the hook bodies.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from sdcore.hookspecs import hookimpl

log = logging.getLogger("sdcore.lora")

TAG_NAMES = ("lora", "lyco")
REVISION_KEY = "text_encoder_revision"


class LoraEntry(BaseModel):
    """One LoRA of a request: `weight` applies to both parts unless `te` / `unet` are given."""

    name: str = Field(description="LoRA name (file stem in a LoRA folder), file name, or path")
    weight: float = Field(1.0, description="Multiplier of the LoRA (A1111 `<lora:name:weight>`)")
    te: float | None = Field(None, description="Text-encoder multiplier (default: weight)")
    unet: float | None = Field(None, description="UNet multiplier (default: te, then weight)")

    def multipliers(self) -> tuple[float, float]:
        te = self.weight if self.te is None else self.te
        unet = te if self.unet is None else self.unet
        return te, unet


def _number(value: float) -> str:
    return f"{value:g}"


class LoraOptions(BaseModel):
    """LoRAs to apply to every image of the request, in addition to `<lora:...>` tags in the prompt."""

    loras: list[LoraEntry] = Field(default_factory=list)

    def infotext(self) -> dict[str, str]:
        if not self.loras:
            return {}
        parts = []
        for entry in self.loras:
            te, unet = entry.multipliers()
            weights = _number(te) if te == unet else f"te={_number(te)} unet={_number(unet)}"
            parts.append(f"{entry.name.replace(',', '').replace(':', '')}: {weights}")
        return {"Lora weights": ", ".join(parts)}

    @classmethod
    def from_infotext(cls, params: dict[str, str]) -> dict[str, Any] | None:
        text = params.get("Lora weights")
        if not text:
            return None
        loras = []
        for part in text.split(","):
            name, sep, weights = part.partition(":")
            if not sep or not name.strip():
                continue
            entry: dict[str, Any] = {"name": name.strip()}
            for token in weights.split():
                key, eq, value = token.partition("=")
                try:
                    if eq:
                        entry[key] = float(value)
                    else:
                        entry["weight"] = float(token)
                except ValueError:
                    continue
            loras.append(entry)
        return {"loras": loras} if loras else None


def parse_tag(args: list[str]) -> LoraEntry:
    """A1111's `<lora:NAME[:TE[:UNET[:DYN]]]>` with named `te=`, `unet=`, `dyn=` overrides."""
    from .formats import LoraError

    if not args or not args[0].strip():
        raise LoraError("A <lora:...> tag has no name: write <lora:NAME:WEIGHT>.")
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in args[1:]:
        if arg.count("=") == 1:
            key, value = arg.split("=")
            named[key.strip()] = value.strip()
        else:
            positional.append(arg.strip())

    def number(text: str, what: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise LoraError(f"<lora:{':'.join(args)}>: {what} {text!r} is not a number.") from None

    te = number(positional[0], "the weight") if positional else 1.0
    unet = number(positional[1], "the UNet weight") if len(positional) > 1 else None
    if "te" in named:
        te = number(named["te"], "te")
    if "unet" in named:
        unet = number(named["unet"], "unet")
    if "dyn" in named or len(positional) > 2:
        log.warning("<lora:%s>: dyn (dynamic rank) is not supported and is ignored.", ":".join(args))
    return LoraEntry(name=args[0].strip(), weight=te, te=te, unet=unet)


def _wanted(context: Any) -> list[LoraEntry]:
    entries = list(context.extra.get("lora_tags", []))
    options = context.engine.option(context.request, "lora")
    if options is not None:
        entries.extend(options.loras)
    return entries


# --- hooks ------------------------------------------------------------------------------------------------


@hookimpl
def register_request_options(register: Any) -> None:
    register("lora", LoraOptions)


@hookimpl
def register_prompt_tags(register: Any) -> None:
    def handler(args_list: list[list[str]], context: Any) -> None:
        context.extra.setdefault("lora_tags", []).extend(parse_tag(args) for args in args_list)

    def check(args_list: list[list[str]], request: Any, engine: Any) -> None:
        from .library import find_lora

        for args in args_list:
            find_lora(parse_tag(args).name, engine)

    for name in TAG_NAMES:
        register(name, handler, check)


@hookimpl
def prepare_request(request: Any, engine: Any) -> None:
    """Refuse requests naming LoRA files that do not exist or cannot be read (keys are checked at run time)."""
    from .library import find_lora, load_lora

    options = request.options.get("lora")
    if options is None:
        return
    for entry in options.loras if isinstance(options, LoraOptions) else LoraOptions.model_validate(options).loras:
        load_lora(find_lora(entry.name, engine))


@hookimpl(wrapper=True)
def run_generation(context: Any) -> Any:
    entries = _wanted(context)
    if not entries:
        return (yield)
    from sdcore.hashing import lora_short_hash

    from . import patch
    from .library import SUFFIXES, find_lora, load_lora

    model = context.model
    resolved = []
    hashes: dict[str, str] = {}
    for entry in entries:
        path = find_lora(entry.name, context.engine)
        te, unet = entry.multipliers()
        resolved.append(patch.resolve(model, load_lora(path), te, unet))  # raises before any change
        plain = not any(c in entry.name for c in "/\\") and not entry.name.lower().endswith(SUFFIXES)
        hashes.setdefault(entry.name if plain else path.stem, lora_short_hash(path))
    context.extra["lora_hashes"] = hashes
    # The prompt-language plugin keys its cached encodings on this value (see its `model_state`): describe
    # the text-encoder patch while it is in, and put the old value back afterwards (old encodings valid again).
    prompt_state = model.plugin_state.setdefault("prompt_language", {})
    old_revision = prompt_state.get(REVISION_KEY, 0)
    with model.lock:
        try:
            if patch.apply(model, resolved):
                prompt_state[REVISION_KEY] = ("lora", tuple(
                    (str(r.lora.path), r.lora.path.stat().st_mtime_ns, r.te) for r in resolved if r.te
                ))
            return (yield)
        finally:
            patch.restore(model)
            prompt_state[REVISION_KEY] = old_revision


@hookimpl
def prepare_infotext(params: dict[str, Any], context: Any) -> None:
    from sdcore.infotext import format_name_hashes

    hashes = context.extra.get("lora_hashes")
    if hashes:
        params["Lora hashes"] = format_name_hashes(hashes)


@hookimpl
def register_commands(cli: Any) -> None:
    from .cli import loras_command, merge_command

    cli.add_command(loras_command)
    cli.add_command(merge_command)


@hookimpl
def register_bridge_methods(register: Any) -> None:
    def list_loras(data: dict[str, Any], context: Any) -> dict[str, Any]:
        from .library import available, describe

        items = []
        for path in available(context.engine):
            info = describe(path)
            info.update(alias=info["name"], metadata={})  # the fields A1111's /sdapi/v1/loras has
            items.append(info)
        return {"items": items}

    register("list_loras", list_loras)
