"""Textual inversion for sdcore: A1111 `.pt` / `.safetensors` embeddings (SD 1.x, 2.x, SDXL), triggered by
their file name in the prompt or negative prompt. See `docs/textual-inversion.md`.

The prompt-language plugin does the encoding (A1111's name matching, weights, chunking); this plugin finds the
files, reads them, keeps those that fit the model in `model.plugin_state["prompt_language"]["embeddings"]`
and writes `TI hashes`.

Hooks:
- `on_model_loaded`, `prepare_request` (when the model is loaded) and `run_generation`: rescan the folders and
  refresh the model's embeddings when a file was added, removed or changed; an embedding that does not fit
  the model and is used in a prompt is refused (at submit time when the model is loaded, else when the job
  starts), naming the file and both widths;
- `prepare_infotext`: `TI hashes` of the embeddings the prompt and negative prompt used;
- `register_commands`: `sdcore embeddings [--json]`; `register_bridge_methods`: `list_embeddings`.

Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sdcore.hookspecs import hookimpl

STATE_KEY = "textual_inversion"
PROMPT_KEY = "prompt_language"
EMBEDDINGS_KEY = "embeddings"

_refresh_lock = threading.Lock()


def refresh(model: Any, engine: Any | None = None) -> dict[str, Any]:
    """Bring the model's embeddings up to date with the folders; returns this plugin's state of the model:
    `loaded` `{name: Embedding}`, `skipped` `{name: (Embedding | None, path, reason)}`."""
    from .library import EmbeddingError, available, file_key, load_embedding, log, model_widths

    widths = model_widths(model)
    files = available(engine)
    keys = {}
    for name, path in files.items():
        try:
            keys[name] = file_key(path)
        except OSError:
            continue
    signature = (tuple(sorted(keys.items())), tuple(sorted(widths.items())))
    with _refresh_lock:
        state = model.plugin_state.setdefault(STATE_KEY, {})
        if state.get("signature") == signature:
            return state
        loaded: dict[str, Any] = {}
        skipped: dict[str, tuple[Any, Path, str]] = {}
        mapping: dict[str, dict[str, Any]] = {}
        for name, key in keys.items():
            path = files[name]
            try:
                emb = load_embedding(path, key)
            except EmbeddingError as exc:
                log.warning("Embedding %s skipped: %s", path, exc)
                skipped[name] = (None, path, str(exc))
                continue
            fit = emb.fit(widths)
            if isinstance(fit, str):
                log.info("Embedding %s (%s) skipped for this model: %s.", name, path, fit)
                skipped[name] = (emb, path, fit)
                continue
            loaded[name] = emb
            mapping[name] = fit  # the same dict object while the file is unchanged: cached encodings stay valid
        prompt_state = model.plugin_state.setdefault(PROMPT_KEY, {})
        mine = state.get("mine", set())
        embeddings = {k: v for k, v in (prompt_state.get(EMBEDDINGS_KEY) or {}).items() if k not in mine}
        embeddings.update(mapping)
        prompt_state[EMBEDDINGS_KEY] = embeddings  # replaced whole: an encode running now sees old or new
        state.update(signature=signature, loaded=loaded, skipped=skipped, mine=set(mapping))
        return state


def used_names(request: Any, engine: Any, candidates: dict[str, Any]) -> list[str]:
    """Names of `candidates` (`{name: Embedding}`) in the request's prompt or negative prompt, matched as the
    prompt-language encoder matches them (CLIP tokens inside one emphasis run, any case, whole tokens)."""
    if not candidates:
        return []
    try:
        from sdcore_plugins.prompt_language import parse
        from sdcore_plugins.prompt_language.encoder import (
            EmbeddingSlot,
            comma_token_id,
            embedding_lookup,
            entry_runs,
            tokenize_line,
        )
    except ImportError:
        return []
    from sdcore.errors import PromptError
    from sdcore.tokenizers import clip_tokenizer

    emphasis = "Original"
    try:
        options = engine.option(request, PROMPT_KEY)
        emphasis = getattr(options, "emphasis", None) or emphasis
    except Exception:
        pass
    tokenizer = clip_tokenizer()

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    lookup = embedding_lookup({n: e.tensors for n, e in candidates.items()}, tokenize)
    comma = comma_token_id(tokenizer)
    steps = max(1, int(getattr(request, "steps", 20) or 20))
    found: set[str] = set()
    for text, negative in ((request.prompt or "", False), (request.negative_prompt or "", True)):
        if not text:
            continue
        try:
            parsed = parse(text, steps, negative=negative, strict=False)
        except PromptError:
            continue  # the prompt-language plugin reports it
        for sub in parsed["subprompts"]:
            for entry in sub["schedule"]:
                for chunk in tokenize_line(entry_runs(entry, emphasis), tokenize, comma, lookup):
                    found.update(t.name for t in chunk.tokens if isinstance(t, EmbeddingSlot))
    return sorted(found)


def check_used(request: Any, engine: Any, state: dict[str, Any]) -> None:
    """Refuse a request whose prompt uses an embedding that does not fit the model (or cannot be read)."""
    from .library import EmbeddingError, misfit_error

    skipped = state.get("skipped") or {}
    readable = {name: emb for name, (emb, _, _) in skipped.items() if emb is not None}
    for name in used_names(request, engine, readable):
        emb, _, reason = skipped[name]
        raise misfit_error(emb, reason)
    unreadable = [(name, reason) for name, (emb, _, reason) in skipped.items() if emb is None]
    if unreadable:
        import re

        text = f"{request.prompt or ''} {request.negative_prompt or ''}".lower()
        for name, reason in unreadable:
            if re.search(rf"(?<!\w){re.escape(name.lower())}(?!\w)", text):
                raise EmbeddingError(reason)


def _loaded_model(request: Any, engine: Any) -> Any:
    """The request's model if the engine has it loaded already (never loads one)."""
    return engine.loaded_model(request)


# --- hooks ------------------------------------------------------------------------------------------------


@hookimpl
def on_model_loaded(model: Any, engine: Any) -> None:
    refresh(model, engine)


@hookimpl
def prepare_request(request: Any, engine: Any) -> None:
    model = _loaded_model(request, engine)
    if model is not None:
        check_used(request, engine, refresh(model, engine))


@hookimpl(wrapper=True)
def run_generation(context: Any) -> Any:
    state = refresh(context.model, context.engine)
    check_used(context.request, context.engine, state)
    context.extra[STATE_KEY] = {name: emb.path for name, emb in (state.get("loaded") or {}).items()}
    return (yield)


@hookimpl
def prepare_infotext(params: dict[str, Any], context: Any) -> None:
    used = (context.extra.get(PROMPT_KEY) or {}).get("used_embeddings")
    paths = context.extra.get(STATE_KEY) or {}
    if not used or not paths:
        return
    from sdcore.infotext import format_name_hashes

    from .library import short_hash

    hashes = {name: short_hash(paths[name]) for name in used if name in paths}
    if hashes:
        params["TI hashes"] = format_name_hashes(hashes)


@hookimpl
def register_commands(cli: Any) -> None:
    from .cli import embeddings_command

    cli.add_command(embeddings_command)


@hookimpl
def register_bridge_methods(register: Any) -> None:
    def list_embeddings(data: dict[str, Any], context: Any) -> dict[str, Any]:
        """Every embedding file (`items`), and for the most recently loaded model A1111's
        `/sdapi/v1/embeddings` shape: `loaded` and `skipped`, `{name: {step, sd_checkpoint, ..., vectors}}`."""
        from .library import available, describe

        engine = context.engine
        items = [describe(path) for path in available(engine).values()]
        result: dict[str, Any] = {"items": items, "loaded": {}, "skipped": {}}
        models = engine.models.models()
        if models:
            state = refresh(models[-1], engine)
            for group, entries in (("loaded", state["loaded"].items()),
                                   ("skipped", ((n, e) for n, (e, _, _) in state["skipped"].items()))):
                for name, emb in entries:
                    if emb is not None:
                        result[group][name] = {
                            "step": emb.step, "sd_checkpoint": emb.sd_checkpoint,
                            "sd_checkpoint_name": emb.sd_checkpoint_name, "shape": emb.shape,
                            "vectors": emb.vectors,
                        }
        return result

    register("list_embeddings", list_embeddings)
