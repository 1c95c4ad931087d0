"""The A1111 prompt language for sdcore: weights, BREAK, prompts of any length, scheduling, alternation, AND,
extra-network tags, for SD 1.x, 2.x and SDXL. See `docs/prompt-language.md`.

Hooks:
- `register_request_options`: the `prompt_language` options (emphasis mode, old timeline, pad conds, strict);
- `prepare_request`: every prompt is parsed at submit time, so a bad prompt is refused with `PromptError`
  (and a position) before the job is queued; tag plugins' checks run here too;
- `run_generation` (outermost wrapper): extra-network tags are handed to the plugins that claimed them
  (`register_prompt_tags`) before any other wrapper, e.g. a LoRA plugin's, runs;
- `encode_prompts`: the A1111 encoding (`encoder.py`), cached across jobs;
- `before_denoise_step`: second-order samplers switch prompts per model call, as A1111 does;
- `prepare_infotext`: `Emphasis`, `Old prompt editing timelines`, `Pad conds`, `Pad conds v0`;
- `register_commands`: `sdcore prompt parse` and `sdcore prompt tokens`.

For front ends and scripts: `parse(prompt, steps)` and `count_tokens(prompt, model=None)`.

Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sdcore.hookspecs import hookimpl

if TYPE_CHECKING:
    import click

    from sdcore.models import DiffusionModel

__all__ = ["OPTION_NAME", "PromptLanguageOptions", "count_tokens", "parse"]

OPTION_NAME = "prompt_language"

EmphasisMode = Literal["Original", "No norm", "Ignore", "None"]


class PromptLanguageOptions(BaseModel):
    """How the A1111 prompt language is read and encoded (A1111 settings of the same names)."""

    model_config = ConfigDict(extra="forbid")

    emphasis: EmphasisMode = Field(
        "Original",
        description=(
            "A1111's Emphasis mode. Original: multiply token vectors by their weights, then restore the "
            "chunk's mean. No norm: multiply only. Ignore: parse (brackets disappear) but weight everything 1. "
            "None: no emphasis syntax at all (brackets are literal text, BREAK is a word)."
        ),
    )
    old_timeline: bool = Field(
        False,
        description="A1111's 'Use old prompt editing timelines': [a:b:N] with N < 1 is a fraction, else a step.",
    )
    pad_conds: bool = Field(
        False,
        description="A1111's 'Pad prompt/negative prompt': pad the shorter of prompt and negative prompt with "
        "empty-prompt chunks (one UNet call for both; changes images).",
    )
    pad_conds_v0: bool = Field(
        False,
        description="A1111's 'Pad prompt/negative prompt (v0)': repeat the negative prompt's last vector (or "
        "cut it) to the prompt's length.",
    )
    strict: bool = Field(
        True,
        description="Refuse prompts where A1111 would silently drop or change syntax (see docs/prompt-language.md); "
        "False reads them exactly as A1111 does.",
    )

    @classmethod
    def from_infotext(cls, params: dict[str, str]) -> PromptLanguageOptions | None:
        data: dict[str, Any] = {}
        emphasis = params.get("Emphasis")
        if emphasis in ("No norm", "Ignore", "None"):
            data["emphasis"] = emphasis
        for key, field in (("Old prompt editing timelines", "old_timeline"), ("Pad conds", "pad_conds"),
                           ("Pad conds v0", "pad_conds_v0")):
            if str(params.get(key, "")).strip().lower() == "true":
                data[field] = True
        return cls(**data) if data else None


# ---------------------------------------------------------------------------------------------------
# Functions for front ends and scripts
# ---------------------------------------------------------------------------------------------------


def parse(
    prompt: str,
    steps: int = 20,
    hires_steps: int | None = None,
    *,
    negative: bool = False,
    use_old_timeline: bool = False,
    strict: bool = True,
) -> dict[str, Any]:
    """Parse a prompt as A1111 conditions on it (what `sdcore prompt parse` prints):

        {"prompt": text with tags removed,
         "extra_networks": {"lora": [["name", "0.8"], ...], ...},
         "subprompts": [{"text": ..., "weight": ...,
                         "schedule": [{"until": step, "text": ..., "chunks": [[text, weight], ...]}]}]}

    `steps` is the number of model calls the schedule covers (the UI steps, twice that for the second-order
    samplers Heun, DPM2, DPM2 a and DPM++ SDE); `hires_steps` gives the hires-fix pass's schedule. `negative`
    parses a negative prompt (no AND, no tags). "chunks" are emphasis runs, not 75-token chunks. Raises
    `sdcore.errors.PromptError` with the position of the problem.
    """
    from .parser import parse_negative_prompt, parse_prompt

    if negative:
        return parse_negative_prompt(prompt, steps, hires_steps, use_old_timeline=use_old_timeline, strict=strict)
    return parse_prompt(prompt, steps, hires_steps, use_old_timeline=use_old_timeline, strict=strict)


def count_tokens(
    prompt: str,
    model: DiffusionModel | None = None,
    *,
    steps: int = 20,
    negative: bool = False,
    emphasis: EmphasisMode = "Original",
    strict: bool = False,
) -> list[int]:
    """Tokens in each 75-token chunk of `prompt` (a UI shows `[42]` as "42/75", `[75, 12]` as "87/150").

    Counts the longest text the prompt becomes during sampling, as A1111's token counter does. A `model`
    adds its textual-inversion embeddings (each counts as its number of vectors); without one, the CLIP
    tokenizer shared by SD 1.x, 2.x and SDXL is used.
    """
    from .encoder import count_tokens as _count

    return _count(prompt, model, steps=steps, negative=negative, emphasis=emphasis, strict=strict)


# ---------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------


def _options(engine: Any, request: Any) -> PromptLanguageOptions:
    value = engine.option(request, OPTION_NAME)
    if isinstance(value, PromptLanguageOptions):
        return value
    return PromptLanguageOptions.model_validate(value.model_dump() if isinstance(value, BaseModel) else value or {})


@hookimpl
def register_request_options(register: Any) -> None:
    register(OPTION_NAME, PromptLanguageOptions)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from .cli import add_commands

    add_commands(cli)


@hookimpl
def prepare_request(request: Any, engine: Any) -> None:
    """Parse both prompts now, so a prompt A1111 would fail on (or misread, in strict mode) never gets queued."""
    from .encoder import parse_pair, sampler_step_multiplier
    from .tags import check_tags

    options = _options(engine, request)
    steps = int(request.steps) * sampler_step_multiplier(engine, request)
    positive, _ = parse_pair(request.prompt, request.negative_prompt, steps,
                             old_timeline=options.old_timeline, strict=options.strict)
    check_tags(positive["extra_networks"], request, engine)


@hookimpl(wrapper=True, tryfirst=True)
def run_generation(context: Any) -> Any:
    """Hand the prompt's extra-network tags to their plugins before the other wrappers (LoRA) run."""
    from .parser import extract_extra_networks
    from .tags import dispatch_tags

    options = _options(context.engine, context.request)
    _, networks = extract_extra_networks(context.request.prompt, strict=options.strict)
    info = context.extra.setdefault(OPTION_NAME, {})
    info["extra_networks"] = networks
    info["unknown_tags"] = dispatch_tags(networks, context)
    return (yield)


@hookimpl
def encode_prompts(context: Any) -> Any:
    from .encoder import encode_context

    return encode_context(context, _options(context.engine, context.request))


_CALLS = "_prompt_language_calls"


@hookimpl(tryfirst=True)
def before_denoise_step(state: Any) -> None:
    """Second-order samplers: A1111 schedules over twice the steps and switches per model call.

    The core picks `conditioning.at(index // order)`; for a conditioning this plugin made with a doubled
    schedule, replace that with the entry for the model-call index (counted per denoising run).
    """
    info = state.context.extra.get(OPTION_NAME)
    if not info or info.get("step_multiplier", 1) < 2:
        return
    conditioning = info.get("conditioning")
    if conditioning is None:
        return
    calls = state.__dict__.get(_CALLS, -1) + 1
    state.__dict__[_CALLS] = calls
    expected, current = conditioning.at(state.step), state.conditioning
    picked_by_core = current.negative is expected.negative and len(current.positive) == len(expected.positive) and all(
        a[0] is b[0] and a[1] == b[1] for a, b in zip(current.positive, expected.positive, strict=True)
    )
    if picked_by_core:  # not replaced by another plugin, and made by us
        state.conditioning = conditioning.at(calls)


@hookimpl
def prepare_infotext(params: dict[str, Any], context: Any) -> None:
    info = context.extra.get(OPTION_NAME)
    if not info or "conditioning" not in info:
        return
    options = _options(context.engine, context.request)
    if options.emphasis != "Original" and info.get("uses_emphasis"):
        params["Emphasis"] = options.emphasis
    if options.old_timeline:
        params["Old prompt editing timelines"] = True
    if info.get("padded"):
        params["Pad conds"] = True
    if info.get("padded_v0"):
        params["Pad conds v0"] = True
