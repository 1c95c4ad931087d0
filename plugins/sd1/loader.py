"""Loading SD 1.x / 2.x models from single files, diffusers folders and hub ids (imports torch lazily)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcore_plugins import sdcommon
from sdcore_plugins.sdcommon import ComponentSpec

from sdcore.checkpoints import ModelSource
from sdcore.errors import CheckpointError
from sdcore.models import LoadOptions

if TYPE_CHECKING:
    from .family import SD1Family
    from .model import SD1Model


def specs_for(variant: str) -> list[ComponentSpec]:
    text = (
        ComponentSpec("text_encoder", "openclip", "cond_stage_model.model.")
        if variant.startswith("sd2")
        else ComponentSpec("text_encoder", "clip", "cond_stage_model.transformer.")
    )
    return [
        ComponentSpec("unet", "unet", sdcommon.UNET_PREFIX),
        ComponentSpec("vae", "vae", sdcommon.VAE_PREFIX),
        text,
    ]


def _variant_for_config(variant: str, scheduler_config: dict[str, Any]) -> str:
    """An explicit config decides between SD 2.x 512 (ε) and 768 (v)."""
    if variant in ("sd2", "sd2-v"):
        return "sd2-v" if scheduler_config.get("prediction_type") == "v_prediction" else "sd2"
    return variant


def load_model(family: SD1Family, source: ModelSource, variant: str, options: LoadOptions) -> SD1Model:
    from .model import SD1Model

    dtype = sdcommon.torch_dtype(options.dtype)
    pad = family.pad_token(variant)
    if source.kind == "single_file":
        explicit = Path(options.config).expanduser() if options.config else None
        if explicit is not None and not (explicit / "unet").is_dir():
            raise CheckpointError(f"The config folder {explicit} has no unet/ subfolder (a diffusers config folder).")
        names = [spec.name for spec in specs_for(variant)] + ["scheduler"]
        if explicit is not None:
            configs = sdcommon.read_configs(explicit, names)
            variant = _variant_for_config(variant, configs["scheduler"])
        else:
            configs = single_file_configs(family, variant, source)
            configs["scheduler"] = sdcommon.apply_prediction_markers(configs["scheduler"], source.keys)
        scheduler_config = configs["scheduler"]
        modules = sdcommon.load_single_file_components(source, configs, specs_for(variant), dtype, options.vae)
        tokenizer = sdcommon.folder_tokenizer(explicit, "tokenizer", pad)
    elif source.kind == "diffusers":
        assert source.path is not None
        folder = source.path
        scheduler_config = sdcommon.read_component_config(folder, "scheduler")
        modules = sdcommon.load_folder_components(
            folder, specs_for(variant), dtype, options.vae, allow_pickle=options.allow_pickle
        )
        tokenizer = sdcommon.folder_tokenizer(folder, "tokenizer", pad)
    else:
        repo = source.location
        configs = {}
        for spec in specs_for(variant):
            name = f"{spec.name}/config.json"
            configs[spec.name] = sdcommon.hub_json(repo, name) or {}
        scheduler_config = sdcommon.hub_json(repo, "scheduler/scheduler_config.json") or {}
        modules = sdcommon.load_hub_components(repo, specs_for(variant), configs, dtype, options.vae)
        tokenizer = _hub_tokenizer(repo, pad)
    sdcommon.move(modules, options.device)
    return SD1Model(source, options, variant, modules, tokenizer, scheduler_config)


def single_file_configs(family: SD1Family, variant: str, source: ModelSource) -> dict[str, dict[str, Any]]:
    """The shipped configs of `variant`, or the family's tiny test architecture when the file has its widths."""
    names = [spec.name for spec in specs_for(variant)] + ["scheduler"]
    shipped = sdcommon.read_configs(family.config_folder(variant), names)
    if sdcommon.config_matches(shipped, specs_for(variant), source.keys):
        return shipped
    from .tiny import tiny_configs

    tiny = tiny_configs(family, variant)
    if sdcommon.config_matches(tiny, specs_for(variant), source.keys):
        return tiny
    return shipped  # the loader reports which tensors do not fit, and suggests a config folder


def _hub_tokenizer(repo: str, pad: str) -> Any:
    from sdcore.tokenizers import clip_tokenizer

    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer")
    except (OSError, ValueError):
        return clip_tokenizer(pad)


def write_config_folder(src: Path, dest: Path, tokenizers: dict[str, str]) -> Path:
    """Copy a shipped config folder to `dest` and add tokenizer folders (`{subfolder: pad_token}`)."""
    from sdcore.tokenizers import save_clip_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest, dirs_exist_ok=True)
    for subfolder, pad in tokenizers.items():
        save_clip_tokenizer(dest / subfolder, pad)
    return dest
