"""Every hook sdcore calls, in the order a generation meets them.

The first word of a hook's name says how its result is used:

- `register_<things>(register)`: call `register(...)` for each thing you add; the host rejects duplicates.
- `encode_<noun>` / `load_<noun>`: `firstresult`; the first plugin that returns something other than None wins.
- `prepare_<noun>(<noun>, ...)`: mutate the first argument in place; the return value is ignored.
- `before_<event>(state)` / `after_<event>(state)`: called with one mutable state object.
- `run_<phase>(...)`: the core implements it (`trylast`); plugins wrap it with `@hookimpl(wrapper=True)`
  and `result = yield` to act before and after, or return early to replace it.
- `on_<event>(...)`: notification; the return value is ignored.

Argument names mean the same type in every hook: `engine` is the `Engine`, `request` a `GenerationRequest`,
`model` a `DiffusionModel`, `state` a `DenoiseState`, `register` the host's registration function. Specs may
gain arguments in later versions but never rename them; pluggy lets an implementation accept any subset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .conditioning import Conditioning
    from .engine import Engine
    from .generation import DenoiseState, GenerationContext, GenerationOutput
    from .models import DiffusionModel
    from .requests import GenerationRequest
    from .results import GenerationResult

hookspec = pluggy.HookspecMarker("sdcore")
hookimpl = pluggy.HookimplMarker("sdcore")


# --- 1. Start-up: what plugins add to the engine --------------------------------------------------------


@hookspec
def register_model_families(register: Any) -> None:
    """Add model families.

    Called once when the engine starts. Call `register(family)` with an object that satisfies
    `sdcore.models.ModelFamily` (a `name`, `detect(source)` and `load(source, variant, options)`).
    When a model is loaded, families are asked in registration order and the first whose `detect` returns a
    variant name loads it. Two families with one name raise `PluginError`.
    """


@hookspec
def register_samplers(register: Any) -> None:
    """Add samplers.

    Called once when the engine starts. Call `register(sampler)` with a `sdcore.samplers.Sampler`; its name
    (and aliases) become valid values of `GenerationRequest.sampler`. A name already registered raises
    `PluginError`.
    """


@hookspec
def register_request_options(register: Any) -> None:
    """Add typed options to `GenerationRequest.options`.

    Called once when the engine starts. Call `register(name, model_class)` where `model_class` is a pydantic
    model; requests then carry `options[name]`, validated against it, and the request JSON schema (`sdcore
    schema`, the bridge, widgets) shows it. A model may define `infotext() -> dict[str, str]` to add fields to
    the PNG metadata. Names must be unique across plugins.
    """


@hookspec
def register_prompt_tags(register: Any) -> None:
    """Claim extra-network tag names of the prompt language (`<lora:name:0.8>`, `<hypernet:name>`, ...).

    Called when the prompt-language plugin first needs its tag registry for an engine (and again after
    `Engine.register` adds plugins). Call `register(tag_name, handler, check=None)` once per name; the name
    is case-sensitive word characters, as A1111 matches it (`lora` and `LoRA` are different tags). A name
    already claimed raises `PluginError`.

    `handler(args_list, context)` is called once per batch, in the worker thread, before any other
    `run_generation` wrapper runs (so a LoRA plugin's wrapper can patch the model with what its handler
    recorded in `context.extra`). `args_list` holds one list of string arguments per occurrence of the tag
    in the positive prompt, in prompt order, split on every `:` as A1111 does (`<lora:a:0.8:unet=1>` gives
    `["a", "0.8", "unet=1"]`); `context` is the `GenerationContext`. The tag is removed from the text
    before encoding whether or not anyone claims it; unclaimed tags give a warning that names the known ones.

    `check(args_list, request, engine)`, if given, is called in `Engine.submit` (from the plugin's
    `prepare_request`); raise `sdcore.errors.InvalidRequest` there to refuse the job before it is queued
    (for example for a LoRA file that does not exist).
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add CLI commands.

    Called when the `sdcore` command line starts, with the root `click.Group`; add commands or groups to it
    with `cli.add_command(...)` or the `@cli.command()` decorator. Command names must not clash with the
    core's (`generate`, `info`, `regenerate`, `infotext`, `plugins`, `samplers`, `schema`).
    """


@hookspec
def register_bridge_methods(register: Any) -> None:
    """Add methods to the websocket bridge protocol (`docs/bridge-protocol.md`).

    Called once when a bridge server starts (`sdcore serve`), with the plugins of the engine it serves. Call
    `register(name, handler)` for each method: `name` becomes a request `type` that clients may send and that
    `welcome.capabilities.methods` lists; `handler(data, context)` gets the request's `data` dict and a
    `sdcore_bridges.server.MethodContext` (`context.engine`, `context.session_id`). It may be a plain function
    (run in a worker thread) or a coroutine function; the dict it returns is the reply's `data` (any other
    value is sent as `{"result": value}`), and an exception it raises becomes a typed `error` reply. The
    bridge answers `list_loras` and `list_embeddings` with an empty list until one plugin registers them;
    any other name already taken (by the bridge or another plugin) raises `PluginError`.
    """


# --- 2. Per job: request and model ------------------------------------------------------------------------


@hookspec
def prepare_request(request: GenerationRequest, engine: Engine) -> None:
    """Adjust or check a request before it is queued.

    Called in `Engine.submit`, in the caller's thread, after the core's own validation. Mutate `request` in
    place (e.g. fill defaults from plugin settings) or raise `sdcore.errors.InvalidRequest` to refuse it; the
    error reaches the caller and no job is created.
    """


@hookspec
def on_model_loaded(model: DiffusionModel, engine: Engine) -> None:
    """A model was loaded into the cache.

    Called once per load, in the worker thread, before the model is first used. Notification only; plugins use
    it to prepare per-model state in `model.plugin_state`.
    """


# --- 3. Per job: the generation ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def run_generation(context: GenerationContext) -> GenerationOutput:
    """Produce the images of one batch.

    `firstresult`; the core implements it (`trylast`): encode prompts, make noise, denoise, decode. Plugins wrap it
    (`@hookimpl(wrapper=True)`; `output = yield`) to patch the model before and restore it after (LoRA), or
    to run a second pass on the output (hires fix). `context` holds the request, model, seeds, progress and
    cancellation; see `sdcore.generation.GenerationContext`. Called once per batch in the worker thread.
    """


@hookspec(firstresult=True)
def encode_prompts(context: GenerationContext) -> Conditioning | None:
    """Turn the request's prompt and negative prompt into conditioning for every step.

    `firstresult`: the first plugin that returns a `sdcore.conditioning.Conditioning` wins. The core's
    fallback (`trylast`) encodes the texts as plain prompts with no syntax. Return None to let the next
    plugin (or the fallback) do it. `context.steps` is the number of sampling steps the conditioning must
    cover.
    """


@hookspec
def prepare_conditioning(conditioning: Conditioning, context: GenerationContext) -> None:
    """Adjust the conditioning after encoding and before denoising (mutate it in place)."""


@hookspec
def prepare_latents(state: DenoiseState) -> None:
    """Adjust the starting latents (`state.latents`) after the noise is made and before the first step."""


@hookspec
def before_denoise_step(state: DenoiseState) -> None:
    """Called before each UNet evaluation with the mutable `DenoiseState`.

    `state.step` is the 0-based step, `state.conditioning` the texts for this step (already chosen from the
    schedule). Plugins may replace `state.conditioning`, add UNet keyword arguments to `state.unet_kwargs`
    (e.g. ControlNet residuals) or change `state.guidance_scale`.
    """


@hookspec
def after_denoise_step(state: DenoiseState) -> None:
    """Called after each scheduler step with the mutable `DenoiseState`; `state.latents` holds the new latents."""


@hookspec
def prepare_infotext(params: dict[str, Any], context: GenerationContext) -> None:
    """Add or change the A1111 infotext fields of the images (mutate `params`, a key -> value dict).

    Keys follow A1111's spelling (e.g. "Lora hashes"); values that contain commas are quoted by the core.
    """


@hookspec
def on_generation_end(result: GenerationResult, engine: Engine) -> None:
    """A job finished successfully; `result` holds its images and infotexts. Notification only."""
