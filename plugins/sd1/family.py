"""The SD 1.x / 2.x model family: detection (keys and configs only, no torch) and loading entry points."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcore_plugins import sdcommon

from sdcore.checkpoints import ModelSource
from sdcore.errors import InvalidRequest
from sdcore.models import LoadOptions

if TYPE_CHECKING:
    import torch

    from .model import SD1Model

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
VARIANTS = ("sd15", "sd15-inpaint", "sd2", "sd2-v", "sd2-inpaint")
U = sdcommon.UNET_PREFIX
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SD_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInpaintPipelineLegacy",
}


def _variant(sd2: bool, in_channels: int, prediction: str | None) -> str | None:
    if in_channels == 9:
        return "sd2-inpaint" if sd2 else "sd15-inpaint"
    if in_channels != 4:
        return None  # instruct-pix2pix (8), depth2img (5), x4 upscaler (7): not this family's pipelines
    if not sd2:
        return "sd15"
    return "sd2" if prediction == "epsilon" else "sd2-v"


def detect_single_file(source: ModelSource) -> str | None:
    keys = source.keys
    conv_in = keys.get(U + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return None
    if source.has_prefix("conditioner.") or U + "label_emb.0.0.weight" in keys:
        return None  # SGM layout / SDXL UNet: the sdxl family's
    if source.has_prefix(SD2_TEXT):
        sd2 = True
    elif source.has_prefix(SD1_TEXT):
        sd2 = False
    else:
        return None  # no text encoder this family knows how to read
    prediction = None
    if sd2:
        if sdcommon.V_PRED_MARKER in keys:
            prediction = "v_prediction"
        else:
            # SD 2.x 512 (epsilon) and 768 (v) files have identical keys: use metadata, then the file name, and
            # default to v-prediction like diffusers (A1111 runs a test denoise instead).
            prediction = sdcommon.metadata_prediction(source.metadata) or sdcommon.name_hints_prediction(source.name)
    return _variant(sd2, int(conv_in[1]), prediction)


def detect_configs(index: dict[str, Any], read: Any) -> str | None:
    """Detect from a diffusers model_index and a reader of component configs (`read(component) -> dict|None`)."""
    if index.get("_class_name") not in SD_PIPELINES:
        return None
    text = read("text_encoder")
    unet = read("unet")
    if text is None or unet is None:
        return None
    hidden = int(text.get("hidden_size", 0))
    sd2 = hidden == 1024 or (hidden != 768 and text.get("hidden_act") == "gelu")  # OpenCLIP uses gelu
    scheduler = read("scheduler") or {}
    return _variant(sd2, int(unet.get("in_channels", 4)), scheduler.get("prediction_type", "epsilon"))


def _folder_reader(folder: Path) -> Any:
    def read(component: str) -> dict[str, Any] | None:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        path = folder / component / name
        return sdcommon.read_json(path) if path.is_file() else None

    return read


def _hub_reader(repo: str) -> Any:
    def read(component: str) -> dict[str, Any] | None:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return sdcommon.hub_json(repo, f"{component}/{name}")

    return read


class SD1Family:
    """Stable Diffusion 1.x and 2.x: `sd15`, `sd15-inpaint`, `sd2` (512, ε), `sd2-v` (768, v), `sd2-inpaint`."""

    name = "sd1"
    variants = VARIANTS

    # -- detection ------------------------------------------------------------------------------------------
    def detect(self, source: ModelSource) -> str | None:
        if source.kind == "single_file":
            return detect_single_file(source)
        if source.kind == "diffusers" and source.path is not None and source.model_index is not None:
            return detect_configs(source.model_index, _folder_reader(source.path))
        if source.kind == "hub":
            index = source.model_index or sdcommon.hub_json(source.location, "model_index.json")
            if index is None:
                return None
            return detect_configs(index, _hub_reader(source.location))
        return None

    # -- loading --------------------------------------------------------------------------------------------
    def config_folder(self, variant: str) -> Path:
        """The shipped diffusers config folder of a variant (configs only: no weights, no tokenizer)."""
        if variant not in VARIANTS:
            raise InvalidRequest(f"unknown sd1 variant {variant!r}; known: {', '.join(VARIANTS)}")
        return CONFIG_ROOT / variant

    def load(self, source: ModelSource, variant: str, options: LoadOptions) -> SD1Model:
        from .loader import load_model

        return load_model(self, source, variant, options)

    # -- tools ----------------------------------------------------------------------------------------------
    def build_tiny(self, variant: str = "sd15", seed: int = 0, dtype: str | torch.dtype = "float32") -> SD1Model:
        """A random-weight model with the real block layout and tiny widths (for tests), deterministic per seed."""
        from .tiny import build_tiny

        return build_tiny(self, variant, seed=seed, dtype=dtype)

    def save_diffusers(self, model: SD1Model, path: str | Path) -> Path:
        """Write `model` as a diffusers folder (with tokenizer files), loadable offline by sdcore and diffusers."""
        return model.save_diffusers(path)

    def diffusers_config_folder(self, variant: str, directory: str | Path) -> Path:
        """A complete diffusers config folder (shipped configs + tokenizer files) for plain diffusers'
        `from_single_file(path, config=folder)`; written into `directory` and returned."""
        from .loader import write_config_folder

        return write_config_folder(self.config_folder(variant), Path(directory), {"tokenizer": self.pad_token(variant)})

    @staticmethod
    def tiny_name(variant: str) -> str:
        """File stem for a tiny test model; SD 2.x names say 512/768 like the real files (keys cannot)."""
        return {"sd2": "tiny-sd2-512-base", "sd2-v": "tiny-sd2-768-v"}.get(variant, f"tiny-{variant}")

    @staticmethod
    def pad_token(variant: str) -> str:
        return "!" if variant.startswith("sd2") else "<|endoftext|>"
