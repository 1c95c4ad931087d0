"""Loading SDXL models from single files, diffusers folders and hub ids (imports torch lazily)."""

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
    from .family import SDXLFamily
    from .model import SDXLModel


def specs_for(variant: str) -> list[ComponentSpec]:
    specs = [ComponentSpec("unet", "unet", sdcommon.UNET_PREFIX), ComponentSpec("vae", "vae", sdcommon.VAE_PREFIX)]
    if variant == "sdxl-refiner":
        return specs + [ComponentSpec("text_encoder_2", "openclip", "conditioner.embedders.0.model.")]
    return specs + [
        ComponentSpec("text_encoder", "clip", "conditioner.embedders.0.transformer."),
        ComponentSpec("text_encoder_2", "openclip", "conditioner.embedders.1.model."),
    ]


def single_file_configs(family: SDXLFamily, variant: str, source: ModelSource) -> dict[str, dict[str, Any]]:
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


def load_model(family: SDXLFamily, source: ModelSource, variant: str, options: LoadOptions) -> SDXLModel:
    from .model import SDXLModel

    dtype = sdcommon.torch_dtype(options.dtype)
    specs = specs_for(variant)
    names = [spec.name for spec in specs] + ["scheduler"]
    tokenizer_folder: Path | None = None
    if source.kind == "single_file":
        explicit = Path(options.config).expanduser() if options.config else None
        if explicit is not None and not (explicit / "unet").is_dir():
            raise CheckpointError(f"The config folder {explicit} has no unet/ subfolder (a diffusers config folder).")
        if explicit is not None:
            configs = sdcommon.read_configs(explicit, names)
        else:
            configs = single_file_configs(family, variant, source)
            configs["scheduler"] = sdcommon.apply_prediction_markers(configs["scheduler"], source.keys)
        modules = sdcommon.load_single_file_components(source, configs, specs, dtype, options.vae)
        tokenizer_folder = explicit
        scheduler_config = configs["scheduler"]
    elif source.kind == "diffusers":
        assert source.path is not None
        scheduler_config = sdcommon.read_component_config(source.path, "scheduler")
        modules = sdcommon.load_folder_components(
            source.path, specs, dtype, options.vae, allow_pickle=options.allow_pickle
        )
        tokenizer_folder = source.path
    else:
        repo = source.location
        configs = {spec.name: sdcommon.hub_json(repo, f"{spec.name}/config.json") or {} for spec in specs}
        scheduler_config = sdcommon.hub_json(repo, "scheduler/scheduler_config.json") or {}
        modules = sdcommon.load_hub_components(repo, specs, configs, dtype, options.vae)
    tokenizers = {"tokenizer_2": sdcommon.folder_tokenizer(tokenizer_folder, "tokenizer_2", "!")}
    if variant != "sdxl-refiner":
        tokenizers["tokenizer"] = sdcommon.folder_tokenizer(tokenizer_folder, "tokenizer", "<|endoftext|>")
    sdcommon.move(modules, options.device)
    return SDXLModel(source, options, variant, modules, tokenizers, scheduler_config)


def write_config_folder(src: Path, dest: Path, tokenizers: dict[str, str]) -> Path:
    """Copy a shipped config folder to `dest` and add tokenizer folders (`{subfolder: pad_token}`)."""
    from sdcore.tokenizers import save_clip_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest, dirs_exist_ok=True)
    for subfolder, pad in tokenizers.items():
        save_clip_tokenizer(dest / subfolder, pad)
    return dest
