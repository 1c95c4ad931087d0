"""`SD1Model`: a loaded SD 1.x / 2.x model as the core's denoising loop sees it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sdcore_plugins import sdcommon

from sdcore.checkpoints import ModelSource
from sdcore.errors import InvalidRequest
from sdcore.models import DiffusionModel, LoadOptions, TokenOverride

from .loader import specs_for

PIPELINE_CLASSES = {
    "txt2img": "StableDiffusionPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
}


class SD1Model(DiffusionModel):
    """SD 1.x (CLIP ViT-L, encoder name "clip_l") or SD 2.x (OpenCLIP ViT-H, encoder name "clip_h").

    Clip skip follows A1111 for SD 1.x: `clip_skip` n takes `hidden_states[-n]` and applies the final layer norm
    (1 = the last layer). SD 2.x: the text encoder, as diffusers ships it, already stops at OpenCLIP's
    penultimate layer (23 of 24 layers; SD 2.x was trained on that layer), so `clip_skip=1` is what SD 2.x, A1111 and
    diffusers use. sdcore applies `clip_skip` n > 1 to SD 2.x the same way (n-1 more layers skipped); A1111
    ignores its clip skip setting for SD 2.x, so an A1111 SD 2.x image is reproduced with clip_skip 1 whatever its
    infotext says.
    """

    family = "sd1"
    # A1111 "Approx cheap" factors (modules/sd_vae_approx.py): rows are the 4 latent channels.
    latent_rgb_factors = (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    )

    def __init__(
        self,
        source: ModelSource,
        options: LoadOptions,
        variant: str,
        modules: dict[str, Any],
        tokenizer: Any,
        scheduler_config: dict[str, Any],
    ) -> None:
        super().__init__(source, options)
        self.variant = variant
        self.unet = modules["unet"]
        self.vae = modules["vae"]
        self.text_encoder = modules["text_encoder"]
        self._tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.default_size = (768, 768) if variant == "sd2-v" else (512, 512)

    # -- text -----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def is_sd2(self) -> bool:
        return self.variant.startswith("sd2")

    @property
    def encoder_name(self) -> str:
        """The key of this model's vectors in `TokenOverride.vectors` (and in A1111 SDXL-style embeddings)."""
        return "clip_h" if self.is_sd2 else "clip_l"

    @property
    def pad_token_id(self) -> int:
        pad = self._tokenizer.pad_token_id
        return int(pad) if pad is not None else 49407

    def encode_token_chunks(
        self, chunks: Sequence[Sequence[int | TokenOverride]], clip_skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, overrides = sdcommon.chunk_ids(list(chunks) or [[]], self.encoder_name, self.pad_token_id)
        skip = sdcommon.check_clip_skip(clip_skip, self.text_encoder)
        with self.lock:
            hidden, _ = sdcommon.run_clip(self.text_encoder, rows, overrides, None if skip == 1 else -skip, True)
        return hidden, None

    # -- diffusers interop ----------------------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        return sdcommon.make_scheduler(self.scheduler_config)

    def components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self._tokenizer,
            "unet": self.unet,
            "scheduler": self.make_scheduler(),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    def pipeline_class(self, mode: str) -> type:
        import diffusers

        if mode not in PIPELINE_CLASSES:
            raise InvalidRequest(f"unknown pipeline mode {mode!r}; use one of {', '.join(PIPELINE_CLASSES)}")
        return getattr(diffusers, PIPELINE_CLASSES[mode])

    # -- single files and folders ---------------------------------------------------------------------------
    def to_single_file_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights in the original LDM layout: `model.diffusion_model.*`, `first_stage_model.*` and
        `cond_stage_model.transformer.text_model.*` (SD 1.x) or OpenCLIP `cond_stage_model.model.*` (SD 2.x),
        plus A1111's `v_pred`/`ztsnr` markers when the scheduler config says so."""
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        state = sdcommon.components_to_single_file(modules, specs_for(self.variant))
        state.update(sdcommon.marker_tensors(self.scheduler_config))
        return state

    def single_file_metadata(self) -> dict[str, str]:
        """Optional safetensors metadata (SAI model spec) that records what the keys cannot: SD 2.x ε vs v."""
        prediction = "v" if self.prediction_type == "v_prediction" else "epsilon"
        arch = {"sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v"}.get(
            self.variant, "stable-diffusion-v1"
        )
        return {"modelspec.architecture": arch, "modelspec.prediction_type": prediction}

    def save_diffusers(self, path: str | Path) -> Path:
        """Write a diffusers folder (weights as safetensors, tokenizer files included)."""
        path = Path(path)
        mode = "inpaint" if self.is_inpainting else "txt2img"
        return sdcommon.save_pipeline(self.pipeline_class(mode)(**self.components()), path)
