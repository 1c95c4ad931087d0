"""The SDXL model family: detection (keys and configs only, no torch) and loading entry points."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcore_plugins import sdcommon

from sdcore.checkpoints import ModelSource
from sdcore.errors import InvalidRequest
from sdcore.models import LoadOptions

if TYPE_CHECKING:
    import torch

    from .model import SDXLModel

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
VARIANTS = ("sdxl-base", "sdxl-refiner", "sdxl-inpaint")
U = sdcommon.UNET_PREFIX
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."
CLIP_G_REFINER = "conditioner.embedders.0.model."
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}


def detect_single_file(source: ModelSource) -> str | None:
    keys = source.keys
    conv_in = keys.get(U + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return None
    if source.has_prefix("cond_stage_model.") or "edm_mean" in keys:
        return None  # SD 1.x/2.x layout; Playground v2.5 (EDM) needs another scheduler family
    in_channels = int(conv_in[1])
    if source.has_prefix(CLIP_L) and source.has_prefix(CLIP_G):
        return {4: "sdxl-base", 9: "sdxl-inpaint"}.get(in_channels)
    if source.has_prefix(CLIP_G_REFINER) and not source.has_prefix(CLIP_L) and in_channels == 4:
        return "sdxl-refiner"
    return None


def _is_null(entry: Any) -> bool:
    return entry is None or (isinstance(entry, list) and all(e is None for e in entry))


def detect_configs(index: dict[str, Any], read: Any) -> str | None:
    if index.get("_class_name") not in SDXL_PIPELINES or _is_null(index.get("text_encoder_2")):
        return None
    unet = read("unet")
    if unet is None or unet.get("addition_embed_type") != "text_time":
        return None
    in_channels = int(unet.get("in_channels", 4))
    if _is_null(index.get("text_encoder")):
        return "sdxl-refiner" if in_channels == 4 else None
    return {4: "sdxl-base", 9: "sdxl-inpaint"}.get(in_channels)


def _reader(folder: Path | None, repo: str | None) -> Any:
    def read(component: str) -> dict[str, Any] | None:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        if repo is not None:
            return sdcommon.hub_json(repo, f"{component}/{name}")
        assert folder is not None
        path = folder / component / name
        return sdcommon.read_json(path) if path.is_file() else None

    return read


class SDXLFamily:
    """Stable Diffusion XL: `sdxl-base`, `sdxl-refiner` (second text encoder only, aesthetic score), `sdxl-inpaint`."""

    name = "sdxl"
    variants = VARIANTS

    def detect(self, source: ModelSource) -> str | None:
        if source.kind == "single_file":
            return detect_single_file(source)
        if source.kind == "diffusers" and source.path is not None and source.model_index is not None:
            return detect_configs(source.model_index, _reader(source.path, None))
        if source.kind == "hub":
            index = source.model_index or sdcommon.hub_json(source.location, "model_index.json")
            if index is None:
                return None
            return detect_configs(index, _reader(None, source.location))
        return None

    def config_folder(self, variant: str) -> Path:
        """The shipped diffusers config folder of a variant (configs only: no weights, no tokenizers)."""
        if variant not in VARIANTS:
            raise InvalidRequest(f"unknown sdxl variant {variant!r}; known: {', '.join(VARIANTS)}")
        return CONFIG_ROOT / variant

    def load(self, source: ModelSource, variant: str, options: LoadOptions) -> SDXLModel:
        from .loader import load_model

        return load_model(self, source, variant, options)

    def build_tiny(self, variant: str = "sdxl-base", seed: int = 0, dtype: str | torch.dtype = "float32") -> SDXLModel:
        """A random-weight model with the real SDXL block layout and tiny widths, deterministic per seed."""
        from .tiny import build_tiny

        return build_tiny(self, variant, seed=seed, dtype=dtype)

    def save_diffusers(self, model: SDXLModel, path: str | Path) -> Path:
        """Write `model` as a diffusers folder (with tokenizer files), loadable offline by sdcore and diffusers."""
        return model.save_diffusers(path)

    def diffusers_config_folder(self, variant: str, directory: str | Path) -> Path:
        """A complete diffusers config folder (shipped configs + tokenizer files) for plain diffusers'
        `from_single_file(path, config=folder)`; written into `directory` and returned."""
        from .loader import write_config_folder

        tokenizers = {"tokenizer_2": "!"} if variant == "sdxl-refiner" else {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
        return write_config_folder(self.config_folder(variant), Path(directory), tokenizers)
