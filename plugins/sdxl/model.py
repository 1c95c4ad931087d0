"""`SDXLModel`: a loaded SDXL base, refiner or inpainting model as the core's denoising loop sees it."""

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
    "txt2img": "StableDiffusionXLPipeline",
    "img2img": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
}


class SDXLModel(DiffusionModel):
    """SDXL: CLIP ViT-L ("clip_l") + OpenCLIP ViT-bigG ("clip_g"); the refiner has only the second.

    Prompt encoding as SDXL was trained, A1111 and diffusers do it: the penultimate hidden states of both
    encoders, without final layer norm, concatenated (768 + 1280 = 2048 wide for the real model); the pooled
    vector is clip_g's projected output at the EOS token. A1111 ignores its clip skip setting for SDXL, and so does
    this model by default; set `apply_clip_skip = True` to use `hidden_states[-(clip_skip + 1)]` of both encoders
    (diffusers' and ComfyUI's convention: clip_skip 1 is the usual penultimate layer).
    """

    family = "sdxl"
    # A1111 "Approx cheap" SDXL factors (modules/sd_vae_approx.py): rows are the 4 latent channels.
    latent_rgb_factors = (
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    )
    default_size = (1024, 1024)
    apply_clip_skip = False
    aesthetic_score = 6.0  # refiner defaults, as diffusers
    negative_aesthetic_score = 2.5

    def __init__(
        self,
        source: ModelSource,
        options: LoadOptions,
        variant: str,
        modules: dict[str, Any],
        tokenizers: dict[str, Any],
        scheduler_config: dict[str, Any],
    ) -> None:
        super().__init__(source, options)
        self.variant = variant
        self.unet = modules["unet"]
        self.vae = modules["vae"]
        self.text_encoder = modules.get("text_encoder")
        self.text_encoder_2 = modules["text_encoder_2"]
        self.tokenizer_1 = tokenizers.get("tokenizer")
        self.tokenizer_2 = tokenizers["tokenizer_2"]
        self.scheduler_config = dict(scheduler_config)

    @property
    def is_refiner(self) -> bool:
        return self.text_encoder is None

    # -- text -----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.tokenizer_1 if self.tokenizer_1 is not None else self.tokenizer_2

    def _layer(self, clip_skip: int) -> int:
        if not self.apply_clip_skip:
            return -2
        skip = max(1, int(clip_skip))
        for encoder in (self.text_encoder, self.text_encoder_2):
            if encoder is not None:
                sdcommon.check_clip_skip(skip + 1, encoder)
        return -(skip + 1)

    def encode_token_chunks(
        self, chunks: Sequence[Sequence[int | TokenOverride]], clip_skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states `[n, 77, D_l + D_g]` (refiner: `[n, 77, D_g]`) and clip_g's pooled output `[n, P]`."""
        chunks = list(chunks) or [[]]
        layer = self._layer(clip_skip)
        pad_g = self.tokenizer_2.pad_token_id
        rows_g, over_g = sdcommon.chunk_ids(chunks, "clip_g", 0 if pad_g is None else int(pad_g))
        with self.lock:
            hidden_g, pooled = sdcommon.run_clip(self.text_encoder_2, rows_g, over_g, layer, False)
            if self.text_encoder is None:
                return hidden_g, pooled
            pad_l = self.tokenizer_1.pad_token_id if self.tokenizer_1 is not None else None
            rows_l, over_l = sdcommon.chunk_ids(chunks, "clip_l", 49407 if pad_l is None else int(pad_l))
            hidden_l, _ = sdcommon.run_clip(self.text_encoder, rows_l, over_l, layer, False)
        hidden_g = hidden_g.to(device=hidden_l.device, dtype=hidden_l.dtype)
        return torch.cat([hidden_l, hidden_g], dim=-1), pooled

    # -- UNet conditioning ----------------------------------------------------------------------------------
    def time_ids(self, width: int, height: int, *, negative: bool = False) -> list[float]:
        """SDXL micro-conditioning: original size = target size = (height, width), crop (0, 0); the refiner
        replaces the target size with the aesthetic score (6.0, or 2.5 for the negative prompt)."""
        if self.is_refiner:
            score = self.negative_aesthetic_score if negative else self.aesthetic_score
            return [float(height), float(width), 0.0, 0.0, float(score)]
        return [float(height), float(width), 0.0, 0.0, float(height), float(width)]

    def added_cond_kwargs(
        self, pooled: torch.Tensor | None, width: int, height: int, batch: int, *, negative: bool = False
    ) -> dict[str, Any]:
        if pooled is None:
            raise InvalidRequest("SDXL needs the pooled text embedding (TextEmbedding.pooled) of the prompt")
        pooled = pooled.reshape(-1, pooled.shape[-1])
        if pooled.shape[0] == 1 and batch != 1:
            pooled = pooled.expand(batch, -1)
        elif pooled.shape[0] != batch:
            raise InvalidRequest(f"pooled embedding has {pooled.shape[0]} rows for a batch of {batch}")
        device, dtype = self.unet.device, self.unet.dtype
        ids = torch.tensor([self.time_ids(width, height, negative=negative)], device=device, dtype=dtype)
        return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": ids.expand(batch, -1)}

    # -- diffusers interop ----------------------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        return sdcommon.make_scheduler(self.scheduler_config)

    def components(self) -> dict[str, Any]:
        """Arguments every SDXL pipeline accepts; `pipeline()` adds `requires_aesthetics_score` where it applies."""
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer_1,
            "tokenizer_2": self.tokenizer_2,
            "unet": self.unet,
            "scheduler": self.make_scheduler(),
            "image_encoder": None,
            "feature_extractor": None,
            "force_zeros_for_empty_prompt": not self.is_refiner,
            "add_watermarker": False,
        }

    def pipeline_class(self, mode: str) -> type:
        import diffusers

        if mode not in PIPELINE_CLASSES:
            raise InvalidRequest(f"unknown pipeline mode {mode!r}; use one of {', '.join(PIPELINE_CLASSES)}")
        if self.is_refiner and mode == "txt2img":
            raise InvalidRequest("The SDXL refiner cannot generate from text alone; use it for img2img or inpaint.")
        return getattr(diffusers, PIPELINE_CLASSES[mode])

    def pipeline(self, mode: str = "txt2img") -> Any:
        with self.lock:
            if mode not in self._pipelines:
                cls = self.pipeline_class(mode)
                kwargs = {**self.components(), "requires_aesthetics_score": self.is_refiner}
                pipe = cls(**sdcommon.signature_kwargs(cls, kwargs))
                pipe.set_progress_bar_config(disable=True)
                self._pipelines[mode] = pipe
            return self._pipelines[mode]

    # -- single files and folders ---------------------------------------------------------------------------
    def to_single_file_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights in the SGM layout A1111 and ComfyUI read: `model.diffusion_model.*`, `first_stage_model.*`,
        `conditioner.embedders.0.transformer.text_model.*` (CLIP-L) and `conditioner.embedders.1.model.*`
        (OpenCLIP bigG; `embedders.0.model.*` for the refiner), plus `v_pred`/`ztsnr` markers when they apply."""
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder_2": self.text_encoder_2}
        if self.text_encoder is not None:
            modules["text_encoder"] = self.text_encoder
        state = sdcommon.components_to_single_file(modules, specs_for(self.variant))
        state.update(sdcommon.marker_tensors(self.scheduler_config))
        return state

    def save_diffusers(self, path: str | Path) -> Path:
        """Write a diffusers folder (weights as safetensors, tokenizer files included)."""
        path = Path(path)
        mode = {"sdxl-refiner": "img2img", "sdxl-inpaint": "inpaint"}.get(self.variant, "txt2img")
        cls = self.pipeline_class(mode)
        kwargs = {**self.components(), "requires_aesthetics_score": self.is_refiner}
        return sdcommon.save_pipeline(cls(**sdcommon.signature_kwargs(cls, kwargs)), path)
